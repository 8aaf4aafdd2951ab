"""Benchmark predictor training: the fast trainer vs a straightforward reference, on the same data in one run.

Writes synthetic collected activations in the SPEC §6 format (ActivationWriter) at any dims, by default
Llama-3.2-3B's (d 3072, ffn 8192, 24 heads, 400,000 rows), with labels from a known low-rank map of the input, then
runs each variant in its own process (so that peak host RSS is the variant's own):
  fast       sparse_predictor.trainer: the layer read from the mmaps onto the device in chunks, labels computed
             there once, whole batches gathered by index on the device, bf16 autocast matmuls on CUDA
  reference  the original's way (DejaVu sparse_predictor/main_mlp.py + trainer_mlp.py): the whole layer copied into
             host RAM, a per-sample DataLoader, fp32, labels made per batch after .to(device), the original's
             per-batch evaluate loop; trained for --ref-epochs only, as it is ~100x slower
It reports seconds per epoch, samples/s, the fraction of the bf16 (CPU: fp32) matmul peak measured in the same run,
host peak RSS, the fast trainer's end-to-end time (reading the mmaps + all epochs + evaluations), and the ratios
fast/reference with their held-out Recall after the same number of epochs. Everything goes to <--out>/bench.json.

GPU:            python scripts/bench/bench_predictor_training.py --out out/bench_h100
CPU smoke:      python scripts/bench/bench_predictor_training.py --device cpu --rows 20000 --hidden 256 --ffn 1024 \\
                    --heads 8 --kv-heads 2 --D 256 --epochs 3 --ref-epochs 1 --out out/bench_cpu
All layers:     python scripts/bench/bench_predictor_training.py --layers 28 --link-layers --kinds all --generate-only \\
                    --data-dir data/synthetic-3b_c4
                then: DATA_DIR=data/synthetic-3b_c4 bash sparse_predictor/run_c4_mlp_llama.sh (and the other run_c4)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # lets `python scripts/bench/bench_predictor_training.py` run

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from Decentralized_FM_alpha.utils.activation_store import (ActivationStore, ActivationWriter, ModelDims,  # noqa: E402
                                                            activation_file)
from Decentralized_FM_alpha.utils.manifest import (base_manifest, peak_rss_bytes, rss_breakdown,  # noqa: E402
                                                   write_json_atomic)
from scripts.bench.common import matmul_peak, synchronize, training_flops_per_row  # noqa: E402
from sparse_predictor.trainer.cli import resolve_device  # noqa: E402
from sparse_predictor.trainer.labels import DEFAULT_INPUT, MLP_LABELS, LabelSpec, make_label_spec, resolve_input  # noqa: E402
from sparse_predictor.trainer.model import NEGATIVE_WEIGHT_FLOOR, WEIGHT_DECAY, TrainConfig, make_predictor, train_predictor  # noqa: E402
from sparse_predictor.trainer.rows import document_split, load_layer  # noqa: E402

ALL_KINDS = ("att_x", "att_label", "mlp_x", "mlp_label")
BATCH_TOKENS = 16384  # tokens (with padding) generated per writer batch
MASSIVE_DIM = 4.0  # value of input dim 0: without a constant input the bias-free predictor can only cut at 0


# ------------------------------------------------------------------------------------- synthetic data
def write_synthetic_store(data_dir: str | os.PathLike, dims: ModelDims, rows: int, kinds: tuple[str, ...], *,
                          doc_len: int = 512, rank: int = 64, active: float = 0.1, noise: float = 0.3,
                          drift: float = 0.3, random_labels: bool = False, seed: int = 0, link_layers: bool = False,
                          device: str = "cpu") -> None:
    """A collection whose labels follow a known low-rank map of the input, in the SPEC §6 format.

    Per layer l: att_x_l = att_x_{l-1} + drift * noise (a slowly drifting residual stream, DejaVu's premise,
    whose dim 0 starts at MASSIVE_DIM: the predictor has no bias, so a threshold away from 0 needs a constant input),
    mlp_x_l = att_x_l + drift * noise, mlp_label_l (and mlp_gate_l) = standardized (mlp_x_l A B + noise * eps),
    shifted so that a fraction `active` is > 0, att_label_l = softplus of the same map of att_x_l onto the heads.
    random_labels replaces the maps by noise independent of the input. link_layers writes layer 0 only and makes
    the other layers symlinks to it (timing runs over many layers at a fraction of the disk).
    Documents have random lengths in [doc_len / 2, doc_len].
    """
    written = range(1 if link_layers else dims.num_layers)
    gen = torch.Generator(device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    shift = statistics.NormalDist().inv_cdf(1 - active)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    def low_rank(width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return randn(dims.hidden_size, rank) / dims.hidden_size ** 0.5, randn(rank, width) / rank ** 0.5

    maps = {l: {"mlp": low_rank(dims.ffn_dim), "att": low_rank(dims.num_heads)} for l in written}

    def scores(x: torch.Tensor, layer: int, block: str) -> torch.Tensor:
        a, b = maps[layer][block]
        eps = randn(*x.shape[:-1], b.shape[1])
        z = eps if random_labels else (x @ a) @ b + noise * eps
        return z / z.std()

    writer = ActivationWriter(data_dir, dims, written, kinds, capacity=rows, rank=0, world_size=1, manifest_fields={
        "model_name": "synthetic", "model_type": "synthetic",
        "source_data": {"path": f"synthetic (seed {seed})", "sha256": None},
        "synthetic": {"rank": rank, "active": active, "noise": noise, "drift": drift, "doc_len": doc_len,
                      "random_labels": random_labels, "link_layers": link_layers, "seed": seed}})
    docs_per_batch = max(1, BATCH_TOKENS // doc_len)
    doc = 0
    with tqdm(total=rows, desc="writing synthetic rows", unit="row") as bar:
        while not writer.full:
            lengths = torch.randint(doc_len // 2, doc_len + 1, (docs_per_batch,), generator=cpu_gen)
            valid = torch.arange(doc_len)[None, :] < lengths[:, None]  # (B, T)
            writer.begin_batch(list(range(doc, doc + docs_per_batch)),
                               torch.randint(0, 32000, (docs_per_batch, doc_len), generator=cpu_gen),
                               valid.to(device))  # the writer masks the values with it: same device
            x = randn(docs_per_batch, doc_len, dims.hidden_size)  # (B, T, d)
            x[..., 0] = MASSIVE_DIM  # a near-constant dimension, as real residual streams have
            for layer in written:
                x = x + drift * randn(*x.shape) if layer else x
                mlp_x = x + drift * randn(*x.shape)
                values = {"att_x": x, "mlp_x": mlp_x}
                if "att_label" in kinds:
                    values["att_label"] = F.softplus(3 * scores(x, layer, "att"))  # head norms are positive
                if "mlp_label" in kinds or "mlp_gate" in kinds:
                    values["mlp_label"] = values["mlp_gate"] = scores(mlp_x, layer, "mlp") - shift
                for kind in kinds:
                    writer.save(kind, layer, values[kind])
            before = writer.rows_written
            writer.end_batch()
            bar.update(writer.rows_written - before)
            doc += docs_per_batch
    writer.finish("capacity reached")
    for layer in range(1, dims.num_layers) if link_layers else []:
        for kind in kinds:
            os.symlink(activation_file(data_dir, kind, 0).name, activation_file(data_dir, kind, layer))


# ------------------------------------------------------------------------------------- measurements




# ------------------------------------------------------------------------------------- the two variants
def run_fast(args: argparse.Namespace, store: ActivationStore, label: LabelSpec, device: torch.device) -> dict:
    peak, peak_dtype = matmul_peak(device)
    start = time.perf_counter()
    data = load_layer(store, args.block, args.layer, args.input, label, device, args.batch_size)
    load_s = time.perf_counter() - start
    cfg = TrainConfig(D=args.D, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      selection="last", cuda_graphs=not args.no_cuda_graphs)
    result = train_predictor(data, args.block, cfg)
    end_to_end = time.perf_counter() - start
    return {"load_s": load_s, "epoch_s": [h["train_s"] for h in result.history],
            "eval_s": [h["eval_s"] for h in result.history], "end_to_end_s": end_to_end,
            "recall_by_epoch": [h["Recall"] for h in result.history], "final": result.history[-1],
            "rows_train": data.rows_train, "rows_test": data.test.n, "resident_on_device": data.train is not None,
            "d": data.x_file.width, "out": data.out_width, "matmul_peak_flops": peak,
            "matmul_peak_dtype": peak_dtype, "peak_rss_bytes": peak_rss_bytes(), "rss_breakdown": rss_breakdown()}


class BasicDataset(Dataset):
    """The original's dataset: one row at a time, converted with torch.Tensor (float32)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray):
        self.x, self.y, self.rows = x, y, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.Tensor(self.x[self.rows[i]]), torch.Tensor(self.y[self.rows[i]])


