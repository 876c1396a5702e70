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

import numpy as np

from pipelines.surveillance import threshold_store
from pipelines.surveillance.arl import arl_markov, markov_grid, run_lengths
from pipelines.surveillance.profile import Metric, Profile

# Smallest ARL0 the derivation hands out (a tiny site or an enormous budget); below this a
# chart would signal on one or two events, which is a sentinel rule, not a chart.
MIN_ARL0 = 50.0
# States of the Markov chain for the time-to-event chart: error in h well below 1 %.
_POISSON_STATES = 600


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


# Threshold curves: the in-control ARL on a grid of h, from which any site's h is read by
# interpolating ln(ARL) (nearly linear in h). One curve per design serves every site, so a
# network of 1,000 sites costs a few dozen Markov-chain solves, not one bisection per site.
_H_STEP = 0.25
_H_MAX = 30.0
_ARL_CEILING = 1e9


def _interpolate_h(h_grid: np.ndarray, log_arl: np.ndarray, arl0: float) -> float:
    """Return the h at which the curve reaches ``arl0`` (linear in ln ARL between points)."""
    target = math.log(arl0)
    if target <= log_arl[0]:
        return float(h_grid[0])
    if target > log_arl[-1]:
        raise ValueError(f"ARL0 {arl0:g} is beyond the threshold curve (h up to {h_grid[-1]})")
    return float(np.interp(target, log_arl, h_grid))


