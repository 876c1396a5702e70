"""Operators, devices and Yellow Cards end to end: ingest -> monitor -> alerts, report, export."""

from __future__ import annotations

import csv
import json
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.alerts import deliver_outbox, sync_alerts
from pipelines.alerts.regulator import export, mark_sent
from pipelines.cli import main
from pipelines.db import make_engine
from pipelines.errors import InputRejected
from pipelines.ingest import ingest_paths
from pipelines.mailsink import MailSink
from pipelines.surveillance.engine import run_monitor
from tests.beyond_helpers import BAD_LOT, NEW_OPERATOR, write_registry

LEAD = "lead.s001@example.org"
SAFETY = "safety@example.org"


@pytest.fixture
def registry(tmp_path):
    return write_registry(tmp_path / "in")


def _settings(settings_for, db_url, **extra):
    return settings_for(db_url, recipients_safety=(SAFETY,), recipients_data=("data@example.org",),
                        clinical_leads={"S001": (LEAD,)}, **extra)


def _rows(db_url, table):
    engine = make_engine(db_url)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(table)).mappings()]
    engine.dispose()
    return rows


def test_new_operator_and_bad_lot_are_found_and_go_to_the_right_people(
        registry, db_url, settings_for, tmp_path):
    with MailSink(tmp_path / "mail") as sink:
        settings = _settings(settings_for, db_url, smtp_url=sink.url)
        ingest_paths(settings, registry["paths"])
        run_monitor(settings)
        sync_alerts(settings)
        deliver_outbox(settings)
        messages = sink.messages()
    operators = _rows(db_url, schema.operator_chart)
    flagged = [r for r in operators if r["signal_date"] is not None]
    # the planted learner at S001 and nobody at the other sites
    assert {r["site_id"] for r in flagged} == {"S001"}
    assert all(r["operator"].startswith("OP-") and len(r["operator"]) == 13 for r in operators)
    lots = {r["lot"]: r for r in _rows(db_url, schema.device_lot_test)}
    assert lots[BAD_LOT]["signal_date"] is not None and lots[BAD_LOT]["sites"] == 4
    assert not [lot for lot, r in lots.items() if lot != BAD_LOT and r["signal_date"]]
    alerts = _rows(db_url, schema.alert)
    kinds = {a["kind"] for a in alerts}
    assert {"training_review", "device"} <= kinds
    training = [m for m in messages if "training review" in m["Subject"]]
    assert training and all(m["To"] == LEAD for m in training)
    assert not [m for m in messages if m["To"] == LEAD and "training review" not in m["Subject"]]
    device = [m for m in messages if "device" in m["Subject"]]
    assert device and all(m["To"] == SAFETY for m in device)


