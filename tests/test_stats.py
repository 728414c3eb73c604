import math
import random
import statistics

import pytest

from bnexp import stats


def test_quantiles_match_numpy_linear():
    import numpy as np
    xs = [0.3, 0.1, 0.9, 0.5, 0.7, 0.2]
    for q in (0, 0.25, 0.5, 0.75, 1):
        assert stats.quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)))
    assert math.isnan(stats.quantile([], 0.5))


def test_paired_ci_is_the_t_interval_and_covers_its_level():
    diffs = [0.1, 0.2, 0.15, 0.3, -0.05, 0.25, 0.12]
    lo, hi = stats.paired_ci(diffs)
    mean, half = sum(diffs) / 7, 2.4469 * statistics.stdev(diffs) / math.sqrt(7)
    assert lo == pytest.approx(mean - half, abs=1e-5) and hi == pytest.approx(mean + half,
                                                                              abs=1e-5)
    assert stats.paired_ci([0.2]) == (0.2, 0.2)
    assert stats.paired_ci([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3))
    assert all(math.isnan(v) for v in stats.paired_ci([]))
    # 95% of intervals from 3 seeds hold the true mean (a percentile bootstrap held 75%)
    rng = random.Random(0)
    trials = 4000
    held = 0
    for _ in range(trials):
        low, high = stats.paired_ci([rng.gauss(1.0, 2.0) for _ in range(3)])
        held += low <= 1.0 <= high
    assert 0.94 <= held / trials <= 0.96


def test_steps_to_reach():
    assert stats.steps_to_reach([0, 500, 1000], [0.1, 0.91, 0.96], 0.9) == 500
    assert stats.steps_to_reach([0, 500, 1000], [0.1, 0.91, 0.96], 0.95) == 1000
    assert stats.steps_to_reach([0, 500], [0.1, 0.5], 0.9) is None


def test_variant_and_paired_stats():
    v = stats.variant_stats([0.1, 0.95, 0.97, 0.96], [0.1, 0.94, 0.96, 0.95],
                            {0.9: [None, 500, 1000, 500]})
    assert v.failure_rate == 0.25
    assert v.median_test == pytest.approx(0.945)
    assert v.median_steps_to[0.9] == 500 and v.never_reached[0.9] == 1
    p = stats.paired_stats([0.1, 0.5], [0.9, 0.9], [0.1, 0.5], [0.9, 0.95])
    assert p.n_pairs == 2 and p.mean_diff_test == pytest.approx(0.625)
    # the t interval (0.625 +- 3.18) clipped to what a difference of accuracies can be
    assert p.ci_test == pytest.approx((-1.0, 1.0))
    near = stats.paired_stats([0.5] * 3, [0.6, 0.62, 0.61], [0.5] * 3, [0.6, 0.62, 0.61])
    assert near.ci_test == pytest.approx(stats.paired_ci([0.1, 0.12, 0.11]))
    assert near.ci_test == pytest.approx((0.11 - 0.02484, 0.11 + 0.02484), abs=1e-5)
    with pytest.raises(ValueError):
        stats.paired_stats([0.1], [0.2, 0.3], [0.1], [0.2])
