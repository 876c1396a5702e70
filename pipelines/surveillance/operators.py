"""Operator learning curves: a risk-adjusted CUSUM with a head start per pseudonymous operator.

Why
---
NICE HTG108 recommendation 1.2 asks that clinicians be trained to an appropriate level before
doing the procedure. A new operator's early cases carry the learning curve; the site's chart
dilutes them among the site's other operators. So each operator gets their own chart from
their first procedure in the warehouse.

What
----
* Cement leak (``beyond_site.operators.cusum_metric``): the Steiner risk-adjusted CUSUM
  (:func:`pipelines.surveillance.cusum.cusum_weights`) against the network's case-mix expected
  risk (a model fitted on every operator, calibrated to the network's observed rate: an
  operator like their peers is in control), alternative odds ratio ``odds_ratio`` (3), with a
  fast initial response (FIR, Lucas & Crosier 1982): a new operator's chart starts, and every
  chart restarts after a signal, at ``head_start x h`` so that early excess is seen within a
  few cases.
* Major events (``rare_metric``): too rare for a CUSUM per operator; the rolling 365-day
  exact Poisson test of the site's rare chart, on the operator's own cases.

Thresholds are not tuned: an operator chart may spend ``r = safety_per_100_site_years / 100 x
alarm.share`` false training-review alerts per operator-year (the same share as the site chart
of the metric), so ``r x tenure_years`` over a stated tenure. Recommendation 1.2 says the
risk is in training, so a *new* operator (:func:`new_operators`: began after the site's data
did) has ``learning_share`` of that spent on their first ``learning_procedures`` cases
(threshold h1) and the rest on the remaining years (h2); an operator already practising at
first sync has one h at ``r`` a year (:func:`pipelines.surveillance.beyond.operator_thresholds`,
Markov chain at the network's mean risk). docs/statistics.md section 9.

Pseudonyms
----------
Operators are shown only as ``OP-`` and the first ten hex digits of their stored HMAC digest
(the digest itself never leaves the warehouse's procedure table). A site's clinical lead maps
it back by computing the HMAC of their own operator references with the key (the key holder's
material); nothing in the warehouse holds a raw reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipelines.surveillance.beyond import (
    OperatorDesign,
    OperatorThresholds,
    finite,
    operator_thresholds,
    rate_per_unit_year,
    rounded_volume,
)
from pipelines.surveillance.budget import rare_alpha
from pipelines.surveillance.cusum import cusum_weights
from pipelines.surveillance.outcomes import day_to_date
from pipelines.surveillance.profile import Profile
from pipelines.surveillance.rare import poisson_upper_pvalue

PSEUDONYM_PREFIX = "OP-"
PSEUDONYM_DIGITS = 10
ROLLING_DAYS = 365
# Shortest observed time a volume is measured over. ``beyond.years_between`` floors it at a
# year, which understates a young chart's volume (30 cases in six months read as 30 a year)
# and so lowers h: more false reviews than the design says, in the year a new operator
# leaves the learning phase. A quarter keeps the estimate from a few days' cases in bounds.
MIN_VOLUME_YEARS = 0.25


def operator_pseudonym(operator_hash: str) -> str:
    """Return the display pseudonym of an operator digest (never the digest or a reference)."""
    return PSEUDONYM_PREFIX + operator_hash[:PSEUDONYM_DIGITS]


@dataclass(frozen=True)
class FirPath:
    """One operator's chart: statistic per case and the positions of its signals."""

    statistic: np.ndarray
    signals: np.ndarray  # indices of signalling cases


def fir_cusum(y, p, odds_ratio: float, h, head_start: float,
              start: float | None = None) -> FirPath:
    """Run one risk-adjusted CUSUM; restart at ``head_start x h`` after a signal.

    ``h`` is one threshold or one per case (a new operator's h1 then h2); the chart starts
    at ``start x h`` of the first case (``start`` defaults to ``head_start``). A signal
    restarts the chart at ``head_start`` times the threshold in force.
    """
    weights = cusum_weights(np.asarray(y), np.asarray(p, dtype=float), odds_ratio).tolist()
    limits = np.broadcast_to(np.asarray(h, dtype=float), (len(weights),)).tolist()
    value = (head_start if start is None else start) * (limits[0] if limits else 0.0)
    path = np.empty(len(weights))
    signals, _ = _fir_steps(weights, limits, head_start, value, path)
    return FirPath(statistic=path, signals=np.asarray(signals, dtype=np.int64))


