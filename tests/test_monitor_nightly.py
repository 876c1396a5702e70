"""The nightly run writes only what changed: the same stored tables as a full rewrite.

The monitor's current picture (``chart_status``, ``site_month_metric``, ``level_episode``)
and the operator/device tables are compared with the stored rows and only the differing ones
written (``engine.replace_rows``), under a per-warehouse store lock
(``engine.lock_monitor_store``). Every test compares with ``STORE_CHANGES_ONLY`` off, the
code before: delete every row of the profile and insert them all again.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta

import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.db import make_engine
from pipelines.ingest import ingest_paths
from pipelines.settings import load_settings
from pipelines.surveillance import engine as engine_module
from pipelines.surveillance.engine import lock_monitor_store, replace_rows, run_monitor
from pipelines.surveillance.profile import load_profile
from pipelines.surveillance.runs import load_run
from tests.beyond_helpers import write_registry
from tests.test_outcomes import complication_row, insert

TABLES = ("monitor_run", "monitor_run_part", "signal", "chart_status", "site_month_metric",
          "level_episode", "operator_chart", "device_product_chart", "device_lot_test",
          "threshold_design")
PICTURE = ("chart_status", "site_month_metric", "level_episode", "operator_chart",
           "device_product_chart", "device_lot_test")  # written by replace_rows
CLOCKS = ("computed_at", "created_at", "id")


def _dump(db_url: str) -> dict[str, list[str]]:
    """Every stored row of the monitor's tables (clock columns left out), sorted."""
    warehouse = make_engine(db_url)
    out = {}
    with warehouse.connect() as conn:
        for name in TABLES:
            table = schema.metadata.tables[name]
            columns = [c for c in table.c if c.name not in CLOCKS]
            out[name] = sorted(repr(tuple(r)) for r in conn.execute(sa.select(*columns)))
    warehouse.dispose()
    return out


def _first_night(tmp_path, db_url: str, settings_for):
    """Ingest the registry, run the monitor two days before its end; add the next day's
    late complication for an old procedure; return the settings and the two days."""
    planted = write_registry(tmp_path / "in", days=300)
    settings = settings_for(db_url)
    ingest_paths(settings, planted["paths"])
    first, second = planted["end"] - timedelta(days=3), planted["end"] - timedelta(days=2)
    run_monitor(settings, first)
    warehouse = make_engine(db_url)
    with warehouse.connect() as conn:
        old = conn.execute(sa.select(schema.procedure.c.procedure_id, schema.procedure.c.site_id)
                           .order_by(schema.procedure.c.procedure_date).limit(1)).one()
    insert(warehouse, complications=[complication_row("CLATE", old.procedure_id, old.site_id,
                                                      second)])
    warehouse.dispose()
    return settings, first, second


def test_a_new_day_stores_the_same_tables_as_a_full_rewrite(tmp_path, db_url, settings_for,
                                                            caplog, monkeypatch):
    """A new run key takes the full rewrite (each row carries the key); the diff path is
    for reruns and is compared with a full rewrite by the rerun tests."""
    settings, _, second = _first_night(tmp_path, db_url, settings_for)
    with caplog.at_level(logging.INFO, logger="pipelines.surveillance.engine"):
        run_monitor(settings, second)
    written = [r.getMessage() for r in caplog.records if "rows written" in r.getMessage()]
    # A new run key: every row is written again (the cheaper way when each carries it).
    assert len(written) == 6 and all("(a new run)" in m for m in written), written
    profile = load_profile(settings.profile_path)
    warehouse = make_engine(db_url)
    with warehouse.connect() as conn:
        read_changes = load_run(conn, profile, second).to_dict()
    changes_only = _dump(db_url)
    monkeypatch.setattr(engine_module, "STORE_CHANGES_ONLY", False)
    run_monitor(settings, second)  # the same run again, every row deleted and inserted
    with warehouse.connect() as conn:
        read_full = load_run(conn, profile, second).to_dict()
    warehouse.dispose()
    full = _dump(db_url)
    for name in TABLES:
        assert changes_only[name] == full[name], name
    assert read_changes == read_full
    assert full["chart_status"] and all(repr(second) in row for row in full["chart_status"])


def test_a_rerun_of_the_same_day_writes_no_current_picture_row(tmp_path, db_url, settings_for,
                                                               caplog):
    settings, first, _ = _first_night(tmp_path, db_url, settings_for)
    before = _dump(db_url)
    with caplog.at_level(logging.INFO, logger="pipelines.surveillance.engine"):
        run_monitor(settings, first)
    written = [r.getMessage() for r in caplog.records if "rows written" in r.getMessage()]
    assert len(written) == 6 and all(": 0 of " in m for m in written), written
    after = _dump(db_url)
    # (the run's core part lists the signals new in its run: none in a rerun)
    for name in PICTURE:
        assert after[name] == before[name], name


