"""Tell the data-quality recipients when a pipeline task fails -- once per failure episode.

The Airflow notifiers in ``dags/kyphowatch_notify.py`` call :func:`report_failure` when a
task has failed for good (after its retries) and :func:`report_recovery` when it succeeds.
A *failure episode* of a task runs from its first final failure to its next success: the
first failure raises a data-quality alert (dedupe key ``failure:<dag_id>:<task_id>``) that
goes through the ordinary outbox and is delivered at once; further failures of the same
task while that alert is open only add an audit row ("still true: ..."), so an ingest that
fails every few minutes while the warehouse is down sends one message, not one per run. The
next success resolves the alert (audit "condition cleared"), and a later failure starts
episode 2.

When the warehouse itself is what failed, the outbox cannot be written: the message is
then sent straight to the configured channels, and a marker file
``<report dir>/.failure-notices/<key>`` (the report directory is on the volume every
worker shares) stands in for the open alert, so repeats of the episode send nothing until the
task succeeds again and :func:`report_recovery` removes the marker.

Error texts are cut to their first line and stripped of credentials in URLs; the SQL and
bound parameters that SQLAlchemy appends on later lines never leave the task log.
This module does not import Airflow.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pipelines.alerts.lifecycle import (
    DATA_QUALITY,
    RESOLVED,
    Condition,
    alert_id_for,
    channels_for,
    message_id_for,
    warehouse,
)
from pipelines.alerts.watchdog import clear, raise_once
from pipelines.db import make_engine
from pipelines.errors import ExternalSystemError
from pipelines.schema import alert
from pipelines.settings import Settings

log = logging.getLogger(__name__)

ERROR_CHARS = 300
_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s@]+@", re.IGNORECASE)


@dataclass(frozen=True)
class TaskFailure:
    """One task that failed for good, as the notifier saw it."""

    dag_id: str
    task_id: str
    run_id: str
    try_number: int
    error: str
    log_url: str | None = None


def failure_key(dag_id: str, task_id: str) -> str:
    """Return the dedupe key of a task's failure alerts."""
    return f"failure:{dag_id}:{task_id}"


def summarise_error(error: BaseException | str | None) -> str:
    """Return the first line of an error, without URL credentials, at most ERROR_CHARS long."""
    if error is None:
        return "no exception recorded (task killed or timed out?)"
    text = str(error) if isinstance(error, str) else f"{type(error).__name__}: {error}"
    first = (text.strip().splitlines() or [""])[0]
    return _CREDENTIALS.sub(r"\g<scheme>***@", first)[:ERROR_CHARS]


def failure_condition(failure: TaskFailure) -> Condition:
    """Return the data-quality condition that describes ``failure``."""
    return Condition(
        kind=DATA_QUALITY,
        dedupe_key=failure_key(failure.dag_id, failure.task_id),
        title=f"Pipeline task failed: {failure.dag_id}.{failure.task_id}",
        payload={
            "type": "task_failure",
            "dag_id": failure.dag_id,
            "task_id": failure.task_id,
            "run_id": failure.run_id,
            "try_number": failure.try_number,
            "error": summarise_error(failure.error),
            "where": failure.log_url or f"Airflow UI: DAG {failure.dag_id}, run {failure.run_id}",
        },
    )


def report_failure(settings: Settings, failure: TaskFailure, *,
                   now: datetime | None = None) -> dict[str, Any]:  # fmt: skip
    """Raise (once per episode) and deliver the failure alert; return what happened.

    Never raises: a notifier that fails would hide the failure it reports. What could not
    be done is logged and returned.
    """
    from pipelines.alerts.outbox import deliver_outbox

    now = now or datetime.now(UTC)
    condition = failure_condition(failure)
    try:
        engine = warehouse(settings)
        try:
            alert_id = raise_once(engine, settings, condition, now)
        finally:
            engine.dispose()
    except (sa.exc.SQLAlchemyError, ExternalSystemError) as exc:
        # open_warehouse reports an unreachable warehouse as ExternalSystemError
        log.error("warehouse unavailable (%s): sending the failure notice directly",
                  summarise_error(exc))  # fmt: skip
        return {"raised": None, "direct": _send_direct(settings, failure, condition)}
    if alert_id is None:
        log.info("failure of %s.%s is part of an open episode: nothing sent",
                 failure.dag_id, failure.task_id)  # fmt: skip
        return {"raised": None, "delivered": []}
    log.warning("raised failure alert %s for %s.%s", alert_id[:12], failure.dag_id,
                failure.task_id)  # fmt: skip
    try:
        delivered = deliver_outbox(settings).sent
    except Exception as exc:  # noqa: BLE001 -- the alert stays queued for the next alerts run
        log.error("failure alert %s queued, delivery failed: %s", alert_id[:12],
                  summarise_error(exc))  # fmt: skip
        delivered = []
    return {"raised": alert_id, "delivered": [list(item) for item in delivered]}


def _send_direct(settings: Settings, failure: TaskFailure, condition: Condition) -> list[str]:
    """Send the failure notice to every configured channel without the warehouse."""
    from pipelines.alerts.channels import make_channels
    from pipelines.alerts.render import render

    marker = _marker(settings, condition.dedupe_key)
    if marker.exists():
        log.info("direct failure notice for %s already sent in this episode", condition.dedupe_key)
        return []
    alert_id = alert_id_for(f"{condition.dedupe_key}:{failure.run_id}", 1)
    row = {"alert_id": alert_id, "kind": condition.kind, "title": condition.title,
           "episode": 1, "payload": {"kind": condition.kind, **condition.payload}}  # fmt: skip
    message = render(row, synthetic=settings.demo)
    wanted = set(channels_for(settings, condition.kind))
    sent = []
    channels = make_channels(settings)
    try:
        for name, channel in channels.items():
            if name not in wanted:
                continue
            try:
                channel.send(message, message_id_for(alert_id, name), settings.recipients_data,
                             lambda: None)  # fmt: skip
                sent.append(name)
            except Exception as exc:  # noqa: BLE001 -- try the other channel regardless
                log.error("direct failure notice via %s failed: %s", name, summarise_error(exc))
    finally:
        for channel in channels.values():
            channel.close()
    if sent:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{failure.run_id}\n", encoding="utf-8")
    return sent


def _marker(settings: Settings, dedupe_key: str) -> Path:
    """Return the file that records a direct (warehouse-less) notice of ``dedupe_key``."""
    return Path(settings.report_dir) / ".failure-notices" / dedupe_key.replace(":", "__")


def report_recovery(settings: Settings, dag_id: str, task_id: str, *,
                    now: datetime | None = None) -> bool:  # fmt: skip
    """Resolve the open failure alert of a task that succeeded; return whether one was open.

    Called after every successful task, so it is one indexed look-up and never migrates or
    raises: a warehouse without the alert table (or unreachable) has nothing to resolve.
    """
    key = failure_key(dag_id, task_id)
    _marker(settings, key).unlink(missing_ok=True)
    try:
        engine = make_engine(settings.db_url, migrate=False)
        try:
            with engine.connect() as conn:
                open_alert = conn.execute(
                    sa.select(alert.c.alert_id).where(
                        alert.c.dedupe_key == key, alert.c.state != RESOLVED)
                ).first()  # fmt: skip
            return bool(open_alert) and clear(engine, key, now or datetime.now(UTC))
        finally:
            engine.dispose()
    except sa.exc.SQLAlchemyError as exc:
        log.info("could not check %s for an open failure alert: %s", key, summarise_error(exc))
        return False

