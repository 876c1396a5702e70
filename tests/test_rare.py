"""Rare-event tests: sentinel rule and exact Poisson / binomial tests against scipy directly."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pipelines.surveillance.rare import (
    MAJOR_EVENT_RATE,
    binomial_upper_pvalue,
    critical_event_count,
    poisson_upper_pvalue,
    rare_event_tests,
    sentinel_mask,
)


def test_baseline_is_htg108_2_4_4():
    assert MAJOR_EVENT_RATE == pytest.approx(33 / 50_000)


def test_sentinel_rule_flags_each_sentinel_event_row():
    types = np.array(["cement_leak", "death", "Paralysis ", "new_fracture", "cord_compression"])
    assert sentinel_mask(types).tolist() == [False, True, True, False, True]
    assert sentinel_mask(np.array([], dtype=str)).tolist() == []
    assert sentinel_mask(["radiculopathy"], sentinel_types=["radiculopathy"]).tolist() == [True]


def test_poisson_pvalue_matches_scipy():
    assert poisson_upper_pvalue(3, 0.5) == pytest.approx(1 - stats.poisson.cdf(2, 0.5))
    assert poisson_upper_pvalue(0, 0.5) == pytest.approx(1.0)
    mid = poisson_upper_pvalue(3, 0.5, mid_p=True)
    assert mid == pytest.approx(1 - stats.poisson.cdf(3, 0.5) + 0.5 * stats.poisson.pmf(3, 0.5))
    assert mid < poisson_upper_pvalue(3, 0.5)


def test_binomial_pvalue_matches_binomtest():
    for x, n in [(0, 100), (1, 200), (3, 800), (5, 5000)]:
        expected = stats.binomtest(x, n, MAJOR_EVENT_RATE, "greater").pvalue
        assert binomial_upper_pvalue(x, n, MAJOR_EVENT_RATE) == pytest.approx(expected)


def test_critical_event_count_is_the_smallest_significant_count():
    for n in [100, 200, 1000, 20_000]:
        c = int(critical_event_count(n, MAJOR_EVENT_RATE, 0.001))
        assert binomial_upper_pvalue(c, n, MAJOR_EVENT_RATE) <= 0.001
        assert binomial_upper_pvalue(c - 1, n, MAJOR_EVENT_RATE) > 0.001


def test_rare_event_tests_per_site_and_network():
    events = np.array([0, 1, 4, 0])
    n = np.array([200, 300, 250, 0])
    result = rare_event_tests(events, n, alpha=0.001)
    assert result.signal.tolist() == [False, False, True, False]
    assert np.isnan(result.p_binomial[3])
    assert result.network_events == 5 and result.network_n == 750
    assert result.network_p_binomial == pytest.approx(
        stats.binomtest(5, 750, MAJOR_EVENT_RATE, "greater").pvalue
    )
    assert result.network_p_poisson == pytest.approx(stats.poisson.sf(4, 750 * MAJOR_EVENT_RATE))
    assert result.network_signal
