"""Alert conditions beyond the site (issue 12): operators, devices, cement lots, Yellow Cards.

* ``training_review`` -- an operator's learning-curve chart signalled within the profile's
  ``design.hold_days``. Confidential: it goes to the site's clinical lead only
  (``KYPHOWATCH_CLINICAL_LEADS``), never to the webhook, and names the operator only by
  pseudonym (``OP-`` and ten hex digits of the stored digest). A key rotation renames the
  pseudonym in the stored alerts (:func:`rename_operator_alerts`), so the next sync finds
  the same alert under the new pseudonym: no second alert, no second e-mail.
* ``device`` -- a product's sequential test or a cement lot's exact test signalled.
* ``data_quality`` -- a device-related major or fatal event has had no Yellow Card draft
  marked sent for ``beyond_site.regulator.send_within_days`` (:mod:`pipelines.alerts.regulator`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from pipelines import schema
from pipelines.alerts.lifecycle import (
    DATA_QUALITY,
    DEVICE,
    TRAINING_REVIEW,
    Condition,
    _as_date,
    where_to_look,
    where_to_look_confidential,
)
from pipelines.settings import Settings
from pipelines.surveillance.beyond import parse_beyond_site
from pipelines.surveillance.operators import rename_pseudonyms
from pipelines.surveillance.profile import Profile


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _recent(rows, as_of: date | None, hold_days: int):
    for row in rows:
        signal = _as_date(row["signal_date"])
        current = _as_date(row["as_of"])
        if signal is not None and signal >= (as_of or current) - timedelta(days=hold_days):
            yield row, signal


def _owner(profile: Profile) -> dict[str, str]:
    """Return the payload fields that say which profile raised an alert (profile switches)."""
    return {"profile_name": profile.name, "profile_version": profile.version}


def _operator_conditions(conn: sa.Connection, settings: Settings, profile: Profile,
                         as_of: date | None) -> list[Condition]:
    table = schema.operator_chart
    rows = conn.execute(sa.select(table).where(table.c.profile_name == profile.name)
                        .order_by(table.c.site_id, table.c.operator, table.c.metric)).mappings()
    conditions = []
    for row, signal in _recent(rows, as_of, profile.design.hold_days):
        metric = profile.metric(row["metric"])
        how = ("learning-curve CUSUM with head start, against the other operators at the site"
               if row["method"] == "fir_cusum"
               else "exact test against the other operators at the site, last 365 days")
        lines = [
            ("Site", row["site_id"]), ("Operator (pseudonym)", row["operator"]),
            ("Metric", metric.label), ("Method", how),
            ("Procedures compared (quarters shared with a colleague)", row["procedures"]),
            ("Events / expected from the colleagues at the site",
             f"{row['events']} / {_fmt(row['expected'], 1)}"),
            ("Signal date", signal.isoformat()),
        ]
        if row["signal_procedure"]:
            lines.append(("Signal at the operator's procedure", row["signal_procedure"]))
        lines.append(("Statistic / threshold",
                      f"{_fmt(row['statistic'], 3)} / {_fmt(row['threshold'], 3)}"))
        lines.append(("What to do", "review this operator's recent cases and training "
                      "(HTG108 1.2); map the pseudonym with the site's own key material"))
        conditions.append(Condition(
            kind=TRAINING_REVIEW,
            dedupe_key=f"training:{profile.name}:{row['site_id']}:{row['operator']}:"
                       f"{row['metric']}",
            legacy_key=f"training:{row['site_id']}:{row['operator']}:{row['metric']}",
            title=f"Training review at {row['site_id']}: operator {row['operator']}, "
                  f"{metric.label.lower()} above colleagues at the site",
            payload={"type": "operator_signal", "site_id": row["site_id"],
                     "operator": row["operator"], "metric": row["metric"],
                     "method": row["method"], "signal_date": signal.isoformat(),
                     "lines": lines, "where": where_to_look_confidential(row["site_id"]),
                     **_owner(profile)},
            site_id=row["site_id"], metric=row["metric"],
        ))
    return conditions


# The actor and reason of the audit row a key rotation writes for each renamed alert.
KEY_ROTATION_ACTOR = "kyphowatch keys rotate"
KEY_ROTATION_REASON = "operator pseudonym renamed at key rotation: {renames}"


def rename_operator_alerts(conn: sa.Connection, renames: Mapping[str, str],
                           now: datetime) -> int:
    """Rename operator pseudonyms in every stored alert (key, title, payload); return how many.

    Called by the key rotation in its transaction. The alert keeps its id, episode, state
    and outbox rows (its e-mail's message id), so the next sync finds it under the renamed
    dedupe key and sends nothing; an audit row (state unchanged) records old -> new. The
    id stays the hash of the key the alert was created under (ids are never recomputed).
    """
    table, audit = schema.alert, schema.alert_audit
    changed = 0
    if not renames:
        return changed
    rows = conn.execute(sa.select(table.c.alert_id, table.c.dedupe_key, table.c.title,
                                  table.c.payload, table.c.state)).mappings().all()
    for row in rows:
        new = {c: rename_pseudonyms(row[c], renames) for c in ("dedupe_key", "title", "payload")}
        if all(new[c] == row[c] for c in new):
            continue
        names = sorted({m for c in new for m in renames if m in (row[c] or "")})
        conn.execute(table.update().where(table.c.alert_id == row["alert_id"])
                     .values(**new, updated_at=now))
        conn.execute(audit.insert().values(
            alert_id=row["alert_id"], from_state=row["state"], to_state=row["state"],
            actor=KEY_ROTATION_ACTOR, at=now,
            reason=KEY_ROTATION_REASON.format(
                renames=", ".join(f"{old} -> {renames[old]}" for old in names))))
        changed += 1
    return changed


def _device_conditions(conn: sa.Connection, settings: Settings, profile: Profile,
                       as_of: date | None) -> list[Condition]:
    conditions = []
    products = schema.device_product_chart
    rows = conn.execute(sa.select(products).where(products.c.profile_name == profile.name)
                        .order_by(products.c.product, products.c.metric)).mappings()
    for row, signal in _recent(rows, as_of, profile.design.hold_days):
        metric = profile.metric(row["metric"])
        lines = [("Product", f"{row['product']} ({row['kind']})"), ("Metric", metric.label),
                 ("Procedures compared (at sites and quarters that also use other "
                  "products)", row["procedures"]),
                 ("Events / expected from the other products at the same sites",
                  f"{row['events']} / {_fmt(row['expected'], 1)}"),
                 ("Observed / expected", _fmt(row["observed_expected"])),
                 ("Device failures recorded", row["device_failures"]),
                 ("Signal date", signal.isoformat())]
        conditions.append(Condition(
            kind=DEVICE,
            dedupe_key=f"device:product:{profile.name}:{row['product']}:{row['metric']}",
            legacy_key=f"device:product:{row['product']}:{row['metric']}",
            title=(f"Product {row['product']}: {metric.label.lower()} above other products "
                   "at the same sites"),
            payload={"type": "device_product", "product": row["product"],
                     "metric": row["metric"], "signal_date": signal.isoformat(),
                     "lines": lines, "where": where_to_look(settings, None, "devices.html"),
                     **_owner(profile)},
            metric=row["metric"],
        ))
    lots = schema.device_lot_test
    rows = conn.execute(sa.select(lots).where(lots.c.profile_name == profile.name)
                        .order_by(lots.c.product, lots.c.lot)).mappings()
    for row, signal in _recent(rows, as_of, profile.design.hold_days):
        metric = profile.metric(row["metric"])
        lines = [("Cement", row["product"]), ("Lot", row["lot"]), ("Metric", metric.label),
                 ("Procedures / sites", f"{row['procedures']} / {row['sites']}"),
                 ("Events / expected", f"{row['events']} / {_fmt(row['expected'], 1)}"),
                 ("p-value / alpha", f"{row['p_value']:.2g} / {row['alpha']:.2g}"),
                 ("What to do", "quarantine the lot's stock and tell the manufacturer; "
                  "each device-related event also needs a Yellow Card (kyphowatch regulator)")]
        conditions.append(Condition(
            kind=DEVICE,
            dedupe_key=f"device:lot:{profile.name}:{row['product']}:{row['lot']}:{row['metric']}",
            legacy_key=f"device:lot:{row['product']}:{row['lot']}:{row['metric']}",
            title=f"Cement lot {row['lot']} of {row['product']}: excess {metric.label.lower()} "
                  f"across {row['sites']} sites",
            payload={"type": "device_lot", "product": row["product"], "lot": row["lot"],
                     "metric": row["metric"], "signal_date": signal.isoformat(),
                     "lines": lines, "where": where_to_look(settings, None, "devices.html"),
                     **_owner(profile)},
            metric=row["metric"],
        ))
    return conditions


def beyond_site_conditions(conn: sa.Connection, settings: Settings, profile: Profile,
                           as_of: date | None = None) -> list[Condition]:
    """Return the training-review, device and Yellow Card conditions true now."""
    design = parse_beyond_site(profile)
    conditions: list[Condition] = []
    if design.operators is not None:
        conditions += _operator_conditions(conn, settings, profile, as_of)
    if design.devices is not None:
        conditions += _device_conditions(conn, settings, profile, as_of)
    if design.regulator is not None:
        from pipelines.alerts.regulator import overdue_by_site

        for site_id, overdue in overdue_by_site(conn, design.regulator, as_of).items():
            oldest = min(item["event_date"] for item in overdue)
            conditions.append(Condition(
                kind=DATA_QUALITY, dedupe_key=f"yellow_card_overdue:{site_id}",
                title=f"Site {site_id}: {len(overdue)} device-related major event(s) without "
                      f"a Yellow Card marked sent after {design.regulator.send_within_days} days",
                payload={"type": "yellow_card_overdue", "site_id": site_id,
                         "events": len(overdue), "oldest_event_date": oldest,
                         "send_within_days": design.regulator.send_within_days,
                         "lines": [("Site", site_id), ("Events without a sent report",
                                                       len(overdue)),
                                   ("Oldest event", oldest),
                                   ("What to do", "kyphowatch regulator export --site "
                                    f"{site_id}, submit, then kyphowatch regulator mark-sent")],
                         "where": where_to_look(settings, site_id)},
                site_id=site_id,
            ))
    return conditions
