"""The monitor's overlapped and bulk-written paths store what the serial, per-row ones did."""

from __future__ import annotations

import math
import threading
from datetime import date
from types import SimpleNamespace

import numpy as np
import pytest
import sqlalchemy as sa

from pipelines.db import make_engine
from pipelines.surveillance import engine as engine_module
from pipelines.surveillance.beyond_run import EXTRA_COLUMNS, TABLES, store_beyond_site
from tests.test_engine import build_sites

_HOSTILE_FLOATS = (0.0, -0.0, 1 / 3, 2.0 ** -1074, 1e308, -1.7976931348623157e308,
                   0.1 + 0.2, math.pi * 1e-17, float("nan"), float("inf"), -float("inf"))
_HOSTILE_TEXT = ("P-1", "a\tb", "back\\slash", "new\nline", "cr\rx", "ä, \"q\"", "\\N",
                 "'quote'", " lead", "x" * 16)


def _rows(seed: int) -> dict[str, list[dict]]:
    """Operator, product and lot rows with awkward floats, text, NULLs and numpy scalars."""
    rng = np.random.default_rng(seed)

    def f(i: int):
        value = _HOSTILE_FLOATS[i % len(_HOSTILE_FLOATS)] if i % 3 else float(rng.random())
        return np.float64(value) if i % 2 else value

    def text(i: int, width: int) -> str:
        return _HOSTILE_TEXT[i % len(_HOSTILE_TEXT)][:width - 4] + f"{i:04d}"  # unique

    def finite(i: int):
        value = f(i)
        return value if math.isfinite(value) else 1.5

    operators = [{
        "site_id": f"S{i % 7:03d}", "operator": text(i, 12), "metric": "cement_leak",
        "method": "ra_cusum" if i % 2 else "rare", "procedures": int(rng.integers(1, 500)),
        "events": np.int64(i % 9), "expected": finite(i), "statistic": None if i % 5 == 0 else f(i),
        "threshold": f(i + 1), "head_start": None if i % 4 else f(i + 2),
        "signal_date": date(2023, 1 + i % 12, 1 + i % 28) if i % 3 == 0 else None,
        "signal_procedure": None if i % 3 else i, "signals": i % 4,
        "first_procedure_date": date(2022, 1 + i % 12, 1 + i % 28),
    } for i in range(300)]
    products = [{
        "product": text(i, 60), "metric": "new_fracture", "kind": "cement",
        "procedures": 100 + i, "events": i, "expected": finite(i),
        "observed_expected": None if i % 6 == 0 else f(i), "statistic": f(i + 3),
        "threshold": None if i % 2 else f(i + 4),
        "signal_date": None if i % 2 else date(2023, 6, 1 + i % 28), "device_failures": i % 3,
    } for i in range(40)]
    lots = [{
        "product": text(i, 60), "lot": text(i + 1, 30), "metric": "cement_leak",
        "procedures": 10 + i, "sites": 1 + i % 5, "events": i % 7, "expected": finite(i),
        "p_value": finite(i + 1), "alpha": 0.001,
        "signal_date": date(2023, 2, 3) if i % 4 == 0 else None,
    } for i in range(120)]
    return {"operators": operators, "products": products, "lots": lots}


def _stored(conn: sa.Connection) -> dict[str, list[str]]:
    # repr keeps what == would blur: -0.0 against 0.0, and NaN (never equal to itself).
    return {name: sorted(repr(tuple(row)) for row in conn.execute(sa.select(table)))
            for name, table in TABLES.items()}


def _old_store(conn: sa.Connection, profile, as_of: date, run_key: str,
               rows: dict[str, list[dict]]) -> None:
    """The statement-per-row store_beyond_site stood for before the bulk insert (e33997b)."""
    for name, table in TABLES.items():
        conn.execute(table.delete().where(table.c.profile_name == profile.name))
        if rows[name]:
            conn.execute(table.insert(), [
                {**row, "profile_name": profile.name, "run_key": run_key, "as_of": as_of}
                for row in rows[name]
            ])


@pytest.mark.parametrize("seed", [1, 2])
def test_beyond_rows_bulk_inserted_equal_the_executemany(db_url, seed):
    """COPY (PostgreSQL) and SQLite's bulk insert store every operator, product and lot
    value the INSERT executemany stored: NaN, infinities, -0.0, subnormals, NULLs, tabs,
    backslashes and newlines in text, numpy scalars."""
    engine = make_engine(db_url)
    profile = SimpleNamespace(name="kyphoplasty-core")
    rows = _rows(seed)
    as_of = date(2023, 12, 29)

    def stored(store) -> dict[str, list[str]]:
        with engine.connect() as conn:
            with conn.begin() as transaction:
                # a stale row of the same profile, replaced by both paths
                _old_store(conn, profile, date(2023, 1, 1), "old-run", _rows(seed + 10))
                store(conn, profile, as_of, "run-1", rows)
                out = _stored(conn)
                transaction.rollback()
        return out

    new = stored(store_beyond_site)
    old = stored(_old_store)
    assert new == old
    assert [len(v) for v in new.values()] == [300, 40, 120]
    if db_url.startswith("postgresql"):  # SQLite keeps neither NaN (NULL) nor -0.0
        assert any("nan" in row for row in new["operators"])
        assert any("-0.0" in row for row in new["operators"])
    engine.dispose()


