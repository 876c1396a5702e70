"""Cycle benchmark: one nightly cycle (a new day's files) against a full cycle, on PostgreSQL.

Why: issue 10 asks that the nightly cycle -- ingest one new day, run the monitor, publish
the report -- cost at most 10 % of a full cycle (every file loaded, the monitor and the
report from scratch). This script measures both the way production runs them: each step
is a fresh ``kyphowatch`` process (as each Airflow task is), timed by wall clock from
process start to exit (imports included), against its own fresh PostgreSQL database.

* **Registry**: ``kyphowatch simulate`` (``--sites`` 200 at ``--volume-scale`` 7: about
  0.94M procedures, the scale issue 10 is measured at; 2021-01-01..2024-12-31, one file of
  procedures and one of complications), split by date into the history (procedures
  dated up to the day before the last, complications whose event date is up to that day)
  and the new day (the last day's procedures and every complication dated that day,
  including late complications of older procedures, which restate the past).
* **Full cycle** (database A): ``ingest`` of the unsplit files, ``monitor``, ``report``.
  Thresholds are designed once per profile version and stored in the warehouse, so a
  first monitor run designs them (printed, not counted) and the cycle counts a second.
* **Nightly cycle** (database B): the history is ingested, monitored and reported first
  (not timed); then, timed, ``ingest`` of the new day's two files, ``monitor``, ``report``
  into the same report directory.

Target (issue 10), printed PASS or MISS: nightly cycle <= 10 % of the full cycle. Also
printed: each step, and the monitor's own breakdown from its log line.

Run: ``.venv/bin/python benchmarks/bench_cycle.py`` (about 5 minutes on 2 idle cores;
``--sites 60 --volume-scale 1``, a 60-site network of 40k procedures, about 2). Exits 0
unless a step fails.
"""

from __future__ import annotations

