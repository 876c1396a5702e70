"""Compare two report folders file by file (MD5): the byte-identity proof of a report change.

Run: ``.venv/bin/python benchmarks/compare_reports.py OLD_DIR NEW_DIR`` on two reports of one
warehouse (e.g. ``write_report`` of the ``bench_report.py --keep`` warehouse by the old and
the new code). Prints the file counts, the files found in one folder only, the files whose
bytes differ and an MD5 of the sorted tree (names and contents); exit code 1 on any
difference.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def _files(root: Path) -> dict[Path, str]:
    """Return ``{relative path: MD5 of its bytes}`` of every file under ``root``."""
    return {
        path.relative_to(root): hashlib.md5(path.read_bytes()).hexdigest()
        for path in root.rglob("*")
        if path.is_file()
    }


def main(argv: list[str]) -> int:
    """Compare the folders ``argv[0]`` and ``argv[1]``; return 1 when they differ."""
    old, new = (_files(Path(folder)) for folder in argv[:2])
    only = sorted(set(old) ^ set(new))
    different = sorted(name for name in set(old) & set(new) if old[name] != new[name])
    tree = hashlib.md5()
    for name in sorted(old):
        tree.update(f"{name}\0{old[name]}\n".encode())
    print(
        f"{len(old)} vs {len(new)} files; in one only: {len(only)}; different: "
        f"{len(different)}; MD5 of the first tree {tree.hexdigest()}"
    )
    for name in only[:10]:
        print(f"only in one: {name}")
    for name in different[:10]:
        print(f"different: {name}")
    return 1 if only or different else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
