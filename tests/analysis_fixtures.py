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


# ------------------------------------------------------------------------------------- sweeps and task sweeps
SWEEP_COLUMNS = ("model", "dataset", "mode", "block", "mlp_topk", "att_topk", "mlp_kept", "att_kept", "att_unit",
                 "predictor_input", "mlp_trained_k", "att_trained_k", "dense_layers", "perplexity", "tokens",
                 "output_manifest")


def write_sweep(root: Path, ratios: dict[tuple[str, str, str, float], float], dims: ModelDims, dense_ppl: float = 20.0,
                requests: int = 12, noise: float = 0.0, seed: int = 0, dataset: str = "c4") -> Path:
    """<root>/sweep.csv with the sweep's columns (fractions with their counts) and one output manifest per row whose
    per-request log-prob sums give each run's perplexity ratio to dense: exactly ratios[(model, mode, block,
    budget)] (budget: the fraction of each sparse block), or that ratio times exp(noise * N(0, 1)) per request."""
    import csv
    import json
    from Decentralized_FM_alpha.utils.selection import fraction_count
    rng = np.random.default_rng(seed)
    tokens = rng.integers(50, 150, size=requests)
    dense = -tokens * np.log(dense_ppl) + rng.normal(0, 5, size=requests)
    rows = []

    def add(model: str, mode: str, block: str, budget: float | None, sums: np.ndarray) -> None:
        name = f"{model}_{mode}_{block}_{budget}"
        manifest = {"command": f"runner --sparse-mode {mode}", "git_commit": "c0ffee", "output_path": name,
                    "perplexity": {"per_request": {"logprob_sums": sums.tolist(), "tokens": tokens.tolist()}}}
        (root / f"{name}.manifest.json").write_text(json.dumps(manifest))
        mlp, att = (budget if block in ("mlp", "both") else None), (budget if block in ("att", "both") else None)
        rows.append({"model": model, "dataset": dataset, "mode": mode, "block": block,
                     "mlp_topk": mlp or "dense", "att_topk": att or "dense",
                     "mlp_kept": fraction_count(mlp, dims.ffn_dim) if mlp else "n/a",
                     "att_kept": fraction_count(att, dims.num_heads) if att else "n/a", "att_unit": "heads",
                     "predictor_input": "lookahead" if mode == "predictor" else "n/a",
                     "mlp_trained_k": budget if mode == "predictor" else "n/a",
                     "att_trained_k": budget if mode == "predictor" else "n/a", "dense_layers": 0,
                     "perplexity": float(np.exp(-sums.sum() / tokens.sum())), "tokens": int(tokens.sum()),
                     "output_manifest": f"{name}.manifest.json"})

    root.mkdir(parents=True, exist_ok=True)
    for model in dict.fromkeys(model for model, *_ in ratios):
        add(model, "dense", "none", None, dense)
    for (model, mode, block, budget), value in ratios.items():
        jitter = noise * rng.standard_normal(requests)
        add(model, mode, block, budget, dense - tokens * (np.log(value) + jitter))
    path = root / "sweep.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_tasks(root: Path, results: dict[tuple[str, str, str, float | None], tuple[float, float]],
                samples: int = 200) -> Path:
    """<root>/tasks.csv: one row per (model, task, mode, budget) with acc and its standard error, and a result JSON
    with provenance per row."""
    import json
    root.mkdir(parents=True, exist_ok=True)
    lines = ["model,task,mode,block,mlp_topk,att_topk,acc,acc_stderr,samples,num_fewshot,result_json"]
    for i, ((model, task, mode, budget), (acc, stderr)) in enumerate(results.items()):
        result = root / f"task_{i}.json"
        result.write_text(json.dumps({"provenance": {"command": f"task_sweep.py {mode}", "git_commit": "c0ffee"}}))
        value = "dense" if budget is None else budget
        lines.append(f"{model},{task},{mode},{'none' if budget is None else 'both'},{value},{value},{acc},{stderr},"
                     f"{samples},0,{result.name}")
    path = root / "tasks.csv"
    path.write_text("\n".join(lines) + "\n")
    return path
