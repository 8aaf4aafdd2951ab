"""Recall@K on identical definitions for every model: the numbers of the report's summary.

For each layer, predictors are trained with the project's trainer (sparse_predictor/trainer/: DejaVu's model,
loss, document split and metrics) on one label definition shared by all models, "top-K by |activation|" (OPT: the
ReLU output; Llama: |SiLU(g) * u|), at each K of --fractions, next to the architecture's own label (OPT: relu,
y > 0; Llama: gate, g > 0, when mlp_gate was collected). Each is trained from the same layer's input and from
DejaVu's lookahead input, and at --distance-fraction also from further back:

  block  same-layer   lookahead (DejaVu's wiring)   l-1          l-2
  MLP    mlp_x_l      att_x_l                       att_x_{l-1}  att_x_{l-2}
  att    att_x_l      att_x_{l-1} (= l-1)           -            att_x_{l-2}

Every (layer, input) trains its labels x --seeds together (stacked, trainer.train_stacked). Next to them, at every
fraction and with the same metrics (Recall@K and Captured Mass, trainer/metrics.py), rankings that need no trained
predictor (trainer/baselines.py): the static top-K (the K units most often in the true top-K over the training
documents, trainer/static.py), a seeded random K-subset per token, the oracle (the label itself), and for Llama with
mlp_gate collected the gate: top-K by |SiLU(g)| (CATS-style, the sparse mode `gate`), by |g| and by g, and the share
of the true top-K that sign(g) > 0 covers; OPT has no gate, so its gate records say n/a with the reason. Every record
keeps its held-out per-document sums, so that report.py can bootstrap intervals over documents; uniform chance
(K / units) is recorded beside the metrics. With the collected model's converted checkpoint (--model-dir, or the
manifest's model_name), structured MLP predictors (the MLP's own form at the ranks of --structured-ranks, from the SVD
of the layer's weights; trained too with --structured-trained) and the exact MLP form are scored from both inputs,
with the per-layer 2x2 decomposition of lost recall (input x linear predictor / exact form; structured_recall.py).

    python scripts/analysis/recall_summary.py --data-dir data/llama-3.2-3b_c4 --out-dir out/summary/llama-3.2-3b --seeds 3
Writes <out-dir>/recall_summary.json (records with per-document counts, provenance) and recall_summary.csv; each
finished layer is kept in <out-dir>/recall_summary.partial/, so an interrupted run resumes at the next layer.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # lets `python scripts/analysis/recall_summary.py` run

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from Decentralized_FM_alpha.utils.activation_store import ActivationStore  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import base_manifest  # noqa: E402
from Decentralized_FM_alpha.utils.selection import COUNT_RULE, fraction_count, parse_layer_list  # noqa: E402
from scripts.analysis import capacity, structured_recall  # noqa: E402
from scripts.analysis.common import (collection_source, device_from_args,  # noqa: E402
                                     layer_partial, open_collection, parse_fractions,
                                     stored_partial, write_csv_atomic, write_results)
from sparse_predictor import main_att, main_mlp  # noqa: E402
from sparse_predictor.trainer.cli import add_training_arguments, split_config, train_config  # noqa: E402
from sparse_predictor.trainer.labels import LabelSpec, make_label_spec, topk_mask  # noqa: E402
from sparse_predictor.trainer.model import TrainConfig, train_stacked  # noqa: E402
from sparse_predictor.trainer.baselines import (fixed_ranker, kind_ranker, oracle_ranker,  # noqa: E402
                                                random_ranker, score_rankers)
from sparse_predictor.trainer.rows import chunk_slices, document_split, load_layer, open_rows, stream_chunks  # noqa: E402
from Decentralized_FM_alpha.utils.selection import static_ranking, static_scores  # noqa: E402
from sparse_predictor.trainer.static import static_counts  # noqa: E402

METRICS = ("Recall@K", "Captured Mass", "K", "Recall", "Precision", "True Sparsity", "Classifier Sparsity", "Per-token Recall")
CSV_COLUMNS = ("model", "block", "layer", "input", "ranking", "input_flag", "input_kind", "input_layer", "label", "k", "seed",
               *METRICS, "chance Recall@K", "chance Precision", "rows_test", "documents_test", "best_epoch")
CURVE_COLUMNS = ("model", "block", "layer", "curve", "fold", "predictor", "D", "full_rank", "D_is_full_rank",
                 "parameters", "rows_fraction", "rows_train", "documents_train", "input_kind", "input_layer", "k", "K",
                 "seed", "Recall@K", "Captured Mass", "chance Recall@K", "best_epoch")
BLOCK_LR = {"mlp": main_mlp.DEFAULTS["lr"], "att": main_att.DEFAULTS["lr"]}


def input_variants(block: str, layer: int) -> list[tuple[str, str]]:
    """(name, trainer --input flag) of the inputs that exist for this layer; names are shared by both blocks."""
    variants = [("same", "same")]
    if block == "mlp":
        variants.append(("lookahead", "lookahead"))
        variants += [(f"l-{j}", f"from:{layer - j}") for j in (1, 2) if layer - j >= 0]
    else:  # attention: DejaVu's lookahead is already l-1 (and equals the same-layer input at layer 0)
        variants += [("lookahead", "lookahead")] if layer >= 1 else []
        variants += [("l-2", f"from:{layer - 2}")] if layer >= 2 else []
    return variants


def labels_for(block: str, variant: str, fractions: list[float], distance_fraction: float,
               arch: LabelSpec | None, width: int) -> list[LabelSpec]:
    """Top-K at every fraction (and the architecture's label) for same/lookahead; one top-K further back."""
    if variant.startswith("l-"):
        return [make_label_spec(block, "topk", distance_fraction, None, width)]
    labels = [make_label_spec(block, "topk", f, None, width) for f in fractions]
    return labels + ([arch] if arch is not None and block == "mlp" else [])


def architecture_label(family: str, store: ActivationStore) -> tuple[LabelSpec | None, str]:
    """OPT: relu (exact zeros); Llama: gate (g > 0) when mlp_gate was collected; else none, with the reason."""
    ffn = store.dims.ffn_dim
    if family == "opt":
        return make_label_spec("mlp", "relu", None, None, ffn), "relu: mlp_label > 0 (ReLU)"
    if "mlp_gate" in store.kinds:
        return make_label_spec("mlp", "gate", None, None, ffn), "gate: g > 0 (the SwiGLU gate before SiLU)"
    return None, "absent: mlp_gate was not collected (--collect-mlp-gate)"


def chance_levels(metrics: dict, width: int) -> dict:
    """A ranking that ignores the input: Recall@K = K / width; Precision of a random set = true active share."""
    return {"chance Recall@K": metrics["K"] / width, "chance Precision": metrics["True Sparsity"] / width}


def block_config(args: argparse.Namespace, block: str) -> TrainConfig:
    return train_config(argparse.Namespace(**{**vars(args), "lr": args.lr or BLOCK_LR[block]}))


def predictor_records(store: ActivationStore, model: str, family: str, layer: int, args: argparse.Namespace,
                      device: torch.device, max_bytes: int | None) -> list[dict]:
    arch, _ = architecture_label(family, store)
    records = []
    for block in ("mlp", "att"):
        width = store.dims.ffn_dim if block == "mlp" else store.dims.num_heads
        cfg = block_config(args, block)
        for variant, flag in input_variants(block, layer):
            labels = labels_for(block, variant, args.fractions, args.distance_fraction, arch, width)
            specs = [(i, args.seed + s) for i in range(len(labels)) for s in range(args.seeds)]
            data = load_layer(store, block, layer, flag, labels, device, cfg.batch_size, max_bytes,
                              split_config(args))
            for result in train_stacked(data, block, cfg, specs, log=lambda _: None):
                label = labels[result.label_index]
                metrics = {m: result.metrics[m] for m in METRICS}
                records.append({"model": model, "block": block, "layer": layer, "input": variant, "input_flag": flag,
                                "input_kind": data.input.kind, "input_layer": data.input.layer, "label": label.name,
                                "k": label.k, "label_definition": label.definition(), "seed": result.seed, **metrics,
                                **chance_levels(metrics, width), "rows_test": data.test.n,
                                "documents_test": len(result.per_document["documents"]),
                                "best_epoch": result.best_epoch, "per_document": result.per_document})
            del data
    return records


GATE_INPUT = "gate (no predictor)"
BASELINE_INPUTS = {"static": "static (no input)", "random": "random (no input)", "oracle": "oracle (the label)",
                   "|SiLU(g)|": GATE_INPUT, "|g|": GATE_INPUT, "g": GATE_INPUT}
BASELINE_DEFINITIONS = {
    "static": "the K units most often in the true top-K over the training documents, the same for every token "
              "(count desc, ties by lower unit index; sparse_predictor/trainer/static.py)",
    "random": "a uniform random K-subset per token, drawn (torch.rand, seeded: random_seed), not its expectation",
    "oracle": "the true top-K itself: Recall@K and Captured Mass 1 by construction (a check of the metrics)",
    "|SiLU(g)|": "top-K by |SiLU(g)| with g the exact gate pre-activation (CATS-style, training-free): what the "
                 "sparse mode `gate` keeps; it saves the up and down projections of the other units, not the gate",
    "|g|": "top-K by |g| (the gate pre-activation)",
    "g": "top-K by g",
}


def gate_unavailable(family: str, store: ActivationStore) -> str | None:
    """Why the gate-computed ranking is n/a for this model, or None when it can be computed."""
    if family != "llama":
        return "n/a: OPT's MLP has no gate (fc1 -> ReLU -> fc2)"
    if "mlp_gate" not in store.kinds:
        return "n/a: mlp_gate was not collected (--collect-mlp-gate)"
    return None


def block_rankers(block: str, counts: list[torch.Tensor], gate: bool, seed: int, layer: int) -> dict:
    """name -> one ranker per fraction: static, random, oracle, and for the Llama MLP the gate's three."""
    rankers = {"static": [fixed_ranker(static_scores(c)) for c in counts],
               "random": [random_ranker(random_seed(seed, layer, block, i)) for i in range(len(counts))],
               "oracle": [oracle_ranker] * len(counts)}
    if gate:
        for name, transform in (("|SiLU(g)|", lambda g: F.silu(g).abs()), ("|g|", torch.abs), ("g", lambda g: g)):
            rankers[name] = [kind_ranker("mlp_gate", transform)] * len(counts)
    return rankers


def random_seed(seed: int, layer: int, block: str, fraction_index: int) -> int:
    return int(np.random.SeedSequence([seed, layer, ("mlp", "att").index(block), fraction_index]).generate_state(1)[0])


def baseline_records(store: ActivationStore, model: str, family: str, layer: int, fractions: list[float],
                     is_test: np.ndarray, device: torch.device, seed: int) -> list[dict]:
    """Static, random, oracle and (Llama MLP) gate-computed top-K of the layer, scored on the held-out documents
    against the true top-K at every fraction, with the predictors' metrics; the gate is n/a (with the reason) where
    the model has none."""
    documents = store.document_ids()
    train_docs, test_docs = len(np.unique(documents[~is_test])), len(np.unique(documents[is_test]))
    no_gate = gate_unavailable(family, store)
    records = []
    for block in ("mlp", "att"):
        width = store.dims.ffn_dim if block == "mlp" else store.dims.num_heads
        labels = [make_label_spec(block, "topk", f, None, width) for f in fractions]
        counts = static_counts(store, block, layer, labels, ~is_test, device)
        gate = block == "mlp" and no_gate is None
        rankers = block_rankers(block, counts, gate, seed, layer)
        stats = score_rankers(store, layer, labels, is_test, rankers, ["mlp_gate"] if gate else [], device)
        for (name, i), st in stats.items():
            record = {"model": model, "block": block, "layer": layer, "input": BASELINE_INPUTS[name], "ranking": name,
                      "label": "topk", "k": fractions[i], "label_definition": labels[i].definition(),
                      "Recall@K": st["Recall@K"], "Captured Mass": st["Captured Mass"], "K": st["K"],
                      "chance Recall@K": st["K"] / width, "definition": BASELINE_DEFINITIONS[name],
                      "rows_test": int(is_test.sum()), "documents_test": test_docs, "per_document": st["per_document"]}
            if name == "static":
                top = static_ranking(counts[i])[: st["K"]]
                record.update(rows_train=int((~is_test).sum()), documents_train=train_docs,
                              **{"train Recall@K": float(counts[i][top].sum()) / (st["K"] * int((~is_test).sum()))})
            if name == "random":
                record["random_seed"] = random_seed(seed, layer, block, i)
            records.append(record)
        if block == "mlp" and no_gate is not None:
            records += [{"model": model, "block": "mlp", "layer": layer, "input": GATE_INPUT, "ranking": "|SiLU(g)|",
                         "label": "topk", "k": f, "K": fraction_count(f, width), "Recall@K": None,
                         "Captured Mass": None, "chance Recall@K": fraction_count(f, width) / width,
                         "definition": BASELINE_DEFINITIONS["|SiLU(g)|"], "n/a": no_gate} for f in fractions]
    return records


def gate_coverage_records(store: ActivationStore, model: str, layer: int, fractions: list[float],
                          is_test: np.ndarray, documents: np.ndarray, device: torch.device) -> list[dict]:
    """The share of the true top-K of |SiLU(g) * u| on the held-out rows that sign(g) > 0 covers: no predictor.
    Rows are streamed onto `device` and counted there per document."""
    rows = np.flatnonzero(is_test)
    ids, inverse = np.unique(documents[rows], return_inverse=True)
    ffn = store.dims.ffn_dim
    doc_of_row = torch.from_numpy(inverse).to(device)
    hits = torch.zeros((len(fractions), len(ids)), dtype=torch.int64, device=device)
    positive = torch.zeros(len(ids), dtype=torch.int64, device=device)
    files = [open_rows(store, kind, layer) for kind in ("mlp_label", "mlp_gate")]
    slices = [s for s in chunk_slices(len(is_test), [f.width for f in files]) if is_test[s].any()]
    done = 0
    for part, (y, g) in stream_chunks(files, slices, device):
        local = np.flatnonzero(is_test[part])
        index = torch.from_numpy(local).to(device)
        y, g = y[index].float(), g[index].float()
        doc = doc_of_row[done:done + len(local)]
        done += len(local)
        positive.index_add_(0, doc, (g > 0).sum(dim=1))
        for i, f in enumerate(fractions):
            true = topk_mask(y.abs(), fraction_count(f, ffn))
            hits[i].index_add_(0, doc, ((g > 0) & true).sum(dim=1))
    hits, positive = hits.cpu().numpy(), positive.cpu().numpy()
    tokens = np.bincount(inverse, minlength=len(ids))
    records = []
    for f, h in zip(fractions, hits):
        K = fraction_count(f, ffn)
        records.append({"model": model, "block": "mlp", "layer": layer, "input": GATE_INPUT, "ranking": "sign(g)",
                        "label": "topk", "k": f, "K": K, "Recall@K": float(h.sum() / (K * len(rows))),
                        "Captured Mass": None, "chance Recall@K": K / ffn,
                        "definition": "share of the true top-K units with g > 0 (a set of varying size, not K units)",
                        "gate_positive_share": float(positive.sum() / (ffn * len(rows))),
                        "per_document": {"documents": ids.tolist(), "tokens": tokens.tolist(),
                                         "topk_hits": h.astype(np.int64).tolist()}})
    return records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="a complete collection (SPEC §6)")
    p.add_argument("--out-dir", required=True, help="where recall_summary.json and .csv are written")
    p.add_argument("--fractions", type=parse_fractions, default=parse_fractions("0.1,0.25,0.5"),
                   help="K as fractions of the neurons / heads, comma list (default 0.1,0.25,0.5; " + COUNT_RULE + ")")
    p.add_argument("--distance-fraction", type=float, default=0.25,
                   help="the K fraction of the predictors trained from l-1 and l-2 (default %(default)s)")
    p.add_argument("--layers", default="all", help="'all' or a list such as 0,4,8-11 (default %(default)s)")
    add_training_arguments(p, lr=None)
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate of both blocks (default: each block's main default, "
                        + ", ".join(f"{b} {lr:g}" for b, lr in BLOCK_LR.items()) + ")")
    p.set_defaults(selection="last")  # no choice made on the held-out split that the summary reports
    capacity.add_arguments(p)
    structured_recall.add_arguments(p)
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes, each training a share of the layers (on a GPU they share it: small "
                        "predictors leave it mostly idle); results do not depend on it (default %(default)s)")
    p.add_argument("--partial-only", action="store_true", help=argparse.SUPPRESS)  # a worker of --jobs
    return p


