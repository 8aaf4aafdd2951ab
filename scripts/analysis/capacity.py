"""Would more capacity or more data close the gap? Capacity and data curves, and intervals over the training sample.

Called by recall_summary.py per layer (its records land in recall_summary.json under "capacity" and "folds"); the
predictors are DejaVu's lookahead predictors (MLP of layer l from att_x_l, attention from att_x_{l-1}) trained with
the project's trainer, scored with its metrics (Recall@K, Captured Mass, per-document sums) on the held-out documents
of the same split:
  capacity  at K = the capacity fraction: Recall@K against the width D (e.g. 64 ... 1000 and full rank min(d, out),
            where the low-rank predictor becomes a full-rank linear classifier) and against the training rows (whole
            training documents, a seeded share), each for DejaVu's linear predictor and for a nonlinear one of the
            same width, Linear(d, D) -> ReLU/GELU -> Linear(D, out), as an upper bound;
  folds     the training documents dealt into k seeded groups; fold f retrains the lookahead predictors (every K)
            without group f and is scored on the same held-out documents, so the spread over folds is the spread
            due to the training sample, to set beside the bootstrap over held-out documents and the seed spread.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from Decentralized_FM_alpha.utils.activation_store import ActivationStore
from Decentralized_FM_alpha.utils.intervals import Interval, bootstrap, ratio
from Decentralized_FM_alpha.utils.selection import parse_layer_list
from sparse_predictor.trainer.labels import make_label_spec
from sparse_predictor.trainer.model import ACTIVATIONS, TrainConfig, TrainResult, train_stacked
from sparse_predictor.trainer.rows import LayerData, SplitConfig, fold_training_mask, load_layer, training_subset

DEFAULT_WIDTHS = "64,128,256,512,1000,full"
DEFAULT_ROWS = "0.25,0.5,1"
LINEAR = "linear"


def curve_layers(spec: str, num_layers: int) -> list[int]:
    """'ends': layer 1 (the first with a lookahead input for both blocks and past the embedding step), the middle
    and the last layer; 'last'; 'all'; or a layer list; '' = none."""
    if not spec.strip():
        return []
    if spec.strip() == "last":
        return [num_layers - 1]
    if spec.strip() == "ends":
        return sorted({min(1, num_layers - 1), num_layers // 2, num_layers - 1})
    return parse_layer_list(spec, num_layers)


def parse_widths(spec: str) -> list[int | str]:
    """'64,128,full' -> [64, 128, 'full'] ('full' = min(d, out), resolved per block); '' = no width curve."""
    widths = [w.strip() for w in spec.split(",") if w.strip()]
    bad = [w for w in widths if w != "full" and not (w.isdigit() and int(w) > 0)]
    if bad:
        raise argparse.ArgumentTypeError(f"widths must be positive ints or 'full', got {bad}")
    return [w if w == "full" else int(w) for w in widths]


def parse_row_fractions(spec: str) -> list[float]:
    values = [float(v) for v in spec.split(",") if v.strip()]
    if any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"training-row fractions must be in (0, 1], got {spec}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the capacity and data curves and of the folds (recall_summary.py)."""
    p.add_argument("--capacity-layers", default="ends",
                   help="layers of the capacity and data curves: 'ends' (layer 1, the middle and the last), 'last', "
                        "'all', a list such as 1,7,13, or '' for none (default %(default)s)")
    p.add_argument("--capacity-widths", type=parse_widths, default=parse_widths(DEFAULT_WIDTHS),
                   help="predictor widths D of the capacity curve; 'full' = min(d, out) (default %s)" % DEFAULT_WIDTHS)
    p.add_argument("--capacity-rows", type=parse_row_fractions, default=parse_row_fractions(DEFAULT_ROWS),
                   help="shares of the training rows (whole documents, seeded) of the data curve, at --D (default "
                        "%s)" % DEFAULT_ROWS)
    p.add_argument("--capacity-fraction", type=float, default=None,
                   help="K of the curves as a fraction of the units (default: --distance-fraction)")
    p.add_argument("--nonlinear", choices=tuple(ACTIVATIONS), default="relu",
                   help="hidden nonlinearity of the upper-bound predictor (default %(default)s)")
    p.add_argument("--folds", type=int, default=3,
                   help="re-split the training documents into this many folds and retrain the lookahead predictors "
                        "(every K) without each fold; 0 = no folds (default %(default)s)")
    p.add_argument("--fold-layers", default="ends", help="layers of the folds, as --capacity-layers (default "
                                                         "%(default)s)")


