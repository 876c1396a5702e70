"""Profile the 1M validated load step by step: main thread, writer thread, GX helper, server.

Loads the benchmark's 1M procedures file and then its complications file (the cached files
of ``bench_ingest.py``) into a fresh PostgreSQL database, each file in its own child process
as the benchmark does, with timers (wall and the calling thread's CPU) around the loader's
steps; no tracing profiler (it taxes every C call and misleads, see benchmarks/README.md).
Per file it prints: each step's wall and thread CPU (summed over calls), the main thread's
and the writer thread's total CPU, the GX helper's CPU (the child's rusage with its waited-for
children, minus the child's own), and the server backends' CPU from ``/proc``.

Run: ``.venv/bin/python benchmarks/profile_ingest.py [--code DIR] [--json]``; ``--code`` names
another checkout whose ``pipelines`` is profiled (an old commit exported with ``git archive``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


def _instrument(load, steps: dict) -> None:
    """Wrap the loader's steps with wall and thread-CPU timers (summed per step name)."""
    import functools
    import threading

    def timed(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                entry = steps[f"{threading.current_thread().name}: {name}"]
                entry[0] += time.perf_counter() - wall
                entry[1] += time.thread_time() - cpu

        return wrapper

    def timed_iter(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            iterator = function(*args, **kwargs)
            entry = steps[f"MainThread: {name}"]
            while True:
                wall, cpu = time.perf_counter(), time.thread_time()
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                finally:
                    entry[0] += time.perf_counter() - wall
                    entry[1] += time.thread_time() - cpu
                yield item

        return wrapper

    load.iter_chunks = timed_iter("read (iter_chunks)", load.iter_chunks)
    for name in (
        "validate_chunk",
        "_prepare_valid",
        "_write_stage",
        "_check_whole_file",
        "_analyze",
        "_verify_audit",
        "promote_pending",
        "_merge_complications",
        "_merge_procedures",
        "_stage_file",
        "_take_direct_duplicates",
    ):
        if hasattr(load, name):
            setattr(load, name, timed(name, getattr(load, name)))
    direct = load._DirectLoad
    for name in ("payload", "copy", "write", "rebuild_indexes"):
        setattr(direct, name, timed(f"direct.{name}", getattr(direct, name)))
    load._Quarantine.add = timed("quarantine.add", load._Quarantine.add)
    load._StageWriter.submit = timed("writer.submit (wait)", load._StageWriter.submit)
    load._StageWriter.close = timed("writer.close (wait)", load._StageWriter.close)
    run = load._StageWriter._run

    def run_and_count(self):
        try:
            run(self)
        finally:
            steps["writer thread total"][1] += time.thread_time()

    load._StageWriter._run = run_and_count


def child(task: dict) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_ingest import BENCH_KEY, BackendCpu  # puts this checkout first on the path

    sys.path.insert(0, task["code"])  # so the profiled code goes before it

    from pipelines.ingest import ingest_paths, load
    from pipelines.settings import load_settings

    assert load.__file__.startswith(task["code"]), load.__file__
    steps: dict = defaultdict(lambda: [0.0, 0.0])
    _instrument(load, steps)
    settings = load_settings(db_url=task["db_url"], pseudonym_key=BENCH_KEY)
    backends = BackendCpu()
    started, cpu0 = time.perf_counter(), time.thread_time()
    report = ingest_paths(settings, [Path(task["path"])])
    seconds = time.perf_counter() - started
    steps["MainThread total"][1] += time.thread_time() - cpu0
    steps["MainThread total"][0] += seconds
    [result] = report.files
    assert result.status == "loaded", result.reason
    times = os.times()
    return {
        "seconds": seconds,
        "server_cpu": backends.total(),
        "process_cpu": times.user + times.system,
        "steps": dict(steps),
        "load": os.getloadavg()[0],
    }


def run_child(task: dict) -> dict:
    process = subprocess.Popen(
        [sys.executable, str(HERE), "--child", json.dumps(task)],
        cwd=task["code"],
        stdout=subprocess.PIPE,
        text=True,
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("profile child failed")
    result = json.loads(output.strip().splitlines()[-1])
    result["client_cpu"] = usage.ru_utime + usage.ru_stime
    result["helper_cpu"] = result["client_cpu"] - result["process_cpu"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--code", default=str(REPO))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_ingest import FreshPostgres, bench_files

    from pipelines.db import make_engine

    files = bench_files()
    results = {}
    with FreshPostgres() as url:
        make_engine(url).dispose()
        for kind in ("procedures", "complications"):
            load_before = os.getloadavg()[0]
            result = run_child(
                {"code": str(Path(args.code).resolve()), "db_url": url, "path": str(files[kind])}
            )
            results[kind] = result
            print(
                f"{kind}: {result['seconds']:.1f} s wall, load {load_before:.2f} -> "
                f"{result['load']:.2f}; client CPU {result['client_cpu']:.1f} s (process "
                f"{result['process_cpu']:.1f}, GX helper {result['helper_cpu']:.1f}); "
                f"server CPU {result['server_cpu']:.1f} s"
            )
            for name, (wall, cpu) in sorted(result["steps"].items()):
                print(f"    {name:45} wall {wall:6.2f}  cpu {cpu:6.2f}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
