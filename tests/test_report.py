"""The HTML report and the analyst views, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import sqlalchemy as sa

from pipelines.cli import main as cli_main
from pipelines.db import make_engine
from pipelines.report import write_report
from pipelines.schema import file_ledger, pending_complication, quarantine
from pipelines.surveillance.engine import run_monitor
from tests.test_engine import build_sites
from tests.test_outcomes import complication_row, digest, insert, procedure_row

SECRET_PATIENT_REF = "NHS-9434765919"


def _data_quality_rows(engine):
    now = datetime(2024, 1, 2, tzinfo=UTC)
    with engine.begin() as conn:
        for row in (
            dict(source_checksum=digest("f1"), file_name="procedures_20240101.csv",
                 kind="procedures", extract_ts="20240101T000000", status="loaded",
                 rows_read=10, rows_inserted=9, rows_quarantined=1,
                 quarantine_reasons=json.dumps({"bad_date": 1}), processed_at=now),
            dict(source_checksum=digest("f2"), file_name="complications_x.csv", kind=None,
                 status="rejected", reason="missing column event_date", processed_at=now),
        ):
            conn.execute(file_ledger.insert().values(**row))
        conn.execute(quarantine.insert().values(
            source_checksum=digest("f1"), record_number=5, file_name="procedures_20240101.csv",
            kind="procedures", site_id="S001", record_id="P-bad",
            raw_values=json.dumps({"patient_ref": SECRET_PATIENT_REF, "procedure_date": "x"}),
            reasons=json.dumps(["bad_date"]), quarantined_at=now))
        pending = complication_row("C-pending", "P-unknown", "S001", date(2023, 5, 1))
        if "source_record" in pending_complication.c:
            pending["source_record"] = 1
        conn.execute(pending_complication.insert().values(**pending))


def test_report_renders_without_patient_references(sqlite_url, settings_for, tmp_path):
    engine = make_engine(sqlite_url)
    build_sites(engine, sites=4, per_site=300, leak={"S004": 0.35}, seed=2)
    _data_quality_rows(engine)
    settings = settings_for(sqlite_url)
    run_monitor(settings)
    path = write_report(settings, tmp_path / "out")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "Funnel plots" in text and "CUSUM charts" in text and "p-charts" in text
    assert text.count("data:image/png;base64,") >= 3
    assert "S004" in text and "bad_date" in text and "missing column event_date" in text
    assert "<script" not in text and "http://" not in text.replace("https://", "")
    assert SECRET_PATIENT_REF not in text
    with engine.connect() as conn:
        hashes = conn.execute(sa.text("select patient_hash, operator_hash from procedure")).all()
    assert not any(h in text for row in hashes for h in row if h)


def test_report_command(sqlite_url, tmp_path, capsys, monkeypatch):
    engine = make_engine(sqlite_url)
    insert(engine, [procedure_row("P1", "S001", date(2024, 1, 1))])
    monkeypatch.setenv("KYPHOWATCH_DEMO", "1")
    assert cli_main(["report", "--db", sqlite_url, "--out", str(tmp_path),
                     "--as-of", "2024-03-01"]) == 0
    assert (tmp_path / "kyphowatch-report-2024-03-01.html").exists()
    assert cli_main(["report", "--db", sqlite_url, "--as-of", "March"]) == 2


def test_views_return_rows(db_url, settings_for):
    engine = make_engine(db_url)
    build_sites(engine, sites=2, per_site=200, leak={"S002": 0.4}, seed=4)
    insert(engine, [procedure_row("PX", "S001", date(2023, 1, 3), mdt=False)],
           [complication_row("CX", "PX", "S001", date(2023, 1, 3), "paralysis",
                             severity="major", symptomatic=True)])
    _data_quality_rows(engine)
    run_monitor(settings_for(db_url))
    with engine.connect() as conn:
        def rows(view):
            return [dict(r._mapping) for r in conn.execute(
                sa.select(sa.literal_column("*")).select_from(sa.table(view)))]

        rates = rows("v_site_metric_rates")
        assert {r["site_id"] for r in rates} == {"S001", "S002"}
        jan = next(r for r in rates if r["site_id"] == "S001" and r["month"] == "2023-01")
        assert jan["major_events"] >= 1 and jan["mdt_missing"] == 1
        assert sum(r["procedures"] for r in rates) == 401
        assert sum(r["leaks"] for r in rates) > 0
        assert rows("v_active_signals")
        assert [r["reasons"] for r in rows("v_quarantine_summary")] == ['["bad_date"]']
        assert {r["status"] for r in rows("v_file_ledger_recent")} == {"loaded", "rejected"}
        assert [r["complication_id"] for r in rows("v_pending_complications")] == ["C-pending"]
        for view in ("v_quarantine_summary", "v_file_ledger_recent"):
            assert SECRET_PATIENT_REF not in json.dumps(rows(view), default=str)
