"""VLAD and p-charts drawn for every site at once (``charts.VladBatch``, ``PchartBatch``)
are byte for byte the charts drawn one site at a time (issue 11)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.evidence import MonthSeries
from pipelines.report import charts
from pipelines.report.charts import (
    PchartBatch,
    VladBatch,
    pchart_svg,
    rounded_many,
    vlad_svg,
)
from pipelines.report.common import csv_text, rounded_texts


def _months(first: int, units: list[int], events: list[int], expected: list[float]) -> MonthSeries:
    month = [f"{2020 + (first + i) // 12}-{(first + i) % 12 + 1:02d}" for i in range(len(units))]
    before = [len(units) - 1 - i for i in range(len(units))]
    return MonthSeries(
        tuple(month), tuple(units), tuple(events), tuple(map(float, expected)), tuple(before)
    )


def _random_months(
    rng: np.random.Generator, length: int, *, zeros: float = 0.1, scale: float = 1.0
) -> MonthSeries:
    units = rng.integers(1, 40, length)
    units[rng.random(length) < zeros] = 0
    expected = units * rng.uniform(0.02, 0.2, length) * scale
    events = rng.binomial(
        units, np.clip(expected / np.maximum(units, 1) * rng.uniform(0.3, 2.5), 0, 1)
    )
    return _months(int(rng.integers(0, 24)), units.tolist(), events.tolist(), expected.tolist())


def _vlad_cases() -> list[tuple]:
    """``(key, months, direction, flags, odds_ratio)``: random sites and edge cases."""
    rng = np.random.default_rng(11)
    cases = []
    flag_sets = [
        [("alarm", 4.2), ("watch", 2.9)],
        [("alarm", 5.5)],
        [],
        [("Bernoulli CUSUM", 3.3), ("risk-adjusted CUSUM", 0.0), ("x", 2.2)],
        [("alarm", 0.0), ("watch", 1.7)],
    ]
    for i in range(160):
        length = int(rng.choice([1, 2, 5, 12, 36, 49, 50, 51, 60, 75]))
        cases.append(
            (
                ("R", i),
                _random_months(rng, length, scale=float(rng.choice([1.0, 0.01, 30.0]))),
                "down" if i % 3 == 0 else "up",
                flag_sets[i % 5],
                float(rng.choice([2.0, 1.5, 0.5, 3.0])),
            )
        )
    cases += [
        (
            ("no mature months", 0),
            _months(0, [0, 0, 0], [0, 0, 0], [0.0, 0.0, 0.0]),
            "up",
            flag_sets[0],
            2.0,
        ),
        (("one month", 0), _months(5, [12], [3], [1.25]), "up", flag_sets[0], 2.0),
        (
            ("one month", 1),
            _months(5, [0, 12, 0], [0, 0, 0], [0.0, 0.0, 0.0]),
            "down",
            flag_sets[1],
            2.0,
        ),
        (("as expected", 0), _months(0, [10] * 8, [0] * 8, [0.0] * 8), "up", [], 2.0),
        (
            ("NaN expected", 0),
            _months(0, [10, 12, 9, 11], [1, 2, 0, 3], [1.0, float("nan"), 0.9, 1.1]),
            "up",
            flag_sets[0],
            2.0,
        ),
        (
            ("NaN expected", 1),
            _months(0, [10, 12], [1, 2], [float("nan"), 0.5]),
            "down",
            flag_sets[1],
            2.0,
        ),
        (
            ("odds ratio 1", 0),
            _months(0, [10, 10, 10], [1, 5, 0], [1.0, 1.0, 1.0]),
            "up",
            flag_sets[0],
            1.0,
        ),
        (("odds ratio 0", 0), _months(0, [10, 10], [1, 5], [1.0, 1.0]), "up", flag_sets[0], 0.0),
        (
            ("four flags", 0),
            _months(0, [10, 10], [1, 5], [1.0, 1.0]),
            "up",
            [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)],
            2.0,
        ),
        (
            ("ties", 0),
            _months(0, [10, 10, 10, 10], [1, 0, 2, 1], [0.25, 0.125, 0.0625, 0.5]),
            "up",
            [("alarm", 0.6931471805599453)],
            2.0,
        ),
        (("huge", 0), _months(0, [10, 10], [40000, 5], [0.5, 1.0]), "up", flag_sets[0], 2.0),
    ]
    return cases


def _same_vlad(cases, batch):
    used = 0
    for key, months, direction, flags, odds_ratio in cases:
        title = f"{key} cement leak: observed \u2212 expected"
        alone = vlad_svg(months, title, direction=direction, flags=flags, odds_ratio=odds_ratio)
        batched = vlad_svg(
            months,
            title,
            direction=direction,
            flags=flags,
            odds_ratio=odds_ratio,
            batch=batch,
            key=key,
        )
        used += batch.drawn(key, title, months, direction, flags, odds_ratio) is not None
        if alone is None:
            assert batched is None, key
            continue
        assert batched[0] == alone[0], key
        assert batched[1] == alone[1], key
        assert csv_text(batched[1], batched[2]) == csv_text(alone[1], alone[2]), key
    return used


def test_vlad_batch_draws_every_chart_as_drawn_alone():
    cases = _vlad_cases()
    batch = VladBatch(cases)
    used = _same_vlad(cases, batch)
    # the batch drew every chart but those without months and the one with four flags
    # (a NaN's lines fall back to drawing alone, line by line)
    drawable = [c for c in cases if any(c[1].units) and len(c[3]) <= 3]
    assert (
        used == len(drawable) == len(cases) - 2 - sum(1 for c in cases[:160] if not any(c[1].units))
    ), used


def test_vlad_batch_lines_and_cells_come_from_the_batch():
    """The batch's own texts are used (not only the fall-back): each chart of the random
    cases takes its line and flag texts and CSV rows from the batch."""
    cases = _vlad_cases()[:160]
    batch = VladBatch(cases)
    asked = []
    for key, months, *_ in cases:
        if not any(months.units):
            continue
        row = batch._row[key]
        assert batch._path_texts[row] is not None, key
        asked.append(key)
        for i, _, _ in batch._names[row]:
            assert batch._level_texts[(row, i)] is not None, key
    assert len(asked) >= 150


def test_vlad_batch_refuses_other_inputs():
    cases = _vlad_cases()[:3]
    batch = VladBatch(cases)
    key, months, direction, flags, odds_ratio = cases[1]
    assert batch.drawn(key, "t", months, direction, flags, odds_ratio) is not None
    other = "up" if direction == "down" else "down"
    assert batch.drawn(key, "t", months, other, flags, odds_ratio) is None
    assert batch.drawn(key, "t", months, direction, [*flags, ("x", 1.0)], odds_ratio) is None
    assert batch.drawn(key, "t", months, direction, flags, odds_ratio * 2) is None
    assert batch.drawn(("not", "there"), "t", months, direction, flags, odds_ratio) is None
    changed = MonthSeries(
        months.month,
        months.units,
        months.events,
        tuple(v + 1 for v in months.expected),
        months.months_before_as_of,
    )
    assert batch.drawn(key, "t", changed, direction, flags, odds_ratio) is None


def _pchart(
    rng: np.random.Generator, sites: int, quarters: int, *, limit: bool = True, p0: float = 0.106
) -> dict:
    n = rng.integers(0, 60, (sites, quarters))
    n[rng.random((sites, quarters)) < 0.15] = 0
    rate = rng.uniform(0.0, 0.35, (sites, 1))
    events = rng.binomial(n, rate)
    chart = {
        "metric": "cement_leak",
        "sites": [f"S{i:04d}" for i in range(sites)],
        "labels": [f"{2021 + q // 4}-Q{q % 4 + 1}" for q in range(quarters)],
        "n": n,
        "events": events,
        "p0": p0,
        "alpha": 0.001,
    }
    if limit:
        chart["limit"] = np.where(
            n > 0, p0 + 2.5 * np.sqrt(p0 * (1 - p0) / np.maximum(n, 1)), np.nan
        )
    return chart


def _same_pchart(chart, guidance, extra_sites=()):
    batch = PchartBatch(chart, guidance)
    used = 0
    for site in [*chart["sites"], *extra_sites]:
        title = f"{site} Cement leak: quarterly p-chart"
        alone = pchart_svg(chart, site, title, guidance=guidance)
        batched = pchart_svg(chart, site, title, guidance=guidance, batch=batch)
        used += batch.drawn(chart, site, title, guidance) is not None
        if alone is None:
            assert batched is None, site
            continue
        assert batched[0] == alone[0], site
        assert batched[1] == alone[1], site
        assert csv_text(batched[1], batched[2]) == csv_text(alone[1], alone[2]), site
    return batch, used


@pytest.mark.parametrize("guidance", [(0.05, 0.20), (None, None), (0.0, 0.4)])
def test_pchart_batch_draws_every_site_as_drawn_alone(guidance):
    rng = np.random.default_rng(5)
    chart = _pchart(rng, 120, 12)
    # edge cases: no p-chart rows (no units at all), one quarter with units, every
    # quarter above the limit, none above, a limit that is infinite or missing
    chart["n"][0] = 0
    chart["events"][0] = 0
    chart["n"][1] = 0
    chart["n"][1, 4] = 20
    chart["events"][1, 4] = 3
    chart["n"][2] = 50
    chart["events"][2] = 45
    chart["limit"][2] = 0.3
    chart["events"][3] = 0
    chart["limit"][4, 2] = np.inf
    chart["limit"][5, 3] = np.nan
    batch, used = _same_pchart(chart, guidance, extra_sites=["S9999"])
    drawable = int((chart["n"].sum(axis=1) > 0).sum())
    assert used == drawable, used
    # the batch wrote every line and marker but the limit lines through a limit that is
    # not finite (such a line is drawn alone, inside the same chart)
    missing = [
        i for i, text in enumerate(batch._limit_texts) if text is None and chart["n"][i].any()
    ]
    gaps = (chart["n"] > 0) & ~np.isfinite(chart["limit"])
    assert 4 in missing and missing == np.flatnonzero(gaps.any(axis=1)).tolist(), missing
    # and the others (but a coordinate only formatting rounds right, now and then)
    for made in (batch._p_texts, batch._plain):
        assert sum(made[i] is None for i in range(120) if chart["n"][i].any()) <= 2
    assert batch._above[2].all() and not batch._above[3].any()


def test_pchart_batch_without_a_limit_and_of_one_quarter():
    rng = np.random.default_rng(6)
    for chart in (
        _pchart(rng, 30, 12, limit=False),
        _pchart(rng, 30, 1),
        _pchart(rng, 30, 6, p0=0.0),
        _pchart(rng, 30, 40),
    ):
        chart["n"][0] = np.maximum(chart["n"][0], 1)
        _, used = _same_pchart(chart, (0.02, 0.3))
        assert used == int((chart["n"].sum(axis=1) > 0).sum())


def test_pchart_batch_is_used_only_for_its_chart_and_guidance():
    rng = np.random.default_rng(7)
    chart = _pchart(rng, 5, 8)
    chart["n"][:, 0] = 10
    batch = PchartBatch(chart, (0.05, 0.2))
    assert batch.drawn(chart, "S0001", "t", (0.05, 0.2)) is not None
    assert batch.drawn(chart, "S0001", "t", (0.05, 0.21)) is None
    assert batch.drawn(dict(chart), "S0001", "t", (0.05, 0.2)) is None


def test_rounded_many_is_rounded_texts():
    rng = np.random.default_rng(3)
    values = np.concatenate(
        [
            rng.normal(0, 5, 5000),
            rng.normal(0, 0.001, 2000),
            rng.uniform(-9999, 9999, 2000),
            np.round(rng.normal(0, 50, 2000), 4),
            np.round(rng.normal(0, 50, 2000), 5),
            np.arange(-200, 200) / 8 + 0.00005,
            np.arange(-200, 200) / 16,
            [
                0.0,
                -0.0,
                -0.00001,
                0.00005,
                -0.00005,
                0.00015,
                1e-9,
                -1e-9,
                9999.99995,
                9999.99994,
                10000.0,
                12345.6789,
                1e12,
                -1e12,
                math.nan,
                math.inf,
                -math.inf,
                2.5e-5,
                0.5,
                1.00005,
                2.675,
            ],
        ]
    )
    for digits in (4, 2, 1):
        assert rounded_many(values, digits).tolist() == rounded_texts(values, digits)


def test_batches_draw_the_report_pages_they_replace(sqlite_url, settings_for):
    """On a monitored registry, every site page is the same with the batches as with each
    chart drawn alone, and the batches drew the charts."""
    from pipelines.db import make_engine
    from pipelines.report import ReportData
    from pipelines.report import site as site_module
    from pipelines.report.publish import _site_ids
    from pipelines.surveillance.engine import run_monitor
    from tests.test_engine import build_sites

    engine = make_engine(sqlite_url)
    build_sites(engine, sites=5, per_site=260, leak={"S004": 0.35}, seed=3)
    settings = settings_for(sqlite_url)
    run_monitor(settings)
    data = ReportData(settings, None)
    sites = _site_ids(data)
    counted = {"vlad": 0, "pchart": 0}
    vlad_drawn, pchart_drawn = VladBatch.drawn, PchartBatch.drawn

    def counting(kind, drawn):
        def wrapped(self, *args):
            made = drawn(self, *args)
            counted[kind] += made is not None
            return made

        return wrapped

    VladBatch.drawn = counting("vlad", vlad_drawn)
    PchartBatch.drawn = counting("pchart", pchart_drawn)
    try:
        site_module.site_batches(data)
        batched = {site: site_module.site_page(data, site) for site in sites}
    finally:
        VladBatch.drawn, PchartBatch.drawn = vlad_drawn, pchart_drawn
    assert counted["vlad"] >= 4 * len(sites) - 4 and counted["pchart"] >= len(sites), counted
    VladBatch.drawn = PchartBatch.drawn = lambda self, *args: None
    try:
        alone = {site: site_module.site_page(data, site) for site in sites}
    finally:
        VladBatch.drawn, PchartBatch.drawn = vlad_drawn, pchart_drawn
    assert batched == alone


def test_layout_is_the_charts_own():
    """The batches make their texts for the plot area Chart.render draws in."""
    from pipelines.report.svgplot import Chart

    plot = Chart(title="t", x_label="x", y_label="y", x_scale="date")
    plot.line([1.0, 2.0], [1.0, 2.0])
    plot.render()
    assert plot._frame[4:] == charts._LAYOUT


def _frames_of(draw, monkeypatch) -> list[tuple]:
    """Return the frame of every chart ``draw()`` renders."""
    from pipelines.report.svgplot import Chart

    frames = []
    render = Chart.render

    def recording(self):
        out = render(self)
        frames.append(self._frame)
        return out

    monkeypatch.setattr(Chart, "render", recording)
    draw()
    monkeypatch.setattr(Chart, "render", render)
    return frames


def test_batch_frames_are_the_frames_each_chart_is_drawn_in(monkeypatch):
    """The batches' texts are made for the frame each chart alone is drawn in, so they are
    the ones used (a text made for another frame would be ignored, not wrong)."""
    cases = [c for c in _vlad_cases() if any(c[1].units) and len(c[3]) <= 3]
    batch = VladBatch(cases)
    frames = _frames_of(
        lambda: [vlad_svg(m, "t", direction=d, flags=f, odds_ratio=o) for _, m, d, f, o in cases],
        monkeypatch,
    )
    assert frames == [batch._frames[batch._row[c[0]]] for c in cases]
    rng = np.random.default_rng(9)
    chart = _pchart(rng, 60, 12)
    for guidance in ((0.05, 0.2), (None, None)):
        batch = PchartBatch(chart, guidance)
        sites = [s for i, s in enumerate(chart["sites"]) if chart["n"][i].any()]
        frames = _frames_of(
            lambda: [pchart_svg(chart, s, "t", guidance=guidance) for s in sites],  # noqa: B023
            monkeypatch,
        )
        assert frames == [batch._frames[batch._code[s]] for s in sites]