def kinds(nonlinear: str) -> list[str | None]:
    return [None, nonlinear]


def kind_name(activation: str | None) -> str:
    return LINEAR if activation is None else f"nonlinear ({activation})"


def result_record(model: str, block: str, layer: int, data: LayerData, store: ActivationStore, cfg: TrainConfig,
                  result: TrainResult) -> dict:
    """What every curve and fold record holds: the predictor, its training rows, its held-out metrics."""
    label = data.labels[result.label_index]
    docs = store.document_ids()
    d, out = data.x_file.width, data.out_width
    return {"model": model, "block": block, "layer": layer, "input": data.input.flag, "input_kind": data.input.kind,
            "input_layer": data.input.layer, "predictor": kind_name(cfg.activation), "D": cfg.D,
            "full_rank": min(d, out), "D_is_full_rank": cfg.D >= min(d, out),
            "parameters": d * cfg.D + cfg.D * out, "label": label.name, "k": label.k, "K": result.metrics["K"],
            "seed": result.seed, "Recall@K": result.metrics["Recall@K"],
            "Captured Mass": result.metrics["Captured Mass"], "chance Recall@K": result.metrics["K"] / out,
            "rows_train": data.rows_train, "documents_train": len(np.unique(docs[data.train_mask])),
            "best_epoch": result.best_epoch, "epochs_run": len(result.history), "per_document": result.per_document}


def capacity_records(store: ActivationStore, model: str, layer: int, args: argparse.Namespace, cfg_of,
                     device: torch.device, max_bytes: int | None, split: SplitConfig) -> list[dict]:
    """The width and data curves of the layer's lookahead predictors (both blocks), linear and nonlinear: one record
    per (block, curve, D or rows fraction, predictor kind)."""
    fraction = args.capacity_fraction if args.capacity_fraction is not None else args.distance_fraction
    records = []
    for block in ("mlp", "att"):
        if block == "att" and layer == 0:
            continue  # attention has no lookahead input at layer 0 (att_x_0 is its own input)
        width = store.dims.ffn_dim if block == "mlp" else store.dims.num_heads
        label = make_label_spec(block, "topk", fraction, None, width)
        cfg = cfg_of(block)
        full = min(store.dims.hidden_size, width)
        widths = list(dict.fromkeys(full if w == "full" else w for w in args.capacity_widths))
        trained: dict[tuple[int, str | None], dict] = {}
        if widths or 1.0 in args.capacity_rows:
            data = load_layer(store, block, layer, "lookahead", label, device, cfg.batch_size, max_bytes, split)
            for D in dict.fromkeys(widths + ([cfg.D] if 1.0 in args.capacity_rows else [])):
                for activation in kinds(args.nonlinear):
                    run = replace(cfg, D=D, activation=activation)
                    [result] = train_stacked(data, block, run, [(0, cfg.seed)], log=lambda _: None)
                    trained[(D, activation)] = result_record(model, block, layer, data, store, run, result)
            del data
        records += [{**trained[(D, a)], "curve": "D", "rows_fraction": 1.0} for D in widths
                    for a in kinds(args.nonlinear)]
        for share in args.capacity_rows:
            if share == 1.0:
                records += [{**trained[(cfg.D, a)], "curve": "rows", "rows_fraction": 1.0}
                            for a in kinds(args.nonlinear)]
                continue
            data = load_layer(store, block, layer, "lookahead", label, device, cfg.batch_size, max_bytes, split,
                              training_subset(share, cfg.seed))
            for activation in kinds(args.nonlinear):
                run = replace(cfg, activation=activation)
                [result] = train_stacked(data, block, run, [(0, cfg.seed)], log=lambda _: None)
                records.append({**result_record(model, block, layer, data, store, run, result), "curve": "rows",
                                "rows_fraction": share})
            del data
    return records


