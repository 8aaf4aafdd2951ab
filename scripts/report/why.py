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
    """One line per model: for each block and budget of the predictor's rows of that block alone (head units), the
    mean on-policy Recall@K over the sparse layers, with the first and second half of them, beside the same
    predictors' held-out Recall@K on the dense model's states over the same layers (when the per-budget predictors were
    given)."""
    clauses: dict[str, list[str]] = defaultdict(list)
    for _, rows in sweeps:
        for row in rows:
            block = row.get("block")
            if ((row["mode"], row.get("dataset")) != ("predictor", HEADLINE_DATASET) or block not in ("mlp", "att")
                    or row.get("att_unit") == "groups"):
                continue
            recall = layer_values(row.get(f"{block}_on_policy_recall_layers", ""))
            if not recall:
                continue
            layers = sorted(recall)
            half = max(1, len(layers) // 2)
            mean = lambda chosen: sum(recall[l] for l in chosen) / len(chosen)  # noqa: E731
            budget = float(row[f"{block}_topk"])
            dense_states = dict(held_out.get((row["model"], block, budget), []))
            common = [l for l in layers if l in dense_states]
            off = f" vs {sum(dense_states[l] for l in common) / len(common):.3f}" if common else ""
            clauses[row["model"]].append(f"{'MLP' if block == 'mlp' else 'attention'} {budget:g}: "
                                         f"{mean(layers):.3f}{off} (halves {mean(layers[:half]):.3f}, "
                                         f"{mean(layers[half:] or layers):.3f})")
    return [f"{model}, predictor's Recall@K on the sparse model's own states (on-policy, mean over the sparse layers) "
            f"vs held out on the dense model's states, same layers: " + "; ".join(parts) + "."
            for model, parts in clauses.items()]


HEADLINE_K = 0.25  # the K of the why lines: the recorded K closest to it


def structured_lines(recall_payloads: Sequence[dict]) -> list[str]:
    """One line per model at the K closest to HEADLINE_K: each structured ranking's mean Recall@K from the lookahead
    input beside DejaVu's lookahead predictor's, on the layers both have."""
    lines = []
    for payload in recall_payloads:
        by: dict[tuple[str, float], dict[int, float]] = defaultdict(dict)
        predictor: dict[float, dict[int, float]] = defaultdict(dict)
        for r in payload["records"]:
            if r.get("block") != "mlp" or r.get("Recall@K") is None or r.get("input") != "lookahead":
                continue
            if str(r.get("ranking", "")).startswith("structured"):
                by[(r["ranking"], r["k"])][r["layer"]] = r["Recall@K"]
            elif "ranking" not in r and r.get("label") == "topk":
                predictor[r["k"]][r["layer"]] = r["Recall@K"]
        ks = sorted({k for _, k in by} & set(predictor))
        if not ks:
            continue
        k = min(ks, key=lambda v: abs(v - HEADLINE_K))
        parts, layers = [], set()
        for (ranking, kk), values in sorted(by.items()):
            common = sorted(set(values) & set(predictor[k]))
            if kk == k and common:
                parts.append(f"{ranking.removesuffix(f' (k {k:g})')} {sum(values[l] for l in common) / len(common):.3f}")
                layers |= set(common)
        theirs = sum(predictor[k][l] for l in layers) / len(layers)
        lines.append(f"{payload['source']['model']}, MLP at K = {k:g}, Recall@K from the lookahead input (mean over "
                     f"{len(layers)} layers): DejaVu's predictor {theirs:.3f}; " + ", ".join(parts) + ".")
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
