"""The cached, incremental snapshot read gives what a full read gives, and so does the run.

A simulated registry is loaded on PostgreSQL in three deliveries: the history, then a night
with late complications of old procedures, a corrected (re-sent) old procedure, a
complication re-typed out of the counted types, one moved to a procedure not yet known
(it leaves ``complication`` for ``pending_complication``) and a complication of that unknown
procedure; then a night that brings the procedure, which promotes both. After each, the
monitor runs through the cache (the log says which path ran) and its snapshot is checked
against a full read, column by column, at as_of and at a past as_of; the stored run
(signals, site metrics, chart status, operator and device charts, run parts) is checked
against a run that read everything. Then the fallbacks: rows deleted behind the loader's
back, a ledger row that appears before the watermark, other columns read.
"""

from __future__ import annotations

import csv
import json
import logging
from datetime import UTC, date, datetime

import pandas as pd
import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.db import make_engine
from pipelines.ingest import ingest_paths
from pipelines.settings import REPO_DIR
from pipelines.simulate import simulate
from pipelines.surveillance import engine as monitor_engine
from pipelines.surveillance import runs, snapshot_cache
from pipelines.surveillance.beyond_run import EXTRA_COLUMNS
from pipelines.surveillance.engine import run_monitor
from pipelines.surveillance.outcomes import load_snapshot, snapshot_needs
from pipelines.surveillance.profile import load_profile

PROFILE = load_profile(REPO_DIR / "profiles" / "htg108.yaml")
COUNTED = set(snapshot_needs(PROFILE)[1])
HISTORY_END, NIGHT_1, NIGHT_2 = "2023-12-26", "2023-12-28", "2023-12-31"
PAST = date(2023, 12, 1)
# Stored tables of a run, and columns that differ between two computations of the same run.
RUN_TABLES = (schema.monitor_run, schema.monitor_run_part, schema.signal, schema.chart_status,
              schema.site_month_metric, schema.level_episode, schema.operator_chart,
              schema.device_product_chart, schema.device_lot_test)
VOLATILE = {"computed_at"}


def _read_csv(path):
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return rows


def _write_csv(path, rows, header):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _deliveries(tmp_path):
    """Write the history and two nights' files (see the module docstring); return the paths."""
    simulate(tmp_path / "sim", sites=8, start=date(2022, 1, 1), end=date(2023, 12, 31),
             seed=20261206, single_file=True)
    procs = _read_csv(tmp_path / "sim" / "procedures_20231231.csv")
    comps = _read_csv(tmp_path / "sim" / "complications_20231231.csv")
    proc_header, comp_header = list(procs[0]), list(comps[0])
    # The procedure held back to night 2: its complications wait in pending until then.
    held = next(p for p in procs if HISTORY_END < p["procedure_date"] <= NIGHT_1)
    history = [p for p in procs if p["procedure_date"] <= HISTORY_END]
    # A counted complication of the history at the held procedure's site, moved to it.
    old_comps = [c for c in comps if c["event_date"] <= HISTORY_END and c["event_type"] in COUNTED]
    moved = next(c for c in old_comps if c["site_id"] == held["site_id"])
    retyped = next(c for c in old_comps if c is not moved)
    # A corrected procedure: other covariates and another patient of the same site.
    corrected = dict(next(p for p in history if p["mdt_discussed"] == "true"))
    other_patient = next(p["patient_ref"] for p in history if p["site_id"] == corrected["site_id"]
                         and p["patient_ref"] != corrected["patient_ref"])
    corrected.update(age_years=str(int(corrected["age_years"]) + 3), mdt_discussed="false",
                     patient_ref=other_patient)
    night_1_procs = [p for p in procs if HISTORY_END < p["procedure_date"] <= NIGHT_1
                     and p is not held] + [corrected]
    night_1_comps = [c for c in comps if HISTORY_END < c["event_date"] <= NIGHT_1]
    night_1_comps += [
        {**moved, "procedure_id": held["procedure_id"], "event_date": held["procedure_date"]},
        {**retyped, "event_type": "other"},
        {**moved, "complication_id": moved["complication_id"] + "-late",
         "procedure_id": held["procedure_id"], "event_date": NIGHT_1},
    ]
    night_2_procs = [p for p in procs if p["procedure_date"] > NIGHT_1] + [held]
    night_2_comps = [c for c in comps if c["event_date"] > NIGHT_1]
    late = [c for c in night_1_comps if c["procedure_id"] in {p["procedure_id"] for p in history}]
    assert late, "the night must bring late complications of old procedures"
    out = tmp_path / "deliveries"
    out.mkdir()

    def files(stamp, p_rows, c_rows):
        return [_write_csv(out / f"procedures_{stamp}.csv", p_rows, proc_header),
                _write_csv(out / f"complications_{stamp}.csv", c_rows, comp_header)]

    return {"history": files("20231226", history,
                             [c for c in comps if c["event_date"] <= HISTORY_END]),
            "night_1": files("20231228", night_1_procs, night_1_comps),
            "night_2": files("20231231", night_2_procs, night_2_comps),
            "held": held["procedure_id"], "moved": moved["complication_id"],
            "retyped": retyped["complication_id"], "corrected": corrected["procedure_id"]}


