"""Alert precision benchmark: network-level false safety e-mails against detection delay.

Why: a chart tuned to a per-chart ARL0 of 2,000 looks quiet one chart at a time, but a
network of 60 sites, each with several charts per metric, sends safety e-mails about sites
whose risk never changed. This benchmark counts those e-mails per 100 site-years under the
OLD rules (any upward safety signal of any method is an alarm) and the NEW level rules
(``_Computation.level_episodes``), on the same simulated registries, and measures what each
costs in detection delay against the best chart one could build knowing the shift.

Design (all in memory: :func:`pipelines.simulate.simulate_snapshot` and
:func:`pipelines.surveillance.engine.compute`; no files, no database):

* registries of 60 sites, 2022-01-01..2024-12-31 (3 years of data per site), as of the end;
* ``--seeds`` drift registries (default 20), each with 7 drifts at 7 distinct sites:
  cement_leak odds ratio 1.5, 2 and 3; new_fracture 1.5, 2, 2.5 and 3; each onset a random
  date 2022-10-01..2023-12-31. Every other registry (odd index) draws its drifting sites
  among all sites of 50-400 procedures a year; the even ones among sites of 150-250 a year
  only, and a seed is used for that only if it has at least 7 such sites (otherwise the next
  candidate seed is tried). So each (metric, odds ratio) cell gets at least one drift per
  even registry at 150-250 a year: 10 per cell with 20 registries, plus those that land in
  the band by chance;
* 5 registries without any drift (``--null-seeds``);
* ``--quick``: 4 drift registries and 1 without drift.

Rules compared on each snapshot:

* OLD: ``profiles/htg108.yaml`` with ``design.false_alarm_budget`` removed,
  ``design.arl0: 2000``, and only the methods the OLD engine had (no ``tte_cusum``). An alarm is any signal with category safety, direction up, for
  cement_leak or new_fracture (any method), detectable on ``detail["detectable_on"]``
  (CUSUMs) or else its signal date. Signals become e-mail episodes per (site, metric): a new
  episode starts when the previous alarm of that pair is more than 365 days earlier.
* NEW: the bundled profile; e-mails are ``level_episodes`` with level alarm, direction up,
  metric cement_leak or new_fracture, sent on their ``start``. Watch = level watch.
* Reference: per planted drift, one Bernoulli CUSUM on the drifting site's units of that
  metric, flat p0 = the profile baseline, designed for the TRUE odds ratio, with
  ARL0 = the site's units a year / r, where r is the NEW rules' measured false e-mails
  per site-year for that metric (0.015 when the NEW rules are not available or sent none):
  the same per-site false-alarm rate. It sees the same information as the NEW charts: for
  30-day outcomes the units in the order their outcomes became known (detected on the
  crossing outcome's day); for the 365-day new-fracture proportion, the mature units in
  index order (detected when the crossing unit's year has closed).

For every system the delay is from the onset to the first e-mail episode that starts on or
after the onset (an episode that began before it was a false alarm); a drift not detected
by the end of the data counts as an infinite delay, so a median is reported only when more
than half of the drifts were detected.

False e-mails count in-control (site, metric) pairs only: the drifting site's drifting
metric is excluded (for a cement_leak drift also its symptomatic_cement_leak). The main
figure covers cement_leak + new_fracture (the sum of the two per-metric rates); the
"all alarm metrics" figure adds symptomatic_cement_leak and major_event (every alarm metric
except sentinel_event and mdt_discussion); "+ sentinel" adds the sentinel_event e-mails for
context (each is a real death, paralysis or cord compression, not a false alarm).

One deviation from "signal date when there is no ``detectable_on``": a p-chart signal is
dated at its quarter's end but can only be seen once that quarter's outcome windows have
closed, so its window is added (30 days for cement_leak, 365 for new_fracture); otherwise
a fracture p-chart would be credited with e-mails a year before its data existed.

Backfill: one more registry, 60 sites, 2021-01-01..2024-12-31, 2 drifts. OLD: every active
signal of category safety or under_reporting made an e-mail on the first alert sync, so the
number of distinct (site, metric, direction) with a signal. NEW: the e-mails of the real
first sync, ``first_sync_plan`` from :mod:`pipelines.alerts.lifecycle` on the run's
signals, levels and episodes stored in a throw-away SQLite warehouse (current alarms,
sentinel events and alarms, process alerts, the watch digest and the history digest); "per
the level rules" (current alarm and under_reporting episodes plus one digest) only when the
alert package cannot be imported.

Targets (each printed PASS or MISS; a benchmark reports, it does not gate): NEW false
e-mails <= 3 per 100 site-years; NEW median delay within 15 % of the reference for every
cell the reference detects in a majority of runs; cement_leak at 150-250 a year: OR 3 median
<= 120 days, OR 2 <= 300 days; new_fracture OR 2.5 median <= 250 days; first watch for
cement_leak OR 2 at 150-250 a year: median <= 180 days; backfill e-mails <= 1 + the alarm
and under-reporting episodes current at as_of.

Run: ``.venv/bin/python benchmarks/bench_alert_precision.py [--quick] [--seeds N]
[--null-seeds N] [--jobs N]`` (full run about 4 minutes on 2 cores, ``--quick`` under
a minute; exits 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.simulate import Drift, simulate_snapshot  # noqa: E402
from pipelines.surveillance.arl import threshold_for_arl  # noqa: E402
from pipelines.surveillance.cusum import grouped_cusum  # noqa: E402
from pipelines.surveillance.engine import INFORMATION_ORDER_MAX_WINDOW, compute  # noqa: E402
from pipelines.surveillance.outcomes import day_number, derive_outcomes  # noqa: E402
from pipelines.surveillance.profile import Profile, load_profile, parse_profile  # noqa: E402

PROFILE_PATH = REPO / "profiles" / "htg108.yaml"
SITES = 60
START, END = date(2022, 1, 1), date(2024, 12, 31)
YEARS = ((END - START).days + 1) / 365.25
BACKFILL_START = date(2021, 1, 1)
ONSET_FIRST, ONSET_LAST = date(2022, 10, 1), date(2023, 12, 31)
ELIGIBLE = (50.0, 400.0)  # procedures a year of a site that may drift
BAND = (150.0, 250.0)  # the volume band of the delay targets
MAIN_METRICS = ("cement_leak", "new_fracture")
# Every alarm metric except sentinel_event and mdt_discussion.
ALL_ALARM_METRICS = (*MAIN_METRICS, "symptomatic_cement_leak", "major_event")
# Sentinel events are reported too, for context (each one is a real event, never "false").
RATE_METRICS = (*ALL_ALARM_METRICS, "sentinel_event")
# Which metrics a drift raises (a symptomatic leak is a leak).
AFFECTED = {"cement_leak": ("cement_leak", "symptomatic_cement_leak"),
            "new_fracture": ("new_fracture",)}
CELLS = (("cement_leak", 1.5), ("cement_leak", 2.0), ("cement_leak", 3.0),
         ("new_fracture", 1.5), ("new_fracture", 2.0), ("new_fracture", 2.5),
         ("new_fracture", 3.0))
# The methods of the OLD engine (profile 1.0.0).
OLD_METHODS = ("bernoulli_cusum", "ra_cusum", "funnel", "pchart", "rare", "sentinel", "process")
EPISODE_GAP_DAYS = 365  # OLD rules: a new e-mail when the previous alarm is older than this
FALLBACK_RATE = 0.015  # false e-mails per site-year for the reference when unmeasured
BASE_SEED = 20_250_108
NULL_SEED_BASE = 20_259_000
BACKFILL_SEED = 20_258_000

TARGET_FALSE_PER_100 = 3.0
TARGET_REFERENCE_RATIO = 1.15
TARGET_LEAK_BAND = {3.0: 120.0, 2.0: 300.0}
TARGET_FRACTURE_25 = 250.0
TARGET_WATCH_LEAK2_BAND = 180.0
NOT_AVAILABLE = "NEW rules: not available (engine has no level_episodes)"


# --- profiles ----------------------------------------------------------------------------


def legacy_profile() -> Profile:
    """Return the OLD rules: the bundled profile without the false-alarm budget, ARL0 2,000.

    Methods the OLD engine did not have (``tte_cusum``) are dropped too: without a budget
    every chart alarms, so keeping them would add alarms the OLD rules never sent.
    """
    data = yaml.safe_load(PROFILE_PATH.read_text(encoding="utf-8"))
    data["design"].pop("false_alarm_budget", None)
    data["design"]["arl0"] = 2000
    for metric in data["metrics"]:
        methods = metric.get("methods") or []
        metric["methods"] = [m for m in methods if m in OLD_METHODS]
        alarm = metric.get("alarm")
        if isinstance(alarm, dict) and alarm.get("method") not in metric["methods"]:
            metric.pop("alarm")
    return parse_profile(data, origin="legacy")


def new_profile() -> Profile:
    return load_profile(PROFILE_PATH)


# --- the registries ----------------------------------------------------------------------


def _volumes(profile: Profile, seed: int, start: date, end: date) -> dict[str, float]:
    """Return each site's annual volume for a seed (volumes do not depend on drifts)."""
    _, info = simulate_snapshot(profile, sites=SITES, start=start, end=end, seed=seed,
                                as_of=start - timedelta(days=1))
    return info["annual_volume"]


