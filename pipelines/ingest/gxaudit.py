"""The GX audit in a helper process, so the GX import overlaps the load.

Importing Great Expectations and building its context costs 2-4 s of CPU per process
(3.5 s measured on this 2-core machine, 2.1 s with the SciPy and Altair imports deferred,
see validate.DEFERRED_GX_IMPORTS), more than validating and loading a whole small file.
The audit only needs GX just before a file commits, so :func:`prestart` launches a helper
process as soon as a run knows it has extract files (``ingest_paths``, before it opens the
warehouse; ``load_file`` too, for direct callers): it imports GX on another core while
this process imports the loader, reads, validates, stages and merges the file. Then the
audit's rows (flagged plus a sample, a few thousand at most) go to the helper, which runs
the declared suite on them and returns GX's reasons per row; the file commits only if they
agree. A helper that was never asked (every file a duplicate) is killed at exit, not
waited for.

The helper is forked from this process when it has a single thread (forking a process
with threads could copy a lock another thread holds): it then starts with what this
process has already imported (the interpreter, SQLAlchemy and this package: 0.3-0.5 s
that a new interpreter pays first) instead of starting Python anew. With threads (an
Airflow task runner, say) it is this module run as ``python -m pipelines.ingest.gxaudit``.
Either way requests and answers are pickles over a pair of pipes between two processes of
this package (nothing else writes to them); the helper's stdout is moved to stderr so a
library's print cannot corrupt the channel. A forked helper never runs this process's
clean-up: it ignores the objects it inherited in garbage collection (so a database
connection it inherited is never closed from there), drops the parent's log handlers and
leaves with ``os._exit``. If the
helper cannot be started or dies, the audit runs in this process instead (slower, same
verdict): the audit is never skipped.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

_lock = threading.Lock()
_helper: subprocess.Popen | None = None
_owner = 0  # pid of the process that started the helper (a forked child must not share it)
_asked = False  # whether the helper was sent a request (an unused one is killed at exit)


def _own_helper() -> subprocess.Popen | None:
    """Return this process's running helper; forget one inherited across a fork."""
    global _helper
    if _helper is not None and _owner != os.getpid():
        _helper = None  # the parent's pipes: leave them (and the helper) to the parent
    if _helper is not None and _helper.poll() is not None:
        _helper = None
    return _helper


def forks() -> bool:
    """Whether :func:`prestart` would fork the helper (this process has a single thread).

    A forked helper inherits every module imported before it: a caller that imports the
    loader anyway (pandas, which GX needs too) does so first, and the helper imports only
    GX. A helper started as a new interpreter should start first instead.
    """
    return threading.active_count() == 1 and hasattr(os, "fork")


def prestart(expectations_dir: str, *kinds: str) -> None:
    """Start the helper (once per process); it imports GX and builds the suites of ``kinds``.

    Failing to start is logged; the audit then runs in-process.
    """
    global _helper, _owner, _asked
    with _lock:
        if _own_helper() is not None:
            return
        try:
            if forks():
                _helper = _fork(expectations_dir, kinds)
            else:
                env = dict(os.environ)
                # Not configuration: GX reads this switch at import (see validate.SuiteRunner).
                env.setdefault("GX_ANALYTICS_ENABLED", "False")
                _helper = subprocess.Popen(
                    [sys.executable, "-m", "pipelines.ingest.gxaudit", expectations_dir, *kinds],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                )
            _owner, _asked = os.getpid(), False
        except OSError as exc:
            log.warning("GX audit helper not started (%s); auditing in-process", exc)
            _helper = None


class _ForkedHelper:
    """A forked helper behind the part of :class:`subprocess.Popen` this module uses."""

    def __init__(self, pid: int, stdin, stdout, args: list[str]):
        self.pid, self.stdin, self.stdout, self.args = pid, stdin, stdout, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: it is gone, how is unknown
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.01)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# How a helper ends when its parent went away mid-answer: its pipe closed.
_PARENT_GONE = (BrokenPipeError, KeyboardInterrupt)


