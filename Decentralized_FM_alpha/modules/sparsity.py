"""DejaVu's simulated sparsity, shared by the OPT and Llama sparse blocks (SPEC section 8).

Per layer, the MLP keeps the top-k neurons and attention the top-k query heads of every
token; the others contribute zero. What ranks them is the mode:
  dense      keep everything (the same code path, for comparisons)
  predictor  the layer's trained predictor, fed exactly the input it was trained on
  oracle     the true |activation| (MLP) / head output norm (attention): the best any predictor could do
  random     uniform random scores, seeded: the floor
This is an accuracy simulation, as in the original: the masks are applied after the dense
projections, and a skipped head still leaves its keys/values for later tokens.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from Decentralized_FM_alpha.utils.activation_store import ModelDims
from Decentralized_FM_alpha.utils.manifest import file_sha256
from Decentralized_FM_alpha.utils.selection import fraction_count, parse_layer_list

MODES = ("dense", "predictor", "oracle", "random")
Budget = Union[int, float]


def parse_budget(text: str) -> Budget:
    """'512' -> 512 neurons/heads; '0.25' -> a quarter of them."""
    try:
        value = float(text)
    except ValueError as e:
        raise ValueError(f"budget must be a count or a fraction below 1, got {text!r}") from e
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 1:
        return value
    raise ValueError(f"budget must be a positive integer count or a fraction in (0, 1), got {text!r}")


def budget_count(budget: Budget, total: int, what: str) -> int:
    """A count as given, or a fraction turned into a count by the rule the trainer's labels use."""
    count = budget if isinstance(budget, int) else fraction_count(budget, total)
    if count > total:
        raise ValueError(f"{what} budget {budget} exceeds the {total} available")
    return count


@dataclass
class SparsityPlan:
    """Which layers are sparse, with what budget, ranked by what."""
    mode: str
    mlp_budgets: dict[int, Budget] = field(default_factory=dict)  # layer -> budget; absent = dense MLP
    att_budgets: dict[int, Budget] = field(default_factory=dict)
    predictor_dir: Optional[Path] = None
    gqa_groups: bool = False
    seed: int = 42

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"--sparse-mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "predictor" and (self.mlp_budgets or self.att_budgets) and self.predictor_dir is None:
            raise ValueError("--sparse-mode predictor needs --predictor-dir")


@dataclass
class PredictorInput:
    kind: str  # att_x or mlp_x
    layer: int


def load_predictor(path: Path, layer: int, d: int, out: int, block: str, device: torch.device):
    """The trained Sequential(Linear(d, D), Linear(D, out)) and the input it was trained on, strictly."""
    meta_path = path.with_suffix(".json")
    for p in (path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"missing predictor file for {block} layer {layer}: {p}")
    meta = json.loads(meta_path.read_text())
    if meta.get("layer") != layer:
        raise ValueError(f"{meta_path}: trained for layer {meta.get('layer')}, needed for layer {layer}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if set(state) != {"0.weight", "1.weight"}:
        raise ValueError(f"{path}: expected keys 0.weight and 1.weight, found {sorted(state)}")
    rank = state["0.weight"].shape[0]
    if tuple(state["0.weight"].shape) != (rank, d) or tuple(state["1.weight"].shape) != (out, rank):
        raise ValueError(f"{path}: shapes {tuple(state['0.weight'].shape)}, {tuple(state['1.weight'].shape)} do not "
                         f"fit input {d} -> output {out}")
    predictor = nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, out, bias=False))
    predictor.load_state_dict(state, strict=True)
    source = PredictorInput(meta["input_kind"], int(meta["input_layer"]))
    if source.kind not in ("att_x", "mlp_x") or source.layer > layer:
        raise ValueError(f"{meta_path}: input {source} cannot feed layer {layer}")
    return predictor.to(device).eval(), source, {"path": str(path), "sha256": file_sha256(path),
                                                 "input": meta.get("input"), "label": meta.get("label")}


