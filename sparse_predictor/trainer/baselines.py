"""Rankings that need no trained predictor, scored on the held-out rows with the predictors' own metrics.

A ranker maps one chunk of held-out rows to (rows, units) ranking scores: a fixed input-independent order (the
static top-K), seeded random draws, a quantity computed from the model (the gate), or the label itself (the
oracle). Every ranker goes through metrics.ranking_statistics, the function that scores the predictors' logits,
so Recall@K, its tie rule and the captured mass mean the same for all of them, and the per-document sums pool and
pair with the predictors' records (same held-out documents, sorted by id).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from Decentralized_FM_alpha.utils.activation_store import ActivationStore
from sparse_predictor.trainer.labels import LabelSpec
from sparse_predictor.trainer.metrics import per_document_counts, ranking_statistics, true_top_k
from sparse_predictor.trainer.rows import chunk_slices, open_rows, stream_chunks

# values: collected kind -> (rows, width) float32 held-out rows of the chunk; scores: the label's ranking of them.
Ranker = Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]
RANKING_KEYS = ("topk_hits", "mass_predicted", "mass_true")


def score_rankers(store: ActivationStore, layer: int, labels: Sequence[LabelSpec], is_test: np.ndarray,
                  rankers: Mapping[str, Sequence[Ranker]], extra_kinds: Sequence[str], device: torch.device
                  ) -> dict[tuple[str, int], dict]:
    """(ranker name, label index) -> Recall@K, Captured Mass, K and per-document sums over the held-out rows.

    rankers[name][i] ranks the units for labels[i] (labels of one source kind and width, e.g. top-K at several
    fractions); extra_kinds are further collected kinds of the layer a ranker reads (e.g. mlp_gate)."""
    kinds = list(dict.fromkeys([labels[0].source_kind, *extra_kinds]))
    files = [open_rows(store, kind, layer) for kind in kinds]
    width = files[0].width
    Ks = [label.top_count(width) for label in labels]
    slices = [s for s in chunk_slices(len(is_test), [f.width for f in files]) if is_test[s].any()]
    batches: dict[tuple[str, int], list[dict]] = {(name, i): [] for name in rankers for i in range(len(labels))}
    for rows, tensors in tqdm(stream_chunks(files, slices, device), total=len(slices), unit="chunk", leave=False,
                              desc=f"layer {layer} baselines"):
        local = np.flatnonzero(is_test[rows])
        index = torch.from_numpy(local).to(device)
        values = {kind: t[index].float() for kind, t in zip(kinds, tensors)}
        for i, (label, K) in enumerate(zip(labels, Ks)):
            scores = label.scores(values[label.source_kind])
            top = true_top_k(scores, K)
            for name, per_label in rankers.items():
                batches[(name, i)].append(ranking_statistics(per_label[i](values, scores), scores, K, top))
    documents = store.document_ids()[is_test]
    out = {}
    for (name, i), stats in batches.items():
        hits = sum(int(b["topk_hits"].sum()) for b in stats)
        mass = [sum(float(b[key].double().sum()) for b in stats) for key in ("mass_predicted", "mass_true")]
        out[(name, i)] = {"Recall@K": hits / (Ks[i] * int(is_test.sum())), "K": Ks[i],
                          "Captured Mass": mass[0] / mass[1] if labels[i].ranks_by_magnitude and mass[1] > 0 else None,
                          "per_document": per_document_counts(stats, documents, RANKING_KEYS)}
    return out


def fixed_ranker(scores: torch.Tensor) -> Ranker:
    """The same (units,) scores for every row: an input-independent ranking such as the static top-K."""
    return lambda values, label_scores: scores.to(label_scores.device).expand_as(label_scores)


def random_ranker(seed: int) -> Ranker:
    """A fresh uniform random ranking per row (torch.rand from a generator seeded with `seed`): the K units picked
    are a uniform random K-subset, whose expected Recall@K is K / units."""
    generators: dict[torch.device, torch.Generator] = {}

    def rank(values: Mapping[str, torch.Tensor], label_scores: torch.Tensor) -> torch.Tensor:
        device = label_scores.device
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        return torch.rand(label_scores.shape, generator=generators[device], device=device)
    return rank


def oracle_ranker(values: Mapping[str, torch.Tensor], label_scores: torch.Tensor) -> torch.Tensor:
    """The label's own scores: Recall@K 1 and Captured Mass 1 by construction (a check of the metric)."""
    return label_scores


def kind_ranker(kind: str, transform: Callable[[torch.Tensor], torch.Tensor]) -> Ranker:
    """Rank by a function of another collected kind of the layer, e.g. |SiLU(g)| of mlp_gate."""
    return lambda values, label_scores: transform(values[kind])
