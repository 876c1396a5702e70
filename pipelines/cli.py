"""The ``kyphowatch`` console command.

Each sub-command lives beside the code it drives and registers itself through a
``register(subparsers)`` function; this module only assembles them and turns
errors into one-line messages with meaningful exit codes (see :mod:`pipelines.errors`).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import logging
import os
import signal
import sys
import threading
from datetime import date
from typing import Any

from pipelines.errors import ExternalSystemError, InputRejected, KyphowatchError

# Each sub-command and the module that registers it, in the order they appear in --help.
# A command line imports only its command's module: importing them all costs seconds
# (scipy, pandas, GX), which a one-site drill-down must not pay. tests/test_cli.py checks
# that this map and what the modules register agree.
COMMANDS = {
    "simulate": "pipelines.simulate",
    "ingest": "pipelines.ingest.cli",
    "keys": "pipelines.ingest.keys",
    "roles": "pipelines.roles",
    "monitor": "pipelines.surveillance.cli",
    "sites": "pipelines.surveillance.cli",
    "site": "pipelines.surveillance.cli",
    "runs": "pipelines.surveillance.retention",
    "alerts": "pipelines.alerts.cli",
    "report": "pipelines.report",
    "regulator": "pipelines.alerts.regulator",
    "beyond-report": "pipelines.report.beyond",
}

# The one-line help of each command, as its module registers it. The top-level help
# (``kyphowatch --help``, no command, a mistyped one) lists only these lines; registering
# every module to print them imported pandas, SQLAlchemy and SciPy (1.5 s, 150 MB).
# tests/test_startup.py checks that this listing and the modules' own are byte for byte
# the same.
SUMMARIES = {
    "simulate": "write synthetic registry extracts (reproducible from a seed)",
    "ingest": "validate and load extract files or directories",
    "keys": "pseudonym key fingerprint status and rotation",
    "roles": "PostgreSQL roles (owner, loader, analyst) and migration as the owner",
    "monitor": "run the surveillance monitor and list active signals",
    "sites": "list every site with its status per metric",
    "site": "drill down into one site's metrics and signals",
    "runs": "stored monitor runs: prune old ones",
    "alerts": "list, acknowledge and deliver alerts",
    "report": "write the HTML evidence report",
    "regulator": "Yellow Card drafts for device-related events",
    "beyond-report": "pages for products, cement lots and (confidential) operators",
}

log = logging.getLogger("kyphowatch")


def parse_as_of(text: str | None) -> date | None:
    """Parse an ``--as-of`` value (YYYY-MM-DD) or raise InputRejected; None when not given."""
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InputRejected(f"--as-of {text!r} is not a date (expected YYYY-MM-DD)") from None


def _top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """Return the top-level parser without sub-commands, and its sub-command action."""
    parser = argparse.ArgumentParser(
        prog="kyphowatch",
        description="Adverse-event surveillance for balloon kyphoplasty registries.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser, parser.add_subparsers(dest="command", metavar="COMMAND")


def overview_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every command listed but none registered.

    Enough to print the top-level help or refuse an unknown command, the only things a
    command line without a known command can do; nothing beyond argparse is imported.
    """
    parser, subparsers = _top_parser()
    for command, summary in SUMMARIES.items():
        subparsers.add_parser(command, help=summary)
    return parser


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser.

    Args:
        command: register only the module that provides this sub-command; None (or a
            name that is not a command, so that argparse can report it) registers all.
    """
    parser, subparsers = _top_parser()
    if command in COMMANDS:
        module_names = [COMMANDS[command]]
    else:
        module_names = list(dict.fromkeys(COMMANDS.values()))
    for module_name in module_names:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            # One broken part must not take every other command down with it;
            # tests/test_cli.py asserts that every command registers.
            print(f"kyphowatch: warning: {module_name} unavailable: {exc}", file=sys.stderr)
            continue
        module.register(subparsers)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """Return the sub-command named in ``argv`` (the first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command was, so it unwinds as an interrupt does."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    command = _command_in(argv)
    parser = build_parser(command) if command in COMMANDS else overview_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Libraries we call are chatty at INFO; their warnings still show.
    for noisy in ("great_expectations", "alembic", "airflow", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    real_stdout = sys.stdout
    sys.stdout = _ReaderMayLeave(real_stdout)
    # SIGTERM (a scheduler's or systemd's stop) ends a command as Ctrl-C does: the running
    # transaction rolls back and the command says what it finished (ingest names its files),
    # instead of the process vanishing without a word.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_term = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    if in_main_thread:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()
        _skip_final_collection()
        return code
    except BrokenPipeError:
        # A write that bypassed the wrapper (to the descriptor's binary buffer) met the
        # closed pipe and stopped the command midway, as the reader wanted: stop quietly.
        _silence_stdout(real_stdout)
        return 0
    except KyphowatchError as exc:
        print(f"kyphowatch: error: {exc}", file=sys.stderr)
        _skip_final_collection()
        return exc.exit_code
    except Terminated:
        print("kyphowatch: terminated (SIGTERM); the step it was in was rolled back, what "
              "it finished before stays; rerun the same command", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("kyphowatch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if _warehouse_failed(exc):
            # The server went away or ran out of something mid-command: an operational
            # condition, not a bug. Its unfinished transaction was not committed, and every
            # command is safe to rerun (upserts, keyed runs); the traceback is kept at -v.
            log.debug("warehouse failure", exc_info=True)
            first_line = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]
            print(f"kyphowatch: error: the warehouse failed during {args.command!r} "
                  f"({type(getattr(exc, 'orig', None) or exc).__name__}: {first_line}); its "
                  "unfinished transaction was not committed; rerun the command once the "
                  "warehouse is back", file=sys.stderr)
            return ExternalSystemError.exit_code
        # a bug, not a user mistake: keep the traceback in the log
        log.exception("internal error")
        print(f"kyphowatch: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        sys.stdout = real_stdout
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_term)


class _ReaderMayLeave:
    """Standard output that outlives its reader (``kyphowatch ingest --json F | head -1``).

    The first write or flush that meets a closed pipe points the descriptor at /dev/null,
    and the command goes on to its end, so its exit code is the command's own (2 for a
    rejected file), not lost to the reader's early exit; nothing is printed about it.
    Everything else is the wrapped stream's.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        """Write ``text``; after the reader has gone, discard it."""
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            _silence_stdout(self._stream)
            return len(text)

    def flush(self) -> None:
        """Flush; after the reader has gone, discard what was buffered."""
        try:
            self._stream.flush()
        except BrokenPipeError:
            _silence_stdout(self._stream)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _silence_stdout(stream: Any) -> None:
    """Point ``stream``'s descriptor at /dev/null (its reader has gone) and drop its buffer.

    Writing what the buffer still holds to /dev/null also keeps the interpreter's final
    flush from reporting the broken pipe again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)
    try:
        stream.flush()
    except (BrokenPipeError, ValueError):
        pass


def _warehouse_failed(exc: BaseException) -> bool:
    """Return whether ``exc`` is the warehouse's operational failure (lost connection,
    server shut down, disk full, database locked), as SQLAlchemy or the driver raised it.

    The driver's own exception arrives unwrapped from the bulk COPY paths, which write
    through psycopg directly. Errors of the statement itself (integrity, programming) stay
    internal errors: they are bugs. The modules are looked up, not imported: a command
    that never opened the warehouse has not imported them.
    """
    sqlalchemy, psycopg = sys.modules.get("sqlalchemy"), sys.modules.get("psycopg")
    return bool(
        (sqlalchemy is not None and isinstance(exc, sqlalchemy.exc.OperationalError))
        or (psycopg is not None and isinstance(exc, psycopg.OperationalError))
    )


def _skip_final_collection() -> None:
    """Keep the interpreter's garbage collections at exit from walking the whole heap.

    After a command the heap holds every module imported (pandas, SQLAlchemy, SciPy, GX)
    and what the command kept; the collections during interpreter shutdown walk all of it
    and free next to nothing: 0.2-0.45 s of every nightly process (ingest, monitor,
    report; measured). ``gc.freeze()`` in an exit hook moves those objects out of their
    reach. Exit hooks run last registered first, so the hooks registered before this one
    (logging's flush and close, the GX audit helper's stop, temporary directories) still
    run after it, and objects they create are collected as usual. Called once the command
    has returned and stdout is flushed; the warehouse engines are disposed by then, so no
    connection waits on a finaliser; an internal error (traceback) keeps the normal exit.
    """
    global _collection_skipped
    if not _collection_skipped:  # main() may run many times in one process (tests)
        _collection_skipped = True
        atexit.register(gc.freeze)


_collection_skipped = False

if __name__ == "__main__":
    sys.exit(main())
