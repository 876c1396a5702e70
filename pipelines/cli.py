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
    "alerts": "pipelines.alerts.cli",
    "report": "pipelines.report",
    "regulator": "pipelines.alerts.regulator",
    "beyond-report": "pipelines.report.beyond",
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser.

    Args:
        command: register only the module that provides this sub-command; None (or a
            name that is not a command, so that argparse can report it) registers all.
    """
    parser = argparse.ArgumentParser(
        prog="kyphowatch",
        description="Adverse-event surveillance for balloon kyphoplasty registries.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
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


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_in(argv))
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
