"""The ``kyphowatch`` console command.

Each sub-command lives beside the code it drives and registers itself through a
``register(subparsers)`` function; this module only assembles them and turns
errors into one-line messages with meaningful exit codes (see :mod:`pipelines.errors`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from datetime import date

from pipelines.errors import InputRejected, KyphowatchError

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = (
    "pipelines.simulate",
    "pipelines.ingest.cli",
    "pipelines.ingest.keys",
    "pipelines.roles",
    "pipelines.surveillance.cli",
    "pipelines.alerts.cli",
    "pipelines.report",
    "pipelines.alerts.regulator",
    "pipelines.report.beyond",
)

log = logging.getLogger("kyphowatch")


def parse_as_of(text: str | None) -> date | None:
    """Parse an ``--as-of`` value (YYYY-MM-DD) or raise InputRejected; None when not given."""
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InputRejected(f"--as-of {text!r} is not a date (expected YYYY-MM-DD)") from None


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every available sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="kyphowatch",
        description="Adverse-event surveillance for balloon kyphoplasty registries.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            # One broken part must not take every other command down with it;
            # tests/test_cli.py asserts that every command registers.
            print(f"kyphowatch: warning: {module_name} unavailable: {exc}", file=sys.stderr)
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
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
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (``kyphowatch site S012 | head -1``): stop quietly. Point
        # stdout at /dev/null so the interpreter's final flush does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KyphowatchError as exc:
        print(f"kyphowatch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kyphowatch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user mistake: keep the traceback in the log
        log.exception("internal error")
        print(f"kyphowatch: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