class SparsityController:
    """Shared by the sparse blocks of one pipeline rank: remembers the inputs predictors need
    during a forward pass and turns scores into masks."""

    def __init__(self, plan: SparsityPlan, dims: ModelDims, layers: range, device: torch.device):
        self.plan, self.dims, self.layers, self.device = plan, dims, layers, device
        self.generator = torch.Generator(device=device).manual_seed(plan.seed)
        self.predictors: dict[tuple[str, int], tuple[nn.Module, PredictorInput]] = {}
        self.loaded: list[dict] = []
        self.remembered: dict[tuple[str, int], torch.Tensor] = {}
        group = dims.num_heads // dims.num_kv_heads
        for layer in layers:
            if layer in plan.att_budgets and plan.gqa_groups:
                count = budget_count(plan.att_budgets[layer], dims.num_heads, "attention")
                if count % group:
                    raise ValueError(f"--gqa-groups keeps whole groups of {group} query heads: attention budget "
                                     f"{count} is not a multiple of {group}")
        if plan.mode == "predictor":
            self._load_predictors(layers)
        self.needed = {(src.kind, src.layer) for _, src in self.predictors.values()}
        outside = sorted(f"{k}_{l}" for k, l in self.needed if l not in layers)
        if outside:
            raise ValueError(f"predictors on this pipeline rank (layers {layers.start}-{layers.stop - 1}) read {outside} "
                             f"from another rank; run sparse inference with world size 1 or --num-layers covering them")

    def _load_predictors(self, layers: range) -> None:
        d = self.dims.hidden_size
        for block, budgets, out in (("mlp", self.plan.mlp_budgets, self.dims.ffn_dim),
                                    ("att", self.plan.att_budgets, self.dims.num_heads)):
            for layer in layers:
                if layer in budgets:
                    path = self.plan.predictor_dir / f"{block}_layer{layer}.pt"
                    predictor, source, info = load_predictor(path, layer, d, out, block, self.device)
                    self.predictors[(block, layer)] = (predictor, source)
                    self.loaded.append({"block": block, "layer": layer, **info})

    def describe(self) -> dict:
        return {"mode": self.plan.mode, "mlp_budgets": self.plan.mlp_budgets, "att_budgets": self.plan.att_budgets,
                "gqa_groups": self.plan.gqa_groups, "predictors": self.loaded}

    # -- called by the blocks
    def observe(self, layer: int, kind: str, value: Callable[[], torch.Tensor]) -> None:
        if (kind, layer) in self.needed:
            self.remembered[(kind, layer)] = value()

    def keep_neurons(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        if layer not in self.plan.mlp_budgets or self.plan.mode == "dense":
            return a
        k = budget_count(self.plan.mlp_budgets[layer], a.shape[-1], "MLP")
        scores = self.scores("mlp", layer, lambda: a.abs())
        return a * top_k_mask(scores, k).to(a.dtype)

    def keep_heads(self, layer: int, heads: torch.Tensor) -> torch.Tensor:
        """heads: (B, T, H, hd) per-query-head attention outputs."""
        if layer not in self.plan.att_budgets or self.plan.mode == "dense":
            return heads
        k = budget_count(self.plan.att_budgets[layer], heads.shape[2], "attention")
        scores = self.scores("att", layer, lambda: heads.float().norm(dim=-1))  # (B, T, H)
        if self.plan.gqa_groups:
            group = self.dims.num_heads // self.dims.num_kv_heads
            grouped = scores.unflatten(-1, (-1, group)).sum(-1)  # (B, T, kv groups)
            mask = top_k_mask(grouped, k // group).repeat_interleave(group, dim=-1)
        else:
            mask = top_k_mask(scores, k)
        return heads * mask[..., None].to(heads.dtype)

    def scores(self, block: str, layer: int, true_scores: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.plan.mode == "oracle":
            return true_scores()
        if self.plan.mode == "random":
            shape = true_scores().shape
            return torch.rand(shape, generator=self.generator, device=self.device)
        predictor, source = self.predictors[(block, layer)]
        x = self.remembered[(source.kind, source.layer)]
        with torch.autocast(self.device.type, enabled=False):
            return predictor(x.float())


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k highest scores along the last dimension."""
    index = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)


def plan_from_args(args, num_layers: int) -> SparsityPlan:
    """Flags first; the original's environment variables (SPEC section 8) fill what flags leave unset."""
    env = os.environ
    predictor_dir = args.predictor_dir or env.get("SPRARSE_PATH")
    mlp_budget = args.mlp_topk or env.get("TOPK")
    att_budget = args.att_topk or (env.get("ATTN_TOPK_1") if env.get("SPARSE_ATT") == "1" else None)
    try:
        layers = parse_layer_list(args.sparse_layers or "all", num_layers)
    except ValueError as e:
        raise ValueError(f"--sparse-layers: {e}") from e
    mlp_layers = layers
    if not args.mlp_topk and "LAYER" in env:  # original: MLP sparsity in layers below $LAYER
        mlp_layers = list(range(min(int(env["LAYER"]), num_layers)))
    mlp = {l: parse_budget(str(mlp_budget)) for l in mlp_layers} if mlp_budget else {}
    att = {l: parse_budget(str(att_budget)) for l in layers} if att_budget else {}
    if att and not args.att_topk and env.get("ATTN_TOPK_2"):
        # original (OPT-175B, 96 layers): layers 34-62 used ATTN_TOPK_2; scaled here to the model's depth
        middle = range(round(34 * num_layers / 96), round(63 * num_layers / 96))
        att.update({l: parse_budget(env["ATTN_TOPK_2"]) for l in middle if l in att})
    mode = args.sparse_mode or "predictor"
    return SparsityPlan(mode=mode, mlp_budgets=mlp, att_budgets=att,
                        predictor_dir=Path(predictor_dir) if predictor_dir else None, gqa_groups=args.gqa_groups,
                        seed=args.seed)
