"""Shared helpers (no tests here) for the alert tests: signal rows, a webhook recorder."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sqlalchemy as sa

from pipelines.db import make_engine
from pipelines.schema import file_ledger, signal

SAFETY_TO = "safety-team@example.org"
DATA_TO = "data-team@example.org"


def insert_signal(db_url: str, *, site: str = "S003", metric: str = "cement_leak",
                  method: str = "bernoulli_cusum", category: str = "safety",
                  episode_start: date = date(2024, 1, 1), active: bool = True) -> str:
    """Insert (or re-activate) one signal row and return its key."""
    key = hashlib.sha256(f"{site}|{metric}|{method}|{episode_start}".encode()).hexdigest()
    engine = make_engine(db_url)
    with engine.begin() as conn:
        exists = conn.scalar(sa.select(sa.func.count()).where(signal.c.signal_key == key))
        if exists:
            conn.execute(signal.update().where(signal.c.signal_key == key).values(active=active))
        else:
            conn.execute(signal.insert().values(
                signal_key=key, site_id=site, metric=metric, method=method, direction="up",
                category=category, episode_start=episode_start, signal_date=date(2024, 3, 31),
                observed=0.21, expected=0.105, n=120, ci_low=0.15, ci_high=0.28, statistic=5.3,
                threshold=4.5, p_value=0.0004, baseline=0.1056, citation="NICE HTG108 2.4.1",
                profile_name="htg108", profile_version="1.0.0", detail="{}", active=active,
                first_seen_run="r1", last_seen_run="r1",
            ))
    engine.dispose()
    return key


def set_signal_active(db_url: str, key: str, active: bool) -> None:
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(signal.update().where(signal.c.signal_key == key).values(active=active))
    engine.dispose()


def insert_ledger(db_url: str, *, name: str, status: str, reason: str | None = None,
                  rows_read: int = 100, quarantined: int = 0) -> str:
    checksum = hashlib.sha256(name.encode()).hexdigest()
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(file_ledger.insert().values(
            source_checksum=checksum, file_name=name, kind="procedures", extract_ts="20240101T000000",
            status=status, reason=reason, rows_read=rows_read, rows_quarantined=quarantined,
            quarantine_reasons=json.dumps({"bad_date": quarantined}) if quarantined else None,
            processed_at=datetime.now(UTC),
        ))
    engine.dispose()
    return checksum


class WebhookRecorder:
    """A real HTTP server in a thread that records every POST (headers and JSON body)."""

    def __init__(self, status: int = 200) -> None:
        self.requests: list[dict] = []
        self.status = status
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server hook name
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if recorder.status == 200:
                    recorder.requests.append({"headers": dict(self.headers),
                                              "body": json.loads(body)})
                self.send_response(recorder.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> WebhookRecorder:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def keys(self) -> list[str]:
        return [r["headers"]["Idempotency-Key"] for r in self.requests]
