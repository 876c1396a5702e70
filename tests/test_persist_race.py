"""Two monitors storing the same new signals at once: the loser retries, nothing is lost."""

from __future__ import annotations

import logging

import sqlalchemy as sa

from pipelines.db import make_engine
from pipelines.schema import signal
from pipelines.surveillance import engine as engine_module
from pipelines.surveillance.engine import SIGNAL_FIELDS, evaluate
from pipelines.surveillance.profile import load_profile
from tests.test_engine import build_sites


def test_a_concurrent_run_storing_the_same_signals_first_makes_this_one_retry(
        db_url, settings_for, caplog):
    """On PostgreSQL the signals go in with COPY, whose duplicate key is psycopg's error."""
    warehouse = make_engine(db_url)
    build_sites(warehouse, sites=4, per_site=400, leak={"S004": 0.3}, seed=5)
    settings = settings_for(db_url)
    result = evaluate(settings)  # computed, not stored
    assert result.signals, "the planted leak must give signals to race on"
    rival_rows = [{f: row[f] for f in SIGNAL_FIELDS} for row in result.signals]
    rival = make_engine(db_url)
    raced = []

    def rival_stores_first(conn, cursor, statement, parameters, context, executemany):
        # Right after this run has read the stored keys, another monitor commits the same
        # new signals: this run's insert of them then meets duplicate keys.
        if not raced and statement.lstrip().upper().startswith("SELECT") and (
                "signal.signal_key" in statement):
            raced.append(1)
            with rival.begin() as other:
                other.execute(signal.insert(), rival_rows)

    sa.event.listen(warehouse, "after_cursor_execute", rival_stores_first)
    with caplog.at_level(logging.WARNING, logger="pipelines.surveillance.engine"):
        engine_module._persist(warehouse, result, load_profile(settings.profile_path))
    assert raced == [1]
    assert result.persisted
    assert "concurrent run wrote the same signals; retrying (1)" in caplog.text
    with warehouse.connect() as conn:
        stored = conn.execute(sa.select(signal.c.signal_key, signal.c.last_seen_run)).all()
    assert sorted(k for k, _ in stored) == sorted(r["signal_key"] for r in result.signals)
    assert {run for _, run in stored} == {result.run_key}
    warehouse.dispose()
    rival.dispose()
