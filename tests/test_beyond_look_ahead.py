"""A look-ahead monitor run leaves the operator and device charts, and their alerts, alone."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from pipelines import schema
from pipelines.alerts import sync_alerts
from pipelines.db import make_engine
from pipelines.ingest import ingest_paths
from pipelines.surveillance.engine import run_monitor
from tests.beyond_helpers import write_registry

TABLES = (schema.operator_chart, schema.device_product_chart, schema.device_lot_test)


def _stored(engine) -> dict[str, list[tuple]]:
    with engine.connect() as conn:
        return {
            t.name: sorted(tuple(str(v) for v in row) for row in conn.execute(sa.select(t)))
            for t in TABLES
        }


def _open_training_reviews(engine) -> set[str]:
    with engine.connect() as conn:
        return set(
            conn.scalars(
                sa.select(schema.alert.c.alert_id).where(
                    schema.alert.c.kind == "training_review", schema.alert.c.state == "open"
                )
            )
        )


def test_a_look_ahead_run_does_not_replace_the_operator_and_device_rows(
    tmp_path, db_url, settings_for
):
    registry = write_registry(tmp_path / "in")
    settings = settings_for(db_url, clinical_leads={"S001": ("lead@example.org",)})
    ingest_paths(settings, registry["paths"])
    newest = run_monitor(settings)
    sync_alerts(settings)
    engine = make_engine(db_url)
    stored = _stored(engine)
    reviews = _open_training_reviews(engine)
    assert stored["operator_chart"] and reviews  # the planted learner at S001

    # 60 days after the newest procedure: past the 30-day grace, inside the 365-day window.
    later = run_monitor(settings, as_of=newest.as_of + timedelta(days=60))
    assert later.persisted
    assert _stored(engine) == stored
    sync_alerts(settings)
    assert _open_training_reviews(engine) == reviews

    # Rows a look-ahead left behind before this rule give way to the next run on the data,
    # but not to a backfill (review: they count as of the newest procedure, as the site
    # picture's do).
    with engine.begin() as conn:
        for table in TABLES:
            conn.execute(table.update().values(as_of=later.as_of))
    left_behind = _stored(engine)
    run_monitor(settings, as_of=newest.as_of - timedelta(days=100))
    assert _stored(engine) == left_behind
    run_monitor(settings)
    assert _stored(engine) == stored
    engine.dispose()
