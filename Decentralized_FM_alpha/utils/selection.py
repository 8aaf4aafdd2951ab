"""Which units and which layers: the one fraction-to-count rule, the static ranking's order, the one layer-list syntax.

Every part of the tool that turns a fraction of neurons or heads into a count (training labels, Recall@K, the
sparsity statistics, the sparse runner's budgets) calls `fraction_count`, so that a predictor trained at
`--k 0.3` is run with exactly the units it was trained to pick. Layer lists (`--sparse-layers`, the analysis
scripts' `--layers`) all read `parse_layer_list`.
"""
from __future__ import annotations

import math
import re

import torch

COUNT_RULE = "count = floor(fraction * total + 0.5) (nearest, halves up), at least 1"
STATIC_RANKING_RULE = "count desc, ties by lower unit index"


def fraction_count(fraction: float, total: int) -> int:
    """Units kept when keeping `fraction` of `total`: the nearest count (halves up), at least 1 (COUNT_RULE)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"a fraction of units must be in (0, 1], got {fraction}")
    if total < 1:
        raise ValueError(f"cannot keep a fraction of {total} units")
    return max(1, min(total, math.floor(fraction * total + 0.5)))


def parse_layer_list(spec: str, num_layers: int) -> list[int]:
    """'all', or a comma list of layers and inclusive ranges ('0,7,15-22'): sorted, unique, each checked."""
    if spec.strip() == "all":
        return list(range(num_layers))
    layers: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ValueError(f"layer list {spec!r}: {part!r} is not a layer or an inclusive range A-B")
        low, high = int(match[1]), int(match[2] or match[1])
        if low > high:
            raise ValueError(f"layer list {spec!r}: range {part.strip()!r} runs backwards")
        layers += range(low, high + 1)
    bad = sorted({l for l in layers if not 0 <= l < num_layers})
    if bad:
        raise ValueError(f"layer list {spec!r}: layers {bad} outside 0..{num_layers - 1}")
    return sorted(set(layers))


def static_ranking(counts) -> torch.Tensor:
    """(units,) unit indices of a static ranking, most counted first, ties by lower unit index (STATIC_RANKING_RULE)."""
    return torch.sort(torch.as_tensor(counts), descending=True, stable=True).indices


def static_scores(counts) -> torch.Tensor:
    """(units,) float32 scores without ties whose top-K is the first K units of static_ranking: any top-K routine
    (Recall@K, the sparse runner's masks) then picks exactly the static set."""
    order = static_ranking(counts)
    scores = torch.empty(len(order), dtype=torch.float32)
    scores[order] = torch.arange(len(order), 0, -1, dtype=torch.float32)
    return scores
