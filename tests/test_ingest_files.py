"""A corpus of malformed files: each is rejected with a clear reason or its bad rows quarantined.

Table-driven: every case names the file, its bytes, and what must happen (rejected with a
reason containing a phrase, or loaded with given quarantine reasons and row counts).
"""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.ingest import ingest_paths
from tests.ingest_helpers import (
    COMP_HEADER,
    PROC_HEADER,
    comp_row,
    csv_text,
    proc_row,
    write,
)

GOOD = [proc_row("P1", patient="PT-1"), proc_row("P2", patient="PT-2")]


def procs(*rows: dict) -> str:
    return csv_text(PROC_HEADER, list(GOOD) + list(rows))


# (case id, file name, content, gz, expected status, phrase in reason or quarantine reasons)
REJECTED = [
    ("empty", "procedures_20240201.csv", b"", False, "empty file"),
    ("whitespace_only", "procedures_20240201.csv", b"\n\n  \n", False, "empty file"),
    ("latin1", "procedures_20240201.csv",
     procs(proc_row("P3", patient="Jos\u00e9")).encode("latin-1"), False, "not UTF-8"),
    ("utf16", "procedures_20240201.csv", procs().encode("utf-16"), False, "not UTF-8"),
    ("semicolon", "procedures_20240201.csv", procs().replace(",", ";"), False, "wrong delimiter"),
    ("tab", "procedures_20240201.csv", procs().replace(",", "\t"), False, "wrong delimiter"),
    ("missing_column", "procedures_20240201.csv",
     csv_text([h for h in PROC_HEADER if h != "procedure_date"], GOOD), False,
     "missing required column(s): procedure_date"),
    ("no_header", "procedures_20240201.csv",
     "\n".join(",".join(proc_row(f"P{i}").values()) for i in range(3)) + "\n", False,
     "missing required column"),
    ("duplicate_column", "procedures_20240201.csv",
     csv_text(PROC_HEADER + ["site_id"], GOOD), False, "duplicated column(s): site_id"),
    ("truncated_gzip", "procedures_20240201.csv.gz", None, True, "truncated or corrupt gzip"),
    ("not_gzip", "procedures_20240201.csv.gz", b"\x1f\x8bnot really gzip", False,
     "truncated or corrupt gzip"),
    ("nul_bytes", "procedures_20240201.csv", procs().replace("PT-1", "PT\x00-1"), False, "NUL"),
    ("unbalanced_quote", "procedures_20240201.csv",
     procs() + 'P9,S001,"PT-9,OP,2024-01-01\n' + ("x" * 1_100_000) + "\n", False,
     "exceeds"),
    ("mostly_bad", "procedures_20240201.csv",
     csv_text(PROC_HEADER, [proc_row(f"P{i}", age_years="7") for i in range(10)]), False,
     "rows invalid"),
    ("complications_missing_column", "complications_20240201.csv",
     csv_text([h for h in COMP_HEADER if h != "event_type"], [comp_row()]), False,
     "missing required column(s): event_type"),
    ("bad_name", "extract_20240201.csv", procs(), False, "not an extract name"),
]


@pytest.mark.parametrize("case", REJECTED, ids=[c[0] for c in REJECTED])
def test_bad_file_is_rejected_with_reason_and_nothing_stored(case, tmp_path, sqlite_url, settings_for):
    _, name, content, gz, phrase = case
    if content is None:  # truncated gzip: a valid stream cut in half
        import gzip

        full = gzip.compress(procs().encode() * 50)
        content, gz = full[: len(full) // 2], False
    path = write(tmp_path / "in" / name, content, gz=gz)
    report = ingest_paths(settings_for(sqlite_url), [path])
    [result] = report.files
    assert result.status == "rejected"
    assert phrase in result.reason
    assert "\n" not in result.reason
    assert report.exit_code == 2
    assert "PT-1" not in result.reason and "Jos" not in result.reason
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.procedure)).scalar() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.quarantine)).scalar() == 0
        if name != "extract_20240201.csv":
            status = conn.execute(sa.select(schema.file_ledger.c.status)).scalars().all()
            assert status == ["rejected"]


