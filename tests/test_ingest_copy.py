"""Binary COPY (load._copy_payload) stores exactly what the csv COPY stored before.

The bulk load renders its rows in PostgreSQL's binary COPY format when every column's type
is covered (the server then skips parsing text; issue 10). Whatever the route, the stored
values, the load's results and a failing row's error must be those of the csv route, which
was the only route before: these tests put the same rows through both and compare.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd
import psycopg
import pyarrow as pa
import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.ingest import ingest_paths, load
from tests.ingest_helpers import snapshot

# Text a csv route could mangle if it quoted or escaped wrongly: quotes, separators, line
# breaks, backslash sequences with a meaning in COPY's text format, csv's end marker,
# blanks, an empty string, non-ASCII and 4-byte characters, and a value at its length limit.
HOSTILE_TEXT = [
    'say "hi"', "a,b", "line\nbreak", "cr\r\nlf", "lone\rcr", "back\\slash", "\\N", "\\.",
    " lead", "trail ", "", "é ü ß", "中文字", "emoji 😀", "e\u0301", "x" * 64, ",", '"',
    "\t tab", "NULL",
]
DATES = [date(1, 1, 1), date(1969, 12, 31), date(1970, 1, 1), date(1999, 12, 31),
         date(2000, 1, 1), date(2000, 1, 2), date(2024, 2, 29), date(9999, 12, 31)]


def _frame(rows: int) -> pd.DataFrame:
    """Rows of the procedures stage's columns: text, dates, small integers, booleans, nulls."""
    def cycle(values):
        return [values[i % len(values)] for i in range(rows)]

    text = cycle(HOSTILE_TEXT + [None])
    return pd.DataFrame({
        "procedure_id": pd.Series(cycle(HOSTILE_TEXT), dtype="str"),  # Arrow-backed text
        "site_id": pd.Series(cycle(["S001", None, "S1"]), dtype="str"),
        "patient_hash": text,  # object column of str and None
        "operator_hash": [None] * rows,  # all null: Arrow's null type
        "procedure_date": cycle(DATES + [None]),
        "levels_treated": cycle([-32768, -1, 0, 1, 32767]),
        "indication": pd.Series(list(reversed(text)), dtype="str"),
        "steroid_use": cycle([True, False]),
        "mdt_discussed": cycle([True, False, None]),  # object booleans with nulls
        "record_number": range(rows),
    })


def _table(name: str) -> sa.Table:
    """An unconstrained table of the procedures stage's column types under ``name``.

    Text columns are all ``varchar(64)``, so every hostile value fits every column.
    """
    stage = load._stage_table("procedures")
    columns = list(_frame(1).columns)
    return sa.Table(name, sa.MetaData(), *[
        sa.Column(c, sa.String(64) if type(stage.c[c].type) is sa.String else stage.c[c].type)
        for c in columns])


def _stored(conn: sa.Connection, table: sa.Table) -> list[tuple]:
    # Each row both as Python values and as PostgreSQL's own text of the row.
    rows = conn.execute(sa.select(table).order_by(table.c.record_number)).all()
    texts = conn.exec_driver_sql(
        "SELECT t::text FROM " + conn.dialect.identifier_preparer.quote(table.name)
        + " AS t ORDER BY record_number"
    ).scalars().all()
    return [(tuple(row), text) for row, text in zip(rows, texts, strict=True)]


def _copy_both(conn: sa.Connection, frame: pd.DataFrame) -> tuple[str, list, list]:
    by_csv, by_binary = _table("kw_copy_csv"), _table("kw_copy_binary")
    for table in (by_csv, by_binary):
        table.create(conn)
    names = list(frame.columns)
    csv_payload = load._CopyPayload(
        "csv", (load._csv_rows(pa.Table.from_pandas(frame, preserve_index=False)),))
    load._copy_into(conn, [by_csv], names, csv_payload)
    payload = load._copy_payload(frame, [by_binary])
    load._copy_into(conn, [by_binary], names, payload)
    return payload.format, _stored(conn, by_csv), _stored(conn, by_binary)