def _fork(expectations_dir: str, kinds: tuple[str, ...]) -> _ForkedHelper:
    """Fork the helper (the caller checked that this process has a single thread)."""
    request_read, request_write = os.pipe()
    answer_read, answer_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the helper: never returns
        code = 1
        try:
            # What this process inherited is the parent's: never finalise it here (an
            # inherited database connection would tell the server goodbye for the parent).
            gc.freeze()
            os.close(request_write)  # else the helper would never see its requests end
            os.close(answer_read)
            # A Ctrl-C reaches the terminal's whole process group: the parent handles it
            # (its files roll back, it says what was loaded) and ends this helper by closing
            # the requests; a traceback from here would bury the parent's message (user
            # audit). SIGTERM as a new interpreter has it (the parent may have its own).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # Not configuration: GX reads this switch at import (see validate.SuiteRunner).
            os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
            # The parent's unwritten stdout is the parent's to write; prints here go to stderr.
            sys.stdout = sys.stderr
            _fresh_logging()
            _serve(os.fdopen(request_read, "rb"), os.fdopen(answer_write, "wb"),
                   expectations_dir, kinds)
            code = 0
        except _PARENT_GONE:
            pass  # the parent stopped (interrupted, terminated): nothing to report here
        except BaseException:  # noqa: BLE001 -- reported, then the helper ends
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)  # the parent's atexit handlers and buffers are not ours
    os.close(request_read)
    os.close(answer_write)
    return _ForkedHelper(pid, os.fdopen(request_write, "wb"), os.fdopen(answer_read, "rb"),
                         ["<fork>", "pipelines.ingest.gxaudit", expectations_dir, *kinds])


def _stop() -> None:
    global _helper
    with _lock:
        if _own_helper() is not None and not _asked:
            # Never asked (every file a duplicate, or rejected unread): it may still be
            # importing GX, which nobody needs; do not make the run wait for it.
            _helper.kill()
            _helper.wait()
            _helper = None
        elif _own_helper() is not None:
            try:
                _helper.stdin.close()
                _helper.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                _helper.kill()
                _helper.wait()
            _helper = None


atexit.register(_stop)


def failing_rows(expectations_dir: str, kind: str, frame, parameters: dict) -> dict:
    """Return GX's {row position: [reasons]} for ``frame``, from the helper if running."""
    global _helper, _asked
    with _lock:
        helper = _own_helper()
        if helper is not None:
            _asked = True
            try:
                pickle.dump((expectations_dir, kind, frame, parameters), helper.stdin,
                            protocol=pickle.HIGHEST_PROTOCOL)
                helper.stdin.flush()
                status, payload = pickle.load(helper.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                log.warning("GX audit helper failed (%s); auditing in-process", exc)
                helper.kill()
                helper.wait()
                _helper = None
            except BaseException:
                # Interrupted mid-exchange (Ctrl-C, SIGTERM): the helper, which leaves
                # interrupts to us, may still answer this request; its answer would reach the
                # next one. A later audit in this process starts a fresh helper (review).
                helper.kill()
                helper.wait()
                _helper = None
                raise
            else:
                if status == "ok":
                    return payload
                raise RuntimeError(f"GX audit failed in the helper process: {payload}")
    from pipelines.ingest.validate import gx_runner

    return gx_runner(expectations_dir, kind).failing_rows(frame, parameters)


def _fresh_logging() -> None:
    """Give a forked helper the logging of a new interpreter (warnings to stderr).

    The parent's handlers are the parent's (a log file, an Airflow log channel): two
    processes writing through them could interleave records. They are dropped, not closed.
    """
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        logger.handlers = []
    logging.getLogger().setLevel(logging.WARNING)


def _serve(requests, answers, expectations_dir: str, kinds) -> None:
    """Helper body: import GX, then answer audit requests until ``requests`` ends."""
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints cannot reach a pipe
    # Imports make module state, not garbage: the collector's passes over it are wasted
    # (validate.SuiteRunner pauses it for GX's own import likewise).
    gc.disable()
    try:
        from pipelines.ingest.validate import gx_runner

        for kind in kinds:  # the point: import GX and build the suites while the parent loads
            gx_runner(expectations_dir, kind)
        # ...nor later: the first full collection, due during the first audit run (on a
        # nightly file's critical path), would walk every object GX's import made, 0.2-0.5 s
        # of that run (measured). Frozen objects are left out of every collection; all
        # there is to freeze here is module state (and what the parent had, frozen at fork).
        # No gc.collect() first: it would put that same pass back on the critical path; any
        # cycles the import left are bounded, and the helper lives for one load only.
        gc.freeze()
    finally:
        gc.enable()
    while True:
        try:
            expectations_dir, kind, frame, parameters = pickle.load(requests)
        except EOFError:
            return
        try:
            answer = ("ok", gx_runner(expectations_dir, kind).failing_rows(frame, parameters))
        except Exception as exc:  # any failure goes back to the parent, which raises it
            answer = ("error", f"{type(exc).__name__}: {exc}")
        pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's to handle (see _fork)
    try:
        _serve(sys.stdin.buffer, os.fdopen(os.dup(sys.stdout.fileno()), "wb"), sys.argv[1],
               sys.argv[2:])
    except _PARENT_GONE:
        sys.exit(1)
