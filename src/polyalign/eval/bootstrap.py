"""Bootstrap intervals over queries, from per-query values (ranks, 0/1 hits), at the cost of a histogram.

Resampling n queries with replacement and recomputing a figure that depends only on the multiset of per-query
values (a mean of hits, R@k) is the same as drawing the histogram of the resample from Multinomial(n, observed
frequencies); so B resamples cost B × (number of distinct values), not B × n gathers, and recalls need only one
value per R@k bucket. A median's resamples are drawn from its exact bootstrap distribution (``median_resamples``).
Intervals are percentile intervals; a figure at 0 or 1 gets a zero-width one (no resample differs).
"""
from __future__ import annotations

import zlib

import numpy as np

LEVEL = 0.95


def generator(seed: int, tag: str) -> np.random.Generator:
    """A generator determined by ``seed`` and ``tag`` alone (not by how many were made before it)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(tag.encode())])


def resample_histogram(values, n_resamples: int, seed: int = 0, tag: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(U,) sorted distinct values and (B, U) their counts in each of B bootstrap resamples of ``values``."""
    values = np.asarray(values).reshape(-1)
    if values.size == 0:
        raise ValueError("bootstrap: no queries to resample")
    distinct, counts = np.unique(values, return_counts=True)
    resampled = generator(seed, tag).multinomial(values.size, counts / values.size, size=n_resamples)
    return distinct, resampled


def median_resamples(values, n_resamples: int, seed: int = 0, tag: str = "") -> np.ndarray:
    """(B,) lower medians of B bootstrap resamples of ``values``, drawn from their exact distribution: the lower
    median of n draws is <= v exactly when at least (n - 1) // 2 + 1 of them are, a Binomial(n, F(v)) count, so
    inverting that CDF costs (number of distinct values) + B, however many distinct values there are."""
    from scipy.stats import binom

    values = np.asarray(values).reshape(-1)
    if values.size == 0:
        raise ValueError("bootstrap: no queries to resample")
    distinct, counts = np.unique(values, return_counts=True)
    n = values.size
    cdf = binom.sf((n - 1) // 2, n, np.cumsum(counts) / n)  # P(resampled median <= distinct[u])
    u = generator(seed, tag).random(n_resamples)
    return distinct[np.minimum(np.searchsorted(cdf, u, side="right"), distinct.size - 1)].astype(float)


def percentile_interval(samples, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap samples."""
    lo, hi = np.quantile(np.asarray(samples, dtype=float), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def hit_interval(key: str, hits, n_resamples: int, seed: int = 0) -> dict[str, float]:
    """``key_ci_low``/``key_ci_high``: the 95% bootstrap interval of the mean of ``hits`` (0/1 per query) over its
    queries, resampled by a generator seeded from (``seed``, ``key``); {} when ``n_resamples`` is 0."""
    hits = np.asarray(hits, dtype=float).reshape(-1)
    if n_resamples <= 0:
        return {}
    values, counts = resample_histogram(hits, n_resamples, seed, key)
    lo, hi = percentile_interval(counts @ values / hits.size)
    return {f"{key}_ci_low": lo, f"{key}_ci_high": hi}