def _fir_steps(weights: list[float], limits: list[float], head_start: float, value: float,
               path: np.ndarray | None = None) -> tuple[list[int], float]:
    """Step the FIR recursion over plain floats; return (signalling cases, last statistic).

    ``path`` (when given) receives the statistic of every case, before any restart.
    ``value = max(0.0, value + weight)`` spelled as a comparison: the same float operations
    (so the same bits) without a builtin call per case; a network has a million cases.
    """
    signals = []
    statistic = value
    for index, weight in enumerate(weights):
        statistic = value + weight
        if not statistic > 0.0:  # max(0.0, v) keeps 0.0 unless v is larger (NaN too)
            statistic = 0.0
        if path is not None:
            path[index] = statistic
        limit = limits[index]
        if statistic >= limit:
            signals.append(index)
            value = head_start * limit
        else:
            value = statistic
    return signals, statistic


def operator_volume(cases: int, first_day: int, as_of_day: int) -> float:
    """Return an operator's procedures a year: cases over their observed time (at least 0.25 y)."""
    return cases / max((as_of_day - first_day + 1) / 365.25, MIN_VOLUME_YEARS)


def new_operators(known: pd.DataFrame, established_within_days: int) -> pd.Series:
    """Return, per (site, operator), whether the operator is new to the site.

    The warehouse does not hold an operator's career: their first procedure in it is their
    first ever only when they began after the site's data did. So an operator whose first
    procedure falls within ``established_within_days`` of the site's first procedure with
    an operator recorded (extracts from before ``operator_ref`` was captured do not count)
    was already practising at first sync: established, not new.
    """
    first = known.groupby(["site_id", "operator_hash"], sort=True, observed=True)["index_day"].min()
    site_first = first.groupby(level="site_id", observed=True).transform("min")
    return (first - site_first) > established_within_days


def _operator_groups(known: pd.DataFrame) -> tuple[pd.MultiIndex, np.ndarray, np.ndarray]:
    """Return the (site, operator) keys in name order, the row order, and group boundaries.

    The rows of group ``g`` are ``order[bounds[g]:bounds[g + 1]]``, in the units' own
    (site, date) order: what iterating a sorted ``groupby`` gave, from one factorisation
    instead of a frame per operator.
    """
    grouped = known.groupby(["site_id", "operator_hash"], sort=True, observed=True)
    codes = grouped.ngroup().to_numpy(np.int64)
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=grouped.ngroups)
    bounds = np.concatenate(([0], np.cumsum(counts)))
    return grouped.size().index, order, bounds


def operator_charts(units: pd.DataFrame, profile: Profile, design: OperatorDesign,
                    as_of_day: int) -> list[dict]:
    """Chart every operator of ``units`` for the CUSUM metric.

    ``units`` holds one mature procedure per row in (site, date) order with ``site_id``,
    ``operator_hash`` (rows without an operator are ignored), ``index_day``, ``y`` and
    ``risk`` (the network's case-mix expected risk). A new operator
    (:func:`new_operators`) is charted with the learning-phase threshold for their first
    ``learning_procedures`` cases and the steady one after; the row's ``threshold`` is the
    one in force at the operator's latest case.
    """
    metric = profile.metric(design.cusum_metric)
    known = units.loc[units["operator_hash"].notna()]
    if known.empty:
        return []
    rate = rate_per_unit_year(profile, metric)
    mean_risk = float(units["risk"].mean())
    keys, order, bounds = _operator_groups(known)
    is_new = new_operators(known, design.established_within_days).reindex(keys).to_numpy(bool)
    day = known["index_day"].to_numpy(np.int64)[order]
    y = known["y"].to_numpy(np.int64)[order]
    risk = known["risk"].to_numpy(float)[order]
    # elementwise, so the same weights as one operator's cases at a time
    weights = cusum_weights(y, risk, design.odds_ratio)
    # operator_thresholds depends on the volume only through its rounding: one design
    # lookup per (rounded volume, new) instead of one per operator
    designs: dict[tuple[int, bool], OperatorThresholds] = {}
    limits = np.empty(len(weights))
    start = np.empty(len(keys))
    for g in range(len(keys)):
        a, e = int(bounds[g]), int(bounds[g + 1])
        volume = operator_volume(e - a, int(day[a]), as_of_day)
        new = bool(is_new[g])
        key = (rounded_volume(volume), new)
        if key not in designs:
            designs[key] = operator_thresholds(mean_risk, design, volume, rate, new=new)
        thresholds = designs[key]
        limits[a:e] = thresholds.per_case(e - a)
        start[g] = thresholds.start * float(limits[a])
    statistic, n_signals, last_signal = _fir_by_position(weights, limits, bounds, start,
                                                         design.head_start)
    rows = []
    for g, (site_id, operator_hash) in enumerate(keys):
        a, e = int(bounds[g]), int(bounds[g + 1])
        last = int(last_signal[g]) if n_signals[g] else None
        rows.append({
            "site_id": str(site_id), "operator": operator_pseudonym(str(operator_hash)),
            "metric": metric.id, "method": "fir_cusum", "procedures": e - a,
            "events": int(y[a:e].sum()), "expected": float(risk[a:e].sum()),
            "statistic": finite(statistic[g]), "threshold": float(limits[e - 1]),
            "head_start": design.head_start,
            "signal_date": day_to_date(int(day[a + last])) if last is not None else None,
            "signal_procedure": last + 1 if last is not None else None,
            "signals": int(n_signals[g]),
            "first_procedure_date": day_to_date(int(day[a])),
        })
    return rows


