"""The watchdog: alarms about the pipeline itself, measured by the wall clock.

Two conditions, checked on every alerts run (``kyphowatch_alerts``, every 15 minutes):

* **heartbeat** -- no extract file at all (loaded *or* rejected: anything received counts)
  for ``heartbeat_hours`` (``KYPHOWATCH_HEARTBEAT_HOURS``, default 72). Measured from the
  newest ``file_ledger.processed_at`` to now, so a registry whose every feed stopped is
  noticed; the per-site "silent site" rule in :mod:`pipelines.alerts.lifecycle` counts from
  the clock too. A warehouse that never received a file raises nothing (not yet in service).
* **channel outage** -- a delivery channel (``email`` or ``webhook``) holds an outbox row that
  was tried and failed and has waited longer than ``channel_outage_minutes``
  (``KYPHOWATCH_CHANNEL_OUTAGE_MINUTES``, default 30). The alert goes out on the *other*
  channel only: the broken one cannot carry news of its own outage. With a single channel
  configured the alert is still recorded (``kyphowatch alerts list``) and logged as an error.

Each condition is one alert per *episode* (dedupe keys ``watchdog:heartbeat`` and
``watchdog:channel:<channel>``): raised once when the condition starts, resolved by the
system (audit row "condition cleared") when it ends, raised again as episode n+1 if it
returns. :func:`raise_once` and :func:`clear` implement that and are shared with
:mod:`pipelines.alerts.failures`. This module does not import Airflow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from pipelines.alerts.lifecycle import (
    CONDITION_CLEARED,
    DATA_QUALITY,
    RESOLVED,
    SYSTEM_ACTOR,
    Condition,
    _audit,
    _create,
    channels_for,
    warehouse,
)
from pipelines.schema import alert, alert_outbox, file_ledger
from pipelines.settings import Settings

log = logging.getLogger(__name__)

HEARTBEAT_KEY = "watchdog:heartbeat"
CHANNELS = ("email", "webhook")


def outage_key(channel: str) -> str:
    """Return the dedupe key of the outage alert for ``channel``."""
    return f"watchdog:channel:{channel}"


def _utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite may hand back text for aggregates
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _latest(conn: sa.Connection, dedupe_key: str) -> sa.RowMapping | None:
    return conn.execute(
        sa.select(alert).where(alert.c.dedupe_key == dedupe_key)
        .order_by(alert.c.episode.desc()).limit(1)
    ).mappings().first()  # fmt: skip


def raise_once(engine: sa.Engine, settings: Settings, condition: Condition, now: datetime, *,
               channels: list[str] | None = None) -> str | None:  # fmt: skip
    """Raise ``condition`` unless its newest alert is still open; return the new alert id.

    An open (or acknowledged) alert means this episode was already reported: the repeat
    is recorded as an audit row on it, and nothing is sent.
    """
    with engine.connect() as conn:
        previous = _latest(conn, condition.dedupe_key)
    if previous is not None and previous["state"] != RESOLVED:
        with engine.begin() as conn:
            _audit(conn, previous["alert_id"], previous["state"], previous["state"],
                   SYSTEM_ACTOR, f"still true: {condition.title}"[:500], now)  # fmt: skip
        return None
    episode = 1 if previous is None else previous["episode"] + 1
    alert_id = _create(engine, settings, condition, episode, now)
    if alert_id is not None and channels is not None:
        # Only the channels asked for: an outage is not announced on the broken channel
        # (a delivery run in the instant between the two commits meets that channel down).
        with engine.begin() as conn:
            conn.execute(alert_outbox.delete().where(
                alert_outbox.c.alert_id == alert_id, alert_outbox.c.channel.notin_(channels)))
    return alert_id


def clear(engine: sa.Engine, dedupe_key: str, now: datetime) -> bool:
    """Resolve the open alert of ``dedupe_key`` (condition no longer true); return whether one was."""
    with engine.begin() as conn:
        previous = _latest(conn, dedupe_key)
        if previous is None or previous["state"] == RESOLVED:
            return False
        changed = conn.execute(
            alert.update()
            .where(alert.c.alert_id == previous["alert_id"], alert.c.state == previous["state"])
            .values(state=RESOLVED, updated_at=now)
        ).rowcount
        if changed:
            _audit(conn, previous["alert_id"], previous["state"], RESOLVED, SYSTEM_ACTOR,
                   CONDITION_CLEARED, now)  # fmt: skip
    return bool(changed)


def heartbeat_condition(conn: sa.Connection, settings: Settings, now: datetime
                        ) -> Condition | None:  # fmt: skip
    """Return the heartbeat condition when no extract arrived for ``heartbeat_hours``."""
    newest = _utc(conn.scalar(sa.select(sa.func.max(file_ledger.c.processed_at))))
    if newest is None:
        return None
    silent = now - newest
    if silent < timedelta(hours=settings.heartbeat_hours):
        return None
    hours = silent.total_seconds() / 3600
    return Condition(
        kind=DATA_QUALITY,
        dedupe_key=HEARTBEAT_KEY,
        title=f"No extracts received from any site for {hours:.0f} hours",
        payload={
            "type": "heartbeat",
            "last_extract_at": newest.isoformat(),
            "hours_silent": round(hours, 1),
            "threshold_hours": settings.heartbeat_hours,
            "checked_at": now.isoformat(),
            "where": "landing directory and the kyphowatch_ingest DAG",
        },
    )


def channel_outages(conn: sa.Connection, settings: Settings, now: datetime
                    ) -> dict[str, datetime]:  # fmt: skip
    """Return, per channel, since when a tried-and-failed delivery has been waiting.

    Only channels whose oldest such row is older than ``channel_outage_minutes`` are listed.
    Rows of the watchdog's own outage alerts are ignored (they wait on the broken channel
    only if that was the sole channel).
    """
    oldest = sa.func.min(alert.c.created_at)
    query = (
        sa.select(alert_outbox.c.channel, oldest)
        .join(alert, alert.c.alert_id == alert_outbox.c.alert_id)
        .where(alert_outbox.c.status == "queued", alert_outbox.c.attempts > 0,
               alert_outbox.c.last_error.isnot(None),
               ~alert.c.dedupe_key.startswith("watchdog:channel:"))
        .group_by(alert_outbox.c.channel)
    )  # fmt: skip
    limit = timedelta(minutes=settings.channel_outage_minutes)
    return {
        channel: since
        for channel, since in ((c, _utc(s)) for c, s in conn.execute(query))
        if since is not None and now - since >= limit
    }


@dataclass
class WatchdogResult:
    """What one :func:`run_watchdog` call raised and cleared (dedupe keys)."""

    raised: list[str] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly summary."""
        return {"raised": self.raised, "cleared": self.cleared, "active": self.active}


