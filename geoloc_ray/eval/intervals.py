"""Interval arithmetic for multi-seed results (pure numpy): a two-stage paired bootstrap and a paired t-interval.

Each seed contributes one vector of per-query values (a hit in percent, or the difference of two variants'
hits on the same query: pairing removes the query's own difficulty from the comparison). The statistic is the
mean over seeds of each seed's mean over its queries, i.e. the metric averaged over seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

_CHUNK = 256  # resamples drawn at once per seed (bounds memory at CHUNK x queries)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def excludes(self, value: float = 0.0) -> bool:
        return not self.low <= value <= self.high

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def seed_means(per_seed: Sequence[np.ndarray]) -> np.ndarray:
    return np.array([np.mean(v) for v in per_seed], dtype=np.float64)


def bootstrap_interval(per_seed: Sequence[np.ndarray], resamples: int = 2000, confidence: float = 0.95,
                       rng: np.random.Generator | None = None) -> Interval:
    """Percentile interval of the seed-averaged mean: each resample draws seeds with replacement, then, for each
    drawn seed, its queries with replacement (an independent draw per pick). Deterministic for a given `rng`."""
    rng = np.random.default_rng(0) if rng is None else rng
    values = [np.asarray(v, dtype=np.float64) for v in per_seed]
    if not values or any(len(v) == 0 for v in values):
        raise ValueError("every seed needs at least one query")
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    drawn = np.empty(picks.shape, dtype=np.float64)
    for s, v in enumerate(values):
        slots = np.flatnonzero(picks == s)
        for start in range(0, len(slots), _CHUNK):
            chunk = slots[start : start + _CHUNK]
            drawn.flat[chunk] = v[rng.integers(0, len(v), size=(len(chunk), len(v)))].mean(axis=1)
    stats = drawn.mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return Interval(float(seed_means(values).mean()), float(low), float(high))


def t_interval(per_seed: Sequence[np.ndarray], confidence: float = 0.95) -> Interval:
    """Student-t interval over the seeds' means (queries only enter through each seed's mean); paired when the
    inputs are per-query differences. Needs two seeds or more."""
    from scipy import stats

    means = seed_means(per_seed)
    if len(means) < 2:
        raise ValueError("a t-interval over seeds needs at least two seeds")
    half = stats.t.ppf(0.5 + confidence / 2, df=len(means) - 1) * means.std(ddof=1) / np.sqrt(len(means))
    return Interval(float(means.mean()), float(means.mean() - half), float(means.mean() + half))


def interval(per_seed: Sequence[np.ndarray], method: str, resamples: int = 2000, confidence: float = 0.95,
             rng: np.random.Generator | None = None) -> Interval:
    """The configured method: "bootstrap" (queries and seeds) or "t" (over seeds)."""
    if method == "t":
        return t_interval(per_seed, confidence)
    return bootstrap_interval(per_seed, resamples, confidence, rng)
