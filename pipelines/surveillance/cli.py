"""``kyphowatch monitor`` and ``kyphowatch site``: run the monitor and drill into one site.

``monitor`` recomputes everything and stores the run and its signals (the same call the
pipeline makes after each load). ``sites`` and ``site`` read the stored run (computing and
storing it first only when none is stored for the date) and print the report's overview
grid and site page as text, JSON or CSV; the numbers come from :mod:`pipelines.evidence`,
like the report's. ``sites`` reads the run's stored status rows and ``site`` its own site's
figures, not every site's (:func:`pipelines.surveillance.runs.read_stored`). Neither prints
a patient or operator reference: the engine never reads operator digests and turns patient
digests into counters at once.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import functools
import gc
import json
import sys
from collections.abc import Iterator
from datetime import date
from typing import Any

from pipelines.cli import parse_as_of
from pipelines.errors import InputRejected
from pipelines.settings import load_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``monitor`` and ``site`` sub-commands."""
    monitor = subparsers.add_parser(
        "monitor", help="run the surveillance monitor and list active signals",
        description="Recompute all charts from the warehouse, store the run and its signals, "
        "and print the active signals.",
    )
    monitor.add_argument("--db", help="warehouse URL (default: KYPHOWATCH_DB_URL)")
    monitor.add_argument("--as-of", help="evaluate as of this date (default: newest procedure)")
    monitor.add_argument("--json", action="store_true", help="print the full result as JSON")
    monitor.set_defaults(handler=handle_monitor)

    sites = subparsers.add_parser(
        "sites", help="list every site with its status per metric",
        description="One row per site: worst status, status per metric, open alerts and "
        "data quality -- the overview grid of the report.",
    )
    sites.add_argument("--db", help="warehouse URL (default: KYPHOWATCH_DB_URL)")
    sites.add_argument("--as-of", help="evaluate as of this date (default: newest procedure)")
    sites.add_argument("--flagged", action="store_true",
                       help="only sites with a current signal or suspected under-reporting")
    _add_format(sites)
    sites.set_defaults(handler=handle_sites)

    site = subparsers.add_parser(
        "site", help="drill down into one site's metrics and signals",
        description="Per metric: status, mature units, events, rate with exact 95% CI, "
        "baseline, observed/expected, CUSUM values against their thresholds, funnel position; "
        "then signals, alerts, case mix and recent complications (the report's site page).",
    )
    site.add_argument("site_id", metavar="SITE_ID")
    site.add_argument("--db", help="warehouse URL (default: KYPHOWATCH_DB_URL)")
    site.add_argument("--metric", help="only this metric")
    site.add_argument("--as-of", help="evaluate as of this date (default: newest procedure)")
    _add_format(site)
    site.set_defaults(handler=handle_site)


