"""Small synthetic collections (SPEC §6) with known structure, for the analysis-script tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from Decentralized_FM_alpha.utils.activation_store import ActivationWriter, ModelDims


def write_collection(path: Path, dims: ModelDims, doc_lengths: list[int], values: dict[tuple[str, int], np.ndarray],
                     model_name: str, model_type: str) -> Path:
    """A complete collection holding exactly `values[(kind, layer)]` (rows, width), rows in document order."""
    kinds = tuple(sorted({kind for kind, _ in values}))
    writer = ActivationWriter(path, dims, range(dims.num_layers), kinds, capacity=sum(doc_lengths), rank=0,
                              world_size=1, manifest_fields={"model_name": model_name, "model_type": model_type,
                                                             "source_data": {"path": "synthetic", "sha256": None}})
    lengths = torch.tensor(doc_lengths)
    valid = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # (docs, T)
    token_ids = torch.arange(valid.numel()).reshape(valid.shape)
    writer.begin_batch(list(range(len(doc_lengths))), token_ids, valid)
    for (kind, layer), flat in values.items():
        padded = torch.zeros(*valid.shape, flat.shape[1])
        padded[valid] = torch.from_numpy(flat).float()  # (doc, position) order, as the writer reads the mask
        writer.save(kind, layer, padded)
    writer.end_batch()
    writer.finish("done")
    return path


def drifting_model(path: Path, family: str, seed: int, drift: float, num_layers: int = 4,
                   doc_lengths: tuple[int, ...] = (12, 9, 15, 10, 8, 14, 11, 13, 10, 12, 9, 16),
                   with_gate: bool = True) -> Path:
    """A residual stream x_{l+1} = x_l + drift * noise with MLP labels computed from it.

    OPT: mlp_label = ReLU(mlp_x W). Llama: mlp_gate = mlp_x Wg, mlp_label = SiLU(gate) * (mlp_x Wu), the gate
    stored when with_gate. att_label = |att_x Wh| per head.
    """
    dims = ModelDims(hidden_size=16, ffn_dim=32, num_heads=4, num_kv_heads=2, num_layers=num_layers)
    rng = np.random.default_rng(seed)
    rows = sum(doc_lengths)
    x = rng.standard_normal((rows, dims.hidden_size)).astype(np.float32)
    values = {}
    for layer in range(num_layers):
        mlp_x = x + drift * rng.standard_normal(x.shape).astype(np.float32)
        values[("att_x", layer)] = x
        values[("mlp_x", layer)] = mlp_x
        heads = x @ rng.standard_normal((dims.hidden_size, dims.num_heads))
        values[("att_label", layer)] = np.abs(heads).astype(np.float32)
        up = mlp_x @ rng.standard_normal((dims.hidden_size, dims.ffn_dim)).astype(np.float32) / 4
        if family == "opt":
            values[("mlp_label", layer)] = np.maximum(up, 0)
        else:
            gate = mlp_x @ rng.standard_normal((dims.hidden_size, dims.ffn_dim)).astype(np.float32) / 4
            values[("mlp_label", layer)] = gate / (1 + np.exp(-gate)) * up
            if with_gate:
                values[("mlp_gate", layer)] = gate
        x = mlp_x + drift * rng.standard_normal(x.shape).astype(np.float32)
    model_type = "opt-save" if family == "opt" else "llama-save"
    name = "facebook/opt-synthetic" if family == "opt" else "meta-llama/llama-synthetic"
    return write_collection(path, dims, list(doc_lengths), values, name, model_type)