def _same_snapshot(cached, full):
    """Assert two snapshots are equal: fingerprint, every procedure column, every row."""
    assert cached.fingerprint == full.fingerprint
    assert cached.as_of == full.as_of
    pd.testing.assert_frame_equal(cached.procedures, full.procedures)
    # Complications come in the order the table hands them (its physical order, which an
    # update changes): compared as sorted rows, every column.
    def rows(frame):
        shown = frame.assign(event_type=frame["event_type"].astype(str),
                             severity=frame["severity"].astype(str))
        return shown.sort_values(list(shown.columns), kind="mergesort").reset_index(drop=True)

    pd.testing.assert_frame_equal(rows(cached.complications), rows(full.complications))
    assert list(cached.extras.columns) == list(full.extras.columns) == list(EXTRA_COLUMNS)
    for name in EXTRA_COLUMNS:
        assert (cached.extras[name].astype(object).fillna("<null>").tolist()
                == full.extras[name].astype(object).fillna("<null>").tolist())


def _stored_run(engine):
    """Every stored row of the run tables, minus timestamps and timings, sorted."""
    out = {}
    with engine.connect() as conn:
        for table in RUN_TABLES:
            columns = [c for c in table.columns if c.name not in VOLATILE]
            rows = [dict(row) for row in conn.execute(sa.select(*columns)).mappings()]
            if table is schema.monitor_run_part:
                for row in rows:
                    payload = runs._unpack(row["payload"])
                    if row["part"] == runs.CORE:
                        payload.pop("seconds")  # wall time of the run
                        # what earlier runs stored, not what this one computed: a second
                        # computation of the same run finds no new signal (checked apart)
                        payload.pop("new_signal_keys")
                    row["payload"] = payload
            out[table.name] = sorted(repr(sorted(row.items())) for row in rows)
    return out


def _parts(engine):
    with engine.connect() as conn:
        return list(conn.scalars(sa.select(schema.snapshot_cache.c.part)
                                 .order_by(schema.snapshot_cache.c.part)))


def _cache_paths(caplog):
    return [r.getMessage().split(" read (")[0].removeprefix("snapshot cache: ")
            for r in caplog.records if r.getMessage().startswith("snapshot cache: ")]


