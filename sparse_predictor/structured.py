"""Structured MLP predictors: the MLP's own form at low rank, from the SVD of its weights, trained or not.

The model is modules/structured_predictor.py (Llama: |act(B_g A_g z) * (B_u A_u z)|; OPT: ReLU(B A z + b); z the
predictor's input through the layer's MLP norm). Here:
  weights   the layer's MLP norm and projections, read strictly from the converted checkpoint (SPEC §3,
            pytorch_{l}.pt): a missing file or key, or a shape that does not fit the collection, is an error naming it;
  factors   truncated SVD, W = U S V^T -> B = U_r S_r, A = V_r^T (the best rank-r approximation of each projection);
  variants  svd: those factors, no training; svd+trained: the same start trained on the top-K label with the
            project's trainer (trainer/model.py train_stacked: class-weighted BCE, AdamW, batches, seeds, document
            split, selection, held-out metrics of trainer/metrics.py);
  ranks     an integer, 'full' = min(d, ffn) (the exact projections) or 'equal' = the rank whose factors have as many
            weights as DejaVu's predictor at width D: 2r(d + ffn) = D(d + ffn), r = D/2 (Llama); r = D (OPT).
Each predictor's offset (the logit's cut, see StructuredPredictor) starts at the mean over training rows of the
K-th largest centred raw score, so its sigmoid >= 0.5 picks about K units at the start: its Recall and Precision
mean something untrained too; the ranking (Recall@K, Captured Mass) does not depend on it.
Writes structured_mlp_layer{L}.pt (a P = 1 StructuredPredictor state dict) and .json (the mains' record plus
variant, rank, form and parameter counts) with trainer/records.py.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from Decentralized_FM_alpha.modules.checkpoint import read_state_dict
from Decentralized_FM_alpha.modules.structured_predictor import StructuredPredictor
from Decentralized_FM_alpha.utils.activation_store import ModelDims
from Decentralized_FM_alpha.utils.model_source import family_of_checkpoint
from sparse_predictor.trainer.model import TrainConfig, TrainResult, train_stacked
from sparse_predictor.trainer.rows import LayerData

BLOCK = "mlp"
FILE_BLOCK = "structured_mlp"  # file names structured_mlp_layer{L}.pt/.json, beside DejaVu's mlp_layer{L}.*
VARIANTS = {"svd": "svd", "trained": "svd+trained"}  # --variant -> the name records carry
INPUTS = ("lookahead", "same")  # lookahead: att_x_l (DejaVu's wiring); same: mlp_x_l, the MLP's true input
OPT_LAYER_NORM_EPS = 1e-5  # hf_opt_module's nn.LayerNorm default, which OPT's config does not override
CALIBRATION_ROWS = 4096  # training rows that set each offset's start: a mean of per-row K-th scores converges fast
# Fine-tuning from a start that already ranks: on the tests' tiny Llama (rank 4, K = 0.25) 1e-4 and 3e-4 raised
# held-out Recall@K from both inputs, the mains' MLP rate 1e-3 lowered it at 30 epochs.
DEFAULT_LR = 3e-4


@dataclass(frozen=True)
class MlpWeights:
    """One layer's MLP as the structured predictor needs it (float32): its norm and projections (out, d)."""
    form: str  # swiglu (Llama family) or relu (OPT)
    activation: str  # the gate's activation (Llama config hidden_act); relu for OPT
    eps: float
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor | None  # OPT's LayerNorm bias
    projections: dict[str, torch.Tensor]  # gate, up (swiglu) or fc1 (relu): (ffn, d)
    bias: torch.Tensor | None  # OPT's fc1 bias
    source: str  # the file read


# converted layer-file keys (SPEC §3): the MLP's norm and projections
LLAMA_KEYS = {"norm": "post_attention_layernorm.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight"}
OPT_KEYS = {"norm": "final_layer_norm.weight", "norm_bias": "final_layer_norm.bias", "fc1": "fc1.weight",
            "bias": "fc1.bias"}


