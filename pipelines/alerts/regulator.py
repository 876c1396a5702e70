"""Yellow Card drafts: device-related complications, pre-filled for the site to report to the MHRA.

The guidance's preamble says every adverse event related to a medical device should be
reported to the MHRA through the Yellow Card scheme. kyphowatch cannot reach the MHRA's online
service (and must not: the report is the site's, made by a clinician who knows the patient),
so it prepares the report:

* a complication is *device-related* when it matches a rule of the profile's
  ``beyond_site.regulator.device_related`` (balloon rupture, other device failure, cement
  embolism, a cement leak with a major or fatal outcome);
* each one gets exactly one draft in the ``yellow_card`` ledger, keyed by the complication id
  (reruns, re-deliveries and corrections never draft it twice);
* a draft not yet sent follows the extract: a corrected complication (severity, type,
  devices) rewrites it and sets it back to ``drafted``, so the next export carries the
  correction; one that is no longer device-related is ``withdrawn`` (and drafted again if a
  later correction makes it device-related). A sent draft is the record of what the MHRA
  received and is never rewritten: when the extract has changed since, ``export`` names it
  for a follow-up report;
* ``kyphowatch regulator export`` writes the unsent drafts of each site as JSON and CSV
  (device, manufacturer, model, lot, UDI-DI, event date, type, severity, outcome and the
  site's own references: complication and procedure id), with no patient or operator
  reference, digest or pseudonym;
* the site enters them in the Yellow Card online service (or the MHRA's device incident
  form), then records the MHRA reference with ``kyphowatch regulator mark-sent``;
* a device-related major or fatal event without a draft marked sent after
  ``send_within_days`` raises a data-quality alert (:mod:`pipelines.alerts.beyond`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pipelines import schema
from pipelines.errors import InputRejected
from pipelines.reference import ProductReference, reference_for
from pipelines.settings import Settings, load_settings
from pipelines.surveillance.beyond import RegulatorDesign, parse_beyond_site
from pipelines.surveillance.profile import load_profile

log = logging.getLogger(__name__)

STATES = ("drafted", "exported", "sent", "withdrawn")
UNSENT = ("drafted", "exported", "withdrawn")
SERIOUS = ("major", "fatal")
CSV_FIELDS = (
    "report_id", "site_id", "site_complication_ref", "site_procedure_ref", "event_date",
    "procedure_date", "event_type", "severity", "seriousness", "outcome", "symptomatic",
    "patient_sex",
    "patient_age_band", "balloon_product", "balloon_manufacturer", "balloon_model",
    "cement_product", "cement_manufacturer", "cement_model", "cement_lot", "udi_di",
    "description", "state",
)
# The extract records severity, not the patient's outcome: only a death is known from it.
SERIOUSNESS = {"minor": "non-serious", "major": "serious (HTG108 major complication)",
               "fatal": "serious (fatal)"}
OUTCOME_UNKNOWN = "not in the extract: complete from the notes"
OUTCOMES = {"fatal": "fatal"}


def _device_related(design: RegulatorDesign) -> sa.ColumnElement[bool]:
    complication = schema.complication
    return sa.or_(*[
        sa.and_(complication.c.event_type.in_(rule.event_types),
                complication.c.severity.in_(rule.severities))
        for rule in design.rules
    ])


def _age_band(age: int) -> str:
    low = age // 5 * 5
    return f"{low}-{low + 4}"


def _product_fields(reference: ProductReference | None, name: str | None, prefix: str) -> dict:
    product = reference.products.get(name) if reference and name else None
    return {f"{prefix}_product": name,
            f"{prefix}_manufacturer": product.manufacturer if product else None,
            f"{prefix}_model": product.model if product else None}


def build_draft(row: sa.RowMapping, reference: ProductReference | None) -> dict[str, Any]:
    """Return the pre-filled report for one complication joined with its procedure."""
    event = str(row["event_type"]).replace("_", " ")
    devices = ", ".join(p for p in (row["balloon_product"], row["cement_product"]) if p)
    draft = {
        "report_id": f"KW-YC-{row['site_id']}-{row['complication_id']}",
        "site_id": row["site_id"],
        "site_complication_ref": row["complication_id"],
        "site_procedure_ref": row["procedure_id"],
        "event_date": str(row["event_date"])[:10],
        "procedure_date": str(row["procedure_date"])[:10],
        "event_type": row["event_type"],
        "severity": row["severity"],
        "seriousness": SERIOUSNESS.get(row["severity"], row["severity"]),
        "outcome": OUTCOMES.get(row["severity"], OUTCOME_UNKNOWN),
        "symptomatic": bool(row["symptomatic"]),
        "patient_sex": row["sex"],
        "patient_age_band": _age_band(int(row["age_years"])),
        **_product_fields(reference, row["balloon_product"], "balloon"),
        **_product_fields(reference, row["cement_product"], "cement"),
        "cement_lot": row["cement_lot"],
        "udi_di": row["udi_di"],
        "description": (
            f"{event.capitalize()} ({row['severity']}) on {str(row['event_date'])[:10]} after "
            f"balloon kyphoplasty on {str(row['procedure_date'])[:10]}"
            + (f"; devices: {devices}" if devices else "; device not recorded in the extract")
            + (f"; cement lot {row['cement_lot']}" if row["cement_lot"] else "")
            + ". Drafted by kyphowatch from the registry extract; check against the notes."
        ),
    }
    return draft


def draft_new(conn: sa.Connection, design: RegulatorDesign,
              reference: ProductReference | None, now: datetime | None = None) -> int:
    """Draft what is new and bring the unsent drafts up to date; return the new drafts."""
    return sync_drafts(conn, design, reference, now)["new"]


# The draft's facts taken from the extract. A change to any of them is a correction; the
# rest is wording or comes from the product reference file (manufacturer, model), whose
# changes never make a sent report look corrected (review: an upgrade's new wording did).
EXTRACT_FACTS = (
    "site_complication_ref", "site_procedure_ref", "event_date", "procedure_date",
    "event_type", "severity", "symptomatic", "patient_sex", "patient_age_band",
    "balloon_product", "cement_product", "cement_lot", "udi_di",
)


def _facts(draft: str | None) -> dict[str, Any] | None:
    if draft is None:
        return None
    values = json.loads(draft)
    return {name: values.get(name) for name in EXTRACT_FACTS}


def sync_drafts(conn: sa.Connection, design: RegulatorDesign,
                reference: ProductReference | None, now: datetime | None = None
                ) -> dict[str, Any]:
    """Draft every device-related complication that has no draft, and follow the extract.

    Returns the counts ``new``, ``updated`` (an unsent draft rewritten after a correction),
    ``withdrawn`` (no longer device-related) and ``sent_changed``: the complication ids of
    sent drafts whose complication has changed since (a follow-up report to the MHRA).
    """
    complication, procedure, ledger = schema.complication, schema.procedure, schema.yellow_card
    related = _device_related(design)
    rows = conn.execute(
        sa.select(complication.c.complication_id, complication.c.procedure_id,
                  complication.c.site_id, complication.c.event_date, complication.c.event_type,
                  complication.c.severity, complication.c.symptomatic,
                  procedure.c.procedure_date, procedure.c.age_years, procedure.c.sex,
                  procedure.c.balloon_product, procedure.c.cement_product,
                  procedure.c.cement_lot, procedure.c.udi_di,
                  sa.case((related, True), else_=False).label("device_related"),
                  ledger.c.state.label("ledger_state"), ledger.c.draft.label("ledger_draft"))
        .select_from(complication.join(
            procedure, procedure.c.procedure_id == complication.c.procedure_id))
        .outerjoin(ledger, ledger.c.complication_id == complication.c.complication_id)
        # Both sides of the OR on the complication's own columns (the ledger's keys as a
        # hashed subquery): the few candidates are picked from the complications before
        # the join with the procedures, not after joining every complication.
        .where(sa.or_(related, complication.c.complication_id.in_(
            sa.select(ledger.c.complication_id))))
        .order_by(complication.c.complication_id)
    ).mappings().all()
    now = now or datetime.now(UTC)
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    counts: dict[str, Any] = {"new": 0, "updated": 0, "withdrawn": 0, "sent_changed": []}
    for row in rows:
        key = row["complication_id"]
        state = row["ledger_state"]
        draft = json.dumps(build_draft(row, reference), sort_keys=True) \
            if row["device_related"] else None
        if state is None:
            # The key makes a draft exactly once, also against a concurrent run.
            counts["new"] += conn.execute(insert(ledger).values(
                complication_id=key, site_id=row["site_id"], event_date=row["event_date"],
                event_type=row["event_type"], severity=row["severity"], draft=draft,
                state="drafted", drafted_at=now,
            ).on_conflict_do_nothing(index_elements=["complication_id"])
                .returning(ledger.c.complication_id)).first() is not None
        elif state == "sent":
            if _facts(draft) != _facts(row["ledger_draft"]):
                counts["sent_changed"].append(key)
        elif draft is None:
            if state != "withdrawn":
                conn.execute(ledger.update().where(ledger.c.complication_id == key,
                                                   ledger.c.state.in_(UNSENT))
                             .values(state="withdrawn"))
                counts["withdrawn"] += 1
        elif _facts(draft) != _facts(row["ledger_draft"]) or state == "withdrawn":
            conn.execute(ledger.update().where(ledger.c.complication_id == key,
                                               ledger.c.state.in_(UNSENT))
                         .values(draft=draft, event_date=row["event_date"],
                                 event_type=row["event_type"], severity=row["severity"],
                                 state="drafted", drafted_at=now, exported_at=None))
            counts["updated"] += 1
        elif draft != row["ledger_draft"]:
            # The same facts in new wording (or new reference names): the text follows,
            # the state stays (nothing for the site to enter again).
            conn.execute(ledger.update().where(ledger.c.complication_id == key,
                                               ledger.c.state.in_(UNSENT))
                         .values(draft=draft))
    if counts["updated"] or counts["withdrawn"] or counts["sent_changed"]:
        log.info("yellow card: %d draft(s) rewritten after corrections, %d withdrawn, %d sent "
                 "report(s) changed since sending", counts["updated"], counts["withdrawn"],
                 len(counts["sent_changed"]))
    return counts


def overdue_by_site(conn: sa.Connection, design: RegulatorDesign, as_of: date | None
                    ) -> dict[str, list[dict[str, Any]]]:
    """Return, per site, the device-related major/fatal events without a sent draft in time."""
    complication, ledger = schema.complication, schema.yellow_card
    if as_of is None:
        newest = conn.execute(sa.select(sa.func.max(schema.procedure.c.procedure_date))).scalar()
        if newest is None:
            return {}
        as_of = date.fromisoformat(str(newest)[:10])
    cutoff = as_of - timedelta(days=design.send_within_days)
    rows = conn.execute(
        sa.select(complication.c.site_id, complication.c.complication_id,
                  complication.c.event_date)
        .outerjoin(ledger, ledger.c.complication_id == complication.c.complication_id)
        .where(_device_related(design), complication.c.severity.in_(SERIOUS),
               complication.c.event_date < cutoff,
               sa.or_(ledger.c.state.is_(None), ledger.c.state != "sent"))
        .order_by(complication.c.site_id, complication.c.event_date)
    ).all()
    overdue: dict[str, list[dict[str, Any]]] = {}
    for site_id, complication_id, event_date in rows:
        overdue.setdefault(site_id, []).append(
            {"complication_id": complication_id, "event_date": str(event_date)[:10]})
    return overdue


def _design(settings: Settings) -> RegulatorDesign:
    design = parse_beyond_site(load_profile(settings.profile_path)).regulator
    if design is None:
        raise InputRejected(f"profile {settings.profile_path} has no beyond_site.regulator "
                            "section: nothing is device-related")
    return design


def _listed(conn: sa.Connection, site: str | None, states: tuple[str, ...]) -> list[dict]:
    ledger = schema.yellow_card
    query = sa.select(ledger).where(ledger.c.state.in_(states)).order_by(
        ledger.c.site_id, ledger.c.event_date, ledger.c.complication_id)
    if site:
        query = query.where(ledger.c.site_id == site)
    return [dict(row) for row in conn.execute(query).mappings()]


def _csv_cell(value: Any) -> str:
    """Render a value for CSV, neutralising spreadsheet formulas (CSV injection)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def export(settings: Settings, out_dir: Path, site: str | None = None) -> dict[str, Any]:
    """Draft what is new, then write each site's unsent drafts as JSON and CSV files."""
    from pipelines.db import open_warehouse, require_warehouse

    require_warehouse(settings.db_url)
    design = _design(settings)
    reference = reference_for(settings.expectations_dir)
    engine = open_warehouse(settings.db_url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            synced = sync_drafts(conn, design, reference, now)
            drafted = synced["new"]
            rows = _listed(conn, site, ("drafted", "exported"))
            by_site: dict[str, list[dict]] = {}
            for row in rows:
                by_site.setdefault(row["site_id"], []).append(row)
            out_dir.mkdir(parents=True, exist_ok=True)
            files = []
            stamp = now.strftime("%Y%m%d")
            for site_id, items in sorted(by_site.items()):
                drafts = [{**json.loads(item["draft"]), "state": item["state"]} for item in items]
                json_path = out_dir / f"yellow_card_{site_id}_{stamp}.json"
                json_path.write_text(json.dumps(
                    {"site_id": site_id, "generated_at": now.isoformat(), "drafts": drafts,
                     "instructions": "Enter each draft in the MHRA Yellow Card online service "
                                     "(device incident report), then run: kyphowatch regulator "
                                     "mark-sent COMPLICATION_ID --by NAME --reference MHRA_REF"},
                    indent=2, sort_keys=True) + "\n", encoding="utf-8")
                csv_path = out_dir / f"yellow_card_{site_id}_{stamp}.csv"
                with csv_path.open("w", newline="", encoding="utf-8") as handle:
                    writer = csv.writer(handle)
                    writer.writerow(CSV_FIELDS)
                    for draft in drafts:
                        writer.writerow([_csv_cell(draft.get(name)) for name in CSV_FIELDS])
                files += [str(json_path), str(csv_path)]
            ledger = schema.yellow_card
            ids = [row["complication_id"] for row in rows if row["state"] == "drafted"]
            for start in range(0, len(ids), 500):
                conn.execute(ledger.update()
                             .where(ledger.c.complication_id.in_(ids[start:start + 500]))
                             .values(state="exported", exported_at=now))
    finally:
        engine.dispose()
    return {"new_drafts": drafted, "updated_drafts": synced["updated"],
            "withdrawn_drafts": synced["withdrawn"], "exported": len(rows),
            "sites": len(by_site), "files": files,
            "sent_changed": synced["sent_changed"]}


def mark_sent(settings: Settings, complication_id: str, *, by: str,
              mhra_reference: str | None) -> dict[str, Any]:
    """Record that a draft was submitted (by whom, with the MHRA's reference)."""
    from pipelines.db import open_warehouse, require_warehouse

    require_warehouse(settings.db_url)
    ledger = schema.yellow_card
    engine = open_warehouse(settings.db_url)
    try:
        with engine.begin() as conn:
            row = conn.execute(sa.select(ledger.c.state).where(
                ledger.c.complication_id == complication_id)).scalar_one_or_none()
            if row is None:
                raise InputRejected(f"no Yellow Card draft for complication {complication_id!r} "
                                    "(kyphowatch regulator list shows the drafts)")
            if row == "sent":
                raise InputRejected(f"the draft for {complication_id!r} is already marked sent")
            if row == "withdrawn":
                raise InputRejected(f"the draft for {complication_id!r} was withdrawn: the "
                                    "extract no longer records a device-related event")
            conn.execute(ledger.update().where(ledger.c.complication_id == complication_id)
                         .values(state="sent", sent_at=datetime.now(UTC), sent_by=by,
                                 mhra_reference=mhra_reference))
    finally:
        engine.dispose()
    return {"complication_id": complication_id, "state": "sent", "by": by,
            "mhra_reference": mhra_reference}


# --- command line -------------------------------------------------------------------------


def _json_default(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _export(args: argparse.Namespace) -> int:
    settings = load_settings(db_url=args.db)
    result = export(settings, Path(args.out), args.site)
    print(json.dumps(result, indent=2))
    if result["sent_changed"]:
        print(f"kyphowatch: note: {len(result['sent_changed'])} report(s) already sent to the "
              "MHRA changed in the extract since (" + ", ".join(result["sent_changed"][:10])
              + "): submit a follow-up report for each", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    from pipelines.db import reading, require_warehouse

    settings = load_settings(db_url=args.db)
    require_warehouse(settings.db_url)
    states = (args.state,) if args.state else STATES
    with reading(settings.db_url) as conn:
        rows = _listed(conn, args.site, states)
    if args.json:
        print(json.dumps([{k: v for k, v in row.items() if k != "draft"} | {
            "draft": json.loads(row["draft"])} for row in rows], indent=2,
            default=_json_default))
        return 0
    print(f"{'complication':<16} {'site':<8} {'event date':<10} {'event type':<16} "
          f"{'severity':<8} state")
    for row in rows:
        print(f"{row['complication_id']:<16} {row['site_id']:<8} {str(row['event_date'])[:10]:<10} "
              f"{row['event_type']:<16} {row['severity']:<8} {row['state']}")
    return 0


def _mark_sent(args: argparse.Namespace) -> int:
    settings = load_settings(db_url=args.db)
    print(json.dumps(mark_sent(settings, args.complication_id, by=args.by,
                               mhra_reference=args.reference), indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``regulator export|list|mark-sent`` to the ``kyphowatch`` parser."""
    parser = subparsers.add_parser("regulator", help="Yellow Card drafts for device-related events")
    commands = parser.add_subparsers(dest="regulator_command", metavar="ACTION", required=True)

    def add(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--db", help="warehouse URL (default: KYPHOWATCH_DB_URL)")
        sub.set_defaults(handler=handler)
        return sub

    sub = add("export", _export, "draft new device-related events; write unsent drafts per site")
    sub.add_argument("--out", default="var/regulator", help="output directory")
    sub.add_argument("--site", help="only this site")
    sub = add("list", _list, "list the drafts and their submission state")
    sub.add_argument("--site", help="only this site")
    sub.add_argument("--state", choices=STATES)
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub = add("mark-sent", _mark_sent, "record that a draft was submitted to the MHRA")
    sub.add_argument("complication_id", help="the site's complication id of the draft")
    sub.add_argument("--by", required=True, help="who submitted it")
    sub.add_argument("--reference", help="the MHRA's reference for the report")
