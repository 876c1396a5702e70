"""Beyond the site: the profile's ``beyond_site`` section and the operator thresholds.

Operators (:mod:`pipelines.surveillance.operators`), devices and cement lots
(:mod:`pipelines.surveillance.devices`) and the Yellow Card drafts (:mod:`pipelines.alerts.regulator`)
read their settings from the profile's ``beyond_site`` section, parsed and checked here. The
false-alarm rates come from ``design.false_alarm_budget`` exactly as for the site charts
(docs/statistics.md section 9): a chart spends ``safety_per_100_site_years / 100 x
alarm.share`` of the metric per operator-year or per product-year.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.contract import EVENT_TYPES, SEVERITIES
from pipelines.surveillance import threshold_store
from pipelines.surveillance.arl import _transition_matrix, markov_grid, run_lengths
from pipelines.surveillance.budget import significant
from pipelines.surveillance.profile import Metric, Profile, ProfileError

if TYPE_CHECKING:
    from scipy import sparse

_H_MAX = 30.0
# The grid of a within-site chart's in-control share pi (operators and products alike).
SHARE_STEP = 0.05


# A within-site comparison's cells: a site in one of these periods, counted from the
# comparison's first day (operators and products alike).
QUARTER_DAYS = 91


@dataclass(frozen=True)
class SiteQuarterCells:
    """The site-quarter cell of each case and each cell's cases, events and expected count."""

    cell: np.ndarray  # per case
    n_cells: int
    cases: np.ndarray  # per cell
    events: np.ndarray
    risk: np.ndarray  # the case-mix expected count (sum of risks)