def _plant(seed: int, volumes: dict[str, float], cells, band: bool) -> list[Drift]:
    """Draw distinct drifting sites (in the band or the eligible range) and onsets."""
    low, high = BAND if band else ELIGIBLE
    pool = sorted(site for site, v in volumes.items() if low <= v <= high)
    rng = np.random.default_rng([BASE_SEED, seed])
    sites = rng.choice(pool, size=len(cells), replace=False)
    span = (ONSET_LAST - ONSET_FIRST).days
    onsets = rng.integers(0, span + 1, size=len(cells))
    return [Drift(str(site), metric, float(odds_ratio), ONSET_FIRST + timedelta(days=int(d)))
            for site, (metric, odds_ratio), d in zip(sites, cells, onsets, strict=True)]


def design_registries(n_drift: int, n_null: int) -> list[dict]:
    """Return the registries to run; drift registries get their seed and drifts in the worker.

    Drifting sites depend on the site volumes, which need a simulation, so the choice is
    made by :func:`plant_drifts` inside the worker process, in parallel.
    """
    tasks = [{"seed": BASE_SEED + index, "start": START, "end": END, "drifts": None,
              "cells": CELLS, "band_design": index % 2 == 0, "kind": "drift"}
             for index in range(n_drift)]
    tasks += [{"seed": NULL_SEED_BASE + index, "start": START, "end": END, "drifts": [],
               "band_design": False, "kind": "null"} for index in range(n_null)]
    return tasks


