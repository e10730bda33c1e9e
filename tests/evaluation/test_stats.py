"""Confidence intervals and paired tests against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lazymerge.evaluation.stats import mcnemar_exact, paired_bootstrap, wilson_interval


@pytest.mark.parametrize(
    "k,n,low,high",
    [
        # Wilson 95%: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.959964
        (8, 10, 0.490162, 0.943318),
        (0, 10, 0.0, 0.277533),
        (10, 10, 0.722467, 1.0),
        (50, 100, 0.403832, 0.596168),
        (447, 447, 0.991479, 1.0),  # at k = n the lower bound is n / (n + z^2)
    ],
)
def test_wilson_interval_hand_computed(k: int, n: int, low: float, high: float) -> None:
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(low, abs=1e-6) and got[1] == pytest.approx(high, abs=1e-6)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


@pytest.mark.parametrize(
    "b,c,p",
    [
        (0, 0, 1.0),
        (1, 9, 2 * (1 + 10) / 1024),  # 2 * P(X <= 1), X ~ Bin(10, 1/2)
        (9, 1, 2 * (1 + 10) / 1024),
        (5, 5, 1.0),
        (0, 6, 2 / 64),
        (3, 12, 2 * sum(math.comb(15, i) for i in range(4)) / 2**15),
    ],
)
def test_mcnemar_exact_hand_computed(b: int, c: int, p: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_paired_bootstrap_counts_and_interval() -> None:
    first = [True] * 60 + [False] * 40
    second = [True] * 50 + [False] * 10 + [True] * 30 + [False] * 10  # 10 lost, 30 gained
    result = paired_bootstrap(first, second, resamples=4000, seed=7)
    assert (result.only_first, result.only_second) == (10, 30)
    assert result.difference == pytest.approx(0.2)
    assert result.p_value == pytest.approx(mcnemar_exact(10, 30))
    # the normal approximation of the paired difference: sd of per-item differences / sqrt(n)
    d = np.array(second, dtype=int) - np.array(first, dtype=int)
    se = d.std() / math.sqrt(len(d))
    assert result.ci_low == pytest.approx(0.2 - 1.96 * se, abs=0.02)
    assert result.ci_high == pytest.approx(0.2 + 1.96 * se, abs=0.02)
    assert paired_bootstrap(first, second, resamples=4000, seed=7) == result  # seeded


def test_paired_bootstrap_identical_scorings() -> None:
    same = [True, False, True]
    result = paired_bootstrap(same, same)
    assert result.difference == 0 and result.ci_low == result.ci_high == 0 and result.p_value == 1.0


def test_bootstrap_counts_and_percentile_interval() -> None:
    from lazymerge.evaluation.stats import bootstrap_counts, percentile_interval

    counts = bootstrap_counts(7, 500, np.random.default_rng(0))
    assert counts.shape == (500, 7) and (counts.sum(axis=1) == 7).all() and (counts >= 0).all()
    # the mean of a constant is the constant in every resample
    assert percentile_interval(counts @ np.full(7, 0.25) / 7) == pytest.approx((0.25, 0.25))
    samples = np.arange(1001, dtype=float)
    assert percentile_interval(samples) == pytest.approx((25.0, 975.0))
