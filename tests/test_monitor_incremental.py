"""A nightly run, with everything earlier runs left behind, stores what a run from scratch does.

Issue 10 asks that "incremental and full runs give identical signals after late
complications". A nightly monitor is not a from-scratch run: it reads through the snapshot
cache (only the rows written since its last run), reads its thresholds and case-mix fits
from the threshold store, and replaces the stored picture of the previous run. Each of
those is state that could go stale. Here one warehouse runs night after night -- (a) a
normal new day, (b) a day whose file brings a late complication of a procedure charted
months ago (it restates a charted outcome and the quarter's case-mix training set), (c) the
first day of a new quarter (the case-mix refit) -- and after each night a second warehouse
with the same rows, but none of the monitor's state (no stored run, thresholds, fits or
cache, nothing in this process's design memory), runs from scratch. The two must derive the
same run key, the same signals and the same stored run, picture and active signal rows.
"""

from __future__ import annotations

import uuid
from datetime import date, timedelta

import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.db import make_engine
from pipelines.ingest import ingest_paths
from pipelines.surveillance import threshold_store
from pipelines.surveillance.engine import run_monitor
from pipelines.surveillance.profile import load_profile
from pipelines.surveillance.runs import load_run
from tests.beyond_helpers import write_registry
from tests.ingest_helpers import COMP_HEADER, comp_row, csv_text, write

# Everything a run leaves behind that a later run reads (snapshot_cache) or that holds
# the run's results (the rest): emptied in the from-scratch warehouse before each run.
MONITOR_STATE = ("signal", "chart_status", "site_month_metric", "level_episode",
                 "operator_chart", "device_product_chart", "device_lot_test",
                 "monitor_run_part", "monitor_run", "threshold_design", "snapshot_cache")
PICTURE = ("chart_status", "site_month_metric", "level_episode", "operator_chart",
           "device_product_chart", "device_lot_test")
CLOCKS = ("computed_at", "created_at", "id")
QUARTER_START = date(2023, 10, 1)  # inside write_registry's 300 days from 2023-01-02


@pytest.fixture
def two_warehouses(pg_admin_url):
    """Two new, empty PostgreSQL databases (the snapshot cache is PostgreSQL's), dropped after."""
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    names = [f"kw_test_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    quote = admin.dialect.identifier_preparer.quote
    with admin.connect() as conn:
        for name in names:
            conn.exec_driver_sql("CREATE DATABASE " + quote(name))
    yield [sa.make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
           for name in names]
    with admin.connect() as conn:
        for name in names:
            conn.exec_driver_sql("DROP DATABASE IF EXISTS " + quote(name) + " WITH (FORCE)")
    admin.dispose()


def _picture(url: str) -> dict[str, list[str]]:
    """The current picture's rows and the active signals (clock columns and the run that
    first saw a signal left out: the nightly warehouse saw it nights earlier), sorted."""
    warehouse = make_engine(url)
    out = {}
    with warehouse.connect() as conn:
        for name in (*PICTURE, "signal"):
            table = schema.metadata.tables[name]
            columns = [c for c in table.c if c.name not in (*CLOCKS, "first_seen_run")]
            query = sa.select(*columns)
            if name == "signal":
                query = query.where(table.c.active)
            out[name] = sorted(repr(tuple(r)) for r in conn.execute(query))
    warehouse.dispose()
    return out


def _fits(url: str) -> int:
    warehouse = make_engine(url)
    with warehouse.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).where(
            schema.threshold_design.c.kind == "risk_model_fit")).scalar_one()
    warehouse.dispose()
    return count


def _from_scratch(url: str, settings, as_of: date, monkeypatch):
    """Run the monitor on ``url`` as a first run: no stored state, no design memory."""
    warehouse = make_engine(url)
    with warehouse.begin() as conn:
        for name in MONITOR_STATE:
            conn.execute(schema.metadata.tables[name].delete())
    warehouse.dispose()
    monkeypatch.setattr(threshold_store, "_memory", {})
    before = threshold_store.computations()
    result = run_monitor(settings, as_of)
    assert threshold_store.computations() > before  # it designed, not read
    return result


