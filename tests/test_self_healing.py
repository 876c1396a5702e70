"""Production heals itself: nothing stranded, failures reach people once, watchdog by the clock.

Real parts: the DAGs run with ``dag.test()`` in subprocesses (SQLite metadata DB), real
extract files, a real SMTP sink, a real SQLite warehouse; the "unreachable warehouse" is a
PostgreSQL URL on a closed port.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipelines.alerts import deliver_outbox, list_alerts
from pipelines.alerts.failures import TaskFailure, report_failure, report_recovery, summarise_error
from pipelines.alerts.watchdog import HEARTBEAT_KEY, outage_key, run_watchdog
from pipelines.db import make_engine
from pipelines.ingest import ingest_paths
from pipelines.landing import unmonitored_kinds
from pipelines.mailsink import MailSink, free_port, message_files
from pipelines.schema import alert, alert_audit, alert_outbox, file_ledger
from pipelines.simulate import simulate
from pipelines.surveillance.engine import run_monitor
from tests.airflow_helpers import WebhookSink, migrated_airflow_env

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
UNREACHABLE = "postgresql+psycopg://kyphowatch@127.0.0.1:{port}/warehouse"


@pytest.fixture(scope="module")
def extracts(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    simulate(out, sites=3, start=date(2023, 1, 1), end=date(2023, 4, 30), seed=7)
    return sorted(out.glob("*.csv"))


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory):
    """Environment for Airflow subprocesses, with a freshly migrated SQLite metadata DB."""
    return migrated_airflow_env(tmp_path_factory.mktemp("airflow_home"))


def _run_dag(env: dict, dag_id: str, *, no_retries: bool = True) -> dict:
    args = [sys.executable, str(DAGS / "kyphowatch_testrun.py"), dag_id]
    if no_retries:
        args.append("--no-retries")
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    runs = [line for line in lines if "dag_id" in line]  # the last line counts evaluations
    assert runs, proc.stderr[-5000:]
    return runs[-1]


def _kyphowatch_env(airflow_env: dict, tmp_path: Path, db_url: str, smtp_url: str) -> dict:
    return {
        **airflow_env,
        "KYPHOWATCH_DEMO": "1",
        "KYPHOWATCH_DB_URL": db_url,
        "KYPHOWATCH_LANDING_DIR": str(tmp_path / "landing"),
        "KYPHOWATCH_ARCHIVE_DIR": str(tmp_path / "archive"),
        "KYPHOWATCH_REJECTED_DIR": str(tmp_path / "rejected"),
        "KYPHOWATCH_LANDING_MIN_AGE_SECONDS": "0",
        "KYPHOWATCH_SMTP_URL": smtp_url,
        "KYPHOWATCH_ALERT_RECIPIENTS_SAFETY": "safety@example.org",
        "KYPHOWATCH_ALERT_RECIPIENTS_DATA": "data@example.org",
        "KYPHOWATCH_REPORT_DIR": str(tmp_path / "reports"),
    }


def _drop(files, landing: Path) -> None:
    landing.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, landing / path.name)


# --- announce follows the warehouse ----------------------------------------------------


def test_unmonitored_kinds_follow_the_warehouse_not_the_current_try(sqlite_url, settings_for,
                                                                     extracts):  # fmt: skip
    settings = settings_for(sqlite_url)
    ingest_paths(settings, extracts)
    assert unmonitored_kinds(settings) == ["complications", "procedures"]
    # a retry sees only duplicates, yet the warehouse still holds unmonitored rows
    assert {f.status for f in ingest_paths(settings, extracts).files} == {"duplicate"}
    assert unmonitored_kinds(settings) == ["complications", "procedures"]
    run_monitor(settings)
    assert unmonitored_kinds(settings) == []


def test_killed_ingest_is_healed_by_the_next_try(airflow_env, tmp_path, extracts):
    db_url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    with MailSink(tmp_path / "mail") as sink:
        env = _kyphowatch_env(airflow_env, tmp_path, db_url, sink.url)
        landing = tmp_path / "landing"
        _drop(extracts, landing)
        # the killed try: files loaded, then the process died before filing and announcing
        from pipelines.settings import load_settings

        loaded = ingest_paths(load_settings(env), sorted(landing.glob("*.csv")))
        assert {f.status for f in loaded.files} == {"loaded"}
        retry = _run_dag(env, "kyphowatch_ingest")
        assert retry["state"] == "success", retry
        assert retry["tasks"]["announce_procedures"] == "success"
        assert retry["tasks"]["announce_complications"] == "success"
        assert list(landing.iterdir()) == []
        assert len(list((tmp_path / "archive").glob("*/*.csv"))) == len(extracts)


# --- failures reach people, once per episode --------------------------------------------


def _failure_alerts(db_url: str) -> list[dict]:
    return [a for a in list_alerts_for(db_url) if a["dedupe_key"].startswith("failure:")]


def list_alerts_for(db_url: str) -> list[dict]:
    engine = make_engine(db_url)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(alert).order_by(alert.c.created_at))
                .mappings()]  # fmt: skip
    engine.dispose()
    return rows


@pytest.mark.slow  # eight dag.test() runs: about 4 minutes on a shared 2-core machine
def test_failed_tasks_notify_once_per_episode_and_files_are_picked_up_after_the_fix(
        airflow_env, tmp_path, extracts):  # fmt: skip
    good_url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    bad_url = UNREACHABLE.format(port=free_port())
    landing = tmp_path / "landing"
    procedures = [path for path in extracts if path.name.startswith("procedures")]
    _drop(procedures[:2], landing)
    with MailSink(tmp_path / "mail") as sink:
        # 1. warehouse unreachable, twice: one e-mail (sent directly, no outbox possible)
        down = _kyphowatch_env(airflow_env, tmp_path, bad_url, sink.url)
        for _ in range(2):
            run = _run_dag(down, "kyphowatch_ingest")
            assert run["state"] == "failed" and run["tasks"]["ingest_landing"] == "failed", run
        subjects = [m["Subject"] for m in sink.messages()]
        assert len(subjects) == 1, subjects
        assert "kyphowatch_ingest.ingest_landing" in subjects[0]
        body = sink.messages()[0].get_payload(decode=False)
        assert "kyphowatch@" not in str(body)  # no credentials of the URL in the message
        assert len(list(landing.iterdir())) == 2  # nothing lost

        # 2. fixed: the next run (the watcher re-announces waiting files) loads and announces
        up = _kyphowatch_env(airflow_env, tmp_path, good_url, sink.url)
        run = _run_dag(up, "kyphowatch_ingest")
        assert run["state"] == "success", run
        assert run["tasks"]["announce_procedures"] == "success"
        assert list(landing.iterdir()) == []
        assert not (tmp_path / "reports" / ".failure-notices").exists() or not any(
            (tmp_path / "reports" / ".failure-notices").iterdir())

        # 3. a failure with the warehouse up goes through the outbox, once per episode
        blocked = tmp_path / "archive_blocked"
        blocked.write_text("a file where the archive directory should be")
        broken = {**up, "KYPHOWATCH_ARCHIVE_DIR": str(blocked / "sub")}
        before = len(sink.messages())
        for _ in range(2):
            _drop(procedures[2:3], landing)
            run = _run_dag(broken, "kyphowatch_ingest")
            assert run["tasks"]["file_away"] == "failed", run
        failures = _failure_alerts(good_url)
        assert [(a["dedupe_key"], a["episode"], a["state"]) for a in failures] == [
            ("failure:kyphowatch_ingest:file_away", 1, "open")]
        new_mail = [m["Subject"] for m in sink.messages()[before:]]
        assert sum("file_away" in s for s in new_mail) == 1, new_mail

        # 4. the next success resolves it; a later failure is episode 2, one more e-mail
        run = _run_dag(up, "kyphowatch_ingest")
        assert run["state"] == "success", run
        assert [a["state"] for a in _failure_alerts(good_url)] == ["resolved"]
        _drop(procedures[3:4], landing)
        run = _run_dag(broken, "kyphowatch_ingest")
        assert [(a["episode"], a["state"]) for a in _failure_alerts(good_url)] == [
            (1, "resolved"), (2, "open")]
        assert sum("file_away" in m["Subject"] for m in sink.messages()) == 2


def test_rejected_file_alert_leaves_with_the_ingest_run(airflow_env, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "procedures_bad.csv").write_text("not,an,extract\n")
    with MailSink(tmp_path / "mail") as sink:
        run = _run_dag(_kyphowatch_env(airflow_env, tmp_path, db_url, sink.url),
                       "kyphowatch_ingest")  # fmt: skip
        assert run["state"] == "success", run
        assert run["tasks"]["data_quality_alerts"] == "success"
        subjects = [m["Subject"] for m in sink.messages()]
        mails = message_files(tmp_path / "mail")
    assert len(subjects) == 1 and "procedures_bad.csv" in subjects[0], subjects
    # from the file being set aside to the e-mail arriving, within the same ingest run
    moved = (tmp_path / "rejected" / "procedures_bad.csv.reason.txt").stat().st_mtime
    latency = mails[0].stat().st_mtime - moved
    print(f"rejected file -> data-quality e-mail: {latency:.1f} s")
    assert 0 <= latency < 60


# --- the pieces, without Airflow ---------------------------------------------------------


def test_error_summary_keeps_the_first_line_and_drops_credentials():
    error = RuntimeError("connection to postgresql+psycopg://loader:s3cret@db:5432/w failed\n"
                         "[SQL: INSERT INTO procedure VALUES (?)]")  # fmt: skip
    text = summarise_error(error)
    assert text == "RuntimeError: connection to postgresql+psycopg://***@db:5432/w failed"
    assert summarise_error(None).startswith("no exception recorded")


def test_recovery_closes_the_episode_and_a_new_failure_opens_the_next(sqlite_url, settings_for,
                                                                      tmp_path):  # fmt: skip
    with MailSink(tmp_path / "mail") as sink:
        settings = settings_for(sqlite_url, smtp_url=sink.url, recipients_data=("d@example.org",))
        failure = TaskFailure("kyphowatch_monitor", "run_monitor", "r1", 3, "boom")
        assert report_failure(settings, failure)["raised"]
        assert report_failure(settings, failure)["raised"] is None  # same episode
        assert len(sink.messages()) == 1
        assert report_recovery(settings, "kyphowatch_monitor", "run_monitor")
        assert not report_recovery(settings, "kyphowatch_monitor", "run_monitor")
        assert report_failure(settings, failure)["raised"]
        assert len(sink.messages()) == 2
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        reasons = conn.execute(sa.select(alert_audit.c.reason)).scalars().all()
    engine.dispose()
    assert "condition cleared" in reasons and any(r.startswith("still true") for r in reasons)


def _ledger_row(db_url: str, processed_at: datetime) -> None:
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(file_ledger.insert().values(
            source_checksum="a" * 64, file_name="procedures_1.csv", kind="procedures",
            extract_ts="20240101T000000", status="loaded", processed_at=processed_at))  # fmt: skip
    engine.dispose()


def test_heartbeat_fires_by_the_wall_clock_once_and_clears(sqlite_url, settings_for, tmp_path):
    now = datetime(2024, 3, 10, 12, 0, tzinfo=UTC)
    _ledger_row(sqlite_url, now - timedelta(hours=80))
    with MailSink(tmp_path / "mail") as sink:
        settings = settings_for(sqlite_url, smtp_url=sink.url, recipients_data=("d@example.org",),
                                heartbeat_hours=72.0)  # fmt: skip
        assert run_watchdog(settings, now).raised == [HEARTBEAT_KEY]
        assert run_watchdog(settings, now + timedelta(hours=1)).raised == []
        deliver_outbox(settings)
        assert [m["Subject"].strip() for m in sink.messages()] == [
            "[kyphowatch] data quality: No extracts received from any site for 80 hours"]
        # 71 hours after the last file it is not silent: the alert closes by itself
        assert run_watchdog(settings, now - timedelta(hours=9)).cleared == [HEARTBEAT_KEY]
    assert [a["state"] for a in list_alerts(settings)] == ["resolved"]


def test_smtp_outage_is_reported_on_the_webhook(sqlite_url, settings_for, tmp_path):
    from pipelines.alerts.failures import failure_condition
    from pipelines.alerts.lifecycle import _create, warehouse

    hook_dir = tmp_path / "hook"
    hook = WebhookSink(hook_dir)
    dead_smtp = f"smtp://127.0.0.1:{free_port()}"
    try:
        settings = settings_for(sqlite_url, smtp_url=dead_smtp, webhook_url=hook.url,
                                recipients_data=("d@example.org",),
                                channel_outage_minutes=30.0)  # fmt: skip
        engine = warehouse(settings)
        start = datetime.now(UTC) - timedelta(minutes=45)
        condition = failure_condition(TaskFailure("d", "t", "r", 1, "x"))
        _create(engine, settings, condition, 1, start)
        engine.dispose()
        result = deliver_outbox(settings)  # SMTP refuses the connection: email row waits
        assert [r[1] for r in result.retrying] == ["email"] and len(hook.posts()) == 1
        raised = run_watchdog(settings)
        assert raised.raised == [outage_key("email")]
        deliver_outbox(settings)
        posts = hook.posts()
        assert len(posts) == 2 and "email has failed to deliver" in posts[-1]["title"]
        engine = make_engine(sqlite_url)
        with engine.connect() as conn:
            channels = conn.execute(
                sa.select(alert_outbox.c.channel).join(alert, alert.c.alert_id
                                                       == alert_outbox.c.alert_id)
                .where(alert.c.dedupe_key == outage_key("email"))).scalars().all()  # fmt: skip
        engine.dispose()
        assert channels == ["webhook"]  # never queued on the channel that is down
    finally:
        hook.close()


def test_watcher_announces_again_files_still_waiting(airflow_env, tmp_path):
    code = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        sys.path.insert(0, "dags")
        from kyphowatch_triggers import LandingFilesTrigger
        trigger = LandingFilesTrigger(directory={str(tmp_path)!r}, min_age_seconds=0,
                                      poke_interval=0.05, reannounce_seconds=0.5)

        async def main():
            run = trigger.run()
            (Path({str(tmp_path)!r}) / "procedures_20240101.csv").write_text("x")
            first = (await run.__anext__()).payload
            second = (await asyncio.wait_for(run.__anext__(), 5)).payload
            (Path({str(tmp_path)!r}) / "procedures_20240101.csv").unlink()
            try:
                await asyncio.wait_for(run.__anext__(), 1.0)
                third = "unexpected"
            except asyncio.TimeoutError:
                third = None
            print(first, second, third)
        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=airflow_env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip().splitlines()[-1]
    assert "'files': ['procedures_20240101.csv'], 'waiting': []" in out
    assert "'files': [], 'waiting': ['procedures_20240101.csv']" in out
    assert out.endswith("None")
