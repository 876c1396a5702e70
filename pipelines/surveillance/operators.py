"""Operator learning curves: a risk-adjusted CUSUM with a head start per pseudonymous operator.

Why
---
NICE HTG108 recommendation 1.2 asks that clinicians be trained to an appropriate level before
doing the procedure. A new operator's early cases carry the learning curve; the site's chart
dilutes them among the site's other operators. So each operator gets their own chart from
their first procedure in the warehouse.

What
----
* Cement leak (``beyond_site.operators.cusum_metric``): each operator against *the other
  operators of the same site in the same 91-day quarter* (a cell), as products are compared
  (:mod:`pipelines.surveillance.devices`). Given a cell's events, each is the operator's with
  probability ``pi = E / (E + F)`` under the null (case-mix expected counts of the network
  model), so the site's level and a site-wide drift cancel: a site's drift is its own chart's
  alarm, not a training review for its operators. The chart is the Steiner risk-adjusted
  CUSUM (:func:`pipelines.surveillance.cusum.cusum_weights`) over the shared cells' events in
  date order (``y`` 1 for the operator's, risk ``pi``), alternative odds ratio
  ``odds_ratio`` (3), with a fast initial response (FIR, Lucas & Crosier 1982): a new
  operator's chart starts, and every chart restarts after a signal, at ``head_start x h``.
  An operator alone at their site has no comparator and so no evidence (no threshold, no
  signal); the site's charts cover their cases.
* Major events (``rare_metric``): too rare for a CUSUM per operator; the exact conditional
  test of the operator's last 365 days against their colleagues at the site
  (:func:`pipelines.surveillance.devices.conditional_rare_pvalue`).

Thresholds are not tuned: an operator chart may spend ``r = safety_per_100_site_years / 100 x
alarm.share`` false training-review alerts per operator-year (the same share as the site chart
of the metric), so ``r x tenure_years`` over a stated tenure. Recommendation 1.2 says the
risk is in training, so a *new* operator (:func:`new_operators`: began after the site's data
did) has ``learning_share`` of that spent on their first ``learning_procedures`` cases
(threshold h1) and the rest on the remaining years (h2); an operator already practising at
first sync has one h at ``r`` a year (:func:`pipelines.surveillance.beyond.operator_thresholds`,
Markov chain at the chart's mean share ``pi``, in charted events: :func:`chart_thresholds`).
docs/statistics.md section 9.

Pseudonyms
----------
Operators are shown only as ``OP-`` and the first ten hex digits of their stored HMAC digest
(the digest itself never leaves the warehouse's procedure table). A site's clinical lead maps
it back by computing the HMAC of their own operator references with the key (the key holder's
material); nothing in the warehouse holds a raw reference. A key rotation therefore changes
every pseudonym: it renames the stored ones in the same transaction
(:func:`pseudonym_renames`, :func:`rename_pseudonyms`; docs/keys.md), so an operator keeps
one chart row and one training review.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from pipelines.surveillance.beyond import (
    OperatorDesign,
    finite,
    operator_thresholds,
    rate_per_unit_year,
    rounded_volume,
    share_on_grid,
    site_quarter_cells,
)
from pipelines.surveillance.budget import rare_alpha
from pipelines.surveillance.cusum import cusum_weights
from pipelines.surveillance.outcomes import day_to_date
from pipelines.surveillance.profile import Profile

PSEUDONYM_PREFIX = "OP-"
PSEUDONYM_DIGITS = 10
ROLLING_DAYS = 365
# Shortest observed time a volume is measured over. ``beyond.years_between`` floors it at a
# year, which understates a young chart's volume (30 cases in six months read as 30 a year)
# and so lowers h: more false reviews than the design says, in the year a new operator
# leaves the learning phase. A quarter keeps the estimate from a few days' cases in bounds.
MIN_VOLUME_YEARS = 0.25
# Operators are compared within a site and one of these periods (as products: devices.py)


# A display pseudonym inside stored text (an alert's key, title, payload): not part of a
# longer hex run, so a 64-hex digest or another token is never taken for one.
PSEUDONYM_PATTERN = re.compile(
    rf"(?<![0-9A-Za-z]){re.escape(PSEUDONYM_PREFIX)}[0-9a-f]{{{PSEUDONYM_DIGITS}}}(?![0-9a-f])")


def operator_pseudonym(operator_hash: str) -> str:
    """Return the display pseudonym of an operator digest (never the digest or a reference)."""
    return PSEUDONYM_PREFIX + operator_hash[:PSEUDONYM_DIGITS]


def pseudonym_renames(digests: Mapping[str, str], operator_digests: Iterable[str]
                      ) -> dict[str, str]:
    """Return old pseudonym -> new pseudonym for the operator digests a key rotation re-keys.

    ``digests`` maps old-key digests to new-key digests; ``operator_digests`` are the stored
    operator digests (old key). Two operators that would share an old or a new pseudonym
    (ten hex digits: about one pair in 2 x 10^12 operator pairs) cannot be renamed
    unambiguously: :class:`ValueError`, and the rotation changes nothing.
    """
    renames: dict[str, str] = {}
    for old in set(operator_digests):
        if old not in digests:
            continue
        before, after = operator_pseudonym(old), operator_pseudonym(digests[old])
        if renames.setdefault(before, after) != after:
            raise ValueError(f"two operators share the pseudonym {before}; cannot rename it")
    if len(set(renames.values())) != len(renames):
        raise ValueError("two operators would share a pseudonym under the new key")
    return renames


def rename_pseudonyms(text: str | None, renames: Mapping[str, str]) -> str | None:
    """Return ``text`` with every pseudonym in ``renames`` replaced (others left as they are)."""
    if not text or not renames:
        return text
    return PSEUDONYM_PATTERN.sub(lambda m: renames.get(m.group(0), m.group(0)), text)


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


@dataclass(frozen=True)
class WithinSite:
    """Every operator's within-site evidence: the events of the cells they share.

    Group ``g`` (``keys[g]``: site, operator) charts ``y[bounds[g]:bounds[g + 1]]`` (1: the
    event is the operator's) at null probability ``share`` (the operator's share of the
    cell's case-mix risk), events in date order at ``day``. ``procedures``, ``events`` and
    ``expected`` count the shared cells only; ``first_day`` and ``nth_day`` are the day of
    the operator's first and ``learning_procedures``-th procedure (at any cell; -1: fewer).
    """

    keys: pd.MultiIndex
    bounds: np.ndarray
    day: np.ndarray
    y: np.ndarray
    share: np.ndarray
    procedures: np.ndarray
    events: np.ndarray
    expected: np.ndarray
    first_day: np.ndarray
    nth_day: np.ndarray
    own_days: list[np.ndarray]  # each operator's procedure days (signal_procedure)


def within_site(known: pd.DataFrame, learning_procedures: int) -> WithinSite:
    """Return each operator's events of the site-quarter cells shared with other operators.

    ``known`` holds one procedure per row, each with an operator, in (site, date) order.
    A cell is a site in a ``beyond.QUARTER_DAYS`` period counted from the first day of ``known``;
    an operator shares a cell when the cell has cases of theirs and of someone else. Given
    a cell's events, each is the operator's with probability ``E / (E + F)`` under the null
    (their and the others' case-mix expected counts): the site's level and drift cancel.
    """
    keys, order, bounds = _operator_groups(known)
    day = known["index_day"].to_numpy(np.int64)[order]
    y = known["y"].to_numpy(np.int64)[order]
    risk = known["risk"].to_numpy(float)[order]
    site, _ = pd.factorize(known["site_id"].to_numpy()[order])
    group = np.repeat(np.arange(len(keys)), np.diff(bounds))
    cells = site_quarter_cells(site, day, y, risk)
    cell, n_cells = cells.cell, cells.n_cells
    cell_cases, cell_events, cell_risk = cells.cases, cells.events, cells.risk
    # (operator, cell) pairs in operator then cell order: a site's cells in date order
    pair, pair_of_row = np.unique(group * n_cells + cell, return_inverse=True)
    pair_group, pair_cell = pair // n_cells, pair % n_cells
    pair_cases = np.bincount(pair_of_row, minlength=len(pair))
    pair_risk = np.bincount(pair_of_row, weights=risk, minlength=len(pair))
    pair_events = np.bincount(pair_of_row, weights=y, minlength=len(pair))
    shared = (pair_cases < cell_cases[pair_cell]) & (cell_risk[pair_cell] > 0)
    share = np.divide(pair_risk, cell_risk[pair_cell], out=np.zeros(len(pair)), where=shared)
    n_groups = len(keys)
    procedures = np.bincount(pair_group[shared], weights=pair_cases[shared],
                             minlength=n_groups).astype(np.int64)
    events = np.bincount(pair_group[shared], weights=pair_events[shared],
                         minlength=n_groups).astype(np.int64)
    expected = np.bincount(pair_group[shared],
                           weights=cell_events[pair_cell[shared]] * share[shared],
                           minlength=n_groups)
    # the events of every cell in (cell, date) order, then each shared pair's run of them
    event_rows = np.flatnonzero(y == 1)
    # (ties on a day in the units' own order, as the site's cases came)
    event_rows = event_rows[np.lexsort((order[event_rows], day[event_rows], cell[event_rows]))]
    event_start = np.concatenate(([0], np.cumsum(np.bincount(cell[event_rows],
                                                             minlength=n_cells))))
    taken = np.flatnonzero(shared & (cell_events[pair_cell] > 0))
    lengths = cell_events[pair_cell[taken]].astype(np.int64)
    offsets = np.repeat(event_start[pair_cell[taken]] - np.cumsum(lengths) + lengths, lengths)
    rows = event_rows[offsets + np.arange(int(lengths.sum()))]
    owner = np.repeat(pair_group[taken], lengths)
    chart_bounds = np.concatenate(([0], np.cumsum(np.bincount(owner, minlength=n_groups))))
    first_day = day[bounds[:-1]]
    sizes = np.diff(bounds)
    nth_day = np.where(sizes >= learning_procedures,
                       day[np.minimum(bounds[:-1] + learning_procedures - 1, len(day) - 1)], -1)
    return WithinSite(
        keys=keys, bounds=chart_bounds, day=day[rows], y=(group[rows] == owner).astype(np.int64),
        share=np.repeat(share[taken], lengths), procedures=procedures, events=events,
        expected=expected, first_day=first_day, nth_day=nth_day,
        own_days=[day[a:e] for a, e in zip(bounds[:-1].tolist(), bounds[1:].tolist(),
                                            strict=True)])


def chart_thresholds(design: OperatorDesign, rate: float, share: np.ndarray, day: np.ndarray,
                     procedures: int, first_day: int, nth_day: int, as_of_day: int, new: bool,
                     designs: dict | None = None) -> tuple[np.ndarray, float]:
    """Return (the threshold per charted event, the chart's start value) of one operator.

    The chain of :func:`pipelines.surveillance.beyond.operator_thresholds` with the
    conditional chart's own quantities: its in-control 'risk' is the mean share ``pi`` of
    its events (to the nearest ``beyond.SHARE_STEP``), its volume is charted events a year (up to
    the latest), and a new
    operator's learning phase -- their first ``learning_procedures`` procedures, i.e. the
    events up to the day of the N-th (``nth_day``; -1: not reached) -- is designed as
    ``N x`` (charted events per shared procedure) events. So the budget is the same
    ``r`` false reviews per operator-year, spent on the chart's steps.
    """
    n = len(day)
    # Both on coarse grids so that a night's new cases seldom change the design (a new
    # design is a chain solved; the stored ones are read): the volume over the time to the
    # latest charted event (changes only with an event; slightly high, so h errs upward), the
    # mean share to the nearest beyond.SHARE_STEP (its cells' case counts move it every night).
    volume = operator_volume(n, first_day, int(day[-1]) if n else as_of_day)
    p0 = share_on_grid(float(share.mean()))
    steps = (max(1, int(round(design.learning_procedures * n / max(procedures, 1))))
             if new else 0)
    key = (p0, rounded_volume(volume), steps, new)
    cache = {} if designs is None else designs
    if key not in cache:
        cache[key] = operator_thresholds(
            p0, replace(design, learning_procedures=max(steps, 1)), volume, rate, new=new)
    thresholds = cache[key]
    limits = np.full(n, thresholds.steady)
    if thresholds.learning is not None:
        learning = day <= nth_day if nth_day >= 0 else np.ones(n, bool)
        limits[learning] = thresholds.learning
    return limits, thresholds.start * float(limits[0]) if n else 0.0


def operator_charts(units: pd.DataFrame, profile: Profile, design: OperatorDesign,
                    as_of_day: int) -> list[dict]:
    """Chart every operator of ``units`` against the other operators at the same site.

    ``units`` holds one mature procedure per row in (site, date) order with ``site_id``,
    ``operator_hash`` (rows without an operator are ignored), ``index_day``, ``y`` and
    ``risk`` (the network's case-mix expected risk). The chart is the conditional
    Bernoulli CUSUM of :func:`within_site` (alternative odds ratio ``odds_ratio``, FIR
    head start): a site's drift moves every operator's events alike and cancels, so a
    training review says the operator differs from their colleagues. An operator with no
    cell shared with a colleague (alone at the site) or no event in one has no evidence:
    statistic 0, no threshold, no signal. A new operator (:func:`new_operators`) has the
    learning-phase threshold up to their ``learning_procedures``-th procedure and the
    steady one after (:func:`chart_thresholds`); ``threshold`` is the one in force at the
    latest charted event and ``signal_procedure`` the operator's procedure count on the
    day of the latest signal.
    """
    metric = profile.metric(design.cusum_metric)
    known = units.loc[units["operator_hash"].notna()]
    if known.empty:
        return []
    rate = rate_per_unit_year(profile, metric)
    cells = within_site(known, design.learning_procedures)
    keys, bounds = cells.keys, cells.bounds
    is_new = new_operators(known, design.established_within_days).reindex(keys).to_numpy(bool)
    weights = cusum_weights(cells.y, cells.share, design.odds_ratio)
    designs: dict = {}
    limits = np.empty(len(weights))
    start = np.zeros(len(keys))
    for g in range(len(keys)):
        a, e = int(bounds[g]), int(bounds[g + 1])
        if e > a:
            limits[a:e], start[g] = chart_thresholds(
                design, rate, cells.share[a:e], cells.day[a:e], int(cells.procedures[g]),
                int(cells.first_day[g]), int(cells.nth_day[g]), as_of_day, bool(is_new[g]),
                designs)
    statistic, n_signals, last_signal = _fir_by_position(weights, limits, bounds, start,
                                                         design.head_start)
    rows = []
    for g, (site_id, operator_hash) in enumerate(keys):
        a, e = int(bounds[g]), int(bounds[g + 1])
        charted = e > a
        last = int(last_signal[g]) if charted and n_signals[g] else None
        signal_day = int(cells.day[a + last]) if last is not None else None
        rows.append({
            "site_id": str(site_id), "operator": operator_pseudonym(str(operator_hash)),
            "metric": metric.id, "method": "fir_cusum",
            "procedures": int(cells.procedures[g]), "events": int(cells.events[g]),
            "expected": float(cells.expected[g]),
            "statistic": finite(statistic[g]) if charted else 0.0,
            "threshold": float(limits[e - 1]) if charted else None,
            "head_start": design.head_start,
            "signal_date": day_to_date(signal_day) if signal_day is not None else None,
            "signal_procedure": int(np.searchsorted(cells.own_days[g], signal_day, "right"))
            if signal_day is not None else None,
            "signals": int(n_signals[g]) if charted else 0,
            "first_procedure_date": day_to_date(int(cells.first_day[g])),
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
    """Exact conditional test of each operator's major events in the last 365 days.

    Against the other operators of the same site, as products are
    (:func:`pipelines.surveillance.devices.conditional_rare_pvalue`, four strata of about a
    quarter): given a stratum's events, the operator's count is Binomial(n, pi). A site's
    level and drift cancel; an operator without a colleague in any stratum has no evidence
    (p = 1). ``procedures`` counts the operator's cases in strata shared with a colleague.
    """
    # devices imports this module (ROLLING_DAYS): imported here, not at the top
    from pipelines.surveillance.devices import RARE_STRATA, conditional_rare_pvalue

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
    # a site's groups are adjacent (keys in site order): the row span of each group's site
    site_code, _ = pd.factorize(keys.get_level_values(0))
    site_start = np.searchsorted(site_code, site_code, "left")
    site_end = np.searchsorted(site_code, site_code, "right")
    recent = day > as_of_day - ROLLING_DAYS
    stratum = np.minimum((as_of_day - day) * RARE_STRATA // ROLLING_DAYS, RARE_STRATA - 1)
    rows = []
    for g, (site_id, operator_hash) in enumerate(keys):
        a, e = int(bounds[g]), int(bounds[g + 1])
        lo, hi = int(bounds[site_start[g]]), int(bounds[site_end[g]])
        theirs = np.r_[lo:a, e:hi]
        events, expected, p_value = conditional_rare_pvalue(
            day[a:e], y[a:e], risk[a:e], day[theirs], y[theirs], risk[theirs], as_of_day)
        # the operator's recent cases in strata where a colleague has cases too
        seen = theirs[recent[theirs]]
        covered = np.bincount(stratum[seen], weights=risk[seen], minlength=RARE_STRATA) > 0
        shared = recent[a:e] & covered[stratum[a:e]]
        signalled = events > 0 and p_value <= alpha
        rows.append({
            "site_id": str(site_id), "operator": operator_pseudonym(str(operator_hash)),
            "metric": metric.id, "method": "rare", "procedures": int(shared.sum()),
            "events": events, "expected": expected, "statistic": p_value, "threshold": alpha,
            "head_start": None,
            "signal_date": day_to_date(as_of_day) if signalled else None,
            "signal_procedure": None, "signals": int(signalled),
            "first_procedure_date": day_to_date(int(day[a])),
        })
    return rows
