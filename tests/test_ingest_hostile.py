"""Hostile and unlucky input (issue 14): every file judged alone, resources bounded, no stray identifiers.

Table-driven. Each case builds one bad file and runs it in a batch beside good files that
load *after* it (a later procedures file and a complications file), then asserts the bad
file's status, reason and counts, the batch's exit code, and that every good row of the
other files is in the warehouse. Every case runs on SQLite; the D-cases (D1-D6 of the
issue) also run on the real PostgreSQL.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.ingest import ingest_paths
from pipelines.landing import process_landing
from tests.ingest_helpers import COMP_HEADER, PROC_HEADER, comp_row, csv_text, proc_row, write

BAD_NAME = "procedures_20240201.csv"
GOOD_PROCS = "procedures_20240301.csv"  # loads after the bad file
GOOD_COMPS = "complications_20240301.csv"
GOOD_IDS = {"G1", "G2"}


def good_files(folder: Path) -> list[Path]:
    procs = csv_text(PROC_HEADER, [proc_row("G1", patient="PT-G1"), proc_row("G2", patient="PT-G2")])
    comps = csv_text(COMP_HEADER, [comp_row("CG1", "G1")])
    return [write(folder / GOOD_PROCS, procs), write(folder / GOOD_COMPS, comps)]


def two_good(*extra: dict) -> str:
    """A procedures file: two good rows (B1, B2) plus ``extra`` rows."""
    return csv_text(PROC_HEADER, [proc_row("B1", patient="PT-B1"), proc_row("B2", patient="PT-B2"),
                                  *extra])


def gz_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def rows_text(count: int, start: int = 1) -> str:
    return "".join(
        ",".join(proc_row(f"R{i}", patient=f"PT-{i}").values()) + "\n"
        for i in range(start, start + count)
    )


HEADER_LINE = ",".join(PROC_HEADER) + "\n"


@dataclass
class Case:
    """One malformed input and what must happen to it."""

    name: str
    build: Callable[[Path], Path]  # writes the bad file (or node) and returns its path
    status: str  # rejected | loaded
    phrase: str = ""  # in the rejection reason
    inserted: int | None = None
    quarantine: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    before: Callable[[Path], list[Path]] | None = None  # loaded first, in its own call
    secrets: tuple[str, ...] = ()  # must not appear in the warehouse
    pg: bool = False  # a D-case: also run on PostgreSQL


def file_case(name: str, content: str | bytes, phrase: str, *, file_name: str = BAD_NAME,
              **kw) -> Case:
    data = content.encode() if isinstance(content, str) else content
    return Case(name, lambda d: write(d / file_name, data), "rejected", phrase, **kw)


def row_case(name: str, extra: list[dict], reasons: dict[str, int], secrets=(), **kw) -> Case:
    return Case(name, lambda d: write(d / BAD_NAME, two_good(*extra)), "loaded", inserted=2,
                quarantine=reasons, secrets=tuple(secrets), **kw)


def _symlink(folder: Path, target: Path) -> Path:
    link = folder / BAD_NAME
    link.symlink_to(target)
    return link


def _outside_target(folder: Path) -> Path:
    return write(folder.parent / "outside" / "secret.csv", two_good())


def _fifo(folder: Path) -> Path:
    path = folder / BAD_NAME
    os.mkfifo(path)
    return path


def _socket(folder: Path) -> Path:
    # AF_UNIX paths are short: bind in a short temporary directory, then move the node.
    short = Path(tempfile.mkdtemp(prefix="kw"))
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(short / "s"))
    server.close()
    target = folder / BAD_NAME
    os.replace(short / "s", target)
    short.rmdir()
    return target


def _foreign_owned(folder: Path) -> Path:
    path = write(folder / BAD_NAME, two_good())
    if os.getuid() != 0:
        pytest.skip("needs root to give a file to another user")
    os.chown(path, 54321, 54321)
    return path


def _stamped_original(folder: Path) -> list[Path]:
    return [write(folder / "procedures_20240115.csv",
                  csv_text(PROC_HEADER, [proc_row("B1", patient="PT-B1", age_years="70")]))]


def _unstamped_original(folder: Path) -> list[Path]:
    return [write(folder / "procedures_site.csv",
                  csv_text(PROC_HEADER, [proc_row("B1", patient="PT-B1", age_years="70")]))]


CANARY = "PTCANARY93817"
MANY_FIELDS = ",".join(["x"] * 5000)
MILLION_FIELDS = "," * 1_000_000

CASES: list[Case] = [
    # --- whole-file problems ---------------------------------------------------------
    file_case("empty", b"", "empty file"),
    file_case("whitespace_only", "\n\n  \n", "empty file"),
    file_case("latin1", two_good(proc_row("B3", patient="Jos\u00e9")).encode("latin-1"), "not UTF-8"),
    file_case("utf16", two_good().encode("utf-16"), "not UTF-8"),
    file_case("semicolon", two_good().replace(",", ";"), "wrong delimiter (semicolon)"),
    file_case("tab", two_good().replace(",", "\t"), "wrong delimiter (tab)"),
    file_case("pipe", two_good().replace(",", "|"), "wrong delimiter (pipe)"),
    file_case("missing_column", csv_text([h for h in PROC_HEADER if h != "procedure_date"],
                                         [proc_row("B1")]), "missing required column(s): procedure_date"),
    file_case("no_header", rows_text(3), "missing required column"),
    file_case("duplicate_column", csv_text(PROC_HEADER + ["site_id"], [proc_row("B1")]),
              "duplicated column(s): site_id"),
    file_case("truncated_gzip", gz_bytes(two_good().encode() * 50)[:200], "truncated or corrupt gzip",
              file_name=BAD_NAME + ".gz"),
    file_case("not_gzip", b"\x1f\x8bnot really gzip", "truncated or corrupt gzip",
              file_name=BAD_NAME + ".gz"),
    file_case("nul_in_body", two_good().replace("PT-B1", "PT\x00B1"), "NUL"),
    file_case("nul_in_header", "procedure_id\x00," + two_good(), "NUL"),
    file_case("nul_late", HEADER_LINE + rows_text(3000) + "P\x00X\n", "NUL"),
    file_case("bad_name", two_good(), "not an extract name", file_name="extract_20240201.csv"),
    file_case("complications_missing_column",
              csv_text([h for h in COMP_HEADER if h != "event_type"], [comp_row()]),
              "missing required column(s): event_type", file_name="complications_20240201.csv"),
    file_case("mostly_bad", csv_text(PROC_HEADER, [proc_row(f"B{i}", age_years="7") for i in range(10)]),
              "rows invalid"),
    # --- D3: long lines and records, checked while streaming --------------------------
    file_case("long_line_plain", two_good() + "B9," + "x" * (2 << 20) + "\n",
              "exceeds the 1048576-character line limit", pg=True),
    file_case("long_line_gz", gz_bytes(HEADER_LINE.encode() + b"y" * (64 << 20) + b"\n"),
              "line limit", file_name=BAD_NAME + ".gz", pg=True),
    file_case("long_line_no_final_newline", two_good() + "z" * (3 << 20), "line limit", pg=True),
    file_case("unclosed_quote_runs_on", two_good() + 'B9,S001,"PT-9' + "\nmore text" * 200_000,
              "exceeds 1048576 characters (an unclosed quote?)", pg=True),
    file_case("record_of_many_multiline_fields", two_good() + '"a\n",' * 1_200_000 + "x\n",
              "spans more than 1048576 characters over several lines (an unclosed quote?)",
              pg=True),
    file_case("long_quoted_field_one_line", two_good() + 'B9,S001,"' + "q" * (1_100_000) + '",x\n',
              "line limit", pg=True),
    # --- D2: fields per row -----------------------------------------------------------
    file_case("header_too_many_fields", ",".join(PROC_HEADER + [f"c{i}" for i in range(2000)]) + "\n",
              f"the header has {len(PROC_HEADER) + 2000} fields; the limit is 1000", pg=True),
    file_case("row_with_5000_fields", two_good() + MANY_FIELDS + "\n",
              "record 3 has 5000 fields; the limit is 1000", pg=True),
    file_case("row_with_a_million_fields", two_good() + MILLION_FIELDS + "\n",
              "record 3 has 1000001 fields", pg=True),
    file_case("gz_row_with_a_million_fields", gz_bytes((two_good() + MILLION_FIELDS + "\n").encode()),
              "has 1000001 fields", file_name=BAD_NAME + ".gz", pg=True),
    # --- D3: rows, decompression, size, time ------------------------------------------
    file_case("too_many_rows", HEADER_LINE + rows_text(10), "more than 5 records",
              env={"KYPHOWATCH_INGEST_MAX_ROWS": "5"}, pg=True),
    file_case("blank_lines_count_as_records", two_good() + "\n" * 10, "more than 5 records",
              env={"KYPHOWATCH_INGEST_MAX_ROWS": "5"}),
    file_case("gz_blank_lines_bomb", gz_bytes(HEADER_LINE.encode() + b"\n" * (64 << 20)),
              "decompresses more than 100 times", file_name=BAD_NAME + ".gz", pg=True),
    file_case("gz_repeated_row_bomb", gz_bytes(HEADER_LINE.encode() + rows_text(1).encode() * 200_000),
              "decompression bomb", file_name=BAD_NAME + ".gz"),
    file_case("decompressed_size_limit", gz_bytes((HEADER_LINE + rows_text(20_000)).encode()),
              "decompressed-size limit", file_name=BAD_NAME + ".gz",
              env={"KYPHOWATCH_INGEST_MAX_DECOMPRESSED_BYTES": "1000000"}),
    file_case("file_size_limit", HEADER_LINE + rows_text(20), "file limit",
              env={"KYPHOWATCH_INGEST_MAX_FILE_BYTES": "1000"}),
    file_case("time_budget", HEADER_LINE + rows_text(150_000), "second budget per file",
              env={"KYPHOWATCH_INGEST_MAX_SECONDS": "0.1"}),
    # --- D1 and D4: unreadable, vanished, not a regular file, foreign owner -------------
    Case("vanished", lambda d: d / BAD_NAME, "rejected", "no such file", pg=True),
    file_case("gz_of_nothing", gz_bytes(b""), "empty file", file_name=BAD_NAME + ".gz"),
    Case("symlink_to_outside_file", lambda d: _symlink(d, _outside_target(d)), "rejected",
         "is a symbolic link", pg=True),
    Case("dangling_symlink", lambda d: _symlink(d, d / "nowhere.csv"), "rejected",
         "is a symbolic link", pg=True),
    Case("fifo", _fifo, "rejected", "is a FIFO", pg=True),
    Case("socket", _socket, "rejected", "is a socket"),
    Case("character_device", lambda d: Path("/dev/null"), "rejected", "is a character device",
         pg=True),
    Case("foreign_owner", _foreign_owned, "rejected", "is owned by uid 54321", pg=True),
    # --- D5: corrections that their stamps cannot order ---------------------------------
    Case("unstamped_correction_of_stamped_row",
         lambda d: write(d / "procedures_fixed.csv", two_good()), "rejected",
         "needs a stamp: it changes 1 existing row(s) but has no extract stamp",
         before=_stamped_original, pg=True),
    Case("unstamped_correction_of_unstamped_row",
         lambda d: write(d / "procedures_fixed.csv", two_good()), "rejected", "needs a stamp",
         before=_unstamped_original, pg=True),
    Case("same_stamp_correction",
         lambda d: write(d / "procedures_20240115_fixed.csv", two_good()), "rejected",
         "has the same extract stamp (20240115T000000)", before=_stamped_original, pg=True),
    Case("later_stamped_correction_loads", lambda d: write(d / BAD_NAME, two_good()), "loaded",
         inserted=1, before=_stamped_original, pg=True),
    Case("unstamped_new_rows_load", lambda d: write(d / "procedures_fixed.csv", two_good()),
         "loaded", inserted=2),
    Case("unstamped_identical_rows_load",
         lambda d: write(d / "procedures_fixed.csv",
                         csv_text(PROC_HEADER, [proc_row("B1", patient="PT-B1", age_years="70")])
                         .replace("\n", "\r\n")),
         "loaded", inserted=0, before=_stamped_original),
    # --- accepted variants --------------------------------------------------------------
    Case("crlf", lambda d: write(d / BAD_NAME, two_good().replace("\n", "\r\n")), "loaded",
         inserted=2),
    Case("cr_only", lambda d: write(d / BAD_NAME, two_good().replace("\n", "\r")), "loaded",
         inserted=2),
    Case("bom", lambda d: write(d / BAD_NAME, "\ufeff" + two_good()), "loaded", inserted=2),
    Case("gzip", lambda d: write(d / (BAD_NAME + ".gz"), two_good(), gz=True), "loaded", inserted=2),
    Case("no_final_newline", lambda d: write(d / BAD_NAME, two_good().rstrip("\n")), "loaded",
         inserted=2),
    Case("form_feed_in_quoted_field",
         lambda d: write(d / BAD_NAME, two_good(proc_row("B3", operator_ref="OP\x0c3"))), "loaded",
         inserted=3),
    Case("header_case_and_spaces",
         lambda d: write(d / BAD_NAME, two_good().replace("procedure_id", " Procedure_ID ", 1)),
         "loaded", inserted=2),
    Case("many_unknown_columns",
         lambda d: write(d / BAD_NAME, csv_text(PROC_HEADER + [f"extra{i}" for i in range(900)],
                                                [proc_row("B1"), proc_row("B2")])),
         "loaded", inserted=2),
    Case("identifier_as_header_cell",
         lambda d: write(d / BAD_NAME, csv_text(PROC_HEADER + [CANARY], [proc_row("B1"), proc_row("B2")])),
         "loaded", inserted=2, secrets=(CANARY,), pg=True),
    # --- rows: shape and rules (quarantined, the rest of the file loads) ---------------
    Case("short_row", lambda d: write(d / BAD_NAME, two_good() + f"B7,S001,{CANARY},OP\n"), "loaded",
         inserted=2, quarantine={"row:wrong_field_count": 1}, secrets=(CANARY,), pg=True),
    Case("row_with_20_fields",
         lambda d: write(d / BAD_NAME, two_good() + ",".join([CANARY] * 20) + "\n"), "loaded",
         inserted=2, quarantine={"row:wrong_field_count": 1}, secrets=(CANARY,)),
    Case("row_with_900_fields",
         lambda d: write(d / BAD_NAME, two_good() + ",".join([CANARY] * 900) + "\n"), "loaded",
         inserted=2, quarantine={"row:wrong_field_count": 1}, secrets=(CANARY,), pg=True),
    row_case("patient_in_indication", [proc_row("B3", indication=CANARY)],
             {"indication:not_allowed": 1}, secrets=(CANARY,), pg=True),
    row_case("site_and_patient_swapped", [proc_row("B3", site=CANARY, patient="S001")],
             {"site_id:bad_format": 1}, secrets=(CANARY,), pg=True),
    row_case("patient_in_procedure_date", [proc_row("B3", date=CANARY)],
             {"procedure_date:not_a_date": 1}, secrets=(CANARY,), pg=True),
    row_case("patient_in_sex", [proc_row("B3", sex=CANARY)], {"sex:not_allowed": 1},
             secrets=(CANARY,)),
    row_case("patient_in_age", [proc_row("B3", age_years=CANARY)], {"age_years:not_integer": 1},
             secrets=(CANARY,)),
    row_case("patient_in_bool", [proc_row("B3", steroid_use=CANARY)],
             {"steroid_use:not_boolean": 1}, secrets=(CANARY,)),
    row_case("patient_in_anaesthesia", [proc_row("B3", anaesthesia=CANARY)],
             {"anaesthesia:not_allowed": 1}, secrets=(CANARY,)),
    row_case("long_text_in_indication", [proc_row("B3", indication="i" * 100_000)],
             {"indication:not_allowed": 1}, secrets=("i" * 300,)),
    row_case("us_date", [proc_row("B3", date="01/05/2024")], {"procedure_date:not_a_date": 1}),
    row_case("impossible_date", [proc_row("B3", date="2024-02-30")],
             {"procedure_date:not_a_date": 1}),
    row_case("future_date", [proc_row("B3", date="2024-03-01")], {"procedure_date:future": 1}),
    row_case("ancient_date", [proc_row("B3", date="1980-01-01")], {"procedure_date:too_early": 1}),
    row_case("missing_date", [proc_row("B3", date="")], {"procedure_date:missing": 1}),
    row_case("age_out_of_range", [proc_row("B3", age_years="120")], {"age_years:out_of_range": 1}),
    row_case("age_not_integer", [proc_row("B3", age_years="78.5")], {"age_years:not_integer": 1}),
    row_case("age_negative", [proc_row("B3", age_years="-5")], {"age_years:not_integer": 1}),
    row_case("levels_zero", [proc_row("B3", levels_treated="0")], {"levels_treated:out_of_range": 1}),
    row_case("balloons_three", [proc_row("B3", balloons="3")], {"balloons:out_of_range": 1}),
    row_case("unknown_indication", [proc_row("B3", indication="trauma")], {"indication:not_allowed": 1}),
    row_case("bad_bool", [proc_row("B3", steroid_use="maybe")], {"steroid_use:not_boolean": 1}),
    row_case("bad_sex", [proc_row("B3", sex="X")], {"sex:not_allowed": 1}),
    row_case("lowercase_site", [proc_row("B3", site="s001")], {"site_id:bad_format": 1}),
    row_case("missing_site", [proc_row("B3", site="")], {"site_id:missing": 1}),
    row_case("bad_procedure_id", [proc_row("B 3")], {"procedure_id:bad_format": 1}),
    row_case("missing_patient", [proc_row("B3", patient="")], {"patient_ref:missing": 1}),
    row_case("formula_hyperlink", [proc_row("B3", patient='=HYPERLINK("http://x","y")')],
             {"patient_ref:formula_like": 1}, secrets=("HYPERLINK",)),
    row_case("formula_plus", [proc_row("B3", operator_ref="+SUM(A1)")],
             {"operator_ref:formula_like": 1}, secrets=("SUM(A1)",)),
    row_case("huge_patient_ref", [proc_row("B3", patient="A" * 5000)], {"patient_ref:too_long": 1},
             secrets=("A" * 100,)),
    row_case("duplicate_in_file", [proc_row("B3"), proc_row("B3", age_years="80")],
             {"procedure_id:duplicate_in_file": 2}),
    row_case("several_faults_one_row", [proc_row("B3", age_years="5", sex="Q")],
             {"age_years:out_of_range": 1, "sex:not_allowed": 1}),
    row_case("quoted_newline_in_indication", [proc_row("B3", indication="osteo\nporosis")],
             {"indication:not_allowed": 1}),
]


def _good_rows_present(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        procs = set(conn.execute(sa.select(schema.procedure.c.procedure_id)).scalars())
        comps = set(conn.execute(sa.select(schema.complication.c.complication_id)).scalars())
    engine.dispose()
    assert GOOD_IDS <= procs, "a good row of another file in the batch was lost"
    assert "CG1" in comps, "the good complications file after the bad file was not loaded"


def _warehouse_text(db_url: str) -> str:
    """Every value of every warehouse table, as one string (for canary greps)."""
    engine = sa.create_engine(db_url)
    parts = []
    with engine.connect() as conn:
        for table in schema.metadata.sorted_tables:
            for row in conn.execute(sa.select(table)):
                parts.append(" ".join(str(v) for v in row))
    engine.dispose()
    return "\n".join(parts)


def run_case(case: Case, db_url: str, tmp_path: Path, settings_for, monkeypatch, caplog) -> None:
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    settings = settings_for(db_url, env=case.env, max_bad_row_share=0.9)
    if case.before:
        first = ingest_paths(settings, case.before(tmp_path / "before"))
        assert first.exit_code == 0, first.to_dict()
    folder = tmp_path / "in"
    folder.mkdir()
    bad = case.build(folder)
    batch = [bad, *good_files(tmp_path / "good")]
    report = ingest_paths(settings, batch)
    by_path = {Path(f.path): f for f in report.files}
    result = by_path[bad]
    assert result.status == case.status, result.reason
    for good in batch[1:]:
        assert by_path[good].status == "loaded", by_path[good].reason
    if case.status == "rejected":
        assert case.phrase in result.reason
        assert "\n" not in result.reason
        assert result.inserted == 0
        assert report.exit_code == 2
        engine = sa.create_engine(db_url)
        with engine.connect() as conn:  # the rejection is on record, with its reason
            reasons = conn.execute(
                sa.select(schema.file_ledger.c.reason)
                .where(schema.file_ledger.c.file_name == bad.name,
                       schema.file_ledger.c.status == "rejected")
            ).scalars().all()
        engine.dispose()
        assert reasons == [result.reason]
    else:
        assert report.exit_code == 0
        assert result.inserted == case.inserted
        assert result.quarantine_reasons == case.quarantine
        assert result.rows_read == (result.inserted + result.updated + result.unchanged
                                    + result.stale + result.quarantined + result.pending)
    _good_rows_present(db_url)
    if case.secrets:
        stored = _warehouse_text(db_url).lower()
        output = (json.dumps(report.to_dict()) + caplog.text).lower()
        for secret in case.secrets:  # case-blind: header cells are lower-cased
            assert secret.lower() not in stored
            assert secret.lower() not in output


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case_sqlite(case, tmp_path, sqlite_url, settings_for, monkeypatch, caplog):
    run_case(case, sqlite_url, tmp_path, settings_for, monkeypatch, caplog)


PG_CASES = [c for c in CASES if c.pg]


@pytest.mark.parametrize("case", PG_CASES, ids=[c.name for c in PG_CASES])
def test_hostile_case_postgres(case, tmp_path, pg_url, settings_for, monkeypatch, caplog):
    run_case(case, pg_url, tmp_path, settings_for, monkeypatch, caplog)


def test_corpus_size():
    """Issue 14 asks for at least 80 cases, every D-case on both databases."""
    assert len(CASES) >= 80
    assert len(PG_CASES) >= 25


def test_misshapen_row_keeps_a_bounded_preview(tmp_path, sqlite_url, settings_for):
    """D2: a 900-field row is stored as 16 keyed hashes, not 900 entries."""
    path = write(tmp_path / BAD_NAME, two_good() + ",".join(f"v{i}" for i in range(900)) + "\n")
    ingest_paths(settings_for(sqlite_url), [path])
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        raw = json.loads(conn.execute(sa.select(schema.quarantine.c.raw_values)).scalar_one())
    engine.dispose()
    assert raw["field_count"] == 900 and raw["preview_fields"] == 16
    assert len(raw["fields_hmac"]) == 16 and all(len(h) == 64 for h in raw["fields_hmac"])


def test_quarantine_keeps_well_shaped_values_and_hashes_the_rest(tmp_path, sqlite_url, settings_for):
    """D6: values with their column's shape stay readable; the others become ``<col>_hmac``."""
    path = write(tmp_path / BAD_NAME, two_good(proc_row("B3", indication=CANARY, age_years="150")))
    ingest_paths(settings_for(sqlite_url), [path])
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        raw = json.loads(conn.execute(sa.select(schema.quarantine.c.raw_values)).scalar_one())
    engine.dispose()
    assert raw["age_years"] == "150" and raw["sex"] == "F" and raw["procedure_date"] == "2024-01-05"
    assert "indication" not in raw and len(raw["indication_hmac"]) == 64
    assert "patient_ref" not in raw and len(raw["patient_hash"]) == 64


