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
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipelines.mailsink import MailSink, free_port
from pipelines.simulate import simulate

pytestmark = [pytest.mark.airflow_e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
COMPONENTS = {
    "api-server": ["api-server", "--apps", "execution", "--host", "127.0.0.1"],
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer"],
}
DRIFT_SITE = "S002"
EMAIL_DEADLINE_SECONDS = 360
QUIET_PERIOD_SECONDS = 90


def _create_db(admin_url: str, prefix: str) -> tuple[str, str]:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        # Identifiers cannot be bound parameters: quote with the dialect's own rules.
        conn.exec_driver_sql("CREATE DATABASE " + conn.dialect.identifier_preparer.quote(name))
    admin.dispose()
    url = sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    return name, url


def _drop_db(admin_url: str, name: str) -> None:
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(
            "DROP DATABASE IF EXISTS "
            + conn.dialect.identifier_preparer.quote(name) + " WITH (FORCE)"
        )
    admin.dispose()


def _wait_for_port(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.5)
    return False


def _drop_files(files: list[Path], landing: Path) -> float:
    """Copy under a temporary name, then rename: the watcher never sees half a file."""
    for path in files:
        temporary = landing / f"{path.name}.part"
        shutil.copyfile(path, temporary)
        temporary.replace(landing / path.name)
    return time.time()


class AirflowStack:
    """The Airflow components as subprocesses, each in its own process group."""

    def __init__(self, env: dict[str, str], log_dir: Path,
                 components: dict[str, list[str]] | None = None) -> None:  # fmt: skip
        self.env = env
        self.log_dir = log_dir
        self.components = components or COMPONENTS
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        for name, args in self.components.items():
            log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "airflow", *args], env=self.env, cwd=REPO,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}
        assert not dead, f"Airflow components exited: {dead}"

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)

    def print_logs(self, tail: int = 12_000) -> None:
        for path in sorted(self.log_dir.glob("*.log")):
            print(f"\n===== {path.name} (last {tail} chars) =====")
            print(path.read_bytes()[-tail:].decode("utf-8", "replace"))


def _ancestors(pid: int) -> list[int]:
    """Return the parent chain of ``pid`` (from /proc), nearest first."""
    chain = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain


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
        owner = next((workers[p] for p in _ancestors(pid) if p in workers), None) if pid else None
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


def _redis_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.mark.parametrize("executor", ["LocalExecutor", "CeleryExecutor"])
def test_landed_file_becomes_one_alert_email(pg_admin_url, tmp_path, capsys, executor):
    if executor == "CeleryExecutor" and not _redis_available():
        pytest.skip("no Redis broker on 127.0.0.1:6379 for the CeleryExecutor variant")
    meta_name, meta_url = _create_db(pg_admin_url, "kw_airflow")
    wh_name, wh_url = _create_db(pg_admin_url, "kw_wh")
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
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta_url,
        # psycopg 3 is async-capable; Airflow would otherwise look for asyncpg
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": meta_url,
        "AIRFLOW__CORE__EXECUTOR": executor,
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(DAGS)]),
        # configuration through Airflow connections and variables, as in production
        "AIRFLOW_CONN_KYPHOWATCH_WAREHOUSE": json.dumps(
            {"conn_type": "generic", "extra": {"url": wh_url}}),
        "AIRFLOW_CONN_KYPHOWATCH_SMTP": json.dumps(
            {"conn_type": "smtp", "host": sink.host, "port": sink.port}),
        "AIRFLOW_VAR_KYPHOWATCH_PSEUDONYM_KEY": secrets.token_hex(32),
        "AIRFLOW_VAR_KYPHOWATCH_ARCHIVE_DIR": str(tmp_path / "archive"),
        "AIRFLOW_VAR_KYPHOWATCH_REJECTED_DIR": str(tmp_path / "rejected"),
        "KYPHOWATCH_LANDING_DIR": str(landing),
        "KYPHOWATCH_LANDING_MIN_AGE_SECONDS": "2",
        "KYPHOWATCH_LANDING_POLL_SECONDS": "1",
        "KYPHOWATCH_ALERT_RECIPIENTS_SAFETY": "safety@example.org",
        "KYPHOWATCH_ALERT_RECIPIENTS_DATA": "data@example.org",
        "KYPHOWATCH_REPORT_DIR": str(tmp_path / "reports"),
    }  # fmt: skip
    env.pop("KYPHOWATCH_DB_URL", None)
    env.pop("KYPHOWATCH_DEMO", None)
    components = dict(COMPONENTS)
    if executor == "CeleryExecutor":
        # The machine's real Redis as broker; a queue of our own, so parallel runs on the
        # same Redis never take each other's tasks. Two workers, as with --scale worker=2.
        queue = f"kw_{uuid.uuid4().hex[:10]}"
        env.update({
            "AIRFLOW__CELERY__BROKER_URL": "redis://127.0.0.1:6379/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + meta_url.replace("+psycopg", "", 1),
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
            # notice a killed worker's task within seconds (default 300 s)
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        })  # fmt: skip
        for number in (1, 2):
            components[f"worker-{number}"] = [
                "celery", "worker", "--queues", queue, "--concurrency", "2", "--skip-serve-logs",
                "--celery-hostname", f"{queue}-{number}@%h",
            ]  # fmt: skip
    stack = AirflowStack(env, logs, components)
    failed = True
    try:
        migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env,
                                 cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
        stack.start()
        assert _wait_for_port(api_port, time.monotonic() + 120), "api-server did not listen"

        # wait until the triggerer runs the landing watcher
        meta = sa.create_engine(meta_url)
        deadline = time.monotonic() + 180
        watching = False
        while time.monotonic() < deadline and not watching:
            stack.check_alive()
            with meta.connect() as conn:
                watching = bool(conn.execute(sa.text(
                    "select count(*) from trigger where classpath like '%LandingFilesTrigger' "
                    "and triggerer_id is not null")).scalar())  # fmt: skip
            time.sleep(1)
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
        _drop_db(pg_admin_url, meta_name)
        _drop_db(pg_admin_url, wh_name)
