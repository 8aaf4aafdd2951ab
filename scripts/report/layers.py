"""Recall@K over every layer: the all-layer headline of the predictors, never a pool of a few layers.

The per-budget predictors (run_study.py's predictors/<model>/b{k}/, one trained at every layer, their JSON summaries
{block}_summary.csv) give DejaVu's lookahead predictor at every layer; the mean over the layers that have a lookahead
input and are sparse in deployment (layer 1 on: layer 0 stays dense) is the headline, with its min and max and the
layers they sit at. The summary's baselines (recall_summary.py) are shown beside it on the layers they were scored on,
named, since the committed summaries scored three layers only.
"""
from __future__ import annotations

import csv
import re
from collections import defaultdict
from typing import Sequence

from Decentralized_FM_alpha.utils.selection import fraction_count
from scripts.report.inputs import PredictorSet

FOLDER = re.compile(r"(groups_)?b([0-9.]+)")
BASELINE_NAMES = {"static": "static", "|SiLU(g)|": "gate", "random": "random"}
FIRST_SPARSE_LAYER = 1  # layer 0 stays dense in every mode (no earlier input for its lookahead)


def predictor_layer_recall(sets: Sequence[PredictorSet]) -> dict[tuple[str, str, float], list[tuple[int, float]]]:
    """(model, block, k) -> [(layer, Recall@K)] of the lookahead top-K predictors of every layer (head units; the
    kv-group folders are left out), from each per-budget folder's summary CSV."""
    out: dict[tuple[str, str, float], list[tuple[int, float]]] = {}
    for s in sets:
        match = FOLDER.fullmatch(s.directory.name)
        if s.summary_csv is None or match is None or match.group(1):
            continue
        with open(s.summary_csv, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["label"] == "topk" and r["input"] == "lookahead"]
        points = sorted((int(r["layer"]), float(r["Recall@K"])) for r in rows if int(r["layer"]) >= FIRST_SPARSE_LAYER)
        if points:
            out[(s.model, s.block, float(match.group(2)))] = points
    return out


def baseline_layer_recall(recall_payloads: Sequence[dict], k: float
                          ) -> dict[str, dict[str, dict[str, list[tuple[int, float]]]]]:
    """model -> baseline name -> block -> [(layer, Recall@K)] at K = k, from recall_summary.py's records."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for payload in recall_payloads:
        model = payload["source"]["model"]
        for r in payload["records"]:
            name = BASELINE_NAMES.get(r.get("ranking"))
            if name and r["k"] == k and r.get("Recall@K") is not None and r["layer"] >= FIRST_SPARSE_LAYER:
                out[model][name][r["block"]].append((r["layer"], r["Recall@K"]))
    return {m: {n: {b: sorted(v) for b, v in blocks.items()} for n, blocks in names.items()} for m, names in out.items()}


def block_units(dims: dict, block: str) -> int | None:
    """The units a block's Recall@K ranks: MLP neurons or attention heads."""
    return dims.get("ffn_dim" if block == "mlp" else "num_heads")


def uniform_chance(k: float, units: int) -> float:
    """Recall@K of a ranking that ignores its input: K / units, K by the one count rule."""
    return fraction_count(k, units) / units


def spread_text(points: Sequence[tuple[int, float]]) -> str:
    """'0.582 (min 0.478 at layer 5, max 0.773 at layer 29; 29 layers)'."""
    values = [v for _, v in points]
    low, high = min(points, key=lambda p: p[1]), max(points, key=lambda p: p[1])
    return (f"{sum(values) / len(values):.3f} (min {low[1]:.3f} at layer {low[0]}, max {high[1]:.3f} at layer "
            f"{high[0]}; {len(points)} layers)")


def layer_recall_table(layer_recall: dict, baselines_by_k: dict[float, dict], widths: dict[str, dict],
                       models: Sequence[str]) -> list[str]:
    """Markdown: per model (in `models` order), block (MLP first) and K the predictor's mean over every layer with its
    spread, each baseline's mean on the layers it was scored on (named), and uniform chance."""
    rows = []
    order = lambda item: (models.index(item[0][0]), item[0][1] != "mlp", item[0][2])  # noqa: E731
    for (model, block, k), points in sorted(layer_recall.items(), key=order):
        units = block_units(widths.get(model, {}), block)
        baselines = baselines_by_k.get(k, {}).get(model, {})
        others = "; ".join(f"{name} {sum(v for _, v in pts) / len(pts):.3f} (layers {', '.join(str(l) for l, _ in pts)})"
                           for name, by_block in sorted(baselines.items()) for b, pts in by_block.items()
                           if b == block and pts) or "not scored"
        chance = f"{uniform_chance(k, units):.3f}" if units else "n/a"
        rows.append(f"| {model} | {'MLP' if block == 'mlp' else 'attention'} | {k:g} | {spread_text(points)} | "
                    f"{others} | {chance} |")
    if not rows:
        return []
    return ["| model | block | K | lookahead predictor: mean over every sparse layer | baselines (mean over the layers "
            "scored) | uniform chance |", "|---|---|---|---|---|---|", *rows]



def model_layers(dims: dict[str, dict]) -> dict[str, int]:
    return {m: d.get("num_layers", 1) for m, d in dims.items()}
