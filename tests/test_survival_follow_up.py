"""survival.follow_up: the bins' units taken as prefixes give the per-bin mask's figures."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.surveillance import survival
from pipelines.surveillance.survival import BIN_DAYS, follow_up, reference_hazard


def _ref_expected(site, index_day, event_day, n_sites, window, as_of_day, p_ref):
    """The expected counts as computed before, with a mask of the live units per bin."""
    first_day = int(index_day.min()) if len(index_day) else as_of_day
    n_days = as_of_day - first_day + 1
    has_event = event_day >= 0
    end_day = np.minimum(index_day + window, as_of_day + 1)
    end_day = np.where(has_event, np.minimum(end_day, event_day + 1), end_day)
    hazard = reference_hazard(index_day, end_day, has_event, window, p_ref)
    delta = np.zeros(n_sites * (n_days + 1))
    for b in range(len(hazard)):
        start = index_day + b * BIN_DAYS
        stop = np.minimum(end_day, index_day + min((b + 1) * BIN_DAYS, window))
        live = stop > start
        if not live.any():
            continue
        base = site[live] * (n_days + 1)
        delta += np.bincount(base + (start[live] - first_day), minlength=delta.size) * hazard[b]
        delta -= np.bincount(base + (stop[live] - first_day), minlength=delta.size) * hazard[b]
    expected = np.cumsum(delta.reshape(n_sites, n_days + 1), axis=1)[:, :n_days]
    return np.clip(expected, 0.0, None)


@pytest.mark.parametrize("seed", range(8))
def test_follow_up_expected_equals_the_masked_loop_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30_000))
    n_sites = int(rng.integers(1, 40))
    window = int(rng.choice([30, 90, 100, 365, 400]))
    as_of_day = 20_000
    site = rng.integers(0, n_sites, n).astype(np.int64)
    index_day = rng.integers(as_of_day - 900, as_of_day + 1, n).astype(np.int64)
    event_day = np.where(rng.random(n) < 0.3,
                         index_day + rng.integers(-5, window + 40, n), -1).astype(np.int64)
    got = follow_up(site, index_day, event_day, n_sites, window, as_of_day, 0.2)
    expected = _ref_expected(site, index_day, event_day, n_sites, window, as_of_day, 0.2)
    assert got.expected.tobytes() == expected.tobytes()
    assert got.expected.any()


def test_follow_up_of_no_units():
    empty = np.zeros(0, dtype=np.int64)
    got = follow_up(empty, empty, empty, 3, 365, 20_000, 0.2)
    assert got.expected.shape == (3, 1) and not got.expected.any()
    assert survival.BIN_DAYS == BIN_DAYS
