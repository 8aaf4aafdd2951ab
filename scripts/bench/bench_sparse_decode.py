"""Decode latency with real sparse kernels at Llama-3.2-3B and OPT-2.7b shapes, the predictor's own cost counted.

Builds each model's exact architecture (tests/fixtures/llama-3.2-3b-config.json, tests/fixtures/opt-2.7b-config.json)
with random weights in the model dtype (norms and biases perturbed: no zeros), our pieces sharing the Hugging Face
model's tensors, and measures one decode step (one new token per row, a KV cache of --context tokens of random keys
and values) of modules/sparse_decode.py's StaticDecoder, captured in a CUDA graph:
  bandwidth   device-to-device copy (bytes read + written / time) and a bf16 matmul's FLOP/s: the two ceilings
  check       the Triton kernels against the torch backend at the real shapes, and one sparse step against the
              masked simulation (the dense blocks' forward with the same masks); the dense step against HF's logits
              is the yardstick of bf16 rounding
  kernel      the MLP's gathered kernels alone over all layers (given masks): per-layer us against their bytes floor,
              next to the dense MLP (--goal-x is the issue's goal at MLP fractions 0.25 and 0.5)
  decode      per batch (--batches): dense (ours), HF `generate` (per new token, prefill cancelled by two lengths),
              mask-given (no predictor: the kernels alone; at batch > 1 with independent random masks per row and with
              one mask shared by the rows, the worst and best union) and predictor (random-weight low-rank predictors
              of width --D, bf16, run in the step: the MLP's reads att_x_l, attention's att_x_{l-1}) at every MLP
              fraction alone, every head fraction alone and every pair; tokens/s, per-layer us, speedup against dense,
              the union of the batch's masks, the floor (bytes read / measured copy bandwidth, FLOPs / matmul peak)
              and the predictor's share of the step (its own graph over all layers)
Random weights: the speed of a shape, not of a trained model; a trained model's masks are correlated across rows, so
its batch unions lie between the independent and shared rows. Writes <out>/bench_sparse_decode.json after every stage
and prints a table last.

GPU (one H200, one command; settings not started after --time-budget-s, 420 s, are skipped and listed, so it ends
within about 8 minutes):
    python scripts/bench/bench_sparse_decode.py --out out/bench_sparse_decode
CPU smoke (seconds; tiny shapes, torch kernels, no graphs):
    python scripts/bench/bench_sparse_decode.py --smoke --out out/bench_sparse_decode_cpu
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM  # noqa: E402

from Decentralized_FM_alpha import convert_llama_checkpoint, convert_opt_checkpoint  # noqa: E402
from Decentralized_FM_alpha.modules import hf_llama_module, hf_opt_module, sparse_decode  # noqa: E402
from Decentralized_FM_alpha.modules.sparse_kernels import columns_times, rows_times  # noqa: E402
from Decentralized_FM_alpha.utils.manifest import base_manifest, write_json_atomic  # noqa: E402
from Decentralized_FM_alpha.utils.selection import fraction_count  # noqa: E402
from scripts.bench.common import (copy_bandwidth, free_device_memory, matmul_peak, median_seconds,  # noqa: E402
                                  synchronize)

FIXTURES = REPO / "tests" / "fixtures"
MODELS = {"llama-3.2-3b": ("llama", FIXTURES / "llama-3.2-3b-config.json"),
          "opt-2.7b": ("opt", FIXTURES / "opt-2.7b-config.json")}
SMOKE_SHAPES = {"llama": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=512, bos_token_id=1, eos_token_id=2),
                "opt": dict(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=64, vocab_size=512)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GOAL_FRACTIONS = (0.25, 0.5)  # the kernel goal: within --goal-x of the bytes floor at these MLP fractions


# ------------------------------------------------------------------------------------------------ the model
@dataclass
class Model:
    name: str
    family: str
    config: object
    hf: nn.Module
    embeddings: nn.Module
    blocks: list
    lm_head: nn.Module

    @property
    def attention(self):
        return self.blocks[0].self_attn

    @property
    def kv_heads(self) -> int:
        return getattr(self.attention, "num_kv_heads", self.attention.num_heads)

    @property
    def ffn(self) -> int:
        return self.config.ffn_dim if self.family == "opt" else self.config.intermediate_size


def model_config(name: str, smoke: bool):
    family, path = MODELS[name]
    values = json.loads(path.read_text())
    if smoke:
        values.update(SMOKE_SHAPES[family])
    return family, (OPTConfig if family == "opt" else LlamaConfig)(**values)


def build_model(name: str, smoke: bool, device: torch.device, dtype: torch.dtype, seed: int) -> Model:
    """A random HF model and our embeddings / blocks / LM head filled by the converter's own plan with its tensors."""
    family, config = model_config(name, smoke)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = (OPTForCausalLM if family == "opt" else LlamaForCausalLM)(config).to(dtype).eval().requires_grad_(False)
        for p_name, p in hf.named_parameters():  # norms start at 1 and biases at 0: perturb them
            if "norm" in p_name or p_name.endswith(".bias"):
                p.data.add_(0.05 * torch.randn_like(p))
    state = hf.state_dict()
    layers = config.num_hidden_layers
    if family == "opt":
        plan, module = convert_opt_checkpoint.conversion_plan(set(state), layers), hf_opt_module
    else:
        plan = convert_llama_checkpoint.conversion_plan(set(state), layers, config.tie_word_embeddings)
        module = hf_llama_module

    def piece(cls, filename, *args):
        with torch.device("meta"):
            m = cls(*args)
        m.load_state_dict({k: state[v] for k, v in plan[filename].items()}, strict=True, assign=True)
        return m.eval()

    return Model(name, family, config, hf, piece(module.GPTEmbeddings, "pytorch_embs.pt", config),
                 [piece(module.GPTBlock, f"pytorch_{i}.pt", config, i) for i in range(layers)],
                 piece(module.GPTLMHead, "pytorch_lm_head.pt", config))


