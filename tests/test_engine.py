"""The monitor end to end on a real warehouse: determinism, episodes, detection, persistence."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from scipy import stats

from pipelines.cli import main as cli_main
from pipelines.db import make_engine
from pipelines.schema import complication, monitor_run, signal
from pipelines.surveillance.engine import evaluate, run_monitor, signal_key
from tests.test_outcomes import complication_row, insert, procedure_row

START = date(2022, 1, 1)


def build_sites(engine, *, sites=8, per_site=500, days=540, leak=None, seed=1, start=START,
                prefix="P", fracture_rate=0.0):
    """Insert ``per_site`` procedures per site with leaks at the given per-site rates.

    ``fracture_rate``: the share of patients with a new fracture 10-199 days after the
    procedure (drawn after every leak, so the leaks are the same with or without).
    """
    rng = np.random.default_rng(seed)
    leak = leak or {}
    procs, comps = [], []
    fracture_draws = []
    for s in range(1, sites + 1):
        site = f"S{s:03d}"
        offsets = np.sort(rng.integers(0, days, per_site))
        leaks = rng.random(per_site) < leak.get(site, 38 / 360)
        for i, (offset, leaked) in enumerate(zip(offsets.tolist(), leaks.tolist(), strict=True)):
            pid = f"{prefix}{site}-{i:05d}"
            day = start + timedelta(days=offset)
            procs.append(procedure_row(pid, site, day, age=60 + (i % 30),
                                       steroid_use=bool(i % 7 == 0)))
            if leaked:
                comps.append(complication_row(f"C{pid}", pid, site, day))
            fracture_draws.append((pid, site, day))
    if fracture_rate:
        fractured = rng.random(len(fracture_draws)) < fracture_rate
        delays = rng.integers(10, 200, len(fracture_draws))
        for (pid, site, day), hit, delay in zip(fracture_draws, fractured.tolist(),
                                                delays.tolist(), strict=True):
            if hit and day + timedelta(days=delay) < start + timedelta(days=days):
                comps.append(complication_row(f"F{pid}", pid, site,
                                              day + timedelta(days=delay), "new_fracture"))
    insert(engine, procs, comps)
    return start + timedelta(days=days)


def signal_rows(db_url):
    engine = make_engine(db_url)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(signal))]


def test_rerun_gives_identical_signals_and_no_duplicates(db_url, settings_for):
    engine = make_engine(db_url)
    build_sites(engine, sites=6, per_site=400, leak={"S006": 0.3})
    settings = settings_for(db_url)
    first = run_monitor(settings)
    second = run_monitor(settings)
    assert first.run_key == second.run_key
    assert [s["signal_key"] for s in first.signals] == [s["signal_key"] for s in second.signals]
    assert first.new_signal_keys and not second.new_signal_keys
    comparable = ("signal_key", "observed", "expected", "n", "statistic", "episode_start")
    assert [{k: s[k] for k in comparable} for s in first.signals] == [
        {k: s[k] for k in comparable} for s in second.signals]
    stored = signal_rows(db_url)
    assert len(stored) == len({r["signal_key"] for r in stored}) == len(first.signals)
    assert all(r["active"] for r in stored)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(monitor_run)).scalar() == 1
    # The key is the documented hash of the episode's identity.
    s = first.signals[0]
    assert s["signal_key"] == signal_key(s["profile_name"], s["site_id"], s["metric"],
                                         s["method"], s["direction"], s["episode_start"])


def test_excess_leaks_are_flagged_and_in_control_sites_mostly_not(db_url, settings_for):
    engine = make_engine(db_url)
    build_sites(engine, sites=8, per_site=500, leak={"S008": 0.3}, seed=3)
    result = run_monitor(settings_for(db_url))
    level = {m["site_id"]: m["level"] for m in result.site_metrics
             if m["metric"] == "cement_leak"}
    # Graded evidence: the drifting site is at alarm, no in-control site is.
    assert level["S008"]["level"] == "alarm"
    assert [s for s, lv in level.items() if lv["level"] == "alarm"] == ["S008"]
    assert level["S008"]["agree"] >= 2
    evidence_methods = [e["method"] for e in level["S008"]["evidence"]]
    assert "ra_cusum" in evidence_methods  # the alarm chart itself is part of the evidence
    up = [s for s in result.signals if s["metric"] == "cement_leak"
          and s["method"] == "ra_cusum" and s["direction"] == "up"]
    assert {s["site_id"] for s in up} == {"S008"}
    flagged = next(s for s in up if s["site_id"] == "S008")
    assert flagged["statistic"] >= flagged["threshold"]
    assert flagged["category"] == "safety"
    assert flagged["citation"] == "NICE HTG108 section 2.4.1"
    assert flagged["baseline"] == pytest.approx(38 / 360)
    assert 0 <= flagged["ci_low"] <= flagged["observed"] / flagged["n"] <= flagged["ci_high"]
    assert flagged["episode_start"] <= flagged["signal_date"]
    methods = {s["method"] for s in result.signals if s["site_id"] == "S008"}
    assert {"ra_cusum", "funnel_cumulative"} <= methods
    # The alarm chart's threshold comes from the false-alarm budget, per site; the
    # corroborating flat chart keeps the profile's ARL0.
    detail = json.loads(flagged["detail"]) if isinstance(flagged["detail"], str) else (
        flagged["detail"])
    assert detail["role"] == "alarm"
    assert detail["threshold_method"].startswith("Markov chain per site")
    # 500 procedures in 540 days: ARL0 = 338 a year / (3.0 * 0.45 / 100) ~ 25,000
    assert 20_000 < detail["arl0"] < 30_000
    models = json.loads(make_engine(db_url).connect().execute(
        sa.select(monitor_run.c.models)).scalar())
    leak_model = models["cement_leak"]
    # 4,000 procedures with ~500 leaks: enough events to fit the case-mix model.
    assert leak_model["kind"] == "logistic"
    assert {"coefficients", "standard_errors", "aic", "c_statistic",
            "calibration_shift"} <= set(leak_model)


def test_a_persisting_signal_stays_one_row_and_corrections_deactivate(sqlite_url, settings_for):
    engine = make_engine(sqlite_url)
    end = build_sites(engine, sites=3, per_site=400, days=360, leak={"S003": 0.35}, seed=5)
    settings = settings_for(sqlite_url)
    first = run_monitor(settings)
    episodes = {(s["site_id"], s["metric"], s["method"], s["direction"], s["episode_start"])
                for s in first.signals}
    # Another 60 days of the same excess arrive; daily reruns must not duplicate episodes.
    build_sites(engine, sites=3, per_site=60, days=60, leak={"S003": 0.35}, seed=6, start=end,
                prefix="Q")
    for offset in (0, 20, 40):
        run_monitor(settings, end + timedelta(days=offset))
    rows = signal_rows(sqlite_url)
    identities = [(r["site_id"], r["metric"], r["method"], r["direction"], r["episode_start"])
                  for r in rows]
    assert len(identities) == len(set(identities))
    cusum_before = {e for e in episodes if e[2] == "bernoulli_cusum"}
    assert cusum_before and cusum_before <= set(identities)
    # A correction removes every leak at S003: its safety signals are no longer derived.
    with engine.begin() as conn:
        conn.execute(complication.delete().where(complication.c.site_id == "S003"))
    final = run_monitor(settings)
    rows = {r["signal_key"]: r for r in signal_rows(sqlite_url)}
    s003_up = [r for r in rows.values() if r["site_id"] == "S003" and r["direction"] == "up"
               and r["metric"] == "cement_leak"]
    assert s003_up and not any(r["active"] for r in s003_up)
    assert all(rows[s["signal_key"]]["active"] for s in final.signals)


def test_a_backdated_run_does_not_deactivate_later_episodes(sqlite_url, settings_for):
    engine = make_engine(sqlite_url)
    build_sites(engine, sites=3, per_site=500, days=540, leak={"S003": 0.35}, seed=8)
    settings = settings_for(sqlite_url)
    latest = run_monitor(settings)
    cutoff = min(s["signal_date"] for s in latest.signals) + timedelta(days=30)
    later = {s["signal_key"] for s in latest.signals if s["signal_date"] > cutoff}
    assert later, "the scenario needs episodes that signal after the backdated as_of"
    run_monitor(settings, cutoff)  # a rerun for a past date
    active = {r["signal_key"] for r in signal_rows(sqlite_url) if r["active"]}
    assert later <= active
    assert run_monitor(settings).new_signal_keys == []  # and today's view is unchanged


def test_a_backdated_run_leaves_the_signal_table_as_the_newest_run_left_it(db_url,
                                                                          settings_for):
    """A past date computed after a newer run (a backfill, or a reader asking for a pruned or
    never-monitored date) stores its run but changes no signal row: the rows hold the newest
    run's figures and states, which the alerts read (review, 2026-12-07: 19 signals pointed
    at the past run until the next monitor)."""
    engine = make_engine(db_url)
    build_sites(engine, sites=4, per_site=400, days=540, leak={"S004": 0.35}, seed=8)
    settings = settings_for(db_url)
    latest = run_monitor(settings)
    assert latest.signals, "the scenario needs signals"
    before = sorted(signal_rows(db_url), key=lambda r: r["signal_key"])
    past = run_monitor(settings, latest.as_of - timedelta(days=120))
    assert past.signals and past.new_signal_keys == []
    assert sorted(signal_rows(db_url), key=lambda r: r["signal_key"]) == before
    with engine.connect() as conn:  # the past run itself is stored
        assert conn.scalar(sa.select(monitor_run.c.as_of)
                           .where(monitor_run.c.run_key == past.run_key)) == past.as_of


def test_a_sentinel_death_signals_at_once(db_url, settings_for):
    engine = make_engine(db_url)
    day = date(2024, 5, 1)
    insert(engine, [procedure_row("P1", "S001", day), procedure_row("P2", "S002", day,
                                                                      mdt=False)],
           [complication_row("C1", "P1", "S001", day + timedelta(days=1), "death",
                             severity="fatal")])
    result = run_monitor(settings_for(db_url), day + timedelta(days=1))
    sentinel = [s for s in result.signals if s["method"] == "sentinel"]
    assert len(sentinel) == 1
    assert sentinel[0]["site_id"] == "S001"
    assert sentinel[0]["episode_start"] == sentinel[0]["signal_date"] == day + timedelta(days=1)
    assert json.loads(sentinel[0]["detail"])["event_types"] == {"death": 1}
    process = [s for s in result.signals if s["method"] == "process"]
    assert [(s["site_id"], s["category"], s["observed"]) for s in process] == [
        ("S002", "process", 1.0)]
    assert sentinel[0]["signal_key"] in result.new_signal_keys


def test_few_events_fall_back_to_the_flat_baseline(sqlite_url, settings_for):
    engine = make_engine(sqlite_url)
    build_sites(engine, sites=2, per_site=40, days=200, seed=9)
    result = evaluate(settings_for(sqlite_url))
    assert result.models["cement_leak"]["kind"] == "flat"
    assert "too few events" in result.models["cement_leak"]["reason"]
    assert not result.persisted


def test_monitor_and_site_commands(sqlite_url, settings_for, capsys, monkeypatch):
    engine = make_engine(sqlite_url)
    build_sites(engine, sites=3, per_site=300, leak={"S003": 0.35}, seed=11)
    monkeypatch.setenv("KYPHOWATCH_DEMO", "1")
    assert cli_main(["monitor", "--db", sqlite_url, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["signals"] and payload["as_of"]
    assert cli_main(["monitor", "--db", sqlite_url]) == 0
    assert "active signals" in capsys.readouterr().out
    assert cli_main(["site", "S003", "--db", sqlite_url, "--metric", "cement_leak"]) == 0
    out = capsys.readouterr().out
    assert "ALARM" in out and "cement_leak: alarm since" in out  # the compact table
    assert cli_main(["site", "S003", "--db", sqlite_url, "--metric", "cement_leak",
                     "--wide"]) == 0
    assert "ra_cusum_up" in capsys.readouterr().out  # the alarm chart, in every column
    assert cli_main(["site", "S003", "--db", sqlite_url, "--json"]) == 0
    site = json.loads(capsys.readouterr().out)
    leak = next(m for m in site["metrics"] if m["metric"] == "cement_leak")
    assert leak["n"] > 0 and leak["ci_low"] <= leak["rate"] <= leak["ci_high"]
    assert cli_main(["site", "S999", "--db", sqlite_url]) == 2
    assert "unknown site" in capsys.readouterr().err
    assert cli_main(["monitor", "--db", sqlite_url, "--as-of", "2024-02-30"]) == 2
    assert cli_main(["monitor", "--db", "postgresql+psycopg://kw@127.0.0.1:1/none"]) == 4


@pytest.mark.slow
def test_statistical_end_to_end_with_the_simulator(tmp_path, sqlite_url, settings_for):
    """40 in-control sites and one with leak odds x2.5: detection and false-alarm rate."""
    from pipelines.ingest import ingest_paths
    from pipelines.simulate import simulate

    drift_from = date(2022, 6, 1)
    simulate(Path(tmp_path / "sim"), sites=41, start=date(2021, 1, 1), end=date(2023, 12, 31),
             seed=7, drifts=[f"S041:cement_leak:2.5:{drift_from.isoformat()}"])
    settings = settings_for(sqlite_url)
    assert ingest_paths(settings, [tmp_path / "sim"]).exit_code == 0
    result = run_monitor(settings)
    leak_up = [s for s in result.signals if s["metric"] == "cement_leak"
               and s["method"] == "bernoulli_cusum" and s["direction"] == "up"]
    drifting = [s for s in leak_up if s["site_id"] == "S041" and s["signal_date"] >= drift_from]
    assert drifting, "the drifting site was not flagged"
    first_delay = (min(s["signal_date"] for s in drifting) - drift_from).days
    # False alarms: a renewal process with mean run length >= ARL0 cases gives at most
    # (mature cases / ARL0) expected alarms; allow a Poisson 0.999 upper bound on that.
    arl0 = 2000
    mature = {m["site_id"]: m["n"] for m in result.site_metrics
              if m["metric"] == "cement_leak" and m["site_id"] != "S041"}
    expected = sum(mature.values()) / arl0
    bound = stats.poisson.ppf(0.999, expected)
    false_up = [s for s in leak_up if s["site_id"] != "S041"]
    false_down = [s for s in result.signals if s["metric"] == "cement_leak"
                  and s["method"] == "bernoulli_cusum" and s["direction"] == "down"
                  and s["site_id"] != "S041"]
    print(f"e2e: mature in-control cases {sum(mature.values())}, expected false alarms "
          f"{expected:.1f} per chart (bound {bound:.0f}); up {len(false_up)}, "
          f"down {len(false_down)}; first drift signal after {first_delay} days")
    assert len(false_up) <= bound
    assert len(false_down) <= bound
    fracture = [s for s in result.signals if s["metric"] == "new_fracture"
                and s["method"] == "bernoulli_cusum"]
    fracture_mature = sum(m["n"] for m in result.site_metrics if m["metric"] == "new_fracture")
    assert len(fracture) <= stats.poisson.ppf(0.999, fracture_mature / arl0)


def test_every_outcome_method_a_profile_may_name_has_a_charting_routine():
    """The engine's method registry covers the profile's vocabulary, and nothing else."""
    from pipelines.surveillance.engine import OUTCOME_METHODS, _Computation
    from pipelines.surveillance.profile import METHODS_BY_KIND

    assert set(OUTCOME_METHODS) == set(METHODS_BY_KIND["outcome"])
    for routine in OUTCOME_METHODS.values():
        assert callable(getattr(_Computation, routine))
