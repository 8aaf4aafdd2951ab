"""DejaVu's simulated sparsity, shared by the OPT and Llama sparse blocks (SPEC section 8).

Per layer, the MLP keeps the top-k neurons and attention the top-k query heads of every
token; the others contribute zero. What ranks them is the mode:
  dense      keep everything (the same code path, for comparisons)
  predictor  the layer's trained predictor, fed exactly the input it was trained on
  oracle     the true |activation| (MLP) / head output norm (attention): what the label ranks by, not an upper
             bound on quality
  random     uniform random scores, seeded
  static     the K units most often in the true top-K over the training documents, the same for every token
             (static_{block}_layer{L}.json of sparse_predictor/static_topk.py): the input-independent baseline
  gate       MLP only, gated MLPs (Llama): the top-K of |act(g)| with g the exact gate pre-activation (CATS-style,
             no predictor; it would save the up and down projections, not the gate)
  structured MLP only: the layer's structured predictor (structured_mlp_layer{L}.pt of
             sparse_predictor/train_structured.py: the MLP's own form at low rank, modules/structured_predictor.py),
             fed exactly the input it was trained on, checked like `predictor`
Layers in the plan's dense set (--dense-layers, layer 0 by default: no earlier input exists for its lookahead)
stay dense in every mode. A predictor or static file must have been made for the run: its recorded input must be
the wiring asked for (--predictor-input) and a top-K label's K the count the run keeps, else loading fails naming the
file and both values (--allow-predictor-mismatch runs it anyway; the manifest lists every mismatch).
This is an accuracy simulation, as in the original: the masks are applied after the dense
projections, and a skipped head still leaves its keys/values for later tokens.
Because the simulation computes every activation before masking it, the controller also counts the on-policy
Recall@K of each sparse layer: how many of the units its mask keeps are in the true top-K of the same forward pass
(|activation| for the MLP, head output norms for attention, in query heads also with --gqa-groups), over the real
(non-padded) tokens the pipeline marks. Oracle is 1 by construction (in query heads; with --gqa-groups the oracle
keeps whole groups, which need not be the top-K heads).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from Decentralized_FM_alpha.modules.structured_predictor import UnitRanker, load_structured
from Decentralized_FM_alpha.utils.activation_store import ModelDims
from Decentralized_FM_alpha.utils.manifest import file_sha256
from Decentralized_FM_alpha.utils.selection import fraction_count, parse_layer_list, static_scores

MODES = ("dense", "predictor", "oracle", "random", "static", "gate", "structured")
FILE_MODES = ("predictor", "static", "structured")  # modes that read a file per sparse layer and block
MLP_ONLY_MODES = ("gate", "structured")  # rank MLP neurons only
DEFAULT_DENSE_LAYERS = "0"
RECALL_COUNTED = ("real tokens of the simulated forward passes (prompts, and generated tokens unless "
                  "--sparse-decode kernels); true top-K of the same pass: |activation| (MLP), head output norms "
                  "(attention, in query heads)")
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
    predictor_input: str = "lookahead"  # the wiring a predictor must have been trained on (SPEC section 7)
    allow_mismatch: bool = False  # run predictors made for another budget or input (recorded)
    dense_layers: tuple[int, ...] = ()  # kept dense in every mode

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"--sparse-mode must be one of {MODES}, got {self.mode!r}")
        if self.mode in FILE_MODES and (self.mlp_budgets or self.att_budgets) and self.predictor_dir is None:
            raise ValueError(f"--sparse-mode {self.mode} needs --predictor-dir")
        if self.mode in MLP_ONLY_MODES and self.att_budgets:
            raise ValueError(f"--sparse-mode {self.mode} ranks MLP neurons only: give no attention budget (run "
                             f"attention budgets with another mode)")
        if self.predictor_input not in ("lookahead", "same") and not re.fullmatch(r"from:\d+", self.predictor_input):
            raise ValueError(f"--predictor-input must be lookahead, same or from:J, got {self.predictor_input!r}")


@dataclass
class PredictorInput:
    kind: str  # att_x or mlp_x
    layer: int


def read_meta(path: Path, block: str, layer: int) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing file for {block} layer {layer}: {path}")
    meta = json.loads(path.read_text())
    if meta.get("layer") != layer:
        raise ValueError(f"{path}: made for layer {meta.get('layer')}, needed for layer {layer}")
    return meta


def made_for_run(meta: dict, kept: int, predictor_input: str | None) -> list[str]:
    """How a predictor (or static) file differs from the run that loads it: its input wiring, and for a top-K label
    the count it was trained to pick (a label without a budget, such as OPT's relu, fits any budget)."""
    differences = []
    if predictor_input is not None and meta.get("input") != predictor_input:
        differences.append(f"trained on input {meta.get('input')!r}, the run asks for {predictor_input!r}")
    if meta.get("label") == "topk" and meta.get("K") != kept:
        differences.append(f"trained for K={meta.get('K')} (k={meta.get('k')}), the run keeps {kept}")
    return differences


def load_predictor(path: Path, layer: int, d: int, out: int, block: str, device: torch.device):
    """The trained Sequential(Linear(d, D), Linear(D, out)), the input it was trained on and its JSON, strictly."""
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"missing predictor file for {block} layer {layer}: {path}")
    meta = read_meta(meta_path, block, layer)
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
    return predictor.to(device).eval(), source, meta