def test_no_raw_operator_reference_in_alerts_report_or_exports(registry, sqlite_url, settings_for,
                                                                tmp_path, monkeypatch, capsys):
    from pipelines.report import write_report

    monkeypatch.setenv("KYPHOWATCH_DEMO", "1")
    with MailSink(tmp_path / "mail") as sink:
        settings = _settings(settings_for, sqlite_url, smtp_url=sink.url)
        ingest_paths(settings, registry["paths"])
        run_monitor(settings)
        sync_alerts(settings)
        deliver_outbox(settings)
    write_report(settings, tmp_path / "report")
    export(settings, tmp_path / "regulator")
    assert main(["beyond-report", "--db", sqlite_url, "--out", str(tmp_path / "beyond")]) == 0
    devices = (tmp_path / "beyond" / "devices.html").read_text()
    assert f"<tr class='flag' id='lot-{BAD_LOT}-" in devices
    s001 = (tmp_path / "beyond" / "operators" / "S001.html").read_text()
    assert "confidential" in s001 and s001.count("<tr class='flag'") >= 1
    # raw operator references and their stored digests; the pseudonym is OP- and 10 hex digits
    secrets = {NEW_OPERATOR} | {f"OP-S00{s}-{i}" for s in range(1, 5) for i in range(3)}
    secrets |= {h for h in (r["operator_hash"] for r in _rows(sqlite_url, schema.procedure)) if h}
    texts = [json.dumps([a["title"], a["payload"]]) for a in _rows(sqlite_url, schema.alert)]
    texts += [p.read_text(errors="replace") for p in (tmp_path / "mail").glob("*.eml")]
    texts += [p.read_text(errors="replace") for p in (tmp_path / "report").rglob("*")
              if p.is_file() and p.suffix in (".html", ".csv", ".json", ".svg", ".txt")]
    texts += [p.read_text() for p in (tmp_path / "regulator").iterdir()]
    texts += [p.read_text() for p in (tmp_path / "beyond").rglob("*.html")]
    assert any("OP-" in t for t in texts)  # operators do appear, by pseudonym
    assert any("Training review" in t for t in texts)
    for text in texts:
        leaked = [s for s in secrets if s in text]
        assert not leaked, leaked[:3]
    # the shared report and the analysts' drill-down carry no operator pseudonym at all:
    # a training review is for the site's clinical lead (docs/report.md)
    shared = [p.read_text(errors="replace") for p in (tmp_path / "report").rglob("*")
              if p.is_file() and p.suffix in (".html", ".csv", ".json", ".svg", ".txt")]
    capsys.readouterr()
    assert main(["site", "S001", "--db", sqlite_url, "--json"]) == 0
    shared.append(capsys.readouterr().out)
    assert not [t[:80] for t in shared if "OP-" in t or "Training review" in t]
    # each alert points where its evidence is: devices at the devices page, a training
    # review at the confidential pages' command, never at the shared site page
    where = {a["kind"]: json.loads(a["payload"])["where"] if isinstance(a["payload"], str)
             else a["payload"]["where"] for a in _rows(sqlite_url, schema.alert)
             if a["kind"] in ("training_review", "device")}
    assert where["device"].startswith(str(Path(settings.report_dir) / "latest" / "devices.html"))
    assert "kyphowatch beyond-report" in where["training_review"]
    assert "sites/" not in where["training_review"]
    # nor do the analysts' views count one (user audit: v_chart_status did)
    with sa.create_engine(sqlite_url).connect() as conn:
        counted = {(r.site_id, r.metric): r.open_alerts for r in conn.execute(
            sa.text("SELECT site_id, metric, open_alerts FROM v_chart_status"))}
    live = [a for a in _rows(sqlite_url, schema.alert) if a["state"] in ("open", "acknowledged")]
    reviewed = {(a["site_id"], a["metric"]) for a in live
                if a["kind"] == "training_review"} & set(counted)
    assert reviewed  # a charted site and metric with a training review open
    for key in reviewed:
        assert counted[key] == sum((a["site_id"], a["metric"]) == key
                                   and a["kind"] != "training_review" for a in live)


def test_each_device_related_event_is_drafted_exactly_once(registry, db_url, settings_for,
                                                           tmp_path):
    settings = _settings(settings_for, db_url)
    ingest_paths(settings, registry["paths"])
    planted = len(registry["device_related"])
    run_monitor(settings)
    assert len(_rows(db_url, schema.yellow_card)) == planted  # drafted by the monitor
    first = export(settings, tmp_path / "out1")
    run_monitor(settings)  # a rerun drafts nothing new
    assert len(_rows(db_url, schema.yellow_card)) == planted
    # the same complications delivered again, corrected (a later extract stamp)
    again = registry["paths"][1].with_name("complications_29991231.csv")
    again.write_text(registry["paths"][1].read_text().replace("balloon_rupture,false",
                                                              "balloon_rupture,true"))
    [corrected] = ingest_paths(settings, [again]).files
    assert corrected.updated > 0
    second = export(settings, tmp_path / "out2")
    drafts = _rows(db_url, schema.yellow_card)
    assert sorted(d["complication_id"] for d in drafts) == sorted(registry["device_related"])
    assert (first["new_drafts"], first["exported"]) == (0, planted)
    assert (second["new_drafts"], second["exported"]) == (0, planted)  # exported, not sent
    # the unsent drafts follow the correction (user audit: frozen at the first draft)
    ruptures = [c for c in registry["device_related"] if c.startswith("R")]
    assert second["updated_drafts"] == len(ruptures) > 0
    assert all(json.loads(d["draft"])["symptomatic"] for d in drafts
               if d["complication_id"] in ruptures)
    [json_file] = (tmp_path / "out1").glob(f"yellow_card_{drafts[0]['site_id']}_*.json")
    content = json.loads(json_file.read_text())
    major = [d for d in content["drafts"] if d["site_complication_ref"] == "CMAJOR"]
    if major:
        assert major[0]["cement_manufacturer"] == "Example Spine Ltd"
        assert major[0]["seriousness"].startswith("serious")
        assert major[0]["outcome"].startswith("not in the extract")  # never made up
    csv_files = list((tmp_path / "out1").glob("*.csv"))
    rows = [r for path in csv_files for r in csv.DictReader(path.open())]
    assert len(rows) == len(registry["device_related"])
    assert {r["udi_di"] for r in rows} == {"00643169007222"}
    assert all(r["state"] == "drafted" for r in rows)  # exported from now on
    assert {d["state"] for d in drafts} == {"exported"}


