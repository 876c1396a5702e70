"""Periodic (monthly or quarterly) exact binomial p-charts per site.

Why this module exists
----------------------
The p-chart is what most registries already publish: each period's event proportion against
limits around the baseline. kyphowatch keeps it as a familiar, easily explained view and as
the comparator for the CUSUM in ``benchmarks/bench_detection.py`` (at a matched false-alarm
rate the CUSUM detects a sustained doubling of the odds sooner).

Limits are exact binomial, not the normal approximation (which is poor at ``n p0 < 5``, the
usual case for one site's quarter). For a period with ``n`` cases and per-point false-alarm
probability ``alpha`` the upper critical count is the smallest ``c`` with
``P(X >= c) <= alpha`` under ``Binomial(n, p0)``; the period signals when ``x >= c``. Because
counts are discrete the attained per-point probability ``P(X >= c)`` is at most ``alpha``
and is reported. The optional lower chart is the mirror image (``P(X <= c) <= alpha``).

Matching a CUSUM's false-alarm rate
-----------------------------------
A chart checked once per period with attained per-point probability ``a`` has an in-control
run length of ``1 / a`` periods, i.e. ``cases_per_period / a`` cases. :func:`alpha_for_arl`
returns the per-point alpha whose ARL0 in cases equals a target (``cases_per_period / arl0``)
and :func:`matched_critical_count` picks, for a fixed period size, the critical count whose
attained ARL0 is closest (on a log scale) to the CUSUM's ARL0, reporting what it attains.

Public API
----------
``aggregate_periods(group, period, y, n_groups, n_periods) -> (events, n)`` (2-D, groups x periods)
``critical_counts(n, p0, alpha, side="upper") -> array``
``pchart(events, n, p0, alpha, *, side="upper") -> PChartResult``
``alpha_for_arl(arl0, cases_per_period) -> float``
``matched_critical_count(p0, cases_per_period, arl0) -> MatchedPChart``
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.surveillance.distributions import binom_cdf, binom_isf, binom_ppf, binom_sf

__all__ = [
    "MatchedPChart",
    "PChartResult",
    "aggregate_periods",
    "alpha_for_arl",
    "critical_counts",
    "matched_critical_count",
    "pchart",
]


@dataclass(frozen=True)
class PChartResult:
    """Per (site, period) exact limits, attained alpha, p-values and signals (input shape)."""

    events: np.ndarray
    n: np.ndarray
    proportion: np.ndarray
    critical_count: np.ndarray
    limit: np.ndarray
    attained_alpha: np.ndarray
    p_value: np.ndarray
    signal: np.ndarray
    alpha: float
    side: str


@dataclass(frozen=True)
class MatchedPChart:
    """The p-chart design closest to a CUSUM's ARL0 for a fixed number of cases per period."""

    critical_count: int
    attained_alpha: float
    arl0_cases: float
    cases_per_period: int


def aggregate_periods(group, period, y, n_groups: int, n_periods: int):
    """Return (events, cases) per group and period as ``n_groups x n_periods`` integer arrays."""
    group = np.asarray(group, dtype=np.int64)
    period = np.asarray(period, dtype=np.int64)
    y = np.asarray(y)
    if not group.shape == period.shape == y.shape:
        raise ValueError("group, period and y must have the same shape")
    if group.size and (group.min() < 0 or group.max() >= n_groups):
        raise ValueError("group codes must be in 0..n_groups-1")
    if period.size and (period.min() < 0 or period.max() >= n_periods):
        raise ValueError("period codes must be in 0..n_periods-1")
    cell = group * n_periods + period
    size = n_groups * n_periods
    n = np.bincount(cell, minlength=size).reshape(n_groups, n_periods)
    events = np.bincount(cell, weights=y, minlength=size).astype(np.int64)
    return events.reshape(n_groups, n_periods), n


def critical_counts(n, p0: float, alpha: float, side: str = "upper") -> np.ndarray:
    """Return the exact critical count per cell (upper: x >= c signals; lower: x <= c signals)."""
    _check(p0, alpha, side)
    n = np.asarray(n, dtype=float)
    if side == "upper":
        # smallest c with sf(c - 1) = P(X >= c) <= alpha; isf gives the smallest k with sf(k) <= alpha
        return binom_isf(alpha, n, p0) + 1.0
    # largest c with P(X <= c) <= alpha (-1: no count is low enough to signal)
    return binom_ppf(alpha, n, p0) - np.where(
        binom_cdf(binom_ppf(alpha, n, p0), n, p0) > alpha, 1.0, 0.0
    )


def pchart(events, n, p0: float, alpha: float, *, side: str = "upper") -> PChartResult:
    """Return exact binomial p-chart limits and signals for counts per (site, period)."""
    events = np.asarray(events, dtype=float)
    n = np.asarray(n, dtype=float)
    if events.shape != n.shape or np.any(events < 0) or np.any(events > n):
        raise ValueError("events and n must have the same shape with 0 <= events <= n")
    critical = critical_counts(n, p0, alpha, side)
    with np.errstate(invalid="ignore", divide="ignore"):
        proportion = np.where(n > 0, events / np.where(n > 0, n, 1.0), np.nan)
        limit = np.where(n > 0, critical / np.where(n > 0, n, 1.0), np.nan)
    if side == "upper":
        attained = binom_sf(critical - 1, n, p0)
        p_value = binom_sf(events - 1, n, p0)
        signal = (events >= critical) & (n > 0)
    else:
        attained = np.where(critical >= 0, binom_cdf(critical, n, p0), 0.0)
        p_value = binom_cdf(events, n, p0)
        signal = (events <= critical) & (n > 0)
    p_value = np.where(n > 0, p_value, np.nan)
    return PChartResult(
        events=events,
        n=n,
        proportion=proportion,
        critical_count=critical,
        limit=limit,
        attained_alpha=attained,
        p_value=p_value,
        signal=signal,
        alpha=float(alpha),
        side=side,
    )


def alpha_for_arl(arl0: float, cases_per_period: float) -> float:
    """Return the per-point alpha whose in-control ARL in cases equals ``arl0``."""
    if arl0 <= cases_per_period:
        raise ValueError("arl0 must exceed the number of cases per period")
    return float(cases_per_period / arl0)


def matched_critical_count(p0: float, cases_per_period: int, arl0: float) -> MatchedPChart:
    """Return the upper critical count whose attained ARL0 is closest to ``arl0`` (log scale)."""
    n = int(cases_per_period)
    counts = np.arange(1, n + 1)
    attained = binom_sf(counts - 1, n, p0)
    with np.errstate(divide="ignore"):
        arl_cases = n / attained
    distance = np.abs(np.log(arl_cases) - np.log(arl0))
    best = int(np.argmin(distance))
    return MatchedPChart(
        critical_count=int(counts[best]),
        attained_alpha=float(attained[best]),
        arl0_cases=float(arl_cases[best]),
        cases_per_period=n,
    )


def _check(p0: float, alpha: float, side: str) -> None:
    if not 0 < p0 < 1:
        raise ValueError("p0 must be strictly between 0 and 1")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be strictly between 0 and 1")
    if side not in ("upper", "lower"):
        raise ValueError("side must be 'upper' or 'lower'")