def run_watchdog(settings: Settings, now: datetime | None = None) -> WatchdogResult:
    """Check the heartbeat and the channels; raise or clear their alerts (outbox rows only).

    Delivery is left to :func:`pipelines.alerts.deliver_outbox`, which the caller runs next.
    """
    now = now or datetime.now(UTC)
    result = WatchdogResult()
    engine = warehouse(settings)
    try:
        with engine.connect() as conn:
            heartbeat = heartbeat_condition(conn, settings, now)
            outages = channel_outages(conn, settings, now)
        conditions: list[tuple[Condition, list[str] | None]] = []
        if heartbeat is not None:
            conditions.append((heartbeat, None))
        configured = channels_for(settings, DATA_QUALITY)
        for channel, since in sorted(outages.items()):
            others = [c for c in configured if c != channel]
            if not others:
                log.error("delivery channel %s failing since %s and no other channel is "
                          "configured to say so", channel, since.isoformat())  # fmt: skip
            minutes = (now - since).total_seconds() / 60
            condition = Condition(
                kind=DATA_QUALITY,
                dedupe_key=outage_key(channel),
                title=f"Alert channel {channel} has failed to deliver for {minutes:.0f} minutes",
                payload={
                    "type": "channel_outage",
                    "channel": channel,
                    "failing_since": since.isoformat(),
                    "minutes": round(minutes),
                    "threshold_minutes": settings.channel_outage_minutes,
                    "where": "kyphowatch alerts list (outbox rows waiting with last_error)",
                },
            )
            conditions.append((condition, others))
        for condition, channels in conditions:
            result.active.append(condition.dedupe_key)
            created = raise_once(engine, settings, condition, now, channels=channels)
            if created:
                result.raised.append(condition.dedupe_key)
                log.warning("watchdog raised %s: %s", condition.dedupe_key, condition.title)
        for key in (HEARTBEAT_KEY, *(outage_key(c) for c in CHANNELS)):
            if key not in result.active and clear(engine, key, now):
                result.cleared.append(key)
                log.info("watchdog cleared %s", key)
    finally:
        engine.dispose()
    return result

