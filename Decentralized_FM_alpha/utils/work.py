"""The work a process does, counted where it is done, so that a stage's time can stand beside its floor.

Three counters of the work the stage's method asks for (the predictors it trains, the forward passes it runs, the
rows it reads), each counted as the least the hardware must do for it, never the overheads of this implementation
(launches, padding, casts, idle time):
  flops         matrix-multiply FLOPs: the model's forward passes over real (unpadded) tokens, the predictors'
                training steps (forward and backward, count_training_step) and held-out evaluations (2 x rows x
                parameters);
  device_bytes  device-memory bytes that cannot be avoided: AdamW reading and writing each predictor weight and its
                two moments once per step (OPTIMIZER_BYTES_PER_PARAMETER);
  file_bytes    bytes read from or written to collected activation files and converted weights, as read: a file
                that a stage reads twice (the summary's input variants each read their layer's label file)
                counts twice, so this bound is the floor of the reads as the stage makes them.
The floor of a stage is max(flops / matmul peak, device_bytes / device bandwidth, file_bytes / file bandwidth), each
rate measured on the machine (scripts/bench/bench_study.py). With DEJAVU_WORK_LOG set, the process appends its totals
and its peak of allocated GPU memory as one JSON line to that file when it exits; run_study.py sets it per stage and
sums the lines of every process the stage ran.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

WORK_LOG = "DEJAVU_WORK_LOG"
OPTIMIZER_BYTES_PER_PARAMETER = 24  # float32 weight, first and second moment: each read once and written once


@dataclass
class Work:
    flops: float = 0.0
    device_bytes: float = 0.0
    file_bytes: float = 0.0

    def add(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.device_bytes + other.device_bytes,
                    self.file_bytes + other.file_bytes)


COUNTED = Work()


def count(flops: float = 0.0, device_bytes: float = 0.0, file_bytes: float = 0.0) -> None:
    COUNTED.flops += flops
    COUNTED.device_bytes += device_bytes
    COUNTED.file_bytes += file_bytes


def count_training_step(first: int, second: int, rows: int) -> None:
    """One optimizer step of low-rank predictors, Linear(d, D) -> Linear(D, out), on a batch of `rows` rows each;
    `first` and `second`: the weights of the two layers, summed over the predictors. Per row: forward 2 (first +
    second), backward 2 first (weight gradient; the input needs none) + 4 second (weight and hidden gradients)."""
    count(flops=rows * (4 * first + 6 * second), device_bytes=OPTIMIZER_BYTES_PER_PARAMETER * (first + second))


def count_evaluation(parameters: int, rows: int) -> None:
    count(flops=2 * rows * parameters)


def peak_gpu_bytes() -> int | None:
    """The process's peak of allocated GPU memory, when it used CUDA (None otherwise)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


def _append_to_log() -> None:
    path = os.environ.get(WORK_LOG)
    if path:
        line = json.dumps({"pid": os.getpid(), "argv": sys.argv[:2], **asdict(COUNTED),
                           "peak_gpu_bytes": peak_gpu_bytes()})
        with open(path, "a") as f:  # one short line per process: appends of this size do not interleave
            f.write(line + "\n")


atexit.register(_append_to_log)


def read_log(path: str | os.PathLike) -> dict:
    """A work log summed: the work of every process that wrote a line (Work's fields), the number of processes and
    the largest peak of GPU memory one of them allocated (None when none used CUDA)."""
    total, processes, peaks = Work(), 0, []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                total = total.add(Work(entry["flops"], entry["device_bytes"], entry["file_bytes"]))
                processes += 1
                peaks += [entry["peak_gpu_bytes"]] if entry.get("peak_gpu_bytes") is not None else []
    return {**asdict(total), "processes": processes, "peak_gpu_bytes_per_process": max(peaks) if peaks else None}
