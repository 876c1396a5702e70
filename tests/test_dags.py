"""DAG integrity and in-process runs (``dag.test()``) against a SQLite warehouse.

Airflow reads its configuration when first imported, so everything Airflow runs in a
subprocess with its own ``AIRFLOW_HOME`` (a SQLite metadata database migrated once per
session) and ``DAGS_FOLDER`` set to ``dags/``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipelines.db import make_engine
from pipelines.mailsink import MailSink
from pipelines.schema import alert, alert_outbox, monitor_run, monitor_run_part, signal
from pipelines.simulate import simulate
from tests.airflow_helpers import migrated_airflow_env

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
DAG_IDS = ("kyphowatch_ingest", "kyphowatch_monitor", "kyphowatch_alerts")
HEAVY = ("pandas", "great_expectations", "statsmodels", "scipy", "sqlalchemy", "matplotlib")


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory):
    """Environment for Airflow subprocesses, with a freshly migrated SQLite metadata DB."""
    return migrated_airflow_env(tmp_path_factory.mktemp("airflow_home"), plugins=True)


def _python(env: dict, code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_dagbag_imports_cleanly_and_every_dag_follows_the_conventions(airflow_env):
    proc = _python(airflow_env, """
        import json
        from pathlib import Path
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag(dag_folder="dags")
        out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
        for dag_id, dag in bag.dags.items():
            out["dags"][dag_id] = {
                "file": Path(dag.fileloc).stem, "tags": sorted(dag.tags), "doc_md": bool(dag.doc_md),
                "tasks": {t.task_id: {"owner": t.owner, "retries": t.retries} for t in dag.tasks},
            }
        print(json.dumps(out))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["errors"] == {}
    assert sorted(found["dags"]) == sorted(DAG_IDS)
    for dag_id, info in found["dags"].items():
        assert info["file"] == dag_id
        assert "kyphowatch" in info["tags"] and info["doc_md"]
        for task_id, task in info["tasks"].items():
            assert task["owner"] == "kyphowatch", task_id
            assert task["retries"] >= 1, task_id


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_importing_a_dag_file_imports_nothing_heavy(airflow_env, dag_id):
    proc = _python(airflow_env, f"""
        import sys
        import airflow.sdk  # Airflow itself brings SQLAlchemy; measure what the DAG adds
        # Declaring any Asset makes Airflow load its providers' URI handlers (the pinned
        # postgres provider pulls in airflow.models.asset and SQLAlchemy): Airflow's cost.
        airflow.sdk.Asset(name="probe", uri="probe://baseline")
        before = set(sys.modules)
        sys.path.insert(0, "dags")
        import {dag_id}
        added = set(sys.modules) - before
        # The settings module (dataclasses and os only) is what the landing watcher needs
        # at parse time; everything else in pipelines/ belongs inside tasks.
        light = {{"pipelines", "pipelines.errors", "pipelines.settings"}}
        print(sorted(m for m in added if m.split(".")[0] in {HEAVY!r}
                     or (m.startswith("pipelines") and m not in light)))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_landing_trigger_is_an_event_trigger_and_fires_once_per_new_file(airflow_env, tmp_path):
    proc = _python(airflow_env, f"""
        import asyncio, sys
        sys.path.insert(0, "dags")
        from airflow.triggers.base import BaseEventTrigger
        from kyphowatch_triggers import LandingFilesTrigger
        trigger = LandingFilesTrigger(directory={str(tmp_path)!r}, min_age_seconds=0,
                                      poke_interval=0.05)
        assert isinstance(trigger, BaseEventTrigger)
        classpath, kwargs = trigger.serialize()
        assert LandingFilesTrigger(**kwargs).serialize() == (classpath, kwargs)

        async def main():
            events = []
            run = trigger.run()
            (trigger_dir := __import__("pathlib").Path({str(tmp_path)!r}))
            (trigger_dir / "procedures_20240101.csv").write_text("x")
            (trigger_dir / "procedures_20240102.csv.part").write_text("x")
            events.append((await run.__anext__()).payload)
            try:  # nothing new: no second event
                await asyncio.wait_for(run.__anext__(), 0.5)
                events.append("unexpected")
            except asyncio.TimeoutError:
                pass
            print(events)
        asyncio.run(main())
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'files': ['procedures_20240101.csv']" in proc.stdout
    assert "unexpected" not in proc.stdout


def test_landing_trigger_fires_when_a_file_settles_not_at_the_next_poll(airflow_env, tmp_path):
    # settle 1.5 s, poll 30 s: polling alone would announce the file only after 30 s
    proc = _python(airflow_env, f"""
        import asyncio, sys, time
        from pathlib import Path
        sys.path.insert(0, "dags")
        from kyphowatch_triggers import LandingFilesTrigger
        trigger = LandingFilesTrigger(directory={str(tmp_path)!r}, min_age_seconds=1.5,
                                      poke_interval=30)

        async def main():
            run = trigger.run()
            path = Path({str(tmp_path)!r}) / "procedures_20240101.csv"
            path.write_text("x")
            written = path.stat().st_mtime
            payload = (await asyncio.wait_for(run.__anext__(), 20)).payload
            print(payload["files"], round(time.time() - written, 2))
        asyncio.run(main())
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files, waited = proc.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert files == "['procedures_20240101.csv']"
    assert 1.5 <= float(waited) < 6.0  # settled first, then announced within seconds


@pytest.fixture
def drifting_extracts(tmp_path_factory):
    out = tmp_path_factory.mktemp("extracts")
    simulate(out, sites=3, start=date(2023, 1, 1), end=date(2023, 9, 30), seed=11,
             drifts=["S002:cement_leak:4.0:2023-03-01"])  # fmt: skip
    return sorted(out.glob("*.csv"))


def _run_dags(env: dict, *dag_ids: str, conf: dict | None = None) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(DAGS / "kyphowatch_testrun.py"), *dag_ids,
         "--conf", json.dumps(conf or {})],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, (runs, proc.stderr[-5000:])
    return runs


def test_the_three_dags_run_end_to_end_with_dag_test(airflow_env, tmp_path, drifting_extracts):
    db_url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    landing, archive, rejected = tmp_path / "landing", tmp_path / "archive", tmp_path / "rejected"
    landing.mkdir()
    for path in drifting_extracts:
        shutil.copy2(path, landing / path.name)
    (landing / "complications_bad.csv").write_text("not,an,extract\n")
    with MailSink(tmp_path / "mail") as sink:
        env = {
            **airflow_env,
            "KYPHOWATCH_DEMO": "1",
            "KYPHOWATCH_DB_URL": db_url,
            "KYPHOWATCH_LANDING_DIR": str(landing),
            "KYPHOWATCH_ARCHIVE_DIR": str(archive),
            "KYPHOWATCH_REJECTED_DIR": str(rejected),
            "KYPHOWATCH_LANDING_MIN_AGE_SECONDS": "0",
            "KYPHOWATCH_SMTP_URL": sink.url,
            "KYPHOWATCH_ALERT_RECIPIENTS_SAFETY": "safety@example.org",
            "KYPHOWATCH_ALERT_RECIPIENTS_DATA": "data@example.org",
            "KYPHOWATCH_REPORT_DIR": str(tmp_path / "reports"),
        }
        runs = _run_dags(env, *DAG_IDS)
        evaluations = runs.pop()["evaluations"]
        assert [r["state"] for r in runs] == ["success"] * 3, runs
        # one cycle evaluates the network once: the report and the alerts read the stored run
        assert evaluations == 1
        assert runs[0]["tasks"]["announce_procedures"] == "success"
        assert runs[1]["tasks"]["prune_runs"] == "success"  # retention: the newest run stays
        assert list(landing.iterdir()) == []
        assert (rejected / "complications_bad.csv.reason.txt").exists()
        assert len(list(archive.glob("*/*.csv"))) == len(drifting_extracts)

        engine = make_engine(db_url)
        with engine.connect() as conn:
            alerts = conn.execute(sa.select(alert.c.kind, alert.c.site_id, alert.c.metric)).all()
            outbox = conn.execute(sa.select(alert_outbox.c.status)).scalars().all()
        assert ("safety", "S002", "cement_leak") in alerts
        assert ("data_quality", None, None) in alerts  # the rejected file
        assert outbox and set(outbox) == {"sent"}
        subjects = [m["Subject"] for m in sink.messages()]
        assert len(subjects) == len(outbox)
        assert any("S002" in s and "cement leak" in s.lower() for s in subjects)
        # the monitor DAG published the evidence report and `latest` points at it
        latest = tmp_path / "reports" / "latest"
        assert latest.is_symlink() and (latest / "sites" / "S002.html").exists()
        latest_target = latest.resolve()
        # ... and the alerts DAG republished it, so the page the alert links to lists it
        assert runs[2]["tasks"]["refresh_report"] == "success"
        assert "raised: " in (latest / "sites" / "S002.html").read_text(encoding="utf-8")

        # a second ingest run with nothing new emits no warehouse Asset events
        again = _run_dags(env, "kyphowatch_ingest", "kyphowatch_alerts")
        assert again[0]["tasks"]["announce_procedures"] == "skipped"
        assert again[1]["tasks"]["refresh_report"] == "skipped"  # nothing new to show
        assert len(sink.messages()) == len(subjects)

        # rerunning the monitor for a past date twice gives the same result
        def snapshot():
            with engine.connect() as conn:
                runs = conn.execute(sa.select(monitor_run.c.run_key)
                                    .where(monitor_run.c.as_of == date(2023, 6, 30))).scalars().all()
                keys = conn.execute(sa.select(signal.c.signal_key, signal.c.active)
                                    .order_by(signal.c.signal_key)).all()
            return runs, keys

        backfill = _run_dags(env, "kyphowatch_monitor", conf={"as_of": "2023-06-30"})
        first = snapshot()
        # a past date prunes nothing: it would delete the run it just stored
        assert backfill[0]["tasks"]["prune_runs"] == "skipped"
        with engine.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(monitor_run_part)
                               .where(monitor_run_part.c.run_key.in_(first[0])))
        _run_dags(env, "kyphowatch_monitor", conf={"as_of": "2023-06-30"})
        assert snapshot() == first and len(first[0]) == 1
        # the backfill published its own dated report and left `latest` alone
        assert (tmp_path / "reports" / "2023-06-30" / "index.html").exists()
        assert latest.resolve() == latest_target
        engine.dispose()
