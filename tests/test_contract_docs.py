"""The contract exists three times (contract.py, the GX suites, docs/contract.md): keep them in step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.contract import COLUMNS, EVENT_TYPES, extract_stamp, kind_of

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", sorted(COLUMNS))
def test_suite_covers_every_contract_column(kind):
    suite = json.loads((REPO / "expectations" / f"{kind}.json").read_text())
    checked = {e["kwargs"]["column"].split("__")[0] for e in suite["expectations"]}
    assert checked == {spec.name for spec in COLUMNS[kind]}
    required = {e["kwargs"]["column"] for e in suite["expectations"]
                if e["type"] == "expect_column_values_to_not_be_null"}
    assert required == {spec.name for spec in COLUMNS[kind] if spec.required}
    reasons = [e["meta"]["reason"] for e in suite["expectations"]]
    assert len(reasons) == len(set(reasons)), "each expectation has its own reason code"


def test_docs_name_every_column_and_event_type():
    text = (REPO / "docs" / "contract.md").read_text()
    for specs in COLUMNS.values():
        for spec in specs:
            assert f"`{spec.name}`" in text
    for event in EVENT_TYPES:
        assert f"`{event}`" in text


@pytest.mark.parametrize(("name", "kind", "stamp"), [
    ("procedures_20240131.csv", "procedures", "20240131T000000"),
    ("Procedures_S001_20240131T235959.csv.gz", "procedures", "20240131T235959"),
    ("complications.csv", "complications", "00000000T000000"),
    ("complications_x.csv.zip", None, None),
    ("notes.csv", None, None),
    ("procedures.csv\n", None, None),  # `$` alone would match before the newline
])
def test_kind_and_stamp_from_file_name(name, kind, stamp):
    assert kind_of(name) == kind
    if stamp:
        assert extract_stamp(name) == stamp
