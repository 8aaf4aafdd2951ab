"""How sparse is each layer really, and how much does the predictors' Recall depend on the label definition?

Per layer, over a sample of collected tokens (SPEC §6), the statistics of STATISTIC_DEFINITIONS below: exact
zeros (OPT's ReLU sparsity), near-zero fractions |y| < t, the share of |SiLU(g)*u| (or ReLU) magnitude held by
each token's top neurons, the fraction of negative gate pre-activations (Llama, needs mlp_gate; reported as
absent otherwise) and the share of head-norm magnitude held by the top heads. Then, unless --no-label-sweep,
the label sweep: one MLP predictor per layer of --sweep-layers and label of --labels, trained and evaluated
with the project's trainer (sparse_predictor/trainer/, SPEC §7), so that the sensitivity of Recall,
Recall@K, Precision and the sparsities to the label definition can be read side by side.

    python scripts/analysis/sparsity_stats.py --data-dir data/llama-3.2-3b_c4 --out-dir out/sparsity/llama-3.2-3b
Writes <out-dir>/sparsity_stats.json/.csv and, with the sweep, label_sweep.json/.csv (each with provenance).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # lets `python scripts/analysis/sparsity_stats.py` run

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from Decentralized_FM_alpha.utils.activation_store import ActivationStore  # noqa: E402
from sparse_predictor.trainer.cli import add_training_arguments, split_config, train_config  # noqa: E402
from sparse_predictor.trainer.labels import LabelSpec, make_label_spec  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import base_manifest  # noqa: E402
from Decentralized_FM_alpha.utils.selection import COUNT_RULE, fraction_count, parse_layer_list  # noqa: E402
from scripts.analysis.common import (RowSample, RUN_SCRIPT_LR, collection_source, device_from_args,  # noqa: E402
                                     iter_row_chunks, open_collection, parse_fractions, per_layer_partials,
                                     read_rows_on, rows_per_chunk, sample_rows, train_and_evaluate_together,
                                     write_results)

STATISTIC_DEFINITIONS = {
    "zero_fraction": "fraction of mlp_label entries == 0 in float16 storage; OPT: ReLU zeros, the exact inactive "
                     "neurons DejaVu skips",
    "positive_fraction": "fraction of mlp_label entries > 0 (the active fraction of the 'relu' label)",
    "below_{t}": "fraction of |mlp_label| entries < t",
    "mlp_top{f}_mass": "mean over tokens of the share of the token's sum of |mlp_label| held by its top "
                       "fraction_count(f, ffn) neurons (tokens whose sum is 0 are left out and counted in "
                       "tokens_with_zero_mlp_mass)",
    "gate_negative_fraction": "fraction of mlp_gate entries < 0 (gate pre-activation, SiLU(g) < 0); null when "
                              "mlp_gate was not collected",
    "att_top{f}_mass": "mean over tokens of the share of the sum of head output norms (att_label) held by the top "
                       "fraction_count(f, heads) heads",
    "fraction_count": COUNT_RULE,
}
DEFAULT_LABELS = "relu,topk:0.1,topk:0.3,topk:0.5,threshold:0.01,gate"
SWEEP_METRICS = ("Recall", "Recall@K", "K", "Precision", "True Sparsity", "Classifier Sparsity")
SWEEP_COLUMNS = ("model", "layer", "label_spec", "label", "k", "threshold", *SWEEP_METRICS, "input", "rows_train",
                 "rows_test", "best_epoch", "status")


# ------------------------------------------------------------------------------------- per-layer statistics
def top_mass_shares(magnitudes: torch.Tensor, fractions: list[float]) -> tuple[dict[float, torch.Tensor], torch.Tensor]:
    """Per token, the share of its total magnitude held by its top fraction_count(f, width) units; and which
    tokens count.

    magnitudes (n, width) >= 0; tokens whose total is 0 have no share and are masked out.
    """
    ordered = magnitudes.sort(dim=1, descending=True).values.double().cumsum(dim=1)
    total = ordered[:, -1]
    counted = total > 0
    shares = {}
    for f in fractions:
        top = fraction_count(f, magnitudes.shape[1])
        shares[f] = ordered[counted, top - 1] / total[counted]
    return shares, counted


def fraction_key(prefix: str, value: float) -> str:
    return f"{prefix}{value:g}"


def layer_statistics(store: ActivationStore, layer: int, sample: RowSample, thresholds: list[float],
                     fractions: list[float], device: torch.device) -> dict:
    """One layer's sparsity statistics over the sampled rows (only those are read), chunk by chunk on `device` (the
    GPU on a GPU run: the sort of every row's magnitudes is the stage's work), sums kept there until the end."""
    kinds = ["mlp_label", "att_label"] + (["mlp_gate"] if "mlp_gate" in store.kinds else [])
    files = [store.open(kind, layer) for kind in kinds]
    zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
    sums: dict[str, torch.Tensor] = defaultdict(zero)
    counts: dict[str, int] = defaultdict(int)
    zero_mass_tokens = zero()

    def add(key: str, total: torch.Tensor, n: int) -> None:
        sums[key] += total
        counts[key] += int(n)

    for _, rows in iter_row_chunks(sample.rows, rows_per_chunk(3 * store.dims.ffn_dim)):
        y, heads, *gate = (read_rows_on(mm, rows, device) for mm in files)
        add("zero_fraction", (y == 0).sum(), y.numel())
        add("positive_fraction", (y > 0).sum(), y.numel())
        magnitude = y.abs()
        for t in thresholds:
            add(fraction_key("below_", t), (magnitude < t).sum(), y.numel())
        shares, counted = top_mass_shares(magnitude, fractions)
        for f, share in shares.items():
            add(fraction_key("mlp_top", f) + "_mass", share.sum(), len(share))
        zero_mass_tokens += (~counted).sum()
        head_shares, _ = top_mass_shares(heads.abs(), fractions)
        for f, share in head_shares.items():
            add(fraction_key("att_top", f) + "_mass", share.sum(), len(share))
        if gate:
            add("gate_negative_fraction", (gate[0] < 0).sum(), gate[0].numel())
    stats = {key: float(sums[key]) / counts[key] if counts[key] else None for key in sums}  # None: no token had mass
    stats["tokens_with_zero_mlp_mass"] = int(zero_mass_tokens)
    # None where a statistic does not apply: no mlp_gate collected
    return {"layer": layer, **{c: stats.get(c) for c in statistic_columns(thresholds, fractions)}}


def statistic_columns(thresholds: list[float], fractions: list[float]) -> list[str]:
    return (["zero_fraction", "positive_fraction"] + [fraction_key("below_", t) for t in thresholds]
            + [fraction_key("mlp_top", f) + "_mass" for f in fractions] + ["gate_negative_fraction"]
            + [fraction_key("att_top", f) + "_mass" for f in fractions] + ["tokens_with_zero_mlp_mass"])


# ------------------------------------------------------------------------------------- label sweep
def parse_label(spec: str, ffn: int) -> LabelSpec:
    """'relu', 'gate', 'topk:K' or 'threshold:T' as the trainer's label."""
    name, _, value = spec.partition(":")
    if name in ("topk", "threshold") and not value:
        raise ValueError(f"label {spec!r}: write {name}:VALUE")
    if name not in ("topk", "threshold") and value:
        raise ValueError(f"label {spec!r}: {name} takes no value")
    return make_label_spec("mlp", name, float(value) if name == "topk" else None,
                           float(value) if name == "threshold" else None, ffn)


