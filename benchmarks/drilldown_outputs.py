"""Digest of every drill-down output on one warehouse, for an old-code/new-code comparison.

Why: a change meant to make ``kyphowatch sites`` / ``site`` faster must not change a byte of
what they print. Run this once with each version of the code on the same warehouse (a
checkout of the old commit, ``git worktree add``); the digests must be equal, and with
``--out`` the two JSON files show which command differs.

How: each command runs as the user runs it (``python -m pipelines.cli``, a fresh process)
with the code of ``--repo`` (default: the repository the script sits in); stdout, the last stderr line (the error, without the
demo-mode warning) and the exit code are recorded per command.

Run: ``.venv/bin/python benchmarks/drilldown_outputs.py --db URL [--db URL2] [--site S0003
...] [--repo OLD_CHECKOUT] [--out FILE]`` (the first ``--site`` also gets ``--metric`` and
error cases).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commands(sites: list[str]) -> list[list[str]]:
    """Return every drill-down variant to compare: formats, filters and error paths."""
    out = [["sites"], ["sites", "--flagged"], ["sites", "--wide"], ["sites", "--json"],
           ["sites", "--csv"], ["sites", "--flagged", "--json"], ["sites", "--flagged", "--csv"],
           ["sites", "--flagged", "--wide"]]
    for site in sites:
        out += [["site", site], ["site", site, "--wide"], ["site", site, "--json"],
                ["site", site, "--csv"]]
    first = sites[0]
    out += [["site", first, "--metric", "cement_leak"],
            ["site", first, "--metric", "cement_leak", "--json"],
            ["site", "S9999"], ["site", first, "--metric", "nope"],
            ["site", first, "--as-of", "2031-01-01"]]
    return out


def main() -> int:
    """Run every command on every warehouse; print the number of commands and the digest."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", action="append", required=True, help="warehouse URL")
    parser.add_argument("--site", action="append", help="site to drill into (repeatable)")
    parser.add_argument("--out", type=Path, help="write every output here as JSON")
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="checkout whose code runs (default: this one)")
    args = parser.parse_args()
    repo = args.repo.resolve()
    env = dict(os.environ, KYPHOWATCH_DEMO="1", PYTHONPATH=str(repo))
    results = {}
    for db in args.db:
        for command in commands(args.site or ["S0003"]):
            done = subprocess.run([sys.executable, "-m", "pipelines.cli", *command, "--db", db],
                                  cwd=repo, env=env, capture_output=True, text=True)
            errors = [line for line in done.stderr.splitlines() if "demo mode" not in line]
            results[f"{db} {' '.join(command)}"] = {"rc": done.returncode, "stdout": done.stdout,
                                                    "stderr": errors[-1:]}
    if args.out:
        args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    digest = hashlib.sha256(json.dumps(results, sort_keys=True).encode("utf-8")).hexdigest()
    print(f"{len(results)} commands, code at {repo}: {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