@pytest.fixture
def night(tmp_path, pg_url, settings_for, monkeypatch, caplog):
    """Load deliveries; run the monitor through the cache, keeping the snapshot it used."""
    caplog.set_level(logging.INFO, logger="pipelines.surveillance.snapshot_cache")
    settings = settings_for(pg_url)
    engine = make_engine(pg_url)
    used = []

    def spy(*args, **kwargs):
        used.append(snapshot_cache.load_cached_snapshot(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(monitor_engine, "load_cached_snapshot", spy)

    def run(paths):
        report = ingest_paths(settings, paths)
        assert report.exit_code == 0, report.to_dict()
        caplog.clear()
        result = run_monitor(settings)
        return result, used[-1], _cache_paths(caplog)

    yield settings, engine, run, _deliveries(tmp_path), spy
    engine.dispose()


def _ledger_row(conn, digit, file_name, status, stamp):
    """Record a file in the ledger (no rows of its own) with the given stamp."""
    conn.execute(schema.file_ledger.insert().values(
        source_checksum=digit * 64, file_name=file_name, kind=file_name.split("_")[0],
        status=status, processed_at=stamp))


def _full_read(engine, as_of):
    with engine.connect() as conn:
        return load_snapshot(conn, PROFILE, as_of, extras=EXTRA_COLUMNS)


def _cached_read(engine, as_of, extras=EXTRA_COLUMNS):
    with engine.connect() as conn:
        return snapshot_cache.load_cached_snapshot(conn, PROFILE, as_of, extras=extras)


def test_cached_and_delta_reads_equal_full_reads_and_so_do_the_runs(night, monkeypatch, caplog):
    settings, engine, run, files, spy = night
    result, used, paths = run(files["history"])
    assert paths == ["full"]  # no cache yet
    _same_snapshot(used, _full_read(engine, result.as_of))

    for name in ("night_1", "night_2"):
        previous = result.as_of
        if name == "night_2":
            # Night 1 was stored as part 1; night 2 reads it and writes every row as part 0.
            monkeypatch.setattr(snapshot_cache, "MAX_DELTA_PARTS", 1)
        result, used, paths = run(files[name])
        assert paths == ["delta"], name
        assert _parts(engine) == ([0, 1] if name == "night_1" else [0])
        assert result.as_of > previous  # the night's procedures are read
        as_of = result.as_of
        _same_snapshot(used, _full_read(engine, as_of))
        # A past as_of from the same cache: rows dated later are held, and left out.
        caplog.clear()
        _same_snapshot(_cached_read(engine, PAST), _full_read(engine, PAST))
        assert _cache_paths(caplog) == ["unchanged"]
        # The stored run equals a run that read everything.
        cached_run = _stored_run(engine)
        monkeypatch.setattr(monitor_engine, "load_cached_snapshot", load_snapshot)
        full = run_monitor(settings)
        monkeypatch.setattr(monitor_engine, "load_cached_snapshot", spy)
        assert full.run_key == result.run_key
        assert full.data_fingerprint == result.data_fingerprint
        full_run = _stored_run(engine)
        assert full_run == cached_run
        with engine.connect() as conn:
            first_seen = set(conn.scalars(sa.select(schema.signal.c.signal_key).where(
                schema.signal.c.first_seen_run == result.run_key)))
        assert set(result.new_signal_keys) == first_seen
        assert cached_run["signal"] and cached_run["site_month_metric"]
        assert cached_run["operator_chart"] and cached_run["device_lot_test"]
        with engine.connect() as conn:
            state = {
                "pending": set(conn.scalars(sa.select(
                    schema.pending_complication.c.complication_id))),
                "held": conn.execute(sa.select(sa.func.count()).where(
                    schema.procedure.c.procedure_id == files["held"])).scalar_one(),
                "retyped": conn.execute(sa.select(schema.complication.c.event_type).where(
                    schema.complication.c.complication_id == files["retyped"])).scalar_one(),
                "mdt": conn.execute(sa.select(schema.procedure.c.mdt_discussed).where(
                    schema.procedure.c.procedure_id == files["corrected"])).scalar_one(),
            }
        # What the nights were meant to do to the warehouse, they did.
        assert state["retyped"] == "other" and state["mdt"] is False
        if name == "night_1":
            assert state["held"] == 0
            assert {files["moved"], files["moved"] + "-late"} <= state["pending"]
        else:
            assert state["held"] == 1 and not state["pending"]


def test_the_cache_falls_back_to_a_full_read_when_it_cannot_be_sure(night, caplog,
                                                                     monkeypatch):
    _, engine, run, files, _ = night
    result, _, _ = run(files["history"])
    as_of = result.as_of

    def read_path():
        caplog.clear()
        snapshot = _cached_read(engine, as_of)
        _same_snapshot(snapshot, _full_read(engine, as_of))
        message = next(r.getMessage() for r in caplog.records
                       if r.getMessage().startswith("snapshot cache: "))
        return message.split(";")[0]

    assert read_path().startswith("snapshot cache: unchanged read")
    # Rows deleted behind the loader's back: no file says so, the counts do.
    with engine.begin() as conn:
        victim = conn.execute(sa.select(schema.complication.c.procedure_id).where(
            schema.complication.c.event_type.in_(COUNTED)).limit(1)).scalar_one()
        conn.execute(schema.complication.delete().where(
            schema.complication.c.procedure_id == victim))
        conn.execute(schema.procedure.delete().where(schema.procedure.c.procedure_id == victim))
    assert "row counts differ" in read_path()
    assert read_path().startswith("snapshot cache: unchanged read")  # rebuilt by the full read
    # A ledger row stamped before the watermark that the watermark did not see (a load
    # that committed late): the rows it wrote may be missing.
    with engine.begin() as conn:
        _ledger_row(conn, "0", "procedures_20230101.csv", "rejected",
                    datetime(2000, 1, 1, tzinfo=UTC))
    assert "the ledger changed at or before the watermark" in read_path()
    # A part that does not follow the one before it (a concurrent run stored in between).
    with engine.begin() as conn:
        base = conn.execute(sa.select(schema.snapshot_cache)).mappings().one()
        conn.execute(schema.snapshot_cache.insert().values(
            {**base, "part": 1, "watermark": json.dumps(
                {"from": [0, None], "moved": [], "part": 1})}))
    assert "the stored parts do not follow one another" in read_path()
    assert _parts(engine) == [0]
    # The same, offset: a late-committing file stamped before the watermark while a
    # rejected file's row is re-stamped after it. The count before the watermark holds;
    # which files, stamped when, does not.
    with engine.begin() as conn:
        restamped = conn.execute(sa.select(schema.file_ledger.c.source_checksum)
                                 .order_by(schema.file_ledger.c.processed_at).limit(1)
                                 ).scalar_one()
        conn.execute(schema.file_ledger.update()
                     .where(schema.file_ledger.c.source_checksum == restamped)
                     .values(processed_at=datetime(2999, 1, 1, tzinfo=UTC)))
        _ledger_row(conn, "1", "procedures_20230102.csv", "rejected",
                    datetime(2000, 1, 2, tzinfo=UTC))
    assert "the ledger changed at or before the watermark" in read_path()
    assert read_path().startswith("snapshot cache: unchanged read")
    # A complication pending at the watermark, promoted later under its own (older) file's
    # checksum by a file that wrote nothing of its procedure: read by its id, a delta.
    columns = [c.name for c in schema.complication.columns]
    with engine.begin() as conn:
        waiting = conn.execute(sa.select(schema.complication).where(
            schema.complication.c.event_type.in_(COUNTED)).limit(1)).mappings().one()
        conn.execute(schema.complication.delete().where(
            schema.complication.c.complication_id == waiting["complication_id"]))
        conn.execute(schema.pending_complication.insert().values(
            {**{c: waiting[c] for c in columns}, "source_record": 1}))
    assert "row counts differ" in read_path()  # rebuilt with it pending
    with engine.begin() as conn:
        conn.execute(schema.pending_complication.delete().where(
            schema.pending_complication.c.complication_id == waiting["complication_id"]))
        conn.execute(schema.complication.insert().values({c: waiting[c] for c in columns}))
        _ledger_row(conn, "2", "procedures_29990102.csv", "loaded",
                    datetime(2999, 1, 2, tzinfo=UTC))
    assert read_path().startswith("snapshot cache: delta read")
    # A cached complication moved back to pending and quarantined within the window (no
    # pending row left): the quarantine of the window's file removes it from the cache.
    with engine.begin() as conn:
        gone = conn.execute(sa.select(schema.complication).where(
            schema.complication.c.event_type.in_(COUNTED)).limit(1)).mappings().one()
        conn.execute(schema.complication.delete().where(
            schema.complication.c.complication_id == gone["complication_id"]))
        # No pending row and no row of it in the window's file: only the quarantine row
        # tells the delta the complication is gone (else the counts send it to a full read).
        _ledger_row(conn, "3", "complications_29990103.csv", "loaded",
                    datetime(2999, 1, 3, tzinfo=UTC))
        conn.execute(schema.quarantine.insert().values(
            source_checksum="3" * 64, record_number=1, file_name="complications_29990103.csv",
            kind="complications", site_id=gone["site_id"], record_id=gone["complication_id"],
            raw_values="{}", reasons='["procedure_id:unknown"]',
            quarantined_at=datetime(2999, 1, 3, tzinfo=UTC)))
    assert read_path().startswith("snapshot cache: delta read")
    # Other columns (no extras): another cache row, read in full.
    caplog.clear()
    plain = _cached_read(engine, as_of, extras=())
    assert "no cache for these columns" in caplog.records[0].getMessage()
    assert plain.extras is None
    assert plain.fingerprint == _full_read(engine, as_of).fingerprint
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count(sa.distinct(
            schema.snapshot_cache.c.cache_key)))).scalar_one() == 2

    # A cache that cannot be read never stops the monitor: the plain read runs.
    def broken(*args):
        raise RuntimeError("cache unreadable")

    monkeypatch.setattr(snapshot_cache, "_fetch_parts", broken)
    caplog.clear()
    snapshot = _cached_read(engine, as_of)
    assert "snapshot cache: failed (RuntimeError: cache unreadable); plain read" in caplog.text
    _same_snapshot(snapshot, _full_read(engine, as_of))


