"""The bulk-load paths of issue 10: staging writes on a writer thread, and the direct load.

A first procedures file into empty tables is COPYed straight into ``procedure`` and
``procedure_version`` (load._DirectLoad); whatever the path, the warehouse must end in the
very same rows as the staged merge, including the quarantine of keys repeated in the file.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

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


def _procedure_rows() -> list[dict]:
    """Rows with keys repeated within a chunk, across chunks, three times, and bad rows."""
    rows = [proc_row(f"P{n}", patient=f"PT-{n}", date=f"2024-01-{1 + n % 20:02d}")
            for n in range(1, 31)]
    rows[4] = proc_row("P2", patient="PT-x", date="2024-01-09")  # P2 again, same chunk
    rows[12] = proc_row("P7", patient="PT-y")  # P7 again, a later chunk
    rows[25] = proc_row("P7", patient="PT-z")  # and a third time
    rows[19] = proc_row("P20", age_years="7")  # out of range: quarantined by validation
    rows[21] = proc_row("P22", procedure_date="2024-13-40")  # not a date
    return rows


def _files(tmp_path: Path) -> tuple[Path, Path]:
    procedures = write(tmp_path / "in" / "procedures_20240131.csv",
                       csv_text(PROC_HEADER, _procedure_rows()))
    # Loaded first, these complications wait for their procedures: the direct load
    # promotes them (P2 and P7 are quarantined, so theirs keep waiting).
    complications = write(tmp_path / "early" / "complications_20240130.csv", csv_text(
        COMP_HEADER, [comp_row("C1", "P1", date="2024-01-06"), comp_row("C2", "P2"),
                      comp_row("C3", "P7"), comp_row("C4", "P3", date="2024-01-04")]))
    return procedures, complications


def _load_both(settings, procedures: Path, complications: Path) -> list[dict]:
    reports = [ingest_paths(settings, [path]).to_dict() for path in (complications, procedures)]
    return [{k: v for k, v in report["files"][0].items() if k != "path"} for report in reports]


@pytest.mark.postgres
def test_a_direct_load_ends_in_the_rows_of_the_staged_merge(pg_url, pg_admin_url, tmp_path,
                                                            settings_for, monkeypatch):
    procedures, complications = _files(tmp_path)
    settings = settings_for(pg_url, {"KYPHOWATCH_CHUNK_ROWS": "7"})
    direct_chunks = []
    real_payload = load._DirectLoad.payload  # every direct write renders its rows here

    def counted(self, frame):
        direct_chunks.append(len(frame))
        return real_payload(self, frame)

    monkeypatch.setattr(load._DirectLoad, "payload", counted)
    direct_results = _load_both(settings, procedures, complications)
    direct_state = snapshot(pg_url)
    assert len(direct_chunks) == 5, "the procedures went straight to the tables, chunk by chunk"

    # The same files through the stage and the merge, in a second fresh database.
    monkeypatch.setattr(load, "_direct_load", lambda *args: None)
    staged_url = pg_url.rsplit("/", 1)[0] + "/" + pg_url.rsplit("/", 1)[1] + "_staged"
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    name = sa.make_url(staged_url).database
    quote = admin.dialect.identifier_preparer.quote
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE DATABASE " + quote(name))
    try:
        staged_results = _load_both(settings_for(staged_url, {"KYPHOWATCH_CHUNK_ROWS": "7"}),
                                    procedures, complications)
        staged_state = snapshot(staged_url)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql("DROP DATABASE IF EXISTS " + quote(name) + " WITH (FORCE)")
        admin.dispose()

    assert direct_results == staged_results
    assert direct_state == staged_state
    result = direct_results[1]
    assert result["quarantine_reasons"]["procedure_id:duplicate_in_file"] == 5
    assert result["inserted"] == 30 - 5 - 2 and result["promoted"] == 2
    stored = {row[0] for row in direct_state["procedure"]}
    assert not stored & {"P2", "P7", "P20", "P22"}


@pytest.mark.postgres
def test_a_second_file_is_merged_not_copied(pg_url, tmp_path, settings_for, monkeypatch):
    procedures, _ = _files(tmp_path)
    settings = settings_for(pg_url)
    assert ingest_paths(settings, [procedures]).exit_code == 0
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        assert load._direct_load(conn, "procedures", "c" * 64, "20240201T000000") is None
        assert load._direct_load(conn, "complications", "c" * 64, "20240201T000000") is None
    engine.dispose()


def test_the_stage_writer_keeps_order_and_hands_back_the_first_failure():
    done: list[int] = []
    writer = load._StageWriter()
    for number in range(5):
        writer.submit(lambda number=number: done.append(number))
    writer.close()
    assert done == [0, 1, 2, 3, 4]

    class Broken(Exception):
        pass

    def fail():
        raise Broken("write failed")

    writer = load._StageWriter()
    writer.submit(lambda: done.append(5))
    writer.submit(fail)
    with pytest.raises(Broken, match="write failed"):  # the next write waits, then raises
        writer.submit(lambda: done.append(6))
    writer.close()
    assert done[-1] == 5

    writer = load._StageWriter(depth=2)  # a failure of the last write is raised by close
    writer.submit(lambda: done.append(7))
    writer.submit(fail)
    with pytest.raises(Broken, match="write failed"):
        writer.close()
    assert done[-1] == 7
    assert not any(t.name == "kyphowatch-stage-writer" for t in threading.enumerate())


@pytest.mark.postgres
def test_a_failed_stage_write_rolls_the_file_back(pg_url, tmp_path, settings_for, monkeypatch):
    procedures, complications = _files(tmp_path)
    settings = settings_for(pg_url, {"KYPHOWATCH_CHUNK_ROWS": "7"})
    assert ingest_paths(settings, [complications]).exit_code == 0
    before = snapshot(pg_url)
    calls = []
    real_copy = load._copy_into

    def copy_then_fail(conn, tables, names, payload):
        calls.append(len(tables))
        if len(calls) == 3:
            raise RuntimeError("connection lost mid-copy")
        real_copy(conn, tables, names, payload)

    monkeypatch.setattr(load, "_copy_into", copy_then_fail)
    with pytest.raises(RuntimeError, match="connection lost mid-copy"):
        ingest_paths(settings, [procedures])
    assert snapshot(pg_url) == before
    assert not any(t.name == "kyphowatch-stage-writer" for t in threading.enumerate())
    monkeypatch.setattr(load, "_copy_into", real_copy)
    assert ingest_paths(settings, [procedures]).exit_code == 0  # the connection is usable


def test_sqlite_loads_write_in_the_calling_thread(tmp_path, settings_for, monkeypatch):
    procedures, complications = _files(tmp_path)
    threads = []
    real_write = load._write_stage

    def record(conn, stage, frame):
        threads.append(threading.current_thread().name)
        real_write(conn, stage, frame)

    monkeypatch.setattr(load, "_write_stage", record)
    url = f"sqlite:///{tmp_path / 'w.db'}"
    results = _load_both(settings_for(url, {"KYPHOWATCH_CHUNK_ROWS": "7"}), procedures,
                         complications)
    assert results[1]["inserted"] == 23
    assert set(threads) == {threading.main_thread().name}


def test_first_sightings_match_duplicated_and_seen_before():
    """The direct load's one-pass test equals "not repeated in the chunk, not sent before"."""
    import random

    import numpy as np
    import pandas as pd

    from pipelines.ingest import load

    rng = random.Random(7)
    seen: set[str] = set()
    reference: set[str] = set()
    for _ in range(20):
        keys = [f"P{rng.randrange(300)}" for _ in range(rng.randrange(0, 60))]
        expected = ~pd.Series(keys, dtype=object).duplicated().to_numpy() & np.array(
            [key not in reference for key in keys], dtype=bool)
        reference.update(keys)
        got = np.fromiter(load._first_sightings(keys, seen), dtype=bool, count=len(keys))
        assert got.tolist() == expected.tolist()
        assert seen == reference
