"""Benchmark: writing the evidence report against reading the stored monitor run it shows.

Why: the report reads one stored monitor run (``pipelines.surveillance.runs.load_run``) and
never recomputes, so its cost beyond that read is drawing and writing: a page per site with
its charts and their data (short tables inside the page as ``data:`` links, the CUSUM paths
as one CSV per chart for every site; docs/report.md). The baseline, measured in the same
process on the same warehouse, is ``load_run`` of the whole run (every site's chart
series). The ratio write_report / load_run is printed with the reads, the number of charts,
CSV files and in-page tables, and the size on disk.

Three builds are timed: a fresh report with the default number of worker processes (the
figure the target applies to), the same in one process (what the per-page work costs
without parallelism), and a rerun into the fresh report's folder for unchanged data
(pages whose bytes did not change are not rewritten). Those run in the process that
built the warehouse, whose imports (the monitor's pandas and scipy.stats among them) a
report would otherwise pay; so the report is also timed as ``kyphowatch report --out``
in fresh processes, against fresh processes running ``load_run``.

Data: ``kyphowatch simulate --single-file`` for SITES sites over three years (one drifting
site), loaded into a SQLite warehouse (or ``--db``), monitored once (``run_monitor`` stores
the run). Target: report <= 2x reading the stored run (issue 11). Then
``drilldown.time_drilldown`` times ``kyphowatch sites`` and ``site`` on the same warehouse in
fresh processes (issue 10: < 1 s each).

Run: ``.venv/bin/python benchmarks/bench_report.py [--sites N] [--db EMPTY_URL] [--keep DIR]``
(1,000 sites: about 520k procedures; the set-up, simulate + ingest + monitor, takes minutes;
``--keep DIR`` keeps the SQLite warehouse in DIR and reuses it on the next run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_RATIO = 2.0
# A fresh process that reads the stored run as the report does (argv[1]: the warehouse URL).
FRESH_LOAD_RUN = (
    "import sys\n"
    "from pipelines.db import reading\n"
    "from pipelines.settings import load_settings\n"
    "from pipelines.surveillance.profile import load_profile\n"
    "from pipelines.surveillance.runs import load_run\n"
    "settings = load_settings(db_url=sys.argv[1])\n"
    "with reading(settings.db_url) as conn:\n"
    "    assert load_run(conn, load_profile(settings.profile_path)) is not None\n"
)


def _cpu() -> float:
    """Return the CPU seconds of this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> int:
    """Build the registry, time load_run() and write_report(); print PASS or MISS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--db", help="an EMPTY warehouse URL to use instead of a new SQLite "
                        "file (e.g. a fresh PostgreSQL database)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="build the SQLite warehouse in DIR and keep it; when DIR already "
                        "holds one for the same --sites, reuse it and skip the set-up (A/B runs)")
    args = parser.parse_args()
    if args.keep and args.db:
        parser.error("--keep keeps a SQLite warehouse of its own; it cannot be used with --db")
    os.environ.setdefault("KYPHOWATCH_DEMO", "1")
    from pipelines.cli import main as cli_main
    from pipelines.db import reading
    from pipelines.ingest import ingest_paths
    from pipelines.report import write_report
    from pipelines.report.data import ReportData
    from pipelines.report.publish import default_workers
    from pipelines.settings import load_settings
    from pipelines.simulate import site_id_list
    from pipelines.surveillance.engine import run_monitor
    from pipelines.surveillance.profile import load_profile
    from pipelines.surveillance.runs import load_run, load_site

    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        root = Path(tmp)
        drift_site = site_id_list(args.sites)[2]
        # A kept warehouse is named after its site count and reused only if a marker says
        # its set-up finished (a half-built one is removed and built again). The marker,
        # not a rename: the warehouse is in WAL mode, and its -wal file follows its name.
        kept = args.keep / f"warehouse-{args.sites}-sites.db" if args.keep else None
        finished = kept.with_suffix(".done") if kept is not None else None
        reuse = finished is not None and finished.exists()
        if kept is not None and not reuse:
            for leftover in (kept, Path(f"{kept}-wal"), Path(f"{kept}-shm")):
                leftover.unlink(missing_ok=True)
        warehouse = kept or root / "warehouse.db"
        settings = load_settings(db_url=args.db or f"sqlite:///{warehouse}")
        if reuse:
            print(f"set-up: reusing the warehouse in {kept} (not rebuilt)")
            with reading(settings.db_url) as conn:
                result = load_run(conn, load_profile(settings.profile_path))
                # a run stored before the per-site parts (runs.load_site) would time the
                # drill-down's older path: store the same run again, once
                restore = load_site(conn, load_profile(settings.profile_path), result.as_of,
                                    drift_site) is None
            if restore:
                started = time.perf_counter()
                result = run_monitor(settings)
                print(f"set-up: the kept run was stored before the per-site parts; stored "
                      f"again in {time.perf_counter() - started:.1f} s (not compared)")
        else:
            if kept is not None:
                kept.parent.mkdir(parents=True, exist_ok=True)
            code = cli_main([
                "simulate", "--out", str(root / "extracts"), "--sites", str(args.sites),
                "--start", "2022-01-01", "--end", "2024-12-31", "--single-file", "--seed",
                "7", "--drift", f"{drift_site}:cement_leak:2.5:2023-06-01",
                "--bad-row-rate", "0",
            ])
            if code:
                return code
            started = time.perf_counter()
            ingest_paths(settings, sorted((root / "extracts").glob("*.csv*")))
            result = run_monitor(settings)
            print(f"set-up (ingest + monitor): {time.perf_counter() - started:.1f} s "
                  "(not compared)")
            if finished is not None:
                finished.write_text(f"{args.sites} sites, set-up finished\n")
        profile = load_profile(settings.profile_path)
        workers = default_workers()
        with reading(settings.db_url) as conn:  # warm: imports, connection, page cache
            load_run(conn, profile)
        ReportData(settings, None)
        started = time.perf_counter()
        with reading(settings.db_url) as conn:
            load_run(conn, profile)
        baseline = time.perf_counter() - started
        # as write_report reads: with workers, all but the run in a forked process meanwhile
        started = time.perf_counter()
        ReportData(settings, None, parallel_reads=workers > 1)
        reads = time.perf_counter() - started
        # Untimed: flush what the set-up wrote (a 500 MB warehouse), so its writeback does
        # not compete with the report's 14,000 files; the same before each timed build.
        os.sync()
        load_before = os.getloadavg()[0]
        cpu_before = _cpu()
        started = time.perf_counter()
        index = write_report(settings, root / "report")
        report = time.perf_counter() - started
        cpu = _cpu() - cpu_before
        os.sync()
        started = time.perf_counter()
        write_report(settings, root / "single", workers=1)
        single = time.perf_counter() - started
        os.sync()
        started = time.perf_counter()
        write_report(settings, root / "report")
        rerun = time.perf_counter() - started
        load_after = os.getloadavg()[0]
        out = index.parent
        pages = sum(1 for _ in (out / "sites").glob("*.html"))
        csvs = sum(1 for _ in out.rglob("*.csv"))
        texts = [p.read_text(encoding="utf-8") for p in out.rglob("*.html")]
        charts = sum(text.count('class="chart"') for text in texts)
        inline = sum(text.count("href='data:text/csv") for text in texts)
        del texts
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        # The report as the command runs it, in a fresh process, against a fresh process
        # reading the stored run, three pairs interleaved: the builds above run in the
        # process that ran the monitor, so they never pay the report's own imports.
        from drilldown import _run

        fresh = [(_run(["-c", FRESH_LOAD_RUN, settings.db_url]),
                  _run(["-m", "pipelines.cli", "report", "--db", settings.db_url,
                        "--out", str(root / f"fresh-{i}")])) for i in range(3)]
        fresh_load = statistics.median(load[0] for load, _ in fresh)
        fresh_report = statistics.median(report[0] for _, report in fresh)
        fresh_cpu = statistics.median(report[1] for _, report in fresh)
        # issue 10: the drill-down commands on the same 1,000-site warehouse, < 1 s each
        from drilldown import time_drilldown

        time_drilldown(settings.db_url, drift_site)
    ratio = report / baseline
    print(f"registry: {result.summary['procedures']} procedures, {pages} sites, as of "
          f"{result.as_of}; {charts} charts, {csvs} CSV files and {inline} tables inside "
          f"pages, {size / 1e6:.1f} MB")
    print(f"baseline load_run() (whole stored run): {baseline:.2f} s")
    print(f"report reads (run, site facts, months, complications; all but the run in a "
          f"second process while the run is read): {reads:.2f} s ({reads / baseline:.2f}x)")
    verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    print(f"write_report(), fresh, {workers} worker process(es): {report:.2f} s  ratio "
          f"{ratio:.2f}x (target <= {TARGET_RATIO:g}x: {verdict}); CPU {cpu:.2f} s in all "
          "processes (wall well above CPU / workers: other jobs hold the cores or the disk)")
    print(f"write_report(), fresh, 1 process: {single:.2f} s  ratio {single / baseline:.2f}x; "
          f"{1000 * (single - reads) / max(pages, 1):.1f} ms per site page for drawing and "
          "writing")
    print(f"write_report(), rerun into the same folder, unchanged data: {rerun:.2f} s  ratio "
          f"{rerun / baseline:.2f}x (nothing rewritten)")
    print(f"load average (1 min) over the three builds: {load_before:.2f} before, "
          f"{load_after:.2f} after ({os.cpu_count()} CPUs; above that, other jobs hold them)")
    print(f"fresh processes (median of 3 pairs): 'kyphowatch report --out' {fresh_report:.2f} s "
          f"(CPU {fresh_cpu:.2f} s) vs load_run() {fresh_load:.2f} s: ratio "
          f"{fresh_report / fresh_load:.2f}x (each with interpreter start-up and imports)")
    return 0  # a benchmark reports, it does not gate (benchmarks/README.md)


if __name__ == "__main__":
    raise SystemExit(main())
