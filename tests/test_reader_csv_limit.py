"""Reading an extract gives the csv module's process-wide field limit back afterwards."""

from __future__ import annotations

import csv
from dataclasses import replace

from pipelines.ingest.reader import ReadLimits, iter_chunks, open_extract
from tests.ingest_helpers import PROC_HEADER, csv_text, proc_row, write


def test_the_field_limit_is_the_callers_again_after_a_file(tmp_path):
    path = write(tmp_path / "procedures_20240131.csv", csv_text(PROC_HEADER, [proc_row()]))
    limits = replace(ReadLimits.defaults(), max_line_chars=300)
    before = csv.field_size_limit()
    extract = open_extract(path, limits=limits)
    try:
        assert csv.field_size_limit() == before  # the header read gave it back
        assert [len(chunk.record_numbers) for chunk in iter_chunks(extract, 10)] == [1]
    finally:
        extract.close()
    assert csv.field_size_limit() == before != 300