def test_sqlite_reads_without_the_cache(tmp_path, sqlite_url, settings_for, caplog):
    """The cache is PostgreSQL-only: on SQLite the plain read runs, and says so."""
    caplog.set_level(logging.INFO, logger="pipelines.surveillance.snapshot_cache")
    files = _deliveries(tmp_path)
    assert ingest_paths(settings_for(sqlite_url), files["history"]).exit_code == 0
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        cached = snapshot_cache.load_cached_snapshot(conn, PROFILE, date(2023, 12, 26))
        plain = load_snapshot(conn, PROFILE, date(2023, 12, 26))
    engine.dispose()
    assert "not used (sqlite" in caplog.records[-1].getMessage()
    assert cached.fingerprint == plain.fingerprint and len(cached.procedures) > 3000


def test_the_cache_blobs_do_not_outlive_the_read(night):
    """Neither the written blobs nor the driver's buffers stay alive for the monitor's run.

    Bound as parameters, not as a statement's values (SQLAlchemy's statement cache kept the
    first statement's values: a 28 MB blob for the whole run), on a connection closed
    afterwards (libpq keeps its buffers at their largest message).
    """
    import tracemalloc

    _, engine, run, files, _ = night
    result, _, _ = run(files["history"])
    with engine.begin() as conn:
        conn.execute(schema.snapshot_cache.delete())
    tracemalloc.start(40)
    try:
        snapshot = _cached_read(engine, result.as_of)  # a full read: writes part 0
        traces = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, snapshot_cache.__file__)])
    finally:
        tracemalloc.stop()
    alive = [s for s in traces.statistics("traceback")
             if any("_to_ipc" in line for line in s.traceback.format())]
    assert snapshot.fingerprint == _full_read(engine, result.as_of).fingerprint
    assert sum(s.size for s in alive) < 4096, [s.traceback.format()[-2:] for s in alive]
    assert _parts(engine) == [0]


