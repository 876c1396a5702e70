"""The stored monitor run is the one hand-off: readers show the stored run's numbers."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np

from pipelines.cli import main as cli_main
from pipelines.db import make_engine
from pipelines.surveillance import engine as engine_module
from pipelines.surveillance.engine import run_monitor
from pipelines.surveillance.profile import load_profile
from pipelines.surveillance.runs import load_run, read_or_compute
from tests.test_engine import build_sites
from tests.test_outcomes import complication_row, insert


def test_a_stored_run_reads_back_equal_to_what_was_computed(db_url, settings_for):
    build_sites(make_engine(db_url), sites=4, per_site=400, leak={"S004": 0.3}, seed=5)
    settings = settings_for(db_url)
    computed = run_monitor(settings)
    profile = load_profile(settings.profile_path)
    with make_engine(db_url).connect() as conn:
        stored = load_run(conn, profile)
    assert stored.run_key == computed.run_key and stored.as_of == computed.as_of
    assert stored.to_dict()["signals"] == computed.to_dict()["signals"]
    assert stored.to_dict()["site_metrics"] == json.loads(json.dumps(
        computed.to_dict()["site_metrics"]))
    assert stored.summary == json.loads(json.dumps(computed.summary))
    # chart series are thinned per site but keep every crossing, exactly
    label = "cement_leak:ra_cusum:up"
    full, thin = computed.charts["cusum"][label], stored.charts["cusum"][label]
    assert int(np.sum(full["signal"])) == int(np.sum(thin["signal"])) > 0
    crossings = np.asarray(full["statistic"])[np.asarray(full["signal"])]
    assert np.allclose(np.asarray(thin["statistic"])[np.asarray(thin["signal"])], crossings,
                       atol=1e-5)


def test_readers_do_not_recompute_and_show_one_run_key(sqlite_url, settings_for, capsys,
                                                       monkeypatch, tmp_path):
    engine = make_engine(sqlite_url)
    end = build_sites(engine, sites=4, per_site=400, leak={"S004": 0.3}, seed=6)
    settings = settings_for(sqlite_url)
    result = run_monitor(settings)

    calls = []
    original = engine_module.compute
    monkeypatch.setattr(engine_module, "compute",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    assert cli_main(["site", "S004", "--db", sqlite_url, "--json"]) == 0
    site = json.loads(capsys.readouterr().out)
    assert cli_main(["sites", "--db", sqlite_url, "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)
    assert calls == []  # neither command evaluated the network
    assert site["run_key"] == sites["run_key"] == result.run_key
    leak = next(m for m in site["metrics"] if m["metric"] == "cement_leak")
    computed = next(m for m in result.site_metrics
                    if m["site_id"] == "S004" and m["metric"] == "cement_leak")
    assert (leak["n"], leak["events"], leak["level"]["level"]) == (
        computed["n"], computed["events"], computed["level"]["level"])

    # Late complications change the data: readers keep showing the stored run until the
    # monitor runs again (one computation, one set of numbers), then the new one.
    insert(engine, [], [complication_row(f"CLATE{i}", f"PS001-{i:05d}", "S001",
                                         end - timedelta(days=200)) for i in range(3)])
    assert cli_main(["site", "S001", "--db", sqlite_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_key"] == result.run_key
    newer = run_monitor(settings)
    assert newer.run_key != result.run_key
    assert cli_main(["site", "S001", "--db", sqlite_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_key"] == newer.run_key


def test_a_past_as_of_without_a_stored_run_is_computed_once_and_stored(sqlite_url,
                                                                        settings_for):
    end = build_sites(make_engine(sqlite_url), sites=3, per_site=300, seed=7)
    settings = settings_for(sqlite_url)
    profile = load_profile(settings.profile_path)
    past = end - timedelta(days=120)
    first = read_or_compute(settings, profile, past)
    assert first.as_of == past and first.persisted
    with make_engine(sqlite_url).connect() as conn:
        again = load_run(conn, profile, past)
    assert again.run_key == first.run_key


def test_facts_aggregated_aside_and_parts_packed_in_a_thread_store_the_same_bytes(
        db_url, settings_for, monkeypatch):
    """The store's overlapped paths (facts on their own connection and the sites' and the
    core parts packed in threads on PostgreSQL, zlib in a worker thread) store every part byte for
    byte as the one-connection, serial store."""
    import sqlalchemy as sa

    from pipelines.schema import monitor_run_part
    from pipelines.surveillance import runs

    build_sites(make_engine(db_url), sites=4, per_site=400, leak={"S004": 0.3}, seed=5)
    started = []

    class Counted(runs.FactsInBackground):
        def __init__(self, *args, **kwargs):
            started.append(1)
            super().__init__(*args, **kwargs)

    class CountedSeries(runs.SeriesInBackground):
        def __init__(self, *args, **kwargs):
            started.append(2)
            super().__init__(*args, **kwargs)

    class CountedCore(runs.CoreInBackground):
        def __init__(self, *args, **kwargs):
            started.append(3)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine_module, "FactsInBackground", Counted)
    monkeypatch.setattr(engine_module, "SeriesInBackground", CountedSeries)
    monkeypatch.setattr(engine_module, "CoreInBackground", CountedCore)
    result = run_monitor(settings_for(db_url))
    assert started == ([1, 2, 3] if db_url.startswith("postgresql") else [])
    engine = make_engine(db_url)
    select = sa.select(monitor_run_part.c.part, monitor_run_part.c.payload).order_by(
        monitor_run_part.c.part)
    with engine.connect() as conn:
        overlapped = [(part, bytes(payload)) for part, payload in conn.execute(select)]
    # the same run stored again the serial way: facts in the transaction, parts one by one
    # (as it stood when the monitor stored it: not yet persisted, its seconds not yet known)
    result.procedure_facts, result.persisted, result.seconds = None, False, 0.0
    monkeypatch.setattr(runs, "_pack_all", lambda parts: [runs._pack(p) for p in parts])
    with engine.begin() as conn:
        runs.store_run(conn, result)
    with engine.connect() as conn:
        serial = [(part, bytes(payload)) for part, payload in conn.execute(select)]
    # core, facts, and per site its chart series and its figures (metrics:<id>)
    assert len(overlapped) == 2 + 4 + 4 and overlapped == serial
    facts = runs._unpack(dict(serial)["facts"])
    assert sorted(facts["deliveries"]) == ["S001", "S002", "S003", "S004"]
    assert facts["network_casemix"]["procedures"] == 1600


def test_pack_all_equals_packing_part_by_part():
    from pipelines.surveillance import runs

    rng = np.random.default_rng(3)
    parts = [{"day": np.arange(n), "statistic": np.round(rng.random(n), 5), "h": None}
             for n in (0, 1, 700, 5000, 20, 3, 9, 11, 13, 2000, 1)]
    assert runs._pack_all(parts) == [runs._pack(p) for p in parts]
    assert runs._pack_all([]) == []


def test_signals_upserted_with_copy_equal_the_executemany(pg_url, settings_for, monkeypatch):
    """PostgreSQL's COPY insert and UPDATE ... FROM a staged copy store what the
    statement-per-row path stores, floats, missing values and dates included."""
    import sqlalchemy as sa

    from pipelines.schema import signal

    build_sites(make_engine(pg_url), sites=4, per_site=400, leak={"S004": 0.3}, seed=5)
    result = run_monitor(settings_for(pg_url))
    assert len(result.signals) > 10
    updatable = engine_module._UPDATABLE
    updates, inserts = [], []
    for i, row in enumerate(result.signals):
        changed = dict(row, statistic=(row["statistic"] or 0.0) + 1 / 3, observed=None,
                       signal_date=row["signal_date"] + timedelta(days=i % 3),
                       detail=json.dumps({"i": i, "text": "ä, \"q\"\t\\n"}), n=i or None,
                       active=i % 2 == 0, last_seen_run="other-run")
        updates.append({f: changed[f] for f in (*updatable, "signal_key")})
        inserts.append(dict(changed, signal_key=f"new-{i:04d}", first_seen_run="other-run"))
    engine = make_engine(pg_url)

    def upserted(copies: bool) -> list[tuple]:
        monkeypatch.setattr(engine_module, "_copies", lambda conn: copies)
        with engine.connect() as conn:
            with conn.begin() as transaction:
                engine_module._upsert_signals(conn, inserts, updates)
                rows = conn.execute(sa.select(signal).order_by(signal.c.signal_key)).all()
                transaction.rollback()
        return [tuple(row) for row in rows]

    with engine.connect() as conn:
        before = [tuple(r) for r in conn.execute(sa.select(signal).order_by(signal.c.signal_key))]
    copied, executed = upserted(True), upserted(False)
    assert copied == executed
    assert len(copied) == 2 * len(before) and copied != before
    assert {row[0] for row in copied} >= {row[0] for row in before}
