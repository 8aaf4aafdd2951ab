"""Where and why the MLP predictor fails: structured predictors and the 2x2 decomposition, per layer.

Called by recall_summary.py per layer (records in recall_summary.json `records`, the decomposition under
`structured_decomposition`), MLP only, on the summary's held-out documents and with its metrics (Recall@K, Captured
Mass, per-document sums for intervals; trainer/metrics.py ranking_statistics through trainer/baselines.py):
  structured svd          the MLP's own form at rank r from the SVD of the layer's weights (sparse_predictor/
                          structured.py), no training; ranks of --structured-ranks ('equal' = DejaVu's parameters at
                          --D, 'full', integers; a rank above min(d, ffn) is the full rank), from both inputs, every K;
  structured svd+trained  the same start trained (--structured-trained; costs a training per rank and input);
  exact MLP form          the layer's own projections unfactored (= svd at full rank, without SVD rounding).
Decomposition at K = --distance-fraction, full rank: rows the input (lookahead att_x_l, same-layer mlp_x_l), columns
DejaVu's linear predictor vs the exact form; same-layer + exact is the oracle (Recall@K 1 up to float16 ties). The
linear cells are the summary's own predictors when --D is already full rank (D >= min(d, ffn)), else predictors
trained at D = min(d, ffn) (records with ranking "linear predictor (full rank)", outside the summary's pools).
Every record carries a `ranking`, so the report's predictor and baseline pools leave them out.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from Decentralized_FM_alpha.utils.activation_store import ActivationStore
from sparse_predictor import structured
from sparse_predictor.trainer.baselines import score_rankers
from sparse_predictor.trainer.labels import make_label_spec, resolve_input
from sparse_predictor.trainer.model import TrainConfig, train_stacked
from sparse_predictor.trainer.rows import SplitConfig, load_layer

INPUTS = {"lookahead": "lookahead", "same": "same"}  # record name -> trainer --input flag
EXACT = "exact MLP form (own weights)"
LINEAR_FULL = "linear predictor (full rank)"
DEFAULT_RANKS = "64,equal,full"
DEFINITIONS = {
    "structured svd": "the MLP's form at rank r with the truncated SVD of the layer's projections (no training)",
    "structured svd+trained": "the same start trained on the top-K label (class-weighted BCE, AdamW)",
    EXACT: "the MLP's form with the layer's own projections, unfactored, fed the input through the MLP's norm",
    LINEAR_FULL: "DejaVu's Linear(d, D) -> Linear(D, ffn) at D = min(d, ffn), trained",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default=None,
                   help="converted checkpoint of the collected model (its layer files give the structured "
                        "predictors); default: the manifest's model_name when it is such a directory; without one "
                        "the structured records are left out, with the reason")
    p.add_argument("--structured-ranks", type=lambda text: structured.rank_list(text) if text.strip() else [],
                   default=structured.rank_list(DEFAULT_RANKS),
                   help="ranks of the structured MLP predictors, comma list: integers, 'equal' (DejaVu's "
                        "parameters at --D), 'full'; one above min(d, ffn) is the full rank; '' none (default "
                        f"{DEFAULT_RANKS})")
    p.add_argument("--structured-trained", action="store_true",
                   help="also train each structured predictor from its SVD start (one training per rank and input)")


def model_dir_of(args: argparse.Namespace, store: ActivationStore) -> tuple[Path | None, str]:
    """The converted checkpoint to read, or None with the reason."""
    if args.model_dir:
        return Path(args.model_dir), "--model-dir"
    name = Path(str(store.manifest.get("model_name")))
    if (name / "config.json").is_file() and (name / "pytorch_0.pt").is_file():
        return name, "the manifest's model_name"
    return None, f"not computed: no --model-dir, and the manifest's model_name {str(name)!r} is not a converted checkpoint"


def resolved_ranks(specs: list[str], weights: structured.MlpWeights, d: int, ffn: int, D: int) -> dict[int, list[str]]:
    """rank -> the specs naming it (a rank above the full rank is the full rank; equal ranks scored once)."""
    ranks: dict[int, list[str]] = {}
    for spec in specs:
        ranks.setdefault(structured.resolve_rank(spec, weights.form, d, ffn, D, clamp=True), []).append(spec)
    return ranks


def ranking_name(variant: str, rank: int, specs: list[str]) -> str:
    return f"structured {variant} rank {rank} ({', '.join(specs)})"


def record(model: str, layer: int, input_name: str, ranking: str, definition: str, k: float, stats: dict,
           ffn: int, is_test: np.ndarray, extra: dict) -> dict:
    """A structured-family record with the baselines' keys (Recall@K, Captured Mass, per-document sums)."""
    spec = resolve_input("mlp", INPUTS[input_name], layer)
    return {"model": model, "block": "mlp", "layer": layer, "input": input_name, "input_flag": INPUTS[input_name],
            "input_kind": spec.kind, "input_layer": spec.layer, "ranking": ranking, "label": "topk", "k": k,
            "K": stats["K"], "Recall@K": stats["Recall@K"], "Captured Mass": stats["Captured Mass"],
            "chance Recall@K": stats["K"] / ffn, "definition": definition, "rows_test": int(is_test.sum()),
            "documents_test": len(stats["per_document"]["documents"]), "per_document": stats["per_document"], **extra}