import argparse
import csv
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
KYPHOWATCH = str(Path(sys.executable).with_name("kyphowatch"))
PG_ADMIN_URL = os.environ.get("KYPHOWATCH_TEST_PG_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TARGET_SHARE = 0.10
START, END, LAST_HISTORY_DAY = "2021-01-01", "2024-12-31", "2024-12-30"


def _split(source: Path, date_column: str, history: Path, new_day: Path) -> tuple[int, int]:
    """Copy rows dated up to LAST_HISTORY_DAY to ``history`` and later ones to ``new_day``."""
    counts = [0, 0]
    with (source.open(newline="", encoding="utf-8") as src,
          history.open("w", newline="", encoding="utf-8") as old,
          new_day.open("w", newline="", encoding="utf-8") as new):
        reader = csv.reader(src)
        header = next(reader)
        column = header.index(date_column)
        writers = (csv.writer(old, lineterminator="\n"), csv.writer(new, lineterminator="\n"))
        for writer in writers:
            writer.writerow(header)
        for row in reader:
            later = int(row[column] > LAST_HISTORY_DAY)  # ISO dates compare as text
            writers[later].writerow(row)
            counts[later] += 1
    return counts[0], counts[1]


def _step(label: str, args: list[str], env: dict[str, str], steps: list) -> float:
    """Run one ``kyphowatch`` command in a fresh process; record and return its wall time."""
    started = time.perf_counter()
    proc = subprocess.run([KYPHOWATCH, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"bench_cycle: `kyphowatch {args[0]}` exited {proc.returncode}")
    detail = cache = ""
    for line in proc.stderr.splitlines():
        if "monitor " in line and " signals (" in line:
            detail = line.split("monitor ", 1)[1][:110]
        if "snapshot cache: " in line:  # which read ran, and its parts (snapshot_cache.py)
            cache = line.split("snapshot cache: ", 1)[1]
    steps.append((label, seconds, detail + (f"\n{'':50}cache: {cache}" if cache else "")))
    return seconds


def _database(admin: sa.Engine) -> str:
    name = f"kw_cycle_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE DATABASE " + conn.dialect.identifier_preparer.quote(name))
    return name


def main() -> int:
    """Build the registry, time both cycles, print the comparison; 0 unless a step fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=200)
    parser.add_argument("--volume-scale", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=20261206)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kw_cycle_"))
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    databases: list[str] = []
    try:
        registry = work / "registry"
        subprocess.run([KYPHOWATCH, "simulate", "--out", str(registry), "--sites",
                        str(args.sites), "--start", START, "--end", END, "--seed",
                        str(args.seed), "--single-file", "--volume-scale",
                        str(args.volume_scale)], check=True, capture_output=True, cwd=REPO)
        stamp = END.replace("-", "")
        procedures = registry / f"procedures_{stamp}.csv"
        complications = registry / f"complications_{stamp}.csv"
        history, new_day = work / "history", work / "new_day"
        history.mkdir()
        new_day.mkdir()
        old_stamp = LAST_HISTORY_DAY.replace("-", "")
        n_proc = _split(procedures, "procedure_date", history / f"procedures_{old_stamp}.csv",
                        new_day / f"procedures_{stamp}.csv")
        n_comp = _split(complications, "event_date",
                        history / f"complications_{old_stamp}.csv",
                        new_day / f"complications_{stamp}.csv")
        print(f"kyphowatch cycle benchmark: {args.sites} sites, {START}..{END}, "
              f"{sum(n_proc):,} procedures and {sum(n_comp):,} complications; the new day "
              f"holds {n_proc[1]:,} procedures and {n_comp[1]:,} complications "
              f"(load average {os.getloadavg()[0]:.1f})\n", flush=True)

        base_env = {**os.environ, "KYPHOWATCH_PSEUDONYM_KEY": secrets.token_hex(32)}
        base_env.pop("KYPHOWATCH_DEMO", None)

        def env_for(name: str, tag: str) -> dict[str, str]:
            url = sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(
                hide_password=False)
            return {**base_env, "KYPHOWATCH_DB_URL": url,
                    "KYPHOWATCH_REPORT_DIR": str(work / f"reports_{tag}")}

        full_db, nightly_db = _database(admin), _database(admin)
        databases += [full_db, nightly_db]
        steps: list[tuple[str, float, str]] = []
        full_env, nightly_env = env_for(full_db, "full"), env_for(nightly_db, "nightly")

        full = _step("full: ingest", ["ingest", str(procedures), str(complications)],
                     full_env, steps)
        # Thresholds are designed once per profile version and stored in the warehouse; a
        # deployment pays that once, not per cycle. So the first monitor designs them (shown,
        # not counted) and the full cycle counts a second one that reads them.
        _step("full: monitor, designing", ["monitor"], full_env, steps)
        # A full cycle reads everything: the first run's snapshot cache is dropped (the
        # nightly monitor reads through it; snapshot_cache.py). The counted full monitor
        # builds it again, as a first run does.
        full_engine = sa.create_engine(full_env["KYPHOWATCH_DB_URL"])
        with full_engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM snapshot_cache")
        full_engine.dispose()
        full += sum(_step(f"full: {command}", [command], full_env, steps)
                    for command in ("monitor", "report"))

        setup: list = []
        for argv in (["ingest", *(str(p) for p in sorted(history.glob("procedures_*")))],
                     ["ingest", *(str(p) for p in sorted(history.glob("complications_*")))],
                     ["monitor"], ["report"]):
            _step("history (not timed)", argv, nightly_env, setup)
        nightly = sum(_step(f"nightly: {command}", argv, nightly_env, steps)
                      for command, argv in (
            ("ingest", ["ingest", *(str(p) for p in sorted(new_day.glob("procedures_*"))),
                        *(str(p) for p in sorted(new_day.glob("complications_*")))]),
            ("monitor", ["monitor"]), ("report", ["report"])))

        print(f"{'step (fresh process each)':40} {'seconds':>8}  monitor log")
        print("-" * 110)
        for label, seconds, detail in steps:
            note = " (not counted)" if label.endswith("designing") else ""
            print(f"{label + note:40} {seconds:8.2f}  {detail}")
        print("-" * 110)
        share = nightly / full
        verdict = "PASS" if share <= TARGET_SHARE else "MISS"
        print(f"full cycle {full:.1f} s; nightly cycle {nightly:.1f} s = {share:.0%} of the full "
              f"cycle (target <= {TARGET_SHARE:.0%}): {verdict}")
        return 0
    finally:
        with admin.connect() as conn:
            for name in databases:
                conn.exec_driver_sql("DROP DATABASE IF EXISTS "
                                     + conn.dialect.identifier_preparer.quote(name)
                                     + " WITH (FORCE)")
        admin.dispose()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
