"""What the benchmarks share: real model shapes with random weights, their FLOPs, the measured matmul peak, and
echo requests from the bundled C4 sample. Every floor a benchmark prints divides these FLOPs by that peak."""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import AutoTokenizer, LlamaConfig, PretrainedConfig

from Decentralized_FM_alpha import convert_llama_checkpoint
from Decentralized_FM_alpha.task_datasets.request_files import make_echo_request, write_requests
from Decentralized_FM_alpha.utils.row_files import WRITE_THREADS
from tests.helpers_tokenizer import build_test_tokenizer

REPO = Path(__file__).resolve().parents[2]

CONFIG = REPO / "tests/fixtures/llama-3.2-3b-config.json"
DISK_BLOCK = 64 << 20


def bench_config(args: argparse.Namespace) -> LlamaConfig:
    values = json.loads(CONFIG.read_text())
    values.update(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.ffn,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                  head_dim=args.hidden // args.heads)
    return LlamaConfig(**values)


def build_model(args: argparse.Namespace, work: Path, device: torch.device, dtype: torch.dtype) -> Path:
    """Random weights at the configured shape, saved as HF and converted (SPEC §3); returns the converted dir."""
    return build_converted(bench_config(args), work, device, dtype, args.seed)


def build_converted(config: PretrainedConfig, work: Path, device: torch.device, dtype: torch.dtype,
                    seed: int) -> Path:
    """Random weights of `config`'s architecture (its `architectures` class, e.g. a Llama or Qwen2 config), saved as
    HF with the test tokenizer and converted (SPEC §3); returns the converted dir."""
    hf_dir, converted = save_random_hf(config, work / "hf", device, dtype, seed), work / "converted"
    convert_llama_checkpoint.main(["--model-name", str(hf_dir), "--save-path", str(converted)])
    shutil.rmtree(hf_dir)
    return converted


def save_random_hf(config: PretrainedConfig, hf_dir: Path, device: torch.device, dtype: torch.dtype,
                   seed: int) -> Path:
    """Random weights of `config`'s architecture (its `architectures` class; norms perturbed, as gpu_check_models
    does), saved as a Hugging Face directory with the test tokenizer (trained beside it); returns hf_dir."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(transformers, config.architectures[0])(config).to(dtype).eval()
        for name, p in model.named_parameters():  # norms start at 1
            if "norm" in name:
                p.data.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(hf_dir)
    tokenizer = build_test_tokenizer(hf_dir.parent / f"{hf_dir.name}-tokenizer")
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(hf_dir)
    del model
    free_device_memory(device)
    return hf_dir


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def forward_flops(config: LlamaConfig, doc_lengths: list[int], with_lm_head: bool) -> int:
    """Matmul FLOPs of one causal forward pass over the documents: 2 x weights per token, plus attention
    (q k^T and the weighted sum: 4 x heads x head_dim per key a query attends to), plus the LM head if run."""
    d, hd, ffn = config.hidden_size, config.head_dim, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    per_token = 2 * (d * heads * hd * 2 + 2 * d * kv * hd + 3 * d * ffn)
    tokens = sum(doc_lengths)
    attended = sum(n * (n + 1) // 2 for n in doc_lengths)
    flops = config.num_hidden_layers * (per_token * tokens + 4 * heads * hd * attended)
    return flops + (2 * d * config.vocab_size * tokens if with_lm_head else 0)


def doc_lengths(requests: Path, model_dir: Path, rows: int, max_seq_len: int) -> list[int]:
    """Tokens of each document, as collection takes them: truncated to max_seq_len, cut at `rows` in total."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths, total = [], 0
    with open(requests, encoding="utf-8") as f:
        for line in f:
            n = min(len(tokenizer(json.loads(line)["prompt"])["input_ids"]), max_seq_len)
            lengths.append(min(n, rows - total))
            total += lengths[-1]
            if total >= rows:
                break
    return lengths


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Measured FLOP/s of a large square matmul in the dtype the trainer's matmuls use on this device."""
    cuda = device.type == "cuda"
    n, dtype, iters = (8192, torch.bfloat16, 50) if cuda else (1024, torch.float32, 5)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    synchronize(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - start), str(dtype).replace("torch.", "")


def training_flops_per_row(d: int, D: int, out: int) -> int:
    """Forward 2(dD + D out); backward: grad of W2 and of the hidden 4 D out, grad of W1 2 dD (x needs none)."""
    return 4 * d * D + 6 * D * out


def write_c4_requests(path: Path, n_docs: int, max_chars: int) -> None:
    """Echo requests (the getdata format) for the first documents of the bundled C4 train sample, cut to max_chars."""
    with open(REPO / "data/samples/c4_train_1k.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"][:max_chars] for line, _ in zip(f, range(n_docs))]
    write_requests(path, [make_echo_request(t) for t in texts])


def timed_writes(directory: Path, blocks: int, streams: int) -> float:
    """Seconds to pwrite `blocks` 64 MiB blocks of random bytes, dealt over `streams` threads each writing its own
    new file, then fdatasync every file; the files are deleted."""
    paths = [directory / f"disk_test_{i}.bin" for i in range(streams)]
    fds = [os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for path in paths]

    def write(stream: int) -> None:
        block = bytearray(os.urandom(DISK_BLOCK))
        for n, i in enumerate(range(stream, blocks, streams)):
            block[:8] = i.to_bytes(8, "little")  # no two blocks alike (storage that deduplicates cannot cheat)
            os.pwrite(fds[stream], block, n * DISK_BLOCK)
        os.fdatasync(fds[stream])

    try:
        with ThreadPoolExecutor(streams) as pool:
            start = time.perf_counter()
            list(pool.map(write, range(streams)))
            return time.perf_counter() - start
    finally:
        for fd, path in zip(fds, paths):
            os.close(fd)
            path.unlink()


def disk_bandwidth(directory: Path, gigabytes: float) -> dict:
    """Sequential write bandwidth, the best of one stream and of as many parallel streams as the async collection
    writer has threads (one stream alone can under-state what the disk takes, and the writer writes in parallel)."""
    blocks = max(1, int(gigabytes * 2**30 // DISK_BLOCK))
    seconds = {streams: timed_writes(directory, blocks, streams) for streams in (1, WRITE_THREADS)}
    best = min(seconds, key=seconds.get)
    return {"bytes": blocks * DISK_BLOCK, "seconds": seconds[best], "bytes_per_s": blocks * DISK_BLOCK / seconds[best],
            "streams": best, "bytes_per_s_by_streams": {n: blocks * DISK_BLOCK / t for n, t in seconds.items()},
            "method": f"pwrite of 64 MiB blocks into new files, then fdatasync (like dd bs=64M conv=fdatasync), with "
                      f"1 and {WRITE_THREADS} streams; the faster is the bandwidth"}


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int, graph: bool) -> float:
    """Median seconds of fn: on CUDA the replay of a captured graph between CUDA events (after eager warm-up, which
    also autotunes and compiles the kernels), on the CPU a host clock."""
    if device.type != "cuda":
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    run = fn
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        run = captured.replay
    for _ in range(3):
        run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, reps: int) -> float:
    """Bytes read + written per second of a large device copy."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, reps, graph=False)
    return 2 * n / seconds