def original_evaluate(model: torch.nn.Module, loader: DataLoader, label: LabelSpec, weight_floor: float,
                      device: torch.device) -> dict[str, float]:
    """The original trainer_mlp.evaluate: per-batch means in lists, then Recall = mean(TP) / mean(active)."""
    model.eval()
    lists = {"Recall": [], "True Sparsity": [], "Classifier Sparsity": [], "Loss": []}
    with torch.no_grad():
        for x, y in loader:
            y = label.labels(label.scores(y.to(device))).float()
            probs = model(x.to(device)).sigmoid()
            preds = probs >= 0.5
            miss = (y.int() - preds.int()) > 0
            w = y.sum() / y.numel() + weight_floor
            lists["Loss"].append(F.binary_cross_entropy(probs, y, weight=y * (1 - w) + w).item())
            lists["Recall"].append((y.sum(dim=1) - miss.sum(dim=1).float()).mean().item())
            lists["True Sparsity"].append(y.sum(dim=1).mean().item())
            lists["Classifier Sparsity"].append(preds.sum(dim=1).float().mean().item())
    model.train()
    means = {k: float(np.mean(v)) for k, v in lists.items()}
    means["Recall"] /= means["True Sparsity"]
    return means


def run_reference(args: argparse.Namespace, store: ActivationStore, label: LabelSpec, device: torch.device) -> dict:
    start = time.perf_counter()
    source = resolve_input(args.block, args.input, args.layer)
    x = np.array(store.open(source.kind, source.layer))  # the whole layer in host RAM, as the original
    y = np.array(store.open(label.source_kind, args.layer))
    is_test = document_split(store.document_ids())
    load_s = time.perf_counter() - start
    train_loader = DataLoader(BasicDataset(x, y, np.flatnonzero(~is_test)), args.batch_size, shuffle=True)
    test_loader = DataLoader(BasicDataset(x, y, np.flatnonzero(is_test)), args.batch_size, shuffle=False)
    floor = NEGATIVE_WEIGHT_FLOOR[args.block]
    model = make_predictor(x.shape[1], args.D, y.shape[1], args.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=WEIGHT_DECAY)
    epoch_s, eval_s, recall = [], [], []
    for _ in range(args.ref_epochs):
        epoch_start = time.perf_counter()
        for xb, yb in tqdm(train_loader, desc="reference epoch", leave=False):
            yb = label.labels(label.scores(yb.to(device))).float()
            probs = model(xb.to(device)).sigmoid()
            w = yb.sum() / yb.numel() + floor
            loss = F.binary_cross_entropy(probs, yb, weight=yb * (1 - w) + w)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        synchronize(device)
        epoch_s.append(time.perf_counter() - epoch_start)
        metrics = original_evaluate(model, test_loader, label, floor, device)
        eval_s.append(time.perf_counter() - epoch_start - epoch_s[-1])
        recall.append(metrics["Recall"])
    return {"load_s": load_s, "epoch_s": epoch_s, "eval_s": eval_s, "recall_by_epoch": recall, "final": metrics,
            "peak_rss_bytes": peak_rss_bytes()}


