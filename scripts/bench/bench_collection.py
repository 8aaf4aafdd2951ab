"""Benchmark collection and online predictor training at Llama-3.2-3B shapes (random weights), in one run.

Builds the Llama-3.2-3B architecture (tests/fixtures/llama-3.2-3b-config.json, depth and widths from the flags) with
random weights, saves and converts it with the project's converter (as scripts/bench/gpu_check_models.py does), writes echo
requests from the bundled C4 train sample, then measures in one process, each figure next to its floor:
  disk        sequential write bandwidth of --work (--disk-test-gb in 64 MiB pwrites, then fdatasync; the best of
              one stream and of the async writer's thread count, each into its own file)
  matmul      peak FLOP/s of a large matmul in the model's dtype (the floors divide FLOPs by it)
  inference   plain inference (runner --model-type llama): tokens/s vs forward FLOPs (LM head included) / peak
  collection  the runner's llama-save collection with --collect-writer sync (--sync-rows) and async
              (--compare-rows): tokens/s and MB/s, as a fraction of the disk bandwidth; floor max(forward FLOPs /
              peak, bytes / disk bandwidth)
  compare     on the async collection's rows (--compare-rows, a row count whose collection fits the disk: 804 KB
              a token at 3B, so 400,000 rows would be 322 GB): every layer's MLP and attention predictors from the
              mmaps (the mains) and online (sparse_predictor/train_online.py), same documents, flags and seed;
              held-out Recall@K of each predictor and the largest difference
  online      every layer's MLP and attention predictors online at --rows (default 400,000, DejaVu's N): end to end
              (model load, forward passes, training) vs the floor (forward + training FLOPs) / peak; no file written
Writes <out>/bench_collection.json and prints the ratios last.

GPU (one H200: about 9 minutes, ~45 GB of disk at the peak; docs/results/bench_collection_h200/ has a run):
    python scripts/bench/bench_collection.py --out out/bench_collection
CPU smoke (seconds):
    python scripts/bench/bench_collection.py --device cpu --layers 2 --hidden 64 --ffn 128 --heads 4 --kv-heads 2 \\
        --vocab 512 --rows 3000 --compare-rows 2000 --sync-rows 1000 --docs 40 --inference-docs 8 --D 16 \\
        --epochs 2 --disk-test-gb 0.05 --out out/bench_collection_cpu
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from Decentralized_FM_alpha import dist_inference_runner  # noqa: E402
from Decentralized_FM_alpha.utils.activation_store import ActivationStore  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import base_manifest, write_json_atomic  # noqa: E402
from scripts.bench.common import (CONFIG, bench_config, build_model, disk_bandwidth, doc_lengths, forward_flops,  # noqa: E402
                                  free_device_memory, matmul_peak, training_flops_per_row, write_c4_requests)
from sparse_predictor import main_att_llama, main_mlp_llama, train_online  # noqa: E402
from sparse_predictor.trainer.cli import resolve_device  # noqa: E402

# run in this order; compare last: the async collection waits on disk for it, and it matters least if time runs out
STAGES = ("disk", "inference", "collection", "online", "compare")
ONLINE_GOAL_S = 300  # the goal: all predictors of Llama 3.2 3B in 5 minutes on one H100
GOAL_DISK_FRACTION = 0.8
GOAL_RECALL_POINTS = 0.5


# ------------------------------------------------------------------------------------- the model



# ------------------------------------------------------------------------------------- measurements
def run_runner(argv: list[str], device: torch.device) -> dict:
    """One in-process runner run; seconds from its manifest (after the model is loaded, until its files are final)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dist_inference_runner.main(argv)
    out = Path(argv[argv.index("--output-path") + 1])
    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    free_device_memory(device)
    return {"seconds": manifest["seconds"],
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def inference_timing(common: list[str], requests: Path, work: Path, device: torch.device) -> dict:
    out = work / "inference.jsonl"
    run = common + ["--model-type", "llama", "--infer-data", str(requests), "--output-path", str(out)]
    run_runner(run + ["--num-iters", "2"], device)  # warm-up: kernels, allocator
    timing = run_runner(run, device)
    tokens = sum(len(json.loads(line)["result"]["choices"][0]["logprobs"]["token_logprobs"]) for line in open(out))
    return {**timing, "tokens": tokens, "tokens_per_s": tokens / timing["seconds"]}


def collection_timing(common: list[str], requests: Path, data: Path, rows: int, writer: str,
                      device: torch.device) -> dict:
    timing = run_runner(common + ["--model-type", "llama-save", "--infer-data", str(requests), "--output-path",
                                  str(data.with_suffix(".jsonl")), "--data-path", str(data), "--collect-tokens",
                                  str(rows), "--collect-writer", writer], device)
    store = ActivationStore(data)
    row_bytes = 2 * sum(store.dims.width(k) for k in store.kinds) * store.num_layers + 12  # + token index
    written = store.rows * row_bytes
    return {**timing, "writer": writer, "rows": store.rows, "bytes_per_row": row_bytes, "bytes": written,
            "tokens_per_s": store.rows / timing["seconds"], "bytes_per_s": written / timing["seconds"]}


def predictor_flags(args: argparse.Namespace) -> list[str]:
    return ["--D", str(args.D), "--epochs", str(args.epochs), "--batch_size", str(args.batch_size),
            "--seed", str(args.seed), "--selection", args.selection, "--device", str(args.device_obj)]


def mmap_training(args: argparse.Namespace, data: Path, out: Path) -> dict:
    start = time.perf_counter()
    for main in (main_mlp_llama, main_att_llama):
        main.main(["--data-dir", str(data), "--out-dir", str(out), "--L", "all", "--input", "lookahead",
                   *predictor_flags(args)])
    free_device_memory(args.device_obj)
    return {"seconds": time.perf_counter() - start, "recall_at_k": predictor_results(out, args.layers)[0]}


def online_training(args: argparse.Namespace, converted: Path, requests: Path, rows: int, out: Path) -> dict:
    """train_online.py in its own process (its peak host RAM and GPU memory are its own); log in --out."""
    flags = ["--model-name", str(converted), "--infer-data", str(requests), "--out-dir", str(out), "--collect-tokens",
             str(rows), "--dtype", args.dtype, "--max-seq-len", str(args.max_seq_len), "--token-micro-batch-size",
             str(args.batch), "--mlp-input", "lookahead", "--att-input", "lookahead", *predictor_flags(args)]
    if args.memory_budget_gb is not None:
        flags += ["--memory-budget-gb", str(args.memory_budget_gb)]
    log = Path(args.out) / f"online_{rows}.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        command = [sys.executable, str(REPO / "sparse_predictor" / "train_online.py"), *flags]
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO)}).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"train_online.py failed (exit {code}); see {log}")
    manifest = json.loads((out / train_online.MANIFEST).read_text())
    peak = manifest["peak_device_bytes"]
    recall, epochs = predictor_results(out, args.layers)
    return {"seconds": seconds, "rows": manifest["rows"], "rows_train": manifest["rows_train"],
            "rows_test": manifest["rows_test"], "groups": manifest["groups"], "log": str(log),
            "peak_gpu_gib": peak / 2**30 if peak is not None else None,
            "peak_host_rss_gib": manifest["peak_host_rss_bytes"] / 2**30,
            "activation_files_written": len(list(out.glob("*.mmap"))), "recall_at_k": recall, "epochs_run": epochs}


