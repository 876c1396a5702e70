"""An interrupted ingest says what was committed and what a rerun will load (user audit)."""

from __future__ import annotations

import logging

import pytest

import pipelines.ingest as ingest
from pipelines.ingest import ingest_paths
from tests.ingest_helpers import PROC_HEADER, csv_text, proc_row, write


def test_an_interrupt_names_the_finished_files_and_a_rerun_loads_the_rest(
    tmp_path, sqlite_url, settings_for, monkeypatch, caplog
):
    settings = settings_for(sqlite_url)
    paths = [
        write(
            tmp_path / f"procedures_202401{day}.csv",
            csv_text(PROC_HEADER, [proc_row(f"P{day}", patient=f"PT-{day}")]),
        )
        for day in (29, 30, 31)
    ]
    real = ingest._load_or_explain
    calls = []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest, "_load_or_explain", interrupted_on_the_second)
    with (
        caplog.at_level(logging.WARNING, logger="pipelines.ingest"),
        pytest.raises(KeyboardInterrupt),
    ):
        ingest_paths(settings, paths)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "interrupted while loading procedures_20240130.csv" in said
    assert "1 file(s) were finished before it: procedures_20240129.csv; 1 not started" in said
    monkeypatch.setattr(ingest, "_load_or_explain", real)
    statuses = [f.status for f in ingest_paths(settings, paths).files]
    assert statuses == ["duplicate", "loaded", "loaded"]
