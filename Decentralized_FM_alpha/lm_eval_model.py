"""The tool's models as an lm-evaluation-harness model, registered as `dejavu` on import (SPEC section 11).

The model is the runner's, built the runner's way: the model arguments become dist_inference_runner flags, parsed by
its own parser, and dist_inference_runner.build_pipeline loads the converted checkpoint (SPEC section 3) with the same
modules and SparsityController (SPEC section 8), at world size 1. Nothing here decides which neuron or head is kept.

    python scripts/study/lm_eval_dejavu.py --model dejavu --tasks piqa,copa,winogrande --batch_size 16 --device cuda \\
        --model_args pretrained=DIR,dtype=bf16,sparse_mode=predictor,predictor_dir=P,mlp_topk=0.5

Model arguments -> runner flags: pretrained -> --model-name; sparse_mode -> --sparse-mode with model type
<family>-ml-att-sparse (absent: the dense model type <family>, the sweeps' baseline; <family> is the module family of
the checkpoint's model_type: opt, or llama for llama and qwen2); predictor_dir, mlp_topk, att_topk, sparse_layers,
dense_layers, predictor_input, dtype, max_seq_len, seed, budget -> --predictor-dir, --mlp-topk, ... (same meaning);
gqa_groups=true -> --gqa-groups, allow_predictor_mismatch=true -> --allow-predictor-mismatch. The harness's batch_size
is --token-micro-batch-size ('auto': max_batch_size, default
64, with --budget bounding the padded tokens); device is cpu, cuda or cuda:N. A value with commas (sparse_layers=0,7)
needs the JSON form of --model_args. Any other argument is an error.

Scoring follows the harness's Hugging Face wrapper (HFLM): the same tokenisation (the tokenizer's special tokens, the
BOS as prefix of an empty context), the same left truncation to max_length + 1 tokens, the same rolling windows, the
same float32 arithmetic (log-softmax, and the sum over a continuation's tokens). The requests are batched longest
first by the runner's own batching; per batch, one log-softmax over the continuation positions and one transfer to
the host.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import torch
from lm_eval import utils as harness_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from Decentralized_FM_alpha import dist_inference_runner
from Decentralized_FM_alpha.pipeline_parallel.dist_pipeline_inference_mask_sample import Encoded
from Decentralized_FM_alpha.task_datasets.inference_data import parse_request
from Decentralized_FM_alpha.utils.manifest import weights_provenance
from Decentralized_FM_alpha.utils.model_source import family_of_checkpoint

RUNNER_FLAGS = {"predictor_dir": "--predictor-dir", "mlp_topk": "--mlp-topk", "att_topk": "--att-topk",
                "sparse_layers": "--sparse-layers", "dense_layers": "--dense-layers",
                "predictor_input": "--predictor-input", "dtype": "--dtype", "max_seq_len": "--max-seq-len",
                "seed": "--seed", "budget": "--budget"}
SPARSITY_FLAGS = ("predictor_dir", "mlp_topk", "att_topk", "sparse_layers", "dense_layers", "predictor_input")
DTYPE_NAMES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}
AUTO_BATCH = 64
ENCODED_PAIRS: dict[str, dict[tuple[str, str], tuple[list[int], list[int]]]] = {}  # checkpoint -> (context,
# continuation) -> token ids, shared by the models of one process (DejaVuLM._encode_pair)
NOT_A_FILE = "(requests from lm-evaluation-harness)"  # the runner's --infer-data; the harness sends the requests


@functools.lru_cache(maxsize=None)
def compiled_template(template: str):
    return harness_utils.env.from_string(template)


def apply_template(template: str, doc: dict) -> str:
    """The harness's apply_template with its Jinja template compiled once instead of once per document: the same
    environment and template, so the same text; the compiling was most of the time the harness takes to build the
    requests of a task (scripts/bench/bench_lm_eval_model.py times both)."""
    return compiled_template(template).render(**doc)


HARNESS_APPLY_TEMPLATE = harness_utils.apply_template
harness_utils.apply_template = apply_template  # lm_eval.api.task calls utils.apply_template by attribute


def device_flags(device: Optional[str]) -> list[str]:
    if device is None:
        return []  # the runner's default: the GPU when one is visible
    device = str(device)
    if device == "cpu":
        return ["--use-cuda", "false"]
    if device == "cuda" or device.startswith("cuda:"):
        return ["--use-cuda", "true", "--cuda-id", device.partition(":")[2] or "0"]
    raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")


def micro_batch(batch_size: Any, max_batch_size: Optional[int]) -> int:
    if str(batch_size).startswith("auto"):
        return int(max_batch_size or AUTO_BATCH)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


def runner_argv(pretrained: str, sparse_mode: Optional[str] = None, gqa_groups: bool = False,
                allow_predictor_mismatch: bool = False, batch_size: Any = 1, max_batch_size: Optional[int] = None,
                device: Optional[str] = None, **flags: Any) -> list[str]:
    """The dist_inference_runner command line that builds the model these arguments describe."""
    unknown = sorted(set(flags) - set(RUNNER_FLAGS))
    if unknown:
        raise TypeError(f"dejavu model: unknown model arguments {unknown}; known: pretrained, sparse_mode, "
                        f"gqa_groups, allow_predictor_mismatch, {', '.join(RUNNER_FLAGS)} (and the harness's "
                        f"batch_size, device)")
    for name, value in (("gqa_groups", gqa_groups), ("allow_predictor_mismatch", allow_predictor_mismatch)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    family = family_of_checkpoint(pretrained)
    model_type = family if sparse_mode is None else f"{family}-ml-att-sparse"
    argv = ["--model-name", str(pretrained), "--model-type", model_type, "--infer-data", NOT_A_FILE,
            "--token-micro-batch-size", str(micro_batch(batch_size, max_batch_size)), *device_flags(device)]
    if sparse_mode is not None:
        argv += ["--sparse-mode", str(sparse_mode)] + (["--gqa-groups"] if gqa_groups else [])
        argv += ["--allow-predictor-mismatch"] if allow_predictor_mismatch else []
    elif gqa_groups or allow_predictor_mismatch or any(k in flags for k in SPARSITY_FLAGS):
        raise ValueError("dejavu model: sparsity arguments without sparse_mode (dense, oracle, predictor, random, "
                         "static, gate or structured)")
    for key, value in flags.items():
        if value is not None:
            value = DTYPE_NAMES.get(str(value), value) if key == "dtype" else value
            argv += [RUNNER_FLAGS[key], str(value)]
    return argv


@register_model("dejavu")
class DejaVuLM(TemplateLM):
    """lm-evaluation-harness model over the runner's pipeline (dense or DejaVu-sparse, SPEC section 8)."""

    def __init__(self, pretrained: str, **kwargs: Any):
        super().__init__()
        self.argv = runner_argv(pretrained, **kwargs)
        self.args = dist_inference_runner.resolve_args(self.argv)
        self.pipe = dist_inference_runner.build_pipeline(self.args)
        self.tokenizer = self.pipe.tokenizer
        self._device = self.pipe.device
        self.truncated_requests = 0  # scored sequences cut from the left to fit max_length
        self.encoded_pairs = ENCODED_PAIRS.setdefault(str(Path(pretrained).resolve()), {})

    def use_sparsity(self, pretrained: str, **kwargs: Any) -> None:
        """Another sparse setting on the loaded model (the task sweep loads a sparse model once for all its settings):
        `kwargs` as for the constructor; what builds the model (checkpoint, model type, dtype, device, batch, length,
        seed) must not change."""
        argv = runner_argv(pretrained, **kwargs)
        args = dist_inference_runner.resolve_args(argv)
        fixed = ("model_name", "model_type", "dtype", "use_cuda", "cuda_id", "token_micro_batch_size", "max_seq_len",
                 "seed", "budget")
        changed = [k for k in fixed if getattr(args, k) != getattr(self.args, k)]
        if changed or not args.model_type.endswith("-ml-att-sparse"):
            raise ValueError(f"use_sparsity changes only the sparsity of a loaded sparse model; {changed or 'model_type'} "
                             f"differ: build a new DejaVuLM")
        dist_inference_runner.attach_sparsity(args, self.pipe)
        self.argv, self.args = argv, args
        self.truncated_requests = 0

    # ---------------------------------------------------------------------------- what the harness asks about
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: the BOS token (else EOS), as HFLM."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.pipe.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        """The tokenizer's own special tokens (a BOS for OPT and Llama 3), none if the text starts with the BOS."""
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The harness's own encoding, kept per checkpoint for the process: a sweep builds one model per setting and
        asks for the same requests again (the seven tasks' 14,285 pairs take seconds to encode)."""
        key = (context, continuation)
        if key not in self.encoded_pairs:
            self.encoded_pairs[key] = super()._encode_pair(context, continuation)
        return self.encoded_pairs[key]

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in the harness's results under config."""
        sparsity = self.pipe.blocks[0].sparsity.describe() if self.args.model_type.endswith("-ml-att-sparse") else None
        return {"dejavu": {"runner_argv": self.argv, "model_type": self.args.model_type, "dtype": self.args.dtype,
                           "max_length": self.max_length, "sparsity": sparsity, "tokenizer": self.pipe.bos,
                           "weights": weights_provenance(self.args.model_name),
                           "truncated_requests": self.truncated_requests}}

    def restart_random_streams(self) -> None:
        """Random mode's scores and sampling start again from the seed at every harness call, so that a task's
        numbers do not depend on which tasks ran before it in the same process."""
        if self.args.model_type.endswith("-ml-att-sparse"):
            controller = self.pipe.blocks[0].sparsity
            controller.generator.manual_seed(controller.plan.seed)
        self.pipe.generator.manual_seed(self.args.seed)

    # ---------------------------------------------------------------------------- scoring
    def scored_window(self, context: list[int], continuation: list[int]) -> Encoded:
        """The model input for one request (the last max_length + 1 tokens without the last), as HFLM."""
        if len(continuation) > self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens is longer than max_length "
                             f"{self.max_length}: it cannot be scored (context {context[:8]}..., continuation "
                             f"{continuation[:8]}...)")
        whole = context + continuation
        if len(whole) > self.max_length + 1:
            self.truncated_requests += 1
        return Encoded(request=None, ids=whole[-(self.max_length + 1):][:-1], offsets=[], truncated=0)

    @staticmethod
    def scored_positions(windows: list[Encoded], continuations: list[list[int]],
                         device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """((batch rows, positions), target ids) of every continuation token of a batch: the logits that score it."""
        rows, columns, targets = [], [], []
        for row, (window, continuation) in enumerate(zip(windows, continuations)):
            end = len(window.ids)
            rows += [row] * len(continuation)
            columns += range(end - len(continuation), end)
            targets += continuation
        tensor = lambda values: torch.tensor(values, device=device)  # noqa: E731
        return (tensor(rows), tensor(columns)), tensor(targets)

    @staticmethod
    def continuation_scores(logits: torch.Tensor, targets: torch.Tensor,
                            continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) per request from the logits of its
        continuation positions (N, vocab), in order: one float32 log-softmax, one transfer to the host; each
        request's token log-probs summed there in float32, as HFLM sums them."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, vocab)
        token_logprob = logprobs.gather(1, targets[:, None])[:, 0]
        greedy = logprobs.argmax(dim=-1) == targets
        values, hits = torch.stack([token_logprob, greedy.float()]).cpu()
        lengths = [len(continuation) for continuation in continuations]
        return [(float(v.sum()), bool(h.all())) for v, h in zip(values.split(lengths), hits.split(lengths))]

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) per (key, context, continuation)."""
        self.restart_random_streams()
        windows = [self.scored_window(context, continuation) for _, context, continuation in requests]
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="dejavu loglikelihood", disable=disable_tqdm)
        for positions in self.pipe.batches(windows, self.pipe.processing_order(windows, collecting=False)):
            ids, valid = self.pipe.pad([windows[p] for p in positions])
            continuations = [requests[p][2] for p in positions]
            keep, targets = self.scored_positions([windows[p] for p in positions], continuations, ids.device)
            logits, _ = self.pipe.forward(ids, valid, keep=keep)  # the continuation positions' logits only
            scores = self.continuation_scores(logits, targets, continuations)
            for p, score in zip(positions, scores):
                results[p] = score
                if requests[p][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[p][0], score)
            progress.update(len(positions))
        progress.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint max_length windows, each token predicted once (as HFLM)."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            rolling = harness_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                              prefix_token=self.prefix_token_id,
                                                              max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(harness_utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---------------------------------------------------------------------------- generation
    def generation_request(self, index: int, context: str, gen_kwargs: dict):
        """The runner's request for one generate_until call (greedy unless do_sample)."""
        unknown = sorted(set(gen_kwargs) - GENERATION_KEYS)
        if unknown:
            raise ValueError(f"dejavu model: generation arguments {unknown} are not supported")
        until = gen_kwargs.get("until") or []
        sample = bool(gen_kwargs.get("do_sample", False))
        raw = {"prompt": context, "max_tokens": int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), "echo": False,
               "logprobs": 0, "stop": [until] if isinstance(until, str) else list(until),
               "temperature": float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
               "top_p": float(gen_kwargs.get("top_p", 1.0)), "top_k": int(gen_kwargs.get("top_k", 0))}
        return parse_request(raw, index, f"lm-eval generate_until request {index}")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Completions by the runner's generation (KV cache, stop strings, EOS), one request at a time."""
        self.restart_random_streams()
        texts = []
        for index, request in enumerate(tqdm(requests, desc="dejavu generate_until", disable=disable_tqdm)):
            context, gen_kwargs = request.args
            record = self.pipe.generate(self.generation_request(index, context, dict(gen_kwargs)))[0]
            texts.append(record["result"]["choices"][0]["text"])
            self.cache_hook.add_partial("generate_until", request.args, texts[-1])
        return texts
