"""``kyphowatch runs``: how many stored monitor runs the warehouse holds, and pruning old ones.

Why: every monitor run stores its parts (``monitor_run_part``: the core, the facts, each
site's chart series and figures; :mod:`pipelines.surveillance.runs`), and nothing removed
them. A nightly run of a 1,000-site network stores about 10 MB, so a year of nights is
about 4 GB that no reader needs: readers want the newest run, and a past ``--as-of`` with
no stored run is computed and stored again on demand (``runs.read_or_compute``).

``prune_runs`` deletes the parts of the runs whose ``as_of`` is more than ``keep_days``
before the newest stored run's (the warehouse's own clock, not the wall clock: a rerun on
the same data prunes the same runs). It never touches:

* the newest run of each profile version;
* a run that a table of the current picture still names (``chart_status``,
  ``site_month_metric``, ``level_episode``, the operator and device tables): those rows
  and their run's parts belong together;
* the ``monitor_run`` row of any run (its key, date, data fingerprint, summary and models:
  a few kilobytes), so a signal's first and last run, an alert's run and an audit can still
  be looked up. Only the parts go; with no ``core`` part the run counts as not stored, and
  asking for its date again computes and stores it anew, from the data as it is then; that
  past run leaves the signal table and the current picture as the newest run left them
  (``engine._persist_once``).

The ``kyphowatch_monitor`` DAG prunes after each run for the newest data
(:func:`prune_by_settings`, task ``prune_runs``), keeping ``KYPHOWATCH_RUN_KEEP_DAYS``
(default 90, as many days as ``KYPHOWATCH_REPORT_KEEP`` keeps dated reports; 0 never
prunes). A backfill for a past date prunes nothing: it would measure the window from the
newest run and could delete the very run it just stored.

PostgreSQL keeps the freed space for the table's own reuse after (auto)vacuum; SQLite keeps
it in the file's free pages. Neither file shrinks without ``VACUUM FULL`` / ``VACUUM``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from datetime import date, timedelta

import sqlalchemy as sa

from pipelines.schema import (
    chart_status,
    device_lot_test,
    device_product_chart,
    level_episode,
    monitor_run,
    monitor_run_part,
    operator_chart,
    site_month_metric,
)
from pipelines.settings import Settings
from pipelines.surveillance.runs import LOOK_AHEAD_MAX_GRACE, newest_procedure_date

log = logging.getLogger(__name__)

# The tables of the current picture: each row names the run it came from.
_CURRENT_PICTURE = (chart_status, site_month_metric, level_episode, operator_chart,
                    device_product_chart, device_lot_test)
_BATCH = 500  # run keys per DELETE: bound parameters stay well under every driver's limit


@dataclass
class RunCounts:
    """What the warehouse holds, or what a prune removed or would remove."""

    runs_with_parts: int  # runs whose parts are stored (before the prune)
    runs_pruned: int  # of those, the runs whose parts are (or would be) deleted
    bytes_pruned: int  # the payload bytes of those parts
    oldest_kept: date | None  # the oldest as_of still stored after the prune
    cutoff: date | None  # runs before this date are pruned (None: nothing stored)


def _protected(conn: sa.Connection) -> set[str]:
    """Return the run keys a prune must keep: each profile version's newest, the current picture's."""
    newest = (sa.select(monitor_run.c.profile_name, monitor_run.c.profile_version,
                        sa.func.max(monitor_run.c.as_of).label("as_of"))
              .where(monitor_run.c.run_key.in_(sa.select(monitor_run_part.c.run_key)))
              .group_by(monitor_run.c.profile_name, monitor_run.c.profile_version)
              .subquery())
    keys = set(conn.scalars(
        sa.select(monitor_run.c.run_key).join(newest, sa.and_(
            monitor_run.c.profile_name == newest.c.profile_name,
            monitor_run.c.profile_version == newest.c.profile_version,
            monitor_run.c.as_of == newest.c.as_of))))
    for table in _CURRENT_PICTURE:
        keys.update(conn.scalars(sa.select(table.c.run_key).distinct()))
    return keys


def prune_runs(conn: sa.Connection, keep_days: int, *, dry_run: bool = False) -> RunCounts:
    """Delete the parts of runs dated more than ``keep_days`` before the newest stored run.

    See the module docstring for what is always kept. With ``dry_run`` nothing is deleted
    and the counts say what would be. Runs in the caller's transaction.
    """
    if keep_days < 1:
        raise ValueError("keep_days must be at least 1")
    # Under the monitor's store lock: a run being stored meanwhile (a new newest run, a new
    # current picture) is either complete before this reads or waits for this to commit.
    from pipelines.surveillance.engine import lock_monitor_store

    lock_monitor_store(conn)
    stored = conn.execute(
        sa.select(monitor_run.c.run_key, monitor_run.c.as_of)
        .where(monitor_run.c.run_key.in_(sa.select(monitor_run_part.c.run_key).distinct()))
        .order_by(monitor_run.c.run_key)).all()
    if not stored:
        return RunCounts(0, 0, 0, None, None)
    newest = max(as_of for _, as_of in stored)
    # A look-ahead run (runs.look_ahead_grace) is not the warehouse's clock: measured from
    # it, a mistyped year would prune every recent run's parts.
    data_newest = newest_procedure_date(conn)
    if data_newest is not None:
        newest = min(newest, data_newest + timedelta(days=LOOK_AHEAD_MAX_GRACE))
    # a window reaching before the calendar's start keeps everything (no overflow)
    cutoff = newest - timedelta(days=min(keep_days, (newest - date.min).days))
    protected = _protected(conn)
    pruned = [key for key, as_of in stored if as_of < cutoff and key not in protected]
    pruned_bytes = 0
    for start in range(0, len(pruned), _BATCH):
        in_batch = monitor_run_part.c.run_key.in_(pruned[start:start + _BATCH])
        pruned_bytes += conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(sa.func.length(monitor_run_part.c.payload)),
                                       0)).where(in_batch)).scalar_one()
        if not dry_run:
            conn.execute(monitor_run_part.delete().where(in_batch))
    gone = set(pruned)
    oldest_kept = min(as_of for key, as_of in stored if key not in gone)
    return RunCounts(len(stored), len(pruned), int(pruned_bytes), oldest_kept, cutoff)


def prune_by_settings(settings: Settings) -> RunCounts | None:
    """Prune runs older than ``settings.run_keep_days``, in one transaction; None when off."""
    if settings.run_keep_days < 1:
        log.info("stored monitor runs are kept forever (KYPHOWATCH_RUN_KEEP_DAYS=0)")
        return None
    from pipelines.db import open_warehouse

    engine = open_warehouse(settings.db_url)
    try:
        with engine.begin() as conn:
            counts = prune_runs(conn, settings.run_keep_days)
    finally:
        engine.dispose()
    log.info("pruned %d of %d stored monitor runs dated before %s (%.1f MB of parts); "
             "keeping %d days", counts.runs_pruned, counts.runs_with_parts, counts.cutoff,
             counts.bytes_pruned / 1e6, settings.run_keep_days)
    return counts


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``runs`` sub-command (``runs prune``)."""
    parser = subparsers.add_parser(
        "runs", help="stored monitor runs: prune old ones",
        description="Stored monitor runs. 'prune' deletes the stored parts of runs dated "
        "more than --keep-days before the newest stored run, keeping each profile "
        "version's newest run, the runs of the current picture and every run's record "
        "(key, date, fingerprint, summary). A pruned date is computed and stored again "
        "when someone asks for it.",
    )
    actions = parser.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    prune = actions.add_parser("prune", help="delete the stored parts of old runs")
    prune.add_argument("--db", help="warehouse URL (default: KYPHOWATCH_DB_URL)")
    prune.add_argument("--keep-days", type=int, required=True,
                       help="keep runs dated within this many days of the newest stored run")
    prune.add_argument("--dry-run", action="store_true",
                       help="count what would be pruned; delete nothing")
    prune.add_argument("--json", action="store_true", help="print the counts as JSON")
    prune.set_defaults(handler=_handle_prune)


def _handle_prune(args: argparse.Namespace) -> int:
    from pipelines.db import open_warehouse, require_warehouse
    from pipelines.errors import InputRejected
    from pipelines.settings import load_settings

    if args.keep_days < 1:
        raise InputRejected(f"--keep-days {args.keep_days} keeps nothing: give 1 or more days")
    settings = load_settings(db_url=args.db)
    require_warehouse(settings.db_url)
    engine = open_warehouse(settings.db_url)
    try:
        with engine.begin() as conn:
            counts = prune_runs(conn, args.keep_days, dry_run=args.dry_run)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps({**asdict(counts), "dry_run": args.dry_run}, default=str))
        return 0
    verb = "would prune" if args.dry_run else "pruned"
    if counts.cutoff is None:
        print("no stored monitor runs: nothing to prune")
    else:
        print(f"{verb} {counts.runs_pruned} of {counts.runs_with_parts} stored runs dated "
              f"before {counts.cutoff} ({counts.bytes_pruned / 1e6:.1f} MB of parts); "
              f"oldest stored run now as of {counts.oldest_kept}")
    return 0