def test_the_cache_is_written_aside_and_a_failed_write_never_stops_the_read(night, monkeypatch,
                                                                            caplog):
    """Inside store_cache_aside() the part 0 is written by a thread, done when the block is
    left (and then read back as the same snapshot); a write that fails is only logged."""
    import threading

    _, engine, run, files, _ = night
    result, _, _ = run(files["history"])
    with engine.begin() as conn:
        conn.execute(schema.snapshot_cache.delete())
    written_by = []
    write = snapshot_cache._write

    def spy(*args):
        written_by.append(threading.current_thread().name)
        return write(*args)

    monkeypatch.setattr(snapshot_cache, "_write", spy)
    with snapshot_cache.store_cache_aside():
        snapshot = _cached_read(engine, result.as_of)
    assert written_by == ["snapshot-cache-store"]
    assert _parts(engine) == [0]
    full = _full_read(engine, result.as_of)
    _same_snapshot(snapshot, full)
    caplog.clear()
    _same_snapshot(_cached_read(engine, result.as_of), full)  # the COPY'd part 0, read back
    assert _cache_paths(caplog) == ["unchanged"]

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(snapshot_cache, "_write", broken)
    with engine.begin() as conn:
        conn.execute(schema.snapshot_cache.delete())
    caplog.clear()
    with snapshot_cache.store_cache_aside():
        snapshot = _cached_read(engine, result.as_of)
    assert "snapshot cache: not stored (RuntimeError: disk full)" in caplog.text
    _same_snapshot(snapshot, full)
    assert _parts(engine) == []