def backfill_registry() -> dict:
    return {"seed": BACKFILL_SEED, "start": BACKFILL_START, "end": END, "drifts": None,
            "cells": (("cement_leak", 2.0), ("new_fracture", 2.0)), "band_design": False,
            "kind": "backfill"}


def plant_drifts(task: dict, profile: Profile) -> dict:
    """Fix a drift registry's seed and drifts (band registries: a seed with 7 band sites)."""
    if task["drifts"] is not None:
        return task
    candidate = task["seed"]
    while True:
        volumes = _volumes(profile, candidate, task["start"], task["end"])
        in_band = sum(BAND[0] <= v <= BAND[1] for v in volumes.values())
        if not task["band_design"] or in_band >= len(task["cells"]):
            break
        candidate += 100_000
    drifts = _plant(candidate, volumes, task["cells"], task["band_design"])
    return {**task, "seed": candidate, "drifts": drifts}


# --- one registry (runs in a worker process) ---------------------------------------------


def _detectable_day(row: dict, profile: Profile) -> int:
    """Return the day a signal could first be e-mailed.

    CUSUMs carry ``detectable_on``; funnels and the rare test are dated at the evaluation
    that saw them (their units are mature by then). A p-chart signal is dated at the end of
    its quarter, but the quarter is only charted once its last unit's window has closed, so
    its window is added (a year for new_fracture).
    """
    detail = json.loads(row["detail"]) if isinstance(row["detail"], str) else row["detail"]
    when = detail.get("detectable_on") if detail else None
    if when:
        return day_number(date.fromisoformat(str(when)[:10]))
    day = day_number(row["signal_date"])
    if row["method"] == "pchart":
        day += int(profile.metric(row["metric"]).window_days or 0)
    return day


