"""Network replay: what a safety inbox receives when the real pipeline runs month after month.

Why: ``bench_alert_precision.py`` measures the alert rules on monitor snapshots built in
memory, with every event known at once and the signals' history taken from one final
computation. A real network differs in ways that can only add e-mails: complications are
reported late (and some never), extracts carry corrections and bad rows, each night's run
restates the charts' past with the newest data, and an alert raised on one night can be
cleared on a later one and raised again. This benchmark runs the real chain on files:
``simulate`` writes a registry's monthly extracts; for each extract date, in order, the
files of that date are ingested (``ingest_paths``), the monitor is run and stored
(``run_monitor``, as of the newest procedure) and the alerts are synced (``sync_alerts`` as
of the extract date), all on a fresh SQLite warehouse. Every alert created is recorded with
the cycle that created it.

It prints, for the sites and metrics without a planted drift, the safety e-mails per 100
site-years by kind (alarm, under-reporting, sentinel, watch digest, data quality,
operators/products), how many alerts were later closed by the system because their
condition cleared (a restated history), and for each planted drift the days from onset to
its first alarm. Target (issue on alert precision): alarm e-mails about undrifted
site-metrics for cement_leak + new_fracture within those metrics' share of the profile's
budget (2.7 per 100 site-years for ``htg108``: 3.0 x (0.45 + 0.45), docs/statistics.md
section 8), printed PASS/MISS; the rest is reported.

Run: ``.venv/bin/python benchmarks/bench_network_replay.py`` (60 sites, 2021-2024, about
3 minutes on a quiet 2-core machine, 10 at load 8); ``--sites 20 --years 2`` for a quick look; ``--seed``;
``--keep DIR`` keeps the files and the warehouse.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BENCH_KEY = "kyphowatch-benchmark-key-synthetic-data-only"  # synthetic data only
BUDGET_METRICS = ("cement_leak", "new_fracture")


def budget_per_100_site_years() -> float:
    """Return the profile's false-alarm budget for BUDGET_METRICS (their alarm shares)."""
    from pipelines.settings import load_settings
    from pipelines.surveillance.profile import load_profile

    profile = load_profile(load_settings().profile_path)
    total = profile.design.budget.safety_per_100_site_years
    return total * sum(profile.metric(m).alarm.share for m in BUDGET_METRICS)


def _drifts(start: date, sites: int) -> list[str]:
    """Two planted site drifts, onset a year and a half in (as in the issue's browser test)."""
    onset = date(start.year + 1, 7, 1).isoformat()
    return [
        f"S{sites // 3:03d}:cement_leak:2.5:{onset}",
        f"S{2 * sites // 3:03d}:new_fracture:2.5:{onset}",
    ]


def _alert_rows(conn, seen: set[str]) -> list[dict]:
    import sqlalchemy as sa

    from pipelines import schema

    alert = schema.alert
    rows = (
        conn.execute(
            sa.select(
                alert.c.alert_id,
                alert.c.kind,
                alert.c.dedupe_key,
                alert.c.site_id,
                alert.c.metric,
                alert.c.title,
                alert.c.payload,
            )
        )
        .mappings()
        .all()
    )
    new = []
    for row in rows:
        if row["alert_id"] in seen:
            continue
        seen.add(row["alert_id"])
        payload = json.loads(row["payload"])
        new.append(
            {
                "alert_id": row["alert_id"],
                "kind": row["kind"],
                "rule": row["dedupe_key"].split(":", 1)[0],
                "site_id": row["site_id"],
                "metric": row["metric"],
                "title": row["title"],
                "direction": payload.get("direction"),
                "level": payload.get("level"),
            }
        )
    return new


def _category(alert: dict) -> str:
    """Name what kind of e-mail an alert is, for the tally."""
    title = alert["title"].lower()
    if alert["rule"] == "sentinel" or title.startswith("sentinel"):
        return "sentinel event"
    if "watch list" in title:
        return "watch digest"
    if alert["kind"] == "data_quality":
        return "data quality"
    if alert["rule"] == "level" and alert["direction"] == "down":
        return "under-reporting"
    if alert["rule"] == "level":
        return "alarm"
    return f"{alert['kind']} ({alert['rule']})"


