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

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.alerts.lifecycle import (
        SyncResult,
        acknowledge,
        find_alert,
        list_alerts,
        resolve,
        sync_alerts,
    )
    from pipelines.alerts.outbox import DeliveryResult, deliver_outbox, requeue

# Where each public name lives. Resolved on first use (PEP 562), so that importing one
# submodule -- the monitor drafts Yellow Cards through ``pipelines.alerts.regulator`` on
# every run -- does not import the life cycle, the outbox and the channels' ``email`` and
# ``urllib.request`` with it (about 0.1 s of a monitor process).
_HOMES = {
    "SyncResult": "lifecycle",
    "acknowledge": "lifecycle",
    "find_alert": "lifecycle",
    "list_alerts": "lifecycle",
    "resolve": "lifecycle",
    "sync_alerts": "lifecycle",
    "DeliveryResult": "outbox",
    "deliver_outbox": "outbox",
    "requeue": "outbox",
}

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


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access and return it."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """List the public names with the module's own."""
    return sorted(set(globals()) | set(_HOMES))
