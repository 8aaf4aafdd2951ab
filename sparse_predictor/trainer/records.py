"""What training writes: checkpoint + JSON per layer (SPEC §7), the record's fields, seed spreads, summaries."""
from __future__ import annotations

import argparse
import csv
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from Decentralized_FM_alpha.utils.activation_store import ActivationStore, ModelDims
from Decentralized_FM_alpha.utils.manifest import now, read_json, write_json_atomic
from Decentralized_FM_alpha.utils.intervals import seed_spread as spread_over_seeds
from sparse_predictor.trainer.metrics import METRIC_DEFINITIONS
from sparse_predictor.trainer.model import (NEGATIVE_WEIGHT_FLOOR, SELECTIONS, WEIGHT_DECAY, TrainConfig, TrainResult,
                                            matmul_dtype, predictor_layers)
from sparse_predictor.trainer.rows import LayerData, RowFile


def write_outputs(out_dir: Path, block: str, layer: int, state_dict: dict, record: dict) -> tuple[Path, Path]:
    """`<out-dir>/{block}_layer{L}.pt` (state dict with keys 0.weight, 1.weight) and its JSON, each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / f"{block}_layer{layer}.pt"
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    torch.save(state_dict, tmp)
    os.replace(tmp, checkpoint)
    json_path = out_dir / f"{block}_layer{layer}.json"
    write_json_atomic(json_path, record)
    return checkpoint, json_path


@dataclass(frozen=True)
class RowsSource:
    """Where a layer's rows came from, as its JSON records it: a collection directory read from its mmaps, or an
    online pass of the model (sparse_predictor/train_online.py) that kept them on the device and wrote no file."""
    mode: str  # "mmap" or "online"
    data_dir: str | None
    rows: int
    dims: ModelDims
    doc_ids: np.ndarray  # (rows,) document id of each row
    fields: dict  # model_name, model_type, source_data, git_commit, weights, tokenizer, partial_document (+ online)


SOURCE_FIELDS = ("model_name", "model_type", "source_data", "git_commit", "weights", "tokenizer", "partial_document")


def collection_source(store: ActivationStore) -> RowsSource:
    return RowsSource("mmap", str(store.data_dir), store.rows, store.dims, store.document_ids(),
                      {key: store.manifest.get(key) for key in SOURCE_FIELDS})


def file_name(file: RowFile) -> str | None:
    return file.path.name if file.path is not None else None  # None: rows of an online pass, never stored


def layer_record(args: argparse.Namespace, block: str, layer: int, source: RowsSource, data: LayerData,
                 cfg: TrainConfig, result: TrainResult, timings: dict, provenance: dict) -> dict:
    docs = source.doc_ids
    label = data.labels[result.label_index]
    return {
        **result.metrics,
        "block": block, "layer": layer, "model": args.model, "dataset": args.dataset,
        "input": data.input.flag, "input_kind": data.input.kind, "input_layer": data.input.layer,
        "input_file": file_name(data.x_file),
        "label": label.name, "label_definition": label.definition(),
        "label_file": file_name(data.label_files[label.source_kind]), "k": label.k, "threshold": label.threshold,
        "label_group": label.group,
        "seed": result.seed,
        "rows_train": data.rows_train, "rows_test": int(data.is_test.sum()),
        "documents_train": len(np.unique(docs[data.train_mask])), "documents_test": len(np.unique(docs[data.is_test])),
        "split": data.split.describe(), "test_documents": [int(d) for d in np.unique(docs[data.is_test])],
        "per_document": result.per_document,
        "predictor": {"layers": predictor_layers(cfg.activation),
                      "d": data.x_file.width, "D": cfg.D, "out": data.out_width},
        "hyperparameters": {**asdict(cfg), "seed": result.seed, "weight_decay": WEIGHT_DECAY, "optimizer": "AdamW",
                            "negative_weight_floor": NEGATIVE_WEIGHT_FLOOR[block],
                            "matmul_dtype": str(matmul_dtype(data.test.x.device) or torch.float32),
                            "device": str(data.test.x.device), "resident_on_device": data.train is not None},
        "selection": cfg.selection, "selection_rule": SELECTIONS[cfg.selection],
        "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "final_epoch": result.history[-1] if result.history else None, "history": result.history,
        "metric_definitions": METRIC_DEFINITIONS,
        "timings": timings,
        "data": {"collection": source.mode, "data_dir": source.data_dir, "rows": source.rows,
                 "dims": asdict(source.dims), **source.fields},
        "checkpoint": f"{block}_layer{layer}.pt",
        "provenance": {**provenance, "end_time": now()},
    }


SEED_METRICS = ("Recall@K", "Recall", "Precision", "Classifier Sparsity", "Per-token Recall")


def seed_spread(records: Sequence[dict]) -> dict:
    """Mean, min and max over the seeds' records of each SEED_METRICS metric (null where a seed has none)."""
    spread = {"seeds": [r["seed"] for r in records]}
    for metric in SEED_METRICS:
        values = [r[metric] for r in records]
        spread[metric] = None if None in values else {"values": values, **spread_over_seeds(values)}
    return spread


SUMMARY_COLUMNS = ("layer", "Recall", "True Sparsity", "Classifier Sparsity", "Precision", "Recall@K", "K",
                   "input", "label")
SEED_COLUMNS = ("seeds", "Recall@K seed mean", "Recall@K seed min", "Recall@K seed max")


def summary_row(record: dict) -> list:
    spread = (record.get("seed_spread") or {}).get("Recall@K")
    seeds = (record.get("seed_spread") or {}).get("seeds", [record.get("seed")])
    return ([record[c] for c in SUMMARY_COLUMNS] +
            [len(seeds), *((spread["mean"], spread["min"], spread["max"]) if spread else (None, None, None))])


def summarize(out_dir: str | os.PathLike, block: str, num_layers: int | None = None) -> tuple[Path, Path, list[int]]:
    """`<out-dir>/{block}_summary.csv` and `.md` from the per-layer JSONs; returns them and the missing layers."""
    out_dir = Path(out_dir)
    pattern = re.compile(rf"{block}_layer(\d+)\.json")
    records = sorted((read_json(p) for p in out_dir.iterdir() if pattern.fullmatch(p.name)), key=lambda r: r["layer"])
    if not records:
        raise FileNotFoundError(f"no {block}_layer*.json in {out_dir}")
    found = {r["layer"] for r in records}
    missing = sorted(set(range(num_layers)) - found) if num_layers is not None else []
    csv_path, md_path = out_dir / f"{block}_summary.csv", out_dir / f"{block}_summary.md"
    columns = (*SUMMARY_COLUMNS, *SEED_COLUMNS)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(summary_row(r) for r in records)

    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    models = sorted({f"{r['model']} / {r['dataset']}" for r in records})
    lines = [f"# {block} sparse predictors: {', '.join(models)}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in summary_row(r)) + " |" for r in records]
    if missing:
        lines += ["", f"Missing layers (no JSON): {missing}"]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path, missing