def label_sweep(store: ActivationStore, model: str, layers: list[int], label_specs: list[str],
                args: argparse.Namespace) -> list[dict]:
    """One predictor per (layer, label), a layer's labels trained together on one read of its rows; a gate label
    without collected mlp_gate is recorded as absent."""
    labels = {spec: parse_label(spec, store.dims.ffn_dim) for spec in label_specs}
    present = [spec for spec in label_specs if labels[spec].source_kind in store.kinds]
    device, max_bytes = device_from_args(args)
    cfg = train_config(args)
    records = []
    for layer in tqdm(layers, desc="label sweep", unit="layer"):
        trained = dict(zip(present, train_and_evaluate_together(
            store, "mlp", layer, args.input, [labels[spec] for spec in present], cfg, device, max_bytes,
            log=tqdm.write, split=split_config(args)))) if present else {}
        for spec in label_specs:
            if spec in trained:
                records.append({"model": model, "label_spec": spec, "status": "trained", **trained[spec]})
            else:
                records.append({"model": model, "layer": layer, "label_spec": spec, "label": labels[spec].name,
                                "status": f"absent: {labels[spec].source_kind} was not collected "
                                          "(--collect-mlp-gate)"})
    return records


# ------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    epilog = "statistics:\n" + "\n".join(f"  {k}: {v}" for k, v in STATISTIC_DEFINITIONS.items())
    p = argparse.ArgumentParser(description=__doc__, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="a complete collection (SPEC §6)")
    p.add_argument("--out-dir", required=True, help="where sparsity_stats.* and label_sweep.* are written")
    p.add_argument("--thresholds", default="0.001,0.01,0.1",
                   help="comma list of t for below_{t} = fraction of |mlp_label| < t (default %(default)s)")
    p.add_argument("--fractions", default="0.05,0.1,0.2,0.3,0.5",
                   help="comma list of f for the top-f magnitude shares of neurons and heads (default %(default)s)")
    p.add_argument("--max-rows", type=int, default=50_000,
                   help="statistics over at most this many rows drawn with --sample-seed (default %(default)s; a "
                        "number >= the collection's rows uses them all); the sweep trains on all rows")
    p.add_argument("--sample-seed", type=int, default=0,
                   help="seed of the statistics' row sample (default %(default)s)")
    p.add_argument("--exclude-first-token", action="store_true",
                   help="statistics without position 0 of each document: the BOS token, or the first text token "
                        "when the tokenizer adds no BOS (recorded); the sweep is unaffected")
    p.add_argument("--layers", default="all", help="layers of the statistics: 'all' or e.g. '0,4,8-11'")
    p.add_argument("--no-label-sweep", action="store_true", help="only the statistics: train no predictor")
    p.add_argument("--labels", default=DEFAULT_LABELS,
                   help="comma list of MLP labels for the sweep: relu, gate, topk:K (fraction), threshold:T "
                        "(default %(default)s)")
    p.add_argument("--sweep-layers", default="all", help="layers of the sweep: 'all' or e.g. '0,13,27'")
    p.add_argument("--input", default="same",
                   help="predictor input of the sweep (trainer --input: same, lookahead, from:J; default %(default)s)")
    add_training_arguments(p, lr=RUN_SCRIPT_LR)
    p.add_argument("--partial-only", action="store_true",
                   help="keep each layer's results in <out-dir>/*.partial/ and write nothing else: a later run over "
                        "all layers (same settings and --data-dir) merges them (the online study's layer groups)")
    return p