def test_unreadable_file_is_rejected_and_the_batch_goes_on(tmp_path):
    """D1 with a real permission error, through the command line: the unreadable file is
    rejected with its reason and a ledger row, the good files after it load; exit 2.

    Root reads every file, so the command runs without the capabilities that let it
    (``setpriv`` drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set).
    """
    if os.getuid() != 0:
        launcher: list[str] = []
    elif shutil.which("setpriv"):
        launcher = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    else:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    unreadable = write(tmp_path / BAD_NAME, two_good())
    unreadable.chmod(0o000)
    goods = good_files(tmp_path / "good")
    db = tmp_path / "warehouse.db"
    env = dict(os.environ, KYPHOWATCH_DEMO="1", KYPHOWATCH_DB_URL=f"sqlite:///{db}")
    completed = subprocess.run(
        [*launcher, sys.executable, "-m", "pipelines.cli", "ingest", "--json", str(unreadable),
         *map(str, goods)],
        env=env, capture_output=True, text=True, check=False, timeout=300,
    )
    unreadable.chmod(0o644)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr
    summary = json.loads(completed.stdout)
    statuses = {Path(f["path"]).name: (f["status"], f["reason"]) for f in summary["files"]}
    assert statuses[BAD_NAME] == ("rejected", f"{BAD_NAME}: cannot be opened (permission denied)")
    assert statuses[GOOD_PROCS][0] == statuses[GOOD_COMPS][0] == "loaded"
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        ledger = dict(conn.execute(sa.select(schema.file_ledger.c.file_name,
                                             schema.file_ledger.c.status)).all())
    engine.dispose()
    assert ledger == {BAD_NAME: "rejected", GOOD_PROCS: "loaded", GOOD_COMPS: "loaded"}


