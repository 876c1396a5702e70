"""End to end with real Airflow: a file lands, an alert e-mail arrives exactly once.

Starts the Airflow 3 components as subprocesses -- ``scheduler`` (LocalExecutor),
``dag-processor``, ``triggerer`` (runs the landing watcher) and ``api-server`` with only the
execution API (Airflow 3 task processes report to it) -- against a fresh metadata database
on the local PostgreSQL, plus a fresh PostgreSQL warehouse and the SMTP sink. Extract files
from the simulator (one site drifting) are dropped into the landing directory; the test
measures the time until the safety e-mail arrives, then drops the same files again and
checks that no second e-mail follows. Component logs are printed when something fails.

Two variants: LocalExecutor, and CeleryExecutor with the machine's real Redis broker (a queue
of its own) and two Celery workers -- the compose topology without containers. In the
Celery variant one worker is SIGKILLed while it runs ``run_monitor``: the task is retried on
the other worker, and still exactly one e-mail arrives.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from datetime import date

import pytest
import sqlalchemy as sa

from pipelines.airflow_stack import (
    COMPONENTS,
    AirflowStack,
    airflow_env,
    create_database,
    drop_database,
    wait_for_port,
)
from pipelines.airflow_stack import drop_files as _drop_files
from pipelines.mailsink import MailSink, free_port
from pipelines.simulate import simulate
from tests.airflow_helpers import ancestors, redis_available, use_celery

pytestmark = [pytest.mark.airflow_e2e, pytest.mark.timeout(900)]

DRIFT_SITE = "S002"
EMAIL_DEADLINE_SECONDS = 360
QUIET_PERIOD_SECONDS = 90


def _kill_worker_mid_task(stack: AirflowStack, meta: sa.Engine, deadline: float) -> str:
    """SIGKILL the Celery worker running ``run_monitor`` (and its children); return its name."""
    workers = {p.pid: name for name, p in stack.processes.items() if name.startswith("worker")}
    while time.monotonic() < deadline:
        stack.check_alive()
        with meta.connect() as conn:
            pid = conn.execute(sa.text(
                "select pid from task_instance where dag_id = 'kyphowatch_monitor' "
                "and task_id = 'run_monitor' and state = 'running' and pid is not null"
            )).scalar()  # fmt: skip
        owner = next((workers[p] for p in ancestors(pid) if p in workers), None) if pid else None
        if owner:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            os.killpg(stack.processes[owner].pid, signal.SIGKILL)
            stack.processes.pop(owner).wait(10)
            return owner
        time.sleep(0.2)
    raise AssertionError("run_monitor never ran on a Celery worker: nothing to kill")


def _drift_emails(sink: MailSink) -> list:
    return [m for m in sink.messages() if DRIFT_SITE in m["Subject"] and "cement leak" in m["Subject"].lower()]


@pytest.mark.parametrize("executor", ["LocalExecutor", "CeleryExecutor"])
def test_landed_file_becomes_one_alert_email(pg_admin_url, tmp_path, capsys, executor):
    if executor == "CeleryExecutor" and not redis_available():
        pytest.skip("no Redis broker on 127.0.0.1:6379 for the CeleryExecutor variant")
    meta_name, meta_url = create_database(pg_admin_url, "kw_airflow")
    wh_name, wh_url = create_database(pg_admin_url, "kw_wh")
    meta_url = meta_url.replace("postgresql://", "postgresql+psycopg://", 1)
    extracts = tmp_path / "extracts"
    simulate(extracts, sites=3, start=date(2023, 1, 1), end=date(2023, 9, 30), seed=11,
             drifts=[f"{DRIFT_SITE}:cement_leak:4.0:2023-03-01"])  # fmt: skip
    files = sorted(extracts.glob("*.csv"))
    landing, logs = tmp_path / "landing", tmp_path / "logs"
    landing.mkdir()
    logs.mkdir()
    api_port = free_port()
    sink = MailSink(tmp_path / "mail").start()
    # 2 s / 1 s settle/poll and 1 s heartbeats keep the test short; bench_latency.py
    # measures the same stack at the defaults
    env = airflow_env(root=tmp_path, meta_url=meta_url, warehouse_url=wh_url, landing=landing,
                      smtp_host=sink.host, smtp_port=sink.port, api_port=api_port,
                      executor=executor, overrides={
                          "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
                          "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
                          "KYPHOWATCH_LANDING_MIN_AGE_SECONDS": "2",
                          "KYPHOWATCH_LANDING_POLL_SECONDS": "1",
                      })  # fmt: skip
    components = dict(COMPONENTS)
    if executor == "CeleryExecutor":
        # the machine's real Redis as broker, two workers, as with --scale worker=2
        use_celery(env, components, meta_url)
    stack = AirflowStack(env, logs, components)
    failed = True
    try:
        stack.migrate()
        stack.start()
        assert wait_for_port(api_port, time.monotonic() + 120), "api-server did not listen"

        # wait until the triggerer runs the landing watcher
        meta = sa.create_engine(meta_url)
        watching = stack.wait_until_watching(meta, time.monotonic() + 180)
        assert watching, "the landing watcher never started in the triggerer"
        time.sleep(2)

        landed = _drop_files(files, landing)
        arrived = None
        deadline = time.monotonic() + EMAIL_DEADLINE_SECONDS
        killed = None
        if executor == "CeleryExecutor":
            # a worker SIGKILLed mid-task: the task is retried on the other worker
            killed = _kill_worker_mid_task(stack, meta, time.monotonic() + 240)
            deadline += 240
        while time.monotonic() < deadline:
            stack.check_alive()
            if _drift_emails(sink):
                arrived = time.time()
                break
            time.sleep(0.5)
        assert arrived is not None, f"no alert e-mail for {DRIFT_SITE} within the deadline"
        latency = arrived - landed
        with capsys.disabled():
            print(f"\nlanding -> alert e-mail latency ({executor}): {latency:.1f} s"
                  + (f" ({killed} SIGKILLed during run_monitor)" if killed else ""))

        time.sleep(5)  # let the rest of that delivery run finish
        first_round = sink.messages()
        assert len(_drift_emails(sink)) == 1
        ids = [m["Message-ID"] for m in first_round]
        assert len(ids) == len(set(ids))
        if killed:
            with meta.connect() as conn:
                tries = conn.execute(sa.text(
                    "select state, try_number from task_instance "
                    "where dag_id = 'kyphowatch_monitor' and task_id = 'run_monitor'")).all()
            # the killed try was retried to success (later monitor runs may still be going)
            assert ("success", True) in [(state, n >= 2) for state, n in tries], tries
            assert "failed" not in {state for state, _ in tries}, tries

        # the same files again: loaded already, so no new signals and no new e-mail
        _drop_files(files, landing)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(landing.iterdir()):
            time.sleep(1)
        assert not any(landing.iterdir()), "the re-dropped files were not picked up"
        time.sleep(QUIET_PERIOD_SECONDS)
        stack.check_alive()
        assert len(sink.messages()) == len(first_round)
        assert len(_drift_emails(sink)) == 1
        meta.dispose()
        failed = False
    finally:
        stack.stop()
        sink.stop()
        if failed:
            stack.print_logs()
        drop_database(pg_admin_url, meta_name)
        drop_database(pg_admin_url, wh_name)
