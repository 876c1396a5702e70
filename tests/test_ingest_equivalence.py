"""The vectorised suite interpreter gives exactly GX's reasons, row by row (issue 10 item 4).

The same corpus goes through GX alone (``checker="gx"``, the declared suite) and through
the fast path with its audit switched off (so its own verdicts are compared, not GX's
re-check of them): the hostile row corpus of issue 14, Hypothesis-generated rows of mixed
valid values and arbitrary text for both extract kinds, and a simulated registry with bad
rows loaded end to end into two warehouses that must end up identical. Then the audit
itself: a fast path that disagrees with GX must stop the load, and every flagged row plus a
bounded, deterministic sample is what GX re-checks.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.contract import COLUMNS, COMPLICATIONS, PROCEDURES
from pipelines.ingest import fastcheck, ingest_paths, load
from pipelines.ingest.fastcheck import Audit, AuditMismatch, FastSuite, UnsupportedSuite
from pipelines.ingest.reader import ReadLimits, iter_chunks, open_extract
from pipelines.ingest.validate import validate_chunk
from pipelines.settings import load_settings
from tests.ingest_helpers import snapshot
from tests.test_ingest_fuzz import text_value
from tests.test_ingest_hostile import CASES

EXPECTATIONS = load_settings({}).expectations_dir
MAX_DATE = date(2024, 2, 1)
FUZZ_EXAMPLES = 30


def _both(records, numbers, columns, kind):
    """Validate with GX alone and with the unaudited fast path; return both results."""
    gx = validate_chunk(records, numbers, columns, kind, EXPECTATIONS, MAX_DATE, checker="gx")
    unaudited = Audit(str(EXPECTATIONS), kind, sample_rows=0)  # collected, never verified
    fast = validate_chunk(records, numbers, columns, kind, EXPECTATIONS, MAX_DATE,
                          audit=unaudited)
    return gx, fast


def _assert_same(gx, fast) -> None:
    assert {n: sorted(r) for n, r in fast.invalid.items()} == {
        n: sorted(r) for n, r in gx.invalid.items()}
    pd.testing.assert_frame_equal(fast.valid, gx.valid)


@pytest.mark.parametrize("case", [c for c in CASES if c.status == "loaded"], ids=lambda c: c.name)
def test_hostile_rows_get_the_same_reasons(case, tmp_path):
    path = case.build(tmp_path)
    extract = open_extract(path, ReadLimits.defaults(), b"equivalence-key")
    try:
        flagged = 0
        for chunk in iter_chunks(extract, chunk_rows=1000):
            if chunk.records:
                gx, fast = _both(chunk.records, chunk.record_numbers, extract.columns,
                                 extract.kind)
                _assert_same(gx, fast)
                flagged += len(gx.invalid)
    finally:
        extract.close()
    # the corpus is not vacuous: rows the case expects in quarantine were flagged by both
    # (whole-file reasons such as duplicates are the loader's, not the suite's)
    suite_reasons = {r for r in case.quarantine if not r.endswith("duplicate_in_file")
                     and r != "row:wrong_field_count"}
    if suite_reasons:
        assert flagged


def _rows(kind: str):
    names = [spec.name for spec in COLUMNS[kind]]
    plausible = {
        PROCEDURES: ["P1", "S001", "PT-1", "2024-01-05", "1", "2", "78", "F", "true", "local",
                     "osteoporosis", "", " ", "2024-02-30", "=cmd()", "s001", "-5", "1e3",
                     "+7", "0012", "1999-12-31", "2000-01-01", "2024-02-01", "2024-02-02",
                     "Kyphon Xpander II", "kyphon xpander ii", "LOT-1", "+H123", "x" * 129],
        COMPLICATIONS: ["C1", "P1", "S001", "2024-01-06", "cement_leak", "YES", "minor",
                        "L1", "T12", "T13", "S0", "death", "", " ", "Minor", "2024-13-01"],
    }[kind]
    value = st.one_of(st.sampled_from(plausible), text_value)
    return st.lists(st.lists(value, min_size=len(names), max_size=len(names)),
                    min_size=1, max_size=25), names


@pytest.mark.parametrize("kind", [PROCEDURES, COMPLICATIONS])
def test_generated_rows_get_the_same_reasons(kind):
    rows, names = _rows(kind)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(rows)
    def check(records):
        numbers = list(range(2, len(records) + 2))
        gx, fast = _both(records, numbers, names, kind)
        _assert_same(gx, fast)

    check()


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> list[Path]:
    """A small simulated registry with 5 % bad rows (both kinds, one file each)."""
    from pipelines.simulate import simulate

    folder = tmp_path_factory.mktemp("registry")
    simulate(folder, sites=6, start=date(2023, 1, 1), end=date(2023, 6, 30), seed=7,
             bad_row_rate=0.05, single_file=True)
    return sorted(p for p in folder.iterdir() if p.suffix == ".csv")


def test_simulated_registry_loads_identically(registry, tmp_path, settings_for, monkeypatch):
    assert len(registry) == 2
    gx_url = f"sqlite:///{tmp_path / 'gx.db'}"
    fast_url = f"sqlite:///{tmp_path / 'fast.db'}"
    fast_report = ingest_paths(settings_for(fast_url), registry)
    with monkeypatch.context() as patch:
        patch.setattr(load, "validate_chunk", functools.partial(validate_chunk, checker="gx"))
        gx_report = ingest_paths(settings_for(gx_url), registry)
    assert [f.status for f in fast_report.files] == ["loaded", "loaded"]
    assert sum(f.quarantined for f in fast_report.files) > 20  # bad rows were there
    assert [f.quarantine_reasons for f in fast_report.files] == [
        f.quarantine_reasons for f in gx_report.files]
    assert snapshot(fast_url) == snapshot(gx_url)


def test_a_fast_path_that_disagrees_with_gx_stops_the_load(registry, tmp_path, settings_for,
                                                           monkeypatch):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    real = FastSuite.failing_rows

    def lenient(self, frame, parameters):  # forgets one reason on one row
        failing = real(self, frame, parameters)
        if failing:
            first = next(iter(failing))
            failing[first] = failing[first][1:]
            if not failing[first]:
                del failing[first]
        return failing

    monkeypatch.setattr(FastSuite, "failing_rows", lenient)
    with pytest.raises(AuditMismatch, match="disagrees with the GX suite"):
        ingest_paths(settings_for(url), registry[1:])  # the procedures file
    assert snapshot(url)["procedure"] == []  # the file's transaction rolled back


def test_a_passed_row_gx_would_flag_stops_the_load(registry, tmp_path, settings_for,
                                                   monkeypatch):
    # A small file is audited in full, so even one wrongly passed row is caught.
    url = f"sqlite:///{tmp_path / 'w.db'}"
    monkeypatch.setattr(fastcheck, "_between", lambda values, kwargs: values == values)
    with pytest.raises(AuditMismatch):
        ingest_paths(settings_for(url), registry[1:])


def test_audit_keeps_every_flagged_row_and_a_bounded_deterministic_sample():
    frame = pd.DataFrame({"x": range(10_000)})
    failing = {i: ["x:bad"] for i in range(0, 10_000, 100)}

    def sample(chunk_rows: int) -> list[int]:
        audit = Audit("unused", PROCEDURES, sample_rows=300)
        for start in range(0, 10_000, chunk_rows):
            part = frame.iloc[start:start + chunk_rows].reset_index(drop=True)
            mine = {k - start: v for k, v in failing.items() if start <= k < start + chunk_rows}
            audit.add(part, range(start + 2, start + 2 + len(part)), mine, {"p": 1})
        assert sum(len(f) for f in audit.flagged) == len(failing)
        assert audit.rows_to_check == len(failing) + 300
        return sorted(audit.sampled["__record_number"].tolist())

    picked = sample(1_000)
    assert picked == sample(333)  # independent of the chunking
    assert not set(picked) & {k + 2 for k in failing}  # the sample is of passed rows
    assert min(picked) < 2_000 and max(picked) > 8_000  # spread over the file


def test_unknown_expectation_types_and_keywords_are_refused():
    base = {"name": "s", "expectations": [{"type": "expect_column_values_to_be_unique",
                                           "kwargs": {"column": "x"}, "meta": {"reason": "r"}}]}
    with pytest.raises(UnsupportedSuite):
        FastSuite(base)
    mostly = {"name": "s", "expectations": [{"type": "expect_column_values_to_not_be_null",
                                             "kwargs": {"column": "x", "mostly": 0.9},
                                             "meta": {"reason": "r"}}]}
    with pytest.raises(UnsupportedSuite):
        FastSuite(mostly)


def test_loading_the_ingest_modules_does_not_import_gx():
    code = ("import sys; import pipelines.ingest.load, pipelines.ingest.validate; "
            "print('great_expectations' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_flagged_rows_are_audited_in_bounded_batches(monkeypatch):
    calls = []

    def fake_gx(expectations_dir, kind, frame, parameters):  # agrees: every row is bad
        calls.append(len(frame))
        return {position: ["x:bad"] for position in range(len(frame))
                if frame["x"].iloc[position] % 2 == 0}

    monkeypatch.setattr(fastcheck, "AUDIT_FLUSH_ROWS", 50)
    monkeypatch.setattr("pipelines.ingest.gxaudit.failing_rows", fake_gx)
    audit = Audit("unused", PROCEDURES, sample_rows=0)
    for start in range(0, 1_000, 100):
        part = pd.DataFrame({"x": range(start, start + 100)})
        audit.add(part, range(start, start + 100),
                  {i: ["x:bad"] for i in range(0, 100, 2)}, {})
    summary = audit.verify()
    assert summary["flagged"] == 500 and sum(calls) == 500
    assert max(calls) <= 50 + 100  # a batch is checked once it reaches the flush size


def _text_frame_by_rows(records, columns, kind):
    """The text frame as it was built before: rows transposed in Python, stripped by pandas."""
    import pyarrow as pa

    by_name = dict(zip(columns, zip(*records, strict=True), strict=True)) if records else {}
    frame = pd.DataFrame({
        spec.name: pd.Series(pa.array(by_name.get(spec.name, ("",) * len(records)),
                                      type=pa.large_string()), dtype="str")
        for spec in COLUMNS[kind]
    })
    return frame.apply(lambda column: column.str.strip())


@pytest.mark.parametrize("kind", [PROCEDURES, COMPLICATIONS])
def test_the_text_frame_is_the_one_built_row_by_row(kind):
    from pipelines.ingest.validate import _text_frame

    names = [spec.name for spec in COLUMNS[kind]]
    optional = [spec.name for spec in COLUMNS[kind] if not spec.required]

    @settings(max_examples=FUZZ_EXAMPLES * 2, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def check(data):
        # a file may lack optional columns and order its columns as it likes
        dropped = data.draw(st.sets(st.sampled_from(optional)))
        columns = data.draw(st.permutations([n for n in names if n not in dropped]))
        value = st.one_of(st.sampled_from(["", " ", " P1 ", "\u00a0S001\u2003", "\t2024-01-05\n",
                                           "x" * 300]), text_value)
        records = data.draw(st.lists(st.lists(value, min_size=len(columns),
                                              max_size=len(columns)), max_size=30))
        new = _text_frame(records, columns, kind)
        old = _text_frame_by_rows(records, columns, kind)
        pd.testing.assert_frame_equal(new, old, check_exact=True)
        assert list(new.columns) == names and (new.dtypes == old.dtypes).all()
        for name in names:  # the same Arrow type under the same pandas dtype
            assert new[name].array._pa_array.type == old[name].array._pa_array.type

    check()
    with pytest.raises(ValueError, match="fields"):
        _text_frame([["a"] * len(names), ["a"] * (len(names) - 1)], names, kind)


def test_integer_values_are_those_pandas_parses():
    import numpy as np
    import pyarrow as pa

    from pipelines.ingest.validate import _INT_TEXT, _int_values

    value = st.one_of(st.sampled_from(["", "0", "+0", "+7", "0012", "123456789", "1234567890",
                                       "-5", "+", "++1", "1e3", "1.0", "\u0663", "12 "]),
                      st.from_regex(r"\A\+?[0-9]{1,10}\Z"), text_value)

    @settings(max_examples=FUZZ_EXAMPLES * 3, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(st.lists(value, max_size=20), min_size=1, max_size=3))
    def check(pieces):
        # an Arrow-backed column, in one chunk or several, as the text frame holds it
        chunked = pa.chunked_array([pa.array(p, type=pa.large_string()) for p in pieces],
                                   type=pa.large_string())
        text = pd.Series(pd.arrays.ArrowStringArray(chunked), dtype="str").str.strip()
        well_formed = text.str.match(_INT_TEXT)
        expected = pd.to_numeric(text.where(well_formed), errors="coerce").astype("float64")
        actual = _int_values(text, well_formed)
        assert actual.dtype == np.float64
        np.testing.assert_array_equal(actual, expected.to_numpy())

    check()
