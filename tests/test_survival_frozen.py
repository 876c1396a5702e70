"""The time-to-event chart's design is frozen per quarter: a later run restates no past day.

docs/statistics.md section 8: the days of a calendar quarter are charted with the hazard
shape and the site loads known when the quarter began, so a run at a later as_of on the
same rows gives the same values and signals for every earlier day, and a crossing seen live
stays in the stored history (its alert is not closed as "condition cleared"). Only rows
reported late restate the past, from their own day on.
"""

from __future__ import annotations

import json
from datetime import date

import numpy as np
import pytest
import sqlalchemy as sa

from pipelines.alerts import sync_alerts
from pipelines.db import make_engine
from pipelines.schema import alert, alert_audit, signal
from pipelines.simulate import simulate, simulate_snapshot
from pipelines.surveillance import engine, survival
from pipelines.surveillance.outcomes import day_number
from pipelines.surveillance.profile import load_profile

PROFILE = "profiles/htg108.yaml"
DRIFT = "S003:new_fracture:2.5:2023-03-01"


def _registry(seed: int, n_sites: int = 12, days: int = 800, window: int = 365):
    """Units of a synthetic registry: site, index day, first event day (-1: none)."""
    rng = np.random.default_rng(seed)
    start = day_number(date(2022, 1, 1))
    n = 40 * n_sites * days // 365
    site = rng.integers(0, n_sites, n).astype(np.int64)
    # sites join at different times, so some have no volume before a quarter
    joined = rng.integers(0, days // 2, n_sites)
    index_day = start + joined[site] + rng.integers(0, days, n)
    keep = index_day < start + days
    site, index_day = site[keep], index_day[keep].astype(np.int64)
    # front-loaded onsets, as in the simulator: Beta(1, 2.5) over the window
    onset = 10 + np.floor((window - 10) * rng.beta(1.0, 2.5, len(site))).astype(np.int64)
    event_day = np.where(rng.random(len(site)) < 0.23, index_day + onset, -1)
    return site, index_day, event_day, n_sites, start


def _as_of(site, index_day, event_day, as_of_day):
    """The rows a run on ``as_of_day`` sees (nothing dated after it; no late rows)."""
    seen = index_day <= as_of_day
    events = np.where(event_day <= as_of_day, event_day, -1)
    return site[seen], index_day[seen], events[seen]


@pytest.mark.parametrize("seed", range(4))
def test_a_later_as_of_gives_the_same_values_for_every_earlier_day(seed):
    site, index_day, event_day, n_sites, start = _registry(seed)
    early, late = start + 500, start + 790
    a = survival.follow_up(*_as_of(site, index_day, event_day, early), n_sites, 365, early,
                           0.23, frozen=True)
    b = survival.follow_up(*_as_of(site, index_day, event_day, late), n_sites, 365, late,
                           0.23, frozen=True)
    n_days, n_quarters = a.expected.shape[1], len(a.quarter_start)
    assert a.first_day == b.first_day and len(b.quarter_start) > n_quarters
    assert a.expected.tobytes() == b.expected[:, :n_days].tobytes()
    assert a.observed.tobytes() == b.observed[:, :n_days].tobytes()
    assert a.hazards.tobytes() == b.hazards[:n_quarters].tobytes()
    assert np.array_equal(a.quarter_load, b.quarter_load[:, :n_quarters], equal_nan=True)
    # the design does move from quarter to quarter (else the test proves nothing)
    assert not np.array_equal(b.hazards[1], b.hazards[-1])
    # a site that joined later borrows the network's load until it has one of its own: only
    # the quarters before any site had a month of volume have no design (NaN)
    designed = np.isfinite(b.quarter_load)
    assert (designed.all(axis=0) | ~designed.any(axis=0)).all()
    assert not designed[:, 0].any() and designed[:, -1].all()
    assert np.flatnonzero(~designed[0]).max() < np.flatnonzero(designed[0]).min()


def test_the_hazard_known_at_a_quarter_ignores_every_later_row():
    site, index_day, event_day, n_sites, start = _registry(7)
    has = event_day >= 0
    full_end = np.minimum(index_day + 365, np.where(has, event_day + 1, index_day + 365))
    day = survival.quarter_starts(start, start + 700)[4]
    before = survival.hazard_known_at(index_day, full_end, has, event_day, 365, 0.23, day)
    # later rows moved anywhere (after the quarter's start) change nothing known before it
    moved_index = np.where(index_day >= day, index_day + 3, index_day)
    moved_event = np.where(event_day >= day, event_day + 40, event_day)
    moved_has = moved_event >= 0
    moved_end = np.minimum(moved_index + 365,
                           np.where(moved_has, moved_event + 1, moved_index + 365))
    after = survival.hazard_known_at(moved_index, moved_end, moved_has, moved_event, 365, 0.23,
                                     day)
    assert before.tobytes() == after.tobytes()
    # scaled to the reference: cumulative hazard -ln(1 - 0.23) over the window
    widths = np.diff(np.r_[np.arange(0, 365, survival.BIN_DAYS), 365])
    assert float((before * widths).sum()) == pytest.approx(-np.log1p(-0.23))


def test_a_late_reported_fracture_restates_the_past_from_its_own_day():
    site, index_day, event_day, n_sites, start = _registry(3)
    t, later = start + 560, start + 700
    # a fracture dated before t that the run on t had not received yet
    candidates = np.flatnonzero((event_day > start + 420) & (event_day < t - 60))
    unit = int(candidates[0])
    d0 = int(event_day[unit])
    unreported = event_day.copy()
    unreported[unit] = -1
    live = survival.follow_up(*_as_of(site, index_day, unreported, t), n_sites, 365, t, 0.23,
                              frozen=True)
    rerun = survival.follow_up(*_as_of(site, index_day, event_day, later), n_sites, 365, later,
                               0.23, frozen=True)
    known_all_along = survival.follow_up(*_as_of(site, index_day, event_day, t), n_sites, 365,
                                         t, 0.23, frozen=True)
    col = d0 - live.first_day
    n_days = live.expected.shape[1]
    # before the fracture's day nothing changes: nor the design of its quarter
    assert live.expected[:, :col].tobytes() == rerun.expected[:, :col].tobytes()
    q0 = int(np.searchsorted(live.quarter_start, d0, side="right"))  # quarters up to d0's
    assert live.hazards[:q0].tobytes() == rerun.hazards[:q0].tobytes()
    # from its day on the rerun shows it as a run that had it all along would have
    assert rerun.observed[site[unit], col] == live.observed[site[unit], col] + 1
    assert rerun.expected[:, :n_days].tobytes() == known_all_along.expected.tobytes()
    assert rerun.observed[:, :n_days].tobytes() == known_all_along.observed.tobytes()
    # the unit leaves the risk set after its fracture, and the next quarters' hazard counts it
    assert rerun.expected[site[unit], col + 1] < live.expected[site[unit], col + 1]
    assert live.hazards[q0:].tobytes() != rerun.hazards[q0:len(live.hazards)].tobytes()


def _tte_rows(result) -> list[tuple]:
    return sorted((r["site_id"], r["method"], r["episode_start"], r["signal_date"],
                   r["statistic"], r["threshold"], r["expected"], r["observed"])
                  for r in result.builder.rows.values()
                  if r["method"].startswith("tte_cusum") and r["metric"] == "new_fracture")


def test_engine_runs_at_two_dates_agree_on_every_day_of_the_first():
    profile = load_profile(PROFILE)

    def run(as_of):
        snapshot, _ = simulate_snapshot(profile, sites=5, start=date(2023, 1, 1),
                                        end=date(2023, 12, 31), seed=4, drifts=[DRIFT],
                                        as_of=as_of)
        return engine.compute(profile, snapshot)

    first, second = run(date(2023, 6, 30)), run(date(2023, 12, 29))
    a, b = first.charts["tte"]["new_fracture"], second.charts["tte"]["new_fracture"]
    n_days = a["statistic"].shape[1]
    assert a["first_day"] == b["first_day"]
    assert a["statistic"].tobytes() == b["statistic"][:, :n_days].tobytes()
    cut = date(2023, 6, 30)
    early = _tte_rows(first)
    assert any(row[1] == "tte_cusum" for row in early)  # an alarm seen live
    assert early == [row for row in _tte_rows(second) if row[3] <= cut]


def _stored_tte(db_url: str) -> dict[str, tuple]:
    wh = make_engine(db_url)
    with wh.connect() as conn:
        rows = conn.execute(sa.select(signal).where(
            signal.c.metric == "new_fracture", signal.c.method == "tte_cusum")).mappings().all()
    wh.dispose()
    return {r["signal_key"]: (r["signal_date"], r["statistic"], r["threshold"], r["active"])
            for r in rows}


def test_a_live_crossing_stays_stored_and_its_alert_is_not_cleared(sqlite_url, settings_for,
                                                                   tmp_path):
    from pipelines.ingest import ingest_paths

    out = tmp_path / "extracts"
    simulate(out, sites=5, start=date(2023, 1, 1), end=date(2023, 12, 31), seed=6,
             drifts=[DRIFT])
    settings = settings_for(sqlite_url)
    ingest_paths(settings, sorted(out.glob("*.csv")))
    engine.run_monitor(settings, date(2023, 6, 30))
    live = _stored_tte(sqlite_url)
    assert live and all(active for *_, active in live.values())
    created = sync_alerts(settings).created
    wh = make_engine(sqlite_url)
    with wh.connect() as conn:
        raised = conn.execute(sa.select(alert.c.alert_id, alert.c.dedupe_key).where(
            alert.c.alert_id.in_(created), alert.c.metric == "new_fracture")).all()
    assert raised, "the live new-fracture alarm raised no alert"

    engine.run_monitor(settings, date(2023, 12, 29))
    later = _stored_tte(sqlite_url)
    # every crossing seen live is still stored, active, with the same date and figures
    for key, seen in live.items():
        assert later[key] == seen
    result = sync_alerts(settings)
    with wh.connect() as conn:
        states = dict(conn.execute(sa.select(alert.c.alert_id, alert.c.state).where(
            alert.c.alert_id.in_([a for a, _ in raised]))).all())
        reasons = [json.dumps(dict(r), default=str) for r in conn.execute(sa.select(alert_audit).where(
            alert_audit.c.alert_id.in_([a for a, _ in raised]))).mappings()]
    wh.dispose()
    assert result.persisting >= len(raised)
    assert set(states.values()) == {"open"}
    assert not any("condition cleared" in r for r in reasons)


def test_days_without_a_design_hold_the_statistic_at_zero():
    # the registry's first quarter has no known hazard or load: NaN thresholds
    expected = np.full((2, 6), 0.1)
    observed = np.array([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]] * 2)
    thresholds = np.array([[np.nan, np.nan, 5.0, 5.0, 5.0, 5.0], [5.0] * 6])
    result = survival.tte_cusum(expected, observed, 2.0, thresholds)
    step = np.log(2.0) - 0.1
    assert result.statistic[0].tolist()[:3] == [0.0, 0.0, 0.0]
    assert result.statistic[0, 4] == pytest.approx(step)
    # the site with a design from the first day keeps its evidence
    assert result.statistic[1, 4] == pytest.approx(3 * step - 0.2)
    assert not result.signal.any()