def test_the_cache_write_has_the_server_try_lz4_for_that_transaction_only(pg_url):
    """pglz spends about a second failing to compress the lz4 blobs again; the write asks
    for lz4 (which fails at once) in its own transaction, and the blobs read back the same."""
    engine = make_engine(pg_url)
    schema.metadata.create_all(engine)
    with engine.connect() as conn:
        has_lz4 = conn.exec_driver_sql(
            "SELECT coalesce(bool_or('lz4' = ANY(enumvals)), false) FROM pg_settings "
            "WHERE name = 'default_toast_compression'").scalar()
        if not has_lz4:
            print("skipped: this PostgreSQL server has no lz4 TOAST compression "
                  "(before 14, or built without lz4); the write keeps the server's default")
            pytest.skip("PostgreSQL without lz4 TOAST compression")
        default = conn.exec_driver_sql("SHOW default_toast_compression").scalar()
        conn.rollback()
        with conn.begin():
            snapshot_cache._toast_with_lz4(conn)
            assert conn.exec_driver_sql("SHOW default_toast_compression").scalar() == "lz4"
        assert conn.exec_driver_sql("SHOW default_toast_compression").scalar() == default
        conn.rollback()
    # Compressible blobs (the real ones are not): the server then stores them compressed,
    # and pg_column_compression says by which method, so a write that stopped asking for
    # lz4 fails here (pglz is this server's default).
    blob = bytes(range(256)) * 4096
    snapshot_cache._write(engine, {"cache_key": "k", "part": 0, "watermark": "{}",
                                   "procedures": blob, "complications": blob[::-1],
                                   "built_at": datetime.now(UTC)})
    with engine.connect() as conn:
        stored = conn.execute(sa.select(
            schema.snapshot_cache.c.procedures, schema.snapshot_cache.c.complications,
            sa.func.pg_column_compression(schema.snapshot_cache.c.procedures))).one()
    assert bytes(stored[0]) == blob and bytes(stored[1]) == blob[::-1]
    assert default != "lz4" and stored[2] == "lz4"


def _raw_full_read(engine):
    """Return the cache's full read (every row's columns and their id hashes), read afresh."""
    needs_patient, event_types = snapshot_needs(PROFILE)
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        state = snapshot_cache._warehouse_state(conn)
        read = snapshot_cache._full(conn, state, needs_patient, event_types, EXTRA_COLUMNS, "")
        conn.rollback()
    return read


def test_a_full_read_in_page_ranges_on_parallel_connections_equals_one_read(night,
                                                                             monkeypatch):
    """The procedures read as page ranges, each range and the complications on a connection
    of its own: the same tables, in the same row order, and the same id hashes as one read;
    and every connection reads the first one's snapshot, even after a change committed
    before it connected (every complication deleted, every patient a year older)."""
    import threading

    _, engine, run, files, _ = night
    run(files["history"])
    monkeypatch.setattr(snapshot_cache, "PROCEDURE_STREAMS", 1)
    whole = _raw_full_read(engine)
    with engine.connect() as conn:
        assert len(snapshot_cache._page_ranges(conn, 3)) == 1  # a small table: read whole
        monkeypatch.setattr(snapshot_cache, "MIN_STREAM_PAGES", 1)
        assert len(snapshot_cache._page_ranges(conn, 3)) == 3
    monkeypatch.setattr(snapshot_cache, "PROCEDURE_STREAMS", 3)
    in_snapshot = snapshot_cache._in_snapshot
    threads = []
    lock = threading.Lock()

    def changed_meanwhile(*args):
        with lock:
            threads.append(threading.current_thread().name)
            if len(threads) == 1:  # committed before any other connection begins
                with engine.begin() as other:
                    other.execute(schema.complication.delete())
                    other.execute(schema.procedure.update().values(
                        age_years=schema.procedure.c.age_years + 1))
        return in_snapshot(*args)

    monkeypatch.setattr(snapshot_cache, "_in_snapshot", changed_meanwhile)
    ranged = _raw_full_read(engine)
    assert len(set(threads)) == 3  # a thread for each read but the first
    for name in ("procedures", "complications"):
        assert getattr(ranged, name).equals(getattr(whole, name)), name
        assert getattr(ranged, name).num_rows > 1000
    for mine, theirs in zip(ranged.id_hashes, whole.id_hashes, strict=True):
        assert (mine == theirs).all()
    assert all(column.num_chunks == 1 for column in ranged.procedures.columns)
    with engine.connect() as conn:  # the changes were committed
        assert not conn.execute(sa.select(sa.func.count()).select_from(schema.complication)
                                ).scalar_one()


