"""Airflow metadata for tests that run the DAGs in subprocesses (``dag.test()``, the CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"


def migrated_airflow_env(home: Path, *, plugins: bool = False) -> dict[str, str]:
    """Return the environment for Airflow subprocesses, with a freshly migrated SQLite
    metadata database in ``home``.

    Each test module builds its own (module-scoped fixtures): connections or variables one
    module adds must not change which warehouse another module's DAG runs use.
    """
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(DAGS)]),
    }
    if plugins:
        env["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    return env
