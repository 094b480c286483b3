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


def seed_query_resamples(first, second, statistic, n_resamples: int = 2000, seed: int = 0,
                         chunk: int = 250) -> tuple[float, np.ndarray]:
    """Paired bootstrap over seeds *and* queries of ``statistic(first) − statistic(second)``.

    ``first`` and ``second`` are (S, N) per-query values (ranks, hits) of two methods on the same N queries in each
    of S seeds, row s of both from seed s. ``statistic`` maps a (..., N') array to its (...,) figure per row (a
    recall: ``lambda r: (r < 10).mean(-1)``; a median rank). The figure of a method is the mean of its per-seed
    figures. Each resample draws S seeds with replacement and, for each drawn seed, N queries with replacement; both
    methods see the same draw (paired), so what the interval covers is the variation of the seeds and of the
    queries. Returns (observed difference, (B,) resampled differences)."""
    a, b = np.asarray(first), np.asarray(second)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"seed_query_resamples: two (seeds, queries) arrays of one shape, got {a.shape}, {b.shape}")
    n_seeds, n = a.shape
    observed = float(np.mean(statistic(a)) - np.mean(statistic(b)))
    rng = generator(seed, "seed_query")
    out = []
    for start in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - start)
        seeds = rng.integers(0, n_seeds, size=(m, n_seeds, 1))
        queries = rng.integers(0, n, size=(m, n_seeds, n))
        out.append(statistic(a[seeds, queries]).mean(-1) - statistic(b[seeds, queries]).mean(-1))
    return observed, np.concatenate(out)


def paired_difference(first, second, statistic, n_resamples: int = 2000, seed: int = 0,
                      level: float = LEVEL) -> tuple[float, float, float]:
    """(difference, low, high): :func:`seed_query_resamples`'s observed difference and its percentile interval."""
    observed, samples = seed_query_resamples(first, second, statistic, n_resamples, seed)
    return (observed, *percentile_interval(samples, level))