def _add_format(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="print as JSON")
    group.add_argument("--csv", action="store_true",
                       help="print as CSV (cells that a spreadsheet would run as a formula "
                       "are prefixed with an apostrophe)")
    parser.add_argument("--wide", action="store_true",
                        help="every column in the text table (default: fits 100 columns)")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _signal_rows(signals: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for s in sorted(signals, key=lambda s: (s["signal_date"], s["site_id"], s["metric"]),
                    reverse=True):
        interval = (f"{_fmt(s['ci_low'])}-{_fmt(s['ci_high'])}"
                    if s.get("ci_low") is not None else "-")
        rows.append([
            s["site_id"], s["metric"], s["method"], s["direction"], s["category"],
            s["episode_start"].isoformat(), s["signal_date"].isoformat(),
            f"{_fmt(s['observed'], 4)}/{_fmt(s['n'], 6)}", _fmt(s["expected"]), interval,
            f"{_fmt(s['statistic'])} vs {_fmt(s['threshold'])}", _fmt(s["p_value"]),
        ])
    return rows


SIGNAL_HEADERS = ["site", "metric", "method", "dir", "category", "episode", "signalled",
                  "obs/n", "expected", "95% CI", "statistic", "p"]


def handle_monitor(args: argparse.Namespace) -> int:
    """Run and store the monitor; print active signals (or JSON)."""
    from pipelines.db import require_warehouse
    from pipelines.surveillance.engine import run_monitor

    settings = load_settings(db_url=args.db)
    require_warehouse(settings.db_url)  # a typo in --db is not a new, empty warehouse
    result = run_monitor(settings, parse_as_of(args.as_of))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return 0
    if result.as_of is None:
        print("no procedures in the warehouse: nothing to monitor")
        return 0
    print(f"kyphowatch monitor: profile {result.profile_name} {result.profile_version}, "
          f"as of {result.as_of.isoformat()}, run {result.run_key[:12]}")
    print(f"{len(result.signals)} active signals ({len(result.new_signal_keys)} new)")
    if result.signals:
        print(_table(SIGNAL_HEADERS, _signal_rows(result.signals)))
    return 0


def _evidence(args: argparse.Namespace, site: str | None = None, status: bool = False,
              metric: str | None = None):
    """Return (result, profile, facts, complications) for the drill-down commands.

    ``site``: only that site's figures and signals are read; ``status``: only the stored
    status rows (``result.status_rows``), when the warehouse holds them for the run;
    ``metric``: must be one of the profile's (else InputRejected, before any read).

    The stored run, the facts and the recent complications are read on one connection; a
    run that is not stored yet is computed (and stored) first, but only once the arguments
    are known to be good: an unknown metric, or a site without a procedure up to the date,
    is refused before anything is computed or stored (user audit: ``kyphowatch site S777``
    ran and stored a 22-second monitor run before saying "unknown site").
    """
    from pipelines.db import reading, require_warehouse
    from pipelines.surveillance import runs
    from pipelines.surveillance.profile import load_profile

    settings = load_settings(db_url=args.db)
    require_warehouse(settings.db_url)
    profile = load_profile(settings.profile_path)
    if metric:
        known = [m.id for m in profile.metrics]
        if metric not in known:
            raise InputRejected(f"unknown metric {metric!r} (known: {', '.join(known)})")
    # the stored run without chart data: these commands draw no chart; one site's
    # drill-down reads only that site's figures and signals, the grid only status rows
    with reading(settings.db_url) as conn:
        wanted, result = runs.read_stored(conn, profile, parse_as_of(args.as_of), sites=[],
                                          charts=False, site=site, status=status)
        if result is not None:
            _say_if_loaded_after(conn, result)
            return _with_facts(settings, profile, result, site, conn)
        if site is not None:
            _require_site(conn, site, args.site_id, wanted)
    with _collector(True):  # the monitor's frames and models do make cycles
        result = runs.compute_and_read(settings, profile, wanted, sites=[], charts=False)
    return _with_facts(settings, profile, result, site, None)


def _require_site(conn, site: str, typed: str, as_of: date | None) -> None:
    """Raise InputRejected unless ``site`` has a procedure on or before ``as_of``.

    The monitor run as of ``as_of`` holds exactly those sites, so a site without one would
    be unknown in any run computed for the date: this is checked before computing it, with
    one probe of the ``(site_id, procedure_date)`` index, in the words the stored run's
    check uses (:func:`handle_site`).
    """
    import sqlalchemy as sa

    from pipelines.schema import procedure

    if as_of is None:
        raise InputRejected(f"unknown site {typed!r}: the warehouse holds no procedures yet")
    known = conn.execute(sa.select(sa.literal(1)).where(
        procedure.c.site_id == site, procedure.c.procedure_date <= as_of).limit(1)).first()
    if known is None:
        raise InputRejected(f"unknown site {typed!r}: no procedures from it up to "
                            f"{as_of.isoformat()} in the warehouse (nothing was computed)")


def _say_if_loaded_after(conn, result) -> None:
    """Note on stderr when extracts were loaded after the stored run being shown."""
    from pipelines.surveillance import runs

    later = runs.loaded_after_run(conn, result.run_key)
    if later is not None:
        stored, loaded = later
        print(f"kyphowatch: note: the monitor run as of {result.as_of.isoformat()} was stored "
              f"{stored:%Y-%m-%d %H:%M} UTC; extracts loaded since ({loaded:%Y-%m-%d %H:%M} "
              "UTC) are not in it until `kyphowatch monitor` runs again", file=sys.stderr)


def _with_facts(settings, profile, result, site: str | None, conn):
    """Return ``_evidence``'s tuple for ``result``, reading on ``conn`` (None: a new one)."""
    from pipelines import evidence

    if result.as_of is None:
        if site is not None:
            raise InputRejected(f"unknown site {site!r}: the warehouse holds no procedures yet")
        return result, profile, evidence.SiteFacts(), {}
    facts = evidence.read_site_facts(settings, result.as_of, site=site,
                                     with_audit=site is not None,
                                     stored=result.procedure_facts, conn=conn)
    complications = (evidence.recent_complications_by_site(settings, result.as_of, site,
                                                           conn=conn)
                     if site is not None else {})
    return result, profile, facts, complications


@contextlib.contextmanager
def _collector(enabled: bool) -> Iterator[None]:
    """Switch the cyclic garbage collector on or off for a block; restore it afterwards."""
    was_enabled = gc.isenabled()
    _switch_collector(enabled)
    try:
        yield
    finally:
        _switch_collector(was_enabled)


def _switch_collector(enabled: bool) -> None:
    if enabled:
        gc.enable()
    else:
        gc.disable()


def _collector_paused(handler):
    """Run the drill-down ``handler`` with the cyclic garbage collector paused.

    A drill-down holds the whole stored run (a 1,000-site run decodes to about a million
    dicts, lists and strings) until it exits and makes no reference cycles to reclaim: the
    collector's passes over those objects freed nothing and cost 0.1-0.2 s per command.
    (A run computed on the spot, in :func:`_evidence`, runs with the collector.)
    """
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        _freeze_at_exit()
        with _collector(False):
            try:
                return handler(args)
            finally:
                _age_young_objects()

    return run


def _age_young_objects() -> None:
    """Move every object the collector tracks into its oldest generation.

    With the collector paused, everything allocated since (the modules a drill-down
    imports, SQLAlchemy's among them) stays in the youngest generation; switching the
    collector back on made its first young pass walk all of it, for nothing: 10-15 ms of
    every ``sites`` / ``site``. From the oldest generation only a full collection walks
    them, which the exit hook of :func:`_freeze_at_exit` forestalls. Objects frozen by
    someone else before stay frozen.
    """
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    if not frozen_before:
        gc.unfreeze()  # back into the oldest generation, collectable as usual


@functools.cache
def _freeze_at_exit() -> None:
    """Make the interpreter's last garbage collection, at exit, walk nothing.

    That pass walks every object of every module imported (SQLAlchemy's alone are about
    45,000) and, after a drill-down, frees nothing: 25 ms on an idle machine, 60-70 ms on
    a busy one. ``gc.freeze()`` in an exit hook (they run before that pass) moves them all
    out of its reach. A drill-down has written all it writes by then (stdout is flushed),
    so no finaliser is waiting on that pass.
    """
    atexit.register(gc.freeze)


# Short forms for the 100-column tables (``--wide`` shows the full names).
_SHORT_LEVEL = {"alarm": "ALARM", "watch": "watch", "under_reporting": "under",
                "immature": "imm", "in_control": "ok"}
_SHORT_METRIC = {"cement_leak": "leak", "symptomatic_cement_leak": "s.leak",
                 "new_fracture": "fract", "major_event": "major", "sentinel_event": "sentnl",
                 "mdt_discussion": "mdt"}


def _sites_headers(profile) -> list[str]:
    return ["site", "status", *[m.id for m in profile.metrics], "open_alerts", "procedures",
            "last_procedure_date", "newest_extract", "rows_quarantined",
            "complications_pending"]


@_collector_paused
def handle_sites(args: argparse.Namespace) -> int:
    """Print every site's status per metric (the report's overview grid)."""
    from pipelines import evidence

    result, profile, facts, _ = _evidence(args, status=True)
    if result.as_of is None:
        if args.json:
            print(json.dumps({"as_of": None, "sites": []}))
        elif args.csv:
            evidence.write_csv(sys.stdout, _sites_headers(profile), [])
        else:
            print("no procedures in the warehouse yet: no sites to show")
        return 0
    rows = evidence.sites_payload(result, profile, facts, result.status_rows)
    if args.flagged:
        rows = [r for r in rows if r["flagged"]]
    metric_ids = [m.id for m in profile.metrics]
    if args.json:
        print(json.dumps({"as_of": result.as_of.isoformat(), "run_key": result.run_key,
                          "profile": {"name": profile.name, "version": profile.version},
                          "sites": rows}, indent=2, sort_keys=True))
        return 0
    headers = _sites_headers(profile)
    table = [[r["site_id"], r["status"],
              *[(r["metrics"].get(m) or {}).get("status") for m in metric_ids],
              r["open_alerts"], r["procedures"], r["last_procedure_date"],
              r["newest_extract"], r["rows_quarantined"], r["complications_pending"]]
             for r in rows]
    if args.csv:
        evidence.write_csv(sys.stdout, headers, table)
        return 0
    print(f"{len(rows)} sites{' flagged' if args.flagged else ''}: profile {profile.name} "
          f"{profile.version}, as of {result.as_of.isoformat()}; most severe first")
    order = sorted(range(len(rows)), key=lambda i: (
        evidence.STATUS_ORDER.index(rows[i]["status"]), rows[i]["site_id"]))
    if args.wide:
        if table:
            print(_table(headers, [[_fmt(c) for c in table[i]] for i in order]))
        return 0
    short = [_SHORT_METRIC.get(m, m[:6]) for m in metric_ids]
    compact = []
    for i in order:
        r = rows[i]
        since = [m.get("since") for m in (r["metrics"] or {}).values() if m.get("since")]
        compact.append([r["site_id"], _SHORT_LEVEL.get(r["status"], r["status"]),
                        *[_SHORT_LEVEL.get((r["metrics"].get(m) or {}).get("status"), "-")
                          for m in metric_ids],
                        min(since) if since else "-", _fmt(r["open_alerts"]),
                        _fmt(r["procedures"]), _fmt(r["last_procedure_date"])])
    if compact:
        print(_table(["site", "level", *short, "since", "alerts", "procs", "last proc"],
                     compact))
        print("levels: ALARM, watch, under (under-reporting?), imm (immature), ok (in control)")
        print("--wide for every column; kyphowatch site SITE for the evidence")
    return 0


@_collector_paused
def handle_site(args: argparse.Namespace) -> int:
    """Print one site's figures, signals and alerts (from the stored monitor run)."""
    from pipelines import evidence
    from pipelines.surveillance import levels

    site = args.site_id.strip().upper()
    # the metric, and a site unknown to the warehouse, are checked before any compute
    result, profile, facts, complications = _evidence(args, site, metric=args.metric)
    known_sites = {m["site_id"] for m in result.site_metrics}
    if site not in known_sites:
        raise InputRejected(f"unknown site {args.site_id!r}: not in the monitor run as of "
                            f"{result.as_of.isoformat()} (no procedures from it up to that "
                            "date when the run was stored)")
    # A site's payload reads only its own rows: derive the evidence from those alone rather
    # than from every site's (a fifth of a drill-down's time on a 1,000-site network).
    own = dataclasses.replace(
        result, site_metrics=[m for m in result.site_metrics if m["site_id"] == site],
        signals=[s for s in result.signals if s["site_id"] == site])
    payload = evidence.Evidence(own, profile, facts, complications).site_payload(
        site, metric=args.metric)
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True))
        return 0
    # One value per column (tidy): the chart that decides the level, its statistic and
    # threshold, and each funnel's position, rather than compound strings.
    headers = ["metric", "status", "since", "n", "events", "rate", "ci_low", "ci_high",
               "baseline", "expected", "o_to_e", "alarm_chart", "alarm_statistic",
               "alarm_threshold", "funnel_cumulative", "funnel_12m", "signals"]
    rows = []
    for m in payload["metrics"]:
        oe = m.get("observed_expected") or {}
        charts = {k: c for k, c in (m.get("cusum") or {}).items() if c.get("role") == "alarm"
                  and k.endswith("_up")} or {k: c for k, c in (m.get("cusum") or {}).items()
                                             if k.endswith("_up")}
        chart = min(charts, default=None)
        funnels = m.get("funnel") or {}
        rows.append([m["metric"], m["status"], (m.get("level") or {}).get("since"),
                     m.get("n"), m.get("events"), m.get("rate"), m.get("ci_low"),
                     m.get("ci_high"), m["baseline"], oe.get("expected"), oe.get("o_to_e"),
                     chart, charts[chart]["value"] if chart else None,
                     charts[chart]["h"] if chart else None,
                     (funnels.get("cumulative") or {}).get("position"),
                     (funnels.get("rolling") or {}).get("position"),
                     sum(1 for s in payload["signals"] if s["metric"] == m["metric"])])
    if args.csv:
        evidence.write_csv(sys.stdout, headers, rows)
        return 0
    print(f"site {site}: {evidence.STATUS_LABELS[payload['status']]}; profile "
          f"{profile.name} {profile.version}, as of {payload['as_of']}")
    if args.wide:
        print(_table(headers, [[_fmt(c) for c in row] for row in rows]))
    else:
        def pct(value):
            return "-" if value is None else f"{100 * value:.3g}%"

        print(_table(
            ["metric", "level", "since", "n", "events", "rate", "95% CI", "O/E", "chart/h"],
            [[_SHORT_METRIC.get(r[0], r[0]), _SHORT_LEVEL.get(r[1], r[1]), _fmt(r[2]),
              _fmt(r[3]), _fmt(r[4]), pct(r[5]),
              f"{pct(r[6])}-{pct(r[7])}" if r[6] is not None else "-", _fmt(r[10]),
              f"{_fmt(r[12])}/{_fmt(r[13])}" if r[11] else "-"] for r in rows]))
        for m in payload["metrics"]:
            level = m.get("level") or {}
            if level.get("level") in ("alarm", "watch", "under_reporting"):
                print(f"  {m['metric']}: {level.get('reason')}")
            recent = level.get("recent") or {}
            if recent.get("index_from") and recent.get("n"):
                # a follow-up window: the recent figure of the e-mail and the report, with
                # its index months (the table's rate is every mature unit's)
                print(f"  {m['metric']}: recent {pct(recent.get('rate'))} "
                      f"({recent.get('events')} of {recent['n']}) among "
                      f"{levels.recent_words(recent)}")
    if payload["signals"] and args.wide:
        print()
        print(_table(SIGNAL_HEADERS, _signal_rows(
            [dict(s, episode_start=date.fromisoformat(s["episode_start"]),
                  signal_date=date.fromisoformat(s["signal_date"])) for s in payload["signals"]]
        )))
    if payload["alerts"]:
        print()
        print(_table(["alert", "kind", "metric", "state", "raised", "title"],
                     [[a["alert_id"][:12], a["kind"], a["metric"] or "-", a["state"],
                       a["created_at"][:16], a["title"]] for a in payload["alerts"]]))
    dq = payload["data_quality"]
    print()
    print(f"data: {dq['procedures']} procedures, last {dq['last_procedure_date']}, newest "
          f"extract {evidence.readable_stamp(dq['newest_extract'])},")
    print(f"      {dq['rows_quarantined']} rows quarantined, "
          f"{dq['complications_pending']} complications pending")
    sys.stdout.flush()
    return 0
