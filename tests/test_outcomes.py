"""Outcome derivation: maturity, late complications, corrections, per-patient units.

Rows are inserted straight into the warehouse tables (the ingest is tested elsewhere), on
SQLite and on the real PostgreSQL.
"""

from __future__ import annotations

import hashlib
from datetime import date, timedelta

import pytest
import sqlalchemy as sa

from pipelines.db import make_engine
from pipelines.schema import complication, procedure
from pipelines.settings import REPO_DIR
from pipelines.surveillance.outcomes import (
    day_number,
    derive_outcomes,
    load_snapshot,
    process_outcomes,
    sentinel_events,
)
from pipelines.surveillance.profile import load_profile

PROFILE = load_profile(REPO_DIR / "profiles" / "htg108.yaml")


def digest(text: str) -> str:
    """Return a 64-hex stand-in for a pseudonymised reference."""
    return hashlib.sha256(text.encode()).hexdigest()


def procedure_row(procedure_id: str, site_id: str, day: date, *, patient: str | None = None,
                  mdt: bool = True, age: int = 75, **extra) -> dict:
    """Return a procedure row with plausible defaults."""
    row = dict(
        procedure_id=procedure_id, site_id=site_id, patient_hash=digest(patient or procedure_id),
        operator_hash=digest("op"), procedure_date=day, levels_treated=1,
        indication="osteoporosis", anaesthesia="local", balloons=2, age_years=age, sex="F",
        steroid_use=False, mdt_discussed=mdt, source_checksum=digest("file"),
        extract_ts="20240101T000000",
    )
    row.update(extra)
    return row


def complication_row(complication_id: str, procedure_id: str, site_id: str, day: date,
                     event_type: str = "cement_leak", *, severity: str = "minor",
                     symptomatic: bool = False) -> dict:
    """Return a complication row."""
    return dict(
        complication_id=complication_id, procedure_id=procedure_id, site_id=site_id,
        event_date=day, event_type=event_type, symptomatic=symptomatic, severity=severity,
        vertebral_level="L1", source_checksum=digest("cfile"), extract_ts="20240101T000000",
    )


def insert(engine: sa.Engine, procedures=(), complications=()) -> None:
    """Insert rows into procedure / complication."""
    with engine.begin() as conn:
        if procedures:
            conn.execute(procedure.insert(), list(procedures))
        if complications:
            conn.execute(complication.insert(), list(complications))


def snapshot(engine: sa.Engine, as_of: date):
    with engine.connect() as conn:
        return load_snapshot(conn, PROFILE, as_of)


AS_OF = date(2024, 6, 30)


def test_immature_procedures_are_excluded_even_with_an_event(db_url):
    engine = make_engine(db_url)
    old, recent = AS_OF - timedelta(days=40), AS_OF - timedelta(days=10)
    insert(
        engine,
        [procedure_row("P1", "S001", old), procedure_row("P2", "S001", recent),
         procedure_row("P3", "S001", AS_OF - timedelta(days=30))],
        [complication_row("C1", "P1", "S001", old), complication_row("C2", "P2", "S001", recent)],
    )
    units = derive_outcomes(snapshot(engine, AS_OF), PROFILE.metric("cement_leak"))
    # P3 closes its 30-day window exactly on as_of: mature. P2 (leak, 10 days old) is not.
    assert sorted(units["unit_id"]) == ["P1", "P3"]
    assert dict(zip(units["unit_id"], units["y"], strict=True)) == {"P1": 1, "P3": 0}


def test_a_late_complication_restates_history(db_url):
    engine = make_engine(db_url)
    day = date(2024, 1, 10)
    insert(engine, [procedure_row("P1", "S001", day)])
    metric = PROFILE.metric("cement_leak")
    before = derive_outcomes(snapshot(engine, AS_OF), metric)
    assert before["y"].tolist() == [0]
    insert(engine, complications=[complication_row("C1", "P1", "S001", day + timedelta(days=3))])
    after = derive_outcomes(snapshot(engine, AS_OF), metric)
    assert after["y"].tolist() == [1]
    # Events outside the window, or after as_of, do not count.
    insert(engine, [procedure_row("P2", "S001", day)],
           [complication_row("C2", "P2", "S001", day + timedelta(days=31))])
    units = derive_outcomes(snapshot(engine, AS_OF), metric)
    assert dict(zip(units["unit_id"], units["y"], strict=True)) == {"P1": 1, "P2": 0}


def test_a_correction_changes_the_outcome(db_url):
    engine = make_engine(db_url)
    day = date(2024, 2, 1)
    insert(engine, [procedure_row("P1", "S001", day)],
           [complication_row("C1", "P1", "S001", day, symptomatic=True)])
    s1 = snapshot(engine, AS_OF)
    assert derive_outcomes(s1, PROFILE.metric("symptomatic_cement_leak"))["y"].tolist() == [1]
    with engine.begin() as conn:  # the site corrects: the leak was not symptomatic
        conn.execute(complication.update().where(complication.c.complication_id == "C1")
                     .values(symptomatic=False, source_checksum=digest("correction")))
    s2 = snapshot(engine, AS_OF)
    assert derive_outcomes(s2, PROFILE.metric("symptomatic_cement_leak"))["y"].tolist() == [0]
    assert derive_outcomes(s2, PROFILE.metric("cement_leak"))["y"].tolist() == [1]
    assert s1.fingerprint != s2.fingerprint