def site_quarter_cells(site: np.ndarray, day: np.ndarray, y: np.ndarray, risk: np.ndarray
                       ) -> SiteQuarterCells:
    """Return the site-quarter cells of cases given by site code, index day, outcome, risk."""
    first = day.min()
    n_quarters = int((day.max() - first) // QUARTER_DAYS) + 1
    cell = site.astype(np.int64) * n_quarters + (day - first) // QUARTER_DAYS
    n_cells = int(cell.max()) + 1
    return SiteQuarterCells(cell, n_cells, np.bincount(cell, minlength=n_cells),
                            np.bincount(cell, weights=y, minlength=n_cells),
                            np.bincount(cell, weights=risk, minlength=n_cells))


def share_on_grid(share: float) -> float:
    """Return a within-site chart's mean share ``pi`` to the nearest :data:`SHARE_STEP`.

    Kept within ``[SHARE_STEP, 1 - SHARE_STEP]``. The design's key: a night's new cases move
    the exact mean of every chart (0.497, then 0.503), and each new value was a Markov chain
    solved; on the grid the stored designs are read. The ARL0 of a chart whose share lies
    within half a step of the grid's differs by less than the budget's own rounding.
    """
    p0 = min(max(round(float(share) / SHARE_STEP) * SHARE_STEP, SHARE_STEP), 1.0 - SHARE_STEP)
    return significant(p0, 2)


@dataclass(frozen=True)
class OperatorDesign:
    """Learning-curve charts per pseudonymous operator.

    ``learning_procedures`` (N), ``learning_share`` and ``tenure_years`` (T) split a new
    operator's budget, ``rate x T`` false training reviews over the tenure, between the
    first N procedures and the rest; ``established_within_days`` says who is not new
    (docs/statistics.md section 9).
    """

    cusum_metric: str
    odds_ratio: float
    head_start: float
    rare_metric: str | None
    learning_procedures: int
    learning_share: float
    tenure_years: float
    established_within_days: int


@dataclass(frozen=True)
class DeviceDesign:
    """Product comparisons, lot clustering and device-failure counts."""

    metrics: tuple[str, ...]
    odds_ratio: float
    lot_metric: str
    lot_false_alarms_per_year: float
    lot_min_procedures: int
    failure_event_types: tuple[str, ...]


@dataclass(frozen=True)
class DeviceRule:
    """A complication is device-related when its type (and severity, if given) match."""

    event_types: tuple[str, ...]
    severities: tuple[str, ...] = SEVERITIES


@dataclass(frozen=True)
class RegulatorDesign:
    """Which complications get a Yellow Card draft, and how soon one must be sent."""

    rules: tuple[DeviceRule, ...]
    send_within_days: int

    def is_device_related(self, event_type: str, severity: str) -> bool:
        """Return True when a complication matches one of the rules."""
        return any(event_type in r.event_types and severity in r.severities for r in self.rules)


@dataclass(frozen=True)
class BeyondSite:
    """The parsed ``beyond_site`` section."""

    operators: OperatorDesign | None
    devices: DeviceDesign | None
    regulator: RegulatorDesign | None


def _fail(path: str, message: str) -> ProfileError:
    return ProfileError(f"profile beyond_site.{path}: {message}")


def _number(data: dict, key: str, path: str, low: float, high: float) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _fail(f"{path}.{key}", f"must be a number between {low} and {high}, got {value!r}")
    return float(value)


def _names(value: Any, path: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or any(v not in allowed for v in value):
        raise _fail(path, f"must be a non-empty list of {', '.join(allowed)}")
    return tuple(value)


def _alarm_metric(profile: Profile, metric_id: Any, path: str) -> Metric:
    if not isinstance(metric_id, str):
        raise _fail(path, "must name a metric")
    metric = profile.metric(metric_id)
    if metric.kind != "outcome" or metric.alarm is None or metric.denominator != "procedure":
        raise _fail(path, f"{metric_id} must be a per-procedure outcome metric with an alarm chart")
    return metric


def parse_beyond_site(profile: Profile) -> BeyondSite:
    """Return the profile's ``beyond_site`` settings (every part None when absent)."""
    data = profile.raw.get("beyond_site") or {}
    if not isinstance(data, dict):
        raise _fail("(section)", "must be a mapping")
    operators = devices = regulator = None
    if data.get("operators"):
        raw = data["operators"]
        _alarm_metric(profile, raw.get("cusum_metric"), "operators.cusum_metric")
        rare = raw.get("rare_metric")
        if rare is not None:
            _alarm_metric(profile, rare, "operators.rare_metric")
        operators = OperatorDesign(
            cusum_metric=raw["cusum_metric"],
            odds_ratio=_number(raw, "odds_ratio", "operators", 1.01, 20.0),
            head_start=_number(raw, "head_start", "operators", 0.0, 0.9),
            rare_metric=rare,
            learning_procedures=int(_number(raw, "learning_procedures", "operators", 1, 1000)),
            learning_share=_number(raw, "learning_share", "operators", 0.05, 0.95),
            tenure_years=_number(raw, "tenure_years", "operators", 1.0, 50.0),
            established_within_days=int(_number(raw, "established_within_days", "operators",
                                                0, 3650)),
        )
    if data.get("devices"):
        raw = data["devices"]
        metric_ids = raw.get("metrics") or []
        for index, metric_id in enumerate(metric_ids):
            _alarm_metric(profile, metric_id, f"devices.metrics[{index}]")
        _alarm_metric(profile, raw.get("lot_metric"), "devices.lot_metric")
        devices = DeviceDesign(
            metrics=tuple(metric_ids),
            odds_ratio=_number(raw, "odds_ratio", "devices", 1.01, 20.0),
            lot_metric=raw["lot_metric"],
            lot_false_alarms_per_year=_number(raw, "lot_false_alarms_per_year", "devices",
                                              1e-6, 12.0),
            lot_min_procedures=int(_number(raw, "lot_min_procedures", "devices", 1, 100_000)),
            failure_event_types=_names(raw.get("failure_event_types"),
                                       "devices.failure_event_types", EVENT_TYPES),
        )
    if data.get("regulator"):
        raw = data["regulator"]
        rules = []
        for index, rule in enumerate(raw.get("device_related") or []):
            where = f"regulator.device_related[{index}]"
            if not isinstance(rule, dict):
                raise _fail(where, "must be a mapping with event_types (and severities)")
            rules.append(DeviceRule(
                event_types=_names(rule.get("event_types"), f"{where}.event_types", EVENT_TYPES),
                severities=_names(rule.get("severities", list(SEVERITIES)),
                                  f"{where}.severities", SEVERITIES),
            ))
        if not rules:
            raise _fail("regulator.device_related", "needs at least one rule")
        regulator = RegulatorDesign(
            rules=tuple(rules),
            send_within_days=int(_number(raw, "send_within_days", "regulator", 1, 3650)),
        )
    return BeyondSite(operators=operators, devices=devices, regulator=regulator)


def rate_per_unit_year(profile: Profile, metric: Metric) -> float:
    """Return the false alarms per operator- or product-year a chart of ``metric`` may spend."""
    budget = profile.design.budget
    if budget is None or metric.alarm is None:
        raise ProfileError(f"profile {profile.name}: beyond_site needs design.false_alarm_budget "
                           f"and an alarm share for {metric.id}")
    return budget.safety_per_100_site_years / 100.0 * metric.alarm.share


def fir_arl(p: float, p0: float, odds_ratio: float, h: float, head_start: float) -> float:
    """Return the Markov-chain ARL of the Bernoulli CUSUM started at ``head_start x h``.

    Same chain as :func:`pipelines.surveillance.arl.arl_markov` (Brook & Evans), read at the
    head-start state instead of 0 (Lucas & Crosier 1982).
    """
    grid = markov_grid(p0, odds_ratio, h)
    lengths = run_lengths(_transition_matrix(p, grid, h))
    n_states = lengths.shape[0]
    start = min(n_states - 1, int(round(head_start * h / grid.unit)))
    return float(lengths[start])


_H_STEP = 0.25


def _fir_curve(p0: float, odds_ratio: float, head_start: float, ceiling: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Return (h grid, ln in-control ARL from the head start) up to an ARL of ``ceiling``.

    One curve serves every volume whose ARL0 is below the ceiling (a power of ten), so a
    run solves the chain for the h it needs, not up to an ARL of a billion. Computed once
    per design and stored (:mod:`pipelines.surveillance.threshold_store`): every operator
    and product chart of every run reads it.
    """
    return threshold_store.cached(
        "fir_arl_curve",
        {"p0": float(p0), "odds_ratio": float(odds_ratio), "head_start": float(head_start),
         "ceiling": float(ceiling), "h_step": _H_STEP, "h_max": _H_MAX},
        lambda: _compute_fir_curve(p0, odds_ratio, head_start, ceiling))


def _compute_fir_curve(p0: float, odds_ratio: float, head_start: float, ceiling: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    hs, logs = [], []
    h = _H_STEP
    while h <= _H_MAX:
        arl = fir_arl(p0, p0, odds_ratio, h, head_start)
        hs.append(h)
        logs.append(math.log(arl))
        if arl > ceiling:
            break
        h += _H_STEP
    return np.asarray(hs, dtype=np.float64), np.maximum.accumulate(np.asarray(logs))


def fir_threshold(p0: float, odds_ratio: float, arl0: float, head_start: float) -> float:
    """Return the h whose in-control ARL *from the head start* is ``arl0``.

    The head start shortens the in-control ARL, so h is larger than without it: the budget
    is spent by the chart as it runs (it restarts at the head start after each signal). As
    for the site charts (:mod:`pipelines.surveillance.budget`), h is read off one curve of
    ln ARL against h per design by linear interpolation; inputs are rounded to three
    significant figures (a stable h from night to night).
    """
    ceiling = 10.0 ** (math.ceil(math.log10(max(arl0, 10.0))) + 1)
    h_grid, log_arl = _fir_curve(significant(p0), float(odds_ratio), float(head_start), ceiling)
    target = math.log(significant(arl0))
    if target > log_arl[-1]:
        raise ValueError(f"ARL0 {arl0:g} needs h above {h_grid[-1]}")
    return float(np.interp(target, log_arl, h_grid))


def _restart_chain(p0: float, odds_ratio: float, h: float, head_start: float
                   ) -> tuple[sparse.csr_array, np.ndarray, int]:
    """Return (transitions among non-signal states, P(signal) per state, head-start state).

    The in-control chain of :func:`fir_arl` (Brook & Evans) at ``p0``.
    """
    grid = markov_grid(p0, odds_ratio, h)
    transitions = _transition_matrix(p0, grid, h)
    n_states = transitions.shape[0]
    signal = 1.0 - np.asarray(transitions.sum(axis=1)).ravel()
    start = min(n_states - 1, int(round(head_start * h / grid.unit)))
    return transitions, signal, start


def learning_false_signals(p0: float, odds_ratio: float, h: float, head_start: float,
                           procedures: int) -> float:
    """Return the expected false signals of an in-control chart in its first ``procedures``.

    The chart starts at ``head_start x h`` and restarts there after each signal, as
    :func:`pipelines.surveillance.operators.fir_cusum` does; the state distribution is
    carried case by case (Brook & Evans), so the head start's cost is counted exactly
    rather than through ``procedures / ARL``.
    """
    transitions, signal, start = _restart_chain(p0, odds_ratio, h, head_start)
    transposed = transitions.T.tocsr()
    dist = np.zeros(transitions.shape[0])
    dist[start] = 1.0
    expected = 0.0
    for _ in range(int(procedures)):
        fired = float(dist @ signal)
        expected += fired
        dist = transposed @ dist
        dist[start] += fired
    return expected


def _learning_threshold(p0: float, odds_ratio: float, procedures: int, alpha: float,
                        head_start: float) -> float:
    return threshold_store.cached(
        "operator_learning_h",
        {"p0": float(p0), "odds_ratio": float(odds_ratio), "procedures": int(procedures),
         "alpha": float(alpha), "head_start": float(head_start), "h_max": _H_MAX},
        lambda: _solve_learning_threshold(p0, odds_ratio, procedures, alpha, head_start))


def _solve_learning_threshold(p0: float, odds_ratio: float, procedures: int, alpha: float,
                              head_start: float) -> float:
    low, high = 0.25, _H_MAX
    for _ in range(40):  # bisection: the expected false signals fall as h grows
        middle = (low + high) / 2
        if learning_false_signals(p0, odds_ratio, middle, head_start, procedures) > alpha:
            low = middle
        else:
            high = middle
        if high - low < 0.01:
            break
    # the grid follows h, so the count is not quite monotone in h: step up until it holds
    while learning_false_signals(p0, odds_ratio, high, head_start, procedures) > alpha:
        high += 0.01
    return high


def learning_threshold(p0: float, odds_ratio: float, procedures: int, alpha: float,
                       head_start: float) -> float:
    """Return h1: the learning phase's expected false signals in ``procedures`` are ``alpha``.

    Independent of the operator's volume (the phase is counted in procedures). Inputs are
    rounded to three significant figures (cache; a stable h from night to night).
    """
    return _learning_threshold(significant(p0), float(odds_ratio), int(procedures),
                               significant(alpha), float(head_start))


@dataclass(frozen=True)
class OperatorThresholds:
    """The thresholds of one operator's chart: h1 for the first N procedures, h2 after."""

    learning: float | None  # None: established at first sync, no learning phase
    steady: float
    learning_procedures: int
    start: float  # where the chart starts, as a share of its first threshold

    def per_case(self, n_cases: int) -> np.ndarray:
        """Return the threshold in force at each of ``n_cases`` cases."""
        h = np.full(n_cases, self.steady)
        if self.learning is not None:
            h[:self.learning_procedures] = self.learning
        return h


def rounded_volume(volume_per_year: float) -> int:
    """Return the volume an operator's thresholds are designed for (two significant figures)."""
    return max(1, int(significant(max(volume_per_year, 1.0), 2)))


def learning_budget(design: OperatorDesign, rate: float) -> float:
    """Return the expected false training reviews a new operator may spend in their first N.

    ``learning_share x rate x tenure_years``: the operator's budget over the stated tenure,
    the share the profile puts on the learning phase (HTG108 recommendation 1.2).
    """
    return design.learning_share * rate * design.tenure_years


def steady_rate(design: OperatorDesign, rate: float, volume_per_year: float) -> float:
    """Return the false alerts per year left for a new operator after their first N cases.

    The rest of the tenure budget, ``(1 - learning_share) x rate x T``, spread over the
    ``T - N / volume`` years that remain (at least one year: a very low-volume operator's
    learning phase may fill the stated tenure; spreading over one year then spends less).
    """
    years = max(design.tenure_years - design.learning_procedures / max(volume_per_year, 1.0),
                1.0)
    return (1.0 - design.learning_share) * rate * design.tenure_years / years


def operator_thresholds(p0: float, design: OperatorDesign, volume_per_year: float,
                        rate: float, *, new: bool) -> OperatorThresholds:
    """Return the thresholds of one operator chart (Markov chain at in-control risk ``p0``).

    ``p0`` is the chart's in-control probability per step: for the within-site chart
    (:func:`pipelines.surveillance.operators.chart_thresholds`) the mean share ``pi`` of its
    events, with volume and ``learning_procedures`` counted in charted events.

    A new operator: h1 spends :func:`learning_budget` in expected false signals over the
    first ``learning_procedures`` cases from the head start; h2 (at least h1) has an
    in-control ARL from the head start of ``volume / steady_rate`` cases. So the expected
    false training reviews over the stated tenure are ``rate x tenure_years``: ``rate`` per
    operator-year.
    An operator already practising when the site's data begin (not new) has no learning
    phase: h has an in-control ARL from the head start of ``volume / rate``, and the chart
    starts at 0 (a head start there would spend budget on nobody's learning curve).
    Volume is rounded to two significant figures (:func:`rounded_volume`; cache, stable h).
    """
    volume = rounded_volume(volume_per_year)
    if not new:
        steady = fir_threshold(p0, design.odds_ratio, arl0_for_volume(volume, rate),
                               design.head_start)
        return OperatorThresholds(learning=None, steady=steady,
                                  learning_procedures=0, start=0.0)
    learning = learning_threshold(p0, design.odds_ratio, design.learning_procedures,
                                  learning_budget(design, rate), design.head_start)
    steady = fir_threshold(p0, design.odds_ratio,
                           arl0_for_volume(volume, steady_rate(design, rate, volume)),
                           design.head_start)
    # A low-volume operator's years are few cases, so h2 can come out below h1; the steady
    # phase is then held at h1 (it spends less than its share: a statistic just under h1 at
    # the switch must not signal for the switch alone).
    steady = max(steady, learning)
    return OperatorThresholds(learning=learning, steady=steady,
                              learning_procedures=design.learning_procedures,
                              start=design.head_start)


def arl0_for_volume(volume_per_year: float, rate_per_year: float) -> float:
    """Return ARL0 (cases) for ``volume_per_year`` cases at ``rate_per_year`` false alarms."""
    return max(50.0, significant(max(volume_per_year, 1.0) / rate_per_year))


def years_between(first_day: int, last_day: int) -> float:
    """Return the years from ``first_day`` to ``last_day`` (day numbers), at least one."""
    return max((last_day - first_day + 1) / 365.25, 1.0)


def finite(value: float) -> float | None:
    """Return ``value`` as a float, or None when it is not finite."""
    value = float(value)
    return value if math.isfinite(value) else None