_EXCLUSIVE_LOCK = {  # what a migration's ALTER TABLE or a VACUUM FULL asks for
    "procedure": sa.text("LOCK TABLE procedure IN ACCESS EXCLUSIVE MODE"),
    "complication": sa.text("LOCK TABLE complication IN ACCESS EXCLUSIVE MODE"),
}


@pytest.mark.parametrize("table", ["procedure", "complication"])
def test_a_lock_request_queued_behind_the_read_does_not_hang_it(night, monkeypatch, table):
    """An ACCESS EXCLUSIVE request (a migration, VACUUM FULL) queued after the main
    connection took its lock waits for it, and a helper connection's lock waits behind the
    request: a wait PostgreSQL cannot see as a deadlock (the main connection waits for the
    helper in this process). The helper gives up after its lock timeout, the main
    connection reads its rows itself, and the read ends with the same rows as one read.
    Without the helper's lock timeout this test waits until the request's own timeout."""
    import threading
    import time

    _, engine, run, files, _ = night
    run(files["history"])
    monkeypatch.setattr(snapshot_cache, "PROCEDURE_STREAMS", 1)
    whole = _raw_full_read(engine)
    monkeypatch.setattr(snapshot_cache, "PROCEDURE_STREAMS", 2)
    monkeypatch.setattr(snapshot_cache, "MIN_STREAM_PAGES", 1)
    monkeypatch.setattr(snapshot_cache, "HELPER_LOCK_TIMEOUT_MS", 200)
    needs_patient, event_types = snapshot_needs(PROFILE)
    target = getattr(schema, table)
    request: dict = {}

    def exclusive_lock():
        with engine.connect() as other:
            other.execute(sa.text("SET lock_timeout = '20s'"))
            started = time.monotonic()
            try:
                other.execute(_EXCLUSIVE_LOCK[table])
                request["waited"] = time.monotonic() - started
            except sa.exc.OperationalError as exc:
                request["error"] = str(exc).splitlines()[0]
            other.rollback()

    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        state = snapshot_cache._warehouse_state(conn)
        conn.execute(sa.select(sa.func.count()).select_from(target))  # holds ACCESS SHARE
        locker = threading.Thread(target=exclusive_lock)
        locker.start()
        with engine.connect() as probe:  # wait until the request is queued
            for _ in range(200):
                if probe.execute(sa.text("SELECT count(*) FROM pg_locks WHERE NOT granted "
                                         "AND mode = 'AccessExclusiveLock'")).scalar():
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the ACCESS EXCLUSIVE request never queued")
        started = time.monotonic()
        read = snapshot_cache._full(conn, state, needs_patient, event_types, EXTRA_COLUMNS, "")
        took = time.monotonic() - started
        conn.rollback()
    locker.join()
    assert took < 10, took  # not until the request's 20 s timeout
    assert "error" not in request and request["waited"] < 15, request  # it got its lock
    for name in ("procedures", "complications"):
        assert getattr(read, name).equals(getattr(whole, name)), name
    for mine, theirs in zip(read.id_hashes, whole.id_hashes, strict=True):
        assert (mine == theirs).all()