RUN_ONLY = ("out_dir", "device", "layers", "sweep_layers", "no_label_sweep", "partial_only")  # change no record


def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    if args.max_rows < 1:
        raise SystemExit("--max-rows must be >= 1")
    thresholds, fractions = [float(t) for t in args.thresholds.split(",")], parse_fractions(args.fractions)
    provenance = base_manifest(kind="sparsity_stats")
    store = open_collection(args.data_dir)
    source = collection_source(store)
    layers = parse_layer_list(args.layers, store.num_layers)
    sample = sample_rows(store, args.max_rows, args.sample_seed, args.exclude_first_token)
    gate_note = ("mlp_gate collected" if "mlp_gate" in store.kinds else
                 "mlp_gate ABSENT from this collection (collect with --collect-mlp-gate): gate statistics and the "
                 "gate label are not computed")
    print(gate_note)
    settings = {k: str(v) for k, v in vars(args).items() if k not in RUN_ONLY}
    out = Path(args.out_dir)
    device = device_from_args(args)[0]
    records = per_layer_partials(out / "sparsity_stats.partial", settings, tqdm(layers, desc="sparsity statistics",
                                                                               unit="layer"),
                                 lambda l: [{"model": source["model"],
                                             **layer_statistics(store, l, sample, thresholds, fractions, device)}])
    sweep_layers = [] if args.no_label_sweep else parse_layer_list(args.sweep_layers, store.num_layers)
    sweep = per_layer_partials(out / "label_sweep.partial", settings, sweep_layers,
                               lambda l: label_sweep(store, source["model"], [l], args.labels.split(","), args))
    if args.partial_only:
        return []
    columns = statistic_columns(thresholds, fractions)
    payload = {"analysis": "sparsity_stats", "source": source, "sample": sample.describe(), "columns": columns,
               "exclude_first_token": args.exclude_first_token, "thresholds": thresholds, "fractions": fractions,
               "mlp_gate": gate_note, "definitions": STATISTIC_DEFINITIONS}
    written = list(write_results(args.out_dir, "sparsity_stats", payload, records,
                                 ["model", "layer", *columns], provenance))
    if not args.no_label_sweep:
        sweep_provenance = base_manifest(kind="label_sweep")
        written += write_results(args.out_dir, "label_sweep",
                                 {"analysis": "label_sweep", "source": source, "input": args.input,
                                  "labels": args.labels.split(","), "layers": sweep_layers,
                                  "training": {**vars(train_config(args)), "device": str(device_from_args(args)[0])}},
                                 sweep, SWEEP_COLUMNS, sweep_provenance)
    print(f"wrote {', '.join(str(p) for p in written)} ({source['model']}, {len(layers)} layers, "
          f"{len(sample.rows)} rows{'' if args.no_label_sweep else ', label sweep'})")
    return written


if __name__ == "__main__":
    main()
