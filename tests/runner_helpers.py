"""Run dist_inference_runner as users do (in-process for one rank, subprocesses for several)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from Decentralized_FM_alpha import dist_inference_runner

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "Decentralized_FM_alpha" / "dist_inference_runner.py"
C4_VAL = Path(__file__).resolve().parent / "fixtures" / "c4_val_sample.jsonl"


def c4_texts(n: int, max_chars: int = 400) -> list[str]:
    with open(C4_VAL, encoding="utf-8") as f:
        return [json.loads(line)["text"][:max_chars] for line in f][:n]


def write_requests(path: Path, prompts: list[str], **fields) -> Path:
    base = {"max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0, "top_p": 1, "n": 1, "best_of": 1,
            "stop": None, "model": "test", "request_type": "language-model-inference"}
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p, **base, **fields}) + "\n")
    return path


def run_one_rank(args: list[str]) -> None:
    dist_inference_runner.main(args + ["--use-cuda", "false"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args: list[str], world_size: int, timeout: int = 300) -> None:
    """Start `world_size` runner processes on gloo, as a user would, and wait for all."""
    url = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(RUNNER), *args, "--use-cuda", "false", "--world-size",
                               str(world_size), "--rank", str(r), "--dist-url", url, "--dist-backend", "gloo"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world_size)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-4000:]}"


def read_results(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def token_logprobs(result: dict) -> list:
    return result["result"]["choices"][0]["logprobs"]["token_logprobs"]


def hf_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[<t]) for t >= 1 from a Hugging Face causal LM."""
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits[0].double(), dim=-1)
    return lp[:-1].gather(1, x[0, 1:, None])[:, 0]
