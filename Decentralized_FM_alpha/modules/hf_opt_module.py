"""OPT as three pipeline pieces: embeddings, decoder block, LM head (pre-LayerNorm OPT).

Computes what Hugging Face `OPTForCausalLM` computes (ReLU MLP, LayerNorm, learned
positions with the offset of 2), loaded strictly from the converted per-layer files of
SPEC section 3. Its Llama twin is hf_llama_module.py: same classes, same method names,
only the architecture differs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import OPTConfig

from Decentralized_FM_alpha.modules.checkpoint import build_and_load

LayerPast = Optional[tuple[torch.Tensor, torch.Tensor]]
POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (fairseq legacy)


def check_supported(config: OPTConfig) -> None:
    if not config.do_layer_norm_before:
        raise NotImplementedError("post-LayerNorm OPT (opt-350m) is not supported: do_layer_norm_before=False")
    if config.word_embed_proj_dim != config.hidden_size:
        raise NotImplementedError("OPT with project_in/project_out (opt-350m) is not supported")


class GPTEmbeddings(nn.Module):
    """Token embeddings plus learned absolute positions."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        check_supported(config)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size)

    @classmethod
    def from_pretrained(cls, model_path: str, config: OPTConfig) -> "GPTEmbeddings":
        return build_and_load(cls, model_path, "pytorch_embs.pt", config)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        # Right padding: real tokens sit at positions 0..len-1, so positions are a plain range.
        positions = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
        return self.embed_tokens(input_ids) + self.embed_positions(positions + POSITION_OFFSET)


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        d, bias = config.hidden_size, config.enable_bias
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def head_outputs(self, h: torch.Tensor, attention_bias: torch.Tensor, layer_past: LayerPast):
        """Per-head attention outputs (B, T, H, hd) before out_proj, and the new (k, v) cache."""
        q, k, v = self.split_heads(self.q_proj(h)), self.split_heads(self.k_proj(h)), self.split_heads(self.v_proj(h))
        if layer_past is not None:
            k, v = torch.cat([layer_past[0], k], dim=2), torch.cat([layer_past[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias)  # (B, H, T, hd)
        return out.transpose(1, 2), (k, v)


class GPTBlock(nn.Module):
    """One decoder layer: x + Attn(LN(x)), then x + fc2(ReLU(fc1(LN(x)))).

    `record`, `keep_heads` and `keep_neurons` are the seams where the collecting
    (hf_opt_module_save) and sparse (hf_opt_sparse_mlp_attention) variants hook in; here
    they record nothing and keep everything.
    """

    def __init__(self, config: OPTConfig, layer_index: int):
        super().__init__()
        check_supported(config)
        self.config, self.layer_index = config, layer_index
        affine = config.layer_norm_elementwise_affine
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.self_attn = OPTAttention(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size, bias=config.enable_bias)
        if config.activation_function != "relu":
            raise NotImplementedError(f"OPT activation {config.activation_function!r}: DejaVu's OPT path assumes relu")

    @classmethod
    def from_pretrained(cls, model_path: str, config: OPTConfig, layer_index: int, **kwargs) -> "GPTBlock":
        return build_and_load(cls, model_path, f"pytorch_{layer_index}.pt", config, layer_index, **kwargs)

    def mlp_intermediate(self, h: torch.Tensor) -> torch.Tensor:
        """The neuron activations DejaVu sparsifies: ReLU(fc1(h)), (B, T, ffn)."""
        return F.relu(self.fc1(h))

    def forward(self, x: torch.Tensor, attention_bias: torch.Tensor, layer_past: LayerPast = None):
        self.record("att_x", lambda: x)
        heads, present = self.self_attn.head_outputs(self.self_attn_layer_norm(x), attention_bias, layer_past)
        self.record("att_label", lambda: heads.float().norm(dim=-1))  # (B, T, H)
        heads = self.keep_heads(heads)
        x = x + self.self_attn.out_proj(heads.flatten(2))
        self.record("mlp_x", lambda: x)
        a = self.mlp_intermediate(self.final_layer_norm(x))
        self.record("mlp_label", lambda: a)
        a = self.keep_neurons(a)
        return x + self.fc2(a), present

    # -- seams for the collecting and sparse variants
    def record(self, kind: str, value) -> None:
        """Called with a zero-argument function producing the activation `kind` (B, T, width)."""

    def keep_heads(self, heads: torch.Tensor) -> torch.Tensor:
        return heads

    def keep_neurons(self, a: torch.Tensor) -> torch.Tensor:
        return a


class GPTLMHead(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        check_supported(config)
        self.config = config
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def from_pretrained(cls, model_path: str, config: OPTConfig) -> "GPTLMHead":
        return build_and_load(cls, model_path, "pytorch_lm_head.pt", config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_layer_norm(x))
