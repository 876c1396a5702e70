"""A mistyped path on the ingest command line is the user's mistake, not a rejected extract:
exit 2 naming it, nothing loaded, no ledger row (so no "Extract rejected" e-mail; user audit)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.ingest_helpers import PROC_HEADER, csv_text, proc_row, write

REPO = Path(__file__).resolve().parents[1]


def test_a_missing_path_is_refused_before_anything_loads(tmp_path):
    good = write(tmp_path / "procedures_20240201.csv", csv_text(PROC_HEADER, [proc_row()]))
    typo = tmp_path / "procedures_20240202.cvs"
    db = tmp_path / "w.db"
    env = dict(os.environ, KYPHOWATCH_DEMO="1")
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "ingest", "--db", f"sqlite:///{db}", str(good),
         str(typo)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "no such file or directory: procedures_20240202.cvs" in result.stderr
    assert "nothing was loaded" in result.stderr
    assert "Traceback" not in result.stderr
    assert not db.exists()  # not even a warehouse was opened, so no ledger row
