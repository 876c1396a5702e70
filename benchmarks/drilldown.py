"""Drill-down commands at network scale: ``kyphowatch sites`` and ``kyphowatch site ID``.

Why: issue 10 asks that both answer in under a second on a 1,000-site warehouse. They read
the stored monitor run (its core and ``facts`` parts) and the small live tables, never the
procedure table, and the command line imports only the module of the command it runs.

How: each command runs as the user runs it, in a fresh interpreter (``python -m
pipelines.cli``), ``RUNS`` times; the median wall time is compared with the target, and the
median CPU time (user + system of the child) is printed beside it, because on a shared
2-core machine wall time also counts the time other jobs held the cores. The floor is a
fresh interpreter that only imports the command line module (start-up that no command can
avoid). Called by ``bench_report.py`` on the warehouse it builds.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 1.0
RUNS = 5


def _run(argv: list[str]) -> tuple[float, float]:
    """Run ``python argv`` in the repository; return (wall seconds, child CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True,
                               text=True, env=dict(os.environ, KYPHOWATCH_DEMO="1"))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {completed.returncode}: "
                           f"{completed.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def time_drilldown(db_url: str, site: str) -> bool:
    """Time ``sites``, ``sites --flagged`` and ``site SITE`` on ``db_url``; print PASS/MISS.

    Returns:
        True when every command's median wall time is within the target.
    """
    load_before = os.getloadavg()[0]
    floor = [_run(["-c", "import pipelines.cli"]) for _ in range(RUNS)]
    floor_wall = statistics.median(w for w, _ in floor)
    print(f"drill-down commands, fresh processes, median of {RUNS} "
          f"(floor: interpreter + 'import pipelines.cli' {floor_wall:.2f} s):")
    ok = True
    for command in (["sites"], ["sites", "--flagged"], ["site", site]):
        timings = [_run(["-m", "pipelines.cli", *command, "--db", db_url])
                   for _ in range(RUNS)]
        wall = statistics.median(w for w, _ in timings)
        cpu = statistics.median(c for _, c in timings)
        verdict = "PASS" if wall < TARGET_SECONDS else "MISS"
        ok = ok and wall < TARGET_SECONDS
        print(f"  kyphowatch {' '.join(command):<16} {wall:.2f} s wall, {cpu:.2f} s CPU, "
              f"{wall / floor_wall:.1f}x the floor (target < {TARGET_SECONDS:g} s: {verdict})")
    # wall time on a shared machine is only comparable at a similar load
    print(f"  load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return ok