def load_structured_file(path: Path, layer: int, d: int, ffn: int, device: torch.device):
    """A structured predictor (structured_mlp_layer{L}.pt and its JSON), strictly, as the runner calls a predictor;
    the input it was trained on and its JSON."""
    if not path.is_file():
        raise FileNotFoundError(f"missing structured predictor file for mlp layer {layer}: {path}")
    meta = read_meta(path.with_suffix(".json"), "mlp", layer)
    predictor = UnitRanker(load_structured(path, meta, d, ffn))
    source = PredictorInput(meta["input_kind"], int(meta["input_layer"]))
    if (source.kind, source.layer) not in (("att_x", layer), ("mlp_x", layer)):
        raise ValueError(f"{path.with_suffix('.json')}: input {source} is neither layer {layer}'s lookahead (att_x) "
                         f"nor its MLP input (mlp_x)")
    return predictor.to(device).eval(), source, meta


def load_static(path: Path, layer: int, width: int, block: str, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Per-unit scores of a static ranking (count descending, ties by lower index): width - rank, exact in float32."""
    meta = read_meta(path, block, layer)
    counts = meta.get("counts")
    if not isinstance(counts, list) or len(counts) != width:
        raise ValueError(f"{path}: 'counts' must list one count per unit ({width}), found "
                         f"{len(counts) if isinstance(counts, list) else type(counts).__name__}")
    return static_scores(counts).to(device), meta


def file_info(path: Path, meta: dict) -> dict:
    return {"path": str(path), "sha256": file_sha256(path), "input": meta.get("input"), "label": meta.get("label"),
            "k": meta.get("k"), "K": meta.get("K")}


class SparsityController:
    """Shared by the sparse blocks of one pipeline rank: remembers the inputs predictors need
    during a forward pass and turns scores into masks."""

    def __init__(self, plan: SparsityPlan, dims: ModelDims, layers: range, device: torch.device,
                 gate_activation: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """`gate_activation`: the MLP's activation for gate mode (Llama's SiLU); None for an MLP without a gate."""
        self.plan, self.dims, self.layers, self.device = plan, dims, layers, device
        self.gate_activation = gate_activation
        self.generator = torch.Generator(device=device).manual_seed(plan.seed)
        self.predictors: dict[tuple[str, int], tuple[nn.Module, PredictorInput]] = {}
        self.static_scores: dict[tuple[str, int], torch.Tensor] = {}
        self.loaded: list[dict] = []
        self.mismatches: list[str] = []
        self.remembered: dict[tuple[str, int], torch.Tensor] = {}
        self.real_tokens: Optional[torch.Tensor] = None  # (B, T) bool of the forward pass in progress
        # (block, layer) -> [hits, real tokens], device tensors: counting never waits for the device
        self.recall_counts: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.kept = {"mlp": {l: budget_count(b, dims.ffn_dim, "MLP") for l, b in plan.mlp_budgets.items()},
                     "att": {l: kept_heads(b, dims, plan.gqa_groups) for l, b in plan.att_budgets.items()}}
        if plan.mode == "gate" and plan.mlp_budgets and gate_activation is None:
            raise ValueError("--sparse-mode gate needs a gated MLP (Llama's SiLU(gate) * up); this model's MLP has "
                             "no gate (OPT): the gate baseline is n/a for it")
        if plan.mode in FILE_MODES:
            self._load_files(layers)
        if self.mismatches and not plan.allow_mismatch:
            raise ValueError("predictor files made for another run:\n  " + "\n  ".join(self.mismatches)
                             + "\n(--allow-predictor-mismatch runs them anyway and records each difference)")
        self.needed = {(src.kind, src.layer) for _, src in self.predictors.values()}
        if plan.mode == "gate":
            self.needed |= {("mlp_gate", l) for l in plan.mlp_budgets if l in layers}
        outside = sorted(f"{k}_{l}" for k, l in self.needed if l not in layers)
        if outside:
            raise ValueError(f"predictors on this pipeline rank (layers {layers.start}-{layers.stop - 1}) read {outside} "
                             f"from another rank; run sparse inference with world size 1 or --num-layers covering them")

    def _load_files(self, layers: range) -> None:
        """Each sparse layer's predictor (mode predictor) or static ranking (mode static), checked against the run."""
        d = self.dims.hidden_size
        for block, budgets, out in (("mlp", self.plan.mlp_budgets, self.dims.ffn_dim),
                                    ("att", self.plan.att_budgets, self.dims.num_heads)):
            for layer in layers:
                if layer not in budgets:
                    continue
                if self.plan.mode == "predictor":
                    path = self.plan.predictor_dir / f"{block}_layer{layer}.pt"
                    predictor, source, meta = load_predictor(path, layer, d, out, block, self.device)
                    self.predictors[(block, layer)] = (predictor, source)
                    wiring = self.plan.predictor_input
                elif self.plan.mode == "structured":  # MLP only (SparsityPlan); ranks like a predictor
                    path = self.plan.predictor_dir / f"structured_{block}_layer{layer}.pt"
                    predictor, source, meta = load_structured_file(path, layer, d, out, self.device)
                    self.predictors[(block, layer)] = (predictor, source)
                    wiring = self.plan.predictor_input
                else:
                    path = self.plan.predictor_dir / f"static_{block}_layer{layer}.json"
                    self.static_scores[(block, layer)], meta = load_static(path, layer, out, block, self.device)
                    wiring = None  # a static ranking reads no input
                self.loaded.append({"block": block, "layer": layer, **file_info(path, meta)})
                meta_path = path.with_suffix(".json")  # the file that records what it was made for
                self.mismatches += [f"{meta_path}: {d}" for d in made_for_run(meta, self.kept[block][layer], wiring)]

    def describe(self) -> dict:
        return {"mode": self.plan.mode, "mlp_budgets": self.plan.mlp_budgets, "att_budgets": self.plan.att_budgets,
                "mlp_kept": self.kept["mlp"], "att_kept": self.kept["att"],
                "att_unit": "groups" if self.plan.gqa_groups else "heads",
                "gqa_groups": self.plan.gqa_groups, "dense_layers": list(self.plan.dense_layers),
                "predictor_input": self.plan.predictor_input if self.plan.mode in ("predictor", "structured") else None,
                "allow_predictor_mismatch": self.plan.allow_mismatch, "predictor_mismatches": self.mismatches,
                "predictors": self.loaded, "on_policy_recall": self.on_policy_recall()}

    def on_policy_recall(self) -> dict:
        """Per sparse layer of this rank: hits, real tokens, K and Recall@K = hits / (K x tokens) of the masks the run
        applied, against the true top-K of the same forward pass; and the mean over layers per block."""
        layers = []
        for block, layer in sorted(self.recall_counts, key=lambda key: (key[0] != "mlp", key[1])):  # MLP first
            k, (hits, tokens) = self.kept[block][layer], map(int, self.recall_counts[(block, layer)])
            layers.append({"block": block, "layer": layer, "K": k, "hits": hits, "tokens": tokens,
                           "recall": hits / (k * tokens) if tokens else None})
        mean = {}
        for block in ("mlp", "att"):
            values = [r["recall"] for r in layers if r["block"] == block and r["recall"] is not None]
            if values:
                mean[block] = sum(values) / len(values)
        return {"counted": RECALL_COUNTED, "layers": layers, "mean": mean}

    # -- called by the blocks
    def observe(self, layer: int, kind: str, value: Callable[[], torch.Tensor]) -> None:
        if (kind, layer) in self.needed:
            self.remembered[(kind, layer)] = value()

    def mark_real_tokens(self, valid: torch.Tensor) -> None:
        """The pipeline's (B, T) mask of real (non-padded) positions for the forward pass that follows."""
        self.real_tokens = valid

    def is_sparse(self, block: str, layer: int) -> bool:
        budgets = self.plan.mlp_budgets if block == "mlp" else self.plan.att_budgets
        return layer in budgets and self.plan.mode != "dense"

    def keep_neurons(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        if not self.is_sparse("mlp", layer):
            return a
        true_scores = a.abs()
        mask = self.neuron_mask(layer, lambda: true_scores)
        self.count_recall("mlp", layer, mask, true_scores)
        return a * mask.to(a.dtype)

    def keep_heads(self, layer: int, heads: torch.Tensor) -> torch.Tensor:
        """heads: (B, T, H, hd) per-query-head attention outputs."""
        if not self.is_sparse("att", layer):
            return heads
        true_scores = heads.float().norm(dim=-1)  # (B, T, H)
        mask = self.head_mask(layer, lambda: true_scores)
        self.count_recall("att", layer, mask, true_scores)
        return heads * mask[..., None].to(heads.dtype)

    def neuron_mask(self, layer: int, true_scores: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The kept neurons of a sparse layer: (B, T, ffn) bool, or (ffn,) for a static ranking.
        `true_scores` gives |activation| (B, T, ffn) where the mode needs it (oracle; random takes its shape)."""
        return top_k_mask(self.scores("mlp", layer, true_scores), self.kept["mlp"][layer])

    def head_mask(self, layer: int, true_scores: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The kept query heads of a sparse layer: (B, T, H) bool, or (H,) for a static ranking; with gqa_groups
        whole key/value groups. `true_scores` gives the head output norms (B, T, H) where the mode needs them."""
        k = self.kept["att"][layer]
        scores = self.scores("att", layer, true_scores)
        if self.plan.gqa_groups:
            group = self.dims.num_heads // self.dims.num_kv_heads
            grouped = scores.unflatten(-1, (-1, group)).sum(-1)  # (B, T, kv groups)
            return top_k_mask(grouped, k // group).repeat_interleave(group, dim=-1)
        return top_k_mask(scores, k)

    def count_recall(self, block: str, layer: int, mask: torch.Tensor, true_scores: torch.Tensor) -> None:
        """Add the mask's hits in the true top-K of `true_scores` (B, T, width) over the real tokens. A kept unit tied
        with the true K-th score counts while the tie leaves room (the trainer's Recall@K rule, metrics.true_top_k):
        with ReLU's many exact zeros, which zeros a top-K picks is arbitrary and must not decide a hit."""
        k = self.kept[block][layer]
        scores = true_scores.float()
        kth = scores.topk(k, dim=-1).values[..., -1:]  # (B, T, 1)
        room = k - (scores > kth).sum(-1)
        hits_per_token = (mask & (scores > kth)).sum(-1) + torch.minimum((mask & (scores == kth)).sum(-1), room)
        real = self.real_positions(true_scores.shape[:2])
        hits = (hits_per_token * real).sum()
        counts = self.recall_counts.setdefault((block, layer), [hits.new_zeros(()), hits.new_zeros(())])
        counts[0] += hits
        counts[1] += real.sum()

    def real_positions(self, shape: torch.Size) -> torch.Tensor:
        """The marked real positions, or every position when nothing was marked (a block run outside the pipeline)."""
        if self.real_tokens is None:
            return torch.ones(shape, dtype=torch.bool, device=self.device)
        if tuple(self.real_tokens.shape) != tuple(shape):
            raise ValueError(f"real-token mask of shape {tuple(self.real_tokens.shape)} for activations of "
                             f"{tuple(shape)} tokens: the pipeline must mark each forward's positions")
        return self.real_tokens

    def scores(self, block: str, layer: int, true_scores: Callable[[], torch.Tensor]) -> torch.Tensor:
        mode = self.plan.mode
        if mode == "oracle":
            return true_scores()
        if mode == "random":
            shape = true_scores().shape
            return torch.rand(shape, generator=self.generator, device=self.device)
        if mode == "static":
            return self.static_scores[(block, layer)]  # (width,): broadcast over tokens
        if mode == "gate":
            return self.gate_activation(self.remembered[("mlp_gate", layer)].float()).abs()
        predictor, source = self.predictors[(block, layer)]
        x = self.remembered[(source.kind, source.layer)]
        with torch.autocast(self.device.type, enabled=False):
            return predictor(x.float())


def kept_heads(budget: Budget, dims: ModelDims, gqa_groups: bool) -> int:
    """Query heads an attention budget keeps. With gqa_groups whole key/value groups: a fraction counts groups by the
    one count rule (then all of each group's heads), a count must be a whole number of groups."""
    group = dims.num_heads // dims.num_kv_heads
    if not gqa_groups:
        return budget_count(budget, dims.num_heads, "attention")
    if isinstance(budget, float):
        return fraction_count(budget, dims.num_kv_heads) * group
    if budget % group or budget > dims.num_heads:
        raise ValueError(f"--gqa-groups keeps whole groups of {group} query heads: attention budget {budget} is not "
                         f"a multiple of {group} up to {dims.num_heads}")
    return budget


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
    dense = dense_layer_list(args.dense_layers, num_layers)
    layers = [l for l in layers if l not in dense]
    mlp_layers = layers
    if not args.mlp_topk and "LAYER" in env:  # original: MLP sparsity in layers below $LAYER
        mlp_layers = [l for l in range(min(int(env["LAYER"]), num_layers)) if l not in dense]
    mlp = {l: parse_budget(str(mlp_budget)) for l in mlp_layers} if mlp_budget else {}
    att = {l: parse_budget(str(att_budget)) for l in layers} if att_budget else {}
    if att and not args.att_topk and env.get("ATTN_TOPK_2"):
        # original (OPT-175B, 96 layers): layers 34-62 used ATTN_TOPK_2; scaled here to the model's depth
        middle = range(round(34 * num_layers / 96), round(63 * num_layers / 96))
        att.update({l: parse_budget(env["ATTN_TOPK_2"]) for l in middle if l in att})
    mode = args.sparse_mode or "predictor"
    return SparsityPlan(mode=mode, mlp_budgets=mlp, att_budgets=att,
                        predictor_dir=Path(predictor_dir) if predictor_dir else None, gqa_groups=args.gqa_groups,
                        seed=args.seed, predictor_input=args.predictor_input,
                        allow_mismatch=args.allow_predictor_mismatch, dense_layers=tuple(dense))


def dense_layer_list(spec: str, num_layers: int) -> list[int]:
    """--dense-layers: a layer list, or 'none'."""
    if spec.strip() in ("", "none"):
        return []
    try:
        return parse_layer_list(spec, num_layers)
    except ValueError as e:
        raise ValueError(f"--dense-layers: {e}") from e
