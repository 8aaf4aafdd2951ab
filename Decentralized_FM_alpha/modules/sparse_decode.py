"""DejaVu's sparse decode step with real gathered kernels: what the simulation's masks buy (SPEC section 8).

The simulation (sparsity.py) masks after the dense projections and computes nothing less. Here, for one new token
per row with a KV cache, a layer computes only
  MLP        the selected neurons: Llama's gate and up rows and down columns, OPT's fc1 rows and fc2 columns;
  attention  the selected query heads' q rows and o_proj / out_proj columns. Keys and values of every head are still
             computed and written to the cache, as in the simulation, and attention reads the whole cache (a head
             outside the selection costs its share of that read, not its weights).
A batch computes the union of its rows' selections and then zeroes, in each row, what that row's own mask drops, so
every row gets exactly what the simulation gives it; the union grows with the batch and the saving shrinks.

Where masks come from:
  SimulationMasks  the runner's SparsityController (the simulation's own head_mask / neuron_mask rule, so modes,
                   budgets and dense layers are shared); modes that rank by the dense activations (oracle, gate)
                   cannot skip computing them and are refused
  PredictorMasks   low-rank predictors on the device, top-k of their scores (the bench)
  GivenMasks       fixed selections (the bench's kernel-alone timing, tests)
Entry points: `runner_step` (a sparse block of the runner, concatenated cache; `--sparse-decode kernels`) and
`StaticDecoder` (a whole model with a preallocated cache, same shapes every step, for CUDA graphs; its `Glue` can be
compiled, so that a norm or the rotary embedding is one kernel instead of a dozen). The kernels are in
sparse_kernels.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from Decentralized_FM_alpha.modules import hf_llama_module, hf_opt_module
from Decentralized_FM_alpha.modules.sparse_kernels import Selection, columns_times, rows_times

DECODE_CHOICES = ("simulate", "kernels")
DECODABLE_MODES = ("dense", "predictor", "random", "static")  # modes whose masks need no dense activation


# ------------------------------------------------------------------------------------------------- selections
def select_mask(mask: torch.Tensor, dtype: torch.dtype, capacity: Optional[int] = None) -> Selection:
    """The union of the rows' masks (B, N) as `capacity` entries (default N) in unit order, padding after `count`,
    and each row's own mask on them. No host synchronisation: usable inside a CUDA graph."""
    b, n = mask.shape
    capacity = n if capacity is None else capacity
    arange = torch.arange(n, device=mask.device)
    union = mask.any(0)
    slot = torch.where(union, union.cumsum(0) - 1, capacity)  # outside the union: a spill slot, cut off below
    index = torch.zeros(capacity + 1, dtype=torch.long, device=mask.device).scatter_(0, slot, arange)[:capacity]
    count = union.sum(dtype=torch.int32).reshape(1)
    real = torch.arange(capacity, device=mask.device) < count
    keep = mask.gather(1, index.expand(b, -1)) & real
    return Selection(index, count, keep.to(dtype))


def select_top_k(scores: torch.Tensor, k: int, dtype: torch.dtype) -> Selection:
    """Each row's k highest scores (B, N): batch 1 as they are, a batch as the union (at most B * k entries)."""
    b, n = scores.shape
    top = scores.topk(k, dim=-1).indices
    if b == 1:
        return Selection(top[0], torch.full((1,), k, dtype=torch.int32, device=scores.device))
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    return select_mask(mask, dtype, capacity=min(n, b * k))


# ----------------------------------------------------------------------------------- where the masks come from
class Masks(Protocol):
    def heads(self, layer: int, att_x: torch.Tensor) -> Optional[Selection]: ...

    def neurons(self, layer: int, mlp_x: torch.Tensor) -> Optional[Selection]: ...


class SimulationMasks:
    """The masks the simulation would apply: the controller's own head_mask / neuron_mask rule (the predictors read
    the inputs the block records), without counting on-policy recall (a decode step computes no dense activation to
    count against). None where the controller leaves a layer's block dense."""

    def __init__(self, sparsity):
        if sparsity.plan.mode not in DECODABLE_MODES:
            raise ValueError(f"--sparse-decode kernels: mode {sparsity.plan.mode!r} ranks by the dense activations, "
                             f"so nothing can be skipped; modes that can: {DECODABLE_MODES}")
        self.sparsity = sparsity

    def heads(self, layer: int, att_x: torch.Tensor) -> Optional[Selection]:
        if not self.sparsity.is_sparse("att", layer):
            return None
        shape = (att_x.shape[0], 1, self.sparsity.dims.num_heads)  # (B, T=1, H): random mode draws by this shape
        mask = self.sparsity.head_mask(layer, lambda: att_x.new_ones(shape))
        return select_mask(torch.broadcast_to(mask, shape)[:, 0], att_x.dtype)  # a static mask is (H,)

    def neurons(self, layer: int, mlp_x: torch.Tensor) -> Optional[Selection]:
        if not self.sparsity.is_sparse("mlp", layer):
            return None
        shape = (mlp_x.shape[0], 1, self.sparsity.dims.ffn_dim)
        mask = self.sparsity.neuron_mask(layer, lambda: mlp_x.new_ones(shape))
        return select_mask(torch.broadcast_to(mask, shape)[:, 0], mlp_x.dtype)


