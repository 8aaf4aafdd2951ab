"""How far ahead can an earlier layer's input predict a layer's sparsity? Recall@K by input distance.

For each layer l and distance j = 0..J (within the model), a predictor for layer l's labels is trained from
att_x_{l-j}, the residual stream entering layer l-j (trainer input `from:{l-j}`, SPEC §7), with the project's
trainer (sparse_predictor/trainer/: same model, loss, split and metrics as the mains). The result is a matrix
per model, layers x distances, of held-out Recall@K (predictor's top-K vs the true top-K at equal budget), with
Recall, Precision, True / Classifier Sparsity kept beside it. j = 0 for the MLP is att_x_l, DejaVu's own
inference-time input of the MLP predictor; for attention DejaVu uses j = 1.

    python scripts/analysis/lookahead.py --data-dir data/llama-3.2-3b_c4 --out-dir out/lookahead/llama-3.2-3b --block mlp
Labels default to the mains' defaults (sparse_predictor/main_*.py DEFAULTS: OPT relu, Llama topk; attention topk).
Writes <out-dir>/lookahead_{block}.json (records, matrix, provenance) and lookahead_{block}.csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # lets `python scripts/analysis/lookahead.py` run

from tqdm import tqdm  # noqa: E402

from Decentralized_FM_alpha.utils.activation_store import ActivationStore  # noqa: E402
from sparse_predictor.trainer.cli import add_training_arguments, split_config, train_config  # noqa: E402
from sparse_predictor.trainer.labels import BLOCKS, MLP_LABELS, LabelSpec, make_label_spec  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import base_manifest  # noqa: E402
from Decentralized_FM_alpha.utils.selection import parse_layer_list  # noqa: E402
from scripts.analysis.common import (DEFAULT_ATT_K, DEFAULT_MLP_LABEL, RUN_SCRIPT_LR,  # noqa: E402
                                     collection_source, device_from_args, open_collection,
                                     train_and_evaluate, write_results)

METRICS = ("Recall@K", "Recall", "Precision", "True Sparsity", "Classifier Sparsity", "K")
CSV_COLUMNS = ("model", "block", "layer", "distance", "input_layer", *METRICS, "label", "k", "threshold",
               "rows_train", "rows_test", "best_epoch")


def cells(layers: list[int], max_distance: int) -> list[tuple[int, int]]:
    """(layer, distance) pairs whose input layer l - j exists."""
    return [(l, j) for l in layers for j in range(max_distance + 1) if l - j >= 0]


def lookahead_matrix(records: list[dict], layers: list[int], max_distance: int, metric: str) -> list[list]:
    """Rows = layers, columns = distances 0..J; None where l - j < 0."""
    value = {(r["layer"], r["distance"]): r[metric] for r in records}
    return [[value.get((l, j)) for j in range(max_distance + 1)] for l in layers]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="a complete collection (SPEC §6)")
    p.add_argument("--out-dir", required=True, help="where lookahead_{block}.json and .csv are written")
    p.add_argument("--block", choices=BLOCKS, default="mlp", help="whose labels are predicted (default %(default)s)")
    p.add_argument("--layers", default="all", help="predicted layers: 'all' or e.g. '0,4,8-11' (default %(default)s)")
    p.add_argument("--max-distance", "-J", type=int, default=4,
                   help="largest distance j; inputs att_x_{l-j} for j = 0..J (default %(default)s)")
    p.add_argument("--label", choices=MLP_LABELS, default=None,
                   help="MLP label (trainer definitions); default the model's main: OPT relu, Llama topk")
    p.add_argument("--k", type=float, default=None,
                   help=f"fraction kept per token for topk labels; default Llama MLP {DEFAULT_MLP_LABEL['llama'][1]}, "
                        f"attention {DEFAULT_ATT_K} (the mains' defaults)")
    p.add_argument("--threshold", type=float, default=None, help="|mlp_label| cut for --label threshold")
    add_training_arguments(p, lr=RUN_SCRIPT_LR)
    return p


def resolve_label(args: argparse.Namespace, family: str, store: ActivationStore) -> LabelSpec:
    if args.block == "att":
        return make_label_spec("att", "topk", args.k if args.k is not None else DEFAULT_ATT_K, None,
                               store.dims.num_heads)
    name, default_k = DEFAULT_MLP_LABEL[family]
    name = args.label or name
    k = args.k if args.k is not None else (default_k if name == "topk" else None)
    return make_label_spec("mlp", name, k, args.threshold, store.dims.ffn_dim)


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.max_distance < 0:
        raise SystemExit("--max-distance must be >= 0")
    provenance = base_manifest(kind="lookahead")
    store = open_collection(args.data_dir)
    source = collection_source(store)
    label = resolve_label(args, source["family"], store)
    layers = parse_layer_list(args.layers, store.num_layers)
    device, max_bytes = device_from_args(args)
    cfg = train_config(args)
    todo = cells(layers, args.max_distance)
    records = []
    progress = tqdm(todo, desc=f"{args.block} lookahead predictors", unit="predictor")
    for layer, distance in progress:
        progress.set_postfix(layer=layer, distance=distance)
        metrics = train_and_evaluate(store, args.block, layer, f"from:{layer - distance}", label, cfg, device,
                                     max_bytes, log=tqdm.write, split=split_config(args))
        records.append({"model": source["model"], "distance": distance, **metrics})
    matrix = {metric: lookahead_matrix(records, layers, args.max_distance, metric) for metric in METRICS}
    payload = {"analysis": "lookahead", "source": source, "block": args.block, "layers": layers,
               "distances": list(range(args.max_distance + 1)), "label": label.name, "k": label.k,
               "threshold": label.threshold, "label_definition": label.definition(),
               "training": {**vars(cfg), "device": str(device), "max_device_gb": args.max_device_gb},
               "definition": "predictor for layer l's labels trained from att_x_{l-j}; held-out Recall@K",
               "matrix": matrix}
    json_path, csv_path = write_results(args.out_dir, f"lookahead_{args.block}", payload, records, CSV_COLUMNS,
                                        provenance)
    print(f"wrote {json_path} and {csv_path}: {len(records)} predictors of {source['model']} ({args.block}, "
          f"layers {layers[0]}..{layers[-1]}, distances 0..{args.max_distance})")
    return json_path


if __name__ == "__main__":
    main()
