"""The command line of the four mains (main_mlp.py, main_att.py and their Llama twins): flags, run, write."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from Decentralized_FM_alpha.utils.activation_store import ActivationStore
from Decentralized_FM_alpha.utils.manifest import REPO_ROOT, base_manifest
from Decentralized_FM_alpha.utils.selection import parse_layer_list
from sparse_predictor.trainer.labels import DEFAULT_INPUT, MLP_LABELS, LabelSpec, fraction_list, k_name, make_label_spec
from sparse_predictor.trainer.model import SELECTIONS, TrainConfig, format_metrics, train_stacked
from sparse_predictor.trainer.records import RowsSource, collection_source, layer_record, seed_spread, write_outputs
from sparse_predictor.trainer.rows import (CPU_RESIDENT_BYTES, GPU_RESIDENT_SHARE, MIN_TEST_DOCS, TEST_FRACTION,
                                           LayerData, SplitConfig, load_layer)


def default_paths(model: str, dataset: str) -> tuple[Path, Path]:
    """SPEC §6 collection directory and the predictor directory next to it (both under the ignored data/)."""
    return REPO_ROOT / "data" / f"{model}_{dataset}", REPO_ROOT / "data" / f"{model}_{dataset}_sparse_predictor"


def build_parser(block: str, description: str, defaults: dict) -> argparse.ArgumentParser:
    """The flags of the four mains (SPEC §7); `defaults` holds the model-specific ones (model, label, k, lr)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=defaults["model"],
                   help="names the run (JSON, default paths); dims, layers and rows come from the manifest "
                        "(default %(default)s)")
    p.add_argument("--dataset", default="c4", help="names the collection, as the original (default %(default)s)")
    p.add_argument("--data-dir", help="collected activations (SPEC §6); default data/<model>_<dataset> in the repo")
    p.add_argument("--out-dir", help="where {block}_layer{L}.pt/.json go; with several --k, a template holding {k} "
                                     "(e.g. predictors/b{k}): each fraction's predictors go to their own folder. "
                                     "Default data/<model>_<dataset>_sparse_predictor in the repo")
    p.add_argument("--L", default="0", help="layer index, a list such as 0-13 or 0,4,8, or 'all': each in turn "
                                           "(default %(default)s)")
    p.add_argument("--input", default=DEFAULT_INPUT[block],
                   help="predictor input: same (MLP: mlp_x_l; attention: att_x_l), lookahead (MLP: att_x_l; "
                        "attention: att_x_{l-1}, att_x_0 for layer 0), or from:J (att_x_J, J <= l). Default "
                        "%(default)s: the wiring DejaVu's inference feeds (the sparse runner checks it)")
    if block == "mlp":
        p.add_argument("--label", choices=MLP_LABELS, default=defaults["label"],
                       help="relu: mlp_label > 0; topk: top fraction --k of |mlp_label| per token; threshold: "
                            "|mlp_label| > --threshold; gate: mlp_gate > 0 (needs mlp_gate collected). "
                            "Default %(default)s")
        p.add_argument("--k", type=fraction_list, default=None,
                       help=f"fraction of neurons active per token for --label topk, or a comma list trained together "
                            f"(default {defaults['k']} with topk; an error with other labels)")
        p.add_argument("--threshold", type=float, default=None, help="|mlp_label| cut for --label threshold")
    else:
        p.add_argument("--k", type=fraction_list, default=[defaults["k"]],
                       help="fraction of heads active per token: the top fraction_count(k, heads) head norms, "
                            "rounded to the nearest count, or a comma list trained together (default %(default)s)")
        p.add_argument("--gqa-groups", action="store_true",
                       help="label whole key/value groups, as the sparse runner's --gqa-groups keeps them: the heads of "
                            "the top fraction_count(k, groups) groups by summed head norm")
    add_training_arguments(p, lr=defaults["lr"])
    add_save_dtype_argument(p)
    return p


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_save_dtype_argument(p: argparse.ArgumentParser) -> None:
    """--save-dtype, for the scripts that write checkpoints."""
    p.add_argument("--save-dtype", choices=tuple(SAVE_DTYPES), default="float32",
                   help="dtype of the written checkpoints (default %(default)s); bfloat16 halves their disk, and the "
                        "JSON's metrics stay those of the float32 predictor before rounding (the JSON says so)")