@pytest.mark.postgres
def test_binary_copy_stores_what_csv_copy_stores(pg_url):
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        route, by_csv, by_binary = _copy_both(conn, _frame(3 * len(HOSTILE_TEXT) + 7))
    engine.dispose()
    assert route == "binary"
    assert by_binary == by_csv
    assert len(by_csv) == 3 * len(HOSTILE_TEXT) + 7
    assert {row[0][0] for row in by_csv} >= set(HOSTILE_TEXT)  # the text arrived unchanged


@pytest.mark.postgres
def test_values_the_binary_encoder_does_not_cover_go_as_csv(pg_url):
    engine = sa.create_engine(pg_url)
    frame = _frame(10)
    frame.loc[3, "levels_treated"] = 32768  # outside smallint: the server must say so
    assert load._copy_payload(frame, [_table("kw_copy_x")]).format == "csv"
    with pytest.raises(psycopg.errors.NumericValueOutOfRange), engine.begin() as conn:
        _copy_both(conn, frame)
    frame = _frame(10).assign(levels_treated=1.5)  # not an integer column at all
    assert load._copy_payload(frame, [_table("kw_copy_x")]).format == "csv"
    odd = sa.Table("kw_odd", sa.MetaData(), sa.Column("procedure_id", sa.Text))
    assert load._copy_payload(frame[["procedure_id"]], [odd]).format == "csv"
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("column, value, error", [
    ("site_id", "S" * 9, psycopg.errors.StringDataRightTruncation),  # varchar(8)
    ("procedure_date", None, psycopg.errors.NotNullViolation),
])
def test_a_row_the_server_refuses_fails_the_same_way(pg_url, column, value, error):
    engine = sa.create_engine(pg_url)
    frame = _frame(5).assign(procedure_id=[f"P{n}" for n in range(5)], site_id="S001",
                             procedure_date=date(2024, 1, 1))
    frame[column] = frame[column].astype(object)
    frame.loc[2, column] = value
    messages = []
    for route in ("csv", "binary"):
        target = sa.Table("kw_strict", sa.MetaData(),  # one name: it is in the message
                          sa.Column("procedure_id", sa.String(64), primary_key=True),
                          sa.Column("site_id", sa.String(8), nullable=False),
                          sa.Column("procedure_date", sa.Date, nullable=False))
        names = ["procedure_id", "site_id", "procedure_date"]
        rows = frame[names]
        with engine.begin() as conn:
            target.create(conn)
        if route == "csv":
            payload = load._CopyPayload(
                "csv", (load._csv_rows(pa.Table.from_pandas(rows, preserve_index=False)),))
        else:
            payload = load._copy_payload(rows, [target])
            assert payload.format == "binary"
        with pytest.raises(error) as raised, engine.begin() as conn:
            load._copy_into(conn, [target], names, payload)
        messages.append(str(raised.value).splitlines()[0])
        with engine.begin() as conn:
            target.drop(conn)
    engine.dispose()
    assert messages[0] == messages[1]


def _files(tmp_path: Path) -> list[Path]:
    from pipelines.simulate import simulate

    folder = tmp_path / "registry"
    simulate(folder, sites=6, start=date(2023, 1, 1), end=date(2023, 6, 30), seed=11,
             bad_row_rate=0.05, single_file=True)
    return sorted(p for p in folder.iterdir() if p.suffix == ".csv")


def _count_routes(monkeypatch) -> list[str]:
    """Record the format of every COPY payload the load sends (``binary`` or ``csv``)."""
    routes: list[str] = []
    real_copy = load._copy_into

    def counted(conn, tables, names, payload):
        routes.append(payload.format)
        real_copy(conn, tables, names, payload)

    monkeypatch.setattr(load, "_copy_into", counted)
    return routes