def untrained_records(store: ActivationStore, model: str, layer: int, fractions: list[float], is_test: np.ndarray,
                      weights: structured.MlpWeights, factors: structured.Factors, ranks: dict[int, list[str]],
                      device: torch.device) -> list[dict]:
    """The svd predictors at every rank and the exact form, from both inputs, scored in one pass over the rows."""
    ffn = store.dims.ffn_dim
    labels = [make_label_spec("mlp", "topk", f, None, ffn) for f in fractions]
    predictors: dict[str, tuple[torch.nn.Module, str, dict]] = {}
    for rank, specs in ranks.items():
        svd = structured.svd_predictor(weights, rank, factors=factors).to(device)
        info = {"structured": {"variant": "svd", "rank": rank, "rank_specs": specs,
                               "factor_parameters": svd.factor_parameters()}}
        predictors[ranking_name("svd", rank, specs)] = (svd, DEFINITIONS["structured svd"], info)
    predictors[EXACT] = (structured.exact_predictor(weights).to(device), DEFINITIONS[EXACT], {})
    rankers, meta = {}, {}
    for name, (predictor, definition, info) in predictors.items():
        for input_name in INPUTS:
            kind = resolve_input("mlp", INPUTS[input_name], layer).kind
            key = f"{name} | {input_name}"
            rankers[key] = [ranker_of(predictor, kind)] * len(labels)
            meta[key] = (name, input_name, definition, info)
    stats = score_rankers(store, layer, labels, is_test, rankers, ["att_x", "mlp_x"], device)
    return [record(model, layer, meta[key][1], meta[key][0], meta[key][2], fractions[i], st, ffn, is_test,
                   meta[key][3]) for (key, i), st in stats.items()]


def ranker_of(predictor: torch.nn.Module, kind: str) -> Callable:
    """A baselines.py ranker: the predictor's logits on the chunk's rows of `kind` (its input, before the norm)."""
    return lambda values, label_scores: predictor(values[kind])[0]


def trained_records(store: ActivationStore, model: str, layer: int, fractions: list[float],
                    weights: structured.MlpWeights, factors: structured.Factors, ranks: dict[int, list[str]],
                    cfg: TrainConfig, device: torch.device, max_bytes: int | None, split: SplitConfig,
                    is_test: np.ndarray) -> list[dict]:
    """svd+trained at every rank from both inputs, every K trained together (stacked)."""
    ffn = store.dims.ffn_dim
    labels = [make_label_spec("mlp", "topk", f, None, ffn) for f in fractions]
    records = []
    for input_name, flag in INPUTS.items():
        data = load_layer(store, "mlp", layer, flag, labels, device, cfg.batch_size, max_bytes, split)
        for rank, specs in ranks.items():
            for result in structured.train_structured(data, weights, rank, structured.VARIANTS["trained"], cfg,
                                                      log=lambda _: None, factors=factors):
                stats = {key: result.metrics[key] for key in ("K", "Recall@K", "Captured Mass")}
                stats["per_document"] = result.per_document
                info = {"structured": {"variant": "svd+trained", "rank": rank, "rank_specs": specs},
                        "best_epoch": result.best_epoch, "rows_train": data.rows_train}
                records.append(record(model, layer, input_name, ranking_name("svd+trained", rank, specs),
                                      DEFINITIONS["structured svd+trained"], fractions[result.label_index], stats,
                                      ffn, is_test, info))
        del data
    return records


