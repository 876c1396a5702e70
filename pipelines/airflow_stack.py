"""A real Airflow 3 stack as subprocesses, for the end-to-end test and the latency benchmark.

``tests/test_airflow_e2e.py`` and ``benchmarks/bench_latency.py`` both need the production
topology without containers: ``scheduler``, ``dag-processor``, ``triggerer`` (runs the
landing watcher) and ``api-server`` with only the execution API (Airflow 3 task processes
report to it), on a fresh PostgreSQL metadata database, with a fresh PostgreSQL warehouse
and the SMTP sink. This module holds that start-up once, so the benchmark measures exactly
the stack the test proves. Like :mod:`pipelines.mailsink` it is tooling, not pipeline logic,
and it imports nothing from Airflow: the components run as ``python -m airflow`` children.
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
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
COMPONENTS = {
    "api-server": ["api-server", "--apps", "execution", "--host", "127.0.0.1"],
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer"],
}


def create_database(admin_url: str, prefix: str) -> tuple[str, str]:
    """Create a fresh database named ``<prefix>_<random>``; return its name and URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        # Identifiers cannot be bound parameters: quote with the dialect's own rules.
        conn.exec_driver_sql("CREATE DATABASE " + conn.dialect.identifier_preparer.quote(name))
    admin.dispose()
    url = sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    return name, url