def layer_results(store: ActivationStore, source: dict, layer: int, args: argparse.Namespace, device: torch.device,
                  max_bytes: int | None, is_test: np.ndarray, documents: np.ndarray, split, curves: bool,
                  folds: bool, model_dir: Path | None) -> dict:
    """Everything the summary trains and scores for one layer: predictors, baselines and (with a converted checkpoint,
    `model_dir`) structured MLP predictors ("records") with the layer's decomposition row, the capacity and data
    curves ("capacity") and the fold predictors ("folds") where the layer is in their subsets."""
    model, family = source["model"], source["family"]
    seconds: dict[str, float] = {}

    def timed(part: str, compute):
        start = time.perf_counter()
        found = compute()
        seconds[part] = time.perf_counter() - start
        return found

    records = timed("predictors", lambda: predictor_records(store, model, family, layer, args, device, max_bytes))
    records += timed("baselines", lambda: baseline_records(store, model, family, layer, args.fractions, is_test,
                                                           device, args.seed))
    if gate_unavailable(family, store) is None:
        records += timed("gate coverage", lambda: gate_coverage_records(store, model, layer, args.fractions, is_test,
                                                                        documents, device))
    found = {"records": [], "decomposition": None} if model_dir is None else timed(
        "structured", lambda: structured_recall.structured_results(store, model, layer, args, model_dir,
                                                                   block_config(args, "mlp"), records, is_test, split,
                                                                   device, max_bytes))
    records += found["records"]
    config = lambda block: block_config(args, block)  # noqa: E731
    return {"records": records, "decomposition": found["decomposition"],
            "capacity": timed("capacity", lambda: capacity.capacity_records(
                store, model, layer, args, config, device, max_bytes, split)) if curves else [],
            "folds": timed("folds", lambda: capacity.fold_records(
                store, model, layer, args, config, device, max_bytes, split)) if folds else [],
            "seconds": seconds}


