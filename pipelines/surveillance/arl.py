"""Average run lengths and CUSUM thresholds solved from a stated false-alarm target.

Why this module exists
----------------------
A CUSUM threshold ``h`` means nothing by itself; what a safety committee can agree to is a
false-alarm rate ("one false alarm per site every ~20 years at typical volume"). The in-control
average run length ARL0 (expected number of cases until a false signal when the site is at
baseline) translates that rate into ``h``. Every threshold kyphowatch uses is solved here from
such a target; none is hard-coded.

Methods
-------
* :func:`arl_markov` -- Markov-chain ARL of the Bernoulli CUSUM (Brook & Evans 1972). The
  Bernoulli CUSUM has only two weights, so following Reynolds & Stoumbos (1999) and Steiner et
  al. (2000) the weights are put on an integer grid of width ``u``: the smaller weight is an
  exact multiple of ``u`` and the larger one is rounded to the nearest multiple, with ``u``
  chosen among candidates to make that rounding error smallest. States are ``0 .. H-1`` with
  ``H = ceil(h/u)``; the ARL from state 0 solves ``(I - Q) L = 1`` (sparse, banded).
* :func:`arl_simulate` -- Monte-Carlo ARL of the Bernoulli CUSUM with the exact real weights,
  simulated event by event (geometric gaps between events), vectorised across runs, seeded.
* :func:`arl_simulate_risk_adjusted` -- Monte-Carlo ARL of the risk-adjusted CUSUM, with
  case risks resampled from a given risk distribution (e.g. the fitted expected risks).
* :func:`threshold_for_arl` / :func:`threshold_for_arl_risk_adjusted` -- bisection for the
  smallest ``h`` whose ARL0 reaches the target. Simulation uses common random numbers (each
  run's path does not depend on ``h``) so the simulated ARL is monotone in ``h`` and the
  bisection is well defined and reproducible for a given seed.
* :func:`arl0_for_false_alarm_probability` / :func:`false_alarm_probability` -- convert between
  ARL0 and the probability of at least one false alarm within a horizon of ``volume`` cases
  (e.g. a site-year), treating the run length as geometric: ``P = 1 - (1 - 1/ARL0)^V``, i.e.
  ``ARL0 = 1 / (1 - (1 - P)^(1/V)) ~= V / -ln(1 - P)``.
  :func:`false_alarm_probability_markov` gives the exact probability from the chain for a chart
  that starts at 0, and :func:`threshold_for_false_alarm_probability` solves ``h`` from it.

Direction: ``odds_ratio > 1`` is the upper (deterioration) chart, ``odds_ratio < 1`` the lower
(under-reporting) chart; ``direction`` ("up"/"down") is optional and only checked for
consistency. ``p`` is the true event probability under which the ARL is evaluated (``p0`` for
ARL0; ``alternative_probability(p0, R)`` for the ARL under the designed shift).

Run lengths are counted in cases and include the signalling case.

Public API
----------
``arl_markov(p, p0, odds_ratio, h, direction=None, *, grid=None) -> float``
``arl_simulate(p, p0, odds_ratio, h, direction=None, *, n_runs=10000, seed=0) -> SimulatedArl``
``arl_simulate_risk_adjusted(risks, odds_ratio, h, *, true_odds_ratio=1.0, n_runs=1000, seed=0)
-> SimulatedArl``
``threshold_for_arl(p0, odds_ratio, arl0, direction=None, method="markov", *, n_runs=4000,
seed=0, tol=1e-3) -> float``
``threshold_for_arl_risk_adjusted(risks, odds_ratio, arl0, *, n_runs=1000, seed=0, tol=0.01)
-> float``
``arl0_for_false_alarm_probability(probability, volume) -> float``
``false_alarm_probability(arl0, volume) -> float``
``false_alarm_probability_markov(p0, odds_ratio, h, volume, *, p=None) -> float``
``threshold_for_false_alarm_probability(p0, odds_ratio, probability, volume) -> float``
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from scipy import sparse

from pipelines.surveillance.cusum import (
    alternative_probability,
    bernoulli_weights,
    cusum_weights,
    direction_of,
)

__all__ = [
    "SimulatedArl",
    "arl0_for_false_alarm_probability",
    "arl_markov",
    "arl_simulate",
    "arl_simulate_risk_adjusted",
    "false_alarm_probability",
    "false_alarm_probability_markov",
    "markov_grid",
    "threshold_for_arl",
    "threshold_for_arl_risk_adjusted",
    "threshold_for_false_alarm_probability",
]

# Upper bound on (number of states) x (larger step in grid units), which bounds the fill-in of
# the banded LU factorisation (memory ~ 8 bytes each).
_GRID_BUDGET = 4_000_000
# The smaller weight is split into at most this many grid steps.
_MAX_SUBDIVISION = 400


@dataclass(frozen=True)
class SimulatedArl:
    """A Monte-Carlo ARL estimate with its standard error (``sd / sqrt(n_runs)``)."""

    arl: float
    standard_error: float
    n_runs: int
    censored: int = 0

    def to_dict(self) -> dict:
        """Return a JSON-ready dictionary."""
        return {
            "arl": self.arl,
            "standard_error": self.standard_error,
            "n_runs": self.n_runs,
            "censored": self.censored,
        }


@dataclass(frozen=True)
class MarkovGrid:
    """Integer grid of a Bernoulli CUSUM: grid width and the two weights in grid steps."""

    unit: float
    event_steps: int
    nonevent_steps: int


def markov_grid(p0: float, odds_ratio: float, h_max: float) -> MarkovGrid:
    """Choose the grid width for :func:`arl_markov` that represents both weights best."""
    w_event, w_nonevent = bernoulli_weights(p0, odds_ratio)
    small, large = sorted((abs(w_event), abs(w_nonevent)))
    best: tuple[float, int] | None = None
    candidates = []
    for k in range(1, _MAX_SUBDIVISION + 1):
        unit = small / k
        cost = math.ceil(h_max / unit) * round(large / unit)
        if cost > _GRID_BUDGET and k > 1:
            break
        candidates.append(k)
    # Prefer the finest grids, and among them the one whose larger weight is closest to a
    # whole number of steps.
    finest = candidates[len(candidates) // 2 :] or candidates
    for k in finest:
        ratio = large * k / small
        error = abs(ratio - round(ratio)) / ratio + 1.0 / (k * max(1.0, h_max / small))
        if best is None or error < best[0]:
            best = (error, k)
    k = best[1]
    unit = small / k
    return MarkovGrid(
        unit=unit,
        event_steps=int(round(w_event / unit)),
        nonevent_steps=int(round(w_nonevent / unit)),
    )


def _transition_matrix(p: float, grid: MarkovGrid, h: float) -> sparse.csr_array:
    from scipy import sparse  # imported here: see run_lengths

    n_states = max(1, math.ceil(h / grid.unit - 1e-9))
    states = np.arange(n_states)
    rows, cols, values = [], [], []
    for step, probability in ((grid.event_steps, p), (grid.nonevent_steps, 1.0 - p)):
        target = states + step
        stays = target < n_states  # reaching n_states or more is a signal (absorbed)
        rows.append(states[stays])
        cols.append(np.maximum(target[stays], 0))
        values.append(np.full(int(stays.sum()), probability))
    return sparse.csr_array(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_states, n_states),
    )


def run_lengths(transitions: sparse.csr_array) -> np.ndarray:
    """Return the run lengths from every non-signal state: the solution of ``(I - Q) L = 1``.

    SciPy's sparse modules are imported here, not at the top: they cost about 0.2 s of
    every monitor process, and a monitor that reads its designs from the threshold store
    (every run after the first) never solves a chain.
    """
    from scipy import sparse
    from scipy.sparse.linalg import spsolve

    n_states = transitions.shape[0]
    system = (sparse.identity(n_states, format="csc") - transitions.tocsc()).tocsc()
    return np.atleast_1d(spsolve(system, np.ones(n_states)))


def arl_markov(
    p: float,
    p0: float,
    odds_ratio: float,
    h: float,
    direction: str | None = None,
    *,
    grid: MarkovGrid | None = None,
) -> float:
    """Return the Markov-chain ARL from 0 of the Bernoulli CUSUM designed for (p0, R) at rate p."""
    _check_direction(odds_ratio, direction)
    _check_p(p)
    if h <= 0:
        raise ValueError("h must be positive")
    grid = grid or markov_grid(p0, odds_ratio, h)
    return float(run_lengths(_transition_matrix(p, grid, h))[0])


def false_alarm_probability_markov(
    p0: float, odds_ratio: float, h: float, volume: int, *, p: float | None = None
) -> float:
    """Return P(signal within ``volume`` cases) for a chart started at 0, from the Markov chain."""
    grid = markov_grid(p0, odds_ratio, h)
    transitions = _transition_matrix(p0 if p is None else p, grid, h)
    survival = np.ones(transitions.shape[0])
    for _ in range(int(volume)):
        survival = transitions @ survival
    return float(1.0 - survival[0])


def arl_simulate(
    p: float,
    p0: float,
    odds_ratio: float,
    h: float,
    direction: str | None = None,
    *,
    n_runs: int = 10_000,
    seed: int = 0,
    max_events: int = 10_000_000,
) -> SimulatedArl:
    """Return the simulated ARL from 0 of the Bernoulli CUSUM designed for (p0, R) at rate p."""
    lengths = _simulate_bernoulli_run_lengths(
        p, p0, odds_ratio, h, direction, n_runs, seed, max_events
    )
    return _summarise_lengths(lengths, censored=0)


def _simulate_bernoulli_run_lengths(p, p0, odds_ratio, h, direction, n_runs, seed, max_events):
    """Simulate run lengths event by event; every run's path is independent of ``h``."""
    _check_direction(odds_ratio, direction)
    _check_p(p)
    w_event, w_nonevent = bernoulli_weights(p0, odds_ratio)
    rng = np.random.default_rng(seed)
    value = np.zeros(n_runs)
    elapsed = np.zeros(n_runs, dtype=np.int64)
    lengths = np.zeros(n_runs, dtype=np.int64)
    active = np.ones(n_runs, dtype=bool)
    upper = odds_ratio > 1
    for _ in range(max_events):
        if not active.any():
            break
        # Draw for every run so that each run's path does not depend on h (common numbers).
        gaps = rng.geometric(p, size=n_runs)[active]  # trials up to and including the event
        nonevents = gaps - 1
        s = value[active]
        t = elapsed[active]
        if upper:
            # Non-events only lower S, so an upper chart can signal only on an event.
            s = np.maximum(0.0, s + nonevents * w_nonevent) + w_event
            t = t + gaps
            done = s >= h
            ends = t
        else:
            needed = np.ceil((h - s) / w_nonevent - 1e-12).astype(np.int64)
            needed = np.maximum(needed, 1)
            done = needed <= nonevents
            ends = t + needed
            s = np.maximum(0.0, s + nonevents * w_nonevent + w_event)
            t = t + gaps
        idx = np.flatnonzero(active)
        lengths[idx[done]] = ends[done]
        value[idx] = s
        elapsed[idx] = t
        active[idx[done]] = False
    if active.any():
        raise RuntimeError("simulation did not finish; h is too large for the event rate")
    return lengths