def test_landing_refuses_links_and_special_files_and_archives_bytes(tmp_path, sqlite_url,
                                                                    settings_for):
    """D4: a symlink and a FIFO in landing are refused with reasons, removed, never archived;
    the regular file beside them is archived as a regular file."""
    landing, archive, rejected = tmp_path / "landing", tmp_path / "archive", tmp_path / "rejected"
    landing.mkdir()
    outside = write(tmp_path / "outside" / "procedures_20240101.csv", two_good())
    (landing / "procedures_20240102.csv").symlink_to(outside)
    os.mkfifo(landing / "procedures_20240103.csv")
    (landing / "procedures_20240104").symlink_to(outside.parent)  # a link to a directory
    os.link(outside, landing / "procedures_20240105.csv")  # a hard link to a file outside
    write(landing / GOOD_PROCS, csv_text(PROC_HEADER, [proc_row("G1", patient="PT-G1")]))
    report = process_landing(settings_for(sqlite_url), landing, archive, rejected)
    statuses = {Path(f.path).name: (f.status, f.reason or "") for f in report.files}
    assert statuses["procedures_20240102.csv"][0] == "rejected"
    assert "symbolic link" in statuses["procedures_20240102.csv"][1]
    assert "FIFO" in statuses["procedures_20240103.csv"][1]
    assert statuses["procedures_20240104"] == (
        "rejected", "a symbolic link to a directory; only regular files are read")
    assert statuses["procedures_20240105.csv"][0] == "rejected"
    assert "has 2 hard links" in statuses["procedures_20240105.csv"][1]
    assert statuses[GOOD_PROCS][0] == "loaded"
    assert report.exit_code == 2
    assert not any(landing.iterdir())
    archived = list(archive.rglob("*.csv"))
    assert [p.name for p in archived] == [GOOD_PROCS]
    assert all(p.is_file() and not p.is_symlink() for p in archived)
    assert not [p for p in rejected.iterdir() if p.is_symlink()]
    reason = (rejected / "procedures_20240102.csv.reason.txt").read_text()
    assert "symbolic link" in reason
    assert outside.exists(), "the link's target outside landing must be left alone"
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        loaded = set(conn.execute(sa.select(schema.procedure.c.procedure_id)).scalars())
    engine.dispose()
    assert loaded == {"G1"}, "nothing behind a link may be loaded"