def test_a_rerun_writes_back_what_differs_from_the_stored_rows(tmp_path, db_url, settings_for,
                                                               caplog, monkeypatch):
    """As after a kyphowatch upgrade that derives some rows differently: the rows that
    differ, are missing or are no longer derived are put right, the rest left alone."""
    settings, _, second = _first_night(tmp_path, db_url, settings_for)
    run_monitor(settings, second)
    expected = _dump(db_url)
    warehouse = make_engine(db_url)
    smm, ops = schema.site_month_metric, schema.operator_chart
    with warehouse.begin() as conn:
        months = conn.execute(sa.select(smm.c.site_id, smm.c.metric, smm.c.month)
                              .order_by(smm.c.site_id, smm.c.metric, smm.c.month)).all()
        assert len(months) > 10
        first, gone, other = months[0], months[1], months[2]
        conn.execute(smm.update().where(smm.c.site_id == first.site_id, smm.c.metric ==
                                        first.metric, smm.c.month == first.month)
                     .values(expected=smm.c.expected + 1.5))
        conn.execute(smm.delete().where(smm.c.site_id == gone.site_id, smm.c.metric ==
                                        gone.metric, smm.c.month == gone.month))
        conn.execute(smm.update().where(smm.c.site_id == other.site_id, smm.c.metric ==
                                        other.metric, smm.c.month == other.month)
                     .values(month="1999-01"))  # a row no longer derived
        conn.execute(ops.update().where(ops.c.operator == sa.select(sa.func.min(ops.c.operator))
                                        .scalar_subquery()).values(events=ops.c.events + 7))
    warehouse.dispose()
    with caplog.at_level(logging.INFO, logger="pipelines.surveillance.engine"):
        run_monitor(settings, second)
    written = {r.getMessage().split(":")[1].strip(): r.getMessage() for r in caplog.records
               if "rows written" in r.getMessage()}
    # written: the changed row, the missing one and the renamed one's true row; deleted:
    # the changed row's stored copy and the row no longer derived
    assert ": 3 of " in written["site_month_metric"] and "(2 deleted)" in written[
        "site_month_metric"], written
    assert " of " in written["operator_chart"] and ": 0 of " not in written["operator_chart"]
    after = _dump(db_url)
    for name in PICTURE:
        assert after[name] == expected[name], name


def _zero_table() -> sa.Table:
    return sa.Table("nightly_probe", sa.MetaData(),
                    sa.Column("profile_name", sa.String(8), primary_key=True),
                    sa.Column("k", sa.String(8), primary_key=True),
                    sa.Column("x", sa.Float), sa.Column("n", sa.Integer),
                    sa.Column("run_key", sa.String(8), nullable=False))


def test_replace_rows_keeps_signed_zeros_deletions_and_changes(db_url, monkeypatch):
    """-0.0 == 0.0 in Python but not in the table: such a row must be rewritten."""
    warehouse = make_engine(db_url)
    table = _zero_table()
    table.create(warehouse)
    rows = [{"k": f"k{i}", "x": 0.0, "n": i} for i in range(10)]
    with warehouse.begin() as conn:
        replace_rows(conn, table, rows, {"profile_name": "p", "run_key": "r1"})
    new = [{"k": f"k{i}", "x": -0.0 if i == 0 else 0.5 if i == 1 else 0.0, "n": i}
           for i in range(9)] + [{"k": "k10", "x": 1.0, "n": 10}]

    def stored(run_key: str):
        with warehouse.begin() as conn:
            replace_rows(conn, table, new, {"profile_name": "p", "run_key": run_key})
            return sorted((k, math.copysign(1.0, x), x, n, r) for _, k, x, n, r in
                          conn.execute(sa.select(table)))

    changed = stored("r2")
    monkeypatch.setattr(engine_module, "STORE_CHANGES_ONLY", False)
    assert changed == stored("r2")
    assert len(changed) == 10 and ("k1", 1.0, 0.5, 1, "r2") in changed
    if warehouse.dialect.name == "postgresql":  # SQLite stores -0.0 as 0
        assert ("k0", -1.0, 0.0, 0, "r2") in changed
    table.drop(warehouse)
    warehouse.dispose()


def test_the_store_lock_makes_a_second_monitor_wait(db_url):
    warehouse = make_engine(db_url)
    done = []

    def rival():
        with warehouse.begin() as conn:
            lock_monitor_store(conn)
            done.append(time.monotonic())

    with warehouse.begin() as conn:
        lock_monitor_store(conn)
        thread = threading.Thread(target=rival)
        thread.start()
        time.sleep(1.0)
        assert not done, "the second store did not wait for the first"
        released = time.monotonic()
    thread.join(30)
    assert done and done[0] >= released
    warehouse.dispose()


def _run_in_child(db_url: str, reports: str, as_of) -> str:
    settings = load_settings({"KYPHOWATCH_DEMO": "1", "KYPHOWATCH_REPORT_DIR": reports},
                             db_url=db_url)
    return run_monitor(settings, as_of).run_key


def test_two_monitors_at_once_leave_the_tables_of_one(tmp_path, db_url, settings_for,
                                                      monkeypatch):
    """Two monitors of the same data at once end in the tables of one run.

    The end state, not the lock: the two compute the same rows, so without the lock the
    duplicate-key retry of the store also gives this state (review). That the lock makes a
    second store wait is test_the_store_lock_makes_a_second_monitor_wait.
    """
    settings, _, second = _first_night(tmp_path, db_url, settings_for)
    reports = str(tmp_path / "reports")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        keys = list(pool.map(_run_in_child, [db_url] * 2, [reports] * 2, [second] * 2))
    assert keys[0] == keys[1]
    raced = _dump(db_url)
    monkeypatch.setattr(engine_module, "STORE_CHANGES_ONLY", False)
    run_monitor(settings, second)
    one = _dump(db_url)
    for name in TABLES:
        assert raced[name] == one[name], name


@pytest.fixture(autouse=True)
def _changes_only(monkeypatch):
    """Every test starts with the default (changes only), whatever ran before."""
    monkeypatch.setattr(engine_module, "STORE_CHANGES_ONLY", True)
