"""The built wheel runs anywhere: installed outside the source tree, ingest and monitor work.

The wheel is built from a copy of the project files (so the build leaves nothing in the
working tree), installed with ``--no-deps`` into a fresh virtual environment in a temporary
directory, and run from a directory that is not the repository. The dependencies come from
the test environment through a ``.pth`` line (the same pinned set; nothing is downloaded),
and that line holds no ``pipelines`` package: the editable install's path hook lives in a
``.pth`` file of that directory, which Python does not process for a ``.pth`` entry.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("pipelines", "expectations", "profiles", "reference", "sql", "pyproject.toml",
                 "setup.py", "README.md")  # fmt: skip


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """Return the ``bin`` directory of a venv with only the kyphowatch wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in PROJECT_FILES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "_bundled"))  # fmt: skip
        else:
            shutil.copy2(path, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"),
          str(source)])  # fmt: skip
    wheels = list((root / "dist").glob("kyphowatch-*.whl"))
    assert len(wheels) == 1
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "kyphowatch-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
          str(wheels[0])])  # fmt: skip
    return venv / "bin"


def test_wheel_carries_the_data_files(installed):
    proc = _run([str(installed / "python"), "-c",
                 "import pipelines; from pipelines.settings import load_settings;"
                 "s = load_settings({});"
                 "print(pipelines.__file__); print(s.sql_dir); print(s.expectations_dir);"
                 "print(s.profile_path)"], cwd=installed)  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    venv = installed.parent
    assert all(Path(line).is_relative_to(venv) for line in lines), lines
    assert (Path(lines[1]) / "views.sql").is_file()
    assert (Path(lines[2]) / "procedures.json").is_file()
    assert Path(lines[3]).name == "htg108.yaml"


def test_installed_package_ingests_and_monitors_outside_the_tree(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    db = work / "warehouse.db"
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("KYPHOWATCH_", "PYTHON"))
    }  # fmt: skip
    env.update({"KYPHOWATCH_DEMO": "1", "KYPHOWATCH_DB_URL": f"sqlite:///{db}"})
    kyphowatch = str(installed / "kyphowatch")
    _run([kyphowatch, "simulate", "--out", "extracts", "--sites", "2", "--start", "2023-01-01",
          "--end", "2023-03-31", "--seed", "3"], cwd=work, env=env)  # fmt: skip
    _run([kyphowatch, "ingest", "extracts"], cwd=work, env=env)
    _run([kyphowatch, "monitor"], cwd=work, env=env)
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        procedures = conn.scalar(sa.text("SELECT count(*) FROM procedure"))
        runs = conn.scalar(sa.text("SELECT count(*) FROM monitor_run"))
        views = conn.scalars(sa.text("SELECT name FROM sqlite_master WHERE type = 'view'")).all()
    engine.dispose()
    assert procedures > 0 and runs == 1
    assert "v_chart_status" in views  # migrate() found sql/views.sql inside the wheel
