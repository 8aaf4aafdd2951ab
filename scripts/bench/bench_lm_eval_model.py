"""Requests per second of the harness model `dejavu` (Decentralized_FM_alpha/lm_eval_model.py) on DejaVu's seven tasks,
next to the harness's own Hugging Face model (HFLM) on the same requests and weights.

The requests are the harness's own, built from the bundled splits (scripts/assets/dejavu_tasks.py; --limit documents
per task, default all: 14,285 loglikelihood requests). Times, each on the same requests:
  build     the harness building every task's requests, with its own apply_template (a Jinja compile per document)
            and with lm_eval_model's (compiled once); the two must give the same requests
  encode    the model's tokenisation of the (context, continuation) pairs (TemplateLM._encode_pair; kept for the
            process, so only the first setting pays it)
  score     `dejavu` scoring the encoded requests (_loglikelihood_tokens: forward passes, log-softmax, transfer), for
            every --batch and --model-args setting
  hf        HFLM scoring the same encoded requests at the first --batch (with --hf-model), and the largest
            |log p| difference to it (dense `dejavu` equals HFLM: tests/test_lm_eval_model.py)
  full      with --full-logits, `dejavu` scoring again with the final norm and vocabulary projection over every
            position, (B, T, vocab), then indexed (the path before they ran on the scored positions alone), its
            time over the scored-positions time and the largest |log p| difference between the two
With --config a model of that architecture with random weights (seed 0, scripts/bench/common.py build_converted:
the test tokenizer) is built and converted into a temporary folder (no HFLM), e.g.
tests/fixtures/qwen2.5-coder-0.5b-config.json.
Writes <out-dir>/bench_lm_eval_model.json (a manifest with every setting) and prints one line per timing.

    python scripts/bench/bench_lm_eval_model.py --smoke                      # CPU, the bundled tiny Llama, 4 docs
    python scripts/bench/bench_lm_eval_model.py --model-name CONVERTED --hf-model HF_DIR --device cuda --dtype bf16 \\
        --batch 16 64 --model-args '' 'sparse_mode=random,mlp_topk=0.25,att_topk=0.25' --out-dir $OUT
    python scripts/bench/bench_lm_eval_model.py --config tests/fixtures/qwen2.5-coder-0.5b-config.json --device cuda \
        --batch 32 --model-args '' 'sparse_mode=oracle,mlp_topk=0.5,att_topk=0.5' --full-logits --limit 500
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from Decentralized_FM_alpha.utils.manifest import base_manifest, weights_provenance, write_json_atomic  # noqa: E402
from scripts.assets import dejavu_tasks  # noqa: E402
from scripts.bench.common import build_converted  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "pretrained_models/tiny-llama"
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_tasks(task_dir: Path, tasks: list[str]) -> list:
    from lm_eval.tasks import TaskManager

    return list(TaskManager(include_path=str(task_dir), include_defaults=False).load(tasks)["tasks"].values())


def harness_requests(loaded: list, limit: int | None) -> list:
    """The loglikelihood Instances the harness builds for the loaded tasks (first `limit` documents of each)."""
    instances = []
    for task in loaded:
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        instances += task.instances
    return instances


@contextmanager
def head_over_every_position(pipe):
    """Score as before the head ran on the scored positions alone: logits (B, T, vocab), then indexed."""
    forward = pipe.forward

    def whole(ids, valid, past=None, keep=None):
        logits, presents = forward(ids, valid, past)
        return (logits if keep is None else logits[keep]), presents

    pipe.forward = whole
    try:
        yield
    finally:
        del pipe.forward


def parse_model_args(text: str) -> dict:
    return dict(pair.split("=", 1) for pair in text.split(",") if pair)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, device: str):
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-name", type=Path, default=None,
                   help="converted checkpoint (default: the bundled tiny Llama, converted into a temporary folder)")
    p.add_argument("--hf-model", type=Path, default=None,
                   help="the same weights in Hugging Face format, for HFLM (default: the bundled tiny Llama when "
                        "--model-name is not given, else none)")
    p.add_argument("--config", type=Path, default=None,
                   help="a Hugging Face config.json: time a model of that architecture with random weights instead "
                        "of --model-name (no HFLM)")
    p.add_argument("--full-logits", action="store_true",
                   help="also time the scoring with the head over every position (the earlier path) and compare")
    p.add_argument("--tasks", default=",".join(dejavu_tasks.TASK_NAMES), help="local tasks (default: all seven)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (default: all)")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64], help="requests per forward (default 16 64)")
    p.add_argument("--model-args", nargs="+", default=[""],
                   help="`dejavu` settings to time, each key=value,... (e.g. sparse_mode=random,mlp_topk=0.25; "
                        "default: '' = dense)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=tuple(HF_DTYPES), default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--smoke", action="store_true", help="CPU check: 4 documents per task, batch 8")
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "out/bench_lm_eval_model")),
                   help="where the JSON goes (default: $OUT, else out/bench_lm_eval_model)")
    args = p.parse_args(argv)
    if args.smoke:
        args.limit, args.batch = 4, [8]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from lm_eval import utils as harness_utils
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoConfig

    from Decentralized_FM_alpha import convert_llama_checkpoint, lm_eval_model
    from Decentralized_FM_alpha.lm_eval_model import DejaVuLM
    from scripts.assets import make_local_task

    work = Path(tempfile.mkdtemp(prefix="bench_lm_eval_"))
    if args.config is not None:
        args.model_name = build_converted(AutoConfig.from_pretrained(args.config), work, torch.device(args.device),
                                          torch.float32, seed=0)
    elif args.model_name is None:
        args.model_name, args.hf_model = work / "converted", args.hf_model or TINY
        convert_llama_checkpoint.main(["--model-name", str(TINY), "--save-path", str(args.model_name)])
    task_dir = make_local_task.main(["--out-dir", str(work / "tasks")])
    tasks = [t for t in args.tasks.split(",") if t]
    loaded = load_tasks(task_dir, tasks)
    instances, build_s = timed(lambda: harness_requests(loaded, args.limit), "cpu")
    harness_utils.apply_template = lm_eval_model.HARNESS_APPLY_TEMPLATE
    try:
        original, original_build_s = timed(lambda: harness_requests(loaded, args.limit), "cpu")
    finally:
        harness_utils.apply_template = lm_eval_model.apply_template
    if [i.args for i in original] != [i.args for i in instances]:
        raise SystemExit("the requests built with the compiled-once templates differ from the harness's")
    print(f"build: {len(instances)} requests of {len(tasks)} tasks in {build_s:.2f} s ({original_build_s:.2f} s with "
          f"the harness's apply_template; the same requests)")
    runs, reference = [], None
    for setting in args.model_args:
        for batch in args.batch:
            lm = DejaVuLM(pretrained=str(args.model_name), device=args.device, batch_size=batch, dtype=args.dtype,
                          **parse_model_args(setting))
            encoded, encode_s = timed(lambda: [(None, *lm._encode_pair(*i.args)) for i in instances], "cpu")
            lm._loglikelihood_tokens(encoded[:batch], disable_tqdm=True)  # warm-up: kernels, allocator
            scores, score_s = timed(lambda: lm._loglikelihood_tokens(encoded, disable_tqdm=True), args.device)
            runs.append({"model_args": setting or "dense", "batch": batch, "requests": len(encoded),
                         "encode_s": encode_s, "score_s": score_s, "requests_per_s": len(encoded) / score_s})
            print(f"dejavu {setting or 'dense'} batch {batch}: encode {encode_s:.2f} s, score {score_s:.2f} s = "
                  f"{len(encoded) / score_s:.0f} requests/s")
            if args.full_logits:
                with head_over_every_position(lm.pipe):
                    lm._loglikelihood_tokens(encoded[:batch], disable_tqdm=True)
                    whole, whole_s = timed(lambda: lm._loglikelihood_tokens(encoded, disable_tqdm=True), args.device)
                difference = max(abs(a[0] - b[0]) for a, b in zip(scores, whole))
                runs[-1].update(full_logits_score_s=whole_s, full_over_scored=whole_s / score_s,
                                full_max_abs_logprob_difference=difference,
                                full_greedy_disagreements=sum(a[1] != b[1] for a, b in zip(scores, whole)))
                print(f"  head over every position: score {whole_s:.2f} s ({whole_s / score_s:.2f}x the scored "
                      f"positions' time); max |log p difference| {difference:.2e}")
            if not setting and batch == args.batch[0]:
                reference = (encoded, scores)
            del lm
    hf = None
    if args.hf_model is not None and reference is not None:
        encoded, ours = reference
        model = HFLM(pretrained=str(args.hf_model), device=args.device, batch_size=args.batch[0],
                     dtype=HF_DTYPES[args.dtype])
        model._loglikelihood_tokens(encoded[:args.batch[0]], disable_tqdm=True)
        theirs, hf_s = timed(lambda: model._loglikelihood_tokens(encoded, disable_tqdm=True), args.device)
        hf = {"batch": args.batch[0], "score_s": hf_s, "requests_per_s": len(encoded) / hf_s,
              "max_abs_logprob_difference": max(abs(o[0] - t[0]) for o, t in zip(ours, theirs)),
              "greedy_disagreements": sum(o[1] != t[1] for o, t in zip(ours, theirs))}
        print(f"hf batch {args.batch[0]}: score {hf_s:.2f} s = {hf['requests_per_s']:.0f} requests/s; max |log p "
              f"difference| to dense dejavu {hf['max_abs_logprob_difference']:.2e}, "
              f"greedy disagreements {hf['greedy_disagreements']}")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = base_manifest(kind="bench_lm_eval_model", settings={k: str(v) for k, v in vars(args).items()},
                           device_name=device_name, threads=torch.get_num_threads(), tasks=tasks,
                           requests=len(instances), build_s=build_s, original_build_s=original_build_s, runs=runs,
                           hf=hf,
                           weights=weights_provenance(args.model_name))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out_dir / "bench_lm_eval_model.json", result)
    print(f"wrote {args.out_dir / 'bench_lm_eval_model.json'}")
    return result


if __name__ == "__main__":
    main()
