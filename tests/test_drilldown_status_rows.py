"""``kyphowatch sites`` reads the status rows the monitor stored, not every site's figures.

The monitor stores each run's status rows in ``chart_status`` (``levels.status_rows``) in
the same transaction as the run; ``sites`` reads those (``runs.load_status``) when they are
the run's, instead of decoding the ``core`` part and deriving the rows again. These tests
hold the stored rows to the rows derived from ``core``, the command's output (every format)
to the output through ``core``, and a run whose rows ``chart_status`` does not hold (a past
date stored after the newest) to the path through ``core``.
"""

from __future__ import annotations

from datetime import timedelta

from pipelines.cli import main as cli_main
from pipelines.db import make_engine
from pipelines.surveillance import levels, runs
from pipelines.surveillance.engine import run_monitor
from pipelines.surveillance.profile import load_profile
from tests.test_drilldown import _outputs
from tests.test_engine import build_sites


def _key(row):
    return row["site_id"], row["metric"]


def test_stored_status_rows_are_the_rows_derived_from_core(db_url, settings_for):
    engine = make_engine(db_url)
    build_sites(engine, sites=5, per_site=300, leak={"S002": 0.3}, seed=11)
    settings = settings_for(db_url)
    result = run_monitor(settings)
    profile = load_profile(settings.profile_path)
    with engine.connect() as conn:
        whole = runs.load_run(conn, profile, result.as_of)
        stored = runs.load_status(conn, profile, result.as_of)
    derived = levels.status_rows(whole, profile, detail=False)
    assert len(derived) == 5 * len(profile.metrics)
    assert sorted(stored.status_rows, key=_key) == sorted(derived, key=_key)
    assert any(r["status"] != levels.IN_CONTROL for r in derived)
    assert (stored.run_key, stored.as_of, stored.procedure_facts) == (
        whole.run_key, whole.as_of, whole.procedure_facts)
    # the kind of every figure is its metric's kind in the profile
    assert {(m["metric"], m["kind"]) for m in whole.site_metrics} == {
        (m["metric"], m["kind"]) for m in stored.site_metrics}


def test_sites_prints_the_same_from_stored_rows_and_from_core(db_url, settings_for, capsys,
                                                               monkeypatch):
    engine = make_engine(db_url)
    end = build_sites(engine, sites=4, per_site=400, leak={"S004": 0.3}, seed=5)
    monkeypatch.setenv("KYPHOWATCH_DEMO", "1")
    run_monitor(settings_for(db_url))
    assert cli_main(["alerts", "sync", "--db", db_url]) == 0  # open alerts in the grid
    capsys.readouterr()
    commands = [[*c, "--db", db_url] for c in (
        ["sites"], ["sites", "--flagged"], ["sites", "--wide"], ["sites", "--json"],
        ["sites", "--csv"], ["sites", "--flagged", "--json"])]

    load_run, load_status = runs.load_run, runs.load_status
    read = []
    monkeypatch.setattr(runs, "load_run", lambda *a, **k: read.append(1) or load_run(*a, **k))
    stored = _outputs(commands, capsys)
    assert read == []  # never through core
    assert all(code == 0 for code, _, _ in stored) and "S004" in stored[1][1]

    monkeypatch.setattr(runs, "load_status", lambda *a, **k: None)  # through core
    assert _outputs(commands, capsys) == stored
    assert len(read) == len(commands)

    # a past date stored after the newest run: chart_status keeps the newest run's rows,
    # so the past run is read through core, and reads the same the second time
    monkeypatch.setattr(runs, "load_status", load_status)
    past = ["sites", "--json", "--as-of", (end - timedelta(days=150)).isoformat(),
            "--db", db_url]
    first = _outputs([past], capsys)
    read.clear()
    assert _outputs([past], capsys) == first and first[0][0] == 0 and len(read) == 1
    assert first[0][1] != stored[3][1]
