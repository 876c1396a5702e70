"""``kyphowatch alerts``: list, show, acknowledge, resolve, sync and deliver alerts.

``sync`` and ``deliver`` are the same calls the Airflow DAG ``kyphowatch_alerts`` makes, so an
operator can run them by hand during an incident. Alert ids may be abbreviated to any
unique prefix. Unknown ids and transitions the life cycle does not allow exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipelines.alerts import lifecycle, outbox
from pipelines.alerts.render import render
from pipelines.cli import parse_as_of
from pipelines.settings import load_settings


def _settings(args: argparse.Namespace, *, schema: bool = True):
    """Return the settings for ``--db``, once the warehouse is known to exist.

    Every alerts action reads or changes alerts that only an existing warehouse holds: a
    typo in ``--db`` is exit 3 naming the path, never a new, empty warehouse. ``schema``
    (all but ``sync`` and ``deliver``, which migrate as the other writers do): a database
    without the kyphowatch schema is exit 3 too, before the life cycle would create it.
    """
    from pipelines.db import open_warehouse, require_warehouse

    settings = load_settings(db_url=args.db)
    require_warehouse(settings.db_url)
    if schema:
        open_warehouse(settings.db_url, create=False).dispose()
    return settings


def _json_default(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=_json_default))


def _list(args: argparse.Namespace) -> int:
    alerts = lifecycle.list_alerts(_settings(args), state=args.state, kind=args.kind)
    if args.site:
        alerts = [a for a in alerts if a["site_id"] == args.site.strip().upper()]
    if args.json:
        for item in alerts:
            item["payload"] = json.loads(item["payload"])
        _print_json(alerts)
        return 0
    if not alerts:
        print("no alerts")
        return 0
    print(f"{'alert':<12}  {'state':<12} {'kind':<12} {'raised (UTC)':<16}  title  [delivery]")
    for item in alerts:
        delivery = ", ".join(f"{k}:{v}" for k, v in sorted(item["delivery"].items())) or "-"
        created = _json_default(item["created_at"])[:16]
        print(f"{item['alert_id'][:12]}  {item['state']:<12} {item['kind']:<12} {created}  "
              f"{item['title']}  [{delivery}]")  # fmt: skip
    return 0


def _show(args: argparse.Namespace) -> int:
    detail = lifecycle.alert_detail(_settings(args), args.id)
    if args.json:
        _print_json(detail)
        return 0
    message = render(detail)
    print(f"alert {detail['alert_id']}  state={detail['state']}  kind={detail['kind']}  "
          f"episode={detail['episode']}  dedupe_key={detail['dedupe_key']}")  # fmt: skip
    print()
    print(message.text)
    print("audit:")
    for row in detail["audit"]:
        print(f"  {_json_default(row['at'])[:19]}  {row['from_state'] or '-'} -> "
              f"{row['to_state']}  by {row['actor']}: {row['reason']}")  # fmt: skip
    print("delivery:")
    for row in detail["outbox"]:
        error = f"  ({row['last_error']})" if row["last_error"] else ""
        print(f"  {row['channel']}: {row['status']}, attempts {row['attempts']}, "
              f"message id {row['message_id']}{error}")  # fmt: skip
    return 0


def _ack(args: argparse.Namespace) -> int:
    change = lifecycle.acknowledge(_settings(args), args.id, by=args.by, reason=args.reason)
    print(f"alert {change['alert_id'][:12]}: {change['from_state']} -> {change['to_state']}")
    return 0


def _resolve(args: argparse.Namespace) -> int:
    change = lifecycle.resolve(_settings(args), args.id, by=args.by, reason=args.reason)
    print(f"alert {change['alert_id'][:12]}: {change['from_state']} -> {change['to_state']}")
    return 0


def _requeue(args: argparse.Namespace) -> int:
    channels = outbox.requeue(_settings(args), args.id, by=args.by, reason=args.reason,
                              channel=args.channel)  # fmt: skip
    print(f"requeued: {', '.join(channels)}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    result = lifecycle.sync_alerts(_settings(args, schema=False), parse_as_of(args.as_of))
    _print_json(result.to_dict())
    if result.queued_late:
        print(f"queued {len(result.queued_late)} earlier alert(s) that had no recipient: "
              f"{', '.join(a[:12] for a in result.queued_late)}", file=sys.stderr)
    for alert_id, kind, site_id, hint in result.no_recipient:
        about = f"{kind}, {site_id}" if site_id else kind
        print(f"warning: alert {alert_id[:12]} ({about}) has no recipient and is not "
              f"delivered: {hint}", file=sys.stderr)
    return 0


def _deliver(args: argparse.Namespace) -> int:
    result = outbox.deliver_outbox(_settings(args, schema=False))
    _print_json(result.to_dict())
    result.raise_if_retrying()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``alerts`` and its sub-commands to the ``kyphowatch`` parser."""
    parser = subparsers.add_parser("alerts", help="list, acknowledge and deliver alerts")
    commands = parser.add_subparsers(dest="alerts_command", metavar="ACTION", required=True)

    def add(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--db", help="warehouse URL (default: KYPHOWATCH_DB_URL)")
        sub.set_defaults(handler=handler)
        return sub

    sub = add("list", _list, "list alerts, newest first")
    sub.add_argument("--state", choices=lifecycle.STATES)
    sub.add_argument("--kind", choices=lifecycle.KINDS)
    sub.add_argument("--site", help="only alerts about this site")
    sub.add_argument("--json", action="store_true", help="machine-readable output")

    sub = add("show", _show, "show one alert with its audit trail and deliveries")
    sub.add_argument("id", help="alert id or a unique prefix of it")
    sub.add_argument("--json", action="store_true", help="machine-readable output")

    for name, handler, help_text in (
        ("ack", _ack, "acknowledge an open alert"),
        ("resolve", _resolve, "resolve an open or acknowledged alert"),
        ("requeue", _requeue, "send a failed or unconfirmed delivery again"),
    ):
        sub = add(name, handler, help_text)
        sub.add_argument("id", help="alert id or a unique prefix of it")
        sub.add_argument("--by", required=True, help="who is doing this")
        sub.add_argument("--reason", required=True, help="why")
        if name == "requeue":
            sub.add_argument("--channel", choices=("email", "webhook"))

    sub = add("sync", _sync, "raise alerts for new signals and data-quality facts")
    sub.add_argument("--as-of", help="date for the silent-site rule (default: today)")

    add("deliver", _deliver, "send queued alert messages (exit 4 if some must be retried)")