def test_new_fracture_is_counted_once_per_patient_within_the_site(db_url):
    engine = make_engine(db_url)
    first, second = date(2023, 1, 5), date(2023, 3, 1)
    insert(
        engine,
        [procedure_row("P1", "S001", first, patient="alice"),
         procedure_row("P2", "S001", second, patient="alice"),
         procedure_row("P3", "S002", second, patient="alice"),  # another site: its own unit
         procedure_row("P4", "S001", first, patient="bob")],
        [complication_row("C1", "P2", "S001", date(2023, 9, 1), "adjacent_fracture"),
         complication_row("C2", "P4", "S001", date(2024, 3, 1), "new_fracture")],  # > 365 days
    )
    units = derive_outcomes(snapshot(engine, AS_OF), PROFILE.metric("new_fracture"))
    outcome = dict(zip(units["unit_id"], units["y"], strict=True))
    assert outcome == {"P1": 1, "P3": 0, "P4": 0}
    assert "patient_hash" not in units.columns


def test_sentinel_events_count_immediately_and_process_failures_are_flagged(db_url):
    engine = make_engine(db_url)
    day = AS_OF - timedelta(days=2)
    insert(engine, [procedure_row("P1", "S001", day, mdt=False), procedure_row("P2", "S001", day)],
           [complication_row("C1", "P1", "S001", AS_OF, "death", severity="fatal")])
    snap = snapshot(engine, AS_OF)
    events = sentinel_events(snap, PROFILE.metric("sentinel_event"))
    assert events[["site_id", "event_day", "event_type"]].values.tolist() == [
        ["S001", day_number(AS_OF), "death"]]
    assert derive_outcomes(snap, PROFILE.metric("major_event")).empty  # not mature yet
    process = process_outcomes(snap, PROFILE.metric("mdt_discussion"))
    assert sorted(process["failed"].tolist()) == [0, 1]


def test_rows_after_as_of_are_not_read(db_url):
    engine = make_engine(db_url)
    insert(engine, [procedure_row("P1", "S001", date(2024, 1, 1)),
                    procedure_row("P2", "S001", date(2024, 12, 1))])
    snap = snapshot(engine, AS_OF)
    assert snap.procedures["procedure_id"].tolist() == ["P1"]


@pytest.mark.parametrize("as_of", [date(2024, 1, 1)])
def test_empty_warehouse_gives_empty_frames(sqlite_url, as_of):
    engine = make_engine(sqlite_url)
    snap = snapshot(engine, as_of)
    assert derive_outcomes(snap, PROFILE.metric("cement_leak")).empty
    assert sentinel_events(snap, PROFILE.metric("sentinel_event")).empty


def test_a_read_in_many_small_batches_equals_one_batch(pg_url, monkeypatch):
    """The COPY read gives the same snapshot whether its text is parsed in one batch or in
    dozens (the hashed complication match and the one-key order included)."""
    import pyarrow.csv

    from pipelines.surveillance import outcomes

    engine = make_engine(pg_url)
    day = date(2023, 1, 1)
    procs = [procedure_row(f"P{i:04d}", f"S{i % 7:03d}", day + timedelta(days=i % 300),
                           patient=f"pt{i % 150}", age=60 + i % 30,
                           sex="MF"[i % 2], mdt=i % 5 != 0) for i in range(600)]
    comps = [complication_row(f"C{i:04d}", f"P{i * 3:04d}", f"S{i * 3 % 7:03d}",
                              day + timedelta(days=i * 3 % 300 + 2)) for i in range(150)]
    insert(engine, procs, comps)
    one = snapshot(engine, AS_OF)
    monkeypatch.setattr(outcomes, "READ_BATCH_BYTES", 500)
    parsed = []
    read_csv = pyarrow.csv.read_csv
    monkeypatch.setattr(pyarrow.csv, "read_csv",
                        lambda data, **kwargs: parsed.append(data.size) or read_csv(data, **kwargs))
    many = snapshot(engine, AS_OF)
    assert len(parsed) > 40 and max(parsed) < 1000
    assert many.fingerprint == one.fingerprint
    assert many.procedures.equals(one.procedures) and len(one.procedures) == 600
    assert many.complications.equals(one.complications) and len(one.complications) == 150


def test_an_error_mid_copy_reaches_the_caller_and_the_connection_rolls_back(pg_url):
    """A server error after some rows were sent (here a division by zero at row 200,000)
    is raised as the server's own error, and the connection is usable afterwards: every
    result is read before raising, so libpq is not left busy."""
    import psycopg

    from pipelines.surveillance.outcomes import copy_columns

    engine = make_engine(pg_url)
    failing = sa.select(sa.literal_column("1 / (x - 200000)").label("v")).select_from(
        sa.text("generate_series(1, 300000) AS x"))
    with pytest.raises(psycopg.errors.DivisionByZero):  # not "no COPY in progress"
        with engine.begin() as conn:
            copy_columns(conn, failing, {"v": "int"})
    with engine.connect() as conn:  # the pool's connection was rolled back and reused
        counted = copy_columns(conn, sa.select(sa.literal_column("x").label("v")).select_from(
            sa.text("generate_series(1, 300000) AS x")), {"v": "int"})
        assert len(counted["v"]) == 300000 and int(counted["v"][-1]) == 300000
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    engine.dispose()


def test_latest_procedure_date_walks_the_sites_on_postgresql(pg_url):
    """The site-by-site walk on PostgreSQL gives the plain max (None on an empty table)."""
    from pipelines.surveillance.outcomes import latest_procedure_date

    engine = make_engine(pg_url)
    with engine.connect() as conn:
        assert latest_procedure_date(conn) is None
    day = date(2023, 1, 1)
    insert(engine, [procedure_row(f"P{i:03d}", f"S{i % 5:03d}", day + timedelta(days=i * 7 % 90))
                    for i in range(40)], [])
    with engine.connect() as conn:
        plain = conn.execute(sa.select(sa.func.max(procedure.c.procedure_date))).scalar()
        assert plain is not None and latest_procedure_date(conn) == plain
