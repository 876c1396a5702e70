"""``kyphowatch monitor`` and ``kyphowatch site``: run the monitor and drill into one site.

``monitor`` recomputes everything and stores the run and its signals (the same call the
pipeline makes after each load); ``site`` recomputes without writing and shows, per metric,
the numbers behind that site's signals. Neither prints a patient or operator reference: the
engine never reads operator digests and turns patient digests into counters at once.
"""

from __future__ import annotations

import argparse
import json
import sys
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

    site = subparsers.add_parser(
        "site", help="drill down into one site's metrics and signals",
        description="Per metric: mature units, events, rate with exact 95%% CI, baseline, "
        "CUSUM values against their thresholds, funnel position and signals.",
    )
    site.add_argument("site_id", metavar="SITE_ID")
    site.add_argument("--db", help="warehouse URL (default: KYPHOWATCH_DB_URL)")
    site.add_argument("--metric", help="only this metric")
    site.add_argument("--as-of", help="evaluate as of this date (default: newest procedure)")
    site.add_argument("--json", action="store_true", help="print as JSON")
    site.set_defaults(handler=handle_site)


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


def handle_site(args: argparse.Namespace) -> int:
    """Print one site's per-metric figures and signals (recomputed, nothing stored)."""
    from pipelines.surveillance.engine import evaluate

    settings = load_settings(db_url=args.db)
    result = evaluate(settings, parse_as_of(args.as_of))
    site = args.site_id.strip().upper()
    metrics = [m for m in result.site_metrics if m["site_id"] == site]
    if not metrics:
        raise InputRejected(f"unknown site {args.site_id!r}: no procedures from it up to "
                            f"{result.as_of.isoformat() if result.as_of else 'now'}")
    if args.metric:
        known = sorted({m["metric"] for m in metrics})
        if args.metric not in known:
            raise InputRejected(f"unknown metric {args.metric!r} (known: {', '.join(known)})")
        metrics = [m for m in metrics if m["metric"] == args.metric]
    signals = [s for s in result.signals if s["site_id"] == site
               and (not args.metric or s["metric"] == args.metric)]
    if args.json:
        payload = result.to_dict()
        print(json.dumps({
            "site_id": site, "as_of": payload["as_of"], "profile": payload["profile"],
            "metrics": [m for m in payload["site_metrics"] if m["site_id"] == site
                        and (not args.metric or m["metric"] == args.metric)],
            "signals": [s for s in payload["signals"] if s["site_id"] == site
                        and (not args.metric or s["metric"] == args.metric)],
        }, indent=2, sort_keys=True))
        return 0
    print(f"site {site}: profile {result.profile_name} {result.profile_version}, "
          f"as of {result.as_of.isoformat()}")
    rows = []
    for m in metrics:
        cusum = "; ".join(f"{name} {_fmt(c['value'])}/{_fmt(c['h'])}"
                          for name, c in sorted(m.get("cusum", {}).items()))
        funnel = "; ".join(f"{w} {f['position']} (z {_fmt(f['z_adjusted'])})"
                           for w, f in sorted(m.get("funnel", {}).items()))
        interval = (f"{_fmt(m.get('ci_low'))}-{_fmt(m.get('ci_high'))}"
                    if m.get("ci_low") is not None else "-")
        rows.append([m["metric"], _fmt(m.get("n")), _fmt(m.get("events")), _fmt(m.get("rate")),
                     interval, _fmt(m["baseline"]), cusum or "-", funnel or "-",
                     str(sum(1 for s in signals if s["metric"] == m["metric"]))])
    print(_table(["metric", "n", "events", "rate", "95% CI", "baseline", "CUSUM value/h",
                  "funnel", "signals"], rows))
    if signals:
        print()
        print(_table(SIGNAL_HEADERS, _signal_rows(signals)))
    sys.stdout.flush()
    return 0
