"""Issue 10 (branch load2): repeated keys found while staging; statistics of fewer columns.

The whole-file duplicate check no longer searches all the file's keys after staging: the
keys met more than once among the valid rows are collected chunk by chunk while staging.
These tests pin what that set must be (the valid rows' keys that ``duplicated(keep=False)``
marks, across chunks, and not a key whose other occurrence failed validation), on both
backends and both PostgreSQL paths (direct load and stage). The history tables' and the
stage's ANALYZE take fewer columns; the planner's statistics that remain are checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.ingest import ingest_paths, load
from tests.ingest_helpers import (
    COMP_HEADER,
    PROC_HEADER,
    comp_row,
    csv_text,
    proc_row,
    snapshot,
    write,
)


def _procedures() -> list[dict]:
    rows = [
        proc_row(f"P{n}", patient=f"PT-{n}", date=f"2024-01-{1 + n % 20:02d}") for n in range(1, 41)
    ]
    rows[3] = proc_row("P2", patient="PT-a")  # P2 again in the first chunk
    rows[9] = proc_row("P5", patient="PT-b")  # P5 again in the second chunk (chunks of 7)
    rows[30] = proc_row("P5", patient="PT-c")  # and a third time, much later
    rows[38] = proc_row("P1", patient="PT-d")  # the first key, repeated in the last chunk
    # P12 twice, but its second occurrence fails validation: not a duplicate of a valid row.
    rows[20] = proc_row("P12", age_years="7")
    # P30 twice, both invalid: quarantined by validation only.
    rows[29] = proc_row("P30", procedure_date="2024-13-40")
    rows[33] = proc_row("P30", age_years="7")
    return rows


def _complications() -> list[dict]:
    rows = [comp_row(f"C{n}", f"P{n}", date="2024-01-25") for n in range(1, 26)]
    rows[6] = comp_row("C3", "P3", date="2024-01-26")  # C3 again, next chunk
    rows[22] = comp_row("C9", "P9", severity="catastrophic")  # invalid: not a duplicate
    return rows


def _expected_duplicates(rows: list[dict], key: str, invalid: set[int]) -> dict[str, int]:
    """Rows per key quarantined as duplicates: pandas' duplicated over the valid rows."""
    valid = pd.Series([row[key] for i, row in enumerate(rows) if i not in invalid], dtype=object)
    repeated = valid[valid.duplicated(keep=False)]
    return repeated.value_counts().to_dict()


def _files(tmp_path: Path) -> tuple[Path, Path]:
    procedures = write(
        tmp_path / "in" / "procedures_20240131.csv", csv_text(PROC_HEADER, _procedures())
    )
    complications = write(
        tmp_path / "in" / "complications_20240131.csv", csv_text(COMP_HEADER, _complications())
    )
    return procedures, complications


def _quarantined(url: str, reason: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(schema.quarantine.c.record_id, schema.quarantine.c.reasons)
        ).all()
    engine.dispose()
    counts: dict[str, int] = {}
    for record_id, reasons in rows:
        if reason in reasons:
            counts[record_id] = counts.get(record_id, 0) + 1
    return counts


@pytest.mark.parametrize("path", ["sqlite", "direct", "staged"])
def test_repeated_keys_are_those_of_the_valid_rows(
    path, tmp_path, settings_for, monkeypatch, request
):
    url = (
        f"sqlite:///{tmp_path / 'w.db'}" if path == "sqlite" else request.getfixturevalue("pg_url")
    )
    if path == "staged":
        monkeypatch.setattr(load, "_direct_load", lambda *args: None)
    procedures, complications = _files(tmp_path)
    settings = settings_for(url, {"KYPHOWATCH_CHUNK_ROWS": "7"})
    reports = [ingest_paths(settings, [p]).files[0] for p in (procedures, complications)]
    assert [r.status for r in reports] == ["loaded", "loaded"]

    proc_dupes = _expected_duplicates(_procedures(), "procedure_id", {20, 29, 33})
    assert proc_dupes == {"P2": 2, "P5": 3, "P1": 2}
    assert _quarantined(url, "procedure_id:duplicate_in_file") == proc_dupes
    comp_dupes = _expected_duplicates(_complications(), "complication_id", {22})
    assert comp_dupes == {"C3": 2}
    assert _quarantined(url, "complication_id:duplicate_in_file") == comp_dupes
    # P12's valid row is loaded (its twin failed validation); no repeated key is.
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        stored = set(conn.execute(sa.select(schema.procedure.c.procedure_id)).scalars())
    engine.dispose()
    assert "P12" in stored and not stored & {"P1", "P2", "P5", "P30"}
    assert reports[0].inserted == 40 - 3 - 7  # 3 invalid rows, 7 with repeated keys
    assert reports[1].inserted + reports[1].pending == 25 - 1 - 2


