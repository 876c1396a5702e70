"""Bernoulli and risk-adjusted CUSUM charts for many sites at once.

Why this module exists
----------------------
A CUSUM accumulates the log-likelihood ratio of "the site's odds of an event are ``R`` times
the baseline odds" against "the site is at baseline", case by case, and signals when the
accumulated evidence reaches a threshold ``h``. It is the fastest detector of a sustained
shift for a given false-alarm rate (Moustakides' optimality), which is why kyphowatch uses it
as the primary safety chart. See ``docs/statistics.md`` for the formulas and references
(Steiner, Cook, Farewell & Treasure 2000, Biostatistics 1:441).

Weights
-------
For a case with expected risk ``p`` and alternative odds ratio ``R`` the weight is
(Steiner et al. 2000)::

    W = y * log(R) - log(1 - p + R * p)

With a constant ``p = p0`` this is exactly the Bernoulli CUSUM weight: ``log(p1/p0)`` for an
event and ``log((1-p1)/(1-p0))`` for a non-event, where ``p1 = R p0 / (1 - p0 + R p0)``.
So one code path serves both the flat-baseline and the risk-adjusted chart: pass a scalar
``p`` for the former and the per-case expected risks for the latter.

Direction
---------
``R > 1`` looks for deterioration ("up"). ``R < 1`` (e.g. 0.5) looks for implausibly *low*
event rates ("down"), which in a registry usually means under-reporting. Both charts use the
same recursion ``S_t = max(0, S_{t-1} + W_t)`` on their own weights, so both statistics are
non-negative and a large value is evidence *for the chart's alternative*. Each direction has
its own threshold (from :func:`pipelines.surveillance.arl.threshold_for_arl`).

Signal and reset
----------------
A case signals when ``S_t >= h``. The statistic reported for that case is the value that
crossed; the recursion then restarts from 0 for the next case of that site.

Public API (names are stable; the engine calls them)
----------------------------------------------------
``alternative_probability(p0, odds_ratio) -> p1``
``bernoulli_weights(p0, odds_ratio) -> (w_event, w_nonevent)``
``cusum_weights(y, p, odds_ratio) -> W`` (per case)
``direction_of(odds_ratio) -> "up" | "down"``
``grouped_cusum(group, y, p, odds_ratio, h, *, n_groups=None, initial=None) -> CusumResult``
``continue_cusum(state, group, y, p, odds_ratio, h) -> CusumResult``

Inputs of :func:`grouped_cusum`: ``group`` are integer site codes ``0..n_groups-1`` and the
rows must be sorted by group, then by time; ``y`` is 0/1; ``p`` is a scalar baseline or one
expected risk per case; ``h`` is a scalar or one threshold per group. The result holds the
statistic and the signal flag per case, and a :class:`CusumSummary` per group whose
``state`` is what :func:`continue_cusum` needs to process tomorrow's rows only.

How it is fast without a per-case Python loop
---------------------------------------------
Without resets the recursion has the closed form (Lindley)::

    S_t = D_t - min(-S_0, min_{k <= t} D_k),   D_t = sum_{j <= t} W_j   (within the site)

so one ``np.cumsum`` and one ``np.minimum.accumulate`` per site give the whole path. After a
signal at case ``r`` the chart restarts, and ``S_t = D_t - min_{r <= k <= t} D_k``. The
statistic up to the first signal is unaffected by resets, so resets are handled by a second
pass that loops only over *signals* (rare by design) and recomputes from each signal point in
doubling windows, so the total work stays proportional to the number of cases.

That path loops over groups (about 5 numpy calls each). When groups have only a few rows each
-- an incremental day, one or two procedures per site -- the recursion is instead stepped one
row *position* at a time across all groups at once (loop length = the largest number of new
rows at any site), which makes a day's update cost proportional to the new rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CusumResult",
    "CusumSummary",
    "alternative_probability",
    "bernoulli_weights",
    "continue_cusum",
    "cusum_weights",
    "direction_of",
    "grouped_cusum",
]

# First window (in cases) scanned after a reset; doubled until the next signal or site end.
_RESET_WINDOW = 256
# A step over one row position (all groups at once) costs about this many per-group steps.
_POSITION_PASS_COST = 4


@dataclass(frozen=True)
class CusumSummary:
    """Per-group summary of one CUSUM pass (arrays of length ``n_groups``).

    ``first_signal`` / ``last_signal`` are row indices into the arrays passed in (-1 when the
    group did not signal). ``last_value`` is the statistic at the group's last row (the
    initial state for a group without rows). ``state`` is what the next incremental call
    starts from: ``last_value``, or 0 when the last row signalled (the chart was reset).
    """

    n_cases: np.ndarray
    n_signals: np.ndarray
    first_signal: np.ndarray
    last_signal: np.ndarray
    last_value: np.ndarray
    max_value: np.ndarray
    state: np.ndarray


@dataclass(frozen=True)
class CusumResult:
    """Statistic and signal flag per case, the per-group summary, and the design used."""

    statistic: np.ndarray
    signal: np.ndarray
    summary: CusumSummary
    odds_ratio: float
    threshold: np.ndarray
    direction: str

    @property
    def signal_rows(self) -> np.ndarray:
        """Return the row indices of all signals, in row order."""
        return np.flatnonzero(self.signal)


def direction_of(odds_ratio: float) -> str:
    """Return "up" for an odds ratio above 1 and "down" for one below 1."""
    odds_ratio = float(odds_ratio)
    if not np.isfinite(odds_ratio) or odds_ratio <= 0 or odds_ratio == 1:
        raise ValueError(f"odds_ratio must be positive and different from 1, got {odds_ratio}")
    return "up" if odds_ratio > 1 else "down"


def alternative_probability(p0, odds_ratio):
    """Return the event probability whose odds are ``odds_ratio`` times the odds of ``p0``."""
    p0 = np.asarray(p0, dtype=float)
    return odds_ratio * p0 / (1.0 - p0 + odds_ratio * p0)


def bernoulli_weights(p0: float, odds_ratio: float) -> tuple[float, float]:
    """Return the CUSUM weights ``(log(p1/p0), log((1-p1)/(1-p0)))`` for an event and a non-event."""
    _check_probability(p0, "p0")
    direction_of(odds_ratio)
    log_norm = np.log1p(p0 * (odds_ratio - 1.0))  # log(1 - p0 + R p0)
    return float(np.log(odds_ratio) - log_norm), float(-log_norm)


def cusum_weights(y, p, odds_ratio: float) -> np.ndarray:
    """Return the Steiner log-likelihood-ratio weight ``y log R - log(1 - p + R p)`` per case."""
    direction_of(odds_ratio)
    y = np.asarray(y)
    p = np.asarray(p, dtype=float)
    if p.ndim and p.shape != y.shape:
        raise ValueError(f"p has shape {p.shape} but y has shape {y.shape}")
    _check_probability(p, "p")
    log_norm = np.log1p(p * (odds_ratio - 1.0))
    return np.where(y.astype(bool), np.log(odds_ratio), 0.0) - log_norm


def grouped_cusum(
    group,
    y,
    p,
    odds_ratio: float,
    h,
    *,
    n_groups: int | None = None,
    initial=None,
) -> CusumResult:
    """Run one CUSUM per group over rows sorted by group then time, resetting after each signal."""
    group = np.asarray(group)
    y = np.asarray(y)
    if group.ndim != 1 or y.shape != group.shape:
        raise ValueError("group and y must be 1-D arrays of the same length")
    if group.size and not np.issubdtype(group.dtype, np.integer):
        raise ValueError("group must hold integer codes 0..n_groups-1")
    if group.size and (group[0] < 0 or np.any(group[1:] < group[:-1])):
        raise ValueError("rows must be sorted by group (non-negative integer codes), then time")
    if y.size and not np.all((y == 0) | (y == 1)):
        raise ValueError("y must hold only 0 and 1")
    if n_groups is None:
        n_groups = int(group[-1]) + 1 if group.size else 0
    elif group.size and group[-1] >= n_groups:
        raise ValueError(f"group code {int(group[-1])} is not below n_groups={n_groups}")
    weights = cusum_weights(y, p, odds_ratio)
    threshold = _per_group(h, n_groups, "h")
    if np.any(threshold <= 0):
        raise ValueError("the CUSUM threshold h must be positive")
    start_state = _per_group(0.0 if initial is None else initial, n_groups, "initial")
    if np.any(start_state < 0):
        raise ValueError("a CUSUM state is never negative")

    starts = np.searchsorted(group, np.arange(n_groups), side="left")
    ends = np.searchsorted(group, np.arange(n_groups), side="right")
    sizes = ends - starts
    n_active = int(np.count_nonzero(sizes))
    longest = int(sizes.max()) if n_groups else 0
    if longest * _POSITION_PASS_COST < n_active:
        # Few rows per group (an incremental day): step through row positions, all groups at once.
        statistic, signal = _cusum_by_position(group, weights, starts, threshold, start_state)
    else:
        statistic, signal = _cusum_by_group(group, weights, starts, ends, threshold, start_state)
    summary = _summarise(statistic, signal, group, starts, ends, start_state, n_groups)
    return CusumResult(
        statistic=statistic,
        signal=signal,
        summary=summary,
        odds_ratio=float(odds_ratio),
        threshold=threshold,
        direction=direction_of(odds_ratio),
    )


def _cusum_by_group(group, weights, starts, ends, threshold, start_state):
    """Closed-form path per group, then a replay from each signal (loops over groups and signals)."""
    n = group.size
    partial_sums = np.empty(n)
    statistic = np.empty(n)
    # Pass 1: the path without resets, via cumulative sums per group.
    for g in np.flatnonzero(ends > starts).tolist():
        a, e = int(starts[g]), int(ends[g])
        d = np.cumsum(weights[a:e])
        partial_sums[a:e] = d
        floor = np.minimum.accumulate(d)
        np.minimum(floor, -start_state[g], out=floor)
        np.subtract(d, floor, out=statistic[a:e])

    signal = np.zeros(n, dtype=bool)
    crossing_rows = np.flatnonzero(statistic >= threshold[group]) if n else np.empty(0, int)
    if crossing_rows.size:
        crossing_groups = group[crossing_rows]
        first_of_group = np.r_[True, crossing_groups[1:] != crossing_groups[:-1]]
        # Pass 2: loop over signals only; each restart recomputes until the next signal.
        for row in crossing_rows[first_of_group].tolist():
            g = int(group[row])
            _replay_after_signals(
                row, int(ends[g]), partial_sums, statistic, signal, float(threshold[g])
            )
    return statistic, signal


def _cusum_by_position(group, weights, starts, threshold, start_state):
    """The recursion itself, one row position at a time across all groups (loops over positions)."""
    position = np.arange(group.size) - starts[group]
    order = np.argsort(position, kind="stable")
    bounds = np.searchsorted(position[order], np.arange(int(position.max()) + 2))
    state = start_state.copy()
    statistic = np.empty(group.size)
    signal = np.zeros(group.size, dtype=bool)
    for k in range(bounds.size - 1):
        rows = order[bounds[k] : bounds[k + 1]]
        g = group[rows]
        value = np.maximum(0.0, state[g] + weights[rows])
        fired = value >= threshold[g]
        statistic[rows] = value
        signal[rows] = fired
        state[g] = np.where(fired, 0.0, value)
    return statistic, signal


def continue_cusum(state, group, y, p, odds_ratio: float, h) -> CusumResult:
    """Continue per-group CUSUMs from ``state`` (a previous ``summary.state``) over new rows only."""
    state = np.asarray(state, dtype=float)
    if state.ndim != 1:
        raise ValueError("state must be one value per group (summary.state of the previous run)")
    return grouped_cusum(group, y, p, odds_ratio, h, n_groups=state.size, initial=state)


def _replay_after_signals(
    row: int,
    end: int,
    partial_sums: np.ndarray,
    statistic: np.ndarray,
    signal: np.ndarray,
    threshold: float,
) -> None:
    """Mark the signal at ``row`` and recompute the rest of its group with resets, in place."""
    while True:
        signal[row] = True
        start = row + 1
        floor = partial_sums[row]  # restart at 0 <=> S_t = D_t - min_{row <= k <= t} D_k
        window = _RESET_WINDOW
        next_row = -1
        while start < end:
            stop = min(end, start + window)
            d = partial_sums[start:stop]
            running = np.minimum.accumulate(d)
            np.minimum(running, floor, out=running)
            values = d - running
            hits = np.flatnonzero(values >= threshold)
            if hits.size:
                k = int(hits[0])
                statistic[start : start + k + 1] = values[: k + 1]
                next_row = start + k
                break
            statistic[start:stop] = values
            floor = float(running[-1])
            start = stop
            window *= 2
        if next_row < 0:
            return
        row = next_row


def _summarise(statistic, signal, group, starts, ends, start_state, n_groups) -> CusumSummary:
    n_cases = (ends - starts).astype(np.int64)
    has_rows = n_cases > 0
    last_value = start_state.copy()
    last_value[has_rows] = statistic[ends[has_rows] - 1]
    state = last_value.copy()
    last_row_signalled = np.zeros(n_groups, dtype=bool)
    last_row_signalled[has_rows] = signal[ends[has_rows] - 1]
    state[last_row_signalled] = 0.0
    max_value = start_state.copy()
    if statistic.size:
        group_max = np.maximum.reduceat(statistic, starts[has_rows])
        max_value[has_rows] = np.maximum(group_max, start_state[has_rows])
    signal_rows = np.flatnonzero(signal)
    signal_groups = group[signal_rows]
    n_signals = np.bincount(signal_groups, minlength=n_groups).astype(np.int64)
    first_signal = np.full(n_groups, -1, dtype=np.int64)
    last_signal = np.full(n_groups, -1, dtype=np.int64)
    np.maximum.at(last_signal, signal_groups, signal_rows)
    first_signal[:] = np.iinfo(np.int64).max
    np.minimum.at(first_signal, signal_groups, signal_rows)
    first_signal[n_signals == 0] = -1
    return CusumSummary(
        n_cases=n_cases,
        n_signals=n_signals,
        first_signal=first_signal,
        last_signal=last_signal,
        last_value=last_value,
        max_value=max_value,
        state=state,
    )


def _per_group(value, n_groups: int, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=float)
    if array.ndim == 0:
        return np.full(n_groups, float(array))
    if array.shape != (n_groups,):
        raise ValueError(f"{name} must be a scalar or one value per group ({n_groups})")
    return array.copy()


def _check_probability(p, name: str) -> None:
    p = np.asarray(p, dtype=float)
    if np.any(~np.isfinite(p)) or np.any(p <= 0) or np.any(p >= 1):
        raise ValueError(f"{name} must be strictly between 0 and 1")
