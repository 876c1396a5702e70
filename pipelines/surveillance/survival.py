"""The time-to-event CUSUM: count outcomes with a long follow-up as they happen.

A new fracture counts in the guidance's per-patient proportion (HTG108 2.4.2) only once the
patient's 365-day window has closed, so a chart on that proportion cannot see a drift until
more than a year after it starts. This chart uses partial follow-up instead, in the manner of
the continuous-time CUSUM of Biswas and Kalbfleisch (2008) and the CGR-CUSUM of Gomon et al.
(2022, R package ``success``):

* every patient is at risk from the index procedure until the first event, the end of the
  window or ``as_of``, whichever comes first;
* the reference hazard is ``lambda(t) = c * lambda_network(t)``: its *shape* over follow-up
  time (30-day bins) comes from the whole network's data, its *level* ``c`` is set so that
  the cumulative hazard over the window equals ``-ln(1 - p_ref)`` where ``p_ref`` is the top
  of the guidance range (the indifference zone, docs/statistics.md section 8);
* each day ``d`` a site has ``E_d`` expected events (the sum of the hazards of its patients
  at risk) and ``O_d`` observed first events. Against a hazard ratio ``theta`` the
  log-likelihood ratio of that day is ``O_d ln(theta) - (theta - 1) E_d``, and the CUSUM is
  ``S_d = max(0, S_{d-1} + O_d ln(theta) - (theta - 1) E_d)``, signalling at ``h`` and
  restarting at 0.

The signal is dated on the day of the event that crossed ``h``: that is when it became
detectable. ``h`` is derived per site from the false-alarm budget
(:func:`pipelines.surveillance.budget.poisson_threshold`, with the site's mean ``E_d``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date

import numpy as np

BIN_DAYS = 30
# Fewer network events than this: a constant hazard (the shape cannot be estimated).
MIN_EVENTS_FOR_SHAPE = 30
# The chart runs only once the network has followed this many patients' worth of at-risk
# time through every follow-up bin (100 patients x the bin's width). Before that (a
# registry's first year) the late bins are unseen or rest on a handful of patients, and
# the shape the chart would use is wrong in the way that matters: new fractures cluster in
# the first months (docs/statistics.md section 8), a constant or late-inflated shape
# understates the early hazard, and busy sites alarm on fractures that are normal.
MIN_PATIENTS_PER_BIN = 100


@dataclass
class FollowUp:
    """Expected and observed first events per site and calendar day."""

    first_day: int
    expected: np.ndarray  # (sites, days) expected events at the reference hazard
    observed: np.ndarray  # (sites, days) first events
    hazard: np.ndarray  # reference hazard per follow-up bin (per day)
    volume_days: np.ndarray  # per site: days it has been contributing (first index to as_of)
    # Whether the network's follow-up covers every bin (:func:`shape_estimable`); when not,
    # ``hazard`` is the constant fallback and the chart must not be run on it.
    shape_estimated: bool = True

    @property
    def days(self) -> np.ndarray:
        """Return the epoch day of each column."""
        return self.first_day + np.arange(self.expected.shape[1])

    def mean_daily_expected(self) -> np.ndarray:
        """Return each site's mean expected events a day over its last year (or all it has).

        A site that started less than a window ago is still filling its at-risk pool; its
        long-run load is estimated from the year after its start once it has one.
        """
        n_days = self.expected.shape[1]
        last_year = self.expected[:, max(0, n_days - 365):].sum(axis=1)
        span = np.minimum(self.volume_days, 365).clip(min=1)
        return last_year / span


def hazard_ratio_for(p_ref: float, odds_ratio: float) -> float:
    """Return the hazard ratio that moves the risk over the window from p_ref by ``odds_ratio``.

    The profile states the shift to detect as an odds ratio on the per-patient proportion
    (``detect.odds_ratio``); under proportional hazards the same shift is
    ``ln(1 - p1) / ln(1 - p_ref)`` with ``p1`` the shifted proportion (OR 2 at 23 %: 1.79).
    """
    odds = p_ref / (1.0 - p_ref) * odds_ratio
    p1 = odds / (1.0 + odds)
    return math.log1p(-p1) / math.log1p(-p_ref)


def network_bins(index_day: np.ndarray, end_day: np.ndarray, event: np.ndarray, window: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the network's at-risk days, first events and width of each 30-day bin."""
    n_bins = max(1, math.ceil(window / BIN_DAYS))
    edges = np.arange(n_bins + 1) * BIN_DAYS
    edges[-1] = window
    widths = np.diff(edges).astype(float)
    duration = np.clip(end_day - index_day, 0, window)
    # Bin by bin, not as a units x bins matrix (13 bins of a million units: 100 MB). The
    # days are whole numbers, so the sums are exact in any order.
    at_risk = np.array([np.clip(duration - edges[b], 0, widths[b]).sum()
                        for b in range(n_bins)], dtype=float)
    event_bin = np.minimum((duration[event] - 1).clip(min=0) // BIN_DAYS, n_bins - 1)
    events = np.bincount(event_bin, minlength=n_bins).astype(float)
    return at_risk, events, widths


def shape_estimable(at_risk: np.ndarray, events: np.ndarray, widths: np.ndarray) -> bool:
    """Return True when the network's follow-up can give the hazard's shape.

    At least ``MIN_EVENTS_FOR_SHAPE`` events, and in every bin the at-risk days of
    ``MIN_PATIENTS_PER_BIN`` patients followed through it.
    """
    return bool(events.sum() >= MIN_EVENTS_FOR_SHAPE
                and (at_risk >= MIN_PATIENTS_PER_BIN * widths).all())


def charts_at(shape_estimated: bool, charted_since: date | None, as_of: date) -> bool:
    """Return whether a run as of ``as_of`` charts the time-to-event chart.

    The chart starts when the network's follow-up gives the hazard's shape
    (:func:`shape_estimable`) and, once a stored run as of ``charted_since`` has charted it,
    stays charted for every run as of that day or later, with the hazard the run's data
    give even when they fall back below the rule (a correction removing rows, late
    fractures landing at the threshold): dropping the chart would close an open alarm as
    cleared and its return would e-mail it a second time. A run before ``charted_since``
    (a backfill) follows the rule alone.
    """
    return shape_estimated or (charted_since is not None and charted_since <= as_of)


def reference_hazard(index_day: np.ndarray, end_day: np.ndarray, event: np.ndarray,
                     window: int, p_ref: float) -> np.ndarray:
    """Return the per-day hazard in each 30-day follow-up bin, scaled to ``p_ref`` over ``window``.

    ``end_day`` is the last day at risk (exclusive), ``event`` whether follow-up ended in an
    event. The shape is the network's Nelson-Aalen estimate per bin; with few events it is
    flat.
    """
    return hazard_from_bins(*network_bins(index_day, end_day, event, window), p_ref)


def hazard_from_bins(at_risk: np.ndarray, events: np.ndarray, widths: np.ndarray,
                     p_ref: float) -> np.ndarray:
    """Return :func:`reference_hazard` from the network's bins (:func:`network_bins`)."""
    if events.sum() >= MIN_EVENTS_FOR_SHAPE and (at_risk > 0).all():
        shape = events / at_risk
        shape = np.where(shape > 0, shape, shape[shape > 0].min() / 2)
    else:
        shape = np.ones(len(widths))
    cumulative = float((shape * widths).sum())
    target = -math.log1p(-p_ref)
    return shape * (target / cumulative)


def follow_up(site: np.ndarray, index_day: np.ndarray, event_day: np.ndarray, n_sites: int,
              window: int, as_of_day: int, p_ref: float) -> FollowUp:
    """Return expected and observed events per site and day for units in follow-up.

    ``event_day`` is the first counted event (-1 when none so far). Days run from the first
    index day to ``as_of_day``.
    """
    index_day = np.asarray(index_day, dtype=np.int64)
    event_day = np.asarray(event_day, dtype=np.int64)
    site = np.asarray(site, dtype=np.int64)
    first_day = int(index_day.min()) if len(index_day) else as_of_day
    n_days = as_of_day - first_day + 1
    has_event = event_day >= 0
    # at risk on days index .. end-1; the event day itself is at risk (exposure, then event)
    end_day = np.minimum(index_day + window, as_of_day + 1)
    end_day = np.where(has_event, np.minimum(end_day, event_day + 1), end_day)
    bins = network_bins(index_day, end_day, has_event, window)
    hazard = hazard_from_bins(*bins, p_ref)
    estimable = shape_estimable(*bins)
    n_bins = len(hazard)
    # Piecewise-constant hazard: add hazard[b] on each unit's days of bin b via differences.
    delta = np.zeros(n_sites * (n_days + 1))
    # A unit is in follow-up in bin b when its end is past the bin's start, that is for
    # its first ceil((end - index) / BIN_DAYS) bins: units ordered by that count (most
    # first), bin b's units are a prefix, taken without a mask. Only counts per (site, day)
    # are made from them (whole numbers: the units' order does not matter), and the
    # float steps on ``delta`` are those of a mask per bin, in the same order.
    cell = site * (n_days + 1) - first_day  # + a day: the unit's (site, day) cell
    start_cell = cell + index_day
    end_cell = cell + end_day
    del cell
    bins_live = np.clip(-((index_day - end_day) // BIN_DAYS), 0, n_bins)
    order = np.argsort(n_bins - bins_live.astype(np.int16), kind="stable")
    start_cell, end_cell = start_cell[order], end_cell[order]
    live_in = np.cumsum(np.bincount(bins_live, minlength=n_bins + 1)[::-1])[::-1]
    del order, bins_live
    for b in range(n_bins):
        live = int(live_in[b + 1])  # units live in bin b: more than b bins live
        if not live:
            continue
        start = start_cell[:live] + b * BIN_DAYS
        stop = np.minimum(end_cell[:live], start_cell[:live] + min((b + 1) * BIN_DAYS, window))
        delta += np.bincount(start, minlength=delta.size) * hazard[b]
        delta -= np.bincount(stop, minlength=delta.size) * hazard[b]
    expected = np.cumsum(delta.reshape(n_sites, n_days + 1), axis=1)[:, :n_days]
    expected = np.clip(expected, 0.0, None)  # cumulative float error near zero
    observed = np.zeros((n_sites, n_days))
    counted = has_event & (event_day <= as_of_day) & (event_day - index_day <= window)
    np.add.at(observed, (site[counted], event_day[counted] - first_day), 1.0)
    starts = np.full(n_sites, as_of_day, dtype=np.int64)
    np.minimum.at(starts, site, index_day)
    return FollowUp(first_day=first_day, expected=expected, observed=observed, hazard=hazard,
                    volume_days=(as_of_day - starts + 1).astype(float),
                    shape_estimated=estimable)


@dataclass
class TteResult:
    """Statistic per site and day, and where it crossed (with restart) its site's threshold."""

    statistic: np.ndarray  # (sites, days)
    signal: np.ndarray  # (sites, days) bool


def tte_cusum(expected: np.ndarray, observed: np.ndarray, theta: float,
              thresholds: np.ndarray) -> TteResult:
    """Run the daily time-to-event CUSUM of every site (one vector step per day)."""
    n_sites, n_days = expected.shape
    up = observed * math.log(theta) - (theta - 1.0) * expected
    statistic = np.zeros((n_sites, n_days))
    signal = np.zeros((n_sites, n_days), dtype=bool)
    state = np.zeros(n_sites)
    thresholds = np.asarray(thresholds, dtype=float)
    for d in range(n_days):
        state = np.maximum(0.0, state + up[:, d])
        statistic[:, d] = state
        crossed = state >= thresholds
        if crossed.any():
            signal[crossed, d] = True
            state = np.where(crossed, 0.0, state)
    return TteResult(statistic=statistic, signal=signal)
