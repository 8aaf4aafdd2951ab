"""Llama with DejaVu's simulated sparsity: hf_llama_module plus per-layer neuron and head selection.

Each block tells the shared SparsityController what it computes (so a predictor gets exactly
the input it was trained on) and lets it zero the neurons and heads outside the kept top-k.
With decode="kernels" (runner flag --sparse-decode kernels) a decode step computes only the kept
neurons and heads instead (modules/sparse_decode.py), with the same masks.
Modes, budgets and what the simulation does not model: modules/sparsity.py (SPEC section 8).
"""
from __future__ import annotations

from Decentralized_FM_alpha.modules import hf_llama_module as dense
from Decentralized_FM_alpha.modules import sparse_decode
from Decentralized_FM_alpha.modules.hf_llama_module import LlamaFamilyConfig
from Decentralized_FM_alpha.modules.hf_llama_module import GPTEmbeddings, GPTLMHead  # noqa: F401  (the runner's pieces)
from Decentralized_FM_alpha.modules.hf_llama_module_save import collection_dims as model_dims  # noqa: F401
from Decentralized_FM_alpha.modules.sparsity import SparsityController


class GPTBlock(dense.GPTBlock):
    def __init__(self, config: LlamaFamilyConfig, layer_index: int, sparsity: SparsityController,
                 decode: str = "simulate"):
        super().__init__(config, layer_index)
        self.sparsity = sparsity
        self.decode = sparse_decode.check_decode(decode, sparsity)

    def forward(self, x, attention_bias, layer_past=None):
        if self.decode == "kernels" and sparse_decode.is_decode_step(x, layer_past):
            return sparse_decode.runner_step(self, x, attention_bias, layer_past)
        return super().forward(x, attention_bias, layer_past)

    def record(self, kind: str, value) -> None:
        self.sparsity.observe(self.layer_index, kind, value)

    def keep_heads(self, heads):
        return self.sparsity.keep_heads(self.layer_index, heads)

    def keep_neurons(self, a):
        return self.sparsity.keep_neurons(self.layer_index, a)
