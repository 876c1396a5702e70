"""p-chart tests: exact critical counts against a brute-force scan, aggregation, ARL matching."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pipelines.surveillance.pchart import (
    aggregate_periods,
    alpha_for_arl,
    critical_counts,
    matched_critical_count,
    pchart,
)


def brute_force_upper(n, p0, alpha):
    """Smallest c with P(X >= c) <= alpha, scanning every count."""
    for c in range(n + 2):
        if stats.binom.sf(c - 1, n, p0) <= alpha:
            return c
    raise AssertionError("unreachable")


def brute_force_lower(n, p0, alpha):
    """Largest c with P(X <= c) <= alpha, or -1 when even 0 events is not unusual."""
    best = -1
    for c in range(n + 1):
        if stats.binom.cdf(c, n, p0) <= alpha:
            best = c
    return best


@pytest.mark.parametrize("p0", [0.11, 0.23, 1 / 360])
@pytest.mark.parametrize("alpha", [0.05, 0.01, 0.001])
def test_critical_counts_match_brute_force(p0, alpha):
    sizes = [1, 10, 25, 50, 137, 400]
    assert critical_counts(sizes, p0, alpha).tolist() == [
        brute_force_upper(n, p0, alpha) for n in sizes
    ]
    assert critical_counts(sizes, p0, alpha, side="lower").tolist() == [
        brute_force_lower(n, p0, alpha) for n in sizes
    ]


def test_pchart_signals_and_attained_alpha():
    events = np.array([[2, 6, 15], [0, 0, 1]])
    n = np.array([[50, 50, 50], [40, 0, 40]])
    result = pchart(events, n, 0.11, 0.001)
    critical = brute_force_upper(50, 0.11, 0.001)
    assert result.critical_count[0, 0] == critical
    assert result.signal.tolist() == [[False, False, 15 >= critical], [False, False, False]]
    assert result.signal[0, 2]
    assert np.all(result.attained_alpha[n > 0] <= 0.001)
    assert result.p_value[0, 2] == pytest.approx(stats.binomtest(15, 50, 0.11, "greater").pvalue)
    assert np.isnan(result.p_value[1, 1])


def test_lower_pchart_flags_too_few_events():
    result = pchart(np.array([0, 10]), np.array([200, 200]), 0.11, 0.001, side="lower")
    assert result.signal.tolist() == [True, False]


def test_aggregate_periods_counts_events_and_cases():
    group = np.array([0, 0, 0, 1, 1, 2])
    period = np.array([0, 0, 2, 1, 1, 0])
    y = np.array([1, 0, 1, 1, 1, 0])
    events, n = aggregate_periods(group, period, y, n_groups=3, n_periods=3)
    assert n.tolist() == [[2, 0, 1], [0, 2, 0], [1, 0, 0]]
    assert events.tolist() == [[1, 0, 1], [0, 2, 0], [0, 0, 0]]


def test_alpha_for_arl_and_matched_design():
    assert alpha_for_arl(2000, 50) == pytest.approx(0.025)
    matched = matched_critical_count(0.11, 50, 2000)
    # The attained ARL0 is the closest achievable one on a log scale.
    alternatives = [50 / stats.binom.sf(c - 1, 50, 0.11) for c in range(1, 51)]
    distance = [abs(np.log(a / 2000)) for a in alternatives]
    assert matched.critical_count == int(np.argmin(distance)) + 1
    assert matched.arl0_cases == pytest.approx(50 / matched.attained_alpha)
    # Worked by hand: P(X >= 10 | 50, 0.11) = 0.0434 -> ARL0 1151 cases; P(X >= 11) = 0.0183
    # -> 2738 cases. |ln(2738/2000)| = 0.31 < |ln(1151/2000)| = 0.55, so 11 events.
    assert matched.critical_count == 11
    assert matched.arl0_cases == pytest.approx(2737.8, rel=1e-3)