# (case id, extra rows or full text, expected quarantine reasons, expected loaded rows)
ROW_CASES = [
    ("bad_date", [proc_row("P3", date="2024-13-01")], {"procedure_date:not_a_date"}),
    ("impossible_date", [proc_row("P3", date="2024-02-30")], {"procedure_date:not_a_date"}),
    ("us_date", [proc_row("P3", date="01/05/2024")], {"procedure_date:not_a_date"}),
    ("future_date", [proc_row("P3", date="2024-03-01")], {"procedure_date:future"}),
    ("ancient_date", [proc_row("P3", date="1980-01-01")], {"procedure_date:too_early"}),
    ("age_out_of_range", [proc_row("P3", age_years="120")], {"age_years:out_of_range"}),
    ("age_not_integer", [proc_row("P3", age_years="78.5")], {"age_years:not_integer"}),
    ("levels_zero", [proc_row("P3", levels_treated="0")], {"levels_treated:out_of_range"}),
    ("balloons_three", [proc_row("P3", balloons="3")], {"balloons:out_of_range"}),
    ("unknown_indication", [proc_row("P3", indication="trauma")], {"indication:not_allowed"}),
    ("bad_bool", [proc_row("P3", steroid_use="maybe")], {"steroid_use:not_boolean"}),
    ("bad_sex", [proc_row("P3", sex="X")], {"sex:not_allowed"}),
    ("lowercase_site", [proc_row("P3", site="s001")], {"site_id:bad_format"}),
    ("bad_procedure_id", [proc_row("P 3")], {"procedure_id:bad_format"}),
    ("missing_patient", [proc_row("P3", patient="")], {"patient_ref:missing"}),
    ("formula_hyperlink", [proc_row("P3", patient='=HYPERLINK("http://x","y")')],
     {"patient_ref:formula_like"}),
    ("formula_plus", [proc_row("P3", operator_ref="+SUM(A1)")], {"operator_ref:formula_like"}),
    ("huge_field", [proc_row("P3", patient="A" * 5000)], {"patient_ref:too_long"}),
    ("duplicate_in_file", [proc_row("P3"), proc_row("P3", age_years="80")],
     {"procedure_id:duplicate_in_file"}),
    ("several_faults_one_row", [proc_row("P3", age_years="5", sex="Q")],
     {"age_years:out_of_range", "sex:not_allowed"}),
]


@pytest.mark.parametrize("case", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_bad_rows_are_quarantined_with_every_reason(case, tmp_path, sqlite_url, settings_for):
    _, extra, reasons = case
    path = write(tmp_path / "procedures_20240201.csv", procs(*extra))
    report = ingest_paths(settings_for(sqlite_url, max_bad_row_share=0.9), [path])
    [result] = report.files
    assert result.status == "loaded", result.reason
    assert report.exit_code == 0
    assert set(result.quarantine_reasons) == reasons
    assert result.rows_read == 2 + len(extra)
    assert result.inserted + result.quarantined == result.rows_read  # nothing lost
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(schema.quarantine.c.reasons, schema.quarantine.c.raw_values)).all()
    assert {r for row in stored for r in json.loads(row.reasons)} == reasons
    for row in stored:  # raw values kept, patient reference only as a digest
        assert "PT-" not in row.raw_values and "HYPERLINK" not in row.raw_values


def test_accepted_variants_load(tmp_path, sqlite_url, settings_for):
    """BOM, CRLF, quoted commas, upper-case booleans, extra columns, gzip, header-only all load."""
    rows = [proc_row("P1", steroid_use="YES", mdt_discussed="1"),
            proc_row("P2", patient='PT,"2"', steroid_use="No", mdt_discussed="FALSE")]
    text = csv_text(PROC_HEADER + ["free_text"], [dict(r, free_text="called Mrs Smith") for r in rows])
    files = [
        write(tmp_path / "a" / "procedures_20240201.csv", "\ufeff" + text.replace("\n", "\r\n")),
        write(tmp_path / "b" / "procedures_20240202.csv.gz", text.replace("P1", "P5").replace("P2", "P6"), gz=True),
        write(tmp_path / "c" / "complications_20240201.csv", ",".join(COMP_HEADER) + "\n"),
    ]
    report = ingest_paths(settings_for(sqlite_url), files)
    assert [f.status for f in report.files] == ["loaded", "loaded", "loaded"]
    assert [f.inserted for f in report.files] == [2, 2, 0]
    # unknown header cells are reported by position and keyed hash, never by their text
    [dropped] = report.files[0].dropped_columns
    position = len(PROC_HEADER) + 1  # 1-based: the first column after the contract's
    assert dropped.startswith(f"column {position} name_hmac ") and "free_text" not in dropped
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        flags = dict(conn.execute(sa.select(schema.procedure.c.procedure_id, schema.procedure.c.steroid_use)).all())
        assert flags == {"P1": True, "P2": False, "P5": True, "P6": False}
        columns = [c["name"] for c in sa.inspect(engine).get_columns("procedure")]
        assert "free_text" not in columns and "patient_ref" not in columns