class PredictorMasks:
    """DejaVu's predictors on the device, in the same step: the MLP predictor of layer l reads att_x_l, the
    attention predictor att_x_{l-1} (att_x_0 for layer 0), the study's lookahead inputs; top-k of their scores."""

    def __init__(self, predictors: dict[tuple[str, int], nn.Module], mlp_k: dict[int, int], att_k: dict[int, int]):
        self.predictors, self.mlp_k, self.att_k = predictors, mlp_k, att_k
        self.att_x: dict[int, torch.Tensor] = {}
        self.selected: dict[tuple[str, int], Selection] = {}  # the last step's, for reading the union sizes

    def heads(self, layer: int, att_x: torch.Tensor) -> Optional[Selection]:
        self.att_x[layer] = att_x
        if layer not in self.att_k:
            return None
        source = self.att_x.get(layer - 1, att_x)
        scores = self.predictors[("att", layer)](source[:, 0])
        self.selected[("att", layer)] = select_top_k(scores, self.att_k[layer], att_x.dtype)
        return self.selected[("att", layer)]

    def neurons(self, layer: int, mlp_x: torch.Tensor) -> Optional[Selection]:
        if layer not in self.mlp_k:
            return None
        scores = self.predictors[("mlp", layer)](self.att_x[layer][:, 0])
        self.selected[("mlp", layer)] = select_top_k(scores, self.mlp_k[layer], mlp_x.dtype)
        return self.selected[("mlp", layer)]


class GivenMasks:
    """Fixed selections by (block, layer); absent = dense. No predictor, no selection work in the step."""

    def __init__(self, selections: dict[tuple[str, int], Selection]):
        self.selections = selections

    def heads(self, layer: int, att_x: torch.Tensor) -> Optional[Selection]:
        return self.selections.get(("att", layer))

    def neurons(self, layer: int, mlp_x: torch.Tensor) -> Optional[Selection]:
        return self.selections.get(("mlp", layer))


# ---------------------------------------------------------------------------------------------------- caches
class ConcatKV:
    """The runner's cache: the past (k, v) (B, kv_heads, past, hd) grown by concatenation, the runner's bias."""

    def __init__(self, layer_past: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor):
        self.past, self.bias = layer_past, bias
        self.positions = torch.tensor([float(layer_past[0].shape[2])], device=bias.device)
        self.present: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def rotation(self, inv_freq: torch.Tensor, dtype: torch.dtype):
        return rotation(self.positions, inv_freq, dtype)

    def update(self, k: torch.Tensor, v: torch.Tensor):
        self.present = (torch.cat([self.past[0], k], dim=2), torch.cat([self.past[1], v], dim=2))
        return self.present[0], self.present[1], self.bias


class StaticCache:
    """Keys and values of every layer in preallocated (B, kv_heads, length, hd) buffers; the new token goes to slot
    `position` (a device tensor, set with `set_position`), attention reads all slots with those past it masked. Every
    step has the same shapes, so a step can be captured in a CUDA graph."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (num_layers, batch, kv_heads, length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length, self.dtype = length, dtype
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(length, device=device)
        self.begin_step()

    def set_position(self, position: int) -> None:
        if not 0 <= position < self.length:
            raise ValueError(f"position {position} outside the cache's {self.length} slots")
        self.position.fill_(position)

    def load(self, presents: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a prefill's (k, v) per layer into the first slots and set the position after them."""
        n = presents[0][0].shape[2]
        for layer, (k, v) in enumerate(presents):
            self.k[layer, :, :, :n], self.v[layer, :, :, :n] = k, v
        self.set_position(n)

    def begin_step(self) -> None:
        """Per step, from the device position: the attention bias and the rotary positions (shared by the layers)."""
        allowed = self.slots <= self.position
        self.bias = torch.zeros(self.length, dtype=self.dtype, device=self.slots.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min).view(1, 1, 1, self.length)
        self.positions = self.position.float()
        self._rotation: dict = {}

    def layer(self, index: int) -> "StaticLayerKV":
        return StaticLayerKV(self, index)


