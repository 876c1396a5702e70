"""The time-to-event chart waits until the network has followed patients through the window."""

from __future__ import annotations

import numpy as np

from pipelines.db import make_engine
from pipelines.surveillance import survival
from pipelines.surveillance.engine import evaluate
from tests.test_engine import build_sites


def _follow(days: int, patients: int, seed: int = 3) -> survival.FollowUp:
    rng = np.random.default_rng(seed)
    index_day = np.sort(rng.integers(0, days, patients))
    # Front-loaded fractures, as in the simulator: about a fifth of patients, mostly early.
    event_day = np.where(
        rng.random(patients) < 0.22,
        index_day + 10 + (356 * rng.beta(1, 2.5, patients)).astype(int),
        -1,
    )
    as_of = days - 1
    event_day = np.where(event_day <= as_of, event_day, -1)
    site = rng.integers(0, 4, patients)
    return survival.follow_up(site, index_day, event_day, 4, 365, as_of, 0.23)


def test_the_shape_is_estimable_only_once_every_bin_is_followed():
    # Ten months of a registry: the last bins were never reached.
    assert not _follow(days=300, patients=3000).shape_estimated
    # A year and a month, but the last bin rests on a handful of patients.
    assert not _follow(days=370, patients=300).shape_estimated
    # Two years of 3,000 patients: about 1,400 followed through the whole window.
    assert _follow(days=730, patients=3000).shape_estimated


def test_shape_estimable_counts_patients_per_bin_and_events():
    widths = np.array([30.0, 30.0, 5.0])
    enough = survival.MIN_PATIENTS_PER_BIN * widths
    assert survival.shape_estimable(enough, np.array([20.0, 10.0, 0.0]), widths)
    assert not survival.shape_estimable(enough - [0, 0, 1], np.array([20.0, 10.0, 0.0]), widths)
    assert not survival.shape_estimable(enough, np.array([20.0, 9.0, 0.0]), widths)


def test_a_registry_in_its_first_year_has_no_time_to_event_chart(db_url, settings_for):
    engine = make_engine(db_url)
    build_sites(engine, sites=4, per_site=300, days=300, fracture_rate=0.3)
    result = evaluate(settings_for(db_url))
    engine.dispose()
    assert "new_fracture" not in result.charts.get("tte", {})
    assert not [s for s in result.signals if s["method"].startswith("tte_cusum")]
    note = result.summary["metrics"]["new_fracture"]["tte"]
    assert note.startswith("not charted yet") and "365-day window" in note


def test_a_registry_past_its_first_year_has_the_chart(db_url, settings_for):
    engine = make_engine(db_url)
    build_sites(engine, sites=4, per_site=400, days=540, fracture_rate=0.3)
    result = evaluate(settings_for(db_url))
    engine.dispose()
    assert "new_fracture" in result.charts["tte"]
    assert "tte" not in result.summary["metrics"]["new_fracture"]


def test_the_methods_page_says_why_the_chart_is_missing(db_url, settings_for):
    from pipelines.report.data import ReportData
    from pipelines.report.methods import methods_page
    from pipelines.surveillance.engine import run_monitor

    engine = make_engine(db_url)
    build_sites(engine, sites=3, per_site=200, days=300, fracture_rate=0.3)
    engine.dispose()
    settings = settings_for(db_url)
    run_monitor(settings)
    page = methods_page(ReportData(settings, None))
    assert "New vertebral fracture within a year (per patient): not charted yet" in page
