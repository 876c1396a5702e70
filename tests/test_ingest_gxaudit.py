"""The GX audit helper process: same answers as GX in-process, never shared across a fork,
and an in-process fallback when it is gone (the audit is never skipped)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipelines import ingest, schema
from pipelines.contract import COMPLICATIONS, PROCEDURES
from pipelines.errors import ExternalSystemError
from pipelines.ingest import gxaudit, load, validate
from pipelines.ingest.fastcheck import AuditMismatch, FastSuite
from pipelines.settings import load_settings
from tests.ingest_helpers import (
    COMP_HEADER,
    PROC_HEADER,
    comp_row,
    csv_text,
    proc_row,
    snapshot,
    write,
)

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


def _single_threaded() -> None:
    """Leave this test process with its main thread only, as a command-line ingest has.

    GX run in this process (``_frame_and_parameters``) leaves tqdm's monitor thread behind
    (an ingest never runs GX in-process while its helper works); stop it, so the helper is
    forked.
    """
    import threading

    from tqdm import TMonitor

    for thread in threading.enumerate():
        if isinstance(thread, TMonitor):
            thread.exit()
    assert threading.active_count() == 1, threading.enumerate()


def test_a_single_threaded_process_forks_the_helper_and_a_threaded_one_starts_python():
    import threading

    frame, parameters = _frame_and_parameters()
    _single_threaded()
    assert gxaudit.forks()
    gxaudit.prestart(EXPECTATIONS, PROCEDURES)
    forked = gxaudit._helper
    try:
        assert forked.args[0] == "<fork>" and forked.poll() is None
        assert set(gxaudit.failing_rows(EXPECTATIONS, PROCEDURES, frame, parameters)) == {1, 2, 3}
        assert gxaudit._helper is forked  # answered by the forked helper
    finally:
        gxaudit._stop()
    assert forked.returncode == 0  # saw its requests end and left cleanly
    # Forking with another thread alive could copy a lock that thread holds: new interpreter.
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert not gxaudit.forks()
        gxaudit.prestart(EXPECTATIONS, PROCEDURES)
        started = gxaudit._helper
        assert isinstance(started, subprocess.Popen)
        assert started.args[1:3] == ["-m", "pipelines.ingest.gxaudit"]
        assert set(gxaudit.failing_rows(EXPECTATIONS, PROCEDURES, frame, parameters)) == {1, 2, 3}
    finally:
        stop.set()
        other.join()
        gxaudit._stop()


def test_a_forked_helper_leaves_the_parents_database_connection_alone(pg_url):
    # The helper inherits this open connection; its exit must not close it for the server.
    frame, parameters = _frame_and_parameters()
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            backend = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            _single_threaded()
            gxaudit.prestart(EXPECTATIONS, PROCEDURES)
            helper = gxaudit._helper
            assert helper.args[0] == "<fork>"
            gxaudit.failing_rows(EXPECTATIONS, PROCEDURES, frame, parameters)
            gxaudit._stop()
            assert helper.returncode == 0
            assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() == backend
    finally:
        gxaudit._stop()
        engine.dispose()


def test_a_forked_helper_does_not_write_through_the_parents_log_handlers(tmp_path):
    import shutil

    frame, parameters = _frame_and_parameters()
    _single_threaded()
    # A suite directory this process has not built: the helper builds its GX context anew,
    # which GX logs at INFO.
    suites = str(shutil.copytree(EXPECTATIONS, tmp_path / "expectations"))
    handler = logging.FileHandler(tmp_path / "parent.log")
    handler.setFormatter(logging.Formatter("%(process)d %(name)s %(message)s"))
    root, gx_logger = logging.getLogger(), logging.getLogger("great_expectations")
    levels = root.level, gx_logger.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    gx_logger.setLevel(logging.INFO)  # GX logs its context set-up at INFO
    try:
        gxaudit.prestart(suites, PROCEDURES)
        helper = gxaudit._helper
        assert helper.args[0] == "<fork>"
        gxaudit.failing_rows(suites, PROCEDURES, frame, parameters)
        logging.getLogger("pipelines.test").info("parent still logs")
    finally:
        gxaudit._stop()
        root.removeHandler(handler)
        handler.close()
        root.setLevel(levels[0])
        gx_logger.setLevel(levels[1])
    lines = (tmp_path / "parent.log").read_text().splitlines()
    assert lines and {line.split()[0] for line in lines} == {str(os.getpid())}, lines


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


def test_an_unused_helper_is_killed_at_exit_and_a_used_one_ends_cleanly():
    gxaudit.prestart(EXPECTATIONS, PROCEDURES)
    unused = gxaudit._helper
    gxaudit._stop()  # never asked (every file a duplicate): not waited for
    assert unused.returncode == -signal.SIGKILL
    gxaudit.prestart(EXPECTATIONS, PROCEDURES)
    used = gxaudit._helper
    frame, parameters = _frame_and_parameters()
    gxaudit.failing_rows(EXPECTATIONS, PROCEDURES, frame, parameters)
    used.stdin.close()  # what _stop does first for a helper that was asked
    assert used.wait(timeout=120) == 0  # it saw the end of its requests and returned
    gxaudit._stop()


def test_ingest_starts_the_helper_for_every_kind_before_opening_the_warehouse(
        tmp_path, settings_for, monkeypatch):
    files = [write(tmp_path / "in" / "procedures_20240110.csv",
                   csv_text(PROC_HEADER, [proc_row("P1")])),
             write(tmp_path / "in" / "complications_20240110.csv",
                   csv_text(COMP_HEADER, [comp_row("C1")]))]
    seen = {}

    def unreachable(url):
        helper = gxaudit._own_helper()
        seen["args"] = None if helper is None else list(helper.args)
        raise ExternalSystemError("warehouse unreachable (test)")

    monkeypatch.setattr(ingest, "open_warehouse", unreachable)
    try:
        with pytest.raises(ExternalSystemError):
            ingest.ingest_paths(settings_for(f"sqlite:///{tmp_path / 'w.db'}"), files)
    finally:
        gxaudit._stop()
    assert seen["args"][-2:] == [PROCEDURES, COMPLICATIONS]


def test_gx_is_imported_without_scipy_stats_and_altair_until_they_are_used():
    code = """if True:
        import sys
        from tests.test_ingest_gxaudit import _frame_and_parameters
        from pipelines.ingest import validate
        frame, parameters = _frame_and_parameters()
        answer = validate.gx_runner(validate_dir, "procedures").failing_rows(frame, parameters)
        assert set(answer) == {1, 2, 3}, answer
        for name in ("scipy.stats._stats_py", "altair.vegalite"):
            assert name not in sys.modules, name  # GX ran the suite without them
        import great_expectations.expectations.core.expect_column_kl_divergence_to_be_less_than as kl
        assert type(kl.stats).__name__ == "_DeferredModule"
        entropy = kl.stats.entropy([0.5, 0.5], [0.25, 0.75])  # first use: the real module
        from scipy import stats
        assert sys.modules["scipy.stats"] is stats and stats.entropy is kl.stats.entropy
        assert abs(entropy - stats.entropy([0.5, 0.5], [0.25, 0.75])) == 0.0 < entropy
        assert kl.alt.Chart.__module__.startswith("altair.")
        print("ok")
    """.replace("validate_dir", repr(EXPECTATIONS))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def _drop_lone_reasons(real):
    """A fast path that forgets a row's reason when it is the row's only one (a bug)."""

    def lenient(self, frame, parameters):
        return {row: reasons for row, reasons in real(self, frame, parameters).items()
                if len(reasons) > 1}

    return lenient


def test_a_disagreement_found_after_the_merge_rolls_the_file_back(
        pg_url, tmp_path, settings_for, monkeypatch):
    settings = settings_for(pg_url)
    first = write(tmp_path / "a" / "procedures_20240110.csv",
                  csv_text(PROC_HEADER, [proc_row("P1"), proc_row("P2")]))
    assert ingest.ingest_paths(settings, [first]).exit_code == 0
    before = snapshot(pg_url)
    # A later correction that puts an out-of-range age on P1: the buggy fast path passes it.
    correction = write(tmp_path / "b" / "procedures_20240111.csv",
                       csv_text(PROC_HEADER, [proc_row("P1", age_years="7"), proc_row("P3")]))
    order = []
    real_merge, real_verify = load._merge_procedures, load._verify_audit

    def merge(conn, *args):
        real_merge(conn, *args)
        ages = conn.execute(sa.select(schema.procedure.c.age_years)
                            .where(schema.procedure.c.procedure_id == "P1")).scalar_one()
        order.append(("merged", ages))

    def verify(audit):
        order.append(("audit",))
        real_verify(audit)

    monkeypatch.setattr(FastSuite, "failing_rows", _drop_lone_reasons(FastSuite.failing_rows))
    monkeypatch.setattr(load, "_merge_procedures", merge)
    monkeypatch.setattr(load, "_verify_audit", verify)
    with pytest.raises(AuditMismatch, match="record 1: fast \\[\\] vs GX"):
        ingest.ingest_paths(settings, [correction])
    # The wrong age reached the current table inside the transaction, then GX disagreed
    # and nothing of the file stayed: no version, no quarantine row, no ledger row.
    assert order == [("merged", 7), ("audit",)]
    assert snapshot(pg_url) == before


def test_a_file_rejected_for_its_bad_rows_is_audited_before_the_rejection(
        pg_url, tmp_path, settings_for, monkeypatch):
    settings = settings_for(pg_url)
    rows = [proc_row("P1")] + [proc_row(f"B{n}", age_years="7", sex="X") for n in range(3)]
    rows.append(proc_row("P9", age_years="7"))  # the one the buggy fast path misses
    path = write(tmp_path / "procedures_20240110.csv", csv_text(PROC_HEADER, rows))
    monkeypatch.setattr(FastSuite, "failing_rows", _drop_lone_reasons(FastSuite.failing_rows))
    with pytest.raises(AuditMismatch):  # not a rejection built on unaudited reasons
        ingest.ingest_paths(settings, [path])
    assert all(not rows for rows in snapshot(pg_url).values())
    monkeypatch.undo()
    report = ingest.ingest_paths(settings, [path])  # the same file with a correct fast path
    assert report.files[0].status == "rejected" and "rows invalid" in report.files[0].reason


def test_the_helper_freezes_what_gx_import_made_before_its_first_audit():
    # The first full collection would otherwise walk all of GX's import (0.2-0.5 s of the
    # first audit run, on a nightly file's critical path); frozen, it is never walked.
    code = """if True:
        import gc, io, os, pickle, sys
        from datetime import date
        from tests.ingest_helpers import PROC_HEADER, proc_row
        from pipelines.ingest import gxaudit, validate
        from pipelines.settings import load_settings
        out = os.dup(sys.stdout.fileno())  # the helper sends its own stdout to stderr
        rows = [proc_row("G1"), proc_row("B 2", age_years="7"), proc_row("B3", date="2024-02-30")]
        records = [[row.get(name, "") for name in PROC_HEADER] for row in rows]
        captured = {}
        class Keep:
            def add(self, checked, numbers, failing, parameters):
                captured.update(frame=checked, parameters=parameters, fast=failing)
        directory = load_settings({}).expectations_dir
        validate.validate_chunk(records, [1, 2, 3], PROC_HEADER, "procedures", directory,
                                date(2024, 2, 1), audit=Keep())
        assert "great_expectations" not in sys.modules and gc.get_freeze_count() == 0
        request = (str(directory), "procedures", captured["frame"], captured["parameters"])
        answers = io.BytesIO()
        gxaudit._serve(io.BytesIO(pickle.dumps(request)), answers, str(directory), ["procedures"])
        status, answer = pickle.loads(answers.getvalue())
        assert status == "ok" and answer == captured["fast"] and set(answer) == {1, 2}, answer
        from great_expectations.validator.v1_validator import Validator
        assert gc.get_freeze_count() > 100_000, gc.get_freeze_count()
        assert gc.isenabled() and id(Validator) not in {id(o) for o in gc.get_objects()}
        os.write(out, b"ok")
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_an_audit_interrupted_mid_answer_leaves_no_stale_answer(helper, monkeypatch):
    """The helper leaves Ctrl-C to its parent and may still answer the interrupted request:
    that answer must not reach the next audit in the same process (review: a REPL user's
    next ingest got the previous file's answers, an AuditMismatch on every file)."""
    import pickle
    import types

    frame, parameters = _frame_and_parameters()
    clean = frame.iloc[[0]].reset_index(drop=True)
    here = validate.gx_runner(EXPECTATIONS, PROCEDURES).failing_rows(clean, parameters)
    interrupted = []

    def load_interrupted(stream):
        if not interrupted:  # the interrupt lands while the parent waits for the answer
            interrupted.append(True)
            raise KeyboardInterrupt
        return pickle.load(stream)

    monkeypatch.setattr(gxaudit, "pickle", types.SimpleNamespace(
        dump=pickle.dump, load=load_interrupted, HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL,
        UnpicklingError=pickle.UnpicklingError))
    with pytest.raises(KeyboardInterrupt):
        gxaudit.failing_rows(EXPECTATIONS, PROCEDURES, frame, parameters)  # 3 bad rows
    assert gxaudit.failing_rows(EXPECTATIONS, PROCEDURES, clean, parameters) == here == {}
