"""The reader's split route gives exactly the chunks of the csv module route (issue 10).

``iter_chunks`` splits lines without a quote character at commas and takes runs of
well-shaped records in slices; everything else goes through ``csv`` as before. These tests
compare, on hostile inputs, three readers: the new one, the new one with the split route
off (``FAST_SPLIT = False``), and :func:`reference_chunks`, a verbatim copy of the loop
before the change (the csv module over every line). Compared: every chunk's records,
record numbers and misshapen rows, the chunk cut points, and the rejection and its
message, including the chunks handed out before it. Blocks and the character cut are
shrunk so that quoted records span blocks and chunks are cut by characters.
"""

from __future__ import annotations

import csv
import gc
import gzip
import os
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.contract import COLUMNS, PROCEDURES
from pipelines.ingest import reader
from pipelines.ingest.reader import Chunk, FileRejected, ReadLimits, iter_chunks, open_extract

EXAMPLES = int(os.environ.get("KYPHOWATCH_FUZZ_EXAMPLES", "25")) * 8
NAMES = [spec.name for spec in COLUMNS[PROCEDURES]]
WIDTH = len(NAMES)
LIMITS = replace(ReadLimits.defaults(), max_line_chars=400, max_fields=40, max_rows=60,
                 max_seconds=60.0, allowed_owner_uids=(os.getuid(),))


def reference_chunks(extract, chunk_rows):
    """``iter_chunks`` as it was before the split route (commit d731e77), the oracle."""
    limits, name = extract.limits, extract.path.name
    width = len(extract.header)
    keep = [extract.header.index(name) for name in extract.columns]
    reorder = keep != list(range(width))
    records, numbers, bad_shape = [], [], []
    number = blank = 0
    span = [0, 0]
    chunk_start = 0
    max_rows, max_fields = limits.max_rows, limits.max_fields
    previous_limit = csv.field_size_limit(limits.max_line_chars)
    try:
        with reader._open_text(extract) as text:
            rows = csv.reader(reader._bounded_lines(text, extract, span), strict=False)
            next(rows, None)
            span[0] = 0
            collecting = gc.isenabled()
            gc.disable()
            try:
                for row in rows:
                    span[0] = 0
                    if not row or (len(row) == 1 and not row[0].strip()):
                        blank += 1
                        if number + blank > max_rows:
                            raise reader._too_many_rows(name, max_rows)
                        continue
                    number += 1
                    if number + blank > max_rows:
                        raise reader._too_many_rows(name, max_rows)
                    if len(row) != width:
                        if len(row) > max_fields:
                            raise FileRejected(
                                f"{name}: record {number} has {len(row)} fields; the limit "
                                f"is {max_fields} (KYPHOWATCH_INGEST_MAX_FIELDS)"
                            )
                        bad_shape.append((number, row))
                    else:
                        records.append([row[i] for i in keep] if reorder else row)
                        numbers.append(number)
                    if (len(records) + len(bad_shape) >= chunk_rows
                            or span[1] - chunk_start >= reader.CHUNK_CHARS):
                        if collecting:
                            gc.enable()
                        yield Chunk(records, numbers, bad_shape)
                        records, numbers, bad_shape = [], [], []
                        chunk_start = span[1]
                        reader._check_time(name, limits, extract.started)
                        gc.disable()
            finally:
                if collecting:
                    gc.enable()
    except FileRejected:
        raise
    except Exception as exc:
        raise reader._translate(exc, extract.path, limits) from exc
    finally:
        csv.field_size_limit(previous_limit)
    if records or bad_shape:
        yield Chunk(records, numbers, bad_shape)


def outcome(path: Path, chunks, chunk_rows: int, limits: ReadLimits = LIMITS):
    """Every chunk as plain lists, then the rejection message (or None)."""
    got = []
    try:
        extract = open_extract(path, limits, b"test-key")
    except FileRejected as exc:  # the header read sees the first block's lines too
        return got, "open: " + str(exc)
    try:
        for chunk in chunks(extract, chunk_rows):
            got.append((chunk.records, chunk.record_numbers, chunk.bad_shape))
    except FileRejected as exc:
        return got, str(exc)
    finally:
        extract.close()
    return got, None