RUN_ONLY = ("out_dir", "device", "layers", "jobs", "partial_only")  # flags that do not change a layer's records


def run_workers(argv: list[str], layers: list[int], jobs: int) -> None:
    """--jobs processes of this script, layers dealt round-robin; each leaves its layers' partial files."""
    shares = [layers[i::jobs] for i in range(jobs) if layers[i::jobs]]
    workers = [subprocess.Popen([sys.executable, __file__, *argv, "--layers", ",".join(map(str, share)),
                                 "--jobs", "1", "--partial-only"]) for share in shares]
    failed = [w.args for w in workers if w.wait() != 0]
    if failed:
        raise SystemExit(f"{len(failed)} summary worker(s) failed: {failed[0]}")


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.seeds < 1 or args.distance_fraction not in args.fractions:
        raise SystemExit("--seeds must be >= 1 and --distance-fraction one of --fractions (the penalty compares "
                         "equal K)")
    provenance = base_manifest(kind="recall_summary")
    store = open_collection(args.data_dir)
    source = collection_source(store)
    layers = parse_layer_list(args.layers, store.num_layers)
    device, max_bytes = device_from_args(args)
    _, arch_note = architecture_label(source["family"], store)
    model_dir, model_dir_note = structured_recall.model_dir_of(args, store)
    split = split_config(args)
    documents = store.document_ids()
    is_test = document_split(documents, split.test_fraction, split.test_docs)
    records, started = [], time.perf_counter()
    partial = Path(args.out_dir) / "recall_summary.partial"  # one file per finished layer: a rerun resumes
    partial.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items() if k not in RUN_ONLY}

    capacity_layers = capacity.curve_layers(args.capacity_layers, store.num_layers)
    fold_layers = capacity.curve_layers(args.fold_layers, store.num_layers) if args.folds else []

    if args.jobs > 1:
        heavy = set(capacity_layers) | set(fold_layers)  # dealt first, so the workers share the curves and folds
        todo = sorted((layer for layer in layers if stored_partial(partial, settings, layer) is None),
                      key=lambda layer: layer not in heavy)
        if len(todo) > 1:
            run_workers(sys.argv[1:] if argv is None else list(argv), todo, args.jobs)
    curves, folds, layer_seconds, decomposition = [], [], {}, []
    for layer in tqdm(layers, desc=f"{source['model']} summary predictors", unit="layer"):
        found = layer_partial(partial, settings, layer, lambda l: layer_results(
            store, source, l, args, device, max_bytes, is_test, documents, split, l in capacity_layers,
            l in fold_layers, model_dir))
        records += found["records"]
        decomposition += [found["decomposition"]] if found.get("decomposition") else []
        curves += found["capacity"]
        folds += found["folds"]
        layer_seconds[layer] = found.get("seconds")
    if args.partial_only:
        return partial
    payload = {"analysis": "recall_summary", "source": source, "layers": layers, "fractions": args.fractions,
               "distance_fraction": args.distance_fraction, "seeds": [args.seed + s for s in range(args.seeds)],
               "architecture_label": arch_note, "count_rule": COUNT_RULE, "split": split.describe(),
               "training": {**vars(train_config(args)), "lr": args.lr or BLOCK_LR, "device": str(device)},
               "inputs": {"mlp": {"same": "mlp_x_l", "lookahead": "att_x_l", "l-1": "att_x_{l-1}",
                                  "l-2": "att_x_{l-2}"},
                          "att": {"same": "att_x_l", "lookahead": "att_x_{l-1} (l >= 1)", "l-2": "att_x_{l-2}"}},
               "baselines": BASELINE_DEFINITIONS,
               "capacity": curves, "capacity_layers": capacity_layers, "folds": folds, "fold_layers": fold_layers,
               "fold_spread": capacity.fold_spread(folds, records),
               "structured": {"model_dir": str(model_dir) if model_dir else None, "model_dir_from": model_dir_note,
                              "ranks": args.structured_ranks, "trained": args.structured_trained,
                              "definitions": structured_recall.DEFINITIONS},
               "structured_decomposition": decomposition,
               "seconds": time.perf_counter() - started,
               "layer_seconds": layer_seconds}  # per layer and part, as first computed (a resumed layer: its run)
    json_path, csv_path = write_results(args.out_dir, "recall_summary", payload, records, CSV_COLUMNS, provenance)
    write_csv_atomic(Path(args.out_dir) / "recall_capacity.csv", curves, CURVE_COLUMNS)
    write_csv_atomic(Path(args.out_dir) / "recall_folds.csv", folds, CURVE_COLUMNS)
    print(f"wrote {json_path} and {csv_path}: {len(records)} records of {source['model']} (layers {layers[0]}.."
          f"{layers[-1]}, {args.seeds} seed(s), {payload['seconds']:.0f} s)")
    return json_path


if __name__ == "__main__":
    main()
