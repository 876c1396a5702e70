"""The GX audit helper process: same answers as GX in-process, never shared across a fork,
and an in-process fallback when it is gone (the audit is never skipped)."""

from __future__ import annotations

import os
from datetime import date

import pytest

from pipelines.contract import PROCEDURES
from pipelines.ingest import gxaudit, validate
from pipelines.settings import load_settings
from tests.ingest_helpers import PROC_HEADER, proc_row

EXPECTATIONS = str(load_settings({}).expectations_dir)


def _frame_and_parameters():
    """A checked frame as validate_chunk builds it, with bad rows, and its parameters."""
    rows = [proc_row("G1"), proc_row("B 2", age_years="7"), proc_row("B3", date="2024-02-30"),
            proc_row("B4", site="", sex="X")]
    records = [[row.get(name, "") for name in PROC_HEADER] for row in rows]
    captured = {}
    real = validate.gx_runner

    class Capture:
        def failing_rows(self, frame, parameters):
            captured["frame"], captured["parameters"] = frame.copy(), parameters
            return real(EXPECTATIONS, PROCEDURES).failing_rows(frame, parameters)

    validate.gx_runner = lambda *_: Capture()
    try:
        validate.validate_chunk(records, [2, 3, 4, 5], PROC_HEADER, PROCEDURES,
                                load_settings({}).expectations_dir, date(2024, 2, 1),
                                checker="gx")
    finally:
        validate.gx_runner = real
    return captured["frame"], captured["parameters"]


@pytest.fixture
def helper():
    gxaudit.prestart(EXPECTATIONS, PROCEDURES)
    yield gxaudit._helper
    gxaudit._stop()


def test_helper_gives_gx_answers(helper):
    frame, parameters = _frame_and_parameters()
    here = validate.gx_runner(EXPECTATIONS, PROCEDURES).failing_rows(frame, parameters)
    there = gxaudit.failing_rows(EXPECTATIONS, PROCEDURES, frame, parameters)
    assert gxaudit._helper is helper and helper.poll() is None  # answered by the helper
    assert there == here and set(there) == {1, 2, 3}


def test_a_forked_child_starts_its_own_helper(helper):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the inherited helper must not be used
        os.close(read)
        os.write(write, b"none" if gxaudit._own_helper() is None else b"shared")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 16)
    os.waitpid(pid, 0)
    assert answer == b"none"
    assert gxaudit._own_helper() is helper  # the parent keeps its own


def test_a_dead_helper_falls_back_to_gx_in_process(helper):
    frame, parameters = _frame_and_parameters()
    helper.kill()
    helper.wait()
    answer = gxaudit.failing_rows(EXPECTATIONS, PROCEDURES, frame, parameters)
    assert set(answer) == {1, 2, 3}