def predictor_results(out: Path, layers: int) -> tuple[dict[str, float], dict[str, int]]:
    """Every layer's MLP and attention predictor JSON, read once: (held-out Recall@K, epochs run) by name."""
    records = {f"{b}{l}": json.loads((out / f"{b}_layer{l}.json").read_text())
               for b in ("mlp", "att") for l in range(layers)}
    return ({k: r["Recall@K"] for k, r in records.items()}, {k: r["epochs_run"] for k, r in records.items()})


def training_flops(config: LlamaConfig, D: int, rows_train: int, rows_test: int, epochs: dict[str, int]) -> int:
    """Forward + backward of every predictor on its training rows for the epochs it ran, plus the held-out
    evaluations (before training, after each epoch, once more for the kept predictor)."""
    d, total = config.hidden_size, 0
    for name, n in epochs.items():
        out = config.intermediate_size if name.startswith("mlp") else config.num_attention_heads
        total += training_flops_per_row(d, D, out) * rows_train * n + 2 * (d * D + D * out) * rows_test * (n + 2)
    return total


# ------------------------------------------------------------------------------------- the run
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = json.loads(CONFIG.read_text())
    p.add_argument("--out", default="out/bench_collection", help="bench_collection.json (default %(default)s)")
    p.add_argument("--work", default=str(REPO / "data" / "bench_collection"),
                   help="model, requests, collections and the disk test: on the disk being measured; removed at "
                        "the end (default %(default)s)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)} (default all)")
    p.add_argument("--layers", type=int, default=base["num_hidden_layers"], help="layers (default %(default)s)")
    p.add_argument("--hidden", type=int, default=base["hidden_size"], help="d (default %(default)s)")
    p.add_argument("--ffn", type=int, default=base["intermediate_size"], help="MLP width (default %(default)s)")
    p.add_argument("--heads", type=int, default=base["num_attention_heads"], help="query heads (default %(default)s)")
    p.add_argument("--kv-heads", type=int, default=base["num_key_value_heads"], help="KV heads (default %(default)s)")
    p.add_argument("--vocab", type=int, default=base["vocab_size"], help="vocabulary (default %(default)s; the test "
                                                                          "tokenizer uses the first 512 ids)")
    p.add_argument("--docs", type=int, default=1000, help="documents of data/samples/c4_train_1k.jsonl written as "
                                                          "requests (default %(default)s: ~838k tokens at 2048)")
    p.add_argument("--inference-docs", type=int, default=64, help="documents of the inference timing (default "
                                                                   "%(default)s)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="longest document in tokens (default %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="--token-micro-batch-size of every run (default %(default)s)")
    p.add_argument("--rows", type=int, default=400_000, help="rows of the online run (default %(default)s)")
    p.add_argument("--compare-rows", type=int, default=40_000,
                   help="rows of the async collection and of the mmap vs online comparison; at 3B shapes 804 KB a "
                        "row, so the default is 32 GB (default %(default)s)")
    p.add_argument("--sync-rows", type=int, default=8_000, help="rows of the sync-writer collection (default "
                                                                 "%(default)s: 6.4 GB)")
    p.add_argument("--disk-test-gb", type=float, default=24.0,
                   help="bytes of the disk test, near what the async collection writes: on the H200 node a 4 GB test "
                        "read 1.36-1.55 GB/s and a 24 GB one 2.00 GB/s, so a short test flatters the collection "
                        "(default %(default)s)")
    p.add_argument("--D", type=int, default=1000, help="predictor width (default %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="predictor epochs (default %(default)s)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1024, help="training batch (default "
                                                                                   "%(default)s)")
    p.add_argument("--selection", choices=("last", "original"), default="last",
                   help="last: every predictor runs all --epochs (the timing's worst case); original: DejaVu's early "
                        "stop (default %(default)s)")
    p.add_argument("--memory-budget-gb", type=float, default=None, help="online: train_online.py's budget (default "
                                                                         "its own)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 on CUDA, else fp32")
    p.add_argument("--seed", type=int, default=0, help="weights and predictors (default %(default)s)")
    p.add_argument("--device", default=None, help="default cuda:0 if available, else cpu")
    p.add_argument("--keep-work", action="store_true", help="do not remove --work at the end")
    args = p.parse_args(argv)
    args.device_obj = resolve_device(args.device)
    args.dtype = args.dtype or ("bf16" if args.device_obj.type == "cuda" else "fp32")
    args.stage_list = [s.strip() for s in args.stages.split(",") if s.strip()]
    if set(args.stage_list) - set(STAGES):
        p.error(f"--stages: unknown {sorted(set(args.stage_list) - set(STAGES))}")
    if "compare" in args.stage_list and "collection" not in args.stage_list:
        p.error("--stages compare needs collection (it trains from the async collection)")
    return args


def floor_gap(measured_s: float, floor_s: float) -> dict:
    return {"seconds": measured_s, "floor_s": floor_s, "fraction_of_floor_speed": floor_s / measured_s,
            "gap_x": measured_s / floor_s}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = args.device_obj, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    report: dict = {"device": name, "settings": {k: v for k, v in vars(args).items() if k != "device_obj"},
                    "stage_seconds": {}, "provenance": base_manifest(), "complete": False}

    def save() -> None:  # after every stage: a run stopped by a time limit keeps what it measured
        report["total_seconds"] = time.perf_counter() - started
        report["ratios"] = ratios(report)
        write_json_atomic(out / "bench_collection.json", report)

    peak, peak_dtype = matmul_peak(device)
    report["matmul_peak"] = {"flops_per_s": peak, "dtype": peak_dtype}
    config = bench_config(args)
    try:
        t = time.perf_counter()
        converted = work / "converted"
        if not same_model(converted, config):
            converted = build_model(args, work, device, dtype)
        report["stage_seconds"]["model"] = time.perf_counter() - t
        requests, inference_requests = work / "requests.jsonl", work / "inference_requests.jsonl"
        write_c4_requests(requests, args.docs, 1_000_000)
        write_c4_requests(inference_requests, args.inference_docs, 1_000_000)
        common = ["--model-name", str(converted), "--dtype", args.dtype, "--use-cuda", str(device.type == "cuda"),
                  "--token-micro-batch-size", str(args.batch), "--max-seq-len", str(args.max_seq_len)]
        collection = work / "collection_async"
        for stage in [s for s in STAGES if s in args.stage_list]:
            t = time.perf_counter()
            if stage == "disk":
                report["disk"] = disk_bandwidth(work, args.disk_test_gb)
            elif stage == "inference":
                timing = inference_timing(common, inference_requests, work, device)
                lengths = doc_lengths(inference_requests, converted, 10**12, args.max_seq_len)
                floor = forward_flops(config, lengths, with_lm_head=True) / peak
                report["inference"] = {**timing, **floor_gap(timing["seconds"], floor),
                                       "floor_tokens_per_s": sum(lengths) / floor}
            elif stage == "collection":
                for writer, rows, data in (("sync", args.sync_rows, work / "collection_sync"),
                                           ("async", args.compare_rows, collection)):
                    report[f"collection_{writer}"] = collection_report(args, config, common, requests, converted,
                                                                       data, rows, writer, report.get("disk"), peak)
                    if writer == "sync":
                        shutil.rmtree(data)
                    save()
            elif stage == "online":
                report["online"] = online_report(args, config, converted, requests, work, peak)
            elif stage == "compare":
                report["compare"] = compare_report(args, converted, requests, collection, work)
            report["stage_seconds"][stage] = time.perf_counter() - t
            save()
        report["complete"] = True
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    save()
    print_report(report, out)
    return report


def same_model(converted: Path, config: LlamaConfig) -> bool:
    """A converted model left by an earlier run (--keep-work) at the same shape is reused."""
    path = converted / "config.json"
    if not (path.is_file() and (converted / "pytorch_lm_head.pt").is_file()):
        return False
    saved = json.loads(path.read_text())
    return all(saved.get(k) == getattr(config, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                             "num_attention_heads", "num_key_value_heads",
                                                             "vocab_size"))


def collection_report(args: argparse.Namespace, config: LlamaConfig, common: list[str], requests: Path,
                      converted: Path, data: Path, rows: int, writer: str, disk: dict | None, peak: float) -> dict:
    timing = collection_timing(common, requests, data, rows, writer, args.device_obj)
    lengths = doc_lengths(requests, converted, timing["rows"], args.max_seq_len)
    compute_floor = forward_flops(config, lengths, with_lm_head=True) / peak
    disk_floor = timing["bytes"] / disk["bytes_per_s"] if disk else None
    return {**timing, **floor_gap(timing["seconds"], max(compute_floor, disk_floor or 0)),
            "compute_floor_s": compute_floor, "disk_floor_s": disk_floor,
            "fraction_of_disk_bandwidth": timing["bytes_per_s"] / disk["bytes_per_s"] if disk else None}


def online_report(args: argparse.Namespace, config: LlamaConfig, converted: Path, requests: Path, work: Path,
                  peak: float) -> dict:
    online = online_training(args, converted, requests, args.rows, work / "predictors_online")
    lengths = doc_lengths(requests, converted, online["rows"], args.max_seq_len)
    fwd = sum(forward_flops(bench_config(argparse.Namespace(**{**vars(args), "layers": g["layers"][-1] + 1})),
                            lengths, with_lm_head=False) for g in online["groups"])
    train = training_flops(config, args.D, online["rows_train"], online["rows_test"], online["epochs_run"])
    return {**online, **floor_gap(online["seconds"], (fwd + train) / peak), "forward_floor_s": fwd / peak,
            "training_floor_s": train / peak, "goal_s": ONLINE_GOAL_S}


def compare_report(args: argparse.Namespace, converted: Path, requests: Path, collection: Path, work: Path) -> dict:
    """Both paths on the async collection's rows: the mains from its mmaps, then online on the same documents."""
    mmap = mmap_training(args, collection, work / "predictors_mmap")
    shutil.rmtree(collection)
    online = online_training(args, converted, requests, args.compare_rows, work / "predictors_online_compare")
    diffs = {k: 100 * (online["recall_at_k"][k] - mmap["recall_at_k"][k]) for k in mmap["recall_at_k"]}
    return {"rows": args.compare_rows, "mmap": mmap, "online": online, "recall_at_k_difference_points": diffs,
            "max_abs_difference_points": max(abs(v) for v in diffs.values()),
            "mean_difference_points": sum(diffs.values()) / len(diffs),
            "note": f"on {args.compare_rows} rows, not {args.rows}: a collection of {args.rows} rows (804 KB a row at "
                    f"3B shapes) does not fit a 64 GiB disk"}


def ratios(report: dict) -> dict:
    r = {}
    if "inference" in report:
        r["inference tokens/s / floor"] = report["inference"]["fraction_of_floor_speed"]
    for writer in ("sync", "async"):
        c = report.get(f"collection_{writer}")
        if c and c["fraction_of_disk_bandwidth"] is not None:
            r[f"collection {writer}: MB/s / disk bandwidth (goal async >= {GOAL_DISK_FRACTION})"] = \
                c["fraction_of_disk_bandwidth"]
    if "collection_sync" in report and "collection_async" in report:
        r["collection tokens/s async / sync"] = (report["collection_async"]["tokens_per_s"] /
                                                 report["collection_sync"]["tokens_per_s"])
    if "inference" in report and "collection_async" in report:
        r["collection async tokens/s / plain inference"] = (report["collection_async"]["tokens_per_s"] /
                                                            report["inference"]["tokens_per_s"])
    if "compare" in report:
        r[f"online - mmap Recall@K, max |points| (goal <= {GOAL_RECALL_POINTS})"] = \
            report["compare"]["max_abs_difference_points"]
        if "collection_async" in report:
            r["online / (async collection + mmap training) seconds, compare rows"] = (
                report["compare"]["online"]["seconds"] /
                (report["collection_async"]["seconds"] + report["compare"]["mmap"]["seconds"]))
    if "online" in report:
        r[f"online end-to-end seconds / {ONLINE_GOAL_S} s goal"] = report["online"]["seconds"] / ONLINE_GOAL_S
        r["online end-to-end seconds / floor"] = report["online"]["gap_x"]
    return r


def print_report(report: dict, out: Path) -> None:
    print(f"device: {report['device']}; matmul peak {report['matmul_peak']['flops_per_s'] / 1e12:.1f} TFLOP/s "
          f"({report['matmul_peak']['dtype']})")
    if "disk" in report:
        d = report["disk"]
        streams = ", ".join(f"{n} stream(s) {v / 1e9:.2f}" for n, v in d.get("bytes_per_s_by_streams", {}).items())
        print(f"disk: {d['bytes_per_s'] / 1e9:.2f} GB/s sequential write ({d['bytes'] / 1e9:.1f} GB, fdatasync; "
              f"{streams} GB/s)")
    if "inference" in report:
        i = report["inference"]
        print(f"inference: {i['tokens']} tokens, {i['tokens_per_s']:.0f} tokens/s (floor {i['floor_tokens_per_s']:.0f}:"
              f" forward FLOPs / peak; {i['gap_x']:.1f}x from it)")
    for writer in ("sync", "async"):
        c = report.get(f"collection_{writer}")
        if c:
            disk = (f", {c['fraction_of_disk_bandwidth']:.0%} of the disk; floor {c['floor_s']:.3g} s = max(compute "
                    f"{c['compute_floor_s']:.3g} s, disk {c['disk_floor_s']:.3g} s), {c['gap_x']:.2f}x from it"
                    if c["disk_floor_s"] else "")
            print(f"collection {writer}: {c['rows']} rows in {c['seconds']:.1f} s = {c['tokens_per_s']:.0f} tokens/s, "
                  f"{c['bytes_per_s'] / 1e6:.0f} MB/s{disk}")
    if "compare" in report:
        c = report["compare"]
        print(f"compare on {c['rows']} rows: mmap training {c['mmap']['seconds']:.1f} s (after its collection), "
              f"online {c['online']['seconds']:.1f} s end to end; Recall@K online - mmap: max |"
              f"{c['max_abs_difference_points']:.3f}| points, mean {c['mean_difference_points']:+.3f}")
    if "online" in report:
        o = report["online"]
        peak = f"{o['peak_gpu_gib']:.1f} GiB" if o["peak_gpu_gib"] is not None else "n/a"
        print(f"online: {o['rows']} rows, {len(o['groups'])} forward passes, {o['seconds']:.1f} s end to end "
              f"(floor {o['floor_s']:.3g} s: forward {o['forward_floor_s']:.3g} + training "
              f"{o['training_floor_s']:.3g}; {o['gap_x']:.1f}x from it), {o['activation_files_written']} activation "
              f"files, peak GPU {peak}, peak host RSS {o['peak_host_rss_gib']:.1f} GiB")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["stage_seconds"].items())
          + f"; total {report['total_seconds']:.0f}")
    print("ratios:")
    for key, value in report["ratios"].items():
        print(f"  {key:78s} {value:.4g}")
    print(f"wrote {out / 'bench_collection.json'}")


if __name__ == "__main__":
    main()