def compare(path: Path, chunk_rows: int, limits: ReadLimits = LIMITS):
    """Assert the three readers agree; return the reference outcome."""
    expected = outcome(path, reference_chunks, chunk_rows, limits)
    assert outcome(path, iter_chunks, chunk_rows, limits) == expected
    reader.FAST_SPLIT = False
    try:
        assert outcome(path, iter_chunks, chunk_rows, limits) == expected
    finally:
        reader.FAST_SPLIT = True
    return expected


def write(path: Path, body: str, header: str | None = None, *, gz: bool = False) -> Path:
    data = ((header if header is not None else ",".join(NAMES)) + "\n" + body).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def row(tag: str, width: int = WIDTH) -> str:
    return ",".join(f"{tag}{i}" for i in range(width))


CASES = {
    "plain": "".join(row(f"r{n}_") + "\n" for n in range(40)),
    "crlf": "".join(row(f"r{n}_") + "\r\n" for n in range(40)),
    "lone_cr": "".join(row(f"r{n}_") + "\r" for n in range(40)),
    "mixed_ends": "".join(row(f"r{n}_") + ("\n", "\r\n", "\r")[n % 3] for n in range(40)),
    "no_final_newline": "".join(row(f"r{n}_") + "\n" for n in range(10)) + row("last"),
    "blank_lines": "\n\n".join(row(f"r{n}_") for n in range(20)) + "\n\n   \n\t\n\r\n",
    "ragged": "".join(row(f"r{n}_", WIDTH + (n % 5) - 2) + "\n" for n in range(40)),
    "empty_fields": ("," * (WIDTH - 1) + "\n") * 10 + " ," * (WIDTH - 1) + " \n",
    "quoted": "".join(
        row(f"r{n}_").replace("r" + str(n) + "_3", '"q,""x"" ' + str(n) + '"') + "\n"
        for n in range(40)),
    "quoted_newlines": "".join(
        row(f"r{n}_").replace(f"r{n}_2", f'"line\nbreak\r\n{n}"') + "\n" for n in range(30)),
    "quote_mid_field": "".join(row(f'a"b{n}_') + "\n" for n in range(20)),
    "unclosed_quote": row("a") + '\n"open,' + row("b") + "\n" + row("c") + "\n" * 5,
    "quote_then_plain": "".join(
        (row(f"r{n}_").replace(f"r{n}_1", '"x"') if n % 4 == 0 else row(f"r{n}_")) + "\n"
        for n in range(40)),
    "unicode": "".join(row(f"é{n}☃\u00a0_") + "\n" for n in range(30)),
    "other_separators": "".join(row(f"r{n}\x0b\x0c\x1c\x85\u2028_") + "\n" for n in range(30)),
    "nul_late": "".join(row(f"r{n}_") + "\n" for n in range(20)) + "x\x00y\n" + row("z") + "\n",
    "too_long_line": "".join(row(f"r{n}_") + "\n" for n in range(20)) + "x" * 500 + "\n",
    "too_many_fields": "".join(row(f"r{n}_") + "\n" for n in range(5)) + "," * 60 + "\n",
    "too_many_rows": "".join(row(f"r{n}_") + "\n" for n in range(80)),
    "too_many_blank": "".join(row(f"r{n}_") + "\n" for n in range(20)) + "\n" * 60,
    "long_quoted_record": row("a") + '\n"' + "x\n" * 300 + '",' + row("b") + "\n",
}


@pytest.mark.parametrize("block_chars", [7, 64, 333, 1 << 20])
@pytest.mark.parametrize("case", sorted(CASES))
def test_split_route_gives_the_csv_route_chunks(tmp_path, monkeypatch, case, block_chars):
    monkeypatch.setattr(reader, "_BLOCK_CHARS", block_chars)
    path = write(tmp_path / "procedures_20240101.csv", CASES[case])
    for chunk_rows in (1, 3, 7, 100):
        for chunk_chars in (1, 150, 1 << 25):
            monkeypatch.setattr(reader, "CHUNK_CHARS", chunk_chars)
            compare(path, chunk_rows)


