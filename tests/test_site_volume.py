"""A site's budget threshold follows its throughput, also in its first weeks (engine._site_volumes)."""

from __future__ import annotations

from datetime import timedelta

import numpy as np

from pipelines.db import make_engine
from pipelines.surveillance.engine import MIN_VOLUME_DAYS, evaluate
from tests.test_engine import START, build_sites


def _h_by_site(result, label: str) -> dict[str, float]:
    chart = result.charts["cusum"][label]
    return {site: float(h) for site, h in zip(chart["sites"], chart["h_sites"], strict=True)}


def test_a_site_in_its_first_weeks_gets_the_threshold_of_its_throughput(db_url, settings_for):
    engine = make_engine(db_url)
    # S001 works for 540 days (about 280 a year); S002 starts 20 days before as_of at the
    # same pace. Before, S002's volume was its charted units (in its first 30 days only its
    # leaks) over a year: ARL0 at the floor and an h a leak or two could cross.
    build_sites(engine, sites=1, per_site=400, days=540)
    build_sites(
        engine,
        sites=2,
        per_site=15,
        days=20,
        start=START + timedelta(days=520),
        prefix="Q",
        seed=2,
        leak={"S002": 0.3},
    )
    result = evaluate(settings_for(db_url))
    engine.dispose()
    for label in ("cement_leak:ra_cusum:up", "cement_leak:bernoulli_cusum:down"):
        h = _h_by_site(result, label)
        # 15 units over the 30-day floor: 183 a year against S001's 281; h moves with the
        # logarithm of ARL0, so S002's is close to S001's (it was under half of it).
        assert h["S002"] >= 0.8 * h["S001"], (label, h)
    assert np.isfinite(list(_h_by_site(result, "cement_leak:ra_cusum:up").values())).all()


def test_a_site_with_one_day_of_work_is_not_read_as_a_huge_volume(db_url, settings_for):
    engine = make_engine(db_url)
    end = build_sites(engine, sites=1, per_site=400, days=540)
    # S002's 12 procedures all on the newest day: over MIN_VOLUME_DAYS that is 146 a year
    # (under S001's 270), over its one day it would read as 4,383 a year and a high h.
    build_sites(
        engine,
        sites=2,
        per_site=12,
        days=1,
        start=end - timedelta(days=1),
        prefix="Q",
        seed=3,
        leak={"S002": 0.5},
    )
    result = evaluate(settings_for(db_url))
    engine.dispose()
    h = _h_by_site(result, "cement_leak:ra_cusum:up")
    assert MIN_VOLUME_DAYS == 30
    assert np.isfinite(h["S002"]) and h["S002"] <= h["S001"], h
