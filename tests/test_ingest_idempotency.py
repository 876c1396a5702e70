"""Loading is idempotent and order-independent, and survives a crash, on SQLite and PostgreSQL.

The reference is always one clean load of the same files into an empty warehouse;
every other way of loading must end in exactly the same rows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.ingest import expand_paths, ingest_paths
from pipelines.simulate import simulate
from tests.ingest_helpers import snapshot

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """A small synthetic registry with corrections, late complications and bad rows."""
    out = tmp_path_factory.mktemp("registry")
    simulate(out, sites=4, start=date(2023, 1, 1), end=date(2023, 12, 31), seed=11,
             bad_row_rate=0.02, cadence="monthly")
    return out


def _fresh_sqlite(tmp_path: Path, name: str) -> str:
    return f"sqlite:///{tmp_path / name}"


def _current_state(db_url: str) -> dict:
    state = snapshot(db_url)
    # Ledger counts (new vs updated) describe each load, so they legitimately depend on
    # the order; which files were loaded or rejected does not.
    state["file_ledger"] = sorted((row[0], row[4]) for row in state["file_ledger"])
    return state


def test_registry_has_the_hard_cases(registry, tmp_path, settings_for):
    report = ingest_paths(settings_for(_fresh_sqlite(tmp_path, "r.db")), [registry])
    totals = report.to_dict()["totals"]
    assert totals["loaded"] == len(list(registry.glob("*.csv")))
    assert totals["quarantined"] > 0, "bad rows were injected"
    assert totals["updated"] > 0, "corrections were delivered"
    accounted = sum(totals[k] for k in
                    ("inserted", "updated", "unchanged", "stale", "quarantined", "pending"))
    assert accounted == totals["rows_read"], "every row is accounted for"


def test_ten_loads_equal_one(registry, db_url, settings_for):
    settings = settings_for(db_url)
    first = ingest_paths(settings, [registry])
    reference = snapshot(db_url)
    for _ in range(9):
        again = ingest_paths(settings, [registry])
        assert {f.status for f in again.files} == {"duplicate"}
    assert snapshot(db_url) == reference
    assert first.exit_code == 0


def test_any_order_equals_clean_load(registry, db_url, tmp_path, settings_for):
    clean_url = _fresh_sqlite(tmp_path, "clean.db")
    ingest_paths(settings_for(clean_url), [registry])
    files = expand_paths([registry])
    scrambled = list(reversed(files))  # complications first, newest first
    settings = settings_for(db_url)
    for path in scrambled:  # one call per file, as files would land one by one
        ingest_paths(settings, [path])
    assert _current_state(db_url) == _current_state(clean_url)


def test_redelivery_under_another_name_is_a_correction_noop(registry, tmp_path, settings_for):
    url = _fresh_sqlite(tmp_path, "w.db")
    ingest_paths(settings_for(url), [registry])
    before = snapshot(url)
    first = sorted(registry.glob("procedures_*.csv"))[0]
    copy = tmp_path / "renamed" / first.name.replace("procedures_", "procedures_resent_")
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    [result] = ingest_paths(settings_for(url), [copy]).files
    assert result.status == "duplicate"  # same bytes = same delivery, whatever the name
    assert snapshot(url) == before


def test_crash_part_way_then_rerun_equals_clean_load(registry, db_url, tmp_path, settings_for):
    clean_url = _fresh_sqlite(tmp_path, "clean.db")
    ingest_paths(settings_for(clean_url), [registry])
    total_files = len(expand_paths([registry]))
    env = dict(os.environ, KYPHOWATCH_DEMO="1", KYPHOWATCH_DB_URL=db_url,
               KYPHOWATCH_CHUNK_ROWS="7")  # tiny chunks: each file takes many statements
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "ingest", str(registry)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    engine = sa.create_engine(db_url)
    committed = 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with engine.connect() as conn:
                    committed = conn.execute(
                        sa.select(sa.func.count()).select_from(schema.file_ledger)
                    ).scalar_one()
            except sa.exc.DBAPIError:
                committed = 0  # schema not created yet
            if committed >= 3:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        engine.dispose()
    assert 3 <= committed < total_files, "the kill must land part-way through the load"
    report = ingest_paths(settings_for(db_url), [registry])
    assert report.exit_code == 0
    assert _current_state(db_url) == _current_state(clean_url)
