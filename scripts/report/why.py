"""The first screen's where and why lines, from the inputs that answer them when the report is given them:

  where  a one-layer-at-a-time sweep (layer_sweep.csv: model, dataset, block, mode, budget, layer, log_increase; the
         layer "all" is the run with every layer sparse): the layers that cost most, and the sum of single-layer
         log-perplexity increases against the all-layers increase (how much compounds);
  why    on-policy recall (a sweep run's manifest `sparsity.on_policy_recall`: per block and layer the hits of the mask
         applied against the same run's true top-K) and the predictor shaped like SwiGLU (recall_summary.py records
         whose ranking starts with "structured"), each beside DejaVu's lookahead predictor.
Every sentence only reads numbers; what a line leaves out is named.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

TOP_LAYERS = 3


def layer_sweep_lines(layer_sweeps: Sequence[tuple[Path, list[dict]]]) -> list[str]:
    """Per model, block and mode predictor (else the first mode): the costliest layers and the compounding ratio."""
    lines = []
    rows = [r for _, rs in layer_sweeps for r in rs]
    for model, block in dict.fromkeys((r["model"], r["block"]) for r in rows):
        chosen = [r for r in rows if (r["model"], r["block"]) == (model, block)]
        mode = "predictor" if any(r["mode"] == "predictor" for r in chosen) else chosen[0]["mode"]
        singles = sorted(((int(r["layer"]), float(r["log_increase"])) for r in chosen
                          if r["mode"] == mode and r["layer"] != "all"), key=lambda p: -p[1])
        every = [float(r["log_increase"]) for r in chosen if r["mode"] == mode and r["layer"] == "all"]
        if not singles:
            continue
        total = sum(v for _, v in singles)
        top = ", ".join(f"{layer} ({v:.3f})" for layer, v in singles[:TOP_LAYERS])
        text = (f"{model}, {block} at {chosen[0].get('budget', '?')}, {mode}: the costliest single sparse layers are "
                f"{top} in log perplexity; their sum over {len(singles)} layers is {total:.3f}")
        if every:
            text += (f" against {every[0]:.3f} with every layer sparse"
                     + (f" ({every[0] / total:.2f}x the sum: {'compounding' if every[0] > total else 'sub-additive'})"
                        if total > 0 else ""))
        lines.append(text + ".")
    return lines


def on_policy_records(sweeps: Sequence[tuple[Path, list[dict]]]) -> list[tuple[dict, dict]]:
    """(sweep row, its manifest's on_policy_recall) of every run that recorded one."""
    found = []
    for csv_path, rows in sweeps:
        for row in rows:
            manifest = csv_path.parent / row.get("output_manifest", "")
            if row.get("output_manifest") and manifest.is_file():
                recall = json.loads(manifest.read_text()).get("sparsity", {}).get("on_policy_recall")
                if recall:
                    found.append((row, recall))
    return found


def on_policy_lines(sweeps: Sequence[tuple[Path, list[dict]]]) -> list[str]:
    """Per model and block, the predictor's on-policy Recall@K over its sparse layers, first and last half of them."""
    lines = []
    for row, recall in on_policy_records(sweeps):
        if row["mode"] != "predictor" or row.get("dataset", "c4") != "c4":
            continue
        for block, layers in recall.items():
            values = [(int(layer), v["hits"] / (v["K"] * v["tokens"])) for layer, v in layers.items() if v["tokens"]]
            if not values:
                continue
            values.sort()
            half = len(values) // 2 or 1
            mean = lambda part: sum(v for _, v in part) / len(part)  # noqa: E731
            lines.append(f"{row['model']}, {block} ({row['block']} sparse at mlp {row.get('mlp_topk')}, att "
                         f"{row.get('att_topk')}): on-policy Recall@K of the applied mask {mean(values):.3f} over "
                         f"{len(values)} layers, {mean(values[:half]):.3f} in the first half and "
                         f"{mean(values[half:]):.3f} in the second.")
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
            if str(r.get("ranking", "")).startswith("structured"):
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
