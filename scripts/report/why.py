"""The first screen's where and why lines, from the inputs that answer them when the report is given them:

  where  a one-layer-at-a-time sweep (scripts/study/layer_sweep.py: layer_sweep.csv, one row per dataset, block, mode
         and layer with its log-perplexity increase, and layer_sweep_summary.csv beside it with the sum over layers
         against the all-layers increase): the layers that cost most, and how much compounds;
  why    on-policy recall (sparse_sweep.py's columns {mlp,att}_on_policy_recall_layers: the Recall@K of the mask each
         run applied against the true top-K of its own activations, per sparse layer) beside the same predictors'
         held-out Recall@K on the dense model's states (the per-budget predictors' summary CSVs), and the predictor
         shaped like SwiGLU (recall_summary.py records whose ranking starts with "structured") beside DejaVu's.
Every sentence only reads numbers; what a line leaves out is named.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Sequence

TOP_LAYERS = 3
HEADLINE_DATASET = "c4"


def summary_rows(layer_sweep_csv: Path) -> list[dict]:
    """layer_sweep_summary.csv beside a layer_sweep.csv (none when absent)."""
    path = layer_sweep_csv.with_name("layer_sweep_summary.csv")
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def layer_sweep_lines(layer_sweeps: Sequence[tuple[Path, list[dict]]]) -> list[str]:
    """Per model and block, for the predictor (else the first mode): the costliest single sparse layers, the sum of
    the single-layer log-perplexity increases and the all-layers increase with their ratio."""
    lines = []
    for path, rows in layer_sweeps:
        rows = [r for r in rows if r.get("dataset", HEADLINE_DATASET) == HEADLINE_DATASET]
        totals = {(r["block"], r["mode"]): r for r in summary_rows(path)
                  if r.get("dataset", HEADLINE_DATASET) == HEADLINE_DATASET}
        for model, block in dict.fromkeys((r["model"], r["block"]) for r in rows):
            chosen = [r for r in rows if (r["model"], r["block"]) == (model, block)]
            mode = "predictor" if any(r["mode"] == "predictor" for r in chosen) else chosen[0]["mode"]
            singles = sorted(((int(r["layer"]), float(r["log_increase"])) for r in chosen if r["mode"] == mode),
                             key=lambda p: -p[1])
            top = ", ".join(f"{layer} ({v:.3f})" for layer, v in singles[:TOP_LAYERS])
            text = (f"{model}, {block} at {chosen[0]['budget']}, {mode}: the costliest single sparse layers are {top} "
                    f"in log perplexity over dense")
            total = totals.get((block, mode))
            if total:
                text += (f"; their sum over {total['layers']} layers {float(total['sum_single_log_increase']):.3f} "
                         f"against {float(total['all_layers_log_increase']):.3f} with every layer sparse "
                         f"(ratio {float(total['compounding']):.2f})")
            lines.append(text + ".")
    return lines


def layer_values(text: str) -> dict[int, float]:
    """'1:0.8125 2:0.7031' -> {1: 0.8125, 2: 0.7031}."""
    return {int(layer): float(value) for layer, value in (pair.split(":") for pair in text.split())} if text else {}


def on_policy_lines(sweeps: Sequence[tuple[Path, list[dict]]],
                    held_out: dict[tuple[str, str, float], list[tuple[int, float]]]) -> list[str]:
    """Per model, block and budget of the predictor's rows of that block alone: the mean on-policy Recall@K over the
    sparse layers, in the first and the second half of them, beside the same predictors' held-out Recall@K on the
    dense model's states over the same layers (when the per-budget predictors were given)."""
    lines = []
    for _, rows in sweeps:
        for row in rows:
            block = row.get("block")
            if (row["mode"], row.get("dataset")) != ("predictor", HEADLINE_DATASET) or block not in ("mlp", "att"):
                continue
            recall = layer_values(row.get(f"{block}_on_policy_recall_layers", ""))
            if not recall:
                continue
            layers = sorted(recall)
            half = max(1, len(layers) // 2)
            mean = lambda chosen: sum(recall[l] for l in chosen) / len(chosen)  # noqa: E731
            budget = float(row[f"{block}_topk"])
            text = (f"{row['model']}, {'MLP' if block == 'mlp' else 'attention'} at {budget:g}, predictor: on-policy "
                    f"Recall@K of the applied masks {mean(layers):.3f} over {len(layers)} sparse layers "
                    f"({mean(layers[:half]):.3f} in the first half, {mean(layers[half:] or layers):.3f} in the second)")
            dense_states = dict(held_out.get((row["model"], block, budget), []))
            common = [l for l in layers if l in dense_states]
            if common:
                text += (f"; held out on the dense model's states the same predictors score "
                         f"{sum(dense_states[l] for l in common) / len(common):.3f} over those layers")
            lines.append(text + ".")
    return lines


def structured_lines(recall_payloads: Sequence[dict]) -> list[str]:
    """Per model and structured ranking: its mean Recall@K against the lookahead predictor's on the same layers."""
    lines = []
    for payload in recall_payloads:
        model = payload["source"]["model"]
        by: dict[tuple[str, float], dict[int, float]] = defaultdict(dict)
        predictor: dict[float, dict[int, float]] = defaultdict(dict)
        for r in payload["records"]:
            if r.get("block") != "mlp" or r.get("Recall@K") is None:
                continue
            if str(r.get("ranking", "")).startswith("structured") and r.get("input") == "lookahead":
                by[(r["ranking"], r["k"])][r["layer"]] = r["Recall@K"]
            elif "ranking" not in r and r.get("input") == "lookahead" and r.get("label") == "topk":
                predictor[r["k"]][r["layer"]] = r["Recall@K"]
        for (ranking, k), layers in sorted(by.items()):
            common = sorted(set(layers) & set(predictor.get(k, {})))
            if common:
                ours = sum(layers[l] for l in common) / len(common)
                theirs = sum(predictor[k][l] for l in common) / len(common)
                lines.append(f"{model}, MLP, K = {k:g}: {ranking} Recall@K {ours:.3f} against DejaVu's lookahead "
                             f"predictor's {theirs:.3f} (mean over {len(common)} layers).")
    return lines


def decomposition_lines(recall_payloads: Sequence[dict]) -> list[str]:
    """Per model: the 2 x 2 of recall_summary.py's structured_decomposition (input: lookahead or same-layer; function:
    DejaVu's linear predictor or the layer's exact SwiGLU form) as means over its layers."""
    lines = []
    for payload in recall_payloads:
        rows = payload.get("structured_decomposition") or []
        if not rows:
            continue
        mean = lambda name, form: sum(r["cells"][name][form] for r in rows) / len(rows)  # noqa: E731
        lines.append(f"{payload['source']['model']}, MLP, K = {rows[0]['k']:g}, Recall@K mean over {len(rows)} "
                     f"layers: lookahead input with DejaVu's linear predictor {mean('lookahead', 'linear'):.3f}, with "
                     f"the exact MLP form {mean('lookahead', 'exact'):.3f}; same-layer input with the linear predictor "
                     f"{mean('same', 'linear'):.3f}, with the exact form {mean('same', 'exact'):.3f} (the oracle).")
    return lines