def _as_day(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = date.fromisoformat(value[:10])
    return day_number(value)


def _first_sync_count(work, episodes, snapshot, profile) -> tuple[int, str] | None:
    """Return the e-mails the real first alert sync sends on this registry's monitor output.

    The run's signals, levels (``chart_status``) and level episodes are stored, as the
    monitor stores them, in a throw-away SQLite warehouse, and
    :func:`pipelines.alerts.lifecycle.first_sync_plan` (what ``sync_alerts`` would raise,
    without writing) is asked with a recipient for every kind and SMTP configured.
    ``episodes`` is the computation's own level episodes (``work.level_episodes``).
    None when the alert package cannot be imported here.
    """
    import tempfile

    try:
        from pipelines.alerts import lifecycle
        from pipelines.db import open_warehouse
        from pipelines.schema import chart_status, level_episode, signal
        from pipelines.settings import load_settings
        from pipelines.surveillance import levels
        from pipelines.surveillance.engine import SIGNAL_FIELDS, replace_rows
        from pipelines.surveillance.runs import MonitorResult
    except Exception:  # the alert package itself is not importable here
        return None
    run_key = "bench-backfill"
    as_of = snapshot.as_of
    rows = work.builder.sorted_rows()
    for row in rows:
        row.update(active=True, first_seen_run=run_key, last_seen_run=run_key)
    result = MonitorResult(
        run_key=run_key, as_of=as_of, profile_name=profile.name,
        profile_version=profile.version, data_fingerprint=run_key, signals=rows,
        site_metrics=[work.site_metrics[k] for k in sorted(work.site_metrics)],
        level_episodes=[{"site_id": e["site_id"], "metric": e["metric"],
                         "direction": e["direction"], "level": e["level"],
                         "start_date": e["start"], "last_date": e["last"],
                         "end_date": e["end"], "signals": e["signals"]} for e in episodes])
    constants = {"profile_name": profile.name, "run_key": run_key, "as_of": as_of,
                 "profile_version": profile.version}
    with tempfile.TemporaryDirectory(prefix="kw_alertsfix_") as tmp:
        url = f"sqlite:///{tmp}/warehouse.db"
        engine = open_warehouse(url, migrate=True)
        try:
            with engine.begin() as conn:
                if rows:
                    conn.execute(signal.insert(), [{f: r[f] for f in SIGNAL_FIELDS} for r in rows])
                replace_rows(conn, chart_status, levels.status_rows(result, profile), constants)
                replace_rows(conn, level_episode, result.level_episodes, constants)
        finally:
            engine.dispose()
        settings = load_settings({
            "KYPHOWATCH_DEMO": "1", "KYPHOWATCH_REPORT_DIR": tmp,
            "KYPHOWATCH_SMTP_URL": "smtp://127.0.0.1:25",
            "KYPHOWATCH_ALERT_RECIPIENTS_SAFETY": "safety@example.org",
            "KYPHOWATCH_ALERT_RECIPIENTS_DATA": "data@example.org",
        }, db_url=url)
        plan = lifecycle.first_sync_plan(settings, as_of, profile=profile)
    kinds: dict[str, int] = {}
    for item in plan["alerts"]:
        if item["dedupe_key"] in plan["emails"]:
            head = item["dedupe_key"].split(":")[0]
            head = "history digest" if item["dedupe_key"].startswith("digest:history") else (
                "watch digest" if head == "digest" else head)
            kinds[head] = kinds.get(head, 0) + 1
    detail = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    return len(plan["emails"]), f"per lifecycle.first_sync_plan ({detail})"


def run_registry(task: dict) -> dict:
    """Simulate one registry, run both rule sets, and return what the analysis needs."""
    started = time.perf_counter()
    old, new = legacy_profile(), new_profile()
    task = plant_drifts(task, new)
    snapshot, info = simulate_snapshot(new, sites=SITES, start=task["start"], end=task["end"],
                                       seed=task["seed"], drifts=task["drifts"])
    old_work = compute(old, snapshot)
    old_signals = [
        (row["site_id"], row["metric"], row["method"], row["direction"], row["category"],
         _detectable_day(row, old))
        for row in old_work.builder.sorted_rows()
    ]
    new_work = compute(new, snapshot)
    raw = getattr(new_work, "level_episodes", None)
    episodes = None
    if raw is not None:
        episodes = [(str(e["site_id"]), str(e["metric"]), str(e["direction"]), str(e["level"]),
                     _as_day(e["start"]), _as_day(e.get("end"))) for e in raw]
    result = {"task": task, "volumes": info["annual_volume"], "old_signals": old_signals,
              "episodes": episodes, "as_of_day": snapshot.as_of_day}
    # The reference chart needs each drifting site's mature units of the drifting metric.
    series = []
    for drift in task["drifts"]:
        metric = old.metric(drift.metric)
        window = int(metric.window_days)
        if window <= INFORMATION_ORDER_MAX_WINDOW:
            # The same information the NEW charts use: outcomes in the order they became
            # known (an event on its day, an event-free case when its window closed).
            units = derive_outcomes(snapshot, metric, include_immature=True)
            mine = units.loc[units["site_id"].astype(str) == drift.site_id]
            index = mine["index_day"].to_numpy(np.int64)
            event = mine["event_day"].to_numpy(np.int64)
            seen = (index + window <= snapshot.as_of_day) | (event >= 0)
            y = mine["y"].to_numpy(np.int8)[seen]
            known = np.where(y == 1, event[seen], index[seen] + window)
            order = np.argsort(known, kind="stable")
            series.append({"index_day": known[order], "y": y[order], "lag": 0})
        else:
            units = derive_outcomes(snapshot, metric)
            mine = units.loc[units["site_id"].astype(str) == drift.site_id]
            series.append({"index_day": mine["index_day"].to_numpy(np.int64),
                           "y": mine["y"].to_numpy(np.int8), "lag": window})
    result["series"] = series
    if task["kind"] == "backfill":
        result["first_sync"] = (_first_sync_count(new_work, raw, snapshot, new)
                                if raw is not None else None)
    result["seconds"] = time.perf_counter() - started
    return result


# --- analysis ----------------------------------------------------------------------------


def old_email_starts(signals) -> dict[tuple[str, str], list[int]]:
    """Return e-mail episode start days per (site, metric) under the OLD rules.

    Every metric with an upward safety signal is included (sentinel_event too); the callers
    pick the metrics they count.
    """
    alarms: dict[tuple[str, str], list[int]] = defaultdict(list)
    for site, metric, _method, direction, category, day in signals:
        if category == "safety" and direction == "up":
            alarms[(site, metric)].append(day)
    starts = {}
    for key, days in alarms.items():
        days = sorted(days)
        first = [days[0]] + [b for a, b in zip(days, days[1:], strict=False)
                             if b - a > EPISODE_GAP_DAYS]
        starts[key] = first
    return starts


def new_email_starts(episodes, level="alarm") -> dict[tuple[str, str], list[int]]:
    """Return episode start days per (site, metric) for one level (direction up)."""
    starts: dict[tuple[str, str], list[int]] = defaultdict(list)
    for site, metric, direction, ep_level, start, _end in episodes:
        if ep_level == level and direction == "up":
            starts[(site, metric)].append(start)
    return {key: sorted(days) for key, days in starts.items()}


def first_on_or_after(days: list[int] | None, onset: int) -> int | None:
    for day in days or ():
        if day >= onset:
            return day
    return None


def false_alarm_rates(results, starts_of) -> dict:
    """Return false e-mails and site-years per metric, and the share of sites ever alarmed."""
    emails: dict[str, int] = defaultdict(int)
    site_years: dict[str, float] = defaultdict(float)
    alarmed_sites = 0
    n_sites = 0
    for result in results:
        starts = starts_of(result)
        drifting = {(d.site_id, m) for d in result["task"]["drifts"] for m in AFFECTED[d.metric]}
        years = (result["as_of_day"] - day_number(result["task"]["start"]) + 1) / 365.25
        for site in result["volumes"]:
            n_sites += 1
            any_false = False
            for metric in RATE_METRICS:
                if (site, metric) in drifting:
                    continue
                site_years[metric] += years
                count = len(starts.get((site, metric), ()))
                emails[metric] += count
                any_false |= count > 0 and metric in ALL_ALARM_METRICS
            alarmed_sites += any_false
    per_100 = {m: 100.0 * emails[m] / site_years[m] for m in RATE_METRICS}
    return {"emails": dict(emails), "site_years": dict(site_years), "per_100": per_100,
            "main": sum(per_100[m] for m in MAIN_METRICS),
            "all": sum(per_100[m] for m in ALL_ALARM_METRICS),
            "with_sentinel": sum(per_100.values()),
            "share_sites": alarmed_sites / max(n_sites, 1)}


def median_delay(delays: list[float]) -> float:
    return float(np.median(np.asarray(delays, float))) if delays else float("inf")


def detected_share(delays: list[float]) -> float:
    return float(np.mean(np.isfinite(delays))) if delays else float("nan")


def fmt_days(value: float) -> str:
    return f"{value:.0f}" if np.isfinite(value) else "n/d"


_threshold_cache: dict[tuple[float, float, float], float] = {}


def reference_delay(job: tuple) -> float:
    """Delay of a Bernoulli CUSUM designed for the true odds ratio at the matched rate.

    ``job`` = (chart days and outcomes of the drifting site's units, true odds ratio,
    onset day, window days, baseline p0, false e-mails per site-year r, as_of day, first
    day of the data, lag). ARL0 = units a year / r. For short windows the units come in the
    order their outcomes became known, as the NEW charts see them (lag 0: a crossing is seen
    on its day); otherwise in index order, seen when the crossing unit's window closed (lag =
    window). The first detection on or after the onset counts.
    """
    index_day, y, odds_ratio, onset, window, p0, rate, as_of_day, start_day, lag = job
    mature_years = max((as_of_day - window - start_day + 1) / 365.25, 1e-9)
    units_per_year = len(index_day) / mature_years
    if not len(index_day):
        return float("inf")
    arl0 = float(f"{max(units_per_year / rate, 2.0):.3g}")
    key = (round(p0, 12), float(odds_ratio), arl0)
    if key not in _threshold_cache:
        _threshold_cache[key] = float(threshold_for_arl(p0, odds_ratio, arl0, "up"))
    result = grouped_cusum(np.zeros(len(y), np.int64), y.astype(np.int64), p0, odds_ratio,
                           _threshold_cache[key], n_groups=1)
    known = index_day[result.signal_rows] + lag
    after = known[known >= onset]
    return float(after[0] - onset) if after.size else float("inf")


def analyse(results: list[dict], profile: Profile, mapper=map) -> dict:
    """Turn the registry results into the figures the report prints.

    ``mapper`` runs the reference charts (a process pool's ``map`` in parallel).
    """
    available = all(r["episodes"] is not None for r in results)
    old = false_alarm_rates(results, lambda r: old_email_starts(r["old_signals"]))
    new = false_alarm_rates(results, lambda r: new_email_starts(r["episodes"])) if available else None
    rates = {}
    for metric in MAIN_METRICS:
        measured = new["emails"].get(metric, 0) / new["site_years"][metric] if new else 0.0
        rates[metric] = (measured, "NEW rules") if measured > 0 else (
            FALLBACK_RATE, "fallback" if new is None else "fallback (NEW sent none)")
    drifts, jobs = [], []
    for result in results:
        if result["task"]["kind"] != "drift":
            continue
        old_starts = old_email_starts(result["old_signals"])
        new_starts = new_email_starts(result["episodes"]) if available else {}
        watch_starts = new_email_starts(result["episodes"], "watch") if available else {}
        start_day = day_number(result["task"]["start"])
        for drift, series in zip(result["task"]["drifts"], result["series"], strict=True):
            onset = day_number(drift.from_date)
            key = (drift.site_id, drift.metric)

            def delay(first, onset=onset):
                return float(first - onset) if first is not None else float("inf")

            volume = result["volumes"][drift.site_id]
            drifts.append({
                "metric": drift.metric, "odds_ratio": drift.odds_ratio, "volume": volume,
                "in_band": BAND[0] <= volume <= BAND[1],
                "old": delay(first_on_or_after(old_starts.get(key), onset)),
                "new": delay(first_on_or_after(new_starts.get(key), onset)) if available
                else float("nan"),
                "watch": delay(first_on_or_after(watch_starts.get(key), onset)) if available
                else float("nan"),
            })
            metric = profile.metric(drift.metric)
            jobs.append((series["index_day"], series["y"], drift.odds_ratio, onset,
                         int(metric.window_days), float(metric.baseline.rate),
                         rates[drift.metric][0], result["as_of_day"], start_day,
                         int(series.get("lag", metric.window_days))))
    # Same designs together, so each process solves a threshold once.
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i][5], jobs[i][2], len(jobs[i][0])))
    delays = list(mapper(reference_delay, [jobs[i] for i in order]))
    for i, value in zip(order, delays, strict=True):
        drifts[i]["reference"] = value
    return {"available": available, "old": old, "new": new, "rates": rates, "drifts": drifts}


