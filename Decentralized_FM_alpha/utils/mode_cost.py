"""What ranking the units costs: each sparse mode's extra work per token and sparse layer, for equal-cost comparisons.

Per token and layer, beside the block's own (kept) work, a mode reads these weights once and does one multiply-add
per weight (FLOPs = 2 x weights; elementwise work, norms and the top-K are O(d + units) and left out):
  dense, static, random  0: nothing is computed from the token to rank the units
  predictor              DejaVu's Linear(d, D) -> Linear(D, out): d*D + D*out
  gate                   the exact gate projection of every neuron: d*ffn (it saves the up and down projections only)
  structured             swiglu: 2r(d + ffn) (two rank-r factor pairs); relu (OPT): r(d + ffn) + ffn (fc1's bias)
  oracle                 the dense block itself (every unit's exact activation): MLP 3*d*ffn gated, 2*d*ffn OPT;
                         attention the q, k, v and o projections
Bytes are the weights at the run's dtype (the dtype a deployment would hold them in; the simulation runs
predictors in float32). scripts/study/sparse_sweep.py records these per setting in its manifest (`extra_work`).
"""
from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FREE_MODES = ("dense", "static", "random")
DEFINITIONS = {
    "dense": "0 (nothing ranked)", "static": "0 (a fixed ranking)", "random": "0 (random draws)",
    "predictor": "d*D + D*out (DejaVu's two low-rank layers)", "gate": "d*ffn (the gate projection of every neuron)",
    "structured": "2r(d + ffn) (swiglu) or r(d + ffn) + ffn (relu)",
    "oracle": "the dense block (MLP: 3*d*ffn gated, 2*d*ffn OPT; attention: q, k, v, o)",
}


@dataclass(frozen=True)
class BlockShape:
    """A model's shapes as the cost needs them (from a converted checkpoint's config.json)."""
    d: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    gated: bool

    @classmethod
    def of_config(cls, config: dict) -> "BlockShape":
        d, heads = config["hidden_size"], config["num_attention_heads"]
        gated = config["model_type"] != "opt"
        return cls(d, config["intermediate_size"] if gated else config["ffn_dim"], heads,
                   config.get("num_key_value_heads", heads), config.get("head_dim") or d // heads, gated)

    def dense_weights(self, block: str) -> int:
        if block == "mlp":
            return (3 if self.gated else 2) * self.d * self.ffn
        return self.d * self.head_dim * (2 * self.heads + 2 * self.kv_heads)


def ranking_weights(mode: str, block: str, shape: BlockShape, predictor: dict | None = None) -> int:
    """Weights read per token to rank one layer's units of `block` in `mode`; `predictor` is the loaded file's JSON
    `predictor` entry for the modes that read one (predictor: d, D, out; structured: form, rank)."""
    if mode in FREE_MODES:
        return 0
    if mode == "oracle":
        return shape.dense_weights(block)
    if mode == "gate":
        return shape.d * shape.ffn
    if predictor is None:
        raise ValueError(f"mode {mode}: the cost needs the loaded predictor's shape")
    if mode == "predictor":
        return predictor["D"] * (predictor["d"] + predictor["out"])
    if mode == "structured":
        rank = predictor["rank"]
        if predictor["form"] == "swiglu":
            return 2 * rank * (shape.d + shape.ffn)
        return rank * (shape.d + shape.ffn) + shape.ffn
    raise ValueError(f"no cost rule for mode {mode!r} (known: {sorted(DEFINITIONS)})")


def work(weights: int, dtype: str) -> dict:
    """FLOPs and bytes of reading `weights` once per token with one multiply-add each."""
    return {"weights": weights, "flops": 2 * weights, "weight_bytes": weights * DTYPE_BYTES[dtype]}
