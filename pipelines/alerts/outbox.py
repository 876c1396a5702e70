"""Transactional outbox: deliver each alert once per channel, surviving crashes and outages.

Alert creation writes one ``alert_outbox`` row per configured channel in the same
transaction as the alert (:mod:`pipelines.alerts.lifecycle`), so an alert can never exist
without its pending deliveries. :func:`deliver_outbox` then works through the rows, one at
a time, in three committed steps:

1. **claim** -- ``queued -> sending``, ``attempts + 1``, ``claimed_at = now``, as a
   compare-and-set on ``(status, attempts)``; only the run that wins may send. ``attempts``
   doubles as the version number, so a run that lost its lease can never overwrite the
   newer state of another run.
2. **hand-over marker** -- ``sent_at`` is set (status still ``sending``) in its own commit,
   immediately before the one step after which the receiver may have the message: the
   SMTP end-of-data line (everything before it -- connect, MAIL, RCPT, DATA and the body --
   is discarded by the server if we stop) or the HTTP request.
3. **done** -- ``status = sent``.

A row left in ``sending`` by a crashed run is picked up again once its lease
(``lease_seconds`` after ``claimed_at``) has run out:

* without the hand-over marker the receiver cannot have it: it is sent again, with the
  same ``message_id`` (e-mail ``Message-ID``, webhook ``Idempotency-Key`` and JSON ``id``);
* with the marker the run died within the few milliseconds between committing the marker
  and recording the server's answer. Almost always the server did accept the message, so it
  is **not** sent again: the row becomes ``sent`` with ``last_error`` starting
  ``unconfirmed:`` and is counted and logged as unconfirmed. ``kyphowatch alerts requeue``
  sends it again if the receiver shows it never arrived.

When the process stays alive and the transport breaks after the hand-over (e.g. a timeout
waiting for the server's reply) the row is queued again and re-sent with the same
``message_id``: at-least-once transport whose idempotency keys let receivers collapse the
rare duplicate, which gives effectively-once delivery. A server that is down leaves rows
``queued`` with ``last_error``; they go out on the next run. A permanent refusal (SMTP 5xx,
HTTP 4xx) marks the row ``failed``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from pipelines.alerts.channels import Channel, DeliveryUncertain, NotDelivered, make_channels
from pipelines.alerts.lifecycle import (
    channels_for,
    find_alert,
    message_id_for,
    missing_recipient_hint,
    recipients_for,
    warehouse,
)
from pipelines.alerts.render import render
from pipelines.errors import ExternalSystemError, InputRejected
from pipelines.schema import alert, alert_audit, alert_outbox
from pipelines.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 600
UNCONFIRMED = "unconfirmed:"

# Observer hook: called with (event, alert_id, channel) at "claimed", "handed_over",
# "accepted" and "sent". Used for logging/metrics and by the crash tests.
Observer = Callable[[str, str, str], None]


class LeaseLost(Exception):
    """Another run took over this row; stop touching it."""


@dataclass
class DeliveryResult:
    """What one :func:`deliver_outbox` call did, as (alert_id, channel) pairs."""

    sent: list[tuple[str, str]] = field(default_factory=list)
    retrying: list[tuple[str, str, str]] = field(default_factory=list)  # + error
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    unconfirmed: list[tuple[str, str]] = field(default_factory=list)
    not_configured: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly summary."""
        return {
            "sent": [list(item) for item in self.sent],
            "retrying": [list(item) for item in self.retrying],
            "failed": [list(item) for item in self.failed],
            "unconfirmed": [list(item) for item in self.unconfirmed],
            "not_configured": [list(item) for item in self.not_configured],
        }

    def raise_if_retrying(self) -> None:
        """Raise :class:`ExternalSystemError` when some deliveries have to wait for a retry."""
        if self.retrying:
            first = self.retrying[0][2]
            raise ExternalSystemError(
                f"{len(self.retrying)} alert deliveries are queued for retry; first error: {first}"
            )


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # SQLite hands back naive timestamps
    return value


