"""The quarantine views count bad records, not copies of them (user audit, 2026-12-07)."""

from __future__ import annotations

import sqlalchemy as sa

from pipelines.db import make_engine
from pipelines.ingest import ingest_paths
from tests.ingest_helpers import PROC_HEADER, csv_text, proc_row, write


def _view(db_url: str, name: str) -> list[dict]:
    engine = make_engine(db_url)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.text(f"SELECT * FROM {name}")).mappings()]
    engine.dispose()
    return rows


def test_a_re_sent_extract_in_other_bytes_is_not_counted_twice(tmp_path, db_url, settings_for):
    settings = settings_for(db_url)
    rows = [proc_row(f"P{i}", patient=f"PT-{i}") for i in range(10)]
    rows += [proc_row("PX", age_years="999"), proc_row("PY", sex="Q")]
    text = csv_text(PROC_HEADER, rows)
    ingest_paths(settings, [write(tmp_path / "a" / "procedures_20240131.csv", text)])
    before = _view(db_url, "v_quarantine_by_site")
    assert [(r["kind"], r["rows_quarantined"], r["files"]) for r in before] == [
        ("procedures", 2, 1)
    ]
    # The same extract again, with Windows line ends and a byte-order mark, then gzipped:
    # new bytes, so new files in the ledger, and the same two bad records.
    crlf = "\ufeff" + text.replace("\n", "\r\n")
    ingest_paths(settings, [write(tmp_path / "b" / "procedures_20240131.csv", crlf)])
    ingest_paths(settings, [write(tmp_path / "c" / "procedures_20240131.csv.gz", text, gz=True)])
    after = _view(db_url, "v_quarantine_by_site")
    assert [(r["kind"], r["rows_quarantined"], r["files"]) for r in after] == [("procedures", 2, 3)]
    summary = _view(db_url, "v_quarantine_summary")
    assert sum(r["rows_quarantined"] for r in summary) == 2
    # A different bad record in a later file counts.
    later = csv_text(PROC_HEADER, [*rows[:10], proc_row("PZ", age_years="998")])
    ingest_paths(settings, [write(tmp_path / "d" / "procedures_20240229.csv", later)])
    assert [r["rows_quarantined"] for r in _view(db_url, "v_quarantine_by_site")] == [3]