def fold_records(store: ActivationStore, model: str, layer: int, args: argparse.Namespace, cfg_of,
                 device: torch.device, max_bytes: int | None, split: SplitConfig) -> list[dict]:
    """Per fold, block and K: the lookahead predictor trained without that fold's training documents."""
    records = []
    for block in ("mlp", "att"):
        if block == "att" and layer == 0:
            continue
        width = store.dims.ffn_dim if block == "mlp" else store.dims.num_heads
        labels = [make_label_spec(block, "topk", f, None, width) for f in args.fractions]
        cfg = cfg_of(block)
        for fold in range(args.folds):
            data = load_layer(store, block, layer, "lookahead", labels, device, cfg.batch_size, max_bytes, split,
                              fold_training_mask(fold, args.folds, cfg.seed))
            for result in train_stacked(data, block, cfg, [(i, cfg.seed) for i in range(len(labels))],
                                        log=lambda _: None):
                records.append({**result_record(model, block, layer, data, store, cfg, result), "fold": fold,
                                "folds": args.folds})
            del data
    return records


METRIC_SUMS = {  # metric -> (per-document numerator key, per-document denominator of a record)
    "Recall@K": ("topk_hits", lambda r: r["K"] * np.asarray(r["per_document"]["tokens"], dtype=np.float64)),
    "Captured Mass": ("mass_predicted", lambda r: np.asarray(r["per_document"]["mass_true"], dtype=np.float64)),
}


def metric_columns(records: Sequence[dict], metric: str) -> dict[str, np.ndarray]:
    """Per held-out document, summed over the records (layers, seeds): the metric's numerator ("num") and
    denominator ("den"); the records must share their held-out documents."""
    key, denominator = METRIC_SUMS[metric]
    documents = records[0]["per_document"]["documents"]
    if any(r["per_document"]["documents"] != documents for r in records):
        raise ValueError(f"{records[0].get('model')}: records of different held-out documents cannot be pooled")
    return {"num": np.sum([np.asarray(r["per_document"][key], dtype=np.float64) for r in records], axis=0),
            "den": np.sum([denominator(r) for r in records], axis=0)}


def pooled_value(records: Sequence[dict], metric: str) -> float | None:
    """The metric pooled over the records (a ratio of sums; for Recall@K at one K, the mean over layers)."""
    if not records or (metric == "Captured Mass" and any(r.get("Captured Mass") is None for r in records)):
        return None
    columns = metric_columns(records, metric)
    return float(columns["num"].sum() / columns["den"].sum()) if columns["den"].sum() > 0 else None


def pooled_interval(records: Sequence[dict], metric: str) -> Interval | None:
    """pooled_value with its bootstrap interval over held-out documents."""
    if pooled_value(records, metric) is None:
        return None
    return bootstrap(metric_columns(records, metric), ratio("num", "den"))


def spread(values: Sequence[float]) -> dict:
    """Mean, min, max and standard deviation over folds."""
    return {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "n": len(values)}


def fold_spread(folds: Sequence[dict], headline: Sequence[dict]) -> list[dict]:
    """Per (block, k): each fold's Recall@K and Captured Mass pooled over the fold layers, their spread, and beside it
    the bootstrap interval over held-out documents of the full-data lookahead predictors of the same layers (seed
    of the folds)."""
    out = []
    for block, k in sorted({(r["block"], r["k"]) for r in folds}):
        chosen = [r for r in folds if (r["block"], r["k"]) == (block, k)]
        layers = sorted({r["layer"] for r in chosen})
        per_fold = {f: [r for r in chosen if r["fold"] == f] for f in sorted({r["fold"] for r in chosen})}
        recall = [pooled_value(rs, "Recall@K") for rs in per_fold.values()]
        mass = [pooled_value(rs, "Captured Mass") for rs in per_fold.values()]
        seed = chosen[0]["seed"]
        full = [r for r in headline if (r["block"], r["k"], r["input"], r.get("seed")) == (block, k, "lookahead", seed)
                and r["label"] == "topk" and r["layer"] in layers and "ranking" not in r]
        row = {"block": block, "k": k, "layers": layers, "folds": len(per_fold), "seed": seed,
               "Recall@K per fold": recall, "Recall@K": spread(recall),
               "Captured Mass per fold": mass, "Captured Mass": spread(mass) if None not in mass else None,
               "rows_train per fold": [rs[0]["rows_train"] for rs in per_fold.values()]}
        if {r["layer"] for r in full} == set(layers):
            row["full data bootstrap"] = pooled_interval(full, "Recall@K").as_dict()
        out.append(row)
    return out
