"""``kyphowatch monitor`` and ``kyphowatch site``: run the monitor and drill into one site.

``monitor`` recomputes everything and stores the run and its signals (the same call the
pipeline makes after each load). ``sites`` and ``site`` recompute without writing and print
the report's overview grid and site page as text, JSON or CSV; the numbers come from
:mod:`pipelines.evidence`, like the report's. Neither prints a patient or operator reference: the
engine never reads operator digests and turns patient digests into counters at once.
"""

from __future__ import annotations

import argparse
import json
import sys
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
        description="Per metric: status, mature units, events, rate with exact 95%% CI, "
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
    from pipelines.surveillance.engine import run_monitor

    settings = load_settings(db_url=args.db)
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


def _evidence(args: argparse.Namespace, site: str | None = None):
    """Return (result, profile, facts, complications) for the drill-down commands."""
    from pipelines import evidence
    from pipelines.db import require_warehouse
    from pipelines.surveillance.profile import load_profile
    from pipelines.surveillance.runs import read_or_compute

    settings = load_settings(db_url=args.db)
    require_warehouse(settings.db_url)
    profile = load_profile(settings.profile_path)
    # the stored run: no chart series are shown here, so none are read
    result = read_or_compute(settings, profile, parse_as_of(args.as_of), sites=[])
    if result.as_of is None:
        if site is not None:
            raise InputRejected(f"unknown site {site!r}: the warehouse holds no procedures yet")
        return result, profile, evidence.SiteFacts(), {}
    facts = evidence.read_site_facts(settings, result.as_of, site=site,
                                     with_audit=site is not None)
    complications = (evidence.recent_complications_by_site(settings, result.as_of, site)
                     if site is not None else {})
    return result, profile, facts, complications


def _sites_headers(profile) -> list[str]:
    return ["site", "status", *[m.id for m in profile.metrics], "open_alerts", "procedures",
            "last_procedure_date", "newest_extract", "rows_quarantined",
            "complications_pending"]


def handle_sites(args: argparse.Namespace) -> int:
    """Print every site's status per metric (the report's overview grid)."""
    from pipelines import evidence

    result, profile, facts, _ = _evidence(args)
    if result.as_of is None:
        if args.json:
            print(json.dumps({"as_of": None, "sites": []}))
        elif args.csv:
            evidence.write_csv(sys.stdout, _sites_headers(profile), [])
        else:
            print("no procedures in the warehouse yet: no sites to show")
        return 0
    rows = evidence.sites_payload(result, profile, facts)
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
              *[(r["metrics"].get(m) or {}).get("status", "-") for m in metric_ids],
              r["open_alerts"], r["procedures"], r["last_procedure_date"],
              r["newest_extract"], r["rows_quarantined"], r["complications_pending"]]
             for r in rows]
    if args.csv:
        evidence.write_csv(sys.stdout, headers, table)
        return 0
    print(f"{len(rows)} sites{' flagged' if args.flagged else ''}: profile {profile.name} "
          f"{profile.version}, as of {result.as_of.isoformat()}")
    if table:
        print(_table(headers, [[_fmt(c) for c in row] for row in table]))
    return 0


def handle_site(args: argparse.Namespace) -> int:
    """Print one site's figures, signals and alerts (from the stored monitor run)."""
    from pipelines import evidence

    site = args.site_id.strip().upper()
    result, profile, facts, complications = _evidence(args, site)
    known_sites = {m["site_id"] for m in result.site_metrics}
    if site not in known_sites:
        raise InputRejected(f"unknown site {args.site_id!r}: no procedures from it up to "
                            f"{result.as_of.isoformat()}")
    if args.metric:
        known = [m.id for m in profile.metrics]
        if args.metric not in known:
            raise InputRejected(f"unknown metric {args.metric!r} (known: {', '.join(known)})")
    payload = evidence.Evidence(result, profile, facts, complications).site_payload(
        site, metric=args.metric)
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True))
        return 0
    headers = ["metric", "status", "n", "events", "rate", "ci_low", "ci_high", "baseline",
               "expected", "o_to_e", "cusum", "funnel", "signals"]
    rows = []
    for m in payload["metrics"]:
        oe = m.get("observed_expected") or {}
        cusum = "; ".join(f"{name} {_fmt(c['value'])}/{_fmt(c['h'])}"
                          for name, c in sorted((m.get("cusum") or {}).items()))
        funnel = "; ".join(f"{w} {f['position']} (z {_fmt(f['z_adjusted'])})"
                           for w, f in sorted((m.get("funnel") or {}).items()))
        rows.append([m["metric"], m["status"], m.get("n"), m.get("events"), m.get("rate"),
                     m.get("ci_low"), m.get("ci_high"), m["baseline"], oe.get("expected"),
                     oe.get("o_to_e"), cusum or "-", funnel or "-",
                     sum(1 for s in payload["signals"] if s["metric"] == m["metric"])])
    if args.csv:
        evidence.write_csv(sys.stdout, headers, rows)
        return 0
    print(f"site {site}: {evidence.STATUS_LABELS[payload['status']]}; profile "
          f"{profile.name} {profile.version}, as of {payload['as_of']}")
    print(_table(headers, [[_fmt(c) for c in row] for row in rows]))
    if payload["signals"]:
        print()
        print(_table(SIGNAL_HEADERS, _signal_rows(
            [dict(s, episode_start=date.fromisoformat(s["episode_start"]),
                  signal_date=date.fromisoformat(s["signal_date"])) for s in payload["signals"]]
        )))
    if payload["alerts"]:
        print()
        print(_table(["alert", "kind", "metric", "state", "raised", "title"],
                     [[a["alert_id"][:12], a["kind"], a["metric"] or "-", a["state"],
                       a["created_at"][:19], a["title"]] for a in payload["alerts"]]))
    dq = payload["data_quality"]
    print()
    print(f"data: {dq['procedures']} procedures, last {dq['last_procedure_date']}, newest "
          f"extract {dq['newest_extract']}, {dq['rows_quarantined']} rows quarantined, "
          f"{dq['complications_pending']} complications pending")
    sys.stdout.flush()
    return 0