def _fir_by_position(weights: np.ndarray, limits: np.ndarray, bounds: np.ndarray,
                     start: np.ndarray, head_start: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run every operator's FIR recursion at once, one case position at a time.

    Group ``g`` is ``weights[bounds[g]:bounds[g + 1]]`` (thresholds ``limits`` alike),
    starting at ``start[g]``. Step ``k`` advances the ``k``-th case of every operator with
    more than ``k`` cases, with the float operations of :func:`fir_cusum` (so the same
    bits): a loop as long as the longest career, not over a million cases. Returns, per
    group, the statistic at its last case, its number of signals and the position of its
    last signal (-1: none).
    """
    sizes = np.diff(bounds)
    longest_first = np.argsort(-sizes, kind="stable")  # the groups still running: a prefix
    first_row = bounds[:-1][longest_first]
    descending = sizes[longest_first]
    value = start[longest_first].astype(float)
    statistic = value.copy()
    n_signals = np.zeros(len(sizes), np.int64)
    last_signal = np.full(len(sizes), -1, np.int64)
    for k in range(int(descending[0]) if len(descending) else 0):
        running = int(np.count_nonzero(descending > k))
        rows = first_row[:running] + k
        now = value[:running] + weights[rows]
        now = np.where(now > 0.0, now, 0.0)  # max(0.0, v): 0.0 unless v is larger
        limit = limits[rows]
        fired = now >= limit
        statistic[:running] = now
        value[:running] = np.where(fired, head_start * limit, now)
        if fired.any():
            signalled = np.flatnonzero(fired)
            n_signals[signalled] += 1
            last_signal[signalled] = k
    out = (np.empty_like(statistic), np.empty_like(n_signals), np.empty_like(last_signal))
    for result, sorted_values in zip(out, (statistic, n_signals, last_signal), strict=True):
        result[longest_first] = sorted_values
    return out


def operator_rare_tests(units: pd.DataFrame, profile: Profile, design: OperatorDesign,
                        as_of_day: int) -> list[dict]:
    """Exact Poisson test of each operator's major events in the last 365 days."""
    if design.rare_metric is None:
        return []
    metric = profile.metric(design.rare_metric)
    alpha = rare_alpha(rate_per_unit_year(profile, metric))
    known = units.loc[units["operator_hash"].notna()]
    if known.empty:
        return []
    keys, order, bounds = _operator_groups(known)
    day = known["index_day"].to_numpy(np.int64)[order]
    y = known["y"].to_numpy(np.int64)[order]
    risk = known["risk"].to_numpy(float)[order]
    recent = day > as_of_day - ROLLING_DAYS
    rows = []
    for g, (site_id, operator_hash) in enumerate(keys):
        a, e = int(bounds[g]), int(bounds[g + 1])
        mine = recent[a:e]
        # sums over each operator's own slice, as before: the same float additions
        events = int(y[a:e][mine].sum())
        expected = float(risk[a:e][mine].sum())
        p_value = float(poisson_upper_pvalue(events, expected)) if events else 1.0
        signalled = events > 0 and p_value <= alpha
        rows.append({
            "site_id": str(site_id), "operator": operator_pseudonym(str(operator_hash)),
            "metric": metric.id, "method": "rare", "procedures": int(mine.sum()),
            "events": events, "expected": expected, "statistic": p_value, "threshold": alpha,
            "head_start": None,
            "signal_date": day_to_date(as_of_day) if signalled else None,
            "signal_procedure": None, "signals": int(signalled),
            "first_procedure_date": day_to_date(int(day[a])),
        })
    return rows