# ------------------------------------------------------------------------------------- orchestration
def compare(args: argparse.Namespace, fast: dict, reference: dict | None) -> dict:
    fast_epoch = statistics.median(fast["epoch_s"])
    flops = training_flops_per_row(fast["d"], args.D, fast["out"]) * fast["rows_train"]
    report = {"fast_s_per_epoch_median": fast_epoch, "fast_s_per_epoch_first": fast["epoch_s"][0],
              "fast_samples_per_s": fast["rows_train"] / fast_epoch,
              "fast_fraction_of_matmul_peak": flops / fast_epoch / fast["matmul_peak_flops"],
              "matmul_peak_tflops": fast["matmul_peak_flops"] / 1e12, "matmul_peak_dtype": fast["matmul_peak_dtype"],
              "fast_load_s": fast["load_s"], "fast_end_to_end_s": fast["end_to_end_s"],
              "fast_peak_rss_gib": fast["peak_rss_bytes"] / 2**30, "fast_rss_breakdown": fast["rss_breakdown"], "fast_final_recall": fast["final"]["Recall"],
              "fast_final_recall_at_k": fast["final"]["Recall@K"], "K": fast["final"]["K"]}
    if reference is not None:
        epochs = len(reference["recall_by_epoch"])
        ref_epoch = statistics.median(reference["epoch_s"])
        report.update({
            "reference_s_per_epoch_median": ref_epoch, "reference_samples_per_s": fast["rows_train"] / ref_epoch,
            "reference_load_s": reference["load_s"], "reference_peak_rss_gib": reference["peak_rss_bytes"] / 2**30,
            "speedup_per_epoch": ref_epoch / fast_epoch,
            "compared_after_epochs": epochs,
            "fast_recall_at_that_epoch": fast["recall_by_epoch"][epochs - 1],
            "reference_recall_at_that_epoch": reference["recall_by_epoch"][-1],
            "recall_difference_points": 100 * (fast["recall_by_epoch"][epochs - 1] - reference["recall_by_epoch"][-1])})
    return report


