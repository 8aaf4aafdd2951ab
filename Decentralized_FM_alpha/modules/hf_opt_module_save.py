"""OPT with collection: hf_opt_module plus writing DejaVu's training data (SPEC section 6).

Each block hands its att_x, att_label, mlp_x and mlp_label (the real tokens of the batch)
to the shared ActivationWriter, which owns files, rows and resumption.
"""
from __future__ import annotations

from transformers import OPTConfig

from Decentralized_FM_alpha.modules import hf_opt_module as dense
from Decentralized_FM_alpha.modules.hf_opt_module import GPTEmbeddings, GPTLMHead  # noqa: F401  (the runner's pieces)
from Decentralized_FM_alpha.utils.activation_store import ActivationWriter, ModelDims

COLLECTED_KINDS = ("att_x", "att_label", "mlp_x", "mlp_label")
OPTIONAL_KINDS: tuple[str, ...] = ()


def collection_dims(config: OPTConfig) -> ModelDims:
    return ModelDims(hidden_size=config.hidden_size, ffn_dim=config.ffn_dim, num_heads=config.num_attention_heads,
                     num_kv_heads=config.num_attention_heads, num_layers=config.num_hidden_layers)


def label_definitions(config: OPTConfig) -> dict[str, str]:
    return {"mlp_label": "ReLU(fc1(LayerNorm(mlp_x)))", "att_label": "||softmax(q k^T / sqrt(hd)) v||_2 per head"}


class GPTBlock(dense.GPTBlock):
    def __init__(self, config: OPTConfig, layer_index: int, writer: ActivationWriter):
        super().__init__(config, layer_index)
        self.writer = writer

    def record(self, kind: str, value) -> None:
        if kind in self.writer.kinds:
            self.writer.save(kind, self.layer_index, value())
