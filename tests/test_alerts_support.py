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
                  episode_start: date = date(2024, 1, 1), active: bool = True,
                  signal_date: date = date(2024, 3, 31)) -> str:
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
                category=category, episode_start=episode_start, signal_date=signal_date,
                observed=0.21, expected=0.105, n=120, ci_low=0.15, ci_high=0.28, statistic=5.3,
                threshold=4.5, p_value=0.0004, baseline=0.1056, citation="NICE HTG108 2.4.1",
                profile_name="htg108", profile_version="1.0.0", detail="{}", active=active,
                first_seen_run="r1", last_seen_run="r1",
            ))
    engine.dispose()
    return key


def level_detail(*, direction: str = "up", since: date = date(2024, 1, 1),
                 signal_keys: tuple[str, ...] = ("k1",)) -> dict:
    """Return a level_detail document as the monitor writes it (levels.grade)."""
    return {
        "direction": direction, "since": since.isoformat(), "first_evidence": since.isoformat(),
        "agree": 2, "methods_total": 5,
        "strongest": {"method": "funnel_12m", "method_label": "funnel (last 12 months)",
                      "p_value": 0.0004},
        "evidence": [
            {"method": "ra_cusum", "method_label": "risk-adjusted CUSUM",
             "detectable_on": since.isoformat(), "episode_start": "2023-11-02",
             "statistic": 5.3, "threshold": 4.5, "statistic_label": "CUSUM statistic",
             "statistic_is_rate": False, "observed": 25, "expected": 12.6, "n": 120,
             "rate": 25 / 120, "p_value": None, "signal_key": signal_keys[0]},
            {"method": "funnel_12m", "method_label": "funnel (last 12 months)",
             "detectable_on": "2024-03-31", "episode_start": "2024-03-01",
             "statistic": 0.21, "threshold": 0.18, "statistic_label": "rate",
             "statistic_is_rate": True, "observed": 42, "expected": 21.1, "n": 200,
             "rate": 0.21, "p_value": 0.0004, "signal_key": "k-funnel"},
        ],
        "recent": {"window_days": 365, "n": 200, "events": 42, "rate": 0.21},
        "guidance": {"low": 0.07, "high": 0.11, "baseline": 0.1056,
                     "citation": "NICE HTG108 section 2.4.1"},
        "case_mix": "explains little", "next_step": "Work down the investigation pyramid.",
        "signal_keys": list(signal_keys),
    }


def insert_level(db_url: str, *, site: str = "S003", metric: str = "cement_leak",
                 level: str = "alarm", as_of: date = date(2024, 3, 31),
                 profile: str = "htg108", **detail) -> None:
    """Write (or replace) the chart_status row of one site and metric at ``level``."""
    from pipelines.schema import chart_status

    row = {
        "profile_name": profile, "site_id": site, "metric": metric, "status": level,
        "reason": f"{level} for the test", "n": 600, "events": 90, "rate": 0.15,
        "ci_low": 0.12, "ci_high": 0.18, "expected": 66.0, "baseline": 0.1056,
        "cusum_chart": "ra_cusum_up", "cusum_value": 5.3, "cusum_threshold": 4.5,
        "funnel_position": "above", "signals_recent": 2, "signals_total": 3, "run_key": "r1",
        "as_of": as_of, "profile_version": "1.1.0",
        "level_since": detail.get("since", date(2024, 1, 1)) if level != "in_control" else None,
        "level_detail": json.dumps(level_detail(**detail) if level != "in_control" else {}),
    }
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(chart_status.delete().where(chart_status.c.profile_name == profile,
                                                 chart_status.c.site_id == site,
                                                 chart_status.c.metric == metric))
        conn.execute(chart_status.insert().values(**row))
    engine.dispose()


def insert_episode(db_url: str, *, site: str, metric: str = "cement_leak",
                   level: str = "alarm", start: date, end: date | None,
                   as_of: date = date(2024, 3, 31), profile: str = "htg108") -> None:
    """Write one level_episode row (a past episode when ``end`` is set)."""
    from pipelines.schema import level_episode

    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(level_episode.insert().values(
            profile_name=profile, site_id=site, metric=metric, direction="up", level=level,
            start_date=start, last_date=start, end_date=end, signals=1, run_key="r1",
            as_of=as_of, profile_version="1.1.0"))
    engine.dispose()


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