def random_predictors(model: Model, D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The study's predictor shape per layer, Linear(d, D) -> Linear(D, out), random weights."""
    d = model.config.hidden_size
    out = {}
    for layer in range(len(model.blocks)):
        for block, width in (("mlp", model.ffn), ("att", model.attention.num_heads)):
            with torch.device(device):
                out[(block, layer)] = nn.Sequential(nn.Linear(d, D, bias=False), nn.Linear(D, width, bias=False)
                                                    ).to(dtype).eval()
    return out


# ------------------------------------------------------------------------------------------------- timing
# -------------------------------------------------------------------------------------------------- masks
def random_masks(gen: torch.Generator, batch: int, n: int, k: int, shared: bool, device) -> torch.Tensor:
    """(B, N) masks of k random units per row: independent rows, or one mask repeated."""
    rows = 1 if shared else batch
    mask = torch.zeros(rows, n, dtype=torch.bool)
    for r in range(rows):
        mask[r, torch.randperm(n, generator=gen)[:k]] = True
    return mask.expand(batch, n).to(device)


def given_selections(model: Model, batch: int, mlp_k: Optional[int], att_k: Optional[int], shared: bool,
                     gen: torch.Generator, dtype, device) -> dict:
    selections = {}
    for layer in range(len(model.blocks)):
        for block, k, n in (("mlp", mlp_k, model.ffn), ("att", att_k, model.attention.num_heads)):
            if k is not None:
                mask = random_masks(gen, batch, n, k, shared, device)
                selections[(block, layer)] = (sparse_decode.Selection(mask[0].nonzero()[:, 0], torch.full(
                    (1,), k, dtype=torch.int32, device=device)) if batch == 1 or shared
                    else sparse_decode.select_mask(mask, dtype, capacity=min(n, batch * k)))
    return selections


def union_fraction(selections: dict, block: str, width: int) -> Optional[float]:
    counts = [int(s.count) for (b, _), s in selections.items() if b == block]
    return sum(counts) / (len(counts) * width) if counts else None


# -------------------------------------------------------------------------------------------------- floors
def step_bytes(model: Model, batch: int, length: int, mlp_units: Optional[float], att_heads: Optional[float],
               predictor_D: Optional[int], element: int) -> int:
    """Fewest bytes one decode step reads: per layer the kept heads' q and o weights, every k and v weight, the kept
    neurons' MLP weights, norms and biases, the whole KV cache, the predictors if any; the embedding rows and LM head.
    `mlp_units` / `att_heads` are the mean units computed per layer (the union at batch > 1), None for all."""
    c, d, hd = model.config, model.config.hidden_size, model.attention.head_dim
    heads, kv, ffn = model.attention.num_heads, model.kv_heads, model.ffn
    kept_heads = heads if att_heads is None else att_heads
    kept_units = ffn if mlp_units is None else mlp_units
    mlp_matrices = 2 if model.family == "opt" else 3
    per_layer = (2 * kept_heads * hd * d + 2 * kv * hd * d + mlp_matrices * kept_units * d + 2 * d
                 + 2 * batch * kv * length * hd)  # weights, norms, the cache's keys and values
    if model.family == "opt":
        per_layer += kept_heads * hd + 2 * kv * hd + d + kept_units + d + 2 * d  # q, k, v, o, fc1, fc2, LN biases
    if predictor_D is not None:
        per_layer += predictor_D * (2 * d + ffn + heads)
    head = c.vocab_size * d + d * (2 if model.family == "opt" else 1)
    return element * (len(model.blocks) * per_layer + head + batch * d)


def step_flops(model: Model, batch: int, step_bytes_: int, element: int) -> int:
    """2 FLOPs per weight element per row (the matrices dominate; attention over the cache is counted as weights)."""
    return 2 * batch * step_bytes_ // element


def floor_fields(seconds: float, bytes_: int, flops: int, bandwidth: float, peak: float) -> dict:
    floor = max(bytes_ / bandwidth, flops / peak)
    return {"floor_bytes": bytes_, "floor_us": floor * 1e6, "floor_gap_x": seconds / floor,
            "floor_bound": "bytes" if bytes_ / bandwidth >= flops / peak else "flops"}


# ----------------------------------------------------------------------------------------------- the stages
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device, self.dtype = args.device_obj, DTYPES[args.dtype]
        self.graph = self.device.type == "cuda" and not args.no_graphs
        self.backend = None if self.device.type == "cuda" else "torch"
        self.glue, glue_error = self.make_glue(args.glue)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"cpu ({os.cpu_count()})"
        self.report = {"device": name, "settings": {k: v for k, v in vars(args).items() if k != "device_obj"},
                       "provenance": base_manifest(), "models": {}, "errors": [], "complete": False,
                       "weights": "random (the speed of the real shapes, not of a trained model)",
                       "timing": ("CUDA graph replays between CUDA events" if self.graph else
                                  "CUDA events around eager steps" if self.device.type == "cuda" else
                                  "a host clock around eager steps"),
                       "glue": args.glue if glue_error is None else f"eager: compiling failed ({glue_error})"}
        self.deadline = self.started + args.time_budget_s

    def make_glue(self, kind: str) -> tuple[sparse_decode.Glue, Optional[str]]:
        """The compiled glue, tried once on small tensors; if compiling fails the run goes on eagerly and says so."""
        if kind == "eager":
            return sparse_decode.EAGER, None
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)  # 2 models x batches
        glue = sparse_decode.Glue.compiled()
        try:
            x = torch.randn(2, 1, 64, device=self.device, dtype=self.dtype)
            glue.norm(hf_llama_module.LlamaRMSNorm(64, 1e-5).to(self.device, self.dtype), x)
            glue.rotate(x.view(2, 4, 16), x.view(2, 4, 1, 16), x[0, :, :16], x[1, :, :16])
            return glue, None
        except Exception as e:  # noqa: BLE001 - recorded in the JSON and printed
            print(f"torch.compile of the glue failed, timing eager glue instead: {e!r}", flush=True)
            return sparse_decode.EAGER, repr(e)[:500]

    def save(self) -> None:
        self.report["total_seconds"] = time.perf_counter() - self.started
        write_json_atomic(self.out / "bench_sparse_decode.json", self.report)

    def time_of(self, fn) -> float:
        return median_seconds(fn, self.device, self.args.reps, self.graph)

    def stage(self, model_report: dict, name: str, fn) -> None:
        """Run one stage; an error is recorded (with its traceback) and the run goes on."""
        started = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failed stage must not lose the others' numbers
            model_report.setdefault("errors", []).append({"stage": name, "error": repr(e),
                                                          "traceback": traceback.format_exc()[-4000:]})
            print(f"  stage {name} failed: {e!r}", flush=True)
        model_report.setdefault("stage_seconds", {})[name] = time.perf_counter() - started
        self.save()

    def over_budget(self) -> bool:
        return time.perf_counter() > self.deadline

    # -------------------------------------------------------------------------------------------- ceilings
    def ceilings(self) -> None:
        self.bandwidth = copy_bandwidth(self.device, self.args.reps)
        self.peak, peak_dtype = matmul_peak(self.device)
        self.report["ceilings"] = {"copy_bytes_per_s": self.bandwidth, "matmul_flops_per_s": self.peak,
                                   "matmul_dtype": peak_dtype}
        self.save()

    # -------------------------------------------------------------------------------------------- per model
    def run_model(self, name: str) -> None:
        a = self.args
        model = build_model(name, a.smoke, self.device, self.dtype, a.seed)
        report = self.report["models"][name] = {
            "family": model.family, "layers": len(model.blocks), "hidden": model.config.hidden_size,
            "ffn": model.ffn, "heads": model.attention.num_heads, "kv_heads": model.kv_heads,
            "head_dim": model.attention.head_dim, "vocab": model.config.vocab_size, "context": a.context,
            "kernel": [], "decode": [], "hf_generate": []}
        self.save()
        gen = torch.Generator().manual_seed(a.seed)
        self.stage(report, "check", lambda: report.update(check=self.check(model, gen)))
        if a.check_only:
            return
        self.stage(report, "kernel", lambda: self.kernel_stage(model, report, gen))
        for batch in a.batches:
            if self.over_budget():
                report.setdefault("skipped", []).append(f"batch {batch}: over --time-budget-s")
                continue
            self.stage(report, f"decode_b{batch}", lambda: self.decode_stage(model, report, batch, gen))
            self.stage(report, f"hf_b{batch}", lambda: report["hf_generate"].append(self.hf_generate(model, batch)))
        del model
        free_device_memory(self.device)

    def budgets(self, model: Model) -> list[tuple[Optional[float], Optional[float]]]:
        a = self.args
        pairs = [(m, None) for m in a.mlp_fractions] + [(None, h) for h in a.att_fractions]
        return pairs + [(m, h) for m in a.mlp_fractions for h in a.att_fractions]

    def counts(self, model: Model, mlp_f, att_f) -> tuple[Optional[int], Optional[int]]:
        return (None if mlp_f is None else fraction_count(mlp_f, model.ffn),
                None if att_f is None else fraction_count(att_f, model.attention.num_heads))

    def decoder(self, model: Model, batch: int, masks) -> tuple[sparse_decode.StaticDecoder, torch.Tensor]:
        a = self.args
        slots = -(-(a.context + 1) // 16) * 16  # a multiple of 16 keeps SDPA's fused kernels (masked past it)
        cache = sparse_decode.StaticCache(len(model.blocks), batch, model.kv_heads, slots,
                                          model.attention.head_dim, self.dtype, self.device)
        cache.k.normal_()
        cache.v.normal_()
        cache.set_position(a.context)
        ids = torch.randint(3, model.config.vocab_size, (batch, 1), device=self.device)
        return sparse_decode.StaticDecoder(model.embeddings, model.blocks, model.lm_head, masks, cache,
                                           self.backend, self.glue), ids

    # -------------------------------------------------------------------------------------------- check
    def check(self, model: Model, gen: torch.Generator) -> dict:
        """Kernels against the torch backend (float32 reference), and sparse / dense steps against the simulation."""
        d, n = model.config.hidden_size, model.ffn
        result = {}
        block = model.blocks[0]
        up = None if model.family == "opt" else block.mlp.up_proj.weight
        w_rows = block.fc1.weight if model.family == "opt" else block.mlp.gate_proj.weight
        down = block.fc2 if model.family == "opt" else block.mlp.down_proj
        act = "relu" if model.family == "opt" else "silu"
        for batch in self.args.batches:
            x = torch.randn(batch, d, generator=gen).to(self.device, self.dtype)
            sel = sparse_decode.select_top_k(torch.randn(batch, n, generator=gen).to(self.device),
                                             fraction_count(0.25, n), self.dtype)
            y = rows_times(x, w_rows, sel, up=up, act=act, backend=self.backend)
            ref = rows_times(x.float(), w_rows.float(), sel, up=None if up is None else up.float(), act=act,
                             backend="torch")
            a = torch.randn(batch, sel.index.numel(), generator=gen).to(self.device, self.dtype)
            a = a if sel.keep is None else a * sel.keep
            z = columns_times(a, down, sel, backend=self.backend)
            down32 = nn.Linear(n, d, bias=False).to(self.device)
            down32.weight.data.copy_(down.weight.float())
            z_ref = columns_times(a.float(), down32, sel, backend="torch")
            result[f"kernels_b{batch}"] = {"rows_rel_error": relative_error(y, ref),
                                           "columns_rel_error": relative_error(z, z_ref)}
        mlp_k, att_k = self.counts(model, 0.25, 0.5)
        for batch in self.args.batches:
            selections = given_selections(model, batch, mlp_k, att_k, False, gen, self.dtype, self.device)
            masks = sparse_decode.GivenMasks(selections)
            decoder, ids = self.decoder(model, batch, masks)
            dense_decoder = sparse_decode.StaticDecoder(decoder.embeddings, decoder.blocks, decoder.lm_head,
                                                        sparse_decode.GivenMasks({}), decoder.cache, self.backend,
                                                        self.glue)
            with torch.inference_mode():
                sparse_logits, reference = decoder.step(ids), simulated_step(model, decoder.cache, ids, selections)
                dense_logits, dense_reference = dense_decoder.step(ids), simulated_step(model, decoder.cache, ids, {})
            result[f"decode_b{batch}"] = {"sparse_vs_simulation_rel_error": relative_error(sparse_logits, reference),
                                          "dense_vs_simulation_rel_error": relative_error(dense_logits,
                                                                                          dense_reference)}
        ids = torch.randint(3, model.config.vocab_size, (1, 24), generator=gen).to(self.device)
        with torch.inference_mode():
            hf_logits = model.hf(ids).logits[0]
            ours = simulated_prefill(model, ids)
        result["dense_prefill_vs_hf_rel_error"] = relative_error(ours, hf_logits)
        return result

    # -------------------------------------------------------------------------------------------- kernel
    def kernel_stage(self, model: Model, report: dict, gen: torch.Generator) -> None:
        """The MLP's gathered kernels alone over all layers, and the dense MLP, per layer."""
        d, n, layers = model.config.hidden_size, model.ffn, len(model.blocks)
        element = torch.finfo(self.dtype).bits // 8
        opt = model.family == "opt"
        for batch in self.args.batches:
            x = torch.randn(batch, d, generator=gen).to(self.device, self.dtype)

            def dense_mlp():
                for block in model.blocks:
                    if opt:
                        block.fc2(F.relu(block.fc1(x)))
                    else:
                        block.mlp.down_proj(F.silu(block.mlp.gate_proj(x)) * block.mlp.up_proj(x))

            with torch.inference_mode():
                dense_s = self.time_of(dense_mlp) / layers
            matrices = 2 if opt else 3
            dense_bytes = element * matrices * n * d
            report["kernel"].append({"batch": batch, "mlp_fraction": None, "per_layer_us": dense_s * 1e6,
                                     **floor_fields(dense_s, dense_bytes, 2 * batch * matrices * n * d,
                                                    self.bandwidth, self.peak)})
            for fraction in self.args.mlp_fractions:
                k = fraction_count(fraction, n)
                sel = given_selections(model, batch, k, None, False, gen, self.dtype, self.device)

                def sparse_mlp():
                    for layer, block in enumerate(model.blocks):
                        s = sel[("mlp", layer)]
                        if opt:
                            columns_times(rows_times(x, block.fc1.weight, s, bias=block.fc1.bias, act="relu",
                                                     backend=self.backend), block.fc2, s, backend=self.backend)
                        else:
                            columns_times(rows_times(x, block.mlp.gate_proj.weight, s, up=block.mlp.up_proj.weight,
                                                     act="silu", backend=self.backend), block.mlp.down_proj, s,
                                          backend=self.backend)

                with torch.inference_mode():
                    seconds = self.time_of(sparse_mlp) / layers
                units = union_fraction(sel, "mlp", n) * n
                bytes_ = int(element * matrices * units * d)
                row = {"batch": batch, "mlp_fraction": fraction, "mlp_kept": k, "mlp_union_fraction": units / n,
                       "per_layer_us": seconds * 1e6, "speedup_vs_dense_mlp": dense_s / seconds,
                       **floor_fields(seconds, bytes_, 2 * batch * matrices * int(units) * d, self.bandwidth,
                                      self.peak)}
                if fraction in GOAL_FRACTIONS and batch == 1:
                    row["goal_x"], row["goal_met"] = self.args.goal_x, row["floor_gap_x"] <= self.args.goal_x
                report["kernel"].append(row)
                self.save()

    # -------------------------------------------------------------------------------------------- decode
    def decode_stage(self, model: Model, report: dict, batch: int, gen: torch.Generator) -> None:
        a = self.args
        element = torch.finfo(self.dtype).bits // 8
        layers = len(model.blocks)
        ends_s = self.ends_seconds(model, batch)
        predictors = random_predictors(model, a.D, self.dtype, self.device)

        def record(mode, masks_kind, mlp_f, att_f, seconds, mlp_units, att_units, predictor_s=None):
            mlp_k, att_k = self.counts(model, mlp_f, att_f)
            bytes_ = step_bytes(model, batch, a.context + 1, mlp_units, att_units,
                                a.D if mode == "predictor" else None, element)
            row = {"batch": batch, "mode": mode, "masks": masks_kind, "mlp_fraction": mlp_f, "att_fraction": att_f,
                   "mlp_kept": mlp_k, "att_kept": att_k,
                   "mlp_union_fraction": None if mlp_units is None else mlp_units / model.ffn,
                   "att_union_fraction": None if att_units is None else att_units / model.attention.num_heads,
                   "step_us": seconds * 1e6, "tokens_per_s": batch / seconds,
                   "per_layer_us": (seconds - ends_s) / layers * 1e6,
                   **floor_fields(seconds, bytes_, step_flops(model, batch, bytes_, element), self.bandwidth,
                                  self.peak)}
            if predictor_s is not None:
                row.update(predictor_us=predictor_s * 1e6, predictor_share=predictor_s / seconds)
            if dense_s is not None:
                row["speedup_vs_dense"] = dense_s / seconds
            report["decode"].append(row)
            self.save()
            print(f"  {model.name} b{batch} {mode:9s} {masks_kind:11s} mlp={mlp_f} att={att_f}: "
                  f"{row['tokens_per_s']:.1f} tok/s, {row['floor_gap_x']:.2f}x floor", flush=True)

        dense_s = None
        decoder, ids = self.decoder(model, batch, sparse_decode.GivenMasks({}))
        dense_s = self.time_of(lambda: decoder.step(ids))
        record("dense", "n/a", None, None, dense_s, None, None)
        for mlp_f, att_f in self.budgets(model):
            if self.over_budget():
                report.setdefault("skipped", []).append(f"batch {batch} mlp={mlp_f} att={att_f}: over budget")
                continue
            mlp_k, att_k = self.counts(model, mlp_f, att_f)
            for shared in ((False,) if batch == 1 else (False, True)):
                sel = given_selections(model, batch, mlp_k, att_k, shared, gen, self.dtype, self.device)
                decoder, ids = self.decoder(model, batch, sparse_decode.GivenMasks(sel))
                seconds = self.time_of(lambda: decoder.step(ids))
                kind = "one" if batch == 1 else ("shared" if shared else "independent")
                record("given", kind, mlp_f, att_f, seconds, units(sel, "mlp", model.ffn),
                       units(sel, "att", model.attention.num_heads))
            masks = sparse_decode.PredictorMasks(predictors, {l: mlp_k for l in range(layers) if mlp_k},
                                                 {l: att_k for l in range(layers) if att_k})
            decoder, ids = self.decoder(model, batch, masks)
            seconds = self.time_of(lambda: decoder.step(ids))
            mlp_units = units(masks.selected, "mlp", model.ffn)  # the step's own unions, before the next graph
            att_units = units(masks.selected, "att", model.attention.num_heads)
            record("predictor", "predicted", mlp_f, att_f, seconds, mlp_units, att_units,
                   self.predictor_seconds(model, batch, masks))

    def ends_seconds(self, model: Model, batch: int) -> float:
        """Embedding and LM head of a step: what per-layer times leave out."""
        decoder, ids = self.decoder(model, batch, sparse_decode.GivenMasks({}))
        x = torch.randn(batch, 1, model.config.hidden_size, device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            return self.time_of(lambda: (decoder.embed(ids), decoder.head(x)))

    def predictor_seconds(self, model: Model, batch: int, masks: sparse_decode.PredictorMasks) -> float:
        """The predictors' own work in a step (scores, top-k, the batch's union), all layers, on fixed inputs."""
        xs = [torch.randn(batch, 1, model.config.hidden_size, device=self.device, dtype=self.dtype)
              for _ in model.blocks]

        def predict():
            for layer, x in enumerate(xs):
                masks.heads(layer, x)
                masks.neurons(layer, x)

        with torch.inference_mode():
            return self.time_of(predict)

    # -------------------------------------------------------------------------------------------- HF generate
    def hf_generate(self, model: Model, batch: int) -> dict:
        """Seconds per new token of HF `generate` (greedy, its default cache): two lengths, prefill cancelled."""
        a = self.args
        ids = torch.randint(3, model.config.vocab_size, (batch, a.context), device=self.device)
        short, long = a.hf_tokens

        def run(n):
            with torch.inference_mode():
                model.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=model.config.pad_token_id)

        run(short)  # warm-up
        times = {}
        for n in (short, long):
            samples = []
            for _ in range(a.hf_reps):
                synchronize(self.device)
                start = time.perf_counter()
                run(n)
                synchronize(self.device)
                samples.append(time.perf_counter() - start)
            times[n] = statistics.median(samples)
        per_token = (times[long] - times[short]) / (long - short)
        row = {"batch": batch, "new_tokens": [short, long], "seconds": {str(n): t for n, t in times.items()}}
        if per_token <= 0:  # timing noise larger than the extra tokens' cost (the CPU smoke)
            return {**row, "step_us": None, "tokens_per_s": None, "note": "the longer run was not slower"}
        dense = [r for r in self.report["models"][model.name]["decode"]
                 if r["batch"] == batch and r["mode"] == "dense"]
        return {**row, "step_us": per_token * 1e6, "tokens_per_s": batch / per_token,
                "per_layer_us": per_token * 1e6 / len(model.blocks),  # the whole step over the layers
                "ours_dense_speedup": per_token / (dense[0]["step_us"] * 1e-6) if dense else None}


def units(selections: dict, block: str, width: int) -> Optional[float]:
    fraction = union_fraction(selections, block, width)
    return None if fraction is None else fraction * width


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def row_masks(sel, batch: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, width) 0/1: the units each row keeps under a selection."""
    count = int(sel.count)
    kept = (torch.ones(batch, count, dtype=dtype, device=sel.index.device) if sel.keep is None
            else sel.keep[:, :count].to(dtype))
    mask = torch.zeros(batch, width, dtype=dtype, device=sel.index.device)
    mask[:, sel.index[:count]] = kept
    return mask


def simulated_step(model: Model, cache: sparse_decode.StaticCache, ids: torch.Tensor, selections: dict):
    """The masked simulation of the same step: the dense blocks' forward over the cache's keys and values, with the
    same masks applied after the dense projections (what sparsity.py's keep_heads / keep_neurons do)."""
    position, batch, dtype = int(cache.position), ids.shape[0], cache.dtype
    x = model.embeddings(ids, position)
    bias = torch.zeros(batch, 1, 1, position + 1, dtype=dtype, device=ids.device)
    for layer, block in enumerate(model.blocks):
        seams = {}
        if ("att", layer) in selections:
            heads = row_masks(selections[("att", layer)], batch, model.attention.num_heads, dtype)
            seams["keep_heads"] = lambda t, m=heads: t * m[:, None, :, None]  # (B, T, H, hd)
        if ("mlp", layer) in selections:
            neurons = row_masks(selections[("mlp", layer)], batch, model.ffn, dtype)
            seams["keep_neurons"] = lambda t, m=neurons: t * m[:, None, :]  # (B, T, ffn)
        block.__dict__.update(seams)  # instance attributes shadow the dense seams for this call
        try:
            x, _ = block(x, bias, (cache.k[layer][:, :, :position], cache.v[layer][:, :, :position]))
        finally:
            for name in seams:
                del block.__dict__[name]
    return model.lm_head(x)[:, 0]


def simulated_prefill(model: Model, ids: torch.Tensor) -> torch.Tensor:
    t = ids.shape[1]
    dtype = model.lm_head.lm_head.weight.dtype
    bias = torch.zeros(1, 1, t, t, dtype=dtype, device=ids.device).masked_fill(
        torch.ones(t, t, dtype=torch.bool, device=ids.device).triu(1), torch.finfo(dtype).min)
    x = model.embeddings(ids)
    for block in model.blocks:
        x, _ = block(x, bias)
    return model.lm_head(x)[0]


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "bench_sparse_decode"),
                   help="directory of bench_sparse_decode.json (default $OUT/bench_sparse_decode or "
                        "out/bench_sparse_decode)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="default both")
    p.add_argument("--smoke", action="store_true", help="tiny shapes of both architectures on the CPU: seconds")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8],
                   help="decode batch sizes (default 1 8; 1 2 with --smoke)")
    p.add_argument("--mlp-fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5],
                   help="MLP neurons kept, fractions (default 0.1 0.25 0.5)")
    p.add_argument("--att-fractions", type=float, nargs="+", default=[0.25, 0.5],
                   help="query heads kept, fractions; each alone and with every MLP fraction (default 0.25 0.5)")
    p.add_argument("--context", type=int, default=512, help="tokens already in the KV cache (default %(default)s)")
    p.add_argument("--D", type=int, default=1000, help="predictor width, the study's (default %(default)s)")
    p.add_argument("--reps", type=int, default=50, help="timed repetitions per measurement, median (default "
                                                         "%(default)s)")
    p.add_argument("--hf-tokens", type=int, nargs=2, default=[8, 40], help="the two generate lengths (default 8 40)")
    p.add_argument("--hf-reps", type=int, default=3, help="generate runs per length, median (default %(default)s)")
    p.add_argument("--goal-x", type=float, default=1.25, help="kernel goal: times its bytes floor (default 1.25)")
    p.add_argument("--time-budget-s", type=float, default=420.0,
                   help="each model gets an equal share of what is left; settings not started within it are skipped "
                        "and listed (default %(default)s)")
    p.add_argument("--check-only", action="store_true",
                   help="only the correctness check (kernels and steps against the simulation, prefill against HF), "
                        "e.g. with --dtype fp32 to tell bf16 rounding from a fault")
    p.add_argument("--no-graphs", action="store_true", help="time eager steps on CUDA (default: CUDA graphs)")
    p.add_argument("--glue", choices=("compiled", "eager"), default=None,
                   help="norms and rotary embedding through torch.compile (one kernel each; the default on CUDA) or "
                        "the blocks' own eager code (the default on the CPU); same for dense and sparse steps")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--seed", type=int, default=0, help="weights, masks, predictors (default %(default)s)")
    p.add_argument("--device", default=None, help="default cuda:0 if available (cpu with --smoke)")
    args = p.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.context, args.D, args.reps, args.hf_tokens, args.hf_reps = 16, 16, 3, [2, 4], 1
        args.batches = [1, 2] if args.batches == [1, 8] else args.batches
    args.device_obj = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("bf16" if args.device_obj.type == "cuda" else "fp32")
    args.glue = args.glue or ("compiled" if args.device_obj.type == "cuda" else "eager")
    if args.hf_tokens[1] <= args.hf_tokens[0]:
        p.error("--hf-tokens: the second length must be larger")
    return args


