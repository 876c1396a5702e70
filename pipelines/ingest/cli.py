"""``kyphowatch ingest``: validate and load extract files from the command line."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipelines.settings import load_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ingest`` sub-command."""
    parser = subparsers.add_parser(
        "ingest",
        help="validate and load extract files or directories",
        description=(
            "Validate extract files against the contract and load them into the warehouse. "
            "Exit 0 when every file was processed (quarantined rows included), 2 when a "
            "file was rejected."
        ),
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    parser.add_argument("--db", help="warehouse URL (default: KYPHOWATCH_DB_URL or SQLite)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=run)


def _format(report) -> str:
    lines = [
        f"{'file':<36} {'status':<9} {'read':>8} {'new':>8} {'updated':>7} {'same':>7} "
        f"{'quarant.':>8} {'pending':>7}"
    ]
    for f in report.files:
        name = f.shown_name or Path(f.path).name
        lines.append(
            f"{name[:36]:<36} {f.status:<9} {f.rows_read:>8} {f.inserted:>8} {f.updated:>7} "
            f"{f.unchanged + f.stale:>7} {f.quarantined:>8} {f.pending:>7}"
        )
        for reason, count in f.quarantine_reasons.items():
            lines.append(f"    quarantined {count:>6}  {reason}")
        if f.dropped_columns:
            lines.append(f"    dropped unknown columns: {', '.join(f.dropped_columns)}")
        if f.status == "rejected":
            lines.append(f"    REJECTED: {f.reason}")
    if report.new_sites:
        lines.append(f"NEW SITE(S), first procedures in this warehouse: "
                     f"{', '.join(report.new_sites)} (check each site id is right: a mistyped "
                     "one becomes a site of its own)")
    totals = report.to_dict()["totals"]
    lines.append(
        f"{len(report.files)} file(s): {totals.get('loaded', 0)} loaded, "
        f"{totals.get('duplicate', 0)} already loaded, {totals.get('rejected', 0)} rejected; "
        f"{totals.get('inserted', 0)} new rows, {totals.get('updated', 0)} updated, "
        f"{totals.get('quarantined', 0)} quarantined, {totals.get('pending', 0)} pending"
    )
    return "\n".join(lines)


def _refuse_missing(settings, paths: list[Path]) -> None:
    """Refuse a command line naming a path that does not exist, before anything loads.

    A typo is the user's to fix, not an extract to reject: a rejection would be recorded in
    the ledger and e-mailed to the data team as a rejected file (user audit). A file that
    vanishes after this check (a landing race) is still rejected with its reason.
    """
    from pipelines.errors import InputRejected
    from pipelines.ingest.reader import display_name

    missing = [path for path in paths if not os.path.lexists(path)]
    if missing:
        key = settings.require_pseudonym_key()
        names = ", ".join(f"{display_name(path.name, key)} (in {path.parent})" for path in missing)
        raise InputRejected(f"no such file or directory: {names}; nothing was loaded "
                            "(check the path)")


def run(args: argparse.Namespace) -> int:
    """Ingest the given paths and print the per-file summary."""
    from pipelines.ingest import ingest_paths

    settings = load_settings(db_url=args.db)
    _refuse_missing(settings, args.paths)
    report = ingest_paths(settings, args.paths)
    print(json.dumps(report.to_dict(), indent=2) if args.json else _format(report))
    return report.exit_code
