"""95% intervals for the report: a percentile bootstrap over documents, and the spread over training seeds.

Every metric the summary reports is a ratio of sums over documents (Recall@K = hits / (K * tokens), a mean cosine =
sum / count, a perplexity = exp(-sum of log-probs / tokens)), so one resampling scheme serves them all: draw the
documents with replacement, recompute the ratio of the resampled sums, take the 2.5% and 97.5% quantiles. Paired
statistics (a perplexity ratio to dense on the same requests, a same-layer minus lookahead Recall@K on the same
held-out documents) resample the documents once for both terms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
METHOD = f"percentile bootstrap over documents, {RESAMPLES} resamples, {LEVEL:.0%}"


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    documents: int
    method: str = METHOD

    def text(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "documents": self.documents,
                "method": self.method}


def bootstrap(columns: Mapping[str, Sequence[float]], statistic: Callable[[Mapping[str, np.ndarray]], np.ndarray],
              seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL, method: str = METHOD) -> Interval:
    """`statistic` of the column sums over documents, and its bootstrap interval.

    columns: per-document values (one entry per document, every column the same length); statistic: maps the
    column sums (arrays: one value per resample, or 0-d for the point estimate) to the metric, vectorised.
    """
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}
    n = {len(a) for a in arrays.values()}
    if len(n) != 1 or 0 in n:
        raise ValueError(f"bootstrap needs columns of one non-zero length, got {sorted(n)}")
    n = n.pop()
    value = float(statistic({k: a.sum() for k, a in arrays.items()}))
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=resamples)  # (resamples, n)
    resampled = np.asarray(statistic({k: counts @ a for k, a in arrays.items()}), dtype=np.float64)
    low, high = np.quantile(resampled, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Interval(value, float(low), float(high), n, method)


def cluster_sums(columns: Mapping[str, Sequence[float]], clusters: Sequence) -> dict[str, np.ndarray]:
    """Each column summed per cluster (e.g. WikiText windows per article), clusters in sorted order: bootstrapping
    these sums resamples whole clusters (a cluster bootstrap), since units of one cluster are not independent."""
    _, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    return {k: np.bincount(inverse, weights=np.asarray(v, dtype=np.float64)) for k, v in columns.items()}


def ratio(numerator: str, denominator: str) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    return lambda sums: sums[numerator] / sums[denominator]


def seed_spread(values: Sequence[float]) -> dict:
    """Mean, min and max over training seeds (the spread a reader should expect from retraining)."""
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "min": min(values), "max": max(values), "seeds": len(values)}
