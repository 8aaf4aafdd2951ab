"""A predictor shaped like the MLP it predicts (issue "Where and why the MLP predictor fails on Llama", why part 2).

DejaVu's predictor Linear(d, D) -> Linear(D, ffn) ranks neurons by one linear form of its input. A SwiGLU neuron's
output act(g_i) * u_i is a product of two projections of the normed input, which no single linear form expresses.
This predictor keeps the MLP's own shape at low rank: with z the input through the layer's MLP norm,
  swiglu (Llama)  score_i = |act(g_i(z)) * u_i(z)|, g = B_g A_g z, u = B_u A_u z (rank-r factor pairs)
  relu (OPT)      score_i = ReLU(h_i(z)), h = B A z + b (a rank-r fc1 with its bias)
At full rank with the layer's own weights (r = d, factors from the SVD of W_gate / W_up / fc1) and z the MLP's
true input, the ranking is the oracle's. The sparse runner's mode `structured` (modules/sparsity.py) runs it; the
factors are made and trained by sparse_predictor/structured.py.

Stacked: one module holds P predictors of one layer (the trainer's convention, sparse_predictor/trainer/model.py):
forward takes (B, d) rows shared by all, or (P, B, d), and returns (P, B, ffn) logits. A saved file holds P = 1.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.activations import ACT2FN

FORMS = ("swiglu", "relu")
# log|s| is finite at exact zeros (a ReLU gate's) with this floor; it sits below float16's smallest normal (6e-5),
# the resolution of the collected labels, so it changes no ranking that the labels can tell apart.
SCORE_FLOOR = 1e-6


class StructuredPredictor(nn.Module):
    """P structured predictors of one layer's MLP neurons; see the module docstring for the two forms.

    The logit of neuron i is raw_i - mean_j raw_j - offset (the mean over the token's neurons), with
    raw = log(|act(g_i) * u_i| + SCORE_FLOOR) (swiglu) or h_i (relu). Why: the trainer's class-weighted BCE needs a
    logit whose sign says "in the top-K", and the score itself is unbounded and scale-dependent. log|s| is monotone
    in |s|, and subtracting a per-token constant changes no token's order, so the top-K of the logits is the top-K of
    the scores (the training-free start keeps its exact ranking). In log space a token's overall scale is that
    constant: centring removes it, as the label (a per-token top-K) ignores it, so the offset b, one learned number
    per predictor, is a cut relative to the token's own typical magnitude: sigmoid = |s| / (|s| + e^b * geometric
    mean of the token's |s|). Without the centring, training from the SVD start lowered held-out Recall@K on the
    tests' tiny Llama (BCE spent its steps on per-token scale); with it, it raised it. For the relu form the
    pre-activation h plays the part of log|s| (ReLU is monotone); it also orders the units ReLU ties at zero.
    """

    def __init__(self, form: str, d: int, ffn: int, rank: int, predictors: int = 1, activation: str = "silu",
                 eps: float = 1e-5):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"structured predictor form must be one of {FORMS}, got {form!r}")
        self.form, self.d, self.ffn, self.rank, self.activation, self.eps = form, d, ffn, rank, activation, eps
        self.register_buffer("norm_weight", torch.ones(d))  # the layer's MLP norm: fixed, not trained
        if form == "relu":
            self.register_buffer("norm_bias", torch.zeros(d))  # LayerNorm's bias
        for name in self.factor_names():
            self.register_parameter(f"{name}_a", nn.Parameter(torch.zeros(predictors, rank, d)))
            self.register_parameter(f"{name}_b", nn.Parameter(torch.zeros(predictors, ffn, rank)))
        if form == "relu":
            self.fc1_bias = nn.Parameter(torch.zeros(predictors, ffn))
        self.offset = nn.Parameter(torch.zeros(predictors))
        self.act = ACT2FN[activation] if form == "swiglu" else None

    def factor_names(self) -> tuple[str, ...]:
        return ("gate", "up") if self.form == "swiglu" else ("fc1",)

    @property
    def predictors(self) -> int:
        return self.offset.shape[0]

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        """x through the MLP's norm, in float32: RMSNorm (swiglu, Llama) or LayerNorm (relu, OPT), eps as the model."""
        x = x.float()
        if self.form == "relu":
            x = x - x.mean(dim=-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x * self.norm_weight + (self.norm_bias if self.form == "relu" else 0)

    def project(self, z: torch.Tensor, name: str) -> torch.Tensor:
        """B (A z) of one factor pair: (B, d) or (P, B, d) -> (P, B, ffn), rank-r in between."""
        a, b = getattr(self, f"{name}_a"), getattr(self, f"{name}_b")
        return torch.matmul(torch.matmul(z, a.transpose(1, 2)), b.transpose(1, 2))

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """(P, B, ffn) ranking of the neurons before the offset: log|act(g) * u| or the pre-activation h."""
        z = self.normed(x)
        if self.form == "relu":
            return self.project(z, "fc1") + self.fc1_bias[:, None, :]
        s = self.act(self.project(z, "gate")) * self.project(z, "up")
        return torch.log(s.float().abs() + SCORE_FLOOR)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.raw(x)
        return raw - raw.mean(dim=-1, keepdim=True) - self.offset[:, None, None]

    def factor_parameters(self) -> int:
        """Weights of the low-rank factors of one predictor: 2r(d + ffn) (swiglu) or r(d + ffn) (relu)."""
        return len(self.factor_names()) * self.rank * (self.d + self.ffn)

    def parameters_per_predictor(self) -> int:
        """Every trained number of one predictor: the factors, the relu form's bias and the offset."""
        return self.factor_parameters() + (self.ffn if self.form == "relu" else 0) + 1

    # -- the trainer's stacked-model interface (sparse_predictor/trainer/model.py train_stacked)
    def layer_weights(self) -> tuple[int, int]:
        """Weights of the first (A) and second (B) matmuls of all P predictors, for the work counters."""
        first = sum(getattr(self, f"{n}_a").numel() for n in self.factor_names())
        return first, sum(getattr(self, f"{n}_b").numel() for n in self.factor_names())

    def state_of(self, p: int) -> dict[str, torch.Tensor]:
        """Predictor p as the state dict of a P = 1 module (what a structured_mlp_layer{L}.pt holds)."""
        return {key: (value if key.startswith("norm_") else value[p:p + 1]).detach().to("cpu", copy=True)
                for key, value in self.state_dict().items()}

    @torch.no_grad()
    def load_states(self, states: list[dict[str, torch.Tensor]]) -> None:
        for p, state in enumerate(states):
            for name, param in self.named_parameters():
                param[p:p + 1].copy_(state[name])


class UnitRanker(nn.Module):
    """One structured predictor as the sparse runner calls a predictor: (..., d) rows -> (..., ffn) scores."""

    def __init__(self, predictor: StructuredPredictor):
        super().__init__()
        if predictor.predictors != 1:
            raise ValueError(f"the sparse runner runs one predictor per layer, got a stack of {predictor.predictors}")
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(x.reshape(-1, x.shape[-1]))[0].reshape(*x.shape[:-1], -1)


def load_structured(path: Path, meta: dict, d: int, ffn: int) -> StructuredPredictor:
    """The predictor of a structured_mlp_layer{L}.pt, built from its JSON's `predictor` entry and loaded strictly: a
    missing or extra key, or a shape that does not fit d -> ffn, is an error naming the file."""
    spec = meta.get("predictor") or {}
    missing = [key for key in ("form", "rank", "activation", "eps", "d", "out") if key not in spec]
    if missing:
        raise ValueError(f"{path.with_suffix('.json')}: 'predictor' lacks {missing}; not a structured predictor file")
    if (spec["d"], spec["out"]) != (d, ffn):
        raise ValueError(f"{path.with_suffix('.json')}: made for input {spec['d']} -> {spec['out']} neurons, the model "
                         f"has {d} -> {ffn}")
    predictor = StructuredPredictor(spec["form"], d, ffn, int(spec["rank"]), 1, spec["activation"], float(spec["eps"]))
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = {k: tuple(v.shape) for k, v in predictor.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        raise ValueError(f"{path}: keys and shapes {found} do not fit a {spec['form']} predictor of rank "
                         f"{spec['rank']} ({expected})")
    predictor.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return predictor
