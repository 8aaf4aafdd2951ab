"""The work counters (Decentralized_FM_alpha/utils/work.py) that set each study stage beside its floor: a training
step counts the predictors' matmul FLOPs, a streamed read its bytes, a forward pass the matmul FLOPs torch's own FLOP
counter measures, and a work log sums the lines of its processes."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from Decentralized_FM_alpha import dist_inference_runner
from Decentralized_FM_alpha.utils import work
from sparse_predictor.trainer.model import StackedPredictors, TrainStep
from sparse_predictor.trainer.rows import RowFile, stream_chunks
from tests.helpers_models import make_llama, make_opt
from tests.runner_helpers import REPO, write_requests


@pytest.fixture
def counted(monkeypatch):
    fresh = work.Work()
    monkeypatch.setattr(work, "COUNTED", fresh)
    return fresh


def test_a_training_step_counts_what_torch_counts_for_forward_and_backward(counted):
    P, B, d, D, out = 3, 8, 16, 4, 32
    model = StackedPredictors(d, D, out, seeds=range(P))
    step = TrainStep(model, torch.optim.AdamW(model.parameters(), 1e-3), None, 0.005, graphs=False, batch_size=B)
    x, y = torch.randn(P, B, d), torch.rand(P, B, out) > 0.5
    with FlopCounterMode(display=False) as flops:
        step(x, y)
    assert counted.flops == flops.get_total_flops() == P * B * (4 * d * D + 6 * D * out)
    assert counted.device_bytes == work.OPTIMIZER_BYTES_PER_PARAMETER * P * (d * D + D * out)


def test_a_streamed_read_counts_its_bytes(tmp_path, counted):
    rows, widths = 37, (5, 11)
    files = []
    for width in widths:
        path = tmp_path / f"w{width}.mmap"
        np.random.default_rng(width).standard_normal((rows, width)).astype(np.float16).tofile(path)
        files.append(RowFile(path, width, rows))
    slices = [slice(0, 20), slice(25, 37)]
    read = list(stream_chunks(files, slices, torch.device("cpu")))
    assert len(read) == 2 and counted.file_bytes == (20 + 12) * 2 * sum(widths)


@pytest.mark.parametrize("maker", [make_opt, make_llama], ids=["opt", "llama"])
def test_a_forward_pass_counts_the_matmul_flops_torch_counts(maker, tmp_path, tiny_tokenizer_dir, counted):
    """One new token per row (no padding, one key each): the count is torch's count of the linear layers and the
    head, plus q k^T and the weighted sum over one key (4 x heads x head_dim per layer and token; torch's counter
    does not count the CPU attention kernel)."""
    _, _, converted = maker(tmp_path, tiny_tokenizer_dir, seed=4)
    request = write_requests(tmp_path / "req.jsonl", ["unused"])
    args = dist_inference_runner.resolve_args(["--model-name", str(converted), "--infer-data", str(request),
                                               "--use-cuda", "false", "--model-type", maker.__name__[5:]])
    pipe = dist_inference_runner.build_pipeline(args)
    ids = torch.tensor([[5], [9], [17]])
    with FlopCounterMode(display=False) as flops:
        pipe.forward(ids, torch.ones_like(ids, dtype=torch.bool))
    config = pipe.config
    attention = 4 * config.num_hidden_layers * config.hidden_size * len(ids)  # heads x head_dim = hidden here
    assert config.hidden_size == config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    assert counted.flops == flops.get_total_flops() + attention and flops.get_total_flops() > 0


def test_a_work_log_sums_its_processes_and_keeps_the_largest_gpu_peak(tmp_path):
    log = tmp_path / "work.jsonl"
    code = "from Decentralized_FM_alpha.utils import work; work.count(flops={f}, file_bytes=3)"
    for flops in (10, 32):
        subprocess.run([sys.executable, "-c", code.format(f=flops)], cwd=REPO, check=True,
                       env={"PYTHONPATH": str(REPO), work.WORK_LOG: str(log)})
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 2 and all(line["peak_gpu_bytes"] is None for line in lines)
    assert work.read_log(log) == {"flops": 42.0, "device_bytes": 0.0, "file_bytes": 6.0, "processes": 2,
                                  "peak_gpu_bytes_per_process": None}
    assert work.read_log(tmp_path / "none.jsonl")["processes"] == 0