def test_wrong_field_count_row_is_quarantined_without_raw_reference(tmp_path, sqlite_url, settings_for):
    text = procs() + "P7,S001,PT-SECRET,OP,2024-01-01\n"
    report = ingest_paths(settings_for(sqlite_url), [write(tmp_path / "procedures_20240201.csv", text)])
    [result] = report.files
    assert result.quarantine_reasons == {"row:wrong_field_count": 1}
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        raw = conn.execute(sa.select(schema.quarantine.c.raw_values)).scalar_one()
    assert "PT-SECRET" not in raw and json.loads(raw)["field_count"] == 5


def test_quarantine_keeps_a_site_column_only_for_well_formed_site_ids(tmp_path, sqlite_url,
                                                                      settings_for):
    # A shifted or mistyped row can carry anything in the site field, even a patient
    # number; views and reports group quarantine by that column, so only real site ids stay.
    rows = [proc_row("P3", site="9434765919"), proc_row("P4", site="s001"),
            proc_row("P5", date="2024-13-01")]
    path = write(tmp_path / "procedures_20240201.csv", procs(*rows))
    ingest_paths(settings_for(sqlite_url, max_bad_row_share=0.9), [path])
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        sites = dict(conn.execute(sa.select(schema.quarantine.c.record_id,
                                            schema.quarantine.c.site_id)).all())
    assert sites == {"P3": None, "P4": None, "P5": "S001"}


def test_complication_rules_against_the_warehouse(tmp_path, sqlite_url, settings_for):
    settings = settings_for(sqlite_url, max_bad_row_share=0.9)
    ingest_paths(settings, [write(tmp_path / "procedures_20240201.csv", procs())])
    comps = csv_text(COMP_HEADER, [
        comp_row("C1", "P1"),
        comp_row("C2", "P1", date="2024-01-01"),         # before the procedure
        comp_row("C3", "P2", site="S002"),               # other site than its procedure
        comp_row("C4", "P404"),                          # procedure not yet known
        comp_row("C5", "P1", event_type="explosion"),    # not in the contract
        comp_row("C6", "P1", vertebral_level="Z9"),
    ])
    [result] = ingest_paths(settings, [write(tmp_path / "complications_20240201.csv", comps)]).files
    assert result.status == "loaded"
    assert result.inserted == 1 and result.pending == 1
    assert result.quarantine_reasons == {
        "event_date:before_procedure": 1, "site_id:differs_from_procedure": 1,
        "event_type:not_allowed": 1, "vertebral_level:bad_format": 1,
    }


def test_missing_file_and_unknown_names(tmp_path, sqlite_url, settings_for):
    write(tmp_path / "dir" / "manifest.json", "{}")
    write(tmp_path / "dir" / "procedures_20240201.csv", procs())
    report = ingest_paths(settings_for(sqlite_url), [tmp_path / "dir", tmp_path / "nope.csv"])
    statuses = {f.path.split("/")[-1]: f.status for f in report.files}
    assert statuses == {"procedures_20240201.csv": "loaded", "nope.csv": "rejected"}
    assert report.exit_code == 2


def test_pending_complication_that_contradicts_its_procedure_is_quarantined_later(
        tmp_path, sqlite_url, settings_for):
    settings = settings_for(sqlite_url, max_bad_row_share=0.9)
    comps = csv_text(COMP_HEADER, [comp_row("C1", "P1", date="2024-01-01"),  # before P1
                                   comp_row("C2", "P2", date="2024-01-06")])
    [first] = ingest_paths(settings, [write(tmp_path / "complications_20240201.csv", comps)]).files
    assert first.pending == 2 and first.quarantined == 0
    [second] = ingest_paths(settings, [write(tmp_path / "procedures_20240201.csv", procs())]).files
    assert second.promoted == 1
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        reasons = conn.execute(sa.select(schema.quarantine.c.record_id,
                                         schema.quarantine.c.reasons)).all()
        ledger = dict(conn.execute(sa.select(schema.file_ledger.c.file_name,
                                             schema.file_ledger.c.rows_quarantined)).all())
        current = set(conn.scalars(sa.select(schema.complication.c.complication_id)))
    assert [(r.record_id, json.loads(r.reasons)) for r in reasons] == [
        ("C1", ["event_date:before_procedure"])]
    assert ledger["complications_20240201.csv"] == 1  # counted against the file that sent it
    assert current == {"C2"}


def test_same_stamp_deliveries_warn(tmp_path, sqlite_url, settings_for, caplog):
    settings = settings_for(sqlite_url)
    ingest_paths(settings, [write(tmp_path / "a" / "procedures_20240201.csv", procs())])
    corrected = procs().replace("osteoporosis", "malignancy", 1)
    with caplog.at_level("WARNING"):
        ingest_paths(settings, [write(tmp_path / "b" / "procedures_20240201_fixed.csv", corrected)])
    assert "same extract stamp" in caplog.text
