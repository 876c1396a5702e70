"""Property-based: no valid row is lost and no invalid row is loaded.

Hypothesis builds files mixing valid rows with rows broken in one known way; the
ground truth comes from construction, not from the validator.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines import schema
from pipelines.ingest import ingest_paths
from pipelines.settings import load_settings
from tests.ingest_helpers import PROC_HEADER, csv_text, proc_row, write

# One way to break a row each: (field, bad value).
BREAKS = [
    ("procedure_date", "2024-02-31"), ("procedure_date", "yesterday"), ("age_years", "17"),
    ("age_years", "111"), ("levels_treated", "11"), ("balloons", "0"), ("sex", "female"),
    ("indication", "fall"), ("anaesthesia", "spinal"), ("steroid_use", "y"),
    ("site_id", "S-1"), ("patient_ref", ""), ("patient_ref", "=cmd|' /C calc'!A0"),
    ("mdt_discussed", ""),
]

valid_fields = st.fixed_dictionaries({
    "patient": st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789-_ ", min_size=1, max_size=20)
    .filter(lambda s: s.strip() and not s.strip().startswith("-")),
    "date": st.dates(min_value=__import__("datetime").date(2000, 1, 1),
                     max_value=__import__("datetime").date(2024, 1, 31)).map(str),
    "age": st.integers(18, 110).map(str),
    "levels": st.integers(1, 10).map(str),
    "balloons": st.sampled_from(["1", "2"]),
    "sex": st.sampled_from(["F", "M", "U"]),
    "steroid": st.sampled_from(["true", "FALSE", "Yes", "no", "1", "0"]),
    "site": st.from_regex(r"\A[A-Z0-9]{3,8}\Z"),
})

row_spec = st.tuples(valid_fields, st.one_of(st.none(), st.sampled_from(BREAKS)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(row_spec, min_size=1, max_size=40))
def test_valid_rows_load_and_invalid_rows_are_quarantined(specs):
    rows, valid_ids, invalid_ids = [], set(), set()
    for number, (fields, brk) in enumerate(specs):
        pid = f"P{number}"
        row = proc_row(pid, site=fields["site"], patient=fields["patient"], date=fields["date"],
                       age_years=fields["age"], levels_treated=fields["levels"],
                       balloons=fields["balloons"], sex=fields["sex"],
                       steroid_use=fields["steroid"])
        if brk:
            row[brk[0]] = brk[1]
            invalid_ids.add(pid)
        else:
            valid_ids.add(pid)
        rows.append(row)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'w.db'}"
        path = write(Path(tmp) / "procedures_20240201.csv", csv_text(PROC_HEADER, rows))
        s = load_settings({"KYPHOWATCH_DEMO": "1"}, db_url=url, max_bad_row_share=1.0)
        [result] = ingest_paths(s, [path]).files
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            loaded = set(conn.scalars(sa.select(schema.procedure.c.procedure_id)))
            quarantined = set(conn.scalars(sa.select(schema.quarantine.c.record_id)))
        engine.dispose()
    assert result.status == "loaded"
    assert loaded == valid_ids
    assert quarantined == invalid_ids