def test_facts_started_before_compute_are_waited_for_when_compute_fails(pg_url, settings_for,
                                                                        monkeypatch):
    """The procedure facts' scan, started before compute, is never left running: a failed
    compute waits for it before the monitor raises."""
    build_sites(make_engine(pg_url), sites=3, per_site=200, seed=3)
    started: list[threading.Thread] = []

    class Recorded(engine_module.FactsInBackground):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self._thread)

    def failing(*_args, **_kwargs):
        raise RuntimeError("compute failed")

    monkeypatch.setattr(engine_module, "FactsInBackground", Recorded)
    monkeypatch.setattr(engine_module, "compute", failing)
    with pytest.raises(RuntimeError, match="compute failed"):
        engine_module.run_monitor(settings_for(pg_url))
    assert len(started) == 1 and not started[0].is_alive()


def test_facts_started_before_compute_are_the_stored_facts(pg_url, settings_for, monkeypatch):
    """One scan per run (started before compute, handed to the store), and the stored facts
    part is what procedure_facts gives on the warehouse as of the run."""
    from pipelines.surveillance import runs

    build_sites(make_engine(pg_url), sites=3, per_site=200, leak={"S003": 0.3}, seed=4)
    scans = []
    real = runs.procedure_facts

    def counted(conn, as_of):
        scans.append(as_of)
        return real(conn, as_of)

    monkeypatch.setattr(runs, "procedure_facts", counted)
    result = engine_module.run_monitor(settings_for(pg_url))
    assert scans == [result.as_of]
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        stored = runs.load_run(conn, SimpleNamespace(name=result.profile_name,
                                                     version=result.profile_version),
                               result.as_of, sites=[])
        assert stored.procedure_facts == runs._unpack(runs._pack(real(conn, result.as_of)))
    engine.dispose()


@pytest.mark.parametrize("batch_bytes", [700, 1 << 23])
def test_ids_hashed_during_the_copy_equal_hashing_after_it(pg_url, monkeypatch, batch_bytes):
    """The cache's full read hashes the ids batch by batch in the parsing thread: the same
    hashes as hashing the read's column whole, and a snapshot built with them (as of a day
    that drops later rows, so the hashes are filtered with the rows) is the one built by
    hashing afterwards, frame for frame and fingerprint for fingerprint."""
    import pandas as pd

    from pipelines.surveillance import outcomes, snapshot_cache
    from pipelines.surveillance.outcomes import _arrow_strings, _id_hashes, copy_table

    warehouse = make_engine(pg_url)
    build_sites(warehouse, sites=3, per_site=300, leak={"S002": 0.3}, seed=6)
    monkeypatch.setattr(outcomes, "READ_BATCH_BYTES", batch_bytes)
    columns, kinds = snapshot_cache._procedure_select(True, EXTRA_COLUMNS)
    comp_select = sa.select(*snapshot_cache._complication_select())
    with warehouse.connect() as conn:
        procs, proc_hashes = outcomes.copy_table_hashed(conn, sa.select(*columns), kinds,
                                                        "procedure_id")
        comps, comp_hashes = outcomes.copy_table_hashed(
            conn, comp_select, snapshot_cache._COMPLICATION_KINDS, "procedure_id")
        assert procs.equals(copy_table(conn, sa.select(*columns), kinds))
        assert comps.equals(copy_table(conn, comp_select, snapshot_cache._COMPLICATION_KINDS))
    for table, hashes in ((procs, proc_hashes), (comps, comp_hashes)):
        assert hashes.dtype == np.uint64 and len(hashes) == table.num_rows > 0
        whole = _id_hashes(_arrow_strings(table["procedure_id"].combine_chunks()))
        assert np.array_equal(hashes, whole)
    newest = max(procs["procedure_date"].to_pylist())
    for as_of_day in (newest, newest - 90):
        as_of = outcomes.day_to_date(as_of_day)
        hashed = snapshot_cache._snapshot([procs, comps], as_of, True, EXTRA_COLUMNS,
                                          (proc_hashes, comp_hashes))
        plain = snapshot_cache._snapshot([procs, comps], as_of, True, EXTRA_COLUMNS)
        assert hashed.fingerprint == plain.fingerprint
        pd.testing.assert_frame_equal(hashed.procedures, plain.procedures, check_exact=True)
        pd.testing.assert_frame_equal(hashed.complications, plain.complications,
                                      check_exact=True)
        pd.testing.assert_frame_equal(hashed.extras, plain.extras, check_exact=True)
    assert len(plain.procedures) < procs.num_rows  # the earlier day dropped rows
    warehouse.dispose()
