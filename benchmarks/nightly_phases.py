"""Where a nightly file's time goes: the phases of the ingest process and of its GX helper.

Runs ``ingest_paths`` on the given files in this process, as bench_ingest's child does
(after ``import pipelines.ingest`` and the settings), and prints each phase's start and end
(seconds since ``ingest_paths`` was called, on the monotonic clock both processes share)
with the CPU its process had used by then. The phases are the loader's own functions,
wrapped when the loader asks for the helper (``gxaudit.prestart``, right after the
loader's imports), so a forked helper inherits the wrappers: its GX import and suite build
are the construction of ``validate.SuiteRunner``, its audit run ``SuiteRunner.failing_rows``.
Both processes append their lines to one file (one ``os.write`` each, so lines never mix).

Run: ``.venv/bin/python benchmarks/nightly_phases.py --db URL FILE...`` (the warehouse is
migrated if needed; a file loads once, a rerun reports it as a duplicate).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BENCH_KEY = "kyphowatch-benchmark-key-synthetic-data-only"  # synthetic data only
_log_fd: int | None = None
_wrapped = False


def _stamp(label: str) -> None:
    line = f"{os.getpid()} {time.monotonic():.4f} {time.process_time():.4f} {label}\n"
    os.write(_log_fd, line.encode())


def _timed(owner, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper stamping its start and end."""
    real = getattr(owner, name)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        _stamp(f"{label} start")
        try:
            return real(*args, **kwargs)
        finally:
            _stamp(f"{label} end")

    setattr(owner, name, wrapper)


def _wrap_loader() -> None:
    """Wrap the phases (once): the loader's modules are imported by the time this runs."""
    global _wrapped
    if _wrapped:
        return
    _wrapped = True
    import pipelines.ingest as ingest
    from pipelines.ingest import gxaudit, load, validate

    for owner, name, label in [
        (ingest, "open_warehouse", "open warehouse (connect, migration check)"),
        (ingest, "_hold_key", "hold the pseudonym key"),
        (load, "load_file", "load_file"),
        (load, "open_checked", "open and checksum the file"),
        (load, "_warn_on_stamp_clash", "stamp-clash probe"),
        (load, "_stage_file", "read, validate, stage"),
        (load, "_check_whole_file", "whole-file checks"),
        (load, "_merge_procedures", "merge procedures"),
        (load, "_merge_complications", "merge complications"),
        (load, "promote_pending", "promote pending complications"),
        (load, "_verify_audit", "wait for the GX audit"),
        (gxaudit, "_serve", "helper"),
        (validate.SuiteRunner, "__init__", "helper: GX import and suite build"),
        (validate.SuiteRunner, "failing_rows", "helper: GX audit run"),
    ]:
        _timed(owner, name, label)


def main() -> int:
    global _log_fd
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="warehouse URL")
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args()
    log = tempfile.NamedTemporaryFile(prefix="nightly_phases_", delete=False)
    _log_fd = os.open(log.name, os.O_WRONLY | os.O_APPEND)
    from pipelines.ingest import gxaudit, ingest_paths
    from pipelines.settings import load_settings

    real_prestart = gxaudit.prestart

    def prestart(*args):
        _stamp("gxaudit.prestart start (forks the helper once)")
        _wrap_loader()
        real_prestart(*args)
        _stamp("gxaudit.prestart end")

    gxaudit.prestart = prestart
    if not gxaudit.forks():
        print("this process has threads: the helper would not be forked; not measured")
        return 2
    settings = load_settings(db_url=args.db, pseudonym_key=BENCH_KEY)
    started, cpu = time.monotonic(), time.process_time()
    _stamp("ingest_paths called")
    report = ingest_paths(settings, args.paths)
    _stamp("ingest_paths returned")
    print(f"{time.monotonic() - started:.2f} s wall, {time.process_time() - cpu:.2f} s CPU in "
          f"this process; " + ", ".join(  # the shown name: a raw one may hold a patient reference
              f"{Path(f.to_dict()['path']).name}: {f.status}" for f in report.files))
    os.close(_log_fd)
    lines = [line.split(" ", 3) for line in Path(log.name).read_text().splitlines()]
    os.unlink(log.name)
    main_pid = str(os.getpid())
    print(f"{'at s':>6} {'process':8} {'CPU s':>6}  phase")
    for pid, at, used, label in lines:
        who = "main" if pid == main_pid else "helper"
        print(f"{float(at) - started:6.3f} {who:8} {float(used):6.3f}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
