"""Held-out statistics of a predictor's logits: the original's metrics, Recall@K at equal budget, per-document counts."""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from Decentralized_FM_alpha.utils.selection import COUNT_RULE


METRIC_DEFINITIONS = {
    "Recall": "original trainer_{mlp,att}.py: mean over eval batches of the mean true positives per token, divided "
              "by True Sparsity; eval batches of --batch_size rows in row order, so it equals TP/P except that the "
              "last, partial batch weighs as much as a full one",
    "True Sparsity": "original: mean over eval batches of the mean number of truly active units per token (a count)",
    "Classifier Sparsity": "original: mean over eval batches of the mean number of units predicted active "
                           "(sigmoid(logit) >= 0.5) per token (a count)",
    "Loss": "original: mean over eval batches of the class-weighted BCE",
    "Loss Weight": "original: mean over eval batches of w, the weight of inactive units in the BCE",
    "Precision": "true positives / units predicted active, summed over all held-out tokens (null if none predicted)",
    "Per-token Recall": "mean over held-out tokens with at least one active unit of TP/active for that token",
    "Recall@K": "predictor's top-K units vs the true top-K by the label's score, at equal budget K: hits / (K * "
                "tokens); a predicted unit tied with the true K-th score counts as long as the tie leaves room",
    "K": "topk labels: the label's own count fraction_count(k, out); other labels: the held-out mean number of "
         "active units per token, rounded (at least 1)",
    "Captured Mass": "sum over held-out tokens of the label's score (|mlp_label|; attention: the head output norm) "
                     "over the predictor's top-K units, divided by the same sum over the true top-K (1 for the "
                     "oracle); defined for labels ranked by magnitude (topk, threshold), null for relu and gate",
    "fraction_count": COUNT_RULE,
}




def class_weighted_bce(logits: torch.Tensor, y: torch.Tensor, weight_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The original loss: BCE with weight 1 on active units and w = mean(y) + floor on inactive ones."""
    w = y.mean() + weight_floor
    return F.binary_cross_entropy_with_logits(logits, y, weight=y * (1 - w) + w), w


def true_top_k(scores: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The true K-th score of each token (B, 1) and how many units tied with it still fit in a true top-K (B,)."""
    scores = scores.float()
    kth = scores.topk(K, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    return kth, K - (scores > kth).sum(dim=1)


def ranking_statistics(ranking: torch.Tensor, scores: torch.Tensor, K: int,
                       top: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-token Recall@K hits and captured mass of the top-K units of `ranking` (B, out), any ranking: a predictor's
    logits, a fixed input-independent order, the gate, random draws or the label itself (the oracle).

    scores (B, out): the label's ranking of the units; `top` = true_top_k(scores, K) when already known. A picked unit
    tied with the true K-th score counts as a hit as long as the tie leaves room. mass_true is the sum of the true
    top-K scores (the scores above the K-th plus the K-th once per remaining place), mass_predicted that of the picked.
    """
    scores = scores.float()
    kth, room = top if top is not None else true_top_k(scores, K)
    picked = scores.gather(1, ranking.topk(K, dim=1, sorted=False).indices)
    above, tied = (picked > kth).sum(dim=1), (picked == kth).sum(dim=1)
    mass_true = torch.where(scores > kth, scores, 0).sum(dim=1) + room * kth.squeeze(1)
    return {"topk_hits": above + torch.minimum(tied, room), "mass_predicted": picked.sum(dim=1),
            "mass_true": mass_true}


def batch_statistics(logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, K: int,
                     weight_floor: float, top: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> dict[str, torch.Tensor]:
    """Per-token counts of one eval batch (and its loss), kept on the device until the end of the evaluation.

    logits (B, out) float32, labels (B, out) bool, scores (B, out): the label's ranking of the units; `top` is
    true_top_k(scores, K) when already known (it does not change between epochs).
    """
    preds = logits.sigmoid() >= 0.5  # as the original: not logits >= 0, which differs for tiny negatives
    loss, w = class_weighted_bce(logits, labels.float(), weight_floor)
    return {"tp": (labels & preds).sum(dim=1), "active": labels.sum(dim=1), "predicted": preds.sum(dim=1),
            **ranking_statistics(logits, scores, K, top), "loss": loss, "w": w}


def aggregate_statistics(batches: list[dict[str, torch.Tensor]], K: int, magnitude: bool = True
                         ) -> dict[str, float | None]:
    """Held-out metrics; the first five exactly as the original's evaluate() (see METRIC_DEFINITIONS). `magnitude`:
    the label ranks units by |value|, so that a sum of its scores is an activation mass (Captured Mass)."""
    def mean_of_batch_means(key: str) -> float:
        return torch.stack([b[key].double().mean() for b in batches]).mean().item()

    def total(key: str) -> int:
        return int(sum(b[key].sum() for b in batches))

    true_sparsity = mean_of_batch_means("active")
    tp, predicted = total("tp"), total("predicted")
    active = torch.cat([b["active"] for b in batches]).double()
    per_token = torch.cat([b["tp"] for b in batches]).double()[active > 0] / active[active > 0]
    tokens = sum(len(b["tp"]) for b in batches)
    return {"Recall": mean_of_batch_means("tp") / true_sparsity if true_sparsity > 0 else None,
            "True Sparsity": true_sparsity,
            "Classifier Sparsity": mean_of_batch_means("predicted"),
            "Loss": mean_of_batch_means("loss"),
            "Loss Weight": mean_of_batch_means("w"),
            "Precision": tp / predicted if predicted else None,
            "Per-token Recall": per_token.mean().item() if len(per_token) else None,
            "Recall@K": total("topk_hits") / (K * tokens),
            "Captured Mass": captured_mass(batches) if magnitude else None,
            "K": K}


def captured_mass(batches: list[dict[str, torch.Tensor]]) -> float | None:
    true = float(sum(b["mass_true"].double().sum() for b in batches))
    return float(sum(b["mass_predicted"].double().sum() for b in batches)) / true if true > 0 else None




PER_DOCUMENT_COUNTS = ("tp", "active", "predicted", "topk_hits")
PER_DOCUMENT_SUMS = ("mass_predicted", "mass_true")  # float sums of the label's scores


def per_document_counts(batches: list[dict[str, torch.Tensor]], documents: np.ndarray,
                        keys: tuple[str, ...] = PER_DOCUMENT_COUNTS + PER_DOCUMENT_SUMS) -> dict[str, list]:
    """Per held-out document (sorted by id): its tokens and the sums of the per-token `keys`, so that Recall@K,
    Recall, Precision and Captured Mass can be bootstrapped over documents later (counts as int, masses as float)."""
    ids, inverse = np.unique(documents, return_inverse=True)
    counts = {"documents": ids.tolist(), "tokens": np.bincount(inverse, minlength=len(ids)).tolist()}
    for key in keys:
        values = torch.cat([b[key] for b in batches]).double().cpu().numpy()
        sums = np.bincount(inverse, weights=values, minlength=len(ids))
        counts[key] = sums.tolist() if key in PER_DOCUMENT_SUMS else sums.astype(np.int64).tolist()
    return counts