NAME_CANARY = "PTNAMECANARY7"
CELL_CANARIES = ("PTCELLCANARY1", "PTCELLCANARY2", "PTCELLCANARY3", "PTCELLCANARY4",
                 "PTHEADERCANARY5")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_canaries_never_reach_the_warehouse_logs_or_summary(backend, tmp_path, settings_for,
                                                            caplog, request):
    """Identifiers planted in wrong columns, a header cell and a file name appear nowhere:
    not in any warehouse table (quarantine and ledger included), the log, or the ingest JSON.

    The summary's ``path`` and the per-file log line carry the shown name too; landing
    renames such a file to its shown name before ingest (test_landing_renames_...).
    """
    caplog.set_level(logging.DEBUG)  # every record any logger emits is searched
    db_url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    c1, c2, c3, c4, header = CELL_CANARIES
    rows = [
        proc_row("B1", patient="PT-B1"), proc_row("B2", patient="PT-B2"),
        proc_row("B3", indication=c1),                      # patient reference in a text column
        proc_row("B4", site=c2, patient="S001"),            # site and patient swapped
        proc_row("B5", date=c3),                            # reference in a date column
    ]
    text = csv_text(PROC_HEADER + [header], rows) + f"B6,S001,{c4},OP\n"  # misshapen row
    bad = write(tmp_path / "in" / f"procedures_{NAME_CANARY}_20240201.csv", text)
    comps = write(tmp_path / "in" / f"complications_{NAME_CANARY}_20240202.csv",
                  csv_text(COMP_HEADER, [comp_row("C1", "B1"), comp_row("C2", "B1", site=c1)]))
    report = ingest_paths(settings_for(db_url, max_bad_row_share=0.9), [bad, comps])
    assert [f.status for f in report.files] == ["loaded", "loaded"]
    assert report.files[0].quarantined == 4 and report.files[0].inserted == 2
    stored = _warehouse_text(db_url)
    printed = json.dumps(report.to_dict())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    stored, printed, logged = stored.lower(), printed.lower(), logged.lower()
    for canary in (*CELL_CANARIES, NAME_CANARY):  # case-blind: header cells are lower-cased
        assert canary.lower() not in stored, canary
        assert canary.lower() not in printed, canary
        assert canary.lower() not in logged, canary
    assert "name_hmac" in stored  # the file is still recognisable by its keyed hash


