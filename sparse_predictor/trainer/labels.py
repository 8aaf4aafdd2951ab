"""What a predictor reads and what it predicts (SPEC §7): input wiring, label definitions, labels as bits."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from Decentralized_FM_alpha.utils.selection import COUNT_RULE, fraction_count

if TYPE_CHECKING:  # only an annotation: rows imports this module
    from sparse_predictor.trainer.rows import RowFile


BLOCKS = ("mlp", "att")
MLP_LABELS = ("relu", "topk", "threshold", "gate")
# DejaVu's deployed wiring (what its inference feeds each predictor): MLP of layer l from att_x_l, attention of layer l
# from att_x_{l-1}. The original trained its MLP predictors on mlp_x_l and fed them att_x_l (SPEC §9); --input same
# trains on mlp_x_l for a predictor that is run on mlp_x_l.
DEFAULT_INPUT = {"mlp": "lookahead", "att": "lookahead"}


@dataclass(frozen=True)
class LabelSpec:
    """Which units count as active for a token: `scores` rank the units and a rule cuts the ranking."""
    name: str  # relu | topk | threshold | gate (attention: topk)
    source_kind: str  # the collected kind the label is computed from: mlp_label, mlp_gate or att_label
    k: float | None = None  # topk: fraction of units kept per token
    threshold: float | None = None  # threshold: |y| > threshold
    group: int = 1  # topk of attention heads in whole key/value groups of this many query heads (--gqa-groups)

    def definition(self) -> str:
        if self.group > 1:
            return (f"the heads of the top fraction_count(k, width / {self.group}) key/value groups by the sum of their "
                    f"{self.group} query heads' |att_label| per token, k = {self.k} ({COUNT_RULE})")
        return {"relu": "mlp_label > 0 (exact for a ReLU MLP: an inactive neuron contributes nothing)",
                "topk": f"top fraction_count(k, width) of |{self.source_kind}| per token, k = {self.k} "
                         f"({COUNT_RULE})",
                "threshold": f"|mlp_label| > {self.threshold}",
                "gate": "mlp_gate > 0 (gate projection before SiLU)"}[self.name]

    @property
    def ranks_by_magnitude(self) -> bool:
        """Its scores are |activation| (MLP) or head norms (attention), so their sum is a mass (Captured Mass)."""
        return self.name in ("topk", "threshold")

    def width_of(self, files: dict[str, "RowFile"]) -> int:
        return files[self.source_kind].width

    def top_count(self, width: int) -> int:
        return fraction_count(self.k, width // self.group) * self.group

    def scores(self, values: torch.Tensor) -> torch.Tensor:
        """(rows, width) ranking of the units; the labels and the true top-K of Recall@K both come from it. In whole
        groups every head scores its group's sum, so the top K = groups x group heads are whole groups."""
        if self.group > 1:
            return values.abs().unflatten(1, (-1, self.group)).sum(-1).repeat_interleave(self.group, dim=1)
        return values.abs() if self.name in ("topk", "threshold") else values

    def labels(self, scores: torch.Tensor) -> torch.Tensor:
        """(rows, width) bool: the active units."""
        if self.name == "topk":
            return topk_mask(scores, self.top_count(scores.shape[1]))
        return scores > (self.threshold if self.name == "threshold" else 0.0)


def make_label_spec(block: str, name: str, k: float | None, threshold: float | None, width: int,
                    group: int = 1) -> LabelSpec:
    """Validate the label flags; attention always uses the original top-k of head norms (of whole key/value groups of
    `group` heads when group > 1)."""
    if block == "att":
        name, source = "topk", "att_label"
    else:
        source = "mlp_gate" if name == "gate" else "mlp_label"
    if name == "topk":
        if k is None:
            raise ValueError("--label topk needs --k (the fraction of units kept per token)")
        if not 0 < k <= 1:
            raise ValueError(f"--k {k}: need a fraction 0 < k <= 1 of the {width} units")
    elif k is not None:
        raise ValueError(f"--k is only used by --label topk, not by --label {name}")
    if name == "threshold":
        if threshold is None or threshold < 0:
            raise ValueError(f"--label threshold needs --threshold >= 0, got {threshold}")
    elif threshold is not None:
        raise ValueError(f"--threshold is only used by --label threshold, not by --label {name}")
    if group > 1 and (block != "att" or width % group):
        raise ValueError(f"whole groups of {group} units are for attention heads in key/value groups, not {block} "
                         f"units of width {width}")
    return LabelSpec(name, source, k, threshold, group)


def fraction_list(text: str) -> list[float]:
    """--k: one fraction, or a comma list trained together (each written to its own --out-dir, see k_name)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--k takes fractions, e.g. 0.25 or 0.1,0.25,0.5; got {text!r}") from e
    if not values:
        raise argparse.ArgumentTypeError("--k: no fraction given")
    return values


def k_name(k: float) -> str:
    """A fraction as it appears in folder names ({k} in --out-dir): 0.25 -> '0.25'."""
    return f"{k:g}"


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    indices = scores.topk(k, dim=1).indices
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, indices, True)


@dataclass(frozen=True)
class InputSpec:
    flag: str  # same | lookahead | from:J, as given
    kind: str  # att_x or mlp_x
    layer: int


def resolve_input(block: str, flag: str, layer: int) -> InputSpec:
    """The collected tensor a layer's predictor reads (SPEC §7); inference must feed the same one.

    same: MLP mlp_x_l, attention att_x_l. lookahead (DejaVu's inference wiring): MLP att_x_l, attention
    att_x_{l-1} (att_x_0 for layer 0). from:J: att_x_J, the residual stream entering layer J <= l.
    """
    if flag == "same":
        return InputSpec(flag, "mlp_x" if block == "mlp" else "att_x", layer)
    if flag == "lookahead":
        return InputSpec(flag, "att_x", layer if block == "mlp" else max(layer - 1, 0))
    match = re.fullmatch(r"from:(\d+)", flag)
    if match is None:
        raise ValueError(f"--input must be same, lookahead or from:J, got {flag!r}")
    source = int(match.group(1))
    if source > layer:
        raise ValueError(f"--input {flag}: layer {source} comes after the predicted layer {layer}; need J <= {layer}")
    return InputSpec(flag, "att_x", source)




LABEL_BITS = 8  # units per stored label byte


def packed_width(width: int) -> int:
    return -(-width // LABEL_BITS)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(..., width) bool -> (..., packed_width(width)) uint8, unit i in bit i % 8 of byte i // 8: a label costs one
    bit per unit on the device, not a byte (at Llama-3.2-3B widths a layer's labels shrink from 8 KB to 1 KB a row)."""
    pad = -mask.shape[-1] % LABEL_BITS
    if pad:
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], pad)], dim=-1)
    bits = mask.reshape(*mask.shape[:-1], -1, LABEL_BITS).to(torch.uint8)
    shifts = torch.arange(LABEL_BITS, dtype=torch.uint8, device=mask.device)
    return (bits << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of pack_bits: (..., packed_width(width)) uint8 -> (..., width) bool."""
    shifts = torch.arange(LABEL_BITS, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :width].bool()


def label_bits(label: LabelSpec, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One label of stored float16 rows (read from the mmaps, or kept by an online pass): its bits (pack_bits) and the
    float32 scores it ranks units by."""
    scores = label.scores(values.float())
    return pack_bits(label.labels(scores)), scores