def test_bom_gzip_reordered_and_unknown_columns(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "_BLOCK_CHARS", 97)
    header = ",".join(reversed(NAMES)) + ",extra"
    body = "".join(row(f"r{n}_", WIDTH + 1) + ("\r\n" if n % 2 else "\n") for n in range(40))
    plain = write(tmp_path / "procedures_20240101.csv", body, "\ufeff" + header)
    packed = write(tmp_path / "procedures_20240102.csv.gz", body, "\ufeff" + header, gz=True)
    for path in (plain, packed):
        got, error = compare(path, 6)
        assert error is None and sum(len(records) for records, _, _ in got) == 40
        assert got[0][0][0] == [f"r0_{i}" for i in range(WIDTH)]  # the extra column dropped


def test_cases_exercise_the_routes(tmp_path):
    """The table above reaches what it is meant to: cuts, misshapen rows, each rejection."""
    messages = {}
    for case in ("nul_late", "too_long_line", "too_many_fields", "too_many_rows",
                 "too_many_blank", "long_quoted_record", "ragged"):
        path = write(tmp_path / f"procedures_2024010{len(messages)}.csv", CASES[case])
        messages[case] = compare(path, 7)
    assert "NUL" in messages["nul_late"][1] and messages["nul_late"][0]
    assert "line limit" in messages["too_long_line"][1]
    assert "fields; the limit" in messages["too_many_fields"][1]
    assert "more than 60 records" in messages["too_many_rows"][1]
    assert "more than 60 records" in messages["too_many_blank"][1]
    assert "spanning lines" in messages["long_quoted_record"][1] or \
        "spans more than" in messages["long_quoted_record"][1]
    assert any(bad for _, _, bad in messages["ragged"][0])


piece = st.one_of(
    st.sampled_from(["a", "b1", "", " ", ",", ",,", '"', '""', '"x,y"', "\n", "\r\n", "\r",
                     "é", "\u2028", "\x0b", "\x00", "\t"]),
    st.sampled_from([row("w"), row("w", WIDTH - 1) + ",", row("w", WIDTH - 1)]),
    st.just("x" * 120),
)


# Generated files read with generated block, chunk and limit sizes (test_ingest_arrow_split
# reuses both): ``fuzzed_files(examples)`` decorates a test taking these arguments.
def fuzzed_files(examples: int):
    """Hypothesis settings and strategies of the reader's file fuzz tests."""
    def decorate(test):
        return settings(max_examples=examples, deadline=None, suppress_health_check=[
            HealthCheck.too_slow, HealthCheck.function_scoped_fixture])(given(
                body=st.lists(piece, max_size=120).map("".join),
                block_chars=st.integers(1, 200), chunk_rows=st.integers(1, 12),
                chunk_chars=st.integers(1, 400), max_rows=st.integers(1, 80),
                max_line_chars=st.integers(30, 300))(test))
    return decorate


def check_fuzzed(check, path: Path, block_chars: int, chunk_rows: int, chunk_chars: int,
                 max_rows: int, max_line_chars: int) -> None:
    """Run ``check(path, chunk_rows, limits)`` with the generated block and chunk sizes."""
    limits = replace(LIMITS, max_rows=max_rows, max_line_chars=max_line_chars)
    saved = reader._BLOCK_CHARS, reader.CHUNK_CHARS
    reader._BLOCK_CHARS, reader.CHUNK_CHARS = block_chars, chunk_chars
    try:
        check(path, chunk_rows, limits)
    finally:
        reader._BLOCK_CHARS, reader.CHUNK_CHARS = saved


@fuzzed_files(EXAMPLES)
def test_fuzz_split_route_gives_the_csv_route_chunks(tmp_path_factory, body, block_chars,
                                                     chunk_rows, chunk_chars, max_rows,
                                                     max_line_chars):
    path = write(tmp_path_factory.mktemp("fast") / "procedures_20240101.csv", body)
    check_fuzzed(compare, path, block_chars, chunk_rows, chunk_chars, max_rows, max_line_chars)
