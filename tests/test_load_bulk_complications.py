"""A bulk first complications delivery sets the complication tables' indexes aside (issue 10).

Into empty ``complication`` and ``complication_version`` the merge's two INSERT ... SELECTs
run without the tables' indexes, which are rebuilt from the catalog's own definitions right
after them, in the file's transaction (load._merge_complications, the procedures' direct-
load mechanism). The schema afterwards must be the schema before; a load failing between
the drop and the rebuild must leave the indexes and no rows; a second delivery into the
filled tables keeps its indexes; and the rows must be those of a load that kept them, on
PostgreSQL and SQLite (where nothing is set aside). The files also exercise the one match of
the staged complications with their procedures (load._match_procedures): rule breakers
(one breaking both rules keeps the first reason) against rows whose procedure is unknown.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.errors import ExternalSystemError
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
from tests.test_load_bulk_indexes import _catalog

_COMPLICATION_INDEXES = {"complication_pkey", "ix_complication_procedure",
                         "ix_complication_site_date", "pk_complication_version"}


def _files(tmp_path) -> dict[str, object]:
    """Procedures, a first complications delivery and a later one changing some rows."""
    procedures = [proc_row(f"P{n}", patient=f"PT-{n}", date="2024-01-05") for n in range(1, 31)]
    first = [comp_row(f"C{n}", pid=f"P{n % 30 + 1}", date="2024-01-09") for n in range(1, 41)]
    first[3] = comp_row("C4", pid="P-unknown")  # pending: its procedure is not loaded
    first[6] = comp_row("C7", pid="P2", date="2023-12-01")  # before its procedure
    first[8] = comp_row("C9", pid="P3", site="S999")  # another site than its procedure
    first[11] = comp_row("C3", pid="P3")  # a key repeated within the file
    first[14] = comp_row("C15", pid="P4", date="2024-13-45")  # not a date
    first[17] = comp_row("C18", pid="P5", site="S999", date="2023-12-01")  # both: the first
    first[20] = comp_row("C21", pid="P-gone", site="S999", date="2023-12-01")  # pending
    later = [comp_row(f"C{n}", pid=f"P{n % 30 + 1}", date="2024-01-10", severity="major")
             for n in range(20, 50)]
    root = tmp_path / "in"
    return {
        "procedures": write(root / "p" / "procedures_20240131.csv", csv_text(PROC_HEADER, procedures)),
        "first": write(root / "c1" / "complications_20240131.csv", csv_text(COMP_HEADER, first)),
        "later": write(root / "c2" / "complications_20240201.csv", csv_text(COMP_HEADER, later)),
    }


def _names(call: tuple) -> set[str]:
    return {index.name for index in call}


@pytest.mark.postgres
def test_a_bulk_first_complications_load_leaves_the_schema_as_it_was(pg_url, tmp_path,
                                                                     settings_for, rebuilt):
    files = _files(tmp_path)
    settings = settings_for(pg_url, {"KYPHOWATCH_CHUNK_ROWS": "7"})
    schema.migrate(sa.create_engine(pg_url))
    before = _catalog(pg_url)
    assert ingest_paths(settings, [files["procedures"]]).exit_code == 0
    rebuilt.clear()  # the procedures' own rebuild (tested in test_load_bulk_indexes)
    report = ingest_paths(settings, [files["first"]]).to_dict()
    assert report["files"][0]["status"] == "loaded"
    assert [_names(call) for call in rebuilt] == [_COMPLICATION_INDEXES]
    assert _catalog(pg_url) == before
    engine = sa.create_engine(pg_url)
    # The primary keys hold again: a duplicate key is refused by the rebuilt indexes.
    for table in ("complication", "complication_version"):
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.exec_driver_sql(f"INSERT INTO {table} SELECT * FROM {table} LIMIT 1")
    # A second delivery into the filled tables keeps the indexes.
    rebuilt.clear()
    assert ingest_paths(settings, [files["later"]]).exit_code == 0
    assert rebuilt == []
    assert _catalog(pg_url) == before
    engine.dispose()


@pytest.mark.parametrize("chunk_rows", ["7", "1000"])
def test_the_rows_are_those_of_loads_that_kept_their_indexes(db_url, tmp_path, settings_for,
                                                            monkeypatch, chunk_rows):
    """First and second delivery, bulk forced vs not: same reports and warehouse.

    On SQLite the bulk flag changes nothing; on PostgreSQL the first delivery sets the
    indexes aside. The two warehouses are built one after the other in the same database
    (emptied between), so the comparison needs no second server database.
    """
    files = _files(tmp_path)
    settings = settings_for(db_url, {"KYPHOWATCH_CHUNK_ROWS": chunk_rows})
    engine = sa.create_engine(db_url)
    schema.migrate(engine)

    def run() -> tuple[list[dict], dict]:
        with engine.begin() as conn:
            for table in (schema.procedure, schema.procedure_version, schema.complication,
                          schema.complication_version, schema.pending_complication,
                          schema.quarantine, schema.file_ledger):
                conn.execute(table.delete())
        reports = []
        for name in ("procedures", "first", "later"):
            [result] = ingest_paths(settings, [files[name]]).to_dict()["files"]
            reports.append({k: v for k, v in result.items() if k != "path"})
        return reports, snapshot(db_url)

    kept = run()
    set_aside = []
    real = load._set_aside_indexes
    monkeypatch.setattr(load, "BULK_LOAD_BYTES", 0)
    monkeypatch.setattr(load, "_set_aside_indexes",
                        lambda conn, tables: set_aside.append(tables) or real(conn, tables))
    bulk = run()
    engine.dispose()
    assert bulk == kept
    first = kept[0][1]
    assert first["status"] == "loaded"
    assert (first["inserted"], first["pending"], first["quarantined"]) == (32, 2, 6)
    reasons = dict(first["quarantine_reasons"])
    assert {name: reasons.pop(name, 0) for name in (
        "complication_id:duplicate_in_file", "event_date:before_procedure",
        "site_id:differs_from_procedure")} == {
        "complication_id:duplicate_in_file": 2, "event_date:before_procedure": 2,
        "site_id:differs_from_procedure": 1}
    assert sum(reasons.values()) == 1 and next(iter(reasons)).startswith("event_date:")
    if db_url.startswith("postgresql"):
        assert [{t.name for t in tables} for tables in set_aside] == [
            {"procedure", "procedure_version"}, {"complication", "complication_version"}]
    else:
        assert set_aside == []


@pytest.mark.postgres
def test_a_complications_load_failing_in_its_insert_leaves_the_indexes(pg_url, tmp_path,
                                                                      settings_for, rebuilt,
                                                                      monkeypatch):
    """A row the server refuses in the INSERT ... SELECT (between the drop and the rebuild)."""
    files = _files(tmp_path)
    engine = sa.create_engine(pg_url)
    schema.migrate(engine)
    settings = settings_for(pg_url, {"KYPHOWATCH_CHUNK_ROWS": "7"})
    assert ingest_paths(settings, [files["procedures"]]).exit_code == 0
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse_c30() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.complication_id = 'C30' THEN RAISE EXCEPTION 'refused by the test trigger'; "
            "END IF; RETURN NEW; END $$")
        conn.exec_driver_sql("CREATE TRIGGER refuse_c30 BEFORE INSERT ON complication "
                             "FOR EACH ROW EXECUTE FUNCTION refuse_c30()")
    before = _catalog(pg_url)
    state = snapshot(pg_url)
    rebuilt.clear()
    dropped: list[set[str]] = []
    real = load._set_aside_indexes
    monkeypatch.setattr(load, "_set_aside_indexes",
                        lambda conn, tables: dropped.append({t.name for t in tables})
                        or real(conn, tables))
    with pytest.raises(ExternalSystemError, match="refused by the test trigger"):
        ingest_paths(settings, [files["first"]])
    # the indexes were dropped, and the load failed before their rebuild: the rollback,
    # not the rebuild, is what restores them below
    assert dropped == [{"complication", "complication_version"}]
    assert rebuilt == []
    assert _catalog(pg_url) == before
    after = snapshot(pg_url)
    assert {k: v for k, v in after.items() if k != "file_ledger"} == {
        k: v for k, v in state.items() if k != "file_ledger"}
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(schema.complication)) == 0
    engine.dispose()
