"""Pipeline-parallel inference, pp-mode `pipe_sync_sample_mask_token_pipe`.

Every rank reads and tokenizes the same requests (so every rank knows every shape without
asking), rank r runs layers [r * num_layers, (r + 1) * num_layers), hidden states flow
rank to rank, and the last rank turns logits into log-probs, samples the next token and
writes the results. During generation the last rank broadcasts each new token to all ranks.
Batches are right-padded: real tokens of every row sit at positions 0..len-1.
"""
from __future__ import annotations

import importlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

from Decentralized_FM_alpha.task_datasets.inference_data import Request, choice_record, result_record
from Decentralized_FM_alpha.utils import work
from Decentralized_FM_alpha.utils.model_source import family_of_checkpoint

MODEL_TYPES = {  # --model-type -> (family, module file)
    "opt": ("opt", "hf_opt_module"),
    "opt-save": ("opt", "hf_opt_module_save"),
    "opt-ml-att-sparse": ("opt", "hf_opt_sparse_mlp_attention"),
    "llama": ("llama", "hf_llama_module"),
    "llama-save": ("llama", "hf_llama_module_save"),
    "llama-ml-att-sparse": ("llama", "hf_llama_sparse_mlp_attention"),
}
LOGPROB_CHUNK = 512  # positions per log_softmax, bounding the (T, vocab) float32 buffer


def model_module(model_type: str):
    if model_type not in MODEL_TYPES:
        raise ValueError(f"--model-type must be one of {sorted(MODEL_TYPES)}, got {model_type!r}")
    family, module = MODEL_TYPES[model_type]
    return family, importlib.import_module(f"Decentralized_FM_alpha.modules.{module}")


def layer_range(rank: int, num_layers: int, max_layers: int, world_size: int) -> range:
    if num_layers * world_size < max_layers:
        raise ValueError(f"--num-layers {num_layers} x world size {world_size} < {max_layers} layers to run")
    start = rank * num_layers
    layers = range(start, min(start + num_layers, max_layers))
    if len(layers) == 0:
        raise ValueError(f"rank {rank} would hold no layer (num_layers={num_layers}, max_layers={max_layers})")
    return layers


def bos_facts(tokenizer) -> dict[str, Any]:
    """Whether the tokenizer starts every sequence with a BOS token, and what position 0 therefore holds.

    Llama 3 and OPT tokenizers add one; SmolLM2's does not. Position 0 has no log-prob either way, so without a BOS
    the first text token of every request goes unscored, and `--exclude-first-token` drops a text token.
    """
    probe = "The"
    with_special = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    adds_bos = (tokenizer.bos_token_id is not None and len(with_special) > len(plain)
                and with_special[0] == tokenizer.bos_token_id)
    return {"adds_bos": bool(adds_bos), "bos_token": tokenizer.bos_token, "bos_token_id": tokenizer.bos_token_id,
            "position_0": "the BOS token" if adds_bos else "the first text token (this tokenizer adds no BOS)",
            "scored_tokens": ("every text token (log-probs from position 1; position 0 is the BOS)" if adds_bos else
                              "every text token but the first of each request (no BOS: position 0 has no context)")}


@dataclass
class Encoded:
    request: Request
    ids: list[int]
    offsets: list[int]
    truncated: int  # tokens dropped from the left