def checkpoint_state(state_dict: dict, save_dtype: str) -> dict:
    return {key: value.to(SAVE_DTYPES[save_dtype]) for key, value in state_dict.items()}


def add_training_arguments(p: argparse.ArgumentParser, lr: float | None, streaming: bool = True) -> None:
    """The training flags (SPEC §7 plus --selection, --max-device-gb), for the mains and any script that trains;
    lr None leaves --lr out (a script with one rate per block), streaming False leaves --max-device-gb out."""
    p.add_argument("--D", type=int, default=1000, help="low-rank width of the predictor (default %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="at most this many epochs (default %(default)s)")
    p.add_argument("--batch_size", type=int, default=1024, help="training and eval batch (default %(default)s)")
    if lr is not None:
        p.add_argument("--lr", type=float, default=lr, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--device", default=None, help="torch device; default cuda:0 if CUDA is available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds init, shuffling and windows (default %(default)s)")
    p.add_argument("--seeds", type=int, default=1,
                   help="train this many predictors per layer, seeds --seed .. --seed+N-1, together (stacked: about "
                        "the cost of one on a GPU); the first is written to --out-dir, seed S to --out-dir/seedS/, and "
                        "every JSON records the spread over seeds (default %(default)s)")
    p.add_argument("--selection", choices=tuple(SELECTIONS), default="original",
                   help="which epoch's predictor is kept. " + " ".join(f"{k}: {v}." for k, v in SELECTIONS.items())
                        + " Default %(default)s")
    p.add_argument("--test-fraction", type=float, default=TEST_FRACTION,
                   help="held-out share of the rows, taken as whole documents from the end of the collection and "
                        f"raised to at least min({MIN_TEST_DOCS}, half the documents) (default %(default)s)")
    p.add_argument("--test-docs", type=int, default=None,
                   help="hold out exactly this many documents (the last collected) instead of --test-fraction")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="launch every training step's kernels from Python instead of replaying a captured CUDA graph")
    if not streaming:
        return
    p.add_argument("--max-device-gb", type=float, default=None,
                   help=f"device memory for the layer's rows; more rows are streamed in windows each epoch. Default "
                        f"{GPU_RESIDENT_SHARE:.0%}% of free GPU memory, {CPU_RESIDENT_BYTES >> 30} GiB on the CPU")


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(D=args.D, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       selection=args.selection, cuda_graphs=not args.no_cuda_graphs)


def split_config(args: argparse.Namespace) -> SplitConfig:
    return SplitConfig(args.test_fraction, args.test_docs)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for CUDA, which this torch build/machine does not have")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device and events need an index
    return device


def require_complete(store: ActivationStore) -> None:
    if store.manifest.get("complete") is not True:
        raise ValueError(f"{store.data_dir}: the collection is not complete (manifest complete="
                         f"{store.manifest.get('complete')!r}); finish or resume it before training")


def open_layers(data_dir: str, layer_spec: str) -> tuple[ActivationStore, list[int]]:
    """A complete collection and the layers --L names in it."""
    store = ActivationStore(data_dir)
    require_complete(store)
    try:
        return store, parse_layer_list(layer_spec, store.num_layers)
    except ValueError as e:
        raise ValueError(f"--L: {e} (the manifest has layers 0..{store.num_layers - 1})") from e


def run_cli(block: str, description: str, defaults: dict, argv: list[str] | None = None) -> list[Path]:
    """Parse the flags, train the requested layer(s), write checkpoint + JSON; returns the JSON paths."""
    args = build_parser(block, description, defaults).parse_args(argv)
    device = resolve_device(args.device)
    data_dir, out_dir = default_paths(args.model, args.dataset)
    args.data_dir, args.out_dir = args.data_dir or str(data_dir), args.out_dir or str(out_dir)
    store, layers = open_layers(args.data_dir, args.L)
    labels = label_specs(block, args, defaults, store)
    out_dirs = label_out_dirs(args.out_dir, labels)
    cfg = train_config(args)
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: need at least 1")
    max_bytes = None if args.max_device_gb is None else int(args.max_device_gb * 2**30)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    print(args)
    source = collection_source(store)
    written = []
    for layer in layers:
        provenance = base_manifest(args=vars(args))
        print("=" * 40, "Layer", layer, "=" * 40)
        start = time.perf_counter()
        data = load_layer(store, block, layer, args.input, labels, device, cfg.batch_size, max_bytes,
                          split_config(args))
        written.append(train_and_write(args, block, layer, data, source, cfg, time.perf_counter() - start,
                                       provenance, out_dirs=out_dirs))
        del data
    return written


def label_specs(block: str, args: argparse.Namespace, defaults: dict, store: ActivationStore) -> list[LabelSpec]:
    """One label per --k (the mains' default fraction when topk has none); attention in whole groups with --gqa-groups."""
    if block == "att":
        group = store.dims.num_heads // store.dims.num_kv_heads if args.gqa_groups else 1
        return [make_label_spec(block, "topk", k, None, store.dims.num_heads, group) for k in args.k]
    if args.label == "topk" and args.k is None:
        args.k = [defaults["k"]]  # the model's default fraction, recorded with the other flags
    ks = args.k if args.k is not None else [None]
    return [make_label_spec(block, args.label, k, args.threshold, store.dims.ffn_dim) for k in ks]


def label_out_dirs(out_dir: str, labels: list[LabelSpec]) -> list[Path]:
    """--out-dir for one label; with several, the template's {k} names each fraction's folder."""
    if len(labels) == 1:
        return [Path(out_dir.format(k=k_name(labels[0].k)) if labels[0].k is not None else out_dir)]
    if "{k}" not in out_dir:
        raise ValueError(f"--k {','.join(k_name(l.k) for l in labels)}: several fractions need {{k}} in --out-dir "
                         f"(e.g. {out_dir}/b{{k}}), got {out_dir!r}")
    dirs = [Path(out_dir.format(k=k_name(label.k))) for label in labels]
    if len(set(dirs)) != len(dirs):
        raise ValueError(f"--k: two fractions share the folder name ({[str(d) for d in dirs]})")
    return dirs


def train_and_write(args: argparse.Namespace, block: str, layer: int, data: LayerData, source: RowsSource,
                    cfg: TrainConfig, load_s: float, provenance: dict, timings: dict | None = None,
                    out_dirs: list[Path] | None = None) -> Path:
    """Train --seeds predictors of each of the layer's labels on its rows (already on the device), all stacked, and
    write each checkpoint + JSON (label i to out_dirs[i], default --out-dir for the one label; seed S to
    <out-dir>/seedS/) with the spread over seeds; returns the first JSON. The same code for rows read from a
    collection and rows kept by an online pass."""
    out_dirs = [Path(args.out_dir)] if out_dirs is None else out_dirs
    loaded = time.perf_counter()
    specs = [(i, args.seed + s) for i in range(len(out_dirs)) for s in range(args.seeds)]
    results = train_stacked(data, block, cfg, specs)
    train_s = time.perf_counter() - loaded
    timings = {"load_s": load_s, "train_and_eval_s": train_s, "total_s": load_s + train_s,
               "predictors_trained_together": len(results), **(timings or {})}
    records = [layer_record(args, block, layer, source, data, cfg, r, timings, provenance) for r in results]
    first = None
    for label_index, out_dir in enumerate(out_dirs):
        group = [(r, rec) for r, rec in zip(results, records) if r.label_index == label_index]
        spread = seed_spread([rec for _, rec in group])
        for i, (result, record) in enumerate(group):
            record["seed_spread"] = spread
            record["checkpoint_dtype"] = args.save_dtype
            if args.save_dtype != "float32":
                record["checkpoint_rounding"] = (f"the checkpoint holds the trained float32 weights rounded to "
                                                 f"{args.save_dtype}; the metrics here are the float32 predictor's")
            checkpoint, json_path = write_outputs(out_dir if i == 0 else out_dir / f"seed{result.seed}", block,
                                                  layer, checkpoint_state(result.state_dict, args.save_dtype), record)
            if i == 0:
                first = first or json_path
                print(f"wrote {checkpoint} and {json_path} (best epoch {result.best_epoch}, "
                      f"{timings['total_s']:.1f} s): "
                      f"{format_metrics({k: v for k, v in result.metrics.items() if k != 'per_document'})}")
        if args.seeds > 1:
            recall = spread["Recall@K"]
            print(f"{block} layer {layer}: {args.seeds} seeds in {out_dir}/seed*/; Recall@K mean {recall['mean']:.4f} "
                  f"(min {recall['min']:.4f}, max {recall['max']:.4f})")
    return first