def test_canaries_never_reach_alerts_or_the_report(tmp_path, sqlite_url, settings_for, caplog):
    """The same canaries, followed downstream: the data-quality alert the quarantined rows
    raise (e-mail text and HTML), the monitor, and the published evidence report."""
    from pipelines.alerts import deliver_outbox, sync_alerts
    from pipelines.mailsink import MailSink
    from pipelines.report import publish_report
    from pipelines.surveillance.engine import run_monitor

    caplog.set_level(logging.DEBUG)
    c1, c2, c3, c4, header = CELL_CANARIES
    rows = [proc_row(f"G{i}", patient=f"PT-G{i}") for i in range(8)] + [
        proc_row("B3", indication=c1), proc_row("B4", site=c2, patient="S001"),
        proc_row("B5", date=c3)]
    text = csv_text(PROC_HEADER + [header], rows) + f"B6,S001,{c4},OP\n"
    write(tmp_path / "in" / f"procedures_{NAME_CANARY}_20240201.csv", text)
    with MailSink(tmp_path / "mail") as sink:
        settings = settings_for(sqlite_url, max_bad_row_share=0.9, smtp_url=sink.url,
                                recipients_data=("data@example.org",),
                                recipients_safety=("safety@example.org",))
        report = ingest_paths(settings, [tmp_path / "in"])
        assert report.files[0].quarantined == 4
        run_monitor(settings)
        created = sync_alerts(settings).created
        assert created, "a file with 4 of 12 rows quarantined raises a data-quality alert"
        deliver_outbox(settings)
        mails = [m.as_string() for m in sink.messages()]
    # the alert names the file, by its shown name: the path the canaries could have taken
    assert any("name_hmac" in mail for mail in mails)
    index = publish_report(settings)
    published = [path.read_text(encoding="utf-8", errors="replace")
                 for path in index.parent.rglob("*") if path.is_file()]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    everything = "\n".join([*mails, *published, logged]).lower()
    for canary in (*CELL_CANARIES, NAME_CANARY):
        assert canary.lower() not in everything, canary


