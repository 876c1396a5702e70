"""Bomb benchmark: peak memory and time of ingest fed hostile files, against the 1 GiB ceiling.

Why: issue 14 found that a 0.5 MB ``.gz`` holding one 512 MiB line took 1.29 GB before it was
rejected, a 1 MB ``.gz`` of blank lines ran for more than 6 minutes, and a row with millions
of fields produced a 340 MB quarantine row (1.9 GB of memory; 6.0 GB on PostgreSQL). The
reader now bounds all of these while streaming; this benchmark feeds each bomb, with the
default limits, to ``ingest_paths`` in its own child process and prints the child's peak
memory (``ru_maxrss`` from ``os.wait4``) against the ceiling as PASS or MISS, with the
outcome (every bomb must be rejected with a reason, not crash). A two-row good file is the
baseline (it loads, so it also starts Great Expectations: 312 MiB in the last run; the bombs,
rejected before validation starts, peaked at 163-179 MiB).

The bombs are built once under ``var/bench/bombs/`` (a few seconds). SQLite always; the
field bomb also on PostgreSQL when the local server answers.

Run: ``.venv/bin/python benchmarks/bench_bombs.py`` (about a minute). Exits 0 unless a child
crashes or a bomb is not rejected; a missed memory target is printed as MISS.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CEILING_MB = 1024.0
BOMB_DIR = REPO / "var" / "bench" / "bombs"
HEADER = (
    b"procedure_id,site_id,patient_ref,operator_ref,procedure_date,levels_treated,indication,"
    b"anaesthesia,balloons,age_years,sex,steroid_use,mdt_discussed\n"
)
MIB = 1 << 20


def _gz(path: Path, blocks) -> Path:
    with gzip.open(path, "wb", compresslevel=9) as out:
        out.write(HEADER)
        for block in blocks:
            out.write(block)
    return path


def build_bombs() -> dict[str, Path]:
    """Write each bomb once (cached) and return them by name."""
    BOMB_DIR.mkdir(parents=True, exist_ok=True)
    bombs = {
        "gz, one 512 MiB line": BOMB_DIR / "procedures_20240101_line.csv.gz",
        "gz, 1 GiB of blank lines": BOMB_DIR / "procedures_20240101_blank.csv.gz",
        "17 MB, rows of 1M fields": BOMB_DIR / "procedures_20240101_fields.csv",
        "100 MB, 100M blank lines": BOMB_DIR / "procedures_20240101_rows.csv",
        "gz, 200k-field rows": BOMB_DIR / "procedures_20240101_gzfields.csv.gz",
        "baseline: 2 good rows": BOMB_DIR / "procedures_20240301_good.csv",
    }
    makers = {
        "gz, one 512 MiB line": lambda p: _gz(p, (b"y" * MIB for _ in range(512))),
        "gz, 1 GiB of blank lines": lambda p: _gz(p, (b"\n" * MIB for _ in range(1024))),
        "17 MB, rows of 1M fields": lambda p: p.write_bytes(HEADER + (b"," * 1_000_000 + b"\n") * 17),
        "100 MB, 100M blank lines": lambda p: p.write_bytes(HEADER + b"\n" * (100 * 1_000_000)),
        "gz, 200k-field rows": lambda p: _gz(p, ((b"ab," * 200_000 + b"\n") for _ in range(500))),
        "baseline: 2 good rows": lambda p: p.write_bytes(HEADER + b"".join(
            f"P{i},S001,PT-{i},OP-1,2024-01-05,1,osteoporosis,local,2,78,F,false,true\n".encode()
            for i in (1, 2))),
    }
    for name, path in bombs.items():
        if not path.exists():
            partial = path.with_name(path.name + ".part")
            makers[name](partial)
            partial.replace(path)
    return bombs


CHILD = r"""
import json, sys, time
from pathlib import Path
from pipelines.ingest import ingest_paths
from pipelines.settings import load_settings
settings = load_settings({"KYPHOWATCH_DEMO": "1"}, db_url=sys.argv[1])
started = time.perf_counter()
report = ingest_paths(settings, [Path(sys.argv[2])])
[result] = report.files
print(json.dumps({"status": result.status, "reason": result.reason,
                  "seconds": time.perf_counter() - started}))
"""


def run_child(db_url: str, path: Path) -> tuple[dict, float]:
    """Ingest ``path`` in a fresh child; return its outcome and peak memory in MiB."""
    process = subprocess.Popen([sys.executable, "-c", CHILD, db_url, str(path)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    out, err = process.stdout.read(), process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    peak_mb = usage.ru_maxrss / 1024  # KiB on Linux
    if process.returncode != 0:
        return {"status": "CRASH", "reason": err.strip().splitlines()[-1:], "seconds": 0}, peak_mb
    return json.loads(out.strip().splitlines()[-1]), peak_mb


def _pg_url() -> str | None:
    import sqlalchemy as sa

    try:
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT",
                                 connect_args={"connect_timeout": 3})
        name = f"kw_bench_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.exec_driver_sql("CREATE DATABASE " + conn.dialect.identifier_preparer.quote(name))
        admin.dispose()
        return sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    except Exception as exc:  # no server: the PostgreSQL row is skipped, with the reason
        print(f"(PostgreSQL row skipped: {type(exc).__name__})")
        return None


def _drop_pg(url: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        name = sa.make_url(url).database
        conn.exec_driver_sql("DROP DATABASE IF EXISTS "
                             + conn.dialect.identifier_preparer.quote(name) + " WITH (FORCE)")
    admin.dispose()


def main() -> int:
    started = time.perf_counter()
    bombs = build_bombs()
    print(f"bombs ready in {time.perf_counter() - started:.1f} s under {BOMB_DIR}")
    print(f"{'bomb':28} {'db':8} {'on disk':>9} {'status':9} {'seconds':>8} {'peak MiB':>9}  "
          f"ceiling {CEILING_MB:.0f} MiB")
    failures = 0
    runs = [(name, "sqlite", path) for name, path in bombs.items()]
    runs.append(("17 MB, rows of 1M fields", "postgres", bombs["17 MB, rows of 1M fields"]))
    scratch = BOMB_DIR / "warehouse"
    scratch.mkdir(exist_ok=True)
    for name, db, path in runs:
        if db == "sqlite":
            db_file = scratch / f"{uuid.uuid4().hex}.db"
            url = f"sqlite:///{db_file}"
        else:
            url = _pg_url()
            if url is None:
                continue
        try:
            outcome, peak = run_child(url, path)
        finally:
            if db == "sqlite":
                db_file.unlink(missing_ok=True)
            else:
                _drop_pg(url)
        verdict = "PASS" if peak < CEILING_MB else "MISS"
        size = path.stat().st_size / MIB
        print(f"{name:28} {db:8} {size:7.1f}MB {outcome['status']:9} {outcome['seconds']:8.1f} "
              f"{peak:9.0f}  {verdict}")
        print(f"{'':28}   reason: {outcome['reason']}")
        expected = "loaded" if name.startswith("baseline") else "rejected"
        if outcome["status"] != expected:
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
