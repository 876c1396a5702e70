"""Issue 10 (branch load3): a chunk's writes reach the writer thread as one task.

The writer holds one unfinished write at a time. When a chunk handed over its writes in
several submits (quarantine rows, the first occurrences' COPY, the repeated keys' stage
rows), the second submit waited for the chunk's COPY to end, so the main thread could not
read and validate the next chunk while the server copied: the threads took turns. The 1M
benchmark file has a repeated key in every chunk, so this was every chunk of it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pipelines.ingest import ingest_paths, load
from tests.ingest_helpers import PROC_HEADER, csv_text, proc_row, snapshot, write

CHUNK = 6


def _rows() -> list[dict]:
    """Four chunks of six, each with a key repeated from earlier and an invalid row."""
    rows = [
        proc_row(f"P{n}", patient=f"PT-{n}", date=f"2024-01-{1 + n % 20:02d}") for n in range(1, 25)
    ]
    for chunk in range(4):
        rows[chunk * CHUNK + 2] = proc_row("P1" if chunk else "P2", patient=f"PT-r{chunk}")
        rows[chunk * CHUNK + 4] = proc_row(f"P{chunk * CHUNK + 5}", age_years="7")
    return rows


@pytest.mark.postgres
def test_the_next_chunk_is_validated_while_the_last_one_is_copied(
    pg_url, tmp_path: Path, settings_for, monkeypatch
):
    path = write(tmp_path / "in" / "procedures_20240131.csv", csv_text(PROC_HEADER, _rows()))
    settings = settings_for(pg_url, {"KYPHOWATCH_CHUNK_ROWS": str(CHUNK)})
    validated = threading.Condition()  # counts the chunks whose validation has started
    started = [0]
    overlapped: list[bool] = []
    real_validate, real_copy = load.validate_chunk, load._DirectLoad.copy

    def validate(*args, **kwargs):
        with validated:
            started[0] += 1
            validated.notify_all()
        return real_validate(*args, **kwargs)

    def copy(self, conn, payload):
        # The COPY of chunk n waits until the main thread starts validating chunk n + 1:
        # it can only if the main thread is not itself waiting for this COPY.
        chunk = len(overlapped) + 1
        with validated:  # the last chunk has no next one
            overlapped.append(chunk == 4 or validated.wait_for(lambda: started[0] > chunk, 3))
        real_copy(self, conn, payload)

    monkeypatch.setattr(load, "validate_chunk", validate)
    monkeypatch.setattr(load._DirectLoad, "copy", copy)
    report = ingest_paths(settings, [path])
    [result] = report.files
    assert result.status == "loaded", result.reason
    assert len(overlapped) == 4
    assert overlapped == [True] * 4, "the main thread waited for the chunk's COPY"
    assert result.quarantine_reasons["procedure_id:duplicate_in_file"] == 6  # P1 x4, P2 x2
    assert result.inserted == 24 - 4 - 6  # the invalid rows, every occurrence of P1 and P2
    stored = {row[0] for row in snapshot(pg_url)["procedure"]}
    assert not stored & {"P1", "P2"} and "P4" in stored


@pytest.mark.postgres
def test_a_chunk_is_one_task(pg_url, tmp_path: Path, settings_for, monkeypatch):
    path = write(tmp_path / "in" / "procedures_20240131.csv", csv_text(PROC_HEADER, _rows()))
    handed: list[bool] = []
    real_submit, real_if_idle = load._StageWriter.submit, load._StageWriter.submit_if_idle

    def submit(self, task):
        handed.append(True)
        real_submit(self, task)

    def submit_if_idle(self, task):
        taken = real_if_idle(self, task)
        handed.append(taken)
        return taken

    monkeypatch.setattr(load._StageWriter, "submit", submit)
    monkeypatch.setattr(load._StageWriter, "submit_if_idle", submit_if_idle)
    settings = settings_for(pg_url, {"KYPHOWATCH_CHUNK_ROWS": str(CHUNK)})
    [result] = ingest_paths(settings, [path]).files
    assert result.status == "loaded", result.reason
    assert handed.count(True) == 4  # one task per chunk, however it was handed over


@pytest.mark.postgres
@pytest.mark.parametrize("slow", ["validation", "copy"])
def test_the_free_thread_renders_the_copy(pg_url, tmp_path: Path, settings_for, monkeypatch, slow):
    """A slow main thread leaves the rendering to the idle writer; a busy writer, to it."""
    path = write(tmp_path / "in" / "procedures_20240131.csv", csv_text(PROC_HEADER, _rows()))
    rendered_by: list[str] = []
    real_payload, real_validate, real_copy = (
        load._DirectLoad.payload,
        load.validate_chunk,
        load._DirectLoad.copy,
    )

    def payload(self, frame):
        rendered_by.append(threading.current_thread().name)
        return real_payload(self, frame)

    def validate(*args, **kwargs):
        if slow == "validation":
            time.sleep(0.5)
        return real_validate(*args, **kwargs)

    def copy(self, conn, rendered):
        if slow == "copy":
            time.sleep(1)
        real_copy(self, conn, rendered)

    monkeypatch.setattr(load._DirectLoad, "payload", payload)
    monkeypatch.setattr(load, "validate_chunk", validate)
    monkeypatch.setattr(load._DirectLoad, "copy", copy)
    settings = settings_for(pg_url, {"KYPHOWATCH_CHUNK_ROWS": str(CHUNK)})
    [result] = ingest_paths(settings, [path]).files
    assert result.status == "loaded", result.reason
    assert len(rendered_by) == 4
    if slow == "validation":  # the writer had finished each COPY long before
        assert set(rendered_by) == {"kyphowatch-stage-writer"}
    else:  # the first chunk finds the writer idle; later ones find it copying
        assert rendered_by[0] == "kyphowatch-stage-writer"
        assert set(rendered_by[1:]) == {"MainThread"}
    assert result.inserted == 24 - 4 - 6
