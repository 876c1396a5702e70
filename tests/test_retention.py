"""``kyphowatch runs prune``: old stored runs lose their parts, and come back when asked for.

Runs stored at four dates 60 days apart; a prune keeping 90 days removes the parts of the
two oldest (the newest, the current picture's, and every run's record stay); a dry run
changes nothing; a pruned date asked for again is computed and stored anew.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import pytest
import sqlalchemy as sa

from pipelines.cli import main as cli_main
from pipelines.db import make_engine
from pipelines.schema import chart_status, monitor_run, monitor_run_part
from pipelines.settings import ConfigurationError, load_settings
from pipelines.surveillance import retention, runs
from pipelines.surveillance.engine import run_monitor
from pipelines.surveillance.profile import load_profile
from tests.test_engine import build_sites


def _stored_dates(engine) -> list:
    with engine.connect() as conn:
        return sorted(conn.scalars(
            sa.select(monitor_run.c.as_of)
            .where(monitor_run.c.run_key.in_(sa.select(monitor_run_part.c.run_key)))))


@pytest.fixture
def four_runs(db_url, settings_for):
    """A warehouse with runs stored as of four dates, 60 days apart, the newest last."""
    engine = make_engine(db_url)
    end = build_sites(engine, sites=3, per_site=200, seed=5)
    settings = settings_for(db_url)
    dates = [end - timedelta(days=60 * k) for k in (3, 2, 1, 0)]
    for as_of in dates:
        run_monitor(settings, as_of)
    assert _stored_dates(engine) == dates
    return engine, settings, dates


def test_a_prune_removes_old_parts_and_keeps_records(four_runs):
    engine, settings, dates = four_runs
    with engine.connect() as conn:
        records = conn.execute(sa.select(sa.func.count()).select_from(monitor_run)).scalar()
        picture = set(conn.scalars(sa.select(chart_status.c.run_key).distinct()))
    with engine.begin() as conn:
        dry = retention.prune_runs(conn, 90, dry_run=True)
    assert _stored_dates(engine) == dates  # a dry run deletes nothing
    with engine.begin() as conn:
        counts = retention.prune_runs(conn, 90)
    assert (counts.runs_with_parts, counts.runs_pruned) == (4, 2)
    assert counts.cutoff == dates[-1] - timedelta(days=90)
    assert counts.bytes_pruned > 0 and counts == dry  # the dry run said exactly this
    assert _stored_dates(engine) == dates[2:]
    assert counts.oldest_kept == dates[2]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(monitor_run)).scalar() \
            == records  # every run's record stays
        kept = set(conn.scalars(sa.select(monitor_run_part.c.run_key).distinct()))
        assert picture <= kept  # the current picture's run keeps its parts
        profile = load_profile(settings.profile_path)
        assert runs.load_run(conn, profile, dates[0]) is None  # pruned: not stored any more
    with engine.begin() as conn:  # nothing older than 90 days is left to prune
        assert retention.prune_runs(conn, 90).runs_pruned == 0


def test_the_newest_run_is_kept_whatever_the_window(four_runs):
    engine, _, dates = four_runs
    with engine.begin() as conn:
        counts = retention.prune_runs(conn, 1)
    assert counts.runs_pruned == 3 and _stored_dates(engine) == dates[-1:]


def test_a_look_ahead_run_does_not_move_the_prune_window(four_runs):
    """The window is measured from the newest procedure, not from a run dated after it: a
    mistyped year would otherwise prune every recent run's parts (user audit)."""
    engine, settings, dates = four_runs
    run_monitor(settings, dates[-1] + timedelta(days=300))
    with engine.begin() as conn:
        counts = retention.prune_runs(conn, 90)
    assert counts.cutoff <= dates[-1] + timedelta(days=runs.LOOK_AHEAD_MAX_GRACE - 90)
    assert set(dates[2:]) <= set(_stored_dates(engine))


def test_a_pruned_date_asked_for_again_is_computed_and_stored(four_runs, capsys):
    engine, settings, dates = four_runs
    with engine.begin() as conn:
        retention.prune_runs(conn, 90)
    code = cli_main(["site", "S001", "--db", settings.db_url, "--as-of", dates[0].isoformat(),
                     "--json"])
    assert code == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["as_of"] == dates[0].isoformat()
    assert _stored_dates(engine) == [dates[0], *dates[2:]]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_command_prints_counts_and_refuses_bad_input(four_runs, tmp_path, capsys):
    _, settings, dates = four_runs
    assert cli_main(["runs", "prune", "--db", settings.db_url, "--keep-days", "90",
                     "--dry-run", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert (counts["runs_pruned"], counts["dry_run"]) == (2, True)
    assert cli_main(["runs", "prune", "--db", settings.db_url, "--keep-days", "90"]) == 0
    assert capsys.readouterr().out.startswith("pruned 2 of 4 stored runs dated before ")
    assert cli_main(["runs", "prune", "--db", settings.db_url, "--keep-days", "0"]) == 2
    assert "--keep-days 0" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'nowhere' / 'warehouse.db'}"
    assert cli_main(["runs", "prune", "--db", missing, "--keep-days", "90"]) == 3
    assert not (tmp_path / "nowhere").exists()  # never creates a warehouse


def test_a_run_the_current_picture_names_keeps_its_parts(four_runs):
    """Belt and braces: a run a current-picture table still names is never pruned, even when
    it is not the newest (the operator and device tables are stored in a transaction of
    their own, so they can name an older run than the site tables)."""
    engine, _, dates = four_runs
    with engine.begin() as conn:
        oldest = conn.scalar(sa.select(monitor_run.c.run_key)
                             .where(monitor_run.c.as_of == dates[0]))
        site = conn.scalar(sa.select(chart_status.c.site_id).limit(1))
        conn.execute(chart_status.update().where(chart_status.c.site_id == site)
                     .values(run_key=oldest))
        counts = retention.prune_runs(conn, 90)
    assert counts.runs_pruned == 1 and _stored_dates(engine) == [dates[0], *dates[2:]]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_window_longer_than_the_calendar_keeps_everything(four_runs):
    engine, _, dates = four_runs
    with engine.begin() as conn:
        counts = retention.prune_runs(conn, 10**9)
    assert counts.runs_pruned == 0 and _stored_dates(engine) == dates


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_scheduled_prune_keeps_the_configured_days_and_zero_keeps_everything(four_runs):
    """What the monitor DAG's ``prune_runs`` task calls: the window comes from settings."""
    engine, settings, dates = four_runs
    assert retention.prune_by_settings(replace(settings, run_keep_days=0)) is None
    assert _stored_dates(engine) == dates  # 0: pruning is off
    counts = retention.prune_by_settings(replace(settings, run_keep_days=30))  # not 90
    assert counts.runs_pruned == 3 and _stored_dates(engine) == dates[3:]


@pytest.mark.parametrize(("raw", "days"), [(None, 90), ("0", 0), ("30", 30), ("-1", None),
                                           ("ninety", None)])
def test_the_retention_window_is_read_from_the_environment(raw, days):
    env = {} if raw is None else {"KYPHOWATCH_RUN_KEEP_DAYS": raw}
    if days is None:
        with pytest.raises(ConfigurationError, match="KYPHOWATCH_RUN_KEEP_DAYS"):
            load_settings(env)
    else:
        assert load_settings(env).run_keep_days == days