def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` (forcing its connections closed) if it exists."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(
            "DROP DATABASE IF EXISTS "
            + conn.dialect.identifier_preparer.quote(name) + " WITH (FORCE)"
        )
    admin.dispose()


def wait_for_port(port: int, deadline: float) -> bool:
    """Return True once something listens on ``127.0.0.1:port``, False at ``deadline``."""
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.5)
    return False


def drop_files(files: list[Path], landing: Path) -> float:
    """Copy under a temporary name, then rename: the watcher never sees half a file.

    Return the wall-clock time (epoch seconds) at which the last file landed.
    """
    for path in files:
        temporary = landing / f"{path.name}.part"
        shutil.copyfile(path, temporary)
        temporary.replace(landing / path.name)
    return time.time()


def airflow_env(*, root: Path, meta_url: str, warehouse_url: str, landing: Path,
                smtp_host: str, smtp_port: int, api_port: int,
                executor: str = "LocalExecutor",
                overrides: dict[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """Return the environment of every component: configuration as in production.

    Only what the deployment sets is set here (connections, variables, directories,
    recipients); everything else -- settle and poll times, scheduler intervals -- is left
    at its default unless ``overrides`` sets it. ``meta_url`` must name the psycopg driver.
    """
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(root / "airflow"),
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
        "PYTHONPATH": os.pathsep.join([str(REPO), str(DAGS)]),
        # configuration through Airflow connections and variables, as in production
        "AIRFLOW_CONN_KYPHOWATCH_WAREHOUSE": json.dumps(
            {"conn_type": "generic", "extra": {"url": warehouse_url}}),
        "AIRFLOW_CONN_KYPHOWATCH_SMTP": json.dumps(
            {"conn_type": "smtp", "host": smtp_host, "port": smtp_port}),
        "AIRFLOW_VAR_KYPHOWATCH_PSEUDONYM_KEY": secrets.token_hex(32),
        "AIRFLOW_VAR_KYPHOWATCH_ARCHIVE_DIR": str(root / "archive"),
        "AIRFLOW_VAR_KYPHOWATCH_REJECTED_DIR": str(root / "rejected"),
        "KYPHOWATCH_LANDING_DIR": str(landing),
        "KYPHOWATCH_ALERT_RECIPIENTS_SAFETY": "safety@example.org",
        "KYPHOWATCH_ALERT_RECIPIENTS_DATA": "data@example.org",
        "KYPHOWATCH_REPORT_DIR": str(root / "reports"),
    }  # fmt: skip
    # settings of the caller's shell must not leak into the measured configuration
    for name in [n for n in env if n.startswith("KYPHOWATCH_LANDING_") and n != "KYPHOWATCH_LANDING_DIR"]:
        env.pop(name)
    env.pop("KYPHOWATCH_DB_URL", None)
    env.pop("KYPHOWATCH_DEMO", None)
    env.update(overrides or {})
    return env


def _children(pid: int) -> list[int]:
    """Return the direct children of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    """Return every live descendant of ``pid``, parents before children."""
    found, frontier = [], [pid]
    while frontier:
        children = [child for parent in frontier for child in _children(parent)]
        found.extend(children)
        frontier = children
    return found


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and all its descendants; return the pids signalled.

    The process is stopped first (SIGSTOP), so it cannot start children while its tree is
    collected, then everything gets SIGKILL in the same instant.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    tree = [pid, *descendants(pid)]
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    return tree


class AirflowStack:
    """The Airflow components as subprocesses, each in its own process group."""

    def __init__(self, env: dict[str, str], log_dir: Path,
                 components: dict[str, list[str]] | None = None) -> None:  # fmt: skip
        self.env = env
        self.log_dir = log_dir
        self.components = components or COMPONENTS
        self.processes: dict[str, subprocess.Popen] = {}

    def migrate(self, timeout: float = 300) -> None:
        """Run ``airflow db migrate``; raise RuntimeError with its output if it fails."""
        done = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=self.env,
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError("airflow db migrate failed:\n"
                               + done.stdout[-3000:] + done.stderr[-3000:])  # fmt: skip

    def start(self) -> None:
        """Start every component, logging to ``<log_dir>/<name>.log``."""
        for name in self.components:
            self.start_component(name)

    def start_component(self, name: str) -> None:
        """Start (or restart) one component; its log is appended to, so earlier lives stay."""
        if name in self.processes and self.processes[name].poll() is None:
            raise RuntimeError(f"{name} is already running")
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        log.write(f"\n===== {name} started at {time.time():.1f} =====\n".encode())
        log.flush()
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "airflow", *self.components[name]], env=self.env, cwd=REPO,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def kill_component(self, name: str) -> list[int]:
        """SIGKILL one component and every process it started; return the pids killed.

        As when its container or machine dies: the whole process tree goes at once, task
        processes included (the task supervisor puts each task in a process group of its
        own, so killing the component's group alone would leave them running).
        """
        process = self.processes.pop(name)
        killed = kill_tree(process.pid)
        process.wait(10)
        return killed

    def stop_component(self, name: str, timeout: float = 30) -> int:
        """Stop one component as a service manager would (SIGTERM, then SIGKILL); return its code."""
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            return process.wait(10)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run one ``airflow`` CLI command with the stack's environment; raise if it fails."""
        done = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n"
                               + done.stdout[-3000:] + done.stderr[-3000:])  # fmt: skip
        return done

    def check_alive(self) -> None:
        """Raise AssertionError naming any component that has exited."""
        dead = {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}
        assert not dead, f"Airflow components exited: {dead}"

    def wait_until_watching(self, meta: sa.Engine, deadline: float) -> bool:
        """Return True once the triggerer runs the landing watcher, False at ``deadline``."""
        while time.monotonic() < deadline:
            self.check_alive()
            with meta.connect() as conn:
                watching = bool(conn.execute(sa.text(
                    "select count(*) from trigger where classpath like '%LandingFilesTrigger' "
                    "and triggerer_id is not null")).scalar())  # fmt: skip
            if watching:
                return True
            time.sleep(1)
        return False

    def stop(self) -> None:
        """SIGTERM every component's process group; SIGKILL what is left after 20 s."""
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
        """Print the end of every component's log."""
        for path in sorted(self.log_dir.glob("*.log")):
            print(f"\n===== {path.name} (last {tail} chars) =====")
            print(path.read_bytes()[-tail:].decode("utf-8", "replace"))
