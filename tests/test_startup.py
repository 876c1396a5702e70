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


def test_nightly_report_imports_no_pandas(sqlite_url, tmp_path):
    """``kyphowatch report`` (publish, as the nightly task runs it) never imports pandas.

    It looked its date up through the monitor's outcomes module, which imports pandas
    (0.2-0.3 s of every nightly report); the drill-downs' lookup finds the same date.
    """
    from pipelines.db import make_engine
    from pipelines.settings import load_settings
    from pipelines.surveillance.engine import run_monitor
    from tests.test_engine import build_sites

    build_sites(make_engine(sqlite_url), sites=3, per_site=200, leak={"S003": 0.3}, seed=8)
    env = {"KYPHOWATCH_DEMO": "1", "KYPHOWATCH_REPORT_DIR": str(tmp_path / "reports")}
    run_monitor(load_settings(env, db_url=sqlite_url))
    code = (
        "import sys\n"
        "from pipelines.cli import main\n"
        f"code = main(['report', '--db', {sqlite_url!r}])\n"
        "print('code', code, 'pandas', 'pandas' in sys.modules, flush=True)\n"
    )
    proc = _python(code, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "code 0 pandas False"
    assert (tmp_path / "reports" / "latest" / "index.html").is_file()


def test_report_forks_its_reader_with_the_driver_imported(pg_url, tmp_path):
    """The report's forked reader inherits psycopg and the dialect (0.1-0.15 s of CPU it
    imported again on its own, in the nightly report's critical path)."""
    from pipelines.db import make_engine
    from pipelines.settings import load_settings
    from pipelines.surveillance.engine import run_monitor
    from tests.test_engine import build_sites

    build_sites(make_engine(pg_url), sites=3, per_site=200, leak={"S003": 0.3}, seed=8)
    env = {"KYPHOWATCH_DEMO": "1", "KYPHOWATCH_REPORT_DIR": str(tmp_path / "reports")}
    run_monitor(load_settings(env, db_url=pg_url))
    code = (
        "import sys\n"
        "from pipelines.report import data\n"
        "real = data._ForkedReads\n"
        "class Forked(real):\n"
        "    def __init__(self, *args):\n"
        "        print('forked with', sorted({'psycopg', 'sqlalchemy.dialects.postgresql'}\n"
        "                                    & set(sys.modules)), flush=True)\n"
        "        super().__init__(*args)\n"
        "data._ForkedReads = Forked\n"
        "from pipelines.cli import main\n"
        f"print('code', main(['report', '--db', {pg_url!r}, '--out', {str(tmp_path / 'r')!r}]))\n"
    )
    proc = _python(code, env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "code 0"
    assert "forked with ['psycopg', 'sqlalchemy.dialects.postgresql']" in lines


def test_drafting_yellow_cards_does_not_import_delivery():
    """The monitor's Yellow Card drafts load neither the outbox nor the mail and web channels.

    ``pipelines.alerts`` resolves its public names on first use, so importing
    ``pipelines.alerts.regulator`` (every monitor run) stays off ``urllib.request`` and the
    channels; every public name still resolves, to the object its submodule defines.
    """
    code = (
        "import sys\n"
        "import pipelines.alerts.regulator\n"
        "print(sorted(m for m in sys.modules if m in ('urllib.request', "
        "'pipelines.alerts.channels', 'pipelines.alerts.outbox', 'pipelines.alerts.lifecycle')))\n"
        "import importlib, pipelines.alerts as alerts\n"
        "for name in alerts.__all__:\n"
        "    home = importlib.import_module('pipelines.alerts.' + alerts._HOMES[name])\n"
        "    assert getattr(alerts, name) is getattr(home, name), name\n"
        "assert set(alerts.__all__) == set(alerts._HOMES) and set(alerts.__all__) <= set(dir(alerts))\n"
        "try:\n"
        "    alerts.no_such_name\n"
        "except AttributeError:\n"
        "    print('missing raises')\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "missing raises"]
