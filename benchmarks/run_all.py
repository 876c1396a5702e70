"""Run every ``benchmarks/bench_*.py`` script in turn; fail if any of them fails.

Why a runner: ``make bench`` should be one command, and each benchmark must run in its own
fresh interpreter (the ingest benchmark measures peak memory per process, and imports of one
benchmark must not warm up another). Scripts run with the same Python as this runner (the
project virtualenv under ``make bench``), from the repository root, with output streamed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> int:
    """Run each benchmark; return 1 if any failed, else 0."""
    scripts = sorted(HERE.glob("bench_*.py"))
    failed: list[str] = []
    timings: list[tuple[str, float, int]] = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        started = time.perf_counter()
        code = subprocess.run([sys.executable, str(script)], cwd=REPO, check=False).returncode
        seconds = time.perf_counter() - started
        timings.append((script.name, seconds, code))
        if code != 0:
            failed.append(script.name)
    print("\n=== summary ===")
    for name, seconds, code in timings:
        print(f"{'ok    ' if code == 0 else 'FAILED'} {name:32} {seconds:7.1f} s (exit {code})")
    if failed:
        print(f"{len(failed)} benchmark(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