def _row_filter(row: sa.RowMapping, status: str, attempts: int) -> list[sa.ColumnElement]:
    return [
        alert_outbox.c.alert_id == row["alert_id"],
        alert_outbox.c.channel == row["channel"],
        alert_outbox.c.status == status,
        alert_outbox.c.attempts == attempts,
    ]


def _update(engine: sa.Engine, row: sa.RowMapping, expect_status: str, expect_attempts: int,
            /, **values: Any) -> bool:  # fmt: skip
    """Compare-and-set one outbox row; return whether this run still owned it."""
    with engine.begin() as conn:
        changed = conn.execute(
            alert_outbox.update()
            .where(*_row_filter(row, expect_status, expect_attempts))
            .values(**values)
        ).rowcount
    return changed == 1


def _candidates(engine: sa.Engine, cutoff: datetime) -> list[sa.RowMapping]:
    query = (
        sa.select(alert_outbox, alert.c.kind, alert.c.title, alert.c.payload, alert.c.episode,
                  alert.c.site_id)
        .join(alert, alert.c.alert_id == alert_outbox.c.alert_id)
        .where(
            sa.or_(
                alert_outbox.c.status == "queued",
                sa.and_(alert_outbox.c.status == "sending", alert_outbox.c.claimed_at < cutoff),
            )
        )
        .order_by(alert.c.created_at, alert_outbox.c.alert_id, alert_outbox.c.channel)
    )
    with engine.connect() as conn:
        return list(conn.execute(query).mappings())


def deliver_outbox(
    settings: Settings,
    *,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    observer: Observer | None = None,
    channels: dict[str, Channel] | None = None,
) -> DeliveryResult:
    """Send every queued (or abandoned) outbox row once; return what happened."""
    engine = warehouse(settings)
    channels = make_channels(settings) if channels is None else channels
    notify = observer or (lambda event, alert_id, channel: None)
    result = DeliveryResult()
    down: set[str] = set()
    now = datetime.now(UTC)
    try:
        for row in _candidates(engine, now - timedelta(seconds=lease_seconds)):
            key = (row["alert_id"], row["channel"])
            if row["status"] == "sending" and row["sent_at"] is not None:
                note = (
                    f"{UNCONFIRMED} a run stopped after handing {row['message_id']} to the "
                    "receiver and before recording its answer; not sent again to avoid a "
                    "duplicate (kyphowatch alerts requeue sends it again)"
                )
                if _update(engine, row, "sending", row["attempts"], status="sent", last_error=note):
                    log.warning("alert %s via %s: %s", key[0][:12], key[1], note)
                    result.unconfirmed.append(key)
                continue
            channel = channels.get(row["channel"])
            if channel is None:
                result.not_configured.append(key)
                continue
            if row["channel"] in down:
                continue
            _deliver_one(engine, settings, row, channel, now, notify, result, down)
    finally:
        for channel in channels.values():
            channel.close()
        engine.dispose()
    if result.not_configured:
        log.warning("%d outbox rows wait for a channel that is not configured",
                    len(result.not_configured))  # fmt: skip
    return result


