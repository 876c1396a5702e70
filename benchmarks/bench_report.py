"""Benchmark: the evidence report against the monitor evaluation it is built from.

Why: the monitor DAG publishes the report after every run, one page per site, so the report
must stay a small multiple of the monitor's own evaluation as sites are added. The baseline,
measured in the same run on the same warehouse, is ``evaluate()`` alone (the report cannot be
cheaper: it calls it once). The ratio report / evaluate is printed with the per-page cost.

Data: ``kyphowatch simulate --single-file`` for SITES sites over three years (one drifting
site), loaded into a SQLite warehouse. Target: report <= 3x evaluate.

Run: ``.venv/bin/python benchmarks/bench_report.py [--sites N] [--db EMPTY_URL]`` (about 30 s
at 300 sites; measured at 1,000 sites / 520k procedures on PostgreSQL: 9.7 s, 2.2x).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_RATIO = 3.0


def main() -> int:
    """Build the registry, time evaluate() and write_report(); print PASS or MISS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=300)
    parser.add_argument("--db", help="an EMPTY warehouse URL to use instead of a new SQLite "
                        "file (e.g. a fresh PostgreSQL database)")
    args = parser.parse_args()
    os.environ.setdefault("KYPHOWATCH_DEMO", "1")
    from pipelines.cli import main as cli_main
    from pipelines.ingest import ingest_paths
    from pipelines.report import write_report
    from pipelines.settings import load_settings
    from pipelines.simulate import site_id_list
    from pipelines.surveillance.engine import evaluate

    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        root = Path(tmp)
        drift_site = site_id_list(args.sites)[2]
        code = cli_main([
            "simulate", "--out", str(root / "extracts"), "--sites", str(args.sites),
            "--start", "2022-01-01", "--end", "2024-12-31", "--single-file", "--seed", "7",
            "--drift", f"{drift_site}:cement_leak:2.5:2023-06-01", "--bad-row-rate", "0",
        ])
        if code:
            return code
        settings = load_settings(db_url=args.db or f"sqlite:///{root / 'warehouse.db'}")
        started = time.perf_counter()
        ingest_paths(settings, sorted((root / "extracts").glob("*.csv*")))
        print(f"ingest: {time.perf_counter() - started:.1f} s (set-up, not compared)")
        evaluate(settings)  # warm caches (thresholds) so both timings see the same state
        started = time.perf_counter()
        result = evaluate(settings)
        baseline = time.perf_counter() - started
        started = time.perf_counter()
        index = write_report(settings, root / "report")
        report = time.perf_counter() - started
        pages = sum(1 for _ in (index.parent / "sites").glob("*.html"))
        size = sum(p.stat().st_size for p in index.parent.rglob("*") if p.is_file())
    ratio = report / baseline
    print(f"registry: {result.summary['procedures']} procedures, {pages} sites, as of "
          f"{result.as_of or date.min}")
    print(f"baseline evaluate(): {baseline:.2f} s")
    verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    print(f"write_report():      {report:.2f} s  ratio {ratio:.2f}x (target <= "
          f"{TARGET_RATIO:g}x: {verdict})  {1000 * (report - baseline) / max(pages, 1):.1f} ms "
          f"per site page beyond the evaluation, {size / 1e6:.1f} MB in all")
    return 0  # a benchmark reports, it does not gate (benchmarks/README.md)


if __name__ == "__main__":
    raise SystemExit(main())