def _bernoulli_curve(p0: float, odds_ratio: float, direction: str, p_true: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Return (h grid, ln ARL) of the Bernoulli CUSUM for (p0, odds ratio).

    The chart tests against ``p0``; the ARL is that of a unit whose true rate is ``p_true``
    (``p0`` when not given: the classical in-control ARL). Computed once per design and
    stored (:mod:`pipelines.surveillance.threshold_store`).
    """
    return threshold_store.cached(
        "bernoulli_arl_curve",
        {"p0": float(p0), "odds_ratio": float(odds_ratio), "direction": direction,
         "p_true": None if p_true is None else float(p_true), "h_step": _H_STEP,
         "h_max": _H_MAX, "arl_ceiling": _ARL_CEILING},
        lambda: _compute_bernoulli_curve(p0, odds_ratio, direction, p_true))


def _compute_bernoulli_curve(p0: float, odds_ratio: float, direction: str,
                             p_true: float | None) -> tuple[np.ndarray, np.ndarray]:
    grid = markov_grid(p0, odds_ratio, _H_MAX)
    truth = p0 if p_true is None else p_true
    hs, logs = [], []
    h = _H_STEP
    while h <= _H_MAX:
        arl = arl_markov(truth, p0, odds_ratio, h, direction, grid=grid)
        hs.append(h)
        logs.append(math.log(arl))
        if arl > _ARL_CEILING:
            break
        h += _H_STEP
    return np.asarray(hs), np.maximum.accumulate(np.asarray(logs))


def bernoulli_threshold(p0: float, odds_ratio: float, arl0: float, direction: str,
                        p_true: float | None = None) -> float:
    """Return h of the Bernoulli CUSUM for (p0, odds ratio) at ``arl0`` (Markov-chain curve).

    ``p_true`` is the in-control rate at which ``arl0`` is to hold (default ``p0``): with
    the budget spent at the baseline, the chart tests against the range edge ``p0`` while
    its false alarms are counted for a site at the guidance's pooled rate.
    """
    h_grid, log_arl = _bernoulli_curve(p0, odds_ratio, direction, p_true)
    return _interpolate_h(h_grid, log_arl, arl0)


def bernoulli_arl(p0: float, odds_ratio: float, h: float, direction: str,
                  p_true: float | None = None) -> float:
    """Return the ARL at ``h`` read off the same curve (for reporting, not for design)."""
    h_grid, log_arl = _bernoulli_curve(p0, odds_ratio, direction, p_true)
    return float(math.exp(np.interp(h, h_grid, log_arl)))


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
    from scipy import sparse  # imported here: see arl.run_lengths

    # scipy.stats's values without importing it (1-3 s; distributions.py)
    from pipelines.surveillance.distributions import poisson_pmf, poisson_ppf

    k_max = int(poisson_ppf(1 - 1e-12, mu_true)) + 2
    states = np.arange(n_states)
    rows, cols, values = [], [], []
    for k in range(k_max + 1):
        probability = float(poisson_pmf(k, mu_true))
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
    return float(run_lengths(transitions)[0])


def poisson_cusum_arl(mu: float, theta: float, h: float, mu_true: float | None = None) -> float:
    """Return the ARL in days of the time-to-event CUSUM with ``mu`` expected events a day."""
    return _poisson_chain(mu, theta, h, mu if mu_true is None else mu_true)


# Expected events a day on which the time-to-event curves are computed (log-spaced); a
# site's curve is interpolated between its two neighbours in ln(mu).
_MU_GRID = tuple(float(x) for x in np.geomspace(0.001, 4.0, 9))
_POISSON_H_STEP = 0.5
# Far beyond any budget (ARL0 in expected events): the curve stops here.
_POISSON_CEILING = 1e6


def _poisson_curves(theta: float, ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Return (h grid, ln(ARL in expected events) per mu grid point x h) for hazard ratio theta.

    In expected-event time the chart is nearly free of the site's volume; the remaining
    dependence (daily steps) is carried by the mu grid. ``ratio`` is the true hazard over
    the chart's reference hazard (1: the classical in-control ARL). Computed once per
    design and stored (:mod:`pipelines.surveillance.threshold_store`).
    """
    return threshold_store.cached(
        "poisson_arl_curves",
        {"theta": float(theta), "ratio": float(ratio), "mu_grid": list(_MU_GRID),
         "h_step": _POISSON_H_STEP, "ceiling": _POISSON_CEILING, "states": _POISSON_STATES},
        lambda: _compute_poisson_curves(theta, ratio))


def _compute_poisson_curves(theta: float, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    h_grid = np.arange(_POISSON_H_STEP, 20.0 + 1e-9, _POISSON_H_STEP)
    table = np.empty((len(_MU_GRID), len(h_grid)))
    for i, mu in enumerate(_MU_GRID):
        for j, h in enumerate(h_grid):
            if j and table[i, j - 1] > math.log(_POISSON_CEILING):
                table[i, j] = table[i, j - 1] + 1.0  # beyond any budget; keep it increasing
                continue
            table[i, j] = math.log(poisson_cusum_arl(mu, theta, float(h), mu * ratio) * mu)
        table[i] = np.maximum.accumulate(table[i])
    return h_grid, table


def poisson_threshold(mu: float, theta: float, arl0_days: float, ratio: float = 1.0) -> float:
    """Return h of the daily time-to-event CUSUM at ``arl0_days``.

    ``mu`` is the site's expected events per day at the reference hazard and ``theta`` the
    hazard ratio the chart is designed to detect. The in-control ARL comes from the Markov
    chain of :func:`poisson_cusum_arl`, tabulated once per ``theta`` on a grid of ``mu`` and
    ``h`` and interpolated (``tests/test_budget.py`` checks the result by simulation).
    ``ratio`` is the in-control hazard over the reference hazard: ``arl0_days`` holds for a
    site whose true hazard is ``ratio`` times the one the chart tests against.
    """
    if mu <= 0:
        return math.inf
    # The Newton step solves the site's own chain: stored per design like the curves.
    return threshold_store.cached(
        "poisson_threshold",
        {"mu": float(mu), "theta": float(theta), "arl0_days": float(arl0_days),
         "ratio": float(ratio), "mu_grid": list(_MU_GRID), "h_step": _POISSON_H_STEP,
         "states": _POISSON_STATES},
        lambda: _compute_poisson_threshold(mu, theta, arl0_days, ratio))


def _compute_poisson_threshold(mu: float, theta: float, arl0_days: float, ratio: float
                               ) -> float:
    h_grid, table = _poisson_curves(float(theta), float(ratio))
    grid = np.log(np.asarray(_MU_GRID))
    x = float(np.clip(math.log(mu), grid[0], grid[-1]))
    k = int(np.clip(np.searchsorted(grid, x) - 1, 0, len(grid) - 2))
    w = (x - grid[k]) / (grid[k + 1] - grid[k])
    curve = (1 - w) * table[k] + w * table[k + 1]
    target = arl0_days * mu
    h = _interpolate_h(h_grid, curve, target)
    # One Newton step on the site's own chain removes the interpolation error.
    slope = float(np.interp(h, h_grid[1:], np.diff(curve) / _POISSON_H_STEP))
    actual = math.log(poisson_cusum_arl(mu, theta, h, mu * ratio) * mu)
    if slope > 0:
        h += (math.log(target) - actual) / slope
    return float(h)


def poisson_arl_days(mu: float, theta: float, h: float, ratio: float = 1.0) -> float:
    """Return the ARL in days at ``h`` read off the tabulated curves (for reporting)."""
    if mu <= 0:
        return math.inf
    h_grid, table = _poisson_curves(float(theta), float(ratio))
    grid = np.log(np.asarray(_MU_GRID))
    x = float(np.clip(math.log(mu), grid[0], grid[-1]))
    k = int(np.clip(np.searchsorted(grid, x) - 1, 0, len(grid) - 2))
    w = (x - grid[k]) / (grid[k + 1] - grid[k])
    curve = (1 - w) * table[k] + w * table[k + 1]
    return float(math.exp(np.interp(h, h_grid, curve)) / mu)


def rare_alpha(rate_per_year: float, evaluations_per_year: int = 12) -> float:
    """Return the per-evaluation alpha of the rolling exact test for ``rate_per_year``.

    The test is evaluated at each month end on the last 12 months; the evaluations overlap,
    so the union bound ``12 * alpha`` is an upper bound on the yearly false-alarm rate.
    """
    return rate_per_year / evaluations_per_year