def arl_simulate_risk_adjusted(
    risks,
    odds_ratio: float,
    h: float,
    *,
    true_odds_ratio: float = 1.0,
    n_runs: int = 1000,
    seed: int = 0,
    block: int = 512,
    max_length: int = 5_000_000,
) -> SimulatedArl:
    """Return the simulated ARL of the risk-adjusted CUSUM with case risks drawn from ``risks``.

    Each case draws an expected risk from ``risks`` (with replacement); its outcome is an event
    with probability ``alternative_probability(risk, true_odds_ratio)`` (so ``true_odds_ratio=1``
    gives ARL0). Runs that have not signalled after ``max_length`` cases count as
    ``max_length`` and are reported in ``censored``.
    """
    lengths, censored = _risk_adjusted_first_passage(
        np.asarray(risks, dtype=float),
        odds_ratio,
        [h],
        true_odds_ratio,
        n_runs,
        seed,
        block,
        max_length,
    )
    return _summarise_lengths(lengths[:, 0], censored=int(censored[0]))


# Runs whose simulated paths are made at a time (_risk_adjusted_first_passage): 2 MB arrays.
_CHUNK_RUNS = 512


def _risk_adjusted_first_passage(
    risks, odds_ratio, thresholds, true_odds_ratio, n_runs, seed, block, max_length
):
    """Return first-passage times of shared simulated paths over each threshold (runs x h)."""
    if risks.ndim != 1 or risks.size == 0:
        raise ValueError("risks must be a non-empty 1-D array of expected risks")
    thresholds = np.asarray(thresholds, dtype=float)
    value = np.zeros(n_runs)
    lengths = np.zeros((n_runs, thresholds.size), dtype=np.int64)
    pending = np.ones((n_runs, thresholds.size), dtype=bool)
    true_risks = alternative_probability(risks, true_odds_ratio) if true_odds_ratio != 1 else risks
    for index in range(max_length // block + 1):
        alive = pending.any(axis=1)
        if not alive.any():
            break
        rng = np.random.default_rng([seed, index])  # per-block stream: paths independent of h
        # The same draws as ever, made _CHUNK_RUNS runs at a time: a Generator's stream split
        # into consecutive draws gives the same numbers (tests/test_arl.py checks the
        # thresholds bit for bit), and the runs x block int64 and float64 arrays of one
        # draw were a first run's peak memory. The case indices are kept in the narrowest
        # type that holds them; the uniforms only until the outcomes are drawn from them.
        picks = np.empty((n_runs, block), dtype=np.min_scalar_type(risks.size - 1))
        for a in range(0, n_runs, _CHUNK_RUNS):
            picks[a:a + _CHUNK_RUNS] = rng.integers(
                0, risks.size, size=(min(_CHUNK_RUNS, n_runs - a), block))
        rows = np.flatnonzero(alive)
        outcomes = np.empty((rows.size, block), dtype=bool)
        for a in range(0, n_runs, _CHUNK_RUNS):
            uniforms = rng.random((min(_CHUNK_RUNS, n_runs - a), block))
            lo, hi = np.searchsorted(rows, (a, a + _CHUNK_RUNS))
            mine = rows[lo:hi]
            outcomes[lo:hi] = uniforms[mine - a] < true_risks[picks[mine]]
            del uniforms
        start = -value[rows]
        running_max = np.empty((rows.size, block))
        last = np.empty(rows.size)
        # Runs are independent rows: their paths are made _CHUNK_RUNS runs at a time, with
        # the same element-wise operations in the same order (so the same values), instead
        # of a dozen runs x block arrays at once (a first run's peak memory).
        for a in range(0, rows.size, _CHUNK_RUNS):
            mine = rows[a:a + _CHUNK_RUNS]
            d = cusum_weights(outcomes[a:a + len(mine)], risks[picks[mine]], odds_ratio)
            np.cumsum(d, axis=1, out=d)
            floor = np.minimum.accumulate(d, axis=1)
            np.minimum(floor, start[a:a + _CHUNK_RUNS][:, None], out=floor)
            path = np.subtract(d, floor, out=d)
            # Until a run passes the largest threshold it is never reset, so one path
            # serves all h.
            np.maximum.accumulate(path, axis=1, out=running_max[a:a + len(mine)])
            last[a:a + len(mine)] = path[:, -1]
        del picks, outcomes
        # Over every run at once, as before: the row offsets it adds depend on all of them.
        first = _first_index_at_least(running_max, thresholds)
        del running_max  # overwritten by the call
        still = pending[rows]
        newly = (first < block) & still
        found = lengths[rows]
        found[newly] = index * block + first[newly] + 1
        lengths[rows] = found
        pending[rows] = still & ~newly
        value[rows] = last
    censored = pending.sum(axis=0)
    lengths[pending] = max_length
    return lengths, censored


def _first_index_at_least(running_max: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Return, per row and threshold, the first column where a non-decreasing row reaches it.

    Rows are shifted apart by a constant larger than any value so that the flattened array is
    sorted, and one ``np.searchsorted`` answers every (row, threshold) pair; ``ncols`` means
    "not reached". ``running_max`` is overwritten (shifted in place: one array fewer).
    """
    n_rows, n_cols = running_max.shape
    spacing = float(max(running_max[:, -1].max(), thresholds.max())) + 1.0
    offsets = np.arange(n_rows) * spacing
    flat = np.add(running_max, offsets[:, None], out=running_max).ravel()
    first = np.empty((n_rows, thresholds.size), dtype=np.intp)
    # The keys _CHUNK_RUNS rows at a time, with the same element-wise operations (so the
    # same answers): rows x thresholds arrays are a few MB each, four of them at once.
    for a in range(0, n_rows, _CHUNK_RUNS):
        keys = offsets[a:a + _CHUNK_RUNS, None] + thresholds[None, :]
        positions = np.searchsorted(flat, keys.ravel(), side="left").reshape(keys.shape)
        np.minimum(positions - (np.arange(a, a + len(keys)) * n_cols)[:, None], n_cols,
                   out=first[a:a + len(keys)])
    return first


def threshold_for_arl(
    p0: float,
    odds_ratio: float,
    arl0: float,
    direction: str | None = None,
    method: str = "markov",
    *,
    n_runs: int = 4000,
    seed: int = 0,
    tol: float = 1e-3,
) -> float:
    """Return the smallest ``h`` (within ``tol``) whose in-control ARL reaches ``arl0``."""
    _check_direction(odds_ratio, direction)
    if arl0 <= 1:
        raise ValueError("arl0 must exceed 1")
    if method == "markov":
        hi = _bracket(lambda h: arl_markov(p0, p0, odds_ratio, h), arl0)
        grid = markov_grid(p0, odds_ratio, hi)

        def arl_of(h: float) -> float:
            return arl_markov(p0, p0, odds_ratio, h, grid=grid)

    elif method == "simulate":

        def arl_of(h: float) -> float:
            return arl_simulate(p0, p0, odds_ratio, h, n_runs=n_runs, seed=seed).arl

        hi = _bracket(arl_of, arl0)
    else:
        raise ValueError(f"unknown method {method!r}; use 'markov' or 'simulate'")
    return _bisect(arl_of, arl0, hi, tol)


def threshold_for_arl_risk_adjusted(
    risks,
    odds_ratio: float,
    arl0: float,
    *,
    n_runs: int = 1000,
    seed: int = 0,
    tol: float = 0.01,
    max_length: int = 5_000_000,
) -> float:
    """Return the smallest ``h`` whose simulated in-control ARL of the risk-adjusted CUSUM reaches ``arl0``.

    The simulated paths are shared across thresholds (common random numbers), so the ARL is
    a monotone step function of ``h`` and the answer is reproducible for a given seed.
    """
    risks = np.asarray(risks, dtype=float)
    # Start from the flat-baseline threshold at the mean risk; RA thresholds are close to it.
    guess = threshold_for_arl(float(risks.mean()), odds_ratio, arl0, tol=0.05)
    grid = np.arange(max(tol, guess - 1.0), guess + 1.0 + tol, tol)
    lengths, censored = _risk_adjusted_first_passage(
        risks, odds_ratio, grid, 1.0, n_runs, seed, 512, max_length
    )
    arls = lengths.mean(axis=0)
    reached = np.flatnonzero(arls >= arl0)
    if reached.size == 0:
        raise RuntimeError("ARL0 target not reached on the search grid; raise max_length")
    if reached[0] == 0:
        raise RuntimeError("ARL0 target reached at the lowest grid threshold; widen the grid")
    return float(grid[reached[0]])


def arl0_for_false_alarm_probability(probability: float, volume: float) -> float:
    """Return the ARL0 that gives a false alarm within ``volume`` cases with ``probability``.

    Treats the in-control run length as geometric: ``ARL0 = 1 / (1 - (1 - P)^(1/V))``, which is
    ``V / -ln(1 - P)`` to within half a case (the form quoted in the guidance profile).
    """
    if not 0 < probability < 1 or volume <= 0:
        raise ValueError("probability must be in (0, 1) and volume positive")
    return float(1.0 / -math.expm1(math.log1p(-probability) / volume))


def false_alarm_probability(arl0: float, volume: float) -> float:
    """Return the probability of at least one false alarm within ``volume`` cases at ``arl0``."""
    if arl0 <= 1 or volume < 0:
        raise ValueError("arl0 must exceed 1 and volume must not be negative")
    return float(-math.expm1(volume * math.log1p(-1.0 / arl0)))


def threshold_for_false_alarm_probability(
    p0: float, odds_ratio: float, probability: float, volume: int, *, tol: float = 1e-3
) -> float:
    """Return the smallest ``h`` with P(false alarm within ``volume`` cases from 0) <= ``probability``."""
    if not 0 < probability < 1:
        raise ValueError("probability must be in (0, 1)")

    def survival_like(h: float) -> float:
        return 1.0 / max(false_alarm_probability_markov(p0, odds_ratio, h, volume), 1e-300)

    return _bisect(
        survival_like, 1.0 / probability, _bracket(survival_like, 1.0 / probability), tol
    )


def _bracket(arl_of: Callable[[float], float], target: float) -> float:
    hi = 1.0
    while arl_of(hi) < target:
        hi *= 2.0
        if hi > 1e3:
            raise RuntimeError("no threshold reaches the target; check the inputs")
    return hi


def _bisect(arl_of: Callable[[float], float], target: float, hi: float, tol: float) -> float:
    lo = 0.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if arl_of(mid) >= target:
            hi = mid
        else:
            lo = mid
    return float(hi)


def _summarise_lengths(lengths: np.ndarray, censored: int) -> SimulatedArl:
    lengths = np.asarray(lengths, dtype=float)
    n = lengths.size
    sd = float(lengths.std(ddof=1)) if n > 1 else float("nan")
    return SimulatedArl(float(lengths.mean()), sd / math.sqrt(n), n, censored)


def _check_direction(odds_ratio: float, direction: str | None) -> None:
    actual = direction_of(odds_ratio)
    if direction is not None and direction != actual:
        raise ValueError(
            f"direction {direction!r} does not match odds_ratio {odds_ratio} ({actual!r})"
        )


def _check_p(p: float) -> None:
    if not 0 < p < 1:
        raise ValueError("p must be strictly between 0 and 1")