def run_variant_process(variant: str, argv: list[str], data_dir: Path, out: Path) -> dict:
    """Run one variant in a fresh process (its own peak RSS); its log goes to <out>/<variant>.log."""
    result = out / f"{variant}.json"
    child = [*argv, "--variant", variant, "--data-dir", str(data_dir), "--result", str(result)]
    with open(out / f"{variant}.log", "w") as log:
        code = subprocess.run([sys.executable, __file__, *child], stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{variant} variant failed (exit {code}); see {out / f'{variant}.log'}")
    with open(result) as f:
        return json.load(f)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/bench_predictor_training", help="bench.json and logs (default %(default)s)")
    p.add_argument("--rows", type=int, default=400_000, help="collected rows (default %(default)s, the original's N)")
    p.add_argument("--hidden", type=int, default=3072, help="d (default %(default)s, Llama-3.2-3B)")
    p.add_argument("--ffn", type=int, default=8192, help="MLP width (default %(default)s)")
    p.add_argument("--heads", type=int, default=24, help="query heads (default %(default)s)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads, recorded only (default %(default)s)")
    p.add_argument("--layers", type=int, default=1, help="layers in the manifest (default %(default)s)")
    p.add_argument("--link-layers", action="store_true", help="write layer 0 only; other layers are symlinks to it")
    p.add_argument("--kinds", default=None, help="comma list of kinds to write (mlp_gate included), or 'all' for "
                                                 f"{', '.join(ALL_KINDS)}; default what --block needs")
    p.add_argument("--doc-len", type=int, default=512, help="longest synthetic document (default %(default)s)")
    p.add_argument("--rank", type=int, default=64, help="rank of the map from input to labels (default %(default)s)")
    p.add_argument("--active", type=float, default=0.1, help="MLP fraction with label > 0 (default %(default)s)")
    p.add_argument("--noise", type=float, default=0.3, help="label noise, relative to the map (default %(default)s)")
    p.add_argument("--drift", type=float, default=0.3, help="residual-stream change per step (default %(default)s)")
    p.add_argument("--block", choices=("mlp", "att"), default="mlp", help="which predictor (default %(default)s)")
    p.add_argument("--layer", type=int, default=0, help="layer trained (default %(default)s)")
    p.add_argument("--input", default=None, help="same | lookahead | from:J (default: the trainer's for --block)")
    p.add_argument("--label", choices=MLP_LABELS, default="relu", help="MLP label (default %(default)s; att: topk)")
    p.add_argument("--k", type=float, default=None, help="topk fraction (att default 0.3, as run_c4_att.sh)")
    p.add_argument("--threshold", type=float, default=None, help="for --label threshold")
    p.add_argument("--D", type=int, default=1000, help="predictor width (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=1024, help="batch size (default %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="fast trainer epochs, no early stop (default %(default)s)")
    p.add_argument("--ref-epochs", type=int, default=2, help="reference epochs (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of data and training (default %(default)s)")
    p.add_argument("--device", default=None, help="default cuda:0 if available, else cpu")
    p.add_argument("--data-dir", default=None, help="use this collection if it exists, else write it here and keep it; "
                                                     "default a temporary directory, removed at the end")
    p.add_argument("--tmp-dir", default=None, help="parent of the temporary data directory (default: system temp)")
    p.add_argument("--generate-only", action="store_true", help="write the data (needs --data-dir) and stop")
    p.add_argument("--skip-reference", action="store_true", help="time the fast trainer only")
    p.add_argument("--no-cuda-graphs", action="store_true", help="fast trainer without CUDA-graph replay of its steps")
    p.add_argument("--variant", choices=("fast", "reference"), help=argparse.SUPPRESS)  # internal: one child process
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ref_epochs > args.epochs and not args.skip_reference:
        p.error("--ref-epochs must not exceed --epochs: Recall is compared after the same number of epochs")
    args.input = args.input or DEFAULT_INPUT[args.block]
    if args.block == "att":
        args.label, args.k = "topk", 0.3 if args.k is None else args.k
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.variant:
        store = ActivationStore(args.data_dir)
        label = make_label_spec(args.block, args.label, args.k, args.threshold, store.dims.width(
            "att_label" if args.block == "att" else "mlp_label"))
        run = run_fast if args.variant == "fast" else run_reference
        write_json_atomic(args.result, run(args, store, label, device))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.generate_only and args.data_dir is None:
        raise SystemExit("--generate-only needs --data-dir")
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="bench_predictor_", dir=args.tmp_dir))
    try:
        generate_s = None
        if not (data_dir / "manifest.json").is_file():
            source = resolve_input(args.block, args.input, args.layer)
            label_kind = "att_label" if args.block == "att" else "mlp_gate" if args.label == "gate" else "mlp_label"
            kinds = ALL_KINDS if args.kinds == "all" else tuple(args.kinds.split(",")) if args.kinds else \
                tuple(dict.fromkeys((source.kind, label_kind)))
            dims = ModelDims(args.hidden, args.ffn, args.heads, args.kv_heads, args.layers)
            start = time.perf_counter()
            write_synthetic_store(data_dir, dims, args.rows, kinds, doc_len=args.doc_len, rank=args.rank,
                                  active=args.active, noise=args.noise, drift=args.drift, seed=args.seed,
                                  link_layers=args.link_layers, device=str(device))
            generate_s = time.perf_counter() - start
            if device.type == "cuda":
                torch.cuda.empty_cache()  # leave the GPU's memory to the variants' processes
            print(f"wrote {args.rows} rows x {args.layers} layers of {kinds} to {data_dir} in {generate_s:.1f} s")
        if args.generate_only:
            return
        fast = run_variant_process("fast", argv, data_dir, out)
        reference = None if args.skip_reference else run_variant_process("reference", argv, data_dir, out)
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir)
    report = compare(args, fast, reference)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    record = {"report": report, "fast": fast, "reference": reference, "device": device_name,
              "generate_s": generate_s, "settings": vars(args), "provenance": base_manifest()}
    write_json_atomic(out / "bench.json", record)
    print(f"device: {device_name}")
    for key, value in report.items():
        print(f"  {key:34s} {value:.4g}" if isinstance(value, float) else f"  {key:34s} {value}")
    print(f"wrote {out / 'bench.json'} (logs: {out}/fast.log, {out}/reference.log)")


if __name__ == "__main__":
    main()