def _deliver_one(engine: sa.Engine, settings: Settings, row: sa.RowMapping, channel: Channel,
                 now: datetime, notify: Observer, result: DeliveryResult,
                 down: set[str]) -> None:  # fmt: skip
    """Claim, send and record one outbox row."""
    key = (row["alert_id"], row["channel"])
    attempts = row["attempts"] + 1
    if not _update(engine, row, row["status"], row["attempts"], status="sending",
                   attempts=attempts, claimed_at=now, sent_at=None):  # fmt: skip
        return  # another run claimed it first
    notify("claimed", *key)

    def handover() -> None:
        if not _update(engine, row, "sending", attempts, sent_at=datetime.now(UTC)):
            raise LeaseLost(f"lease on {key} was taken over")
        notify("handed_over", *key)

    recipients = recipients_for(settings, row["kind"], row["site_id"])
    try:
        message = render(dict(row), synthetic=settings.demo)
        channel.send(message, row["message_id"], recipients, handover)
    except LeaseLost:
        log.warning("alert %s via %s: lease taken over by another run", key[0][:12], key[1])
        return
    except NotDelivered as exc:
        status = "failed" if exc.permanent else "queued"
        _update(engine, row, "sending", attempts, status=status, sent_at=None, last_error=str(exc))
        (result.failed if exc.permanent else result.retrying).append((*key, str(exc)))
        if exc.channel_down:
            down.add(row["channel"])
        log.warning("alert %s via %s not delivered (%s): %s", key[0][:12], key[1], status, exc)
        return
    except DeliveryUncertain as exc:
        error = f"{exc}; will retry with the same message id"
        _update(engine, row, "sending", attempts, status="queued", sent_at=None, last_error=error)
        result.retrying.append((*key, error))
        log.warning("alert %s via %s: %s", key[0][:12], key[1], error)
        return
    notify("accepted", *key)
    if _update(engine, row, "sending", attempts, status="sent", sent_at=datetime.now(UTC),
               last_error=None):  # fmt: skip
        result.sent.append(key)
        notify("sent", *key)
        log.info("alert %s delivered via %s", key[0][:12], key[1])
    else:
        log.warning("alert %s via %s delivered, but another run took the row over",
                    key[0][:12], key[1])  # fmt: skip


def requeue(settings: Settings, id_or_prefix: str, *, by: str, reason: str,
            channel: str | None = None) -> list[str]:  # fmt: skip
    """Queue an alert's failed or unconfirmed deliveries again; return the channels requeued.

    A channel the alert has no delivery on at all (it was raised while no recipient was
    configured for it, e.g. a training review before the site's clinical lead was set) is
    queued now if it is configured for the alert's kind and site.
    """
    if not (by or "").strip() or not (reason or "").strip():
        raise InputRejected("say who you are and why (--by NAME --reason TEXT)")
    engine = warehouse(settings)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            row = find_alert(conn, id_or_prefix)
            query = sa.select(alert_outbox).where(alert_outbox.c.alert_id == row["alert_id"])
            if channel:
                query = query.where(alert_outbox.c.channel == channel)
            requeued = []
            for outbox_row in conn.execute(query).mappings():
                unconfirmed = (outbox_row["last_error"] or "").startswith(UNCONFIRMED)
                if outbox_row["status"] == "failed" or (
                    outbox_row["status"] == "sent" and unconfirmed
                ):
                    conn.execute(
                        alert_outbox.update()
                        .where(
                            alert_outbox.c.alert_id == row["alert_id"],
                            alert_outbox.c.channel == outbox_row["channel"],
                        )
                        .values(status="queued", sent_at=None,
                                last_error=f"requeued by {by}: {reason}")  # fmt: skip
                    )
                    conn.execute(
                        alert_audit.insert().values(
                            alert_id=row["alert_id"], from_state=row["state"],
                            to_state=row["state"], actor=by,
                            reason=f"requeued {outbox_row['channel']} delivery: {reason}", at=now,
                        )  # fmt: skip
                    )
                    requeued.append(outbox_row["channel"])
            have = set(conn.execute(sa.select(alert_outbox.c.channel).where(
                alert_outbox.c.alert_id == row["alert_id"])).scalars())
            configured = channels_for(settings, row["kind"], row["site_id"])
            for name in configured:
                if name in have or (channel and name != channel):
                    continue
                conn.execute(alert_outbox.insert().values(
                    alert_id=row["alert_id"], channel=name, status="queued", attempts=0,
                    message_id=message_id_for(row["alert_id"], name)))
                conn.execute(alert_audit.insert().values(
                    alert_id=row["alert_id"], from_state=row["state"], to_state=row["state"],
                    actor=by, reason=f"queued {name} delivery (none before): {reason}", at=now))
                requeued.append(name)
            if not requeued:
                missing = "" if have or configured else (
                    "; it has no delivery because no recipient is configured: "
                    + missing_recipient_hint(settings, row["kind"], row["site_id"]))
                raise InputRejected(
                    f"alert {row['alert_id'][:12]} has no failed or unconfirmed delivery to "
                    f"requeue{missing}"
                )
    finally:
        engine.dispose()
    return requeued
