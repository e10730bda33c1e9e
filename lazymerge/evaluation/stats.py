"""Statistics for reward-model evaluations: confidence intervals and paired tests.

- `wilson_interval`: the Wilson score interval of a proportion k/n (95% by default). Chosen over
  the normal approximation because it stays inside [0, 1] and behaves at 0% and 100%.
- `paired_bootstrap`: the 95% percentile interval of the difference in accuracy between two
  scorings of the same pairs, resampling pairs with a seeded generator (the pairs are the unit
  that varies between benchmarks; the two scorings share them).
- `mcnemar_exact`: the two-sided exact McNemar p-value on the discordant pairs (a binomial test
  with p = 1/2), the paired test for "does the merge change which pairs are right".
- `bootstrap_counts` and `percentile_interval`: resamples as counts per unit (so any weighted
  statistic is a matrix product) and their 95% percentile interval, for scores that are not
  proportions (RewardBench 2's 1/k rows, its Ties rule, means of subsets).

Pure functions over Python and numpy values; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The standard normal quantile for a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"{k} successes out of {n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 or k = n the bound is exactly 0 or 1; rounding must not push it past
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts.

    Args:
        only_first: pairs the first scoring gets right and the second wrong.
        only_second: pairs the second gets right and the first wrong.
    """
    n = only_first + only_second
    if n == 0:
        return 1.0
    k = min(only_first, only_second)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * float(tail))


@dataclass(frozen=True)
class PairedComparison:
    """A scoring compared with a baseline on the same items."""

    #: accuracy(second) - accuracy(first)
    difference: float
    ci_low: float
    ci_high: float
    #: items only the first / only the second gets right
    only_first: int
    only_second: int
    p_value: float
    resamples: int
    seed: int


def paired_bootstrap(
    first: Sequence[bool], second: Sequence[bool], resamples: int = 2000, seed: int = 0
) -> PairedComparison:
    """Difference in accuracy (second - first) on the same items, with a 95% paired bootstrap
    interval (percentile method, items resampled with replacement) and the exact McNemar p-value.
    """
    a = np.asarray(first, dtype=bool)
    b = np.asarray(second, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("paired scorings must cover the same items")
    n = len(a)
    only_first = int((a & ~b).sum())
    only_second = int((~a & b).sum())
    p_value = mcnemar_exact(only_first, only_second)
    if n == 0:
        return PairedComparison(0.0, 0.0, 0.0, 0, 0, 1.0, 0, seed)
    diff = b.astype(np.int8) - a.astype(np.int8)  # per item: -1, 0 or +1
    rng = np.random.default_rng(seed)
    # resample in blocks so memory stays small for large benchmarks
    means = np.empty(resamples)
    block = max(1, 2_000_000 // n)
    for start in range(0, resamples, block):
        count = min(block, resamples - start)
        idx = rng.integers(0, n, size=(count, n))
        means[start : start + count] = diff[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedComparison(
        float(diff.mean()), float(low), float(high), only_first, only_second, p_value, resamples, seed
    )


def bootstrap_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) counts: how often each of n units is drawn in each resample of n draws with
    replacement (every row sums to n)."""
    if n <= 0:
        return np.zeros((resamples, 0))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap samples."""
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)
