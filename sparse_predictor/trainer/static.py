"""The static top-K: an input-independent ranking of a layer's units, counted over the training documents.

A unit's count is the number of training rows in which it is in the label's true top-K (the LabelSpec topk label
at fraction k, as the predictors are trained on). The static top-K of every token is then the same K units: the
most often counted, ties by lower unit index. It is the input-independent baseline a predictor must clear to show that it reads its
input (units that are often active, attention heads especially, let a fixed set score far above K / units).

The counting is written once here, for the CLI (sparse_predictor/static_topk.py, whose files the sparse runner's
mode `static` reads) and for the summary (scripts/analysis/recall_summary.py, which scores it on the held-out rows).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from Decentralized_FM_alpha.utils.activation_store import ActivationStore
from Decentralized_FM_alpha.utils.manifest import read_json
from Decentralized_FM_alpha.utils.selection import STATIC_RANKING_RULE
from sparse_predictor.trainer.labels import LabelSpec
from sparse_predictor.trainer.rows import chunk_slices, open_rows, stream_chunks

RANKING_RULE = STATIC_RANKING_RULE
STATIC_INPUT = "static (no input)"
BLOCK_LABEL_KIND = {"mlp": "mlp_label", "att": "att_label"}


def static_unit_counts(store: ActivationStore, block: str, layer: int, label: LabelSpec, is_train: np.ndarray,
                       device: torch.device) -> torch.Tensor:
    """(units,) int64 on the CPU: in how many of the rows selected by `is_train` each unit is active under `label`
    (its true top-K for a topk label), streamed chunk by chunk from the label's collected file."""
    return static_counts(store, block, layer, [label], is_train, device)[0]


def static_counts(store: ActivationStore, block: str, layer: int, labels: Sequence[LabelSpec], is_train: np.ndarray,
                  device: torch.device) -> list[torch.Tensor]:
    """static_unit_counts of several labels of one collected kind (e.g. top-K at several fractions), one read."""
    kinds = {label.source_kind for label in labels}
    allowed = {BLOCK_LABEL_KIND[block]} | ({"mlp_gate"} if block == "mlp" else set())
    if len(kinds) != 1 or not kinds <= allowed:
        raise ValueError(f"labels {[l.name for l in labels]} ({sorted(kinds)}): need {block} labels of one kind")
    file = open_rows(store, kinds.pop(), layer)
    if len(is_train) != file.rows:
        raise ValueError(f"is_train has {len(is_train)} rows, {file.path} has {file.rows}")
    counts = torch.zeros((len(labels), file.width), dtype=torch.int64, device=device)
    slices = [s for s in chunk_slices(file.rows, [file.width]) if is_train[s].any()]
    for rows, (values,) in tqdm(stream_chunks([file], slices, device), total=len(slices), unit="chunk", leave=False,
                                desc=f"{block} layer {layer} static counts"):
        local = np.flatnonzero(is_train[rows])
        if len(local) < rows.stop - rows.start:
            values = values[torch.from_numpy(local).to(device)]
        for i, label in enumerate(labels):
            counts[i] += label.labels(label.scores(values.float())).sum(dim=0)
    return list(counts.cpu())


def static_path(directory: str | Path, block: str, layer: int) -> Path:
    return Path(directory) / f"static_{block}_layer{layer}.json"


def read_static(directory: str | Path, block: str, layer: int, width: int | None = None) -> dict:
    """A static_{block}_layer{L}.json, checked: its block, layer and ranking rule, `counts` an int per unit (width
    units when given); an error names the file and the value that does not fit."""
    path = static_path(directory, block, layer)
    if not path.is_file():
        raise FileNotFoundError(f"missing static top-K file: {path} (write it with sparse_predictor/static_topk.py)")
    record = read_json(path)
    for key, expected in (("block", block), ("layer", layer), ("ranking", RANKING_RULE)):
        if record.get(key) != expected:
            raise ValueError(f"{path}: {key} = {record.get(key)!r}, expected {expected!r}")
    counts = record.get("counts")
    if not isinstance(counts, list) or not all(isinstance(c, int) and c >= 0 for c in counts):
        raise ValueError(f"{path}: counts must be a list of non-negative ints, one per unit")
    if width is not None and len(counts) != width:
        raise ValueError(f"{path}: {len(counts)} counts, the model's layer has {width} units")
    return record