def test_landing_renames_a_file_whose_name_holds_an_identifier(tmp_path, sqlite_url, settings_for,
                                                              caplog):
    """D6: a landed file named with a patient reference is renamed to its shown name before
    ingest, so the report (an Airflow task's logged return value), the logs and the archive
    carry only the keyed hash of the name."""
    caplog.set_level(logging.DEBUG)
    landing, archive, rejected = tmp_path / "landing", tmp_path / "archive", tmp_path / "rejected"
    landing.mkdir()
    write(landing / f"procedures_{NAME_CANARY}_20240201.csv",
          csv_text(PROC_HEADER, [proc_row("G1", patient="PT-G1")]))
    report = process_landing(settings_for(sqlite_url), landing, archive, rejected)
    [result] = report.files
    assert result.status == "loaded" and result.inserted == 1
    assert "name_hmac" in result.shown_name and Path(result.path).name == result.shown_name
    printed = json.dumps(report.to_dict()).lower()
    logged = "\n".join(r.getMessage() for r in caplog.records).lower()
    archived = [p.name.lower() for p in archive.rglob("*")]
    assert archived and not any(NAME_CANARY.lower() in name for name in archived)
    assert NAME_CANARY.lower() not in printed and NAME_CANARY.lower() not in logged
    assert not any(landing.iterdir())
