"""The analyst views (sql/views.sql): monitor-backed, identical on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.alerts.lifecycle import sync_alerts
from pipelines.db import make_engine
from pipelines.errors import InputRejected
from pipelines.evidence import status_rows
from pipelines.schema import chart_status, quarantine, site_month_metric
from pipelines.surveillance.engine import run_monitor
from pipelines.surveillance.profile import load_profile
from pipelines.surveillance.runs import read_stored
from tests.conftest import _pg_available
from tests.test_engine import build_sites
from tests.test_outcomes import complication_row, digest, insert, procedure_row

SECRET_PATIENT_REF = "NHS-9434765919"
DRIFTING = "S004"
VIEWS = {
    "v_active_signals", "v_chart_status", "v_file_ledger_recent", "v_open_alerts",
    "v_pending_complications", "v_quarantine_by_site", "v_quarantine_summary",
    "v_site_month_rates", "v_level_episodes",
}
# Column names that would mean a view leaks a reference, a raw row or an alert payload.
# (procedure_id / complication_id are the registry's record ids, not personal references.)
FORBIDDEN = {"patient_hash", "operator_hash", "patient_ref", "operator_ref", "raw_values",
             "payload"}


def build_registry(engine) -> date:
    """Four sites, S004 leaking at 35 %; S001 has a repeat patient and MDT gaps; one bad row."""
    end = build_sites(engine, sites=4, per_site=300, leak={DRIFTING: 0.35}, seed=2)
    again = [procedure_row(f"R{i}", "S001", date(2022, 2, 1) + timedelta(days=30 * i),
                           patient="repeat-patient", mdt=i % 2 == 0) for i in range(4)]
    insert(engine, again, [complication_row("CR1", "R1", "S001", date(2022, 3, 20),
                                            "new_fracture")])
    with engine.begin() as conn:
        conn.execute(quarantine.insert().values(
            source_checksum=digest("f1"), record_number=5, file_name="procedures_20240101.csv",
            kind="procedures", site_id="S002", record_id="P-bad",
            raw_values=json.dumps({"patient_ref": SECRET_PATIENT_REF, "procedure_date": "x"}),
            reasons=json.dumps(["bad_date"]), quarantined_at=datetime(2024, 1, 2, tzinfo=UTC)))
    return end


def alert_settings(settings_for, url):
    # Channels configured but nothing listening: sync queues outbox rows, nothing is sent.
    return settings_for(url, smtp_url="smtp://127.0.0.1:9", webhook_url="http://127.0.0.1:9/h",
                        recipients_safety=("safety@example.org",),
                        recipients_data=("data@example.org",))


def view_rows(engine, view: str) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(
            sa.select(sa.literal_column("*")).select_from(sa.table(view)))]


def table_rows(engine, table: sa.Table) -> list[dict]:
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(table))]
    return sorted(rows, key=lambda r: [str(r[c.name]) for c in table.primary_key])


def test_views_agree_with_the_monitor(db_url, settings_for):
    engine = make_engine(db_url)
    build_registry(engine)
    settings = alert_settings(settings_for, db_url)
    result = run_monitor(settings)
    sync_alerts(settings, result.as_of)

    status = {(r["site_id"], r["metric"]): r for r in view_rows(engine, "v_chart_status")}
    assert len(status) == len(result.site_metrics)
    assert status[(DRIFTING, "cement_leak")]["status"] == "alarm"
    assert status[(DRIFTING, "cement_leak")]["level_since"] is not None
    assert status[(DRIFTING, "cement_leak")]["open_alerts"] >= 1
    assert all(r["run_key"] == result.run_key and r["profile_name"] == "htg108"
               for r in status.values())
    # chart_status holds everything status_rows returns.
    profile = load_profile(settings.profile_path)
    assert set(status_rows(result, profile)[0]) <= {c.name for c in chart_status.columns}

    # The trust check: the months add up to the monitor's own n and events.
    months = view_rows(engine, "v_site_month_rates")
    sums: dict[tuple[str, str], list] = {}
    for r in months:
        total = sums.setdefault((r["site_id"], r["metric"]), [0, 0, 0.0])
        total[0] += r["units"]
        total[1] += r["events"]
        total[2] += r["expected"]
        assert r["rate"] == pytest.approx(r["events"] / r["units"])
        if r["expected"] > 0:
            assert r["o_to_e"] == pytest.approx(r["events"] / r["expected"])
        assert len(r["month"]) == 7 and r["as_of"] is not None
        as_of = result.as_of
        year, month = int(r["month"][:4]), int(r["month"][5:])
        assert r["months_before_as_of"] == (as_of.year - year) * 12 + as_of.month - month >= 0
    checked = 0
    for m in result.site_metrics:
        if m["kind"] == "sentinel" or not m.get("n"):
            assert (m["site_id"], m["metric"]) not in sums
            continue
        units, events, expected = sums[(m["site_id"], m["metric"])]
        assert (units, events) == (m["n"], m["events"]), m
        if m["kind"] == "outcome":
            assert expected == pytest.approx(m["expected"])
        checked += 1
    assert checked >= 4 * 4
    denominators = {r["metric"]: r["denominator"] for r in months}
    assert denominators["new_fracture"] == "patient"
    assert denominators["cement_leak"] == "procedure"

    # "Last 12 months" is one figure: the alarm e-mail's rate counts the units of the
    # months the view (and the report) counts (user audit: 5 of 18 against 4 of 17).
    recent = [0, 0]
    for r in months:
        if (r["site_id"], r["metric"]) == (DRIFTING, "cement_leak") and \
                r["months_before_as_of"] < 12:
            recent[0] += r["units"]
            recent[1] += r["events"]
    with engine.connect() as conn:
        payloads = [json.loads(p) if isinstance(p, str) else p for p in conn.scalars(
            sa.select(schema.alert.c.payload).where(schema.alert.c.site_id == DRIFTING,
                                                    schema.alert.c.metric == "cement_leak"))]
    told = [p["recent"] for p in payloads if p.get("recent")]
    assert told and all((t["n"], t["events"], t["months"]) == (*recent, 12) for t in told)

    opened = view_rows(engine, "v_open_alerts")
    assert any(r["site_id"] == DRIFTING and r["metric"] == "cement_leak" for r in opened)
    assert {r["email_status"] for r in opened} == {"queued"}
    assert {r["webhook_status"] for r in opened} == {"queued"}
    assert [(r["site_id"], r["kind"], r["rows_quarantined"], r["files"])
            for r in view_rows(engine, "v_quarantine_by_site")] == [("S002", "procedures", 1, 1)]
    assert view_rows(engine, "v_quarantine_summary")
    assert view_rows(engine, "v_active_signals")


def test_a_backfill_leaves_the_newer_picture_alone(db_url, settings_for):
    engine = make_engine(db_url)
    build_registry(engine)
    settings = settings_for(db_url)
    newest = run_monitor(settings)
    picture = (table_rows(engine, chart_status), table_rows(engine, site_month_metric))
    assert picture[0] and picture[1]

    backfill = run_monitor(settings, as_of=newest.as_of - timedelta(days=200))
    assert backfill.persisted and backfill.run_key != newest.run_key
    assert (table_rows(engine, chart_status), table_rows(engine, site_month_metric)) == picture

    # A rerun for the newest date replaces the picture (same figures, same run).
    run_monitor(settings)
    assert (table_rows(engine, chart_status), table_rows(engine, site_month_metric)) == picture
    # A look-ahead (a date after the newest procedure) is stored but is not the current
    # picture: on it every hold has run out, and alerts read the picture (user audit: a
    # mistyped year cleared a live alarm and froze the picture until the data caught up).
    signals = table_rows(engine, schema.signal)
    later = run_monitor(settings, as_of=newest.as_of + timedelta(days=40))
    assert later.persisted
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(schema.monitor_run).where(
            schema.monitor_run.c.run_key == later.run_key)) == 1
    assert (table_rows(engine, chart_status), table_rows(engine, site_month_metric)) == picture
    assert table_rows(engine, schema.signal) == signals
    # Within the grace (the extract's day, say) a later run is the picture, and an earlier
    # one (a plain `monitor`, or a reader computing the newest date) does not take it back.
    extract_day = run_monitor(settings, as_of=newest.as_of + timedelta(days=10))
    assert {r["run_key"] for r in table_rows(engine, chart_status)} == {extract_day.run_key}
    run_monitor(settings)
    assert {r["run_key"] for r in table_rows(engine, chart_status)} == {extract_day.run_key}
    # A date past every outcome window is rejected before any work (was a MemoryError).
    with pytest.raises(InputRejected, match="after the newest procedure"):
        run_monitor(settings, as_of=newest.as_of + timedelta(days=3650))
    # So is a date before the first procedure (it stored an empty run: user audit), for the
    # monitor and for a reader of stored runs alike.
    with pytest.raises(InputRejected, match="before the first procedure"):
        run_monitor(settings, as_of=newest.as_of - timedelta(days=3650))
    with engine.connect() as conn, pytest.raises(InputRejected, match="before the first"):
        read_stored(conn, load_profile(settings.profile_path),
                    newest.as_of - timedelta(days=3650))
    # A picture a look-ahead left behind (before this rule) yields to the next run on the data
    # (the one within the grace included: it is now before that picture).
    with engine.begin() as conn:
        for table in (chart_status, site_month_metric, schema.level_episode):
            conn.execute(table.update().values(as_of=later.as_of))
    run_monitor(settings)
    assert {r["as_of"] for r in view_rows(engine, "v_site_month_rates")} in (
        {newest.as_of}, {newest.as_of.isoformat()})
    assert {r["run_key"] for r in table_rows(engine, chart_status)} == {newest.run_key}


def test_no_view_exposes_references_or_raw_rows(db_url, settings_for):
    engine = make_engine(db_url)
    build_registry(engine)
    settings = alert_settings(settings_for, db_url)
    result = run_monitor(settings)
    sync_alerts(settings, result.as_of)
    inspector = sa.inspect(engine)
    assert set(inspector.get_view_names()) == VIEWS, "new view: add it to VIEWS after review"
    with engine.connect() as conn:
        hashes = {h for row in conn.execute(sa.text(
            "select patient_hash, operator_hash from procedure")) for h in row if h}
    for view in sorted(VIEWS):
        columns = {c["name"] for c in inspector.get_columns(view)}
        assert not columns & FORBIDDEN, (view, columns & FORBIDDEN)
        assert not any("hash" in c for c in columns), view
        text = json.dumps(view_rows(engine, view), default=str)
        assert SECRET_PATIENT_REF not in text, view
        assert not any(h in text for h in hashes), view


def _normalised(rows: list[dict]) -> list[tuple]:
    def value(v):
        if isinstance(v, datetime):
            return v.astimezone(UTC).isoformat() if v.tzinfo else v.isoformat()
        if isinstance(v, date):
            return v.isoformat()
        if isinstance(v, Decimal | float):
            return round(float(v), 9)
        return v

    return sorted((tuple(sorted((k, value(v)) for k, v in r.items())) for r in rows), key=repr)


def test_sqlite_and_postgres_return_identical_rows(sqlite_url, request, settings_for, capsys):
    ok, reason = _pg_available()
    if not ok:
        if os.environ.get("KYPHOWATCH_TEST_PG_URL") or os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required here: {reason}")
        with capsys.disabled():
            print(f"\nskipping the PostgreSQL half: {reason}")
        pytest.skip(reason)
    pg_url = request.getfixturevalue("pg_url")
    seen = {}
    for url in (sqlite_url, pg_url):
        engine = make_engine(url)
        build_registry(engine)
        settings = alert_settings(settings_for, url)
        result = run_monitor(settings)
        sync_alerts(settings, result.as_of)
        alerts = [{k: r[k] for k in r if not k.endswith("_at")}
                  for r in view_rows(engine, "v_open_alerts")]
        seen[url] = {
            "v_site_month_rates": _normalised(view_rows(engine, "v_site_month_rates")),
            "v_chart_status": _normalised(view_rows(engine, "v_chart_status")),
            "v_open_alerts": _normalised(alerts),
            "v_quarantine_by_site": _normalised(
                [{k: r[k] for k in r if k != "last_quarantined_at"}
                 for r in view_rows(engine, "v_quarantine_by_site")]),
        }
        engine.dispose()
    lite, pg = seen[sqlite_url], seen[pg_url]
    for view in lite:
        assert lite[view], view
        assert lite[view] == pg[view], view


def test_bulk_insert_round_trips_awkward_text_and_nulls(db_url):
    from pipelines.surveillance.engine import _bulk_insert

    engine = make_engine(db_url)
    row = {"site_id": "S001", "metric": "cement_leak", "status": "in_control",
           "reason": "tab\there, back\\slash,\nnew line; 'quote' \"double\" \\N",
           "baseline": 0.1, "signals_recent": 0, "signals_total": 0, "rate": 1 / 3}
    constants = {"profile_name": "p", "run_key": "k" * 64, "as_of": date(2024, 2, 29),
                 "profile_version": "1"}
    with engine.begin() as conn:
        _bulk_insert(conn, chart_status, [row], constants)
    (stored,) = table_rows(engine, chart_status)
    assert stored["reason"] == row["reason"] and stored["rate"] == row["rate"]
    assert stored["n"] is None and stored["cusum_chart"] is None
    assert str(stored["as_of"])[:10] == "2024-02-29"


def test_upgrading_a_version_3_warehouse_adds_the_tables_and_drops_the_old_view(db_url):
    from pipelines import schema

    engine = make_engine(db_url)
    with engine.begin() as conn:  # put the warehouse back as version 3 left it
        for view in VIEWS:
            conn.exec_driver_sql(f"DROP VIEW IF EXISTS {view}")
        conn.exec_driver_sql("CREATE VIEW v_site_metric_rates AS SELECT site_id FROM procedure")
        schema.chart_status.drop(conn)
        schema.site_month_metric.drop(conn)
        conn.execute(schema.schema_version.delete().where(schema.schema_version.c.version == 4))
        conn.execute(schema.schema_views.update().values(digest="version 3"))
    engine.dispose()
    engine = make_engine(db_url)
    inspector = sa.inspect(engine)
    assert {"chart_status", "site_month_metric"} <= set(inspector.get_table_names())
    assert set(inspector.get_view_names()) == VIEWS
    with engine.connect() as conn:
        assert max(conn.scalars(sa.select(schema.schema_version.c.version))) == schema.SCHEMA_VERSION
