"""From a network false-alarm budget to a threshold per site and chart.

The safety team states how many false alarm e-mails it accepts: ``safety_per_100_site_years``
for a site performing within the guidance range (``profiles/*.yaml``, ``design.
false_alarm_budget``). Each metric's alarm chart gets a share of it, so a chart's budget is a
rate ``r`` of false alarms per site-year. A chart that looks at ``V`` units a year signals
falsely about ``V / ARL0`` times a year, so the chart needs

    ARL0 = V / r            (units; days for the time-to-event chart: 365 / r)

and its threshold ``h`` follows from the Markov-chain ARL (:mod:`pipelines.surveillance.arl`).
``V`` is the site's own volume, so a site doing 400 procedures a year gets a higher ``h``
than one doing 50, and both false-alarm about ``r`` times a year. Without that, a large site
is flagged more often by chance, which is what a per-chart ARL0 does.

Thresholds are cached on rounded inputs (three significant figures): nearby volumes share a
threshold, which keeps a run fast and makes a site's ``h`` stable from one night to the next.
The derivation is checked by simulation in ``tests/test_budget.py`` (``slow``) and its
network consequences in ``benchmarks/bench_alert_precision.py``; docs/statistics.md section 8.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import spsolve
from scipy.stats import poisson

from pipelines.surveillance.arl import threshold_for_arl
from pipelines.surveillance.profile import Metric, Profile

# Smallest ARL0 the derivation hands out (a tiny site or an enormous budget); below this a
# chart would signal on one or two events, which is a sentinel rule, not a chart.
MIN_ARL0 = 50.0
# States of the Markov chain for the time-to-event chart: error in h well below 1 %.
_POISSON_STATES = 1500


def significant(value: float, digits: int = 3) -> float:
    """Return ``value`` rounded to ``digits`` significant figures (cache keys, stable h)."""
    if value <= 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")


def chart_rate(profile: Profile, metric: Metric, direction: str, level: str = "alarm") -> float:
    """Return the false alarms per site-year this chart may spend (``level``: alarm or watch).

    Upward alarm charts: the metric's share of ``safety_per_100_site_years``; downward
    (under-reporting) charts split ``under_reporting_per_100_site_years`` equally; watch
    thresholds spend ``watch_per_site_year`` per chart.
    """
    budget = profile.design.budget
    if budget is None:
        raise ValueError(f"profile {profile.name} has no false_alarm_budget")
    if level == "watch":
        return budget.watch_per_site_year
    if direction == "down":
        down = [m for m in profile.metrics
                if m.detect is not None and "down" in m.detect.directions]
        return budget.under_reporting_per_100_site_years / 100.0 / max(1, len(down))
    if metric.alarm is None:
        raise ValueError(f"metric {metric.id} has no alarm chart")
    return budget.safety_per_100_site_years / 100.0 * metric.alarm.share


def arl0_for(volume_per_year: float, rate_per_year: float) -> float:
    """Return the in-control ARL0 (units) for ``volume_per_year`` units at ``rate_per_year``."""
    if rate_per_year <= 0:
        raise ValueError("the false-alarm rate must be positive")
    return max(MIN_ARL0, significant(max(volume_per_year, 1.0) / rate_per_year))


@lru_cache(maxsize=4096)
def bernoulli_threshold(p0: float, odds_ratio: float, arl0: float, direction: str) -> float:
    """Return h of the Bernoulli CUSUM for (p0, odds ratio) at ``arl0`` (Markov chain)."""
    return float(threshold_for_arl(p0, odds_ratio, arl0, direction))


def _poisson_chain(mu: float, theta: float, h: float, mu_true: float) -> float:
    """Return the ARL (days) from 0 of the daily Poisson CUSUM, by a Markov chain.

    Each day adds ``k ln(theta) - (theta - 1) mu`` with ``k ~ Poisson(mu_true)``; the statistic
    is floored at 0 and signals at ``h``. The grid step divides the daily drift exactly, so
    the only rounding is that of ``ln(theta)``, a fine fraction of a step.
    """
    drift = (theta - 1.0) * mu
    jump = math.log(theta)
    per_drift = max(1, math.ceil(drift / (h / _POISSON_STATES)))
    step = drift / per_drift
    n_states = max(1, math.ceil(h / step - 1e-9))
    jump_steps = jump / step
    k_max = int(poisson.ppf(1 - 1e-12, mu_true)) + 2
    states = np.arange(n_states)
    rows, cols, values = [], [], []
    for k in range(k_max + 1):
        probability = float(poisson.pmf(k, mu_true))
        if probability < 1e-15:
            continue
        target = states + int(round(k * jump_steps)) - per_drift
        target = np.maximum(target, 0)
        stays = target < n_states
        rows.append(states[stays])
        cols.append(target[stays])
        values.append(np.full(int(stays.sum()), probability))
    transitions = sparse.csr_array(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_states, n_states),
    )
    system = (sparse.identity(n_states, format="csc") - transitions.tocsc()).tocsc()
    lengths = spsolve(system, np.ones(n_states))
    return float(np.atleast_1d(lengths)[0])


def poisson_cusum_arl(mu: float, theta: float, h: float, mu_true: float | None = None) -> float:
    """Return the ARL in days of the time-to-event CUSUM with ``mu`` expected events a day."""
    return _poisson_chain(mu, theta, h, mu if mu_true is None else mu_true)


@lru_cache(maxsize=4096)
def poisson_threshold(mu: float, theta: float, arl0_days: float) -> float:
    """Return h of the daily time-to-event CUSUM at ``arl0_days`` (bisection, Markov chain).

    ``mu`` is the site's expected events per day at the reference hazard and ``theta`` the
    hazard ratio the chart is designed to detect.
    """
    if mu <= 0:
        return math.inf
    lo, hi = 0.05, 2.0
    while poisson_cusum_arl(mu, theta, hi) < arl0_days:
        lo, hi = hi, hi * 2.0
        if hi > 200:
            raise RuntimeError("time-to-event threshold above 200; check the budget")
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2.0
        if poisson_cusum_arl(mu, theta, mid) >= arl0_days:
            hi = mid
        else:
            lo = mid
    return hi


def rare_alpha(rate_per_year: float, evaluations_per_year: int = 12) -> float:
    """Return the per-evaluation alpha of the rolling exact test for ``rate_per_year``.

    The test is evaluated at each month end on the last 12 months; the evaluations overlap,
    so the union bound ``12 * alpha`` is an upper bound on the yearly false-alarm rate.
    """
    return rate_per_year / evaluations_per_year
