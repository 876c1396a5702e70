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

With ``frozen=True`` (``design.risk_model.refit: quarterly``) the design is frozen per
calendar quarter: the days of quarter ``q`` are charted with the hazard shape estimated from
what was known when ``q`` began (entries, follow-up and fractures dated before its first
day) and the site's load over the year before it, so a later run recomputes the same past
values and a crossing seen live stays in the history (only late-reported rows restate it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BIN_DAYS = 30
# Fewer network events than this: a constant hazard (the shape cannot be estimated).
MIN_EVENTS_FOR_SHAPE = 30
# A site with fewer days than this before a quarter borrows the network's load for it (a
# handful of days' entries would set its threshold by chance).
MIN_DAYS_FOR_LOAD = 30
# A follow-up bin's hazard is estimated once its time at risk a day is this share of the
# first bin's (the frozen design's early quarters; see hazard_known_at).
OBSERVED_SHARE = 0.1


@dataclass
class FollowUp:
    """Expected and observed first events per site and calendar day."""

    first_day: int
    expected: np.ndarray  # (sites, days) expected events at the reference hazard
    observed: np.ndarray  # (sites, days) first events
    hazard: np.ndarray  # reference hazard per follow-up bin (per day)
    volume_days: np.ndarray  # per site: days it has been contributing (first index to as_of)
    # Frozen design (``follow_up(frozen=True)``); one quarter spanning every day otherwise.
    quarter_start: np.ndarray | None = None  # first day of each charted calendar quarter
    hazards: np.ndarray | None = None  # (quarters, bins) reference hazard of each quarter
    quarter_load: np.ndarray | None = None  # (sites, quarters) load known at its start

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

    def quarter_of_day(self) -> np.ndarray:
        """Return, for each column, the index of its quarter in ``quarter_start``."""
        if self.quarter_start is None:
            return np.zeros(self.expected.shape[1], dtype=np.int64)
        return np.searchsorted(self.quarter_start, self.days, side="right") - 1


def hazard_ratio_for(p_ref: float, odds_ratio: float) -> float:
    """Return the hazard ratio that moves the risk over the window from p_ref by ``odds_ratio``.

    The profile states the shift to detect as an odds ratio on the per-patient proportion
    (``detect.odds_ratio``); under proportional hazards the same shift is
    ``ln(1 - p1) / ln(1 - p_ref)`` with ``p1`` the shifted proportion (OR 2 at 23 %: 1.79).
    """
    odds = p_ref / (1.0 - p_ref) * odds_ratio
    p1 = odds / (1.0 + odds)
    return math.log1p(-p1) / math.log1p(-p_ref)


def _bins(window: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the follow-up bins' edges (days since index) and widths over ``window``."""
    n_bins = max(1, math.ceil(window / BIN_DAYS))
    edges = np.arange(n_bins + 1) * BIN_DAYS
    edges[-1] = window
    return edges, np.diff(edges).astype(float)


def _na_shape(at_risk: np.ndarray, events: np.ndarray) -> np.ndarray:
    """Return the Nelson-Aalen hazard per bin (an empty bin: half the smallest positive one),
    or a flat shape with fewer than MIN_EVENTS_FOR_SHAPE events or a bin never at risk."""
    if events.sum() >= MIN_EVENTS_FOR_SHAPE and (at_risk > 0).all():
        shape = events / at_risk
        return np.where(shape > 0, shape, shape[shape > 0].min() / 2)
    return np.ones(len(at_risk))


def _scaled(shape: np.ndarray, widths: np.ndarray, p_ref: float) -> np.ndarray:
    """Return ``shape`` scaled so that its cumulative hazard over the window is -ln(1 - p_ref)."""
    cumulative = float((shape * widths).sum())
    target = -math.log1p(-p_ref)
    return shape * (target / cumulative)


def reference_hazard(index_day: np.ndarray, end_day: np.ndarray, event: np.ndarray,
                     window: int, p_ref: float) -> np.ndarray:
    """Return the per-day hazard in each 30-day follow-up bin, scaled to ``p_ref`` over ``window``.

    ``end_day`` is the last day at risk (exclusive), ``event`` whether follow-up ended in an
    event. The shape is the network's Nelson-Aalen estimate per bin; with few events it is
    flat.
    """
    edges, widths = _bins(window)
    n_bins = len(widths)
    duration = np.clip(end_day - index_day, 0, window)
    # Bin by bin, not as a units x bins matrix (13 bins of a million units: 100 MB). The
    # days are whole numbers, so the sums are exact in any order.
    at_risk = np.array([np.clip(duration - edges[b], 0, widths[b]).sum()
                        for b in range(n_bins)], dtype=float)
    event_bin = np.minimum((duration[event] - 1).clip(min=0) // BIN_DAYS, n_bins - 1)
    events = np.bincount(event_bin, minlength=n_bins).astype(float)
    return _scaled(_na_shape(at_risk, events), widths, p_ref)


def quarter_start(day: int) -> int:
    """Return the first day (epoch day) of ``day``'s calendar quarter."""
    month = np.datetime64(int(day), "D").astype("datetime64[M]").astype(np.int64)
    return int(np.datetime64(int(month - month % 3), "M").astype("datetime64[D]")
               .astype(np.int64))


def quarter_starts(first_day: int, last_day: int) -> np.ndarray:
    """Return the first day of every calendar quarter from ``first_day``'s to ``last_day``'s."""
    first = quarter_start(first_day)
    month = np.datetime64(first, "D").astype("datetime64[M]")
    last = np.datetime64(quarter_start(last_day), "D").astype("datetime64[M]")
    months = np.arange(month, last + 1, 3, dtype="datetime64[M]")
    return months.astype("datetime64[D]").astype(np.int64)


def hazard_known_at(index_day: np.ndarray, full_end: np.ndarray, has_event: np.ndarray,
                    event_day: np.ndarray, window: int, p_ref: float, day: int) -> np.ndarray:
    """Return the reference hazard per bin estimated from what was known before ``day``.

    Known before ``day``: the units indexed before it, their follow-up up to the day before
    it (``full_end``, the exclusive end of each unit's whole follow-up, is cut at ``day``)
    and the first events dated before it. Only whole days are counted, through a histogram
    of the follow-up durations, so the answer does not depend on the units' order or on any
    unit indexed on or after ``day``: every run on the same dated rows gets the same hazard.
    """
    edges, widths = _bins(window)
    n_bins = len(widths)
    duration = np.clip(np.minimum(full_end, day) - index_day, 0, window)
    counts = np.bincount(duration, minlength=window + 1)
    # person-days in bin b of a unit followed for d days: clip(d - edge_b, 0, width_b)
    lengths = np.arange(window + 1)
    at_risk = np.array([int((np.clip(lengths - edges[b], 0, int(widths[b])) * counts).sum())
                        for b in range(n_bins)], dtype=float)
    known = has_event & (event_day < day) & (event_day + 1 == full_end)
    event_bin = np.minimum((duration[known] - 1).clip(min=0) // BIN_DAYS, n_bins - 1)
    events = np.bincount(event_bin, minlength=n_bins).astype(float)
    # Before a whole window of follow-up is known (a registry's first year) the late bins
    # have little or no time at risk: a bin is estimated when its person-days a day of
    # width are at least OBSERVED_SHARE of the first bin's (the bins up to the first that
    # is not). A flat shape instead would understate the early months, where fractures
    # concentrate, and so the daily expected count (false alarms in the first year).
    per_day = at_risk / widths
    observed = per_day >= OBSERVED_SHARE * per_day[0] if per_day[0] > 0 else per_day > 0
    last = int(np.flatnonzero(~observed)[0]) if not observed.all() else n_bins
    if 0 < last < n_bins and events[:last].sum() >= MIN_EVENTS_FOR_SHAPE:
        # The estimated bins keep the network's own level. The bins not yet seen carry the
        # last estimated bin's hazard forward while the cumulative hazard stays within the
        # reference's; the bins beyond share evenly what is left (a floor of half the
        # smallest estimated hazard when nothing is). Sharing evenly from the first unseen
        # bin would understate the next months of a falling hazard, the months the
        # quarter's oldest patients reach: their expected count too low, false alarms.
        seen = _na_shape(at_risk[:last], events[:last])
        target = -math.log1p(-p_ref)
        shape = np.concatenate([seen, np.zeros(n_bins - last)])
        cumulative = float((seen * widths[:last]).sum())
        b = last
        while b < n_bins and cumulative + seen[-1] * widths[b] <= target:
            shape[b] = seen[-1]
            cumulative += seen[-1] * widths[b]
            b += 1
        if b < n_bins:
            left = target - cumulative
            shape[b:] = (left / float(widths[b:].sum()) if left > 0
                         else float(seen.min()) / 2)
    else:
        shape = _na_shape(at_risk, events)
    return _scaled(shape, widths, p_ref)


def follow_up(site: np.ndarray, index_day: np.ndarray, event_day: np.ndarray, n_sites: int,
              window: int, as_of_day: int, p_ref: float, frozen: bool = False) -> FollowUp:
    """Return expected and observed events per site and day for units in follow-up.

    ``event_day`` is the first counted event (-1 when none so far). Days run from the first
    index day to ``as_of_day``. ``frozen``: each calendar quarter's days use the hazard known
    when the quarter began (:func:`hazard_known_at`) instead of one hazard from every row,
    and ``quarter_load`` holds each site's load known then (:func:`_quarter_load`).
    """
    index_day = np.asarray(index_day, dtype=np.int64)
    event_day = np.asarray(event_day, dtype=np.int64)
    site = np.asarray(site, dtype=np.int64)
    first_day = int(index_day.min()) if len(index_day) else as_of_day
    n_days = as_of_day - first_day + 1
    has_event = event_day >= 0
    # at risk on days index .. end-1; the event day itself is at risk (exposure, then event)
    full_end = np.minimum(index_day + window,
                          np.where(has_event, event_day + 1, index_day + window))
    end_day = np.minimum(full_end, as_of_day + 1)
    if frozen:
        quarters = quarter_starts(first_day, as_of_day)
        hazards = np.array([hazard_known_at(index_day, full_end, has_event, event_day, window,
                                            p_ref, int(q)) for q in quarters])
        hazard = hazards[-1]
    else:
        quarters = hazards = None
        hazard = reference_hazard(index_day, end_day, has_event, window, p_ref)
    n_bins = len(hazard)
    # Piecewise-constant hazard: add hazard[b] on each unit's days of bin b via differences.
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
    size = n_sites * (n_days + 1)
    if frozen:
        # Whole numbers of units at risk in bin b per (site, day), times the hazard of each
        # day's quarter: a day's value depends only on the units at risk that day and on its
        # quarter's hazard, never on as_of (a later run gives the same bits).
        day_hazard = hazards[np.searchsorted(quarters, first_day + np.arange(n_days),
                                             side="right") - 1]
        expected = np.zeros((n_sites, n_days))
    else:
        delta = np.zeros(size)
    for b in range(n_bins):
        live = int(live_in[b + 1])  # units live in bin b: more than b bins live
        if not live:
            continue
        start = start_cell[:live] + b * BIN_DAYS
        stop = np.minimum(end_cell[:live], start_cell[:live] + min((b + 1) * BIN_DAYS, window))
        if frozen:
            steps = np.bincount(start, minlength=size) - np.bincount(stop, minlength=size)
            at_risk = np.cumsum(steps.reshape(n_sites, n_days + 1), axis=1)[:, :n_days]
            expected += at_risk * day_hazard[:, b]
        else:
            delta += np.bincount(start, minlength=size) * hazard[b]
            delta -= np.bincount(stop, minlength=size) * hazard[b]
    if not frozen:
        expected = np.cumsum(delta.reshape(n_sites, n_days + 1), axis=1)[:, :n_days]
        expected = np.clip(expected, 0.0, None)  # cumulative float error near zero
    observed = np.zeros((n_sites, n_days))
    counted = has_event & (event_day <= as_of_day) & (event_day - index_day <= window)
    np.add.at(observed, (site[counted], event_day[counted] - first_day), 1.0)
    starts = np.full(n_sites, as_of_day, dtype=np.int64)
    np.minimum.at(starts, site, index_day)
    follow = FollowUp(first_day=first_day, expected=expected, observed=observed, hazard=hazard,
                      volume_days=(as_of_day - starts + 1).astype(float))
    if frozen:
        follow.quarter_start = quarters
        follow.hazards = hazards
        # a site without units keeps as_of as its start: before no quarter of this run
        follow.quarter_load = _quarter_load(site, index_day, n_sites, quarters, starts, p_ref)
    return follow


def _quarter_load(site: np.ndarray, index_day: np.ndarray, n_sites: int, quarters: np.ndarray,
                  starts: np.ndarray, p_ref: float) -> np.ndarray:
    """Return each site's expected events a day at its volume known when each quarter began.

    A patient followed at the reference hazard until the first event or the window's end
    contributes ``1 - exp(-H) = p_ref`` expected events, so a site indexing ``n`` patients a
    day has a steady load of ``n p_ref`` a day (docs/statistics.md section 8, the thresholds
    table). ``n`` is counted over the year before the quarter (over the days since the site's
    first patient when it has contributed less than a year). A site with fewer than
    ``MIN_DAYS_FOR_LOAD`` days before the quarter has no volume of its own yet: it gets the
    median load of the sites that have one (a network prior), and NaN when none has (the
    registry's first quarter, not charted for want of a design). Only whole counts of
    patients indexed before the quarter are used: every run gets the same load.
    """
    load = np.full((n_sites, len(quarters)), np.nan)
    for j, q in enumerate(quarters):
        q = int(q)
        known = q - starts >= MIN_DAYS_FOR_LOAD
        if not known.any():
            continue
        recent = (index_day < q) & (index_day >= q - 365)
        entries = np.bincount(site[recent], minlength=n_sites)[:n_sites]
        span = np.minimum(q - starts[known], 365).astype(float)
        load[known, j] = entries[known] / span * p_ref
        load[~known, j] = float(np.median(load[known, j]))
    return load


@dataclass
class TteResult:
    """Statistic per site and day, and where it crossed (with restart) its site's threshold."""

    statistic: np.ndarray  # (sites, days)
    signal: np.ndarray  # (sites, days) bool


def tte_cusum(expected: np.ndarray, observed: np.ndarray, theta: float,
              thresholds: np.ndarray) -> TteResult:
    """Run the daily time-to-event CUSUM of every site (one vector step per day).

    ``thresholds``: one per site, or one per site and day (a design frozen per quarter). A
    NaN threshold marks a day without a design (a registry's first quarter): the site is not
    charted that day and its statistic stays 0, so evidence gathered against a flat guess
    of the hazard does not carry into the first designed day.
    """
    n_sites, n_days = expected.shape
    up = observed * math.log(theta) - (theta - 1.0) * expected
    thresholds = np.asarray(thresholds, dtype=float)
    if np.isnan(thresholds).any():
        up = np.where(np.isnan(thresholds if thresholds.ndim == 2 else thresholds[:, None]),
                      -np.inf, up)
    statistic = np.zeros((n_sites, n_days))
    signal = np.zeros((n_sites, n_days), dtype=bool)
    state = np.zeros(n_sites)
    for d in range(n_days):
        state = np.maximum(0.0, state + up[:, d])
        statistic[:, d] = state
        crossed = state >= (thresholds if thresholds.ndim == 1 else thresholds[:, d])
        if crossed.any():
            signal[crossed, d] = True
            state = np.where(crossed, 0.0, state)
    return TteResult(statistic=statistic, signal=signal)
