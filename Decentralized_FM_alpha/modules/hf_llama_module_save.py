"""Llama with collection: hf_llama_module plus writing DejaVu's training data (SPEC section 6).

Each block hands its att_x, att_label, mlp_x and mlp_label (the real tokens of the batch)
to the shared ActivationWriter, which owns files, rows and resumption.
"""
from __future__ import annotations

from Decentralized_FM_alpha.modules import hf_llama_module as dense
from Decentralized_FM_alpha.modules.hf_llama_module import LlamaFamilyConfig
from Decentralized_FM_alpha.modules.hf_llama_module import GPTEmbeddings, GPTLMHead  # noqa: F401  (the runner's pieces)
from Decentralized_FM_alpha.utils.activation_store import ActivationWriter, ModelDims

COLLECTED_KINDS = ("att_x", "att_label", "mlp_x", "mlp_label")
OPTIONAL_KINDS: tuple[str, ...] = ("mlp_gate",)


def collection_dims(config: LlamaFamilyConfig) -> ModelDims:
    return ModelDims(hidden_size=config.hidden_size, ffn_dim=config.intermediate_size,
                     num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                     num_layers=config.num_hidden_layers)


def label_definitions(config: LlamaFamilyConfig) -> dict[str, str]:
    act = config.hidden_act
    return {"mlp_label": f"{act}(gate(RMSNorm(mlp_x))) * up(RMSNorm(mlp_x))", "mlp_gate": "gate(RMSNorm(mlp_x))",
            "att_label": "||softmax(q k^T / sqrt(hd)) v||_2 per query head (after RoPE, GQA-shared k/v)"}


class GPTBlock(dense.GPTBlock):
    def __init__(self, config: LlamaFamilyConfig, layer_index: int, writer: ActivationWriter):
        super().__init__(config, layer_index)
        self.writer = writer

    def record(self, kind: str, value) -> None:
        if kind in self.writer.kinds:
            self.writer.save(kind, self.layer_index, value())
