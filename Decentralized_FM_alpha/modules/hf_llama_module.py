"""Llama as three pipeline pieces: embeddings, decoder block, LM head.

Computes what Hugging Face `LlamaForCausalLM` computes (SwiGLU MLP, RMSNorm, rotary
positions with plain or `llama3` frequency scaling, grouped-query attention), loaded
strictly from the converted per-layer files of SPEC section 3. The same pieces run Qwen2
(`Qwen2ForCausalLM`): Llama with biases on the q, k and v projections (not o), full attention only.
Its OPT twin is hf_opt_module.py: same classes, same method names, only the architecture differs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, Qwen2Config
from transformers.activations import ACT2FN

from Decentralized_FM_alpha.modules.checkpoint import build_and_load

LayerPast = Optional[tuple[torch.Tensor, torch.Tensor]]
LlamaFamilyConfig = LlamaConfig | Qwen2Config
QKV_BIAS = {"llama": False, "qwen2": True}  # model_type -> biases on q_proj, k_proj, v_proj (never on o_proj)


def check_supported(config: LlamaFamilyConfig) -> None:
    if config.model_type not in QKV_BIAS:
        raise NotImplementedError(f"model_type {config.model_type!r}: the Llama modules run {sorted(QKV_BIAS)}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise NotImplementedError("Llama with attention_bias or mlp_bias is not supported")
    check_full_attention(config)
    rope_config(config)


def check_full_attention(config: LlamaFamilyConfig) -> None:
    """Every layer attends to every earlier token: Qwen2's sliding-window attention is not implemented."""
    if getattr(config, "use_sliding_window", False):
        raise NotImplementedError(f"use_sliding_window=True (sliding_window {config.sliding_window}, "
                                  f"max_window_layers {config.max_window_layers}) is not supported: full attention only")
    other = sorted(set(getattr(config, "layer_types", None) or []) - {"full_attention"})
    if other:
        raise NotImplementedError(f"layer_types {other} are not supported: full attention only")


def rope_config(config: LlamaFamilyConfig) -> tuple[float, dict]:
    """(theta, scaling) from either transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or params)
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported (only default and llama3)")
    scaling["rope_type"] = rope_type
    return theta, scaling


def head_dim_of(config: LlamaFamilyConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_inv_freq(config: LlamaFamilyConfig) -> torch.Tensor:
    """Rotary inverse frequencies (hd/2,), float32, with Llama 3's long-context rescaling if configured."""
    theta, scaling = rope_config(config)
    dim = head_dim_of(config)
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    if scaling["rope_type"] == "default":
        return inv_freq
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class GPTEmbeddings(nn.Module):
    """Token embeddings only: positions enter each attention layer as rotations."""

    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        check_supported(config)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)

    @classmethod
    def from_pretrained(cls, model_path: str, config: LlamaFamilyConfig) -> "GPTEmbeddings":
        return build_and_load(cls, model_path, "pytorch_embs.pt", config)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as Hugging Face does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        d, qkv_bias = config.hidden_size, QKV_BIAS[config.model_type]
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.inv_freq = rope_inv_freq(config)  # a plain attribute: not a weight, rebuilt from config

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, past_length: int):
        positions = torch.arange(past_length, past_length + q.shape[2], device=q.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.to(q.device))  # (T, hd/2), float32 as in HF
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def head_outputs(self, h: torch.Tensor, attention_bias: torch.Tensor, layer_past: LayerPast):
        """Per-query-head attention outputs (B, T, H, hd) before o_proj, and the new (k, v) cache."""
        q, k, v = self.split_heads(self.q_proj(h)), self.split_heads(self.k_proj(h)), self.split_heads(self.v_proj(h))
        past_length = 0 if layer_past is None else layer_past[0].shape[2]
        q, k = self.rotate(q, k, past_length)
        if layer_past is not None:
            k, v = torch.cat([layer_past[0], k], dim=2), torch.cat([layer_past[1], v], dim=2)
        group = self.num_heads // self.num_kv_heads  # query heads sharing one key/value head
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1),
                                             attn_mask=attention_bias)  # (B, H, T, hd)
        return out.transpose(1, 2), (k, v)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]


class GPTBlock(nn.Module):
    """One decoder layer: x + Attn(RMSNorm(x)), then x + down(act(gate(RMSNorm(x))) * up(RMSNorm(x))).

    `record`, `keep_heads` and `keep_neurons` are the seams where the collecting
    (hf_llama_module_save) and sparse (hf_llama_sparse_mlp_attention) variants hook in; here
    they record nothing and keep everything.
    """

    def __init__(self, config: LlamaFamilyConfig, layer_index: int):
        super().__init__()
        check_supported(config)
        self.config, self.layer_index = config, layer_index
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    @classmethod
    def from_pretrained(cls, model_path: str, config: LlamaFamilyConfig, layer_index: int, **kwargs) -> "GPTBlock":
        return build_and_load(cls, model_path, f"pytorch_{layer_index}.pt", config, layer_index, **kwargs)

    def mlp_intermediate(self, h: torch.Tensor) -> torch.Tensor:
        """The neuron activations DejaVu sparsifies: act(gate(h)) * up(h), (B, T, ffn)."""
        g = self.mlp.gate_proj(h)
        self.record("mlp_gate", lambda: g)
        return self.mlp.act_fn(g) * self.mlp.up_proj(h)

    def forward(self, x: torch.Tensor, attention_bias: torch.Tensor, layer_past: LayerPast = None):
        self.record("att_x", lambda: x)
        heads, present = self.self_attn.head_outputs(self.input_layernorm(x), attention_bias, layer_past)
        self.record("att_label", lambda: heads.float().norm(dim=-1))  # (B, T, H)
        heads = self.keep_heads(heads)
        x = x + self.self_attn.o_proj(heads.flatten(2))
        self.record("mlp_x", lambda: x)
        a = self.mlp_intermediate(self.post_attention_layernorm(x))
        self.record("mlp_label", lambda: a)
        a = self.keep_neurons(a)
        return x + self.mlp.down_proj(a), present

    # -- seams for the collecting and sparse variants
    def record(self, kind: str, value) -> None:
        """Called with a zero-argument function producing the activation `kind` (B, T, width)."""

    def keep_heads(self, heads: torch.Tensor) -> torch.Tensor:
        return heads

    def keep_neurons(self, a: torch.Tensor) -> torch.Tensor:
        return a


class GPTLMHead(nn.Module):
    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        check_supported(config)
        self.config = config
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def from_pretrained(cls, model_path: str, config: LlamaFamilyConfig) -> "GPTLMHead":
        return build_and_load(cls, model_path, "pytorch_lm_head.pt", config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))
