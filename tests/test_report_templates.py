"""The report's per-kind shortcuts draw what the general drawer draws, byte for byte
(issue 11): a chart kind's frame, axis names and legend made once (``svgplot._skeleton``),
the CUSUM and time-to-event charts' frames and signals found for every site at once
(``charts._Lines``), and tables of text cells joined row by row (``common._table``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.report import svgplot
from pipelines.report.charts import CusumSeries, TteSeries, _iso_days, cusum_svg, tte_svg
from pipelines.report.common import _table
from pipelines.report.svgplot import Chart, decimate

# -- the general drawer, chart by chart (no batch: every frame, path and signal computed
# -- for the one site, as the report drew them before the batches)


def _cusum_alone(chart: dict, site: str, title: str) -> str | None:
    code = chart["sites"].index(site)
    points = np.flatnonzero(np.asarray(chart["group"]) == code)
    if not len(points):
        return None
    days = np.asarray(chart["day"])[points].astype(float)
    stat = np.asarray(chart["statistic"])[points].astype(float)
    fired = np.asarray(chart["signal"])[points].astype(bool)
    own = chart.get("h_sites", [])
    h = float(own[code]) if code < len(own) and math.isfinite(own[code]) else chart.get("h")
    crossings = _iso_days(days[fired])
    plot = Chart(
        title=title,
        x_label="index date (procedure, or first procedure per patient)",
        y_label="CUSUM statistic (log-likelihood ratio)",
        x_scale="date",
        y_min=0.0,
        description=(
            f"{title}: the statistic now stands at {stat[-1]:.2f}"
            + (f" against the site's threshold h = {h:.3f}" if h is not None else "")
            + f"; {len(crossings)} crossings"
            + (f", the last on {crossings[-1]}" if crossings else "")
            + "."
        ),
    )
    plot.line(*decimate(days, stat), label="CUSUM", width=1.1)
    if h is not None:
        plot.hline(h, label=f"threshold h = {h:.3f}", style="dash")
    if fired.any():
        plot.points(
            days[fired],
            stat[fired],
            label="signal (chart resets)",
            marker="triangle",
            tips=[f"signal {d}" for d in crossings],
        )
    return plot.render()


def _tte_alone(chart: dict, site: str, title: str) -> str:
    series = chart["series"][site]
    stat = np.asarray(series["statistic"], dtype=float)
    h = series.get("h")
    plot = Chart(
        title=title,
        x_label="calendar date (events counted on their day)",
        y_label="CUSUM statistic (log-likelihood ratio)",
        x_scale="date",
        y_min=0.0,
        description=f"{title}: the statistic rises with each event and falls with the time "
        f"patients spend at risk without one; it now stands at {stat[-1]:.2f}"
        + (f" against the threshold h = {h:.3f}." if h is not None else "."),
    )
    days = np.asarray(series["day"], dtype=float)
    plot.line(*decimate(days, stat), label="time-to-event CUSUM", width=1.1)
    if h is not None:
        plot.hline(h, label=f"threshold h = {h:.3f}", style="dash")
    return plot.render()


def _edge_series() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """``(site, day, statistic, signal)``: tiny and awkward series."""
    rng = np.random.default_rng(5)
    walk = np.abs(np.cumsum(rng.normal(0, 0.4, 900)))
    # days out of order: the earliest, with a signal, in the middle of the thinning's
    # first bucket (of 9 points) and neither its lowest nor its highest: not drawn
    unordered = 19001 + np.arange(900)
    unordered[4] = 19000
    signal_low = np.arange(900) == 4
    walk_low = walk.copy()
    walk_low[:9] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    return [
        ("S01", 19000 + np.arange(30), np.linspace(0, 4, 30), np.isin(np.arange(30), [9, 29])),
        ("S02", np.array([19500]), np.array([2.5]), np.array([True])),  # a single point
        ("S03", 19000 + np.arange(12), np.zeros(12), np.zeros(12, dtype=bool)),  # all zeros
        ("S04", 19000 + np.arange(40), np.linspace(0, 3e6, 40), np.arange(40) == 20),  # huge
        (
            "S05",  # a missing value (and a signal on it)
            19000 + np.arange(20),
            np.where(np.arange(20) == 7, np.nan, np.linspace(0, 2, 20)),
            np.arange(20) == 7,
        ),
        ("S06", np.zeros(0, dtype=int), np.zeros(0), np.zeros(0, dtype=bool)),  # no points
        ("S07", 19000 + np.arange(900), walk, np.arange(900) % 300 == 299),  # thinned
        ("S08", unordered, walk_low, signal_low),
        ("S09", 19000 + np.arange(5), np.array([0.0, 1e-9, 0.0, 7.0, 0.0]), np.zeros(5, bool)),
    ]


def _cusum_chart(h_sites: list[float], h: float | None) -> dict:
    cases = _edge_series()
    return {
        "sites": [site for site, *_ in cases],
        "group": np.concatenate([np.full(len(d), i) for i, (_, d, _, _) in enumerate(cases)]),
        "day": np.concatenate([d for _, d, _, _ in cases]).astype(np.int64),
        "statistic": np.concatenate([s for _, _, s, _ in cases]),
        "signal": np.concatenate([f for *_, f in cases]),
        "h_sites": h_sites,
        "h": h,
    }


@pytest.mark.parametrize(
    ("h_sites", "h"),
    [
        ([4.5, 2.0, 1.0, 2e6, 1.5, 3.0, 5.0, 5.0, 0.5], None),
        ([float("nan")] * 4 + [2.0], 3.25),  # no threshold of their own: the chart's
        ([], None),  # no threshold at all
    ],
)
def test_cusum_charts_from_the_batch_are_the_charts_drawn_alone(h_sites, h):
    """Frames, paths and signals found for every site at once draw each site's CUSUM as
    the general drawer does alone: one point, all zeros, huge values, a missing value, no
    points, thinned series and a signal on a point the thinning drops."""
    chart = _cusum_chart(h_sites, h)
    series = CusumSeries(chart)
    framed = 0
    for site in chart["sites"]:
        title = f"{site} leaks: Bernoulli CUSUM, more events (up)"
        assert cusum_svg(chart, site, title, series) == _cusum_alone(chart, site, title), site
        framed += series.ranges(series.code[site]) is not None
    assert framed == 7  # every site with points and finite values took the batch's frame


def test_time_to_event_charts_from_the_batch_are_the_charts_drawn_alone():
    chart = {
        "series": {
            site: {"day": day, "statistic": stat, "h": h}
            for (site, day, stat, _), h in zip(
                _edge_series(), [2.5, None, 1.0, 4e6, 2.0, 1.0, 3.0, 3.0, None], strict=True
            )
            if len(day)
        }
    }
    lines = TteSeries(chart)
    for site in chart["series"]:
        title = f"{site} new fractures: time-to-event CUSUM, more events (up)"
        assert tte_svg(chart, site, title, lines) == _tte_alone(chart, site, title), site


def test_cusum_signals_are_each_sites_own():
    chart = _cusum_chart([], 2.0)
    series = CusumSeries(chart)
    for code, (_, day, stat, fired) in enumerate(_edge_series()):
        if not len(day):
            continue
        last, days, stats, texts = series.signals(code)
        assert (last, days.tolist(), texts) == (
            float(stat[-1]) if not math.isnan(stat[-1]) else last,
            day[fired].astype(float).tolist(),
            _iso_days(day[fired].astype(float)),
        )
        np.testing.assert_array_equal(stats, stat[fired])


# -- the skeleton of a chart kind


def _legend_chart(width, labels: list[str], height: int = 280) -> str:
    plot = Chart(title="t", x_label="x", y_label="y", height=height)
    for label in labels:
        plot.line([0.0, 1.0], [0.0, 1.0], label=label, width=width)
    return plot.render()


def test_skeleton_of_a_kind_is_the_charts_own_whatever_was_drawn_before():
    """The skeleton is cached by the chart's kind; a line width of 1 and of 1.0 are one
    key to a cache but two texts, so a legend drawn after the other keeps its own."""
    alone = []  # (not a dict: 1 and 1.0 are one key there too)
    for width in (1.0, 1):
        svgplot._skeleton.cache_clear()
        svgplot._legend_entry.cache_clear()
        alone.append(_legend_chart(width, ["one"]))
    assert 'stroke-width="1.0"' in alone[0].split("<text")[-2]  # the legend's sample
    assert 'stroke-width="1"' in alone[1].split("<text")[-2]
    assert _legend_chart(1, ["one"]) == alone[1]  # after the legend of 1.0
    assert _legend_chart(1.0, ["one"]) == alone[0]


@pytest.mark.parametrize(
    ("labels", "rows"),
    [
        ([], 0),
        (["a", "b", "c", "d"], 2),  # three columns
        (["a" * 40, "b", "c"], 2),  # two columns
        (["a" * 90, "b"], 2),  # one column
    ],
)
def test_skeleton_sizes_the_legend(labels, rows):
    svg = _legend_chart(1.4, labels, height=300)
    assert f'height="{300 + 16 * rows}"' in svg.split("\n", 1)[0]
    assert svg.count("<polyline") == 2 * len(labels)


# -- tables


def _table_alone(headers, rows, numeric=frozenset(), caption=""):
    from pipelines.report.common import _esc

    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f"<td class='num'>{c}</td>" if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    cap = f"<caption class='sr'>{_esc(caption)}</caption>" if caption else ""
    return (
        f"<div class='scroll'><table>{cap}<thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


@pytest.mark.parametrize(
    ("rows", "numeric"),
    [
        ([["a", "b"], ["c", "d"]], frozenset()),
        ([["a", "1.5", "-"], ["b", "2", "x"]], {1, 2}),
        ([["a", "1"], [], ["only"], ["b", "2", "extra"]], {1}),  # ragged and empty rows
        ([], {0}),
        ([["a", 3, None], ["b", 2.5, True]], {1}),  # cells that are not text
        ([["<b>x</b>", ""]], {0, 1}),
    ],
)
def test_tables_of_text_cells_are_joined_as_they_were_formatted(rows, numeric):
    headers = ["name", "value & more", "x"]
    assert _table(headers, rows, numeric, "c <1>") == _table_alone(headers, rows, numeric, "c <1>")
    assert _table(headers, iter(rows), numeric) == _table_alone(headers, rows, numeric)
