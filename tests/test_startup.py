"""What every ``kyphowatch`` process pays before and after its command (issue 10).

The top-level help imports no data library, and lists exactly what the commands register;
a finished command keeps the interpreter's exit collections off the heap it built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("pandas", "numpy", "sqlalchemy", "scipy", "great_expectations", "yaml", "pyarrow")


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, **(env or {})))


def test_top_level_help_imports_no_data_library():
    """``kyphowatch --help``, ``kyphowatch`` and a mistyped command import argparse only."""
    code = (
        "import sys\n"
        "from pipelines.cli import main\n"
        "for argv in (['--help'], [], ['bogus']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_overview_lists_what_the_modules_register(monkeypatch):
    """The listing without imports is byte for byte the one every module registers."""
    from pipelines.cli import SUMMARIES, build_parser, overview_parser

    monkeypatch.setenv("COLUMNS", "80")
    full = build_parser()
    overview = overview_parser()
    assert overview.format_help() == full.format_help()
    assert (list(overview._subparsers._group_actions[0].choices)
            == list(full._subparsers._group_actions[0].choices) == list(SUMMARIES))


def test_help_and_unknown_command_behave_as_before():
    """Output and exit codes of the listing paths (the same as with every module loaded)."""
    env = {"COLUMNS": "80"}
    shown = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], cwd=REPO,
                           capture_output=True, text=True, env=dict(os.environ, **env))
    assert shown.returncode == 0
    assert shown.stdout.startswith("usage: kyphowatch [-h] [-v] COMMAND ...")
    assert "pages for products, cement lots and (confidential) operators" in shown.stdout
    bare = subprocess.run([sys.executable, "-m", "pipelines.cli"], cwd=REPO,
                          capture_output=True, text=True, env=dict(os.environ, **env))
    assert bare.returncode == 2 and bare.stdout == shown.stdout
    wrong = subprocess.run([sys.executable, "-m", "pipelines.cli", "bogus"], cwd=REPO,
                           capture_output=True, text=True, env=dict(os.environ, **env))
    assert wrong.returncode == 2
    assert "invalid choice: 'bogus' (choose from 'simulate', 'ingest', " in wrong.stderr


def test_finished_command_freezes_the_heap_before_exit(tmp_path):
    """After a command (here one refused with exit 3) the exit collections skip the heap.

    A hook registered before ``main`` runs after the ones ``main`` registers: it sees the
    frozen objects, and the command's message and exit code are unchanged.
    """
    missing = tmp_path / "nowhere.db"
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0, flush=True))\n"
        "from pipelines.cli import main\n"
        f"sys.exit(main(['alerts', 'list', '--db', 'sqlite:///{missing}']))\n"
    )
    proc = _python(code, {"KYPHOWATCH_DEMO": "1"})
    assert proc.returncode == 3, proc.stderr
    assert f"kyphowatch: error: no warehouse at {missing}" in proc.stderr
    assert proc.stdout.strip() == "frozen True"
    assert not missing.exists()