def linear_full_rank(store: ActivationStore, model: str, layer: int, k: float, predictor_records: list[dict],
                     cfg: TrainConfig, device: torch.device, max_bytes: int | None, split: SplitConfig,
                     is_test: np.ndarray) -> tuple[dict[str, dict], list[dict]]:
    """input name -> DejaVu's full-rank linear predictor's record at K = k, and the records newly trained for it."""
    ffn = store.dims.ffn_dim
    full = min(store.dims.hidden_size, ffn)
    if cfg.D >= full:  # the summary's own predictors are already full rank
        return {name: next(r for r in predictor_records if (r["block"], r["input"], r["label"], r["k"], r["seed"])
                           == ("mlp", name, "topk", k, cfg.seed)) for name in INPUTS}, []
    label = make_label_spec("mlp", "topk", k, None, ffn)
    found, new = {}, []
    for name, flag in INPUTS.items():
        data = load_layer(store, "mlp", layer, flag, [label], device, cfg.batch_size, max_bytes, split)
        result, = train_stacked(data, "mlp", replace(cfg, D=full), [(0, cfg.seed)], log=lambda _: None)
        stats = {key: result.metrics[key] for key in ("K", "Recall@K", "Captured Mass")}
        stats["per_document"] = result.per_document
        found[name] = record(model, layer, name, LINEAR_FULL, DEFINITIONS[LINEAR_FULL], k, stats, ffn, is_test,
                             {"D": full, "seed": cfg.seed, "best_epoch": result.best_epoch})
        new.append(found[name])
        del data
    return found, new


def decomposition(layer: int, k: float, linear: dict[str, dict], exact: dict[str, dict]) -> dict:
    """The four Recall@K of (input) x (linear predictor, exact form) and the lost recall they split."""
    cells = {name: {"linear": linear[name]["Recall@K"], "exact": exact[name]["Recall@K"]} for name in INPUTS}
    return {"layer": layer, "k": k, "K": exact["same"]["K"], "cells": cells,
            "linear_D": linear["same"].get("D") or "the summary's --D (full rank)",
            "lost": {"total (lookahead, linear)": 1 - cells["lookahead"]["linear"],
                     "input alone (lookahead, exact)": 1 - cells["lookahead"]["exact"],
                     "form alone (same-layer, linear)": 1 - cells["same"]["linear"],
                     "neither (same-layer, exact = oracle)": 1 - cells["same"]["exact"]}}


def structured_results(store: ActivationStore, model: str, layer: int, args: argparse.Namespace, model_dir: Path,
                       cfg: TrainConfig, predictor_records: list[dict], is_test: np.ndarray, split: SplitConfig,
                       device: torch.device, max_bytes: int | None) -> dict:
    """One layer's structured records (svd, exact, and with --structured-trained svd+trained) and decomposition row.
    cfg: the MLP predictors' training (the linear cells); the structured ones train at --lr or their own default."""
    weights = structured.read_mlp_weights(model_dir, layer, store.dims)
    ranks = resolved_ranks(args.structured_ranks, weights, store.dims.hidden_size, store.dims.ffn_dim, args.D)
    factors = structured.svd_factors(weights)  # one SVD per projection, every rank
    records = untrained_records(store, model, layer, args.fractions, is_test, weights, factors, ranks, device)
    if args.structured_trained:
        tuned = replace(cfg, lr=args.lr or structured.DEFAULT_LR)
        records += trained_records(store, model, layer, args.fractions, weights, factors, ranks, tuned, device,
                                   max_bytes, split, is_test)
    k = args.distance_fraction
    exact = {r["input"]: r for r in records if r["ranking"] == EXACT and r["k"] == k}
    linear, new = linear_full_rank(store, model, layer, k, predictor_records, cfg, device, max_bytes, split, is_test)
    return {"records": records + new, "decomposition": decomposition(layer, k, linear, exact)}