class StaticLayerKV:
    def __init__(self, cache: StaticCache, index: int):
        self.cache, self.index = cache, index
        self.positions = cache.positions

    def rotation(self, inv_freq: torch.Tensor, dtype: torch.dtype):
        if dtype not in self.cache._rotation:
            self.cache._rotation[dtype] = rotation(self.positions, inv_freq, dtype)
        return self.cache._rotation[dtype]

    def update(self, k: torch.Tensor, v: torch.Tensor):
        c = self.cache
        c.k[self.index].index_copy_(2, c.position, k)
        c.v[self.index].index_copy_(2, c.position, v)
        return c.k[self.index], c.v[self.index], c.bias


def rotation(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin (T, hd) at the positions, computed as hf_llama_module's LlamaAttention.rotate does."""
    freqs = torch.outer(positions, inv_freq.to(positions.device))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ------------------------------------------------------------------------------------------------------ glue
def apply_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm(x)


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding of q and k, as hf_llama_module's LlamaAttention.rotate computes it."""
    rotate_half = hf_llama_module.rotate_half
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@dataclass(frozen=True)
class Glue:
    """The elementwise steps between the matrix products: the blocks' own code (eager), or the same functions
    through torch.compile (`Glue.compiled()`), fused into one kernel each on a GPU."""
    norm: Callable = apply_norm
    rotate: Callable = rotate

    @staticmethod
    def compiled() -> "Glue":
        return Glue(torch.compile(apply_norm, dynamic=False), torch.compile(rotate, dynamic=False))


EAGER = Glue()


# ------------------------------------------------------------------------------------------------- one layer
def query_heads(h: torch.Tensor, q_proj: nn.Linear, chosen: Optional[Selection], heads: int, hd: int,
                backend: Optional[str]) -> torch.Tensor:
    """q (B, H, hd) of the selected heads only, zeros elsewhere (their attention output is never used)."""
    if chosen is None:
        return q_proj(h).view(h.shape[0], heads, hd)
    q = rows_times(h, q_proj.weight, chosen.rows(hd), bias=q_proj.bias, backend=backend)  # (B, C * hd)
    # index_add, not index_copy: padding entries repeat unit 0 and carry zeros
    return h.new_zeros(h.shape[0], heads, hd).index_add_(1, chosen.index, q.view(h.shape[0], -1, hd))


def output_heads(out: torch.Tensor, o_proj: nn.Linear, chosen: Optional[Selection], hd: int,
                 backend: Optional[str]) -> torch.Tensor:
    """o_proj of the selected heads' outputs (B, H, hd) -> (B, d), each row's dropped heads zeroed."""
    if chosen is None:
        return o_proj(out.flatten(1))
    rows = chosen.rows(hd)
    a = out.index_select(1, chosen.index).flatten(1)
    if rows.keep is not None:
        a = a * rows.keep
    y = columns_times(a, o_proj, rows, backend=backend)
    return y if o_proj.bias is None else y + o_proj.bias


def llama_layer(block: hf_llama_module.GPTBlock, x: torch.Tensor, kv, masks: Masks,
                backend: Optional[str] = None, glue: Glue = EAGER) -> torch.Tensor:
    """One Llama decoder layer on x (B, 1, d); what hf_llama_module.GPTBlock.forward computes, sparse."""
    att, mlp, layer = block.self_attn, block.mlp, block.layer_index
    b, hd, heads, kv_heads = x.shape[0], att.head_dim, att.num_heads, att.num_kv_heads
    block.record("att_x", lambda: x)
    chosen = masks.heads(layer, x)
    h = glue.norm(block.input_layernorm, x)[:, 0]  # (B, d)
    q = query_heads(h, att.q_proj, chosen, heads, hd, backend)  # (B, H, hd)
    k = att.k_proj(h).view(b, kv_heads, 1, hd)
    v = att.v_proj(h).view(b, kv_heads, 1, hd)
    q, k = glue.rotate(q, k, *kv.rotation(att.inv_freq, x.dtype))
    keys, values, bias = kv.update(k, v)
    # A key/value head's group of query heads as SDPA's query axis: the cache is read once per key/value head.
    out = F.scaled_dot_product_attention(q.view(b, kv_heads, heads // kv_heads, hd), keys, values, attn_mask=bias)
    x = x + output_heads(out.reshape(b, heads, hd), att.o_proj, chosen, hd, backend)[:, None]
    block.record("mlp_x", lambda: x)
    chosen = masks.neurons(layer, x)
    h = glue.norm(block.post_attention_layernorm, x)[:, 0]
    if chosen is None:
        y = mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
    else:
        if block.config.hidden_act != "silu":
            raise NotImplementedError(f"sparse decode: Llama MLP activation {block.config.hidden_act!r} (silu only)")
        a = rows_times(h, mlp.gate_proj.weight, chosen, up=mlp.up_proj.weight, act="silu", backend=backend)
        y = columns_times(a, mlp.down_proj, chosen, backend=backend)
    return x + y[:, None]


def opt_layer(block: hf_opt_module.GPTBlock, x: torch.Tensor, kv, masks: Masks,
              backend: Optional[str] = None, glue: Glue = EAGER) -> torch.Tensor:
    """One OPT decoder layer on x (B, 1, d); what hf_opt_module.GPTBlock.forward computes, sparse."""
    att, layer = block.self_attn, block.layer_index
    b, hd, heads = x.shape[0], att.head_dim, att.num_heads
    block.record("att_x", lambda: x)
    chosen = masks.heads(layer, x)
    h = glue.norm(block.self_attn_layer_norm, x)[:, 0]  # (B, d)
    q = query_heads(h, att.q_proj, chosen, heads, hd, backend)  # (B, H, hd)
    k = att.k_proj(h).view(b, heads, 1, hd)
    v = att.v_proj(h).view(b, heads, 1, hd)
    keys, values, bias = kv.update(k, v)
    out = F.scaled_dot_product_attention(q.view(b, heads, 1, hd), keys, values, attn_mask=bias)
    x = x + output_heads(out.reshape(b, heads, hd), att.out_proj, chosen, hd, backend)[:, None]
    block.record("mlp_x", lambda: x)
    chosen = masks.neurons(layer, x)
    h = glue.norm(block.final_layer_norm, x)[:, 0]
    if chosen is None:
        y = block.fc2(F.relu(block.fc1(h)))
    else:
        a = rows_times(h, block.fc1.weight, chosen, bias=block.fc1.bias, act="relu", backend=backend)
        y = columns_times(a, block.fc2, chosen, backend=backend)
        y = y if block.fc2.bias is None else y + block.fc2.bias
    return x + y[:, None]


def decode_layer(block: nn.Module, x: torch.Tensor, kv, masks: Masks, backend: Optional[str] = None,
                 glue: Glue = EAGER) -> torch.Tensor:
    if isinstance(block, hf_llama_module.GPTBlock):
        return llama_layer(block, x, kv, masks, backend, glue)
    if isinstance(block, hf_opt_module.GPTBlock):
        return opt_layer(block, x, kv, masks, backend, glue)
    raise TypeError(f"sparse decode: no decode step for {type(block).__name__}")


# ------------------------------------------------------------------------------------------ the runner's step
def check_decode(decode: str, sparsity) -> str:
    if decode not in DECODE_CHOICES:
        raise ValueError(f"--sparse-decode must be one of {DECODE_CHOICES}, got {decode!r}")
    if decode == "kernels":
        SimulationMasks(sparsity)  # refuses modes that need the dense activations
    return decode


def is_decode_step(x: torch.Tensor, layer_past) -> bool:
    """One new token per row on top of a cache: what the sparse step handles; prompts go through the simulation."""
    return layer_past is not None and x.shape[1] == 1


def runner_step(block: nn.Module, x: torch.Tensor, attention_bias: torch.Tensor, layer_past):
    """A sparse block's forward for a decode step: (x, present), as GPTBlock.forward returns."""
    kv = ConcatKV(layer_past, attention_bias)
    x = decode_layer(block, x, kv, SimulationMasks(block.sparsity))
    return x, kv.present


# ------------------------------------------------------------------------------------ a whole model, one step
class StaticDecoder:
    """Embeddings, blocks and LM head decoding one token per row over a StaticCache; `step` has the same shapes at
    every position (a CUDA graph can capture it)."""

    def __init__(self, embeddings: nn.Module, blocks, lm_head: nn.Module, masks: Masks, cache: StaticCache,
                 backend: Optional[str] = None, glue: Glue = EAGER):
        self.embeddings, self.blocks, self.lm_head = embeddings, list(blocks), lm_head
        self.masks, self.cache, self.backend, self.glue = masks, cache, backend, glue
        for block in self.blocks:  # rotary frequencies on the cache's device: no host copy inside a captured step
            attention = block.self_attn
            if hasattr(attention, "inv_freq"):
                attention.inv_freq = attention.inv_freq.to(cache.slots.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings.embed_tokens(ids)
        if isinstance(self.embeddings, hf_opt_module.GPTEmbeddings):
            x = x + self.embeddings.embed_positions(self.cache.position + hf_opt_module.POSITION_OFFSET)
        return x

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = decode_layer(block, x, self.cache.layer(i), self.masks, self.backend, self.glue)
        return x

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) of the next token after ids (B, 1), written to the cache at its position."""
        self.cache.begin_step()
        return self.head(self.layers(self.embed(ids)))[:, 0]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        opt = isinstance(self.lm_head, hf_opt_module.GPTLMHead)
        norm = self.lm_head.final_layer_norm if opt else self.lm_head.norm
        return self.lm_head.lm_head(self.glue.norm(norm, x))
