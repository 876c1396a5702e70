"""Airflow helpers for the tests: a migrated metadata DB for ``dag.test()`` and CLI subprocesses,
and pieces of the real-stack tests (Celery set-up, a mail sink that can hang mid-delivery)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from aiosmtpd.controller import Controller

from pipelines.mailsink import MailSink, _SaveHandler

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"


def migrated_airflow_env(home: Path, *, plugins: bool = False) -> dict[str, str]:
    """Return the environment for Airflow subprocesses, with a freshly migrated SQLite
    metadata database in ``home``.

    Each test module builds its own (module-scoped fixtures): connections or variables one
    module adds must not change which warehouse another module's DAG runs use.
    """
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(DAGS)]),
    }
    if plugins:
        env["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    return env


# --- the real stack: shared by tests/test_airflow_e2e.py and tests/test_airflow_faults.py ---


def redis_available() -> bool:
    """Return whether a Redis server answers PING on 127.0.0.1:6379."""
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def use_celery(env: dict[str, str], components: dict[str, list[str]], meta_url: str,
               workers: int = 2) -> None:  # fmt: skip
    """Switch a stack's environment and components to the CeleryExecutor, in place.

    The machine's real Redis is the broker; a queue of our own, so parallel runs on the same
    Redis never take each other's tasks. ``workers`` workers, as with ``--scale worker=N``.
    """
    queue = f"kw_{uuid.uuid4().hex[:10]}"
    env.update({
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": "redis://127.0.0.1:6379/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + meta_url.replace("+psycopg", "", 1),
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
        # notice a killed worker's task within seconds (default 300 s)
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    })  # fmt: skip
    for number in range(1, workers + 1):
        components[f"worker-{number}"] = [
            "celery", "worker", "--queues", queue, "--concurrency", "2", "--skip-serve-logs",
            "--celery-hostname", f"{queue}-{number}@%h",
        ]  # fmt: skip


def ancestors(pid: int) -> list[int]:
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


class _StallingHandler(_SaveHandler):
    """The sink's handler, made to hang once on a chosen recipient's next message.

    ``rcpt``: the server stops answering at that recipient's RCPT command -- before the
    message data, so a sender that dies there has not handed the message over. ``data``:
    the server stores the message, then does not answer the end-of-data line -- the sender
    has handed it over and dies before it learns the server took it.
    """

    def __init__(self, directory: Path, stall_at: str) -> None:
        super().__init__(directory)
        assert stall_at in ("rcpt", "data")
        self.stall_at = stall_at
        self.recipient: str | None = None
        self.stalled = threading.Event()
        self.released = threading.Event()

    async def _stall(self) -> None:
        self.recipient = None  # once per arming
        self.stalled.set()
        deadline = time.monotonic() + 300
        while not self.released.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:  # noqa: N802 - aiosmtpd hook name
        envelope.rcpt_tos.append(address)
        if self.stall_at == "rcpt" and address == self.recipient:
            await self._stall()
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd hook name
        reply = await super().handle_DATA(server, session, envelope)
        if self.stall_at == "data" and self.recipient in envelope.rcpt_tos:
            await self._stall()
        return reply


class StallingMailSink(MailSink):
    """The SMTP sink, able to hang once in the middle of a delivery (see _StallingHandler)."""

    def __init__(self, directory: Path, stall_at: str, port: int = 0) -> None:
        super().__init__(directory, port=port)
        self.handler = _StallingHandler(self.directory, stall_at)

    def start(self) -> StallingMailSink:
        """Start serving with the stalling handler; return self."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._controller = Controller(self.handler, hostname=self.host, port=self.port)
        self._controller.start()
        return self

    def arm(self, recipient: str) -> None:
        """Hang on the next message to ``recipient``."""
        self.handler.stalled.clear()
        self.handler.released.clear()
        self.handler.recipient = recipient

    def release(self) -> None:
        """Let a hanging session go on (its client is usually dead by then)."""
        self.handler.released.set()


class WebhookSink:
    """A real HTTP server that stores each JSON POST as a file (de-duplicates nothing)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server hook name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.json"
                (sink.directory / f".{name}").write_bytes(body)
                (sink.directory / f".{name}").replace(sink.directory / name)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def posts(self) -> list[dict]:
        """Return every JSON body received so far, oldest first."""
        return [json.loads(p.read_text()) for p in sorted(self.directory.glob("[!.]*.json"))]

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
