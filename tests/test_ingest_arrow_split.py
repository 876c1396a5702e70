"""The reader's Arrow route gives the rows, reasons and warehouse of the row route (issue 10).

Runs of quote-free lines that all have the header's width are split by Arrow and handed to
validation as one flat Arrow array (``Chunk.flat``); anything else (a blank or misshapen
line, a quote, a limit reached) goes row by row as before. These tests compare the two
routes (``reader.ARROW_SPLIT`` on and off) and the csv-module reader before the split route
(``reference_chunks``): every chunk's records, record numbers, misshapen rows and cut
points, and every rejection with its message, on the hostile cases of
``test_reader_fastpath`` and on generated files; then whole loads of a simulated registry
with bad rows and hostile lines, on SQLite and PostgreSQL: the same quarantine reasons row
by row and the same warehouse.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

import pyarrow as pa
import pytest
import sqlalchemy as sa

from pipelines.contract import COLUMNS, PROCEDURES
from pipelines.ingest import ingest_paths, reader
from pipelines.ingest.reader import ReadLimits, iter_chunks, open_extract
from pipelines.ingest.validate import _text_frame
from tests.ingest_helpers import snapshot
from tests.test_reader_fastpath import (
    CASES,
    LIMITS,
    WIDTH,
    check_fuzzed,
    fuzzed_files,
    outcome,
    reference_chunks,
    write,
)

EXAMPLES = int(os.environ.get("KYPHOWATCH_FUZZ_EXAMPLES", "25")) * 4


def routes(path: Path, chunk_rows: int, limits: ReadLimits = LIMITS):
    """Assert the Arrow route, the row route and the reference agree; return the outcome."""
    expected = outcome(path, reference_chunks, chunk_rows, limits)
    assert outcome(path, iter_chunks, chunk_rows, limits) == expected
    reader.ARROW_SPLIT = False
    try:
        assert outcome(path, iter_chunks, chunk_rows, limits) == expected
    finally:
        reader.ARROW_SPLIT = True
    return expected


def flat_chunks(path: Path, chunk_rows: int, limits: ReadLimits = LIMITS) -> list[bool]:
    """For each chunk of the file, whether it came by the Arrow route (``flat`` set)."""
    extract = open_extract(path, limits, b"test-key")
    try:
        return [chunk.flat is not None for chunk in iter_chunks(extract, chunk_rows)]
    finally:
        extract.close()


@pytest.mark.parametrize("block_chars", [7, 333, 1 << 20])
@pytest.mark.parametrize("case", sorted(CASES))
def test_arrow_route_gives_the_row_route_chunks(tmp_path, monkeypatch, case, block_chars):
    monkeypatch.setattr(reader, "_BLOCK_CHARS", block_chars)
    path = write(tmp_path / "procedures_20240101.csv", CASES[case])
    for chunk_rows in (1, 7, 100):
        for chunk_chars in (150, 1 << 25):
            monkeypatch.setattr(reader, "CHUNK_CHARS", chunk_chars)
            routes(path, chunk_rows)


def test_well_formed_blocks_go_by_arrow_and_malformed_ones_row_by_row(tmp_path):
    plain = write(tmp_path / "procedures_20240101.csv", CASES["plain"])
    assert all(flat_chunks(plain, 7))
    # Every run of lines holds a misshapen (ragged) or blank line: the row route throughout,
    # with the misshapen rows' numbers as before.
    for case in ("ragged", "blank_lines"):
        path = write(tmp_path / f"procedures_2024010{len(case)}.csv", CASES[case])
        assert not any(flat_chunks(path, 100))
        assert routes(path, 100)[1] is None
    ragged = write(tmp_path / "procedures_20240109.csv", CASES["ragged"])
    (chunk,), _ = routes(ragged, 100)
    assert [number for number, _ in chunk[2]] == [
        n + 1 for n in range(40) if WIDTH + (n % 5) - 2 != WIDTH]
    # A quoted line is csv's; the quote-free runs around it still go by Arrow.
    quoted = write(tmp_path / "procedures_20240110.csv", CASES["quote_then_plain"])
    assert any(flat_chunks(quoted, 100))
    routes(quoted, 100)


@fuzzed_files(EXAMPLES)
def test_fuzz_arrow_route_gives_the_row_route_chunks(tmp_path_factory, body, block_chars,
                                                     chunk_rows, chunk_chars, max_rows,
                                                     max_line_chars):
    path = write(tmp_path_factory.mktemp("arrow") / "procedures_20240101.csv", body)
    check_fuzzed(routes, path, block_chars, chunk_rows, chunk_chars, max_rows, max_line_chars)


def test_flat_text_frame_is_the_rows_text_frame():
    names = [spec.name for spec in COLUMNS[PROCEDURES]]
    records = [[f" v{row}_{column}\t" if column % 3 else "" for column in range(len(names))]
               for row in range(50)]
    flat = pa.array([value for record in records for value in record], type=pa.large_string())
    by_rows = _text_frame(records, names, PROCEDURES)
    assert _text_frame(None, names, PROCEDURES, flat).equals(by_rows)
    with pytest.raises(ValueError):
        _text_frame(None, names, PROCEDURES, flat.slice(1))


# --- whole loads ------------------------------------------------------------------------


def _hostile_registry(folder: Path) -> list[Path]:
    """A simulated registry with 5 % bad rows, plus hostile lines and a reordered file.

    The procedures file gets CRLF and lone-CR line ends, blank lines, misshapen rows and
    quoted fields (with commas and line breaks) between its rows; a second procedures file
    has the columns in reverse order and an unknown column.
    """
    from pipelines.simulate import simulate

    simulate(folder, sites=5, start=date(2023, 1, 1), end=date(2023, 4, 30), seed=11,
             bad_row_rate=0.05, single_file=True)
    procedures = next(folder.glob("procedures_*.csv"))
    header, *lines = procedures.read_text(encoding="utf-8").splitlines()
    width = header.count(",") + 1
    out = [header + "\n"]
    for number, line in enumerate(lines):
        fields = line.split(",")
        if number % 97 == 5:
            out.append("\n")  # a blank line
        if number % 89 == 7:
            out.append(",".join(fields[:-1]) + "\n")  # one field short
            continue
        if number % 83 == 3 and '"' not in line:
            fields[6] = f'"{fields[6]}, with a comma\nand a line break"'
        out.append(",".join(fields) + ("\r\n" if number % 7 == 1 else
                                       "\r" if number % 11 == 2 else "\n"))
    procedures.write_text("".join(out), encoding="utf-8", newline="")
    names = header.split(",")
    order = list(reversed(range(width)))
    rows = [line.split(",") for line in lines[:300] if '"' not in line]
    reordered = folder / "procedures_20240301.csv"
    reordered.write_text(
        ",".join([names[i] for i in order] + ["extra"]) + "\n"
        + "".join(",".join([row[i] for i in order] + ["x"]) + "\n"
                  for row in rows if len(row) == width),
        encoding="utf-8")
    return sorted(folder.glob("*.csv"))


@pytest.fixture
def second_pg_url(pg_admin_url: str):
    """A second new PostgreSQL database (``kw_load_*``), dropped after the test."""
    import uuid

    name = f"kw_load_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE DATABASE " + conn.dialect.identifier_preparer.quote(name))
    yield sa.make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql("DROP DATABASE IF EXISTS "
                             + conn.dialect.identifier_preparer.quote(name) + " WITH (FORCE)")
    admin.dispose()


def _quarantine(db_url: str) -> list[tuple]:
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT file_name, record_number, reasons, raw_values FROM quarantine "
            "ORDER BY file_name, record_number")).all()
    engine.dispose()
    return [tuple(row) for row in rows]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_registry_loads_identically_by_both_routes(backend, request, tmp_path, monkeypatch,
                                                     settings_for):
    files = _hostile_registry(tmp_path / "registry")
    monkeypatch.setattr(reader, "_BLOCK_CHARS", 4096)  # many runs, quoted records across blocks
    if backend == "sqlite":
        urls = {route: f"sqlite:///{tmp_path / route}.db" for route in ("arrow", "rows")}
    else:
        urls = {"arrow": request.getfixturevalue("pg_url"),
                "rows": request.getfixturevalue("second_pg_url")}
    reports = {}
    for route in ("arrow", "rows"):
        monkeypatch.setattr(reader, "ARROW_SPLIT", route == "arrow")
        reports[route] = ingest_paths(settings_for(urls[route], chunk_rows=700), files)
    arrow, rows = reports["arrow"], reports["rows"]
    assert [f.status for f in arrow.files] == ["loaded"] * len(files)
    assert [f.to_dict() for f in arrow.files] == [f.to_dict() for f in rows.files]
    assert sum(f.quarantined for f in arrow.files) > 20  # bad rows were there
    assert any("row:wrong_field_count" in (f.quarantine_reasons or {}) for f in arrow.files)
    quarantined = _quarantine(urls["arrow"])
    assert quarantined == _quarantine(urls["rows"])  # the same reasons, row by row
    assert snapshot(urls["arrow"]) == snapshot(urls["rows"])