def backfill_figures(result: dict) -> dict:
    """E-mails on the first alert sync of a backfill, OLD and NEW."""
    old = len({(site, metric, direction)
               for site, metric, _method, direction, category, _day in result["old_signals"]
               if category in ("safety", "under_reporting")})
    out = {"old": old, "new": None, "current": None, "how": None}
    episodes = result["episodes"]
    if episodes is None:
        return out
    current = [e for e in episodes if e[3] in ("alarm", "under_reporting") and e[5] is None]
    out["current"] = len(current)
    if result.get("first_sync") is not None:
        out["new"], out["how"] = result["first_sync"]
    else:
        digest = 1 if len(episodes) > len(current) else 0
        out["new"], out["how"] = len(current) + digest, "per the level rules"
    return out


# --- printing ----------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_report(figures: dict, backfill: dict, n_drift: int, n_null: int) -> None:
    available = figures["available"]
    old, new = figures["old"], figures["new"]
    print("\nfalse safety e-mails per 100 site-years (in-control site x metric pairs)")
    header = (f"{'rules':6} {'cement_leak':>12} {'new_fracture':>13} {'leak+fracture':>14}"
              f" {'all alarm metrics':>18} {'+ sentinel':>11} {'sites ever at alarm':>20}")
    print(header)
    print("-" * len(header))
    rows = [("OLD", old)] + ([("NEW", new)] if available else [])
    for name, f in rows:
        print(f"{name:6} {f['per_100']['cement_leak']:12.2f} {f['per_100']['new_fracture']:13.2f}"
              f" {f['main']:14.2f} {f['all']:18.2f} {f['with_sentinel']:11.2f}"
              f" {f['share_sites']:19.1%}")
    print(f"  (all alarm metrics adds symptomatic_cement_leak "
          f"{old['per_100']['symptomatic_cement_leak']:.2f} and major_event "
          f"{old['per_100']['major_event']:.2f} under OLD"
          + (f"; {new['per_100']['symptomatic_cement_leak']:.2f} and "
             f"{new['per_100']['major_event']:.2f} under NEW" if available else "")
          + f"; OLD sent {old['emails']['cement_leak']} leak and "
          f"{old['emails']['new_fracture']} fracture e-mails over "
          f"{old['site_years']['cement_leak']:.0f} and {old['site_years']['new_fracture']:.0f}"
          " in-control site-years. '+ sentinel' adds sentinel_event e-mails, real events that"
          " are never false; 'sites ever at alarm': share of site registries with a false"
          " e-mail on any alarm metric)")
    if not available:
        print(NOT_AVAILABLE)
    print("reference false-alarm rate r (per site-year): " + ", ".join(
        f"{m} {rate:.4f} ({how})" for m, (rate, how) in figures["rates"].items()))

    print("\ndetection within the data and median days from onset to the first alarm e-mail")
    header = (f"{'metric':13} {'OR':>4} {'volume':>8} {'n':>3} | {'OLD det':>7} {'days':>5} |"
              f" {'NEW det':>7} {'days':>5} | {'REF det':>7} {'days':>5} | {'NEW/REF':>7}")
    print(header)
    print("-" * len(header))
    drifts = figures["drifts"]
    cells = {}
    for band_only in (False, True):
        for metric, odds_ratio in CELLS:
            chosen = [d for d in drifts if d["metric"] == metric and d["odds_ratio"] == odds_ratio
                      and (d["in_band"] or not band_only)]
            if not chosen:
                continue
            cell = {s: [d[s] for d in chosen] for s in ("old", "new", "reference", "watch")}
            cells[(metric, odds_ratio, band_only)] = cell
            med = {s: median_delay(v) for s, v in cell.items()}
            ratio = med["new"] / med["reference"] if available and np.isfinite(
                med["new"]) and np.isfinite(med["reference"]) and med["reference"] > 0 else None
            new_det = f"{detected_share(cell['new']):7.0%}" if available else f"{'n/a':>7}"
            new_days = fmt_days(med["new"]) if available else "n/a"
            print(f"{metric:13} {odds_ratio:4g} {'150-250' if band_only else '50-400':>8}"
                  f" {len(chosen):3d} | {detected_share(cell['old']):7.0%}"
                  f" {fmt_days(med['old']):>5} | {new_det} {new_days:>5} |"
                  f" {detected_share(cell['reference']):7.0%} {fmt_days(med['reference']):>5} |"
                  f" {(f'{ratio:.2f}' if ratio is not None else '-'):>7}")
    print("  (n/d: half or more of the drifts were not detected by the end of the data;"
          " volume = procedures a year of the drifting site)")

    if available:
        band = cells.get(("cement_leak", 2.0, True))
        whole = cells.get(("cement_leak", 2.0, False))
        print("\nwatch (NEW rules): median days from onset to the first watch episode,"
              " cement_leak OR 2: "
              f"150-250/yr {fmt_days(median_delay(band['watch'])) if band else 'n/a'}"
              f" (n {len(band['watch']) if band else 0}, detected "
              f"{detected_share(band['watch']) if band else float('nan'):.0%}); 50-400/yr "
              f"{fmt_days(median_delay(whole['watch'])) if whole else 'n/a'}"
              f" (n {len(whole['watch']) if whole else 0})")
    else:
        print("\nwatch: " + NOT_AVAILABLE)

    print(f"\nbackfill (60 sites, {BACKFILL_START}..{END}, 2 drifts), e-mails sent by the first"
          f" alert sync: OLD {backfill['old']} (one per (site, metric, direction) with an"
          " active safety or under-reporting signal); NEW "
          + (f"{backfill['new']} {backfill['how']} ({backfill['current']} alarm/under-reporting"
             " episodes current at as_of)" if backfill["new"] is not None
             else "not available (engine has no level_episodes)"))

    print(f"\ntargets ({n_drift} drift registries, {n_null} without drift)")

    def line(ok: bool | None, text: str) -> None:
        """Print a verdict; None (the NEW rules are not available) is a MISS."""
        print(f"{'MISS' if ok is None else verdict(ok)}  {text}")

    if available:
        line(new["main"] <= TARGET_FALSE_PER_100,
             f"false safety e-mails NEW {new['main']:.2f} per 100 site-years (target <= "
             f"{TARGET_FALSE_PER_100:g}; OLD {old['main']:.2f})")
    else:
        line(None, f"false safety e-mails NEW: not available (target <= {TARGET_FALSE_PER_100:g};"
                   f" OLD {old['main']:.2f})")
    ratios = []
    for (metric, odds_ratio, band_only), cell in cells.items():
        if band_only or detected_share(cell["reference"]) <= 0.5:
            continue
        ref = median_delay(cell["reference"])
        new_median = median_delay(cell["new"]) if available else float("inf")
        ratios.append((new_median / ref if ref > 0 else float("inf"), metric, odds_ratio))
    if available and ratios:
        worst = max(ratios)
        line(worst[0] <= TARGET_REFERENCE_RATIO,
             f"NEW median delay / reference, worst over the {len(ratios)} cells the reference "
             f"detects in most runs: {worst[0]:.2f} ({worst[1]} OR {worst[2]:g}; target <= "
             f"{TARGET_REFERENCE_RATIO:g})")
    else:
        line(None, "NEW median delay within 15 % of the reference: "
             + ("not available" if not available else "no cell the reference detects in most runs"))
    for odds_ratio, target in sorted(TARGET_LEAK_BAND.items(), reverse=True):
        cell = cells.get(("cement_leak", odds_ratio, True))
        old_median = fmt_days(median_delay(cell["old"])) if cell else "n/a"
        if available and cell:
            value = median_delay(cell["new"])
            line(value <= target, f"cement_leak OR {odds_ratio:g} at 150-250/yr: NEW median "
                 f"{fmt_days(value)} days (n {len(cell['new'])}; target <= {target:g}; OLD "
                 f"{old_median})")
        else:
            line(None, f"cement_leak OR {odds_ratio:g} at 150-250/yr: NEW not available "
                 f"(target <= {target:g}; OLD {old_median})")
    cell = cells.get(("new_fracture", 2.5, False))
    old_median = fmt_days(median_delay(cell["old"])) if cell else "n/a"
    if available and cell:
        value = median_delay(cell["new"])
        line(value <= TARGET_FRACTURE_25, f"new_fracture OR 2.5: NEW median {fmt_days(value)}"
             f" days (target <= {TARGET_FRACTURE_25:g}; OLD {old_median}, reference "
             f"{fmt_days(median_delay(cell['reference']))})")
    else:
        line(None, f"new_fracture OR 2.5: NEW not available (target <= {TARGET_FRACTURE_25:g};"
             f" OLD {old_median})")
    cell = cells.get(("cement_leak", 2.0, True))
    if available and cell:
        value = median_delay(cell["watch"])
        line(value <= TARGET_WATCH_LEAK2_BAND, f"first watch, cement_leak OR 2 at 150-250/yr: "
             f"median {fmt_days(value)} days (target <= {TARGET_WATCH_LEAK2_BAND:g})")
    else:
        line(None, f"first watch, cement_leak OR 2 at 150-250/yr: NEW not available (target <="
             f" {TARGET_WATCH_LEAK2_BAND:g})")
    if backfill["new"] is not None:
        line(backfill["new"] <= 1 + backfill["current"],
             f"backfill first sync: NEW {backfill['new']} e-mails {backfill['how']} (target <= 1 +"
             f" {backfill['current']} current alarm/under-reporting episodes; OLD "
             f"{backfill['old']})")
    else:
        line(None, f"backfill first sync: NEW not available (OLD {backfill['old']} e-mails)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="4 drift registries and 1 without drift (development)")
    parser.add_argument("--seeds", type=int, help="drift registries (default 20; quick 4)")
    parser.add_argument("--null-seeds", type=int,
                        help="registries without drift (default 5; quick 1)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes (default: up to 2)")
    args = parser.parse_args()
    n_drift = args.seeds if args.seeds is not None else (4 if args.quick else 20)
    n_null = args.null_seeds if args.null_seeds is not None else (1 if args.quick else 5)
    if n_drift < 1 or n_null < 0 or args.jobs < 1:
        parser.error("--seeds must be at least 1, --null-seeds and --jobs not negative")
    started = time.perf_counter()
    print("kyphowatch alert precision benchmark")
    print(f"{n_drift} registries with {len(CELLS)} drifts each + {n_null} without drift; "
          f"{SITES} sites, {START}..{END} ({YEARS:.2f} years), as of the end; drifting sites of "
          f"{ELIGIBLE[0]:g}-{ELIGIBLE[1]:g} procedures a year (every other registry "
          f"{BAND[0]:g}-{BAND[1]:g}); onsets {ONSET_FIRST}..{ONSET_LAST}")
    # The backfill registry (4 years, the longest) goes first so it does not straggle.
    tasks = [backfill_registry()] + design_registries(n_drift, n_null)
    pool = ProcessPoolExecutor(max_workers=args.jobs) if args.jobs > 1 else None
    try:
        results = list(pool.map(run_registry, tasks)) if pool else [
            run_registry(task) for task in tasks]
        evaluated = time.perf_counter()
        backfill_result = results.pop(0)
        figures = analyse(results, legacy_profile(),
                          (lambda fn, items: pool.map(fn, items, chunksize=4)) if pool else map)
    finally:
        if pool:
            pool.shutdown()
    backfill = backfill_figures(backfill_result)
    work = sum(r["seconds"] for r in results) + backfill_result["seconds"]
    print(f"{len(tasks)} registries: simulation and both rule sets {evaluated - started:.0f} s"
          f" ({work:.0f} s of work in {args.jobs} process(es)),"
          f" reference charts and analysis {time.perf_counter() - evaluated:.0f} s;"
          f" {sum(len(r['series']) for r in results)} drifts")
    print_report(figures, backfill, n_drift, n_null)
    print(f"\nruntime {time.perf_counter() - started:.1f} s")
    return 0  # a benchmark reports, it does not gate (benchmarks/README.md)


if __name__ == "__main__":
    raise SystemExit(main())