class DistInferenceMaskTokenPipeSync:
    def __init__(self, args, comm, device: torch.device, block_kwargs: Optional[Callable[[Any], dict]] = None):
        """`block_kwargs(self)` gives extra GPTBlock arguments (a collection writer, a sparsity controller)
        once the config and this rank's layers are known."""
        self.args, self.comm, self.device = args, comm, device
        self.rank, self.world_size = comm.rank, comm.world_size
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        self.family, self.module = model_module(args.model_type)
        checkpoint_family = family_of_checkpoint(args.model_name)  # a missing path is an error saying so
        self.config = AutoConfig.from_pretrained(args.model_name)
        if checkpoint_family != self.family:
            raise ValueError(f"{args.model_name} holds a {self.config.model_type!r} model, --model-type is {args.model_type}")
        self.tokenizer = AutoTokenizer.from_pretrained(args.model_name)
        self.bos = bos_facts(self.tokenizer)
        total = self.config.num_hidden_layers
        self.max_layers = args.max_layers or total
        if not 0 < self.max_layers <= total:
            raise ValueError(f"--max-layers {self.max_layers} outside 1..{total}")
        num_layers = args.num_layers or math.ceil(self.max_layers / self.world_size)
        self.layers = layer_range(self.rank, num_layers, self.max_layers, self.world_size)
        self.is_first, self.is_last = self.rank == 0, self.rank == self.world_size - 1
        self.hidden_size = self.config.hidden_size
        self.max_seq_len = args.max_seq_len or self.config.max_position_embeddings
        self._load_model(block_kwargs(self) if block_kwargs else {})
        self.generator = torch.Generator(device=device)
        self.reset_run_counters(args.seed)

    def reset_run_counters(self, seed: int) -> None:
        """What one run reports starts afresh: the sampling generator, truncation count and batch padding."""
        self.generator.manual_seed(seed)
        self.truncated_prompts = 0
        self.batch_positions = {"real_tokens": 0, "padding": 0}  # echo batches: what sorting by length saves

    # ------------------------------------------------------------------------------ loading
    def _load_model(self, block_kwargs: dict) -> None:
        path, cfg = self.args.model_name, self.config
        self.embeddings = self.module.GPTEmbeddings.from_pretrained(path, cfg) if self.is_first else None
        self.blocks = torch.nn.ModuleList(self.module.GPTBlock.from_pretrained(path, cfg, i, **block_kwargs)
                                          for i in tqdm(self.layers, desc=f"rank {self.rank} loading layers",
                                                        disable=len(self.layers) < 4))
        self.lm_head = self.module.GPTLMHead.from_pretrained(path, cfg) if self.is_last else None
        for m in (self.embeddings, self.blocks, self.lm_head):
            if m is not None:
                m.to(device=self.device, dtype=self.dtype).eval()
        self.block_weights = sum(p.numel() for p in self.blocks.parameters() if p.dim() >= 2)  # matmul weights

    def count_forward(self, valid: torch.Tensor, past_length: int, head_rows: Optional[int]) -> None:
        """The forward's matmul FLOPs over its real tokens (work.py): 2 x this rank's layer weights per token,
        q k^T and the weighted sum over the keys each query sees, and the head over `head_rows` tokens (all real
        tokens when None; the head's rank only)."""
        cfg = self.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        lengths = valid.sum(dim=1).tolist()
        tokens = sum(lengths)
        attended = sum(n * past_length + n * (n + 1) // 2 for n in lengths)
        head = 2 * cfg.hidden_size * cfg.vocab_size * (tokens if head_rows is None else head_rows) if self.is_last else 0
        work.count(flops=2 * self.block_weights * tokens + 4 * len(self.blocks) * heads * head_dim * attended + head)

    # ------------------------------------------------------------------------------ tokenizing
    def encode(self, request: Request, room_for: int = 0) -> Encoded:
        enc = self.tokenizer(request.prompt, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]
        if not ids:
            raise ValueError(f"request {request.index}: the prompt encodes to no token")
        limit = self.max_seq_len - room_for
        if limit < 1:
            raise ValueError(f"request {request.index}: max_tokens {room_for} leaves no room in --max-seq-len {self.max_seq_len}")
        dropped = max(0, len(ids) - limit)
        if dropped:
            # Left truncation keeps the beginning-of-sequence token the model always saw first.
            keep_bos = self.bos["adds_bos"] and ids[0] == self.tokenizer.bos_token_id and limit > 1
            head = 1 if keep_bos else 0
            ids = ids[:head] + ids[head + dropped:]
            offsets = offsets[:head] + offsets[head + dropped:]
            self.truncated_prompts += 1
        return Encoded(request, ids, offsets, dropped)

    # ------------------------------------------------------------------------------ one forward
    def attention_bias(self, valid: torch.Tensor, past_length: int) -> torch.Tensor:
        """Additive mask (B, 1, T, past+T): causal, and padded keys hidden."""
        b, t = valid.shape
        s = past_length + t
        causal = torch.ones(t, s, dtype=torch.bool, device=self.device).tril(diagonal=past_length)
        keys = torch.ones(b, s, dtype=torch.bool, device=self.device)
        keys[:, past_length:] = valid
        allowed = causal[None, None] & keys[:, None, None, :]
        bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return bias.masked_fill_(~allowed, torch.finfo(self.dtype).min)

    def mark_real_tokens(self, valid: torch.Tensor) -> None:
        """Tell a sparse model's controller (one, shared by every block) which positions of the coming forward are
        real tokens: it counts on-policy Recall@K over those only, never over padding."""
        controller = getattr(self.blocks[0], "sparsity", None)
        if controller is not None:
            controller.mark_real_tokens(valid)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, valid: torch.Tensor, past: Optional[list] = None,
                keep: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[Optional[torch.Tensor], list]:
        """Run this rank's layers on a (B, T) batch; the last rank returns logits (B, T, vocab), or with `keep` =
        (rows, positions) the logits of those tokens only, (N, vocab): the head's norm and projection act per token,
        so a scorer that reads a few positions skips the vocabulary projection of the others."""
        b, t = ids.shape
        past_length = 0 if past is None else past[0][0].shape[2]
        self.count_forward(valid, past_length, None if keep is None else keep[0].numel())
        if self.is_first:
            x = self.embeddings(ids, past_length)
        else:
            x = torch.empty(b, t, self.hidden_size, dtype=self.dtype, device=self.device)
            self.comm.recv(x, self.rank - 1)
        bias = self.attention_bias(valid, past_length)
        self.mark_real_tokens(valid)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, bias, None if past is None else past[i])
            presents.append(present)
        if not self.is_last:
            self.comm.send(x, self.rank + 1)
            return None, presents
        return self.lm_head(x if keep is None else x[keep]), presents

    # ------------------------------------------------------------------------------ log-probs
    def token_logprobs(self, logits: torch.Tensor, ids: list[int], k: int):
        """log p(ids[t] | ids[<t]) for t >= 1, and the top-k alternatives at each position."""
        lps, tops = [], []
        targets = torch.tensor(ids[1:], device=logits.device)
        for start in range(0, len(ids) - 1, LOGPROB_CHUNK):
            lp = torch.log_softmax(logits[start:start + LOGPROB_CHUNK].float(), dim=-1)
            tgt = targets[start:start + LOGPROB_CHUNK]
            lp = lp[: len(tgt)]
            lps.extend(lp.gather(1, tgt[:, None])[:, 0].tolist())
            if k > 0:
                values, indices = lp.topk(k, dim=-1)
                tops.extend(self.top_dict(v, i) for v, i in zip(values.tolist(), indices.tolist()))
        return [None] + lps, ([None] + tops if k > 0 else None)

    def top_dict(self, values: list[float], indices: list[int]) -> dict[str, float]:
        return dict(zip(self.token_strings(indices), values))

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token's own text (one batched call into the fast tokenizer, not one per token)."""
        return self.tokenizer.batch_decode([[i] for i in ids])

    # ------------------------------------------------------------------------------ echo batches
    def pad(self, batch: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        t = max(len(e.ids) for e in batch)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
        valid = torch.zeros(len(batch), t, dtype=torch.bool)
        for row, e in enumerate(batch):
            ids[row, : len(e.ids)] = torch.tensor(e.ids)
            valid[row, : len(e.ids)] = True
        real = int(valid.sum())
        self.batch_positions["real_tokens"] += real
        self.batch_positions["padding"] += valid.numel() - real
        return ids.to(self.device), valid.to(self.device)

    def echo_batch(self, batch: list[Encoded], before_forward=None) -> list[dict[str, Any]]:
        """Score the prompts of a batch (max_tokens 0); results on the last rank, [] elsewhere."""
        ids, valid = self.pad(batch)
        if before_forward is not None:
            before_forward(batch, ids, valid)
        logits, _ = self.forward(ids, valid)
        if not self.is_last:
            return []
        results = []
        for row, e in enumerate(batch):
            lps, tops = self.token_logprobs(logits[row, : len(e.ids)], e.ids, e.request.logprobs)
            choice = choice_record(e.request.prompt, 0, self.token_strings(e.ids), lps, tops, e.offsets, "length")
            results.append(result_record(e.request, [choice]))
        return results

    # ------------------------------------------------------------------------------ generation
    def sample(self, logits: torch.Tensor, request: Request) -> int:
        if request.temperature == 0:
            return int(logits.argmax())
        logits = logits.float() / request.temperature
        if request.top_k > 0:
            kth = logits.topk(min(request.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if request.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > request.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0))
        return int(torch.multinomial(probs, 1, generator=self.generator))

    @torch.inference_mode()
    def generate(self, request: Request) -> list[dict[str, Any]]:
        """n completions of one request, greedy at temperature 0; choices on the last rank."""
        encoded = self.encode(request, room_for=request.max_tokens)
        choices = []
        for index in range(request.n):
            choices.append(self.generate_one(encoded, index))
        return [result_record(request, choices)] if self.is_last else []

    def generate_one(self, e: Encoded, index: int) -> Optional[dict[str, Any]]:
        request = e.request
        ids = torch.tensor([e.ids], device=self.device)
        valid = torch.ones_like(ids, dtype=torch.bool)
        logits, past = self.forward(ids, valid)
        prompt_logits = logits[0] if self.is_last else None
        new_ids: list[int] = []
        gen_logprobs, gen_tops = [], []
        finish = "length"
        for _ in range(request.max_tokens):
            token = torch.zeros(1, dtype=torch.long, device=self.device)
            if self.is_last:
                step_logits = logits[0, -1]
                token[0] = self.sample(step_logits, request)
                lp = torch.log_softmax(step_logits.float(), dim=-1)
                gen_logprobs.append(float(lp[token[0]]))
                if request.logprobs > 0:
                    values, indices = lp.topk(request.logprobs)
                    gen_tops.append(self.top_dict(values.tolist(), indices.tolist()))
            self.comm.broadcast(token, self.world_size - 1)
            new_ids.append(int(token[0]))
            if new_ids[-1] == self.tokenizer.eos_token_id:
                finish = "stop"
                break
            if request.stop and any(s and s in self.tokenizer.decode(new_ids) for s in request.stop):
                finish = "stop"
                break
            if len(new_ids) == request.max_tokens:
                break
            logits, past = self.forward(token[None], torch.ones(1, 1, dtype=torch.bool, device=self.device), past)
        if not self.is_last:
            return None
        return self.completion_choice(e, index, prompt_logits, new_ids, gen_logprobs, gen_tops, finish)

    def completion_choice(self, e: Encoded, index: int, prompt_logits, new_ids, gen_logprobs, gen_tops, finish):
        request = e.request
        text = self.tokenizer.decode(new_ids)
        for s in request.stop:
            if s and s in text:
                text = text[: text.index(s)]
        tokens, offsets = self.token_strings(new_ids), []
        position = len(request.prompt) if request.echo else 0
        for tok in tokens:
            offsets.append(position)
            position += len(tok)
        lps, tops = gen_logprobs, (gen_tops if request.logprobs > 0 else None)
        if request.echo:
            p_lps, p_tops = self.token_logprobs(prompt_logits, e.ids, request.logprobs)
            tokens, offsets = self.token_strings(e.ids) + tokens, e.offsets + offsets
            lps = p_lps + lps
            tops = p_tops + tops if tops is not None else None
            text = request.prompt + text
        return choice_record(text, index, tokens, lps, tops, offsets, finish)

    # ------------------------------------------------------------------------------ the run
    def processing_order(self, encoded: list[Encoded], collecting: bool) -> list[int]:
        """Positions of the echo requests in the order they are run: longest first (similar lengths share a batch,
        so padding stays small) unless --sort-requests file or a collection, which stores documents in file order."""
        if collecting or self.args.sort_requests == "file":
            return list(range(len(encoded)))
        return sorted(range(len(encoded)), key=lambda i: -len(encoded[i].ids))

    def batches(self, encoded: list[Encoded], order: list[int]):
        """Positions in `order`, grouped by --token-micro-batch-size and the --budget of padded tokens."""
        batch: list[int] = []
        longest = 0
        for position in order:
            longest = max(longest, len(encoded[position].ids))
            if batch and (len(batch) == self.args.token_micro_batch_size or longest * (len(batch) + 1) > self.args.budget):
                yield batch
                batch, longest = [], len(encoded[position].ids)
            batch.append(position)
        if batch:
            yield batch

    def run(self, requests: list[Request], output_path: Optional[Path], before_forward=None, after_batch=None,
            append: bool = False) -> list:
        """All requests; on the last rank the results are written to `output_path` in request order.

        `before_forward(batch, ids, valid)` and `after_batch() -> stop` let collection see every echo batch;
        they require echo requests only.
        """
        results = []
        out = open(output_path, "a" if append else "w") if (output_path is not None and self.is_last) else None
        try:
            all_echo = all(r.max_tokens == 0 for r in requests)
            if before_forward is not None and not all_echo:
                raise ValueError("collection needs echo requests (max_tokens 0) only")
            progress = tqdm(total=len(requests), desc=f"rank {self.rank} requests", disable=not self.is_last)
            if all_echo:
                encoded = [self.encode(r) for r in requests]
                finished: dict[int, dict] = {}  # results run ahead of an earlier request, by position
                for positions in self.batches(encoded, self.processing_order(encoded, before_forward is not None)):
                    new = self.echo_batch([encoded[p] for p in positions], before_forward)
                    finished.update(zip(positions, new))  # nothing on ranks other than the last
                    while len(results) in finished:  # write every result whose predecessors are written
                        self._emit([finished.pop(len(results))], out, results)
                    progress.update(len(positions))
                    if after_batch is not None and after_batch():
                        break
            else:  # generation in the file: one request at a time, in file order
                for request in requests:
                    new = self.echo_batch([self.encode(request)]) if request.max_tokens == 0 else self.generate(request)
                    self._emit(new, out, results)
                    progress.update(1)
            progress.close()
        finally:
            if out is not None:
                out.close()
        if self.truncated_prompts:
            warnings.warn(f"{self.truncated_prompts} prompt(s) longer than --max-seq-len {self.max_seq_len} "
                          f"were truncated from the left")
        return results

    @staticmethod
    def _emit(new: list, out, results: list) -> None:
        for record in new:
            results.append(record)
            if out is not None:
                out.write(json.dumps(record) + "\n")
        if out is not None:
            out.flush()