def _same_run(nightly, scratch, urls, profile, as_of):
    assert nightly.run_key == scratch.run_key
    assert nightly.data_fingerprint == scratch.data_fingerprint
    strip = ("first_seen_run", "last_seen_run", "active")
    assert ([{k: v for k, v in s.items() if k not in strip} for s in nightly.signals]
            == [{k: v for k, v in s.items() if k not in strip} for s in scratch.signals])
    runs = []
    for url in urls:
        warehouse = make_engine(url)
        with warehouse.connect() as conn:
            run = load_run(conn, profile, as_of).to_dict()
        warehouse.dispose()
        # A signal first seen nights ago names that night's run: the rest must agree.
        run["signals"] = [{k: v for k, v in s.items() if k != "first_seen_run"}
                          for s in run["signals"]]
        runs.append(run)
    for key in runs[0]:
        assert runs[0][key] == runs[1][key], key
    assert runs[0].keys() == runs[1].keys()
    nightly_picture, scratch_picture = _picture(urls[0]), _picture(urls[1])
    for name, rows in nightly_picture.items():
        assert rows == scratch_picture[name], name
    assert nightly_picture["chart_status"] and nightly_picture["signal"]


def test_nightly_runs_equal_runs_from_scratch_after_a_day_late_complications_and_a_refit(
        tmp_path, two_warehouses, settings_for, monkeypatch):
    planted = write_registry(tmp_path / "in", days=300)
    urls = two_warehouses
    settings = [settings_for(url) for url in urls]
    for each in settings:
        assert ingest_paths(each, planted["paths"]).exit_code == 0
    profile = load_profile(settings[0].profile_path)
    warehouse = make_engine(urls[0])
    with warehouse.connect() as conn:
        # The oldest procedure without a complication: charted as event-free for months.
        old = conn.execute(sa.select(schema.procedure.c.procedure_id, schema.procedure.c.site_id,
                                     schema.procedure.c.procedure_date)
                           .where(~schema.procedure.c.procedure_id.in_(
                               sa.select(schema.complication.c.procedure_id)))
                           .order_by(schema.procedure.c.procedure_date,
                                     schema.procedure.c.procedure_id).limit(1)).one()
    warehouse.dispose()

    first = QUARTER_START - timedelta(days=4)
    run_monitor(settings[0], first)  # the nightly warehouse's history: its state
    nights = [
        ("a new day", QUARTER_START - timedelta(days=3), None),
        # Reported months late: events inside the procedure's outcome windows.
        ("late complications", QUARTER_START - timedelta(days=2),
         [comp_row("CLATE1", old.procedure_id, site=old.site_id,
                   date=(old.procedure_date + timedelta(days=1)).isoformat()),
          comp_row("CLATE2", old.procedure_id, site=old.site_id, event_type="new_fracture",
                   date=(old.procedure_date + timedelta(days=20)).isoformat())]),
        ("a new quarter", QUARTER_START + timedelta(days=1), None),
        ("the next day", QUARTER_START + timedelta(days=2), None),
    ]
    for label, as_of, late in nights:
        fits = _fits(urls[0])
        if late:
            path = write(tmp_path / label / f"complications_{as_of:%Y%m%d}.csv",
                         csv_text(COMP_HEADER, late))
            for each in settings:
                assert ingest_paths(each, [path]).exit_code == 0
        nightly = run_monitor(settings[0], as_of)
        scratch = _from_scratch(urls[1], settings[1], as_of, monkeypatch)
        _same_run(nightly, scratch, urls, profile, as_of)
        # The nights do what they are for: restated training units and a new quarter refit.
        refitted = _fits(urls[0]) > fits
        assert refitted == (label in ("late complications", "a new quarter")), label