@pytest.mark.postgres
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "staged"])
def test_a_load_by_binary_copy_ends_in_the_rows_of_csv_copy(pg_url, pg_admin_url, tmp_path,
                                                           settings_for, monkeypatch, direct):
    files = _files(tmp_path)  # complications sort first: they wait, then are promoted
    if not direct:
        monkeypatch.setattr(load, "_direct_load", lambda *args: None)
    routes = _count_routes(monkeypatch)
    settings = settings_for(pg_url, {"KYPHOWATCH_CHUNK_ROWS": "97"})
    binary_report = ingest_paths(settings, files).to_dict()
    binary_state = snapshot(pg_url)
    assert routes and set(routes) == {"binary"}

    # The same files by csv COPY only (the route before binary COPY) into a second database.
    monkeypatch.setattr(load, "_binary_copy_rows", lambda table, tables: None)
    routes.clear()
    csv_url = pg_url + "_csv"
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    quote = admin.dialect.identifier_preparer.quote
    name = sa.make_url(csv_url).database
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE DATABASE " + quote(name))
    try:
        csv_report = ingest_paths(settings_for(csv_url, {"KYPHOWATCH_CHUNK_ROWS": "97"}),
                                  files).to_dict()
        csv_state = snapshot(csv_url)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql("DROP DATABASE IF EXISTS " + quote(name) + " WITH (FORCE)")
        admin.dispose()
    assert routes and set(routes) == {"csv"}
    assert [f["status"] for f in binary_report["files"]] == ["loaded", "loaded"]
    assert binary_report["totals"]["quarantined"] > 20  # bad rows were there
    assert binary_report == csv_report
    assert binary_state == csv_state
    assert len(binary_state[schema.procedure.name]) > 500


def test_the_binary_rendering_of_a_small_frame():
    """The format itself (PostgreSQL docs, COPY "Binary Format"), byte by byte."""
    frame = pd.DataFrame({"t": ["ab", None], "d": [date(2000, 1, 2), None], "n": [-2, 3],
                          "b": [True, False]})
    target = sa.Table("kw_small", sa.MetaData(), sa.Column("t", sa.String),
                      sa.Column("d", sa.Date), sa.Column("n", sa.SmallInteger),
                      sa.Column("b", sa.Boolean))
    payload = load._copy_payload(frame, [target])
    assert payload.format == "binary"
    expected = (
        b"PGCOPY\n\xff\r\n\x00" + bytes(8)
        + b"\x00\x04" + b"\x00\x00\x00\x02ab" + b"\x00\x00\x00\x04\x00\x00\x00\x01"
        + b"\x00\x00\x00\x02\xff\xfe" + b"\x00\x00\x00\x01\x01"
        + b"\x00\x04" + b"\xff\xff\xff\xff" * 2 + b"\x00\x00\x00\x02\x00\x03"
        + b"\x00\x00\x00\x01\x00"
        + b"\xff\xff"
    )
    assert b"".join(bytes(part) for part in payload.parts) == expected
    empty = load._copy_payload(frame.iloc[:0], [target])
    assert b"".join(bytes(part) for part in empty.parts) == expected[:19] + b"\xff\xff"


