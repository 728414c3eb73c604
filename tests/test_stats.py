import math

import pytest

from bnexp import stats


def test_quantiles_match_numpy_linear():
    import numpy as np
    xs = [0.3, 0.1, 0.9, 0.5, 0.7, 0.2]
    for q in (0, 0.25, 0.5, 0.75, 1):
        assert stats.quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)))
    assert math.isnan(stats.quantile([], 0.5))


def test_bootstrap_ci_is_reproducible_and_brackets_the_mean():
    diffs = [0.1, 0.2, 0.15, 0.3, -0.05, 0.25, 0.12]
    lo, hi = stats.bootstrap_ci(diffs)
    assert (lo, hi) == stats.bootstrap_ci(diffs)
    mean = sum(diffs) / len(diffs)
    assert lo < mean < hi
    assert min(diffs) <= lo and hi <= max(diffs)
    assert stats.bootstrap_ci([0.2]) == (0.2, 0.2)
    wide = stats.bootstrap_ci([-1.0, 1.0, -1.0, 1.0])
    assert wide[0] < 0 < wide[1]


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
    with pytest.raises(ValueError):
        stats.paired_stats([0.1], [0.2, 0.3], [0.1], [0.2])