def test_a_draft_follows_corrections_until_it_is_sent(registry, sqlite_url, settings_for,
                                                     tmp_path, capsys):
    """A complication no longer device-related is withdrawn (never exported, cannot be
    marked sent) and drafted again if corrected back; a sent draft is never rewritten, and
    a later correction to it is named for a follow-up report."""
    settings = _settings(settings_for, sqlite_url)
    ingest_paths(settings, registry["paths"])
    run_monitor(settings)
    export(settings, tmp_path / "out1")
    assert mark_sent(settings, "CMAJOR", by="dr.lee", mhra_reference="YC-1")["state"] == "sent"
    # a sent draft in an older wording (before an upgrade) is not a correction (review)
    engine = make_engine(sqlite_url)
    with engine.begin() as conn:
        ledger = schema.yellow_card
        old = json.loads(conn.scalar(sa.select(ledger.c.draft).where(
            ledger.c.complication_id == "CMAJOR")))
        old.pop("seriousness")
        old["outcome"] = "serious (HTG108 major complication)"
        conn.execute(ledger.update().where(ledger.c.complication_id == "CMAJOR")
                     .values(draft=json.dumps(old, sort_keys=True)))
    assert export(settings, tmp_path / "out1b")["sent_changed"] == []
    sent = {d["complication_id"]: d["draft"] for d in _rows(sqlite_url, schema.yellow_card)}
    rupture = next(c for c in registry["device_related"] if c.startswith("R"))
    text = registry["paths"][1].read_text()
    line = next(x for x in text.splitlines() if x.startswith(rupture + ","))
    major = next(x for x in text.splitlines() if x.startswith("CMAJOR,"))
    corrected = registry["paths"][1].with_name("complications_29991231.csv")
    corrected.write_text(text.replace(line, line.replace("balloon_rupture", "other"))
                         .replace(major, major.replace(",major,", ",fatal,")))
    ingest_paths(settings, [corrected])
    capsys.readouterr()
    assert main(["regulator", "export", "--db", sqlite_url, "--out",
                 str(tmp_path / "out2")]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["withdrawn_drafts"] == 1 and result["sent_changed"] == ["CMAJOR"]
    assert "follow-up report" in out.err and "CMAJOR" in out.err
    ledger = {d["complication_id"]: d for d in _rows(sqlite_url, schema.yellow_card)}
    assert ledger[rupture]["state"] == "withdrawn"
    assert ledger["CMAJOR"]["state"] == "sent" and ledger["CMAJOR"]["draft"] == sent["CMAJOR"]
    exported = [r["site_complication_ref"] for path in (tmp_path / "out2").glob("*.csv")
                for r in csv.DictReader(path.open())]
    assert rupture not in exported and "CMAJOR" not in exported
    with pytest.raises(InputRejected, match="withdrawn"):
        mark_sent(settings, rupture, by="dr.lee", mhra_reference=None)
    # corrected back: drafted again, with the event as the extract now has it
    again = registry["paths"][1].with_name("complications_30001231.csv")
    again.write_text("\n".join([text.splitlines()[0], line]) + "\n")  # that row only
    ingest_paths(settings, [again])
    third = export(settings, tmp_path / "out3")
    assert third["updated_drafts"] == 1
    ledger = {d["complication_id"]: d for d in _rows(sqlite_url, schema.yellow_card)}
    assert ledger[rupture]["state"] == "exported"


def test_overdue_major_event_raises_data_quality_until_marked_sent(registry, sqlite_url,
                                                                   settings_for, tmp_path):
    from pipelines.alerts.beyond import beyond_site_conditions
    from pipelines.surveillance.profile import load_profile

    settings = _settings(settings_for, sqlite_url)
    ingest_paths(settings, registry["paths"])
    run_monitor(settings)
    profile = load_profile(settings.profile_path)
    engine = make_engine(sqlite_url)
    late = date(2025, 1, 1)  # CMAJOR (2024-06-23) is more than 30 days old then

    def overdue(as_of):
        with engine.connect() as conn:
            return [c for c in beyond_site_conditions(conn, settings, profile, as_of)
                    if c.dedupe_key.startswith("yellow_card_overdue:")]

    assert overdue(registry["end"]) == []  # still within 30 days
    [condition] = overdue(late)
    assert condition.payload["events"] == 1 and condition.kind == "data_quality"
    mark_sent(settings, "CMAJOR", by="dr lead", mhra_reference="YC-2024-0001")
    assert overdue(late) == []
    engine.dispose()


def test_regulator_command_line(registry, sqlite_url, settings_for, tmp_path, capsys,
                                monkeypatch):
    monkeypatch.setenv("KYPHOWATCH_DEMO", "1")
    settings = _settings(settings_for, sqlite_url)
    ingest_paths(settings, registry["paths"])
    assert main(["regulator", "export", "--db", sqlite_url, "--out", str(tmp_path / "x")]) == 0
    capsys.readouterr()
    assert main(["regulator", "list", "--db", sqlite_url, "--json", "--state", "exported"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == len(registry["device_related"])
    assert all("patient" not in json.dumps(r["draft"]).replace("patient_age_band", "").replace(
        "patient_sex", "") for r in listed)
    assert main(["regulator", "mark-sent", "CMAJOR", "--by", "lead", "--db", sqlite_url]) == 0
    assert main(["regulator", "mark-sent", "CMAJOR", "--by", "lead", "--db", sqlite_url]) == 2
    assert main(["regulator", "mark-sent", "NOPE", "--by", "lead", "--db", sqlite_url]) == 2
    assert "no Yellow Card draft" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'absent.db'}"
    assert main(["regulator", "list", "--db", missing]) == 3
    assert main(["regulator", "export", "--db", missing, "--out", str(tmp_path / "y")]) == 3


def test_operator_and_device_keys_carry_the_profile_and_old_keys_are_not_resent(
        registry, sqlite_url, settings_for):
    """Issue 13 item 6: the key names the profile; an alert stored by the previous release
    under the key without it (and a payload without the profile) is read, not re-sent."""
    settings = _settings(settings_for, sqlite_url)
    ingest_paths(settings, registry["paths"])
    run_monitor(settings)
    created = sync_alerts(settings).created
    beyond = [a for a in _rows(sqlite_url, schema.alert) if a["alert_id"] in created
              and a["kind"] in ("training_review", "device")]
    assert {a["dedupe_key"].split(":")[0] for a in beyond} == {"training", "device"}
    assert all(":htg108:" in a["dedupe_key"] for a in beyond)
    engine = make_engine(sqlite_url)
    with engine.begin() as conn:  # as the previous release stored them
        for row in beyond:
            payload = json.loads(row["payload"])
            payload.pop("profile_name"), payload.pop("profile_version")
            conn.execute(schema.alert.update()
                         .where(schema.alert.c.alert_id == row["alert_id"])
                         .values(dedupe_key=row["dedupe_key"].replace(":htg108:", ":", 1),
                                 payload=json.dumps(payload)))
    engine.dispose()
    result = sync_alerts(settings)
    assert result.created == [] and result.cleared == 0
    states = {a["alert_id"]: a["state"] for a in _rows(sqlite_url, schema.alert)}
    assert all(states[a["alert_id"]] == "open" for a in beyond)
    # the adopted alerts now record the profile, so a later switch can retire them
    stamped = {a["alert_id"]: json.loads(a["payload"]).get("profile_version")
               for a in _rows(sqlite_url, schema.alert)}
    assert all(stamped[a["alert_id"]] == "1.4.0" for a in beyond)