def print_table(report: dict) -> None:
    print(f"\n{'model':14s} {'b':>2s} {'mode':9s} {'masks':11s} {'mlp':>5s} {'att':>5s} {'tok/s':>9s} "
          f"{'speedup':>7s} {'floor x':>7s} {'pred %':>6s}")
    for name, m in report["models"].items():
        for r in m.get("decode", []):
            f = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
            share = r.get("predictor_share")
            print(f"{name:14s} {r['batch']:>2d} {r['mode']:9s} {r['masks']:11s} {f(r['mlp_fraction']):>5s} "
                  f"{f(r['att_fraction']):>5s} {r['tokens_per_s']:9.1f} {r.get('speedup_vs_dense', 1):7.2f} "
                  f"{r['floor_gap_x']:7.2f} {'-' if share is None else f'{100 * share:.0f}':>6s}")
        for r in m.get("hf_generate", []):
            if r["tokens_per_s"] is not None:
                print(f"{name:14s} {r['batch']:>2d} HF generate {'':29s} {r['tokens_per_s']:9.1f}")
        for r in m.get("kernel", []):
            if r.get("goal_x"):
                print(f"{name:14s} MLP kernel at {r['mlp_fraction']}: {r['per_layer_us']:.1f} us/layer, "
                      f"{r['floor_gap_x']:.2f}x its bytes floor (goal {r['goal_x']}x: "
                      f"{'met' if r['goal_met'] else 'missed'})")
        for e in m.get("errors", []):
            print(f"{name}: stage {e['stage']} failed: {e['error']}")


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    bench = Bench(args)
    with torch.no_grad():
        bench.ceilings()
        for i, name in enumerate(args.models):
            print(f"{name}:", flush=True)
            left = args.time_budget_s - (time.perf_counter() - bench.started)
            bench.deadline = time.perf_counter() + left / (len(args.models) - i)  # an equal share of what is left
            bench.run_model(name)
    bench.report["complete"] = True
    bench.save()
    print_table(bench.report)
    print(f"wrote {bench.out / 'bench_sparse_decode.json'}")
    return bench.report


if __name__ == "__main__":
    main()