@pytest.mark.parametrize("slice_rows", [1, 7, 64, 10_000])
def test_rendering_in_slices_gives_the_same_bytes(monkeypatch, slice_rows):
    """Slices bound the rendering's memory; their bytes joined are the whole table's bytes.

    Slice sizes that split the hostile rows unevenly, put a null-only run in one slice
    (every third ``site_id``), and leave a short last slice.
    """
    frame = _frame(3 * len(HOSTILE_TEXT) + 7)
    target = _table("kw_slices")
    monkeypatch.setattr(load, "_BINARY_SLICE_ROWS", 1 << 30)
    whole = load._copy_payload(frame, [target])
    monkeypatch.setattr(load, "_BINARY_SLICE_ROWS", slice_rows)
    sliced = load._copy_payload(frame, [target])
    assert whole.format == sliced.format == "binary"
    assert len(sliced.parts) == 2 + -(-len(frame) // slice_rows)
    assert b"".join(map(bytes, sliced.parts)) == b"".join(map(bytes, whole.parts))
    # A value outside its column in the last slice only still sends the whole frame as csv.
    frame.loc[len(frame) - 1, "levels_treated"] = 40_000
    assert load._copy_payload(frame, [target]).format == "csv"


@pytest.mark.postgres
def test_a_server_error_in_the_middle_of_a_binary_copy_rolls_the_file_back(
        pg_url, tmp_path, settings_for, monkeypatch):
    """A row the server refuses while the writer thread streams a later chunk's binary COPY
    (a trigger raising here; a disk-full or a constraint in production) fails the file with
    a clear error, loads none of its rows, stops the writer thread, and a rerun loads it."""
    import threading

    from pipelines.errors import ExternalSystemError

    files = _files(tmp_path)
    procedures = next(p for p in files if "procedure" in p.name)
    rows = procedures.read_text(encoding="utf-8").splitlines()[1:]
    refused = rows[int(len(rows) * 0.8)].split(",")[0]  # a record well past the first chunks
    routes = _count_routes(monkeypatch)
    engine = sa.create_engine(pg_url)
    schema.migrate(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE refused (procedure_id text)")
        conn.execute(sa.text("INSERT INTO refused VALUES (:id)"), {"id": refused})
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF EXISTS (SELECT 1 FROM refused WHERE procedure_id = NEW.procedure_id) THEN "
            "RAISE EXCEPTION 'refused by the test trigger'; END IF; RETURN NEW; END $$")
        conn.exec_driver_sql("CREATE TRIGGER refuse_one BEFORE INSERT ON procedure "
                             "FOR EACH ROW EXECUTE FUNCTION refuse_one()")
    settings = settings_for(pg_url, {"KYPHOWATCH_CHUNK_ROWS": "97"})
    with pytest.raises(ExternalSystemError) as failure:
        ingest_paths(settings, [procedures])
    message = str(failure.value)
    assert procedures.name in message and "rolled back" in message
    assert "refused by the test trigger" in message
    assert routes.count("binary") >= 3  # the refused row came in a later chunk's COPY
    assert not [t for t in threading.enumerate() if t.name == "kyphowatch-stage-writer"]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.procedure)).scalar() == 0
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER refuse_one ON procedure")
    report = ingest_paths(settings, [procedures]).to_dict()
    assert [f["status"] for f in report["files"]] == ["loaded"]
    with engine.connect() as conn:
        stored = conn.execute(sa.select(sa.func.count()).select_from(schema.procedure)).scalar()
    engine.dispose()
    assert stored == report["totals"]["inserted"] > 500


def _field_by_field(table, kinds: list[str]) -> bytes:
    """The rows rendered one column at a time (load._binary_field), joined in Python."""
    import pyarrow as pa
    import pyarrow.compute as pc

    fields = [load._binary_field(column.combine_chunks(), kind, table.num_rows, pa, pc)
              for column, kind in zip(table.columns, kinds, strict=True)]
    count = len(kinds).to_bytes(2, "big")
    return b"".join(count + b"".join(field[row].as_py() for field in fields)
                    for row in range(table.num_rows))


@pytest.mark.parametrize("seed", range(6))
def test_one_join_of_runs_gives_the_bytes_of_field_by_field(seed):
    """Runs of fixed-width fields packed at once, text between them: the same row bytes.

    Columns in an order that makes runs of several fixed-width fields, text after text,
    and a fixed-width column with nulls (its own argument) between; nulls at random rows.
    """
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, 400))
    frame = _frame(rows)[["levels_treated", "steroid_use", "procedure_date", "procedure_id",
                          "patient_hash", "site_id", "mdt_discussed", "operator_hash",
                          "indication", "record_number"]]
    for name in ("levels_treated", "procedure_date", "procedure_id"):
        if rng.random() < 0.5:  # a null in a column that otherwise has none
            values = frame[name].astype(object)
            values[rng.random(rows) < 0.2] = None
            frame[name] = values if name != "procedure_id" else values.astype("str")
    target = _table("kw_runs")
    table = pa.Table.from_pandas(frame, preserve_index=False)
    kinds = [load._BINARY_TYPES[type(target.c[name].type)] for name in table.column_names]
    rendered = load._binary_copy_rows(table, [target])
    assert rendered is not None
    assert b"".join(map(bytes, rendered[1:-1])) == _field_by_field(table, kinds)