@pytest.mark.postgres
def test_direct_and_staged_paths_end_alike(
    pg_url, pg_admin_url, tmp_path, settings_for, monkeypatch
):
    procedures, complications = _files(tmp_path)
    settings = settings_for(pg_url, {"KYPHOWATCH_CHUNK_ROWS": "7"})
    for path in (procedures, complications):
        ingest_paths(settings, [path])
    direct = snapshot(pg_url)
    monkeypatch.setattr(load, "_direct_load", lambda *args: None)
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    name = sa.make_url(pg_url).database + "_staged"
    quote = admin.dialect.identifier_preparer.quote
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE DATABASE " + quote(name))
    try:
        staged_url = sa.make_url(pg_url).set(database=name).render_as_string(hide_password=False)
        staged_settings = settings_for(staged_url, {"KYPHOWATCH_CHUNK_ROWS": "7"})
        for path in (procedures, complications):
            ingest_paths(staged_settings, [path])
        staged = snapshot(staged_url)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql("DROP DATABASE IF EXISTS " + quote(name) + " WITH (FORCE)")
        admin.dispose()
    assert direct == staged


def test_first_sightings_across_chunks_give_the_repeated_set():
    """The staging loop's bookkeeping, chunk by chunk, against duplicated(keep=False)."""
    import itertools
    import random

    rng = random.Random(11)
    for _ in range(30):
        chunks = [
            [f"K{rng.randrange(120)}" for _ in range(rng.randrange(0, 40))]
            for _ in range(rng.randrange(1, 6))
        ]
        seen: set[str] = set()
        repeated: set[str] = set()
        for listed in chunks:
            first = np.fromiter(load._first_sightings(listed, seen), dtype=bool, count=len(listed))
            repeated.update(itertools.compress(listed, ~first))
        everything = pd.Series([key for chunk in chunks for key in chunk], dtype="string[pyarrow]")
        expected = set(everything[everything.duplicated(keep=False)].tolist())
        assert repeated == expected


@pytest.mark.postgres
def test_history_tables_get_key_statistics_and_the_current_tables_all(
    pg_url, tmp_path, settings_for, monkeypatch
):
    monkeypatch.setattr(load, "LARGE_LOAD_ROWS", 1)  # analyse the targets after this load
    procedures, complications = _files(tmp_path)
    settings = settings_for(pg_url)
    for path in (procedures, complications):
        assert ingest_paths(settings, [path]).files[0].status == "loaded"
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT tablename, attname FROM pg_stats WHERE schemaname = 'public'")
        ).all()
        tuples = dict(
            conn.execute(
                sa.text(
                    "SELECT relname, reltuples FROM pg_class WHERE relname IN "
                    "('procedure_version', 'complication_version')"
                )
            ).all()
        )
    engine.dispose()
    columns: dict[str, set[str]] = {}
    for table, column in rows:
        columns.setdefault(table, set()).add(column)
    assert columns["procedure_version"] == {"procedure_id", "source_checksum"}
    assert columns["complication_version"] == {"complication_id", "source_checksum"}
    assert columns["procedure"] == {c.name for c in schema.procedure.columns}
    assert columns["complication"] == {c.name for c in schema.complication.columns}
    assert tuples == {"procedure_version": 33.0, "complication_version": 22.0}


@pytest.mark.postgres
def test_a_stage_is_analysed_on_its_join_and_filter_columns(pg_url):
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        for kind, expected in (
            ("procedures", {"record_number", "procedure_id", "site_id", "procedure_date"}),
            (
                "complications",
                {"record_number", "complication_id", "procedure_id", "site_id", "event_date"},
            ),
        ):
            stage = load._stage_table(kind)
            stage.create(conn)
            conn.exec_driver_sql(
                f"INSERT INTO {stage.name} SELECT "
                + ", ".join("NULL" if c.name != "record_number" else "g" for c in stage.columns)
                + " FROM generate_series(1, 50) AS g"
            )
            load._analyze(conn, stage)
            analysed = set(
                conn.execute(
                    sa.text("SELECT attname FROM pg_stats WHERE tablename = :t"), {"t": stage.name}
                ).scalars()
            )
            assert analysed == expected
    engine.dispose()
