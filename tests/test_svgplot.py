"""The inline-SVG charts: ticks, ISO date axes, thinning that keeps peaks, valid markup."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import date

import numpy as np
import pytest

from pipelines.report.svgplot import (
    EPOCH,
    Chart,
    date_ticks,
    decimate,
    forest,
    log_ticks,
    nice_ticks,
)


def _day(text: str) -> int:
    return (date.fromisoformat(text) - EPOCH).days


@pytest.mark.parametrize(("low", "high", "expected"), [
    (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (0.0, 4.3, [0.0, 1.0, 2.0, 3.0, 4.0]),
    (0.013, 0.047, [0.02, 0.03, 0.04]),
    (-3.0, 3.0, [-2.0, 0.0, 2.0]),
    (0.0, 2750.0, [0.0, 1000.0, 2000.0]),
])
def test_nice_ticks_are_round_and_cover_the_range(low, high, expected):
    assert nice_ticks(low, high) == pytest.approx(expected)


def test_log_ticks_are_one_two_five():
    assert log_ticks(3, 600) == [5, 10, 20, 50, 100, 200, 500]


@pytest.mark.parametrize(("start", "end", "labels"), [
    ("2023-01-15", "2023-06-30", ["2023-02", "2023-03", "2023-04", "2023-05", "2023-06"]),
    ("2022-01-01", "2023-12-31", ["2022-01", "2022-04", "2022-07", "2022-10", "2023-01",
                                  "2023-04", "2023-07", "2023-10"]),
    ("2015-03-01", "2024-12-31", ["2016", "2018", "2020", "2022", "2024"]),
])
def test_date_ticks_fall_on_period_starts_with_iso_labels(start, end, labels):
    ticks, style = date_ticks(_day(start), _day(end))
    shown = [date.fromordinal(EPOCH.toordinal() + t).strftime(style) for t in ticks]
    assert shown == labels
    assert all(date.fromordinal(EPOCH.toordinal() + t).day == 1 for t in ticks)


def test_decimate_keeps_every_peak_and_both_ends():
    rng = np.random.default_rng(3)
    x = np.arange(20_000, dtype=float)
    y = rng.random(20_000)
    y[[7, 9_999, 19_990]] = [5.0, 6.0, 7.0]  # isolated spikes, like CUSUM signals
    thin_x, thin_y = decimate(x, y, max_points=800)
    assert len(thin_x) <= 800
    assert {7.0, 9_999.0, 19_990.0} <= set(thin_x.tolist())
    assert thin_x[0] == 0 and thin_x[-1] == 19_999 and np.all(np.diff(thin_x) > 0)
    short_x, short_y = decimate(x[:50], y[:50])
    assert np.array_equal(short_x, x[:50])


def test_chart_is_valid_svg_with_title_labels_and_legend():
    chart = Chart(title="S001 <leak> & more", x_label="index date", y_label="CUSUM",
                  x_scale="date", y_min=0.0)
    days = np.arange(_day("2023-01-01"), _day("2023-12-31"), 7, dtype=float)
    chart.line(days, np.linspace(0, 5, len(days)), label="CUSUM")
    chart.hline(4.2, label="threshold h = 4.2")
    chart.points(days[-1:], [5.0], label="signal", marker="triangle", texts=["S001"])
    svg = chart.render()
    root = ET.fromstring(svg)  # well-formed XML (text is escaped)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.get("role") == "img"
    assert root.find(f"{ns}title").text == "S001 <leak> & more"
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "index date" in texts and "CUSUM" in texts and "threshold h = 4.2" in texts
    assert "2023-01" in texts and "S001" in texts
    assert chart.render() == svg  # deterministic: same chart, same bytes


def test_series_differ_by_dash_and_marker_and_all_ink_is_grey():
    chart = Chart(title="t", x_label="x", y_label="y")
    chart.line([1, 2], [1, 2], label="a", style="solid")
    chart.line([1, 2], [2, 1], label="b", style="dash")
    chart.line([1, 2], [1, 1], label="c", style="dot")
    chart.points([1.5], [1.5], label="d", marker="square")
    svg = chart.render()
    dashes = set(re.findall(r'stroke-dasharray="([^"]+)"', svg))
    assert len(dashes) >= 2  # dash and dot differ; solid has none
    for colour in re.findall(r'(?:stroke|fill)="(#[0-9a-fA-F]{3,6})"', svg):
        digits = colour[1:]
        if len(digits) == 3:
            digits = "".join(c * 2 for c in digits)
        r, g, b = (digits[i:i + 2] for i in (0, 2, 4))
        assert r == g == b, colour  # grey levels only: the chart prints in black and white


def test_forest_plot_rows_reference_line_and_clipped_intervals():
    svg = forest([("Cement leakage", 3.7, 3.1, 4.2), ("Major complication", 0.0, 0.0, 19.9),
                  ("New fracture", None, None, None)],
                 title="S004: observed / expected", x_label="observed / expected")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert {"Cement leakage", "Major complication", "New fracture"} <= set(texts)
    assert "no mature units" in texts  # a metric without data says so instead of a dot
    assert "19.9" in texts  # the clipped upper bound is written beside its arrow head
    assert len([r for r in root.iter(f"{ns}rect")]) == 2  # one square per estimate
    dashed = [ln for ln in root.iter(f"{ns}line") if ln.get("stroke-dasharray")]
    assert len(dashed) == 1  # the reference line at 1


def _walk(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return every lattice point a polyline (integer coordinates) passes through, in the
    order it passes them, each once where it stays put: the drawn line, independent of
    how the path is split into points."""
    import math

    walked = [points[0]]
    for (ax, ay), (bx, by) in zip(points, points[1:], strict=False):
        steps = math.gcd(bx - ax, by - ay)
        for k in range(1, steps + 1):
            walked.append((ax + (bx - ax) // steps * k, ay + (by - ay) // steps * k))
    return walked


def _tenths_of(points_text: str) -> list[tuple[int, int]]:
    return [tuple(round(float(v) * 10) for v in pair.split(","))
            for pair in points_text.split()]


def _polylines(svg: str) -> list[str]:
    return re.findall(r'<polyline points="([^"]*)"', svg)


def test_long_paths_drop_only_points_the_line_runs_straight_through():
    """A long path is written without repeated points and without points lying straight
    on the way between their neighbours (svgplot.straight_points): the line visits the
    same points in the same order as the path of every point, rounded as written, and
    every point it keeps is one of those (the old code kept all of them: this fails)."""
    from pipelines.report.svgplot import _LONG_PATH, _pair_format, straight_points

    rng = np.random.default_rng(11)
    cases = []
    for _ in range(300):
        n = int(rng.integers(_LONG_PATH // 2, 3 * _LONG_PATH))
        kind = rng.integers(4)
        if kind == 0:  # a CUSUM: resting at zero, climbing, resetting
            y = np.maximum.accumulate(rng.normal(size=n)) * (rng.random(n) < 0.7)
        elif kind == 1:  # lattice walks: repeats, straight runs, turns and reversals
            y = np.cumsum(rng.integers(-1, 2, size=n)).astype(float)
        elif kind == 2:  # flat runs
            y = np.repeat(rng.integers(0, 3, size=n // 10 + 1), 10)[:n].astype(float)
        else:
            y = rng.random(n)
        x = (np.cumsum(rng.integers(0, 3, size=n)) if kind == 1 else np.arange(n)).astype(float)
        cases.append((x, y, kind == 1))
    dropped = 0
    for x, y, step in cases:
        chart = Chart(title="t", x_label="x", y_label="y", y_min=float(y.min()))
        chart.line(x, y, step=step)
        svg = chart.render()
        (drawn,) = _polylines(svg)
        # the same chart's points as drawn before, every one formatted
        shown = [chart.project(a, b) for a, b in zip(*_stepped(x, y, step), strict=True)]
        full = (_pair_format(len(shown)) % tuple(v for point in shown for v in point)).rstrip()
        old, new = _tenths_of(full), _tenths_of(drawn)
        assert _walk(new) == _walk(old) or (len(set(old)) == 1 and new == [old[0], old[-1]])
        assert new[0] == old[0] and new[-1] == old[-1]
        it = iter(old)
        assert all(point in it for point in new)  # a subsequence of the old points
        arr = np.asarray(new)
        # nothing left to drop, unless a coordinate lay on a half (then formatted, as is)
        assert len(straight_points(arr[:, 0], arr[:, 1])) == len(new) or new == old
        dropped += len(old) - len(new)
    assert dropped > 0


def _stepped(x, y, step):
    return (np.repeat(x, 2)[1:], np.repeat(y, 2)[:-1]) if step else (x, y)


def test_straight_points_keeps_turns_reversals_and_ends():
    from pipelines.report.svgplot import straight_points

    def kept(points):
        arr = np.asarray(points)
        return [points[i] for i in straight_points(arr[:, 0], arr[:, 1])]

    assert kept([(0, 0), (1, 0), (2, 0), (3, 0)]) == [(0, 0), (3, 0)]
    assert kept([(0, 0), (0, 0), (1, 1), (2, 2), (2, 2), (2, 3)]) == [(0, 0), (2, 2), (2, 3)]
    # going back along the same line is not on the way: the turning point stays
    assert kept([(0, 0), (5, 0), (2, 0), (9, 0)]) == [(0, 0), (5, 0), (2, 0), (9, 0)]
    assert kept([(0, 0), (2, 1), (4, 2), (6, 4)]) == [(0, 0), (4, 2), (6, 4)]
    assert kept([(3, 3), (3, 3), (3, 3)]) == [(3, 3), (3, 3)]
    assert kept([(1, 2), (1, 2)]) == [(1, 2), (1, 2)]


def test_cloud_draws_each_rounded_dot_once_and_every_one_of_them():
    """A cloud is one path stroked as one shape: a dot at a place already inked adds
    nothing, and the order of the dots changes nothing, so each rounded place is written
    once, as a move from the one before (the old code wrote every point where it lay:
    this fails on it), and no place is missing."""
    rng = np.random.default_rng(5)
    x = rng.integers(1, 40, size=2_000).astype(float)  # counts: many sites on one place
    y = rng.integers(0, 6, size=2_000).astype(float)
    chart = Chart(title="t", x_label="x", y_label="y", x_scale="log", y_min=0.0)
    chart.cloud(x, y)
    (path,) = re.findall(r'<path d="(M[^"]*h0)"', chart.render())
    moves = re.findall(r"([Mm])(-?\d+),(-?\d+)h0", path)
    assert "".join(f"{m}{a},{b}h0" for m, a, b in moves) == path
    assert [m for m, _, _ in moves] == ["M"] + ["m"] * (len(moves) - 1)
    dots, here = [], (0, 0)
    for _, a, b in moves:  # each move is from the dot before ("h0" ends where it began)
        here = (here[0] + int(a), here[1] + int(b))
        dots.append(here)
    places = {(int(f"{px:.0f}"), int(f"{py:.0f}"))
              for px, py in (chart.project(a, b) for a, b in zip(x, y, strict=True))}
    assert len(dots) == len(set(dots)) and set(dots) == places
    assert len(path) < sum(len(f"M{a},{b}h0") for a, b in dots)


def _series_cases(seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return CUSUM-like, lattice, flat, random and tiny series of many lengths."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        n = int(rng.choice([0, 1, 2, 3, 40, 99, 100, 101, 399, 400, 401, 650, 1200]))
        kind = i % 4
        if kind == 0:  # resting at zero, climbing, resetting
            y = np.maximum.accumulate(rng.normal(size=n)) * (rng.random(n) < 0.7)
        elif kind == 1:  # lattice walks: ties, repeats, straight runs, reversals
            y = np.cumsum(rng.integers(-1, 2, size=n)).astype(float)
        elif kind == 2:  # flat runs
            y = np.repeat(rng.integers(0, 3, size=n // 10 + 1), 10)[:n].astype(float)
        else:
            y = rng.random(n) * 10
        cases.append((np.cumsum(rng.integers(1, 4, size=n)).astype(float), y))
    return cases


def test_decimate_many_keeps_what_decimate_keeps_of_each_series():
    """Thinning every site's series in one pass keeps, series by series, exactly the
    points decimate keeps (first, lowest, highest and last of each bucket, ties included)."""
    from pipelines.report.svgplot import decimate_many

    cases = _series_cases(3, 120)
    bounds = np.concatenate(([0], np.cumsum([len(x) for x, _ in cases])))
    x = np.concatenate([x for x, _ in cases])
    y = np.concatenate([y for _, y in cases])
    keep = decimate_many(x, y, bounds)
    thinned = 0
    for i, (xs, ys) in enumerate(cases):
        want_x, want_y = decimate(xs, ys)
        a, b = bounds[i], bounds[i + 1]
        assert x[a:b][keep[a:b]].tolist() == want_x.tolist()
        assert y[a:b][keep[a:b]].tolist() == want_y.tolist()
        thinned += len(want_x) < len(xs)
    assert thinned > 10


def test_long_paths_write_each_line_as_the_chart_draws_it():
    """Lines drawn for every site at once (svgplot.long_paths) give each chart the same
    ``points`` text, byte for byte, as the chart drawing the line itself, long lines
    (without straight-through points) and short ones (every point) alike."""
    from pipelines.report.svgplot import long_paths

    cases = _series_cases(8, 160)
    bounds = np.concatenate(([0], np.cumsum([len(x) for x, _ in cases])))
    tops = [max(float(y.max()), 0.5) if len(y) else 1.0 for _, y in cases]
    # the frame each chart below is drawn in: its x range, 0 to its top, padded by 5 %
    frames = np.array([[x.min(), x.max(), 0.0, top + (top - 0.0) * 0.05] if len(x) > 1
                       else [np.nan] * 4 for (x, _), top in zip(cases, tops, strict=True)])
    texts = long_paths(np.concatenate([x for x, _ in cases]),
                       np.concatenate([y for _, y in cases]), bounds, frames, 64, 30, 640, 198)
    made = 0
    for (x, y), frame, top, text in zip(cases, frames, tops, texts, strict=True):
        if len(x) < 2:
            assert text is None
            continue
        asked = []
        assert _line_chart(x, y, top, frame, text, asked) == _line_chart(x, y, top)
        assert asked and tuple(asked[0][:4]) == tuple(frame)  # the text was used
        made += text is not None
    assert made > 100


def _line_chart(x, y, top, frame=None, text=None, asked=None) -> str:
    """Return a chart of one line from 0 to ``top``; with ``frame``, its points text is
    ``text`` when the chart is drawn in that frame (as CusumSeries.path gives it)."""
    def drawn(f):
        asked.append(f)
        return text if tuple(f[:4]) == tuple(frame) else None

    plot = Chart(title="t", x_label="x", y_label="y", y_min=0.0, y_max=top)
    plot.line(x, y, drawn=drawn if frame is not None else None)
    return plot.render()


def test_long_paths_keep_each_line_to_itself():
    """Two lines that continue each other straight on the page stay two lines: each is
    written as _long_path writes it alone, with both its ends."""
    from pipelines.report.svgplot import _long_path, long_paths

    x = np.concatenate([np.arange(0, 50.5, 0.5), np.arange(0.5, 50.5, 0.5)])
    y = np.ones(len(x))
    frames = np.array([[0.0, 100.0, 0.0, 2.0], [-50.0, 50.0, 0.0, 2.0]])
    texts = long_paths(x, y, [0, 101, len(x)], frames, 64, 30, 640, 198)
    for (x0, x1, y0, y1), a, b, text in zip(frames, (0, 101), (101, len(x)), texts,
                                            strict=True):
        sx = 64 + (x[a:b] - x0) / (x1 - x0) * 640
        sy = 30 + 198 - (np.minimum(np.maximum(y[a:b], y0), y1) - y0) / (y1 - y0) * 198
        assert text == _long_path(sx, sy) and text.count(" ") == 1
    # one line of one point, of two points: every point, as the chart writes it
    for n, frame in ((1, [-1.0, 1.0, 0.0, 1.05]), (2, [0.0, 1.0, 0.0, 1.05])):
        x, y = np.arange(n, dtype=float), np.arange(n, dtype=float)
        (text,) = long_paths(x, y, [0, n], np.array([frame]), 64, 30, 640, 198)
        asked = []
        assert _line_chart(x, y, 1.0, frame, text, asked) == _line_chart(x, y, 1.0)
        assert tuple(asked[0][:4]) == tuple(frame) and text.count(",") == n
