"""The monitor's single read gives the operator and device charts what their own read gave.

On PostgreSQL the operator / product / lot columns come in the snapshot's ``COPY``
(``load_snapshot(extras=...)``), aligned with its rows, and each unit's extras are taken by
row; before, a second read of the procedures matched every unit's id. Both paths run here
on one warehouse and must give equal rows. Also: the risk-adjusted ARL simulation, now made
a few hundred runs at a time, gives the first-passage times of one pass over all runs; and a
failure of the operator and device charts, computed before the site charts, is raised only
after the site run is stored.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from pipelines.db import make_engine
from pipelines.schema import monitor_run, procedure
from pipelines.settings import REPO_DIR
from pipelines.surveillance import arl, beyond_run
from pipelines.surveillance.beyond_run import EXTRA_COLUMNS, compute_beyond_site
from pipelines.surveillance.engine import run_monitor
from pipelines.surveillance.outcomes import load_snapshot
from pipelines.surveillance.profile import load_profile

PROFILE = load_profile(REPO_DIR / "profiles" / "htg108.yaml")


@pytest.fixture
def warehouse(pg_url):
    """A small simulated PostgreSQL warehouse (the monitor benchmark's generator)."""
    sys.path.insert(0, str(REPO_DIR / "benchmarks"))
    try:
        import monitor_data
    finally:
        sys.path.remove(str(REPO_DIR / "benchmarks"))
    engine = make_engine(pg_url)
    built = monitor_data.build_warehouse(engine, PROFILE, volume_scale=1.0, sites=8,
                                         start="2022-01-01", end="2023-06-30")
    yield engine, built["as_of"]
    engine.dispose()


def test_extras_read_with_the_snapshot_equal_the_separate_read(warehouse):
    engine, as_of = warehouse
    with engine.connect() as conn:
        plain = load_snapshot(conn, PROFILE, as_of)
        merged = load_snapshot(conn, PROFILE, as_of, extras=EXTRA_COLUMNS)
        stored = pd.DataFrame(conn.execute(
            sa.select(procedure.c.procedure_id, *(procedure.c[c] for c in EXTRA_COLUMNS))
            .where(procedure.c.procedure_date <= as_of)).all(),
            columns=["procedure_id", *EXTRA_COLUMNS]).set_index("procedure_id")
    # The site charts see the same snapshot, and the run the same fingerprint.
    assert plain.extras is None
    assert merged.fingerprint == plain.fingerprint
    pd.testing.assert_frame_equal(merged.procedures, plain.procedures)
    # Row i of the extras is procedure i's own values.
    ids = merged.procedures["procedure_id"].to_numpy(dtype=object)
    assert len(merged.extras) == len(ids) > 1000
    for name in EXTRA_COLUMNS:
        assert merged.extras[name].astype(object).tolist() == stored.loc[ids, name].tolist()
    with engine.connect() as conn:
        by_row = compute_beyond_site(conn, PROFILE, merged)
        by_id = compute_beyond_site(conn, PROFILE, plain)  # its own read, ids matched
    assert by_row == by_id
    assert by_row["operators"] and by_row["products"] and by_row["lots"]


def test_beyond_failure_is_raised_after_the_site_run_is_stored(warehouse, settings_for,
                                                               monkeypatch):
    engine, _ = warehouse
    settings = settings_for(engine.url.render_as_string(hide_password=False))

    def broken(*args, **kwargs):
        raise RuntimeError("operator charts broke")

    monkeypatch.setattr(beyond_run, "compute_beyond_site", broken)
    with pytest.raises(RuntimeError, match="operator charts broke"):
        run_monitor(settings)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(monitor_run)).scalar() == 1


@pytest.mark.parametrize(("odds_ratio", "true_odds_ratio"), [(2.0, 1.0), (0.5, 1.0), (2.0, 1.5)])
def test_risk_adjusted_paths_in_chunks_equal_one_pass(monkeypatch, odds_ratio, true_odds_ratio):
    risks = np.random.default_rng(3).uniform(0.01, 0.25, 80)
    thresholds = [2.5, 3.5, 4.5]

    def passage(chunk: int):
        monkeypatch.setattr(arl, "_CHUNK_RUNS", chunk)
        return arl._risk_adjusted_first_passage(risks, odds_ratio, thresholds, true_odds_ratio,
                                                300, 5, 512, 50_000)

    lengths, censored = passage(10**9)  # every run in one chunk: the old single pass
    for chunk in (7, 128):
        chunked_lengths, chunked_censored = passage(chunk)
        np.testing.assert_array_equal(chunked_lengths, lengths)
        np.testing.assert_array_equal(chunked_censored, censored)
    assert lengths.min() > 0 and len(np.unique(lengths)) > 50

