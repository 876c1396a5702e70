"""Alerts: turn warehouse facts into de-duplicated alerts and deliver them reliably.

* :mod:`pipelines.alerts.lifecycle` -- which conditions raise an alert, alert episodes,
  the open -> acknowledged -> resolved life cycle and its audit trail.
* :mod:`pipelines.alerts.outbox` -- the transactional outbox and its crash-safe delivery.
* :mod:`pipelines.alerts.channels` -- e-mail (SMTP) and JSON webhook transports.
* :mod:`pipelines.alerts.render` -- the human-readable and JSON content of a message.
* :mod:`pipelines.alerts.cli` -- ``kyphowatch alerts ...``.

Delivery semantics are described in ``docs/operations.md``.
"""

from __future__ import annotations

from pipelines.alerts.lifecycle import (
    SyncResult,
    acknowledge,
    find_alert,
    list_alerts,
    resolve,
    sync_alerts,
)
from pipelines.alerts.outbox import DeliveryResult, deliver_outbox, requeue

__all__ = [
    "DeliveryResult",
    "SyncResult",
    "acknowledge",
    "deliver_outbox",
    "find_alert",
    "list_alerts",
    "requeue",
    "resolve",
    "sync_alerts",
]