def read_config(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def required(state: dict, key: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    """state[key] in float32, or an error naming the file and the key (missing, or not of `shape`)."""
    if key not in state:
        raise KeyError(f"{path}: missing key {key!r} (needed by the structured predictor)")
    if tuple(state[key].shape) != shape:
        raise ValueError(f"{path}: key {key!r} has shape {tuple(state[key].shape)}, the collection needs {shape}")
    return state[key].float()


def read_mlp_weights(model_dir: str | Path, layer: int, dims: ModelDims) -> MlpWeights:
    """Layer `layer`'s MLP norm and projections from the converted checkpoint, checked against the collection's dims."""
    family, config = family_of_checkpoint(model_dir), read_config(model_dir)
    path = Path(model_dir) / f"pytorch_{layer}.pt"
    state = read_state_dict(model_dir, path.name)  # an error naming the file when missing or unreadable
    d, ffn = dims.hidden_size, dims.ffn_dim
    if family == "llama":
        return MlpWeights("swiglu", config["hidden_act"], float(config["rms_norm_eps"]),
                          required(state, LLAMA_KEYS["norm"], (d,), path), None,
                          {n: required(state, LLAMA_KEYS[n], (ffn, d), path) for n in ("gate", "up")}, None, str(path))
    if config.get("activation_function", "relu") != "relu":
        raise ValueError(f"{Path(model_dir) / 'config.json'}: activation_function "
                         f"{config['activation_function']!r}; the OPT modules compute ReLU")
    affine, biased = config.get("layer_norm_elementwise_affine", True), config.get("enable_bias", True)
    return MlpWeights("relu", "relu", OPT_LAYER_NORM_EPS,
                      required(state, OPT_KEYS["norm"], (d,), path) if affine else torch.ones(d),
                      required(state, OPT_KEYS["norm_bias"], (d,), path) if affine and biased else torch.zeros(d),
                      {"fc1": required(state, OPT_KEYS["fc1"], (ffn, d), path)},
                      required(state, OPT_KEYS["bias"], (ffn,), path) if biased else torch.zeros(ffn), str(path))


def resolve_rank(spec: str, form: str, d: int, ffn: int, D: int, clamp: bool = False) -> int:
    """'full' = min(d, ffn); 'equal' = the factors' weights of DejaVu's predictor at width D (r = D/2 for the two
    factor pairs of swiglu, r = D for relu's one); or an integer from 1 to min(d, ffn). A rank above the full rank is
    an error, or with `clamp` the full rank (the exact projections: no more rank exists)."""
    full = min(d, ffn)
    if spec == "full":
        return full
    if spec == "equal":
        pairs = 2 if form == "swiglu" else 1
        if D % pairs:
            raise ValueError(f"--rank equal: {pairs} factor pairs share D = {D} weights per unit pair; give an even --D")
        rank = D // pairs
    elif spec.isdigit() and int(spec) > 0:
        rank = int(spec)
    else:
        raise ValueError(f"--rank takes positive integers, 'full' or 'equal', got {spec!r}")
    if rank > full and clamp:
        return full
    if rank > full:
        raise ValueError(f"--rank {spec} = {rank} exceeds the full rank min(d, ffn) = {full}")
    return rank


def rank_list(text: str) -> list[str]:
    """--rank: a comma list of ranks ('64,equal,full')."""
    ranks = [part.strip() for part in text.split(",") if part.strip()]
    if not ranks:
        raise argparse.ArgumentTypeError("--rank: no rank given")
    return ranks


Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # projection name -> (U S, V^T), every rank


def svd_factors(weights: MlpWeights) -> Factors:
    """Each projection W (out, d) = (U S) V^T, computed in float64 so that at full rank B A equals W to float32
    rounding; the rank-r truncation (the best rank-r approximation) is the first r columns of U S and rows of V^T."""
    factors = {}
    for name, w in weights.projections.items():
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        factors[name] = ((u * s).float(), vh.float())
    return factors


def svd_predictor(weights: MlpWeights, rank: int, predictors: int = 1,
                  factors: Factors | None = None) -> StructuredPredictor:
    """`predictors` copies of the layer's rank-`rank` SVD predictor (offsets 0); `factors` = svd_factors(weights) when
    already computed (several ranks of one layer share one SVD)."""
    factors = svd_factors(weights) if factors is None else factors
    ffn, d = next(iter(weights.projections.values())).shape
    model = StructuredPredictor(weights.form, d, ffn, rank, predictors, weights.activation, weights.eps)
    with torch.no_grad():
        model.norm_weight.copy_(weights.norm_weight)
        if weights.norm_bias is not None:
            model.norm_bias.copy_(weights.norm_bias)
        for name, (b, a) in factors.items():
            getattr(model, f"{name}_a").copy_(a[:rank].expand(predictors, -1, -1))
            getattr(model, f"{name}_b").copy_(b[:, :rank].expand(predictors, -1, -1))
        if weights.bias is not None:
            model.fc1_bias.copy_(weights.bias.expand(predictors, -1))
    return model


def exact_predictor(weights: MlpWeights) -> StructuredPredictor:
    """The layer's own MLP form, unfactored: the full-rank predictor whose ranking from the MLP's true input is the
    oracle's (A = identity, B = W)."""
    ffn, d = next(iter(weights.projections.values())).shape
    model = StructuredPredictor(weights.form, d, ffn, d, 1, weights.activation, weights.eps)
    with torch.no_grad():
        model.norm_weight.copy_(weights.norm_weight)
        if weights.norm_bias is not None:
            model.norm_bias.copy_(weights.norm_bias)
        for name, w in weights.projections.items():
            getattr(model, f"{name}_a").copy_(torch.eye(d)[None])
            getattr(model, f"{name}_b").copy_(w[None])
        if weights.bias is not None:
            model.fc1_bias.copy_(weights.bias[None])
    return model


@torch.no_grad()
def calibrate_offsets(model: StructuredPredictor, data: LayerData, labels_of: Sequence[int], seed: int) -> None:
    """Each predictor's offset = the mean over up to CALIBRATION_ROWS training rows of its K-th largest logit before
    the offset (K of its label): held-out rows are never read."""
    rows = next(data.train_windows(0, seed))
    model.offset.zero_()
    logits = model.to(rows.x.device)(rows.x[:CALIBRATION_ROWS])  # (P, B, ffn)
    for p, label in enumerate(labels_of):
        model.offset[p] = logits[p].topk(data.Ks[label], dim=1).values[:, -1].mean()


def train_structured(data: LayerData, weights: MlpWeights, rank: int, variant: str, cfg: TrainConfig,
                     log: Callable[[str], None] = print, factors: Factors | None = None) -> list[TrainResult]:
    """One structured predictor per label of the layer (stacked), from the rank-`rank` SVD start: scored as it is
    (variant svd) or trained with the trainer's loop (svd+trained); the results are train_stacked's."""
    specs = [(label, cfg.seed) for label in range(len(data.labels))]
    model = svd_predictor(weights, rank, len(specs), factors)
    calibrate_offsets(model, data, [label for label, _ in specs], cfg.seed)
    epochs = cfg.epochs if variant == VARIANTS["trained"] else 0  # 0: the held-out split scores the start only
    return train_stacked(data, BLOCK, replace(cfg, D=rank, epochs=epochs), specs, log, model=model)


def structured_fields(weights: MlpWeights, layer: int, rank_spec: str, rank: int, variant: str, d: int, ffn: int,
                      D: int, model_dir: str | Path) -> dict:
    """What a structured record adds to the mains' record (trainer/records.py layer_record)."""
    model = StructuredPredictor(weights.form, d, ffn, rank, 1, weights.activation, weights.eps)
    return {"variant": variant, "rank": rank, "rank_spec": rank_spec, "full_rank": min(d, ffn),
            "parameters": model.parameters_per_predictor(), "factor_parameters": model.factor_parameters(),
            "dejavu_parameters_at_D": {"D": D, "parameters": D * (d + ffn)},
            "predictor": {"form": weights.form, "activation": weights.activation, "eps": weights.eps, "rank": rank,
                          "d": d, "out": ffn,
                          "score": ("|act(B_g A_g z) * (B_u A_u z)|" if weights.form == "swiglu"
                                    else "ReLU(B A z + b)") + ", z = the input through the layer's MLP norm",
                          "logit": ("log(|score| + SCORE_FLOOR) - offset" if weights.form == "swiglu"
                                    else "B A z + b - offset"),
                          "init": "truncated SVD of the layer's projections (B = U_r S_r, A = V_r^T)"},
            "weights_source": {"model_dir": str(Path(model_dir).resolve()), "layer_file": weights.source},
            "checkpoint": f"{FILE_BLOCK}_layer{layer}.pt"}
