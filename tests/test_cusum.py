"""CUSUM tests against hand-worked sequences and a plain per-site Python reference loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.surveillance.cusum import (
    _cusum_by_group,
    _cusum_by_position,
    alternative_probability,
    bernoulli_weights,
    continue_cusum,
    cusum_weights,
    direction_of,
    grouped_cusum,
)


def reference_cusum(group, y, p, odds_ratio, h, n_groups):
    """Case-by-case Python loop: the definition, with reset to 0 after each signal."""
    h = np.broadcast_to(np.asarray(h, dtype=float), (n_groups,))
    p = np.broadcast_to(np.asarray(p, dtype=float), (len(y),))
    state = [0.0] * n_groups
    statistic, signal = [], []
    for g, outcome, risk in zip(group, y, p, strict=True):
        weight = outcome * math.log(odds_ratio) - math.log(1 - risk + odds_ratio * risk)
        value = max(0.0, state[g] + weight)
        statistic.append(value)
        fired = value >= h[g]
        signal.append(fired)
        state[g] = 0.0 if fired else value
    return np.array(statistic), np.array(signal, dtype=bool), np.array(state)


def test_alternative_probability_has_the_requested_odds_ratio():
    p0, r = 0.09, 2.0
    p1 = float(alternative_probability(p0, r))
    assert (p1 / (1 - p1)) / (p0 / (1 - p0)) == pytest.approx(r)
    assert p1 == pytest.approx(0.18 / 1.09)


def test_bernoulli_weights_by_formula():
    p0, r = 0.11, 2.0
    p1 = r * p0 / (1 - p0 + r * p0)
    w_event, w_nonevent = bernoulli_weights(p0, r)
    assert w_event == pytest.approx(math.log(p1 / p0))
    assert w_nonevent == pytest.approx(math.log((1 - p1) / (1 - p0)))


@pytest.mark.parametrize(
    ("y", "p", "r"),
    [(1, 0.2, 2.0), (0, 0.2, 2.0), (1, 0.01, 0.5), (0, 0.6, 0.5), (1, 0.5, 3.0)],
)
def test_steiner_weights_by_formula(y, p, r):
    # Steiner et al. 2000: W = log(p1/p) for an event, log((1-p1)/(1-p)) otherwise.
    p1 = r * p / (1 - p + r * p)
    expected = math.log(p1 / p) if y else math.log((1 - p1) / (1 - p))
    assert cusum_weights(np.array([y]), np.array([p]), r)[0] == pytest.approx(expected)


def test_direction_of():
    assert direction_of(2.0) == "up"
    assert direction_of(0.5) == "down"
    with pytest.raises(ValueError):
        direction_of(1.0)


def test_hand_worked_sequence_without_signal():
    # p0 = 0.5, R = 3: event weight log(1.5) = 0.405465, non-event log(0.5) = -0.693147.
    y = np.array([1, 1, 0, 1, 0, 0])
    group = np.zeros(6, dtype=int)
    up, down = math.log(1.5), math.log(0.5)
    s1 = up
    s2 = 2 * up
    s3 = 2 * up + down  # 0.117783
    s4 = s3 + up
    s5 = max(0.0, s4 + down)  # 0.523248 - 0.693147 < 0 -> 0
    s6 = 0.0
    result = grouped_cusum(group, y, 0.5, 3.0, h=5.0)
    np.testing.assert_allclose(result.statistic, [s1, s2, s3, s4, s5, s6], atol=1e-12)
    assert s5 == 0.0
    assert not result.signal.any()
    assert result.summary.first_signal[0] == -1
    assert result.summary.n_signals[0] == 0


def test_hand_worked_sequence_with_reset():
    # Same weights, h = 1.0: 0.405, 0.811, 1.216 (signal, reset), 0.405, 0, 0.405, 0.811, 1.216.
    y = np.array([1, 1, 1, 1, 0, 1, 1, 1])
    group = np.zeros(8, dtype=int)
    up = math.log(1.5)
    expected = [up, 2 * up, 3 * up, up, 0.0, up, 2 * up, 3 * up]
    result = grouped_cusum(group, y, 0.5, 3.0, h=1.0)
    np.testing.assert_allclose(result.statistic, expected, atol=1e-12)
    assert result.signal.tolist() == [False, False, True, False, False, False, False, True]
    assert result.summary.first_signal[0] == 2
    assert result.summary.last_signal[0] == 7
    assert result.summary.n_signals[0] == 2
    assert result.summary.state[0] == 0.0  # last case signalled: carried state is the reset
    assert result.summary.last_value[0] == pytest.approx(3 * up)


def test_lower_cusum_signals_on_a_run_without_events():
    # p0 = 0.5, R = 0.5: p1 = 1/3, non-event weight log(4/3) = 0.2877, event log(2/3) = -0.4055.
    y = np.array([0, 0, 1, 0, 0, 0])
    result = grouped_cusum(np.zeros(6, dtype=int), y, 0.5, 0.5, h=1.0)
    up, down = math.log(4 / 3), math.log(2 / 3)
    s3 = 2 * up + down
    expected = [up, 2 * up, s3, s3 + up, s3 + 2 * up, s3 + 3 * up]  # last = 1.0329 >= 1.0
    np.testing.assert_allclose(result.statistic, expected, atol=1e-12)
    assert result.direction == "down"
    assert result.signal.tolist() == [False, False, False, False, False, True]


def test_two_groups_are_independent():
    y = np.array([1, 1, 1, 0, 0, 0])
    group = np.array([0, 0, 0, 1, 1, 1])
    result = grouped_cusum(group, y, 0.5, 3.0, h=1.0)
    assert result.signal.tolist() == [False, False, True, False, False, False]
    np.testing.assert_allclose(result.statistic[3:], 0.0)
    assert result.summary.first_signal.tolist() == [2, -1]


CASES = [
    # (n_groups, n_rows, p kind, odds ratio, h, seed)
    (1, 500, "flat", 2.0, 2.0, 1),
    (5, 3000, "flat", 2.0, 1.5, 2),
    (20, 10_000, "risk", 2.0, 2.5, 3),
    (20, 10_000, "risk", 0.5, 2.0, 4),
    (50, 40_000, "flat", 0.5, 1.0, 5),
    (7, 20_000, "risk", 3.0, 0.8, 6),  # very frequent signals: many resets per group
    (30, 5_000, "flat", 2.0, "per-group", 7),
    (3000, 4000, "risk", 2.0, 0.6, 8),  # few rows per group: the by-position path
    (2000, 2500, "flat", 0.5, 0.25, 9),
]


def _random_case(n_groups, n_rows, p_kind, seed):
    rng = np.random.default_rng(seed)
    group = np.sort(rng.integers(0, n_groups, n_rows))
    if p_kind == "flat":
        p = 0.11
        y = (rng.random(n_rows) < 0.15).astype(np.int8)
    else:
        p = rng.uniform(0.02, 0.4, n_rows)
        y = (rng.random(n_rows) < p * 1.3).astype(np.int8)
    return rng, group, y, p


@pytest.mark.parametrize(("n_groups", "n_rows", "p_kind", "odds_ratio", "h", "seed"), CASES)
def test_vectorised_equals_reference_loop(n_groups, n_rows, p_kind, odds_ratio, h, seed):
    rng, group, y, p = _random_case(n_groups, n_rows, p_kind, seed)
    if h == "per-group":
        h = rng.uniform(0.5, 3.0, n_groups)
    result = grouped_cusum(group, y, p, odds_ratio, h, n_groups=n_groups)
    statistic, signal, state = reference_cusum(group, y, p, odds_ratio, h, n_groups)
    np.testing.assert_allclose(result.statistic, statistic, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(result.signal, signal)
    np.testing.assert_allclose(result.summary.state, state, atol=1e-9)
    assert result.summary.n_signals.sum() == signal.sum()
    for g in range(n_groups):
        rows = np.flatnonzero(signal & (group == g))
        assert result.summary.first_signal[g] == (rows[0] if rows.size else -1)
        assert result.summary.last_signal[g] == (rows[-1] if rows.size else -1)


@pytest.mark.parametrize(("n_groups", "n_rows", "p_kind", "odds_ratio", "h", "seed"), CASES)
def test_incremental_continuation_equals_full_recompute(
    n_groups, n_rows, p_kind, odds_ratio, h, seed
):
    rng, group, y, p = _random_case(n_groups, n_rows, p_kind, seed)
    if h == "per-group":
        h = rng.uniform(0.5, 3.0, n_groups)
    # Split every group's history at its own random point: old rows first, then "today".
    position = np.arange(n_rows) - np.searchsorted(group, group)
    sizes = np.bincount(group, minlength=n_groups)
    cut = rng.integers(0, sizes + 1)
    new = position >= cut[group]
    p_arr = np.broadcast_to(np.asarray(p, dtype=float), (n_rows,))
    full = grouped_cusum(group, y, p_arr, odds_ratio, h, n_groups=n_groups)
    old = grouped_cusum(group[~new], y[~new], p_arr[~new], odds_ratio, h, n_groups=n_groups)
    today = continue_cusum(old.summary.state, group[new], y[new], p_arr[new], odds_ratio, h)
    np.testing.assert_allclose(today.statistic, full.statistic[new], atol=1e-9)
    np.testing.assert_array_equal(today.signal, full.signal[new])
    np.testing.assert_allclose(today.summary.state, full.summary.state, atol=1e-9)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_both_internal_paths_agree(seed):
    rng = np.random.default_rng(seed)
    n_groups = 40
    group = np.sort(rng.integers(0, n_groups, 3000))
    p = rng.uniform(0.05, 0.3, group.size)
    y = (rng.random(group.size) < p * 1.5).astype(np.int8)
    weights = np.where(y == 1, np.log(2.0), 0.0) - np.log1p(p)
    starts = np.searchsorted(group, np.arange(n_groups))
    ends = np.searchsorted(group, np.arange(n_groups), side="right")
    h = rng.uniform(0.3, 2.0, n_groups)
    state = rng.uniform(0, 0.3, n_groups)
    by_group = _cusum_by_group(group, weights, starts, ends, h, state)
    by_position = _cusum_by_position(group, weights, starts, h, state)
    np.testing.assert_allclose(by_group[0], by_position[0], atol=1e-9)
    np.testing.assert_array_equal(by_group[1], by_position[1])
    assert by_group[1].sum() > 50  # many resets exercised


def test_groups_without_rows_keep_their_state():
    result = continue_cusum(
        np.array([0.3, 1.1, 0.0]), np.array([0, 0]), np.array([0, 1]), 0.1, 2.0, 5.0
    )
    assert result.summary.n_cases.tolist() == [2, 0, 0]
    assert result.summary.state[1] == pytest.approx(1.1)
    assert result.summary.first_signal.tolist() == [-1, -1, -1]


def test_initial_state_enters_the_recursion():
    w_event, _ = bernoulli_weights(0.1, 2.0)
    result = continue_cusum(np.array([2.0]), np.array([0]), np.array([1]), 0.1, 2.0, 10.0)
    assert result.statistic[0] == pytest.approx(2.0 + w_event)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"group": [1, 0], "y": [0, 1]},  # unsorted
        {"group": [0, 0], "y": [0, 2]},  # not 0/1
        {"group": [0, 0], "y": [0, 1], "h": -1.0},
        {"group": [0, 0], "y": [0, 1], "p": 1.5},
    ],
)
def test_invalid_input_is_refused(kwargs):
    args = {"p": 0.1, "odds_ratio": 2.0, "h": 3.0} | kwargs
    with pytest.raises(ValueError):
        grouped_cusum(np.asarray(args.pop("group")), np.asarray(args.pop("y")), **args)


def test_empty_input():
    result = grouped_cusum(
        np.array([], dtype=int), np.array([], dtype=int), 0.1, 2.0, 3.0, n_groups=2
    )
    assert result.statistic.size == 0
    assert result.summary.state.tolist() == [0.0, 0.0]