def replay(out: Path, *, sites: int, start: date, end: date, seed: int) -> dict:
    """Simulate the registry into ``out``, replay it month by month; return the tallies."""
    from pipelines.alerts.lifecycle import sync_alerts
    from pipelines.db import open_warehouse
    from pipelines.ingest import ingest_paths
    from pipelines.settings import load_settings
    from pipelines.simulate import parse_drift, simulate
    from pipelines.surveillance.engine import run_monitor

    extracts = out / "extracts"
    drifts = _drifts(start, sites)
    manifest = simulate(
        extracts,
        sites=sites,
        start=start,
        end=end,
        seed=seed,
        drifts=[parse_drift(d) for d in drifts],
        bad_row_rate=0.002,
        cadence="monthly",
    )
    by_date: dict[str, list[Path]] = defaultdict(list)
    for item in manifest["files"]:
        by_date[item["extract_date"]].append(extracts / item["name"])
    os.environ["KYPHOWATCH_PSEUDONYM_KEY"] = BENCH_KEY
    db_url = f"sqlite:///{out / 'warehouse.db'}"
    settings = load_settings(db_url=db_url, report_dir=str(out / "reports"))
    seen: set[str] = set()
    created: list[dict] = []
    closed = 0
    timings: Counter = Counter()
    for cycle, extract_date in enumerate(sorted(by_date)):
        # Procedures before complications, as a landing directory's files are taken.
        paths = sorted(by_date[extract_date], key=lambda p: not p.name.startswith("procedures"))
        began = time.perf_counter()
        ingest_paths(settings, paths)
        timings["ingest"] += time.perf_counter() - began
        began = time.perf_counter()
        run_monitor(settings)
        timings["monitor"] += time.perf_counter() - began
        began = time.perf_counter()
        result = sync_alerts(settings, as_of=date.fromisoformat(extract_date))
        timings["sync"] += time.perf_counter() - began
        closed += result.closed
        engine = open_warehouse(db_url)
        try:
            with engine.connect() as conn:
                for alert in _alert_rows(conn, seen):
                    created.append({**alert, "cycle": cycle, "date": extract_date})
        finally:
            engine.dispose()
        print(
            f"  {extract_date}: {len(result.created)} new alert(s), {result.closed} closed "
            f"by the system",
            flush=True,
        )
    return {
        "manifest": manifest,
        "drifts": drifts,
        "created": created,
        "closed": closed,
        "timings": dict(timings),
    }


def summarise(outcome: dict, *, start: date, end: date) -> bool:
    """Print the tallies; return True when the budget target is met."""
    manifest = outcome["manifest"]
    drifted = {
        (d["site_id"], d["metric"]): date.fromisoformat(d["from_date"]) for d in manifest["drift"]
    }
    years = ((end - start).days + 1) / 365.25
    site_years = len(manifest["sites"]) * years
    print(
        f"\nregistry: {len(manifest['sites'])} sites, {start}..{end} ({years:.1f} years, "
        f"{manifest['counts']['procedures']:,} procedures), drifts: "
        f"{', '.join(outcome['drifts'])}"
    )
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in outcome["timings"].items()))
    tally: Counter = Counter()
    false_by_metric: Counter = Counter()
    for alert in outcome["created"]:
        category = _category(alert)
        if category == "alarm":
            onset = drifted.get((alert["site_id"], alert["metric"]))
            # An alarm e-mailed before its site's drift began is as false as any other.
            if onset is not None and date.fromisoformat(alert["date"]) >= onset:
                category = "alarm (planted drift)"
            else:
                false_by_metric[alert["metric"]] += 1
        tally[category] += 1
    print(f"\nalerts created over the replay ({site_years:.0f} site-years); per 100 site-years:")
    for category, count in sorted(tally.items(), key=lambda kv: -kv[1]):
        print(f"  {category:<28} {count:>5}   {100 * count / site_years:6.2f}")
    print(f"  closed by the system (condition cleared): {outcome['closed']}")
    for metric, count in sorted(false_by_metric.items()):
        print(
            f"  alarms at undrifted site-metrics, {metric}: {count} "
            f"({100 * count / site_years:.2f} per 100 site-years)"
        )
    for (site, metric), onset in sorted(drifted.items()):
        first = [
            a
            for a in outcome["created"]
            if _category(a) == "alarm"
            and (a["site_id"], a["metric"]) == (site, metric)
            and date.fromisoformat(a["date"]) >= onset
        ]
        when = min((date.fromisoformat(a["date"]) for a in first), default=None)
        print(
            f"  planted drift {site} {metric} from {onset}: first alarm e-mail "
            + (f"{when} ({(when - onset).days} days)" if when else "none within the data")
        )
    budget = sum(false_by_metric[m] for m in BUDGET_METRICS) / site_years * 100
    target = budget_per_100_site_years()
    ok = budget <= target
    print(
        f"\nalarm e-mails at undrifted site-metrics (cement_leak + new_fracture): {budget:.2f} "
        f"per 100 site-years (target <= {target:.3g}, their share of the profile's budget): "
        f"{'PASS' if ok else 'MISS'}"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    """Run the replay and print what the safety inbox received."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=60)
    parser.add_argument("--years", type=int, default=4)
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--keep", type=Path, help="keep the files and warehouse here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # No delivery channel is configured on purpose (the alerts are counted, not sent): the
    # lifecycle's warning about it would repeat every month.
    logging.getLogger("pipelines.alerts.lifecycle").setLevel(logging.ERROR)
    start = date(2021, 1, 1)
    end = date(2021 + args.years - 1, 12, 31)
    out = args.keep or Path(tempfile.mkdtemp(prefix="kw_replay_"))
    if args.keep and out.exists() and any(out.iterdir()):
        print(f"--keep {out}: the directory must be empty or new", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    try:
        outcome = replay(out, sites=args.sites, start=start, end=end, seed=args.seed)
        summarise(outcome, start=start, end=end)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
