"""The report's charts as inline SVG (see :mod:`pipelines.report.svgplot`), with their data.

The short charts (VLAD, p-chart) return the SVG and the rows behind it (``headers, rows``),
so the page can offer the data as CSV next to the chart. The long series (CUSUM and
time-to-event paths, hundreds of points per site) return the SVG alone: their data is one
CSV per chart for every site (:func:`cusum_csv`, :func:`tte_csv`), written once per report
by Arrow's CSV writer, which each site's chart links to (its rows carry the site's id).
Formatting those series per site and creating a file for each was most of a
thousand-site report's time (issue 11). Nothing here computes a statistic: limits,
thresholds and classes come from the stored monitor run; the only arithmetic is drawing
(cumulative sums for the VLAD, rates from counts, limits evaluated along a curve).
"""

from __future__ import annotations

import math
import re
from datetime import date
from functools import lru_cache
from typing import Any

import numpy as np

from pipelines.errors import ExternalSystemError
from pipelines.evidence import MonthSeries
from pipelines.report.common import SITE_RE, CsvBody, _esc, _pct, rounded_texts
from pipelines.report.svgplot import EPOCH, Chart, decimate_many, long_paths
from pipelines.surveillance.exact_limits import funnel_curves

# Rates below this are "rare": their funnel is drawn as observed against expected counts,
# since a proportion axis would show a line of zeros.
RARE_RATE = 0.01
FUNNEL_CLASS_TEXT = {
    "significant": "outside the limits, significant after FDR",
    "outside": "outside the limits, not significant after FDR",
    "within": "in control",
    "no data": "no mature units",
}

Drawn = tuple[str, list[str], list[list[Any]]]


@lru_cache(maxsize=64)
def _iso_table(block: int) -> np.ndarray:
    """Return the ISO dates of 1,024 days from day ``block * 1024`` (a lookup table)."""
    days = np.arange(block * 1024, (block + 1) * 1024, dtype="int64")
    return np.array(days.astype("datetime64[D]").astype(str).tolist(), dtype=object)


def _iso_days(days) -> list[str]:
    """Return days since 1970-01-01 as ISO dates, all at once (looked up, not formatted:
    a report writes millions of them and they repeat)."""
    days = np.asarray(days, dtype="int64")
    if not days.size:
        return []
    low, high = int(days.min()) // 1024, int(days.max()) // 1024
    return _iso_span(low, high)[days - low * 1024].tolist()


@lru_cache(maxsize=64)
def _iso_span(low: int, high: int) -> np.ndarray:
    """Return the ISO dates of blocks ``low`` to ``high`` (most series span the same few)."""
    return np.concatenate([_iso_table(b) for b in range(low, high + 1)])


@lru_cache(maxsize=1024)
def _quarter_start(label: str) -> int:
    """Return the first day of a quarter (``2024-Q3``) in days since 1970-01-01."""
    year, quarter = label.split("-Q")
    return (date(int(year), 3 * (int(quarter) - 1) + 1, 1) - EPOCH).days


@lru_cache(maxsize=4096)
def _month_mid(month: str) -> int:
    year, number = int(month[:4]), int(month[5:7])
    return (date(year, number, 15) - EPOCH).days


# -- sparkline -----------------------------------------------------------------------

def sparkline(months: MonthSeries, low: float | None, high: float | None,
              what: str) -> str:
    """Return a 12-month sparkline of the monthly rate with the guidance range shaded.

    Months without mature units leave a gap. ``what`` names site and metric for the
    screen-reader label, which also states the first and last rate.
    """
    # the months come oldest first (evidence.monthly_figures)
    recent = [i for i, before in enumerate(months.months_before_as_of) if before < 12]
    rates = [months.events[i] / months.units[i] if months.units[i] else None
             for i in recent]
    shown = [r for r in rates if r is not None]
    if not shown:
        return ""
    width, height, pad = 108, 26, 3
    top_value = max([*shown, high or 0.0, 1e-9]) * 1.1
    step = (width - 2 * pad) / 11

    def sy(value: float) -> float:
        return height - pad - value / top_value * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="spark" role="img" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'aria-label="{_esc(what)}: monthly rate over the last 12 months, '
             f'{_pct(shown[0])} to {_pct(shown[-1])}">']
    if low is not None and high is not None:
        parts.append(f'<rect x="0" y="{sy(high):.1f}" width="{width}" '
                     f'height="{max(sy(low) - sy(high), 1):.1f}" fill="#ddd"/>')
    segment: list[str] = []
    segments = []
    offset = 12 - len(recent)
    last_point = None
    for i, rate in enumerate(rates):
        if rate is None:
            if segment:
                segments.append(segment)
            segment = []
            continue
        x = pad + (offset + i) * step
        segment.append(f"{x:.1f},{sy(rate):.1f}")
        last_point = (x, sy(rate))
    if segment:
        segments.append(segment)
    for points in segments:
        parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="#111" '
                     'stroke-width="1.2"/>')
    if last_point:
        parts.append(f'<circle cx="{last_point[0]:.1f}" cy="{last_point[1]:.1f}" r="2" '
                     'fill="#111"/>')
    parts.append("</svg>")
    return "".join(parts)


# -- VLAD ----------------------------------------------------------------------------

_FLAG_STYLES = ("dash", "dot", "dashdot")
# Chart.render's plot area for a chart of the default size (left, top, plot_w, plot_h);
# the batches make their texts for it, and a chart drawn in another layout draws as usual
_LAYOUT = (64, 30, 640, 198)


def vlad_svg(months: MonthSeries, title: str, *, direction: str,
             flags: list[tuple[str, float]], odds_ratio: float,
             batch: VladBatch | None = None, key: Any = None) -> Drawn | None:
    """Return the cumulative observed-minus-expected (VLAD) chart by index month.

    Expected is the case-mix expected count the monitor stored for each month. ``flags``
    are ``(name, h)`` thresholds of the CUSUMs for ``direction``; each is drawn as a flag
    level h / ln(OR) excess events above the lowest point so far (for ``down``: fewer
    events, below the highest point). That is the least excess a CUSUM crossing needs
    (the log-likelihood ratio gains at most ln(OR) per excess event), so the VLAD reaching
    a flag level shows how a crossing came about; the CUSUM itself decides.

    ``batch``: every chart of the report computed at once (:class:`VladBatch`); its chart
    ``key`` is used when it was made from these very inputs (else drawn here).
    """
    if batch is not None:
        made = batch.drawn(key, title, months, direction, flags, odds_ratio)
        if made is not None:
            return made
    rows = [i for i, units in enumerate(months.units) if units]
    if not rows:
        return None
    month = [months.month[i] for i in rows]
    units = [months.units[i] for i in rows]
    events = [months.events[i] for i in rows]
    expected = [months.expected[i] for i in rows]
    x = np.array([_month_mid(m) for m in month], float)
    diff = np.array(events, float) - np.array(expected, float)
    path = np.cumsum(diff)
    start = np.concatenate([[0.0], path[:-1]])
    log_or = abs(math.log(odds_ratio)) if odds_ratio and odds_ratio != 1 else None
    up = direction != "down"
    levels = []
    for i, (name, h) in enumerate(flags):
        if not log_or or not h:
            continue
        excess = h / log_or
        anchor = np.minimum.accumulate(start) if up else np.maximum.accumulate(start)
        levels.append((i, name, excess, anchor + excess if up else anchor - excess, None))
    # the month where the rise (fall) from the lowest (highest) point so far is largest;
    # argmax takes the first such month
    turned = int(np.argmax(path - np.minimum.accumulate(path) if up
                           else np.maximum.accumulate(path) - path))
    svg, headers = _vlad_chart(title, month, x, path, up, levels, turned, float(path[-1]))
    # written column by column, as csv_text would write these rows (numbers as repr,
    # rounded by Python's round, not numpy's, so the digits stay the same)
    columns = [month, list(map(str, units)), list(map(str, events)),
               *(rounded_texts(values, 4) for values in (
                   expected, diff.tolist(), path.tolist(),
                   *(level.tolist() for *_, level, _ in levels)))]
    return svg, headers, CsvBody(
        "".join(",".join(row) + "\r\n" for row in zip(*columns, strict=True)))


def _vlad_chart(title: str, month: list[str], x: np.ndarray, path: np.ndarray, up: bool,
                levels: list, turned: int, end: float, path_drawn=None,
                ranges=None) -> tuple[str, list[str]]:
    """Return a VLAD chart's SVG and its CSV header: ``levels`` are the flag levels drawn,
    ``(i, name, excess, level, drawn)`` (``i``: the flag's place, for its dash);
    ``ranges``: the chart's frame, computed beforehand (:class:`VladBatch`)."""
    plot = Chart(title=title, x_label="index month (procedure, or first procedure per patient)",
                 y_label="observed \u2212 expected events (cumulative)", x_scale="date",
                 description="", ranges=ranges)
    plot.hline(0.0, label="as expected for the case mix", style="solid", tone="#777")
    plot.line(x, path, label="observed \u2212 expected", width=1.6, step=False,
              drawn=path_drawn)
    for i, name, excess, level, drawn in levels:
        plot.line(x, level, label=f"{name} flag level ({excess:.1f} events)",
                  style=_FLAG_STYLES[i % 3], width=1, step=True, drawn=drawn)
    plot.description = (
        f"{title}: cumulative observed minus expected events by month, "
        f"{month[0]} to {month[-1]}. The line ends at {end:+.1f} events "
        f"({'more' if end > 0 else 'fewer'} than expected for the case mix); it rises most "
        f"steeply up to {month[turned]}. Flag levels show how far it must rise "
        f"({'more' if up else 'fewer'} events) before the CUSUM can signal.")
    headers = ["month", "mature_units", "observed", "expected", "observed_minus_expected",
               "cumulative_observed_minus_expected",
               *(f"flag_level_{name.replace(' ', '_')}" for _, name, *_ in levels)]
    return plot.render(), headers


# Whole numbers below this are written from a table (the batches' CSV cells)
_WHOLE_TOP = 10_000


@lru_cache(maxsize=1)
def _whole_texts() -> np.ndarray:
    """Return ``str(i)`` for i up to :data:`_WHOLE_TOP` (inclusive)."""
    return np.array([str(i) for i in range(_WHOLE_TOP + 1)], dtype=object)


@lru_cache(maxsize=4)
def _fraction_texts(digits: int) -> np.ndarray:
    """Return the decimals of ``i / 10**digits`` as fixed point writes them with the
    trailing zeros cut (``.5``, ``.25``, ``.0`` for none), for i below ``10**digits``."""
    return np.array(["." + (f"{i:0{digits}d}".rstrip("0") or "0")
                     for i in range(10 ** digits)], dtype=object)


def _texts_of_ints(values: np.ndarray) -> np.ndarray:
    """Return ``str`` of each whole number (an object array)."""
    values = np.asarray(values)
    if len(values) and 0 <= values.min() and values.max() <= _WHOLE_TOP:
        return _whole_texts()[values.astype(np.intp)]
    return np.array(list(map(str, values.tolist())), dtype=object)


def rounded_many(values: np.ndarray, digits: int) -> np.ndarray:
    """Return :func:`rounded_texts` of each value (an object array), most looked up
    (:func:`rounded_parts`)."""
    sign, whole, fraction = rounded_parts(values, digits)
    return sign + whole + fraction


def rounded_parts(values: np.ndarray, digits: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return :func:`rounded_texts` of each value in three pieces (object arrays: sign,
    whole part, decimals), to be joined; most are looked up in tables.

    ``format(v, ".{digits}f")`` is the correctly rounded decimal of the exact binary
    value: for ``|v|`` below :data:`_WHOLE_TOP`, ``|v| * 10**digits`` is off by far less
    than 1e-6, so it rounds the same way unless it lies within 1e-6 of a half; such
    values (and larger ones, NaN, infinities) go through :func:`rounded_texts` itself
    (their text is the whole part, the other pieces empty). The sign is the value's own
    (``-0.0`` for a small negative value, as ``format`` writes it).
    """
    values = np.asarray(values, dtype=float)
    sign = np.full(len(values), "", dtype=object)
    whole = np.full(len(values), "", dtype=object)
    fraction = np.full(len(values), "", dtype=object)
    if not len(values):
        return sign, whole, fraction
    scale = 10 ** digits
    magnitude = np.abs(values)
    with np.errstate(invalid="ignore"):
        scaled = magnitude * float(scale)
        floor = np.floor(scaled)
        rest = scaled - floor
        fast = (magnitude < _WHOLE_TOP) & (np.abs(rest - 0.5) > 1e-6)
    units = (floor[fast] + (rest[fast] > 0.5)).astype(np.int64)
    sign[fast & np.signbit(values)] = "-"
    whole[fast] = _whole_texts()[units // scale]
    fraction[fast] = _fraction_texts(digits)[units % scale]
    slow = np.flatnonzero(~fast)
    if len(slow):
        whole[slow] = rounded_texts(values[slow], digits)
    return sign, whole, fraction


class VladBatch:
    """Every VLAD chart of a report, computed at once (issue 11): the cumulative sums, flag
    levels, frames, line texts and CSV cells of a few thousand charts of a few dozen
    months each are some hundred numpy calls for all of them instead of per chart.

    ``inputs``: ``(key, months, direction, flags, odds_ratio)`` per chart, as
    :func:`vlad_svg` is called. The arithmetic is :func:`vlad_svg`'s, element by element
    (a chart's months are a row of a matrix, padded at its end; accumulations run along
    the row, so the padding never reaches a month); the frames are ``Chart._ranges`` of
    the chart it draws, and a line's text (:func:`long_paths`) is used only when the chart
    is drawn in that very frame. Tests hold every chart to :func:`vlad_svg` drawing alone.
    """

    def __init__(self, inputs: list[tuple[Any, MonthSeries, str, list, float]]) -> None:
        from itertools import chain

        self._inputs = {key: (months, direction, list(flags), odds_ratio)
                        for key, months, direction, flags, odds_ratio in inputs}
        keys = list(self._inputs)
        self._row = {key: i for i, key in enumerate(keys)}
        series = [self._inputs[key][0] for key in keys]
        count = len(keys)
        sizes = np.fromiter((len(m.units) for m in series), dtype=np.int64, count=count)
        total = int(sizes.sum())
        units = np.fromiter(chain.from_iterable(m.units for m in series), dtype=np.int64,
                            count=total)
        events = np.fromiter(chain.from_iterable(m.events for m in series), dtype=np.int64,
                             count=total)
        expected = np.fromiter(chain.from_iterable(m.expected for m in series), dtype=float,
                               count=total)
        valid = units != 0
        chart = np.repeat(np.arange(count), sizes)[valid]
        counts = np.bincount(chart, minlength=count)
        self._counts = counts.tolist()
        width = int(counts.max(initial=0)) or 1
        position = np.arange(len(chart)) - np.repeat(np.cumsum(counts) - counts, counts)
        month_all = list(chain.from_iterable(m.month for m in series))
        month = [month_all[i] for i in np.flatnonzero(valid).tolist()]
        mids = {m: _month_mid(m) for m in set(month)}
        self._month = month
        self._bounds = np.concatenate(([0], np.cumsum(counts))).tolist()
        x = np.full((count, width), np.nan)
        x[chart, position] = np.array([mids[m] for m in month], dtype=float)
        diff = np.full((count, width), np.nan)
        diff[chart, position] = events[valid].astype(float) - expected[valid]
        path = np.cumsum(diff, axis=1)
        start = np.zeros((count, width))
        start[:, 1:] = path[:, :-1]
        up = np.array([self._inputs[key][1] != "down" for key in keys], dtype=bool)
        anchor = np.where(up[:, None], np.minimum.accumulate(start, axis=1),
                          np.maximum.accumulate(start, axis=1))
        # the flags drawn: excess events per chart and place (NaN: not drawn)
        excess = np.full((count, 3), np.nan)
        self._names: list[list[tuple[int, str, float]]] = []
        for row, key in enumerate(keys):
            _, _, flags, odds_ratio = self._inputs[key]
            log_or = abs(math.log(odds_ratio)) if odds_ratio and odds_ratio != 1 else None
            drawn = []
            for i, (name, h) in enumerate(flags):
                if not log_or or not h:
                    continue
                if i >= 3:  # more than three flags: not this batch's shape
                    drawn = None
                    break
                excess[row, i] = h / log_or
                drawn.append((i, name, float(excess[row, i])))
            self._names.append(drawn)
        level = np.where(up[:, None, None], anchor[:, None, :] + excess[:, :, None],
                         anchor[:, None, :] - excess[:, :, None])
        shown = np.arange(width)[None, :] < counts[:, None]
        has_level = ~np.isnan(excess)
        # Chart._ranges of the chart _vlad_chart draws: x of every month, y of the line,
        # the flag levels drawn and the zero line
        x0 = np.where(shown, x, np.inf).min(axis=1)
        x1 = np.where(shown, x, -np.inf).max(axis=1)
        finite = shown & np.isfinite(path)
        levels_finite = shown[:, None, :] & has_level[:, :, None] & np.isfinite(level)
        y0 = np.minimum(np.minimum(np.where(finite, path, np.inf).min(axis=1),
                                   np.where(levels_finite, level, np.inf).min(axis=(1, 2))),
                        0.0)
        y1 = np.maximum(np.maximum(np.where(finite, path, -np.inf).max(axis=1),
                                   np.where(levels_finite, level, -np.inf).max(axis=(1, 2))),
                        0.0)
        flat = x1 == x0
        x0, x1 = np.where(flat, x0 - 1, x0), np.where(flat, x1 + 1, x1)
        y1 = np.where(y1 == y0, y0 + np.where(np.abs(y0) != 0, np.abs(y0), 1.0), y1)
        pad = (y1 - y0) * 0.05
        frames = np.column_stack([x0, x1, y0 - pad, y1 + pad])
        self._frames = [tuple(f) + _LAYOUT for f in frames.tolist()]
        # the line of each chart
        xs, ys = x[shown], path[shown]
        self._path_texts = long_paths(xs, ys, self._bounds, frames, *_LAYOUT)
        # each flag level's staircase (np.repeat(x, 2)[1:], np.repeat(y, 2)[:-1])
        line_chart, line_place = np.nonzero(has_level & (counts > 0)[:, None])
        steps = 2 * counts[line_chart] - 1
        line = np.repeat(np.arange(len(line_chart)), steps)
        j = np.arange(int(steps.sum())) - np.repeat(np.cumsum(steps) - steps, steps)
        step_texts = long_paths(
            x[line_chart[line], (j + 1) // 2], level[line_chart[line], line_place[line], j // 2],
            np.concatenate(([0], np.cumsum(steps))), frames[line_chart], *_LAYOUT)
        self._level_texts = {(c, i): text for c, i, text in zip(
            line_chart.tolist(), line_place.tolist(), step_texts, strict=True)}
        # the description's numbers: where the line ends and turned most
        ends = np.maximum(counts - 1, 0)
        self._end = path[np.arange(count), ends].tolist()
        rise = np.where(up[:, None], path - np.minimum.accumulate(path, axis=1),
                        np.maximum.accumulate(path, axis=1) - path)
        self._turned = np.where(shown, rise, -np.inf).argmax(axis=1).tolist()
        self._up, self._x, self._path, self._level = up.tolist(), x, path, level
        # the CSV rows of every chart at once, as pieces (a chart's text is one join of
        # its rows' pieces): month, units, events, then each number as sign, whole part
        # and decimals, and each flag level drawn (a comma and its number, else nothing)
        pieces = [np.array(month, dtype=object), _texts_of_ints(units[valid]),
                  _texts_of_ints(events[valid]), *rounded_parts(expected[valid], 4),
                  *rounded_parts(diff[shown], 4), *rounded_parts(ys, 4)]
        commas = [1, 2, 3, 6, 9]  # a comma before these pieces
        for i in range(3):
            drawn = has_level[chart, i]
            if drawn.any():
                mark = np.full(len(chart), "", dtype=object)
                mark[drawn] = ","
                numbers = rounded_parts(level[chart, i, position], 4)
                for piece in numbers:
                    piece[~drawn] = ""
                pieces += [mark, *numbers]
        width = len(pieces) + len(commas) + 1
        table = np.empty((len(chart), width), dtype=object)
        column = 0
        for k, piece in enumerate(pieces):
            if k in commas:
                table[:, column] = ","
                column += 1
            table[:, column] = piece
            column += 1
        table[:, column] = "\r\n"
        self._csv_width = width
        self._csv_pieces = table.ravel().tolist()

    def drawn(self, key: Any, title: str, months: MonthSeries, direction: str,
              flags: list[tuple[str, float]], odds_ratio: float) -> Drawn | None:
        """Return the chart ``key`` as :func:`vlad_svg` draws it, or None when the batch
        was made from other inputs (or holds no such chart)."""
        row = self._row.get(key)
        if row is None or self._names[row] is None:
            return None
        if self._inputs[key] != (months, direction, list(flags), odds_ratio):
            return None
        n = self._counts[row]
        if not n:
            return None
        frame = self._frames[row]

        def text_for(text):
            return lambda drawn_in: text if text is not None and drawn_in == frame else None

        a, b = self._bounds[row], self._bounds[row + 1]
        month = self._month[a:b]
        levels = [(i, name, excess, self._level[row, i, :n],
                   text_for(self._level_texts.get((row, i))))
                  for i, name, excess in self._names[row]]
        svg, headers = _vlad_chart(title, month, self._x[row, :n], self._path[row, :n],
                                   self._up[row], levels, self._turned[row], self._end[row],
                                   path_drawn=text_for(self._path_texts[row]),
                                   ranges=frame[:4])
        width = self._csv_width
        return svg, headers, CsvBody("".join(self._csv_pieces[a * width:b * width]))



# -- p-chart -------------------------------------------------------------------------

PCHART_HEADERS = ["quarter", "mature_units", "events", "rate", "upper_limit", "baseline",
                  "guidance_low", "guidance_high"]


def pchart_svg(chart: dict[str, Any], site_id: str, title: str, *,
               guidance: tuple[float | None, float | None] = (None, None),
               batch: PchartBatch | None = None) -> Drawn | None:
    """Return the site's quarterly proportions with the exact upper limit, the baseline and
    the guidance range shaded.

    ``batch``: the chart's every site computed at once (:class:`PchartBatch`), used when
    it was made from this chart and guidance (else drawn here).
    """
    if batch is not None:
        made = batch.drawn(chart, site_id, title, guidance)
        if made is not None:
            return made
    if site_id not in chart["sites"]:
        return None
    code = chart["sites"].index(site_id)
    n = np.asarray(chart["n"][code], float)
    if not n.any():
        return None
    events = np.asarray(chart["events"][code], float)
    x = np.asarray([_quarter_start(label) for label in chart["labels"]],
                   float) + 45  # plot each quarter at its middle
    has = n > 0
    p = np.divide(events, n, out=np.full_like(events, np.nan), where=has)
    low, high = guidance
    limit = np.asarray(chart["limit"][code], float) if "limit" in chart else None
    with np.errstate(invalid="ignore"):
        above = has & (p > limit) if limit is not None else np.zeros(len(n), bool)
    tips = [f"{lab}: {int(e)}/{int(k)}" for lab, e, k in zip(
        chart["labels"], events, n, strict=True)]
    svg = _pchart_chart(chart, title, guidance, x, has, p, limit, above,
                        [t for t, keep in zip(tips, has & ~above, strict=True) if keep],
                        [t for t, keep in zip(tips, above, strict=True) if keep])
    data = [[lab, int(k), int(e), float(e / k) if k else None,
             float(limit[i]) if limit is not None and np.isfinite(limit[i]) else None,
             chart["p0"], low, high]
            for i, (lab, k, e) in enumerate(zip(chart["labels"], n, events, strict=True))]
    return svg, list(PCHART_HEADERS), data


def _pchart_chart(chart: dict[str, Any], title: str, guidance, x: np.ndarray,
                  has: np.ndarray, p: np.ndarray, limit: np.ndarray | None,
                  above: np.ndarray, plain_tips: list[str], above_tips: list[str],
                  drawn=(None, None, None, None), ranges=None) -> str:
    """Return a site's p-chart: ``drawn``, the texts made beforehand (:class:`PchartBatch`)
    of the limit line, the proportions' line, the quarters within and above the limit;
    ``ranges``: the chart's frame, computed there too."""
    low, high = guidance
    limit_drawn, p_drawn, plain_drawn, above_drawn = drawn
    plot = Chart(title=title, x_label="quarter (plotted at mid-quarter)",
                 y_label="proportion with event", x_scale="date", y_min=0.0, ranges=ranges)
    if low is not None and high is not None:
        plot.band(low, high, label=f"guidance range {_pct(low)}\u2013{_pct(high)}")
    if limit is not None:
        plot.line(x[has], limit[has], style="dash", width=1,
                  label=f"upper limit (exact, {100 * chart['alpha']:g}% per quarter)",
                  drawn=limit_drawn)
    plot.hline(chart["p0"], label=f"baseline {_pct(chart['p0'])}", style="solid")
    plot.line(x[has], p[has], width=1, style="dot", drawn=p_drawn)
    plain = has & ~above
    plot.points(x[plain], p[plain], label="quarter", marker="circle", filled=False,
                tips=plain_tips, drawn=plain_drawn)
    any_above = bool(above.any())
    if any_above:
        plot.points(x[above], p[above], label="above limit", marker="square",
                    tips=above_tips, drawn=above_drawn)
    labels = chart["labels"]
    shown = np.flatnonzero(has)
    last = labels[shown[-1]] if len(shown) else "-"
    plot.description = (
        f"{title}: {len(shown)} closed quarters with units, the last ({last}) at "
        f"{_pct(p[shown[-1]])}; {int(above.sum())} quarters above the exact upper limit"
        + (f" ({', '.join(labels[i] for i in np.flatnonzero(above).tolist())})"
           if any_above else "") + ".")
    return plot.render()


def _csv_number(value: Any) -> str | None:
    """Return the CSV cell :func:`csv_text` writes for a column holding ``value`` on every
    row (None: not a number or empty, left to csv_text)."""
    if value is None or (type(value) is float and value != value):
        return ""
    return repr(value) if type(value) in (int, float) else None


class PchartBatch:
    """One p-chart's every site computed at once (issue 11): proportions, frames, line
    texts, markers and CSV cells for a thousand sites of a dozen quarters each in some
    fifty numpy calls rather than per site.

    The arithmetic is :func:`pchart_svg`'s, element by element (a site is a row of the
    chart's matrices); the frames are ``Chart._ranges`` of the chart it draws, and the
    texts are used only when a chart is drawn in that very frame. A chart this batch
    cannot write (non-finite limits, coordinates only formatting rounds right) is drawn
    as before, by parts. Tests hold every site to :func:`pchart_svg` drawing alone.
    """

    def __init__(self, chart: dict[str, Any],
                 guidance: tuple[float | None, float | None]) -> None:
        from pipelines.evidence import _FORMULA_START
        from pipelines.report.svgplot import _esc as svg_esc
        from pipelines.report.svgplot import _tenths, _tenths_table

        self.chart, self.guidance = chart, guidance
        self._code: dict[str, int] = {}
        labels = list(chart["labels"])
        n_int, e_int = np.asarray(chart["n"]), np.asarray(chart["events"])
        low, high = guidance
        constants = [_csv_number(v) for v in (chart["p0"], low, high)]
        limit = chart.get("limit") if "limit" in chart else None
        if (n_int.ndim != 2 or n_int.shape != e_int.shape or n_int.shape[1] != len(labels)
                or n_int.dtype.kind not in "iu" or e_int.dtype.kind not in "iu"
                or ("limit" in chart and np.shape(limit) != n_int.shape)
                or None in constants or any(
                    not isinstance(lab, str) or lab.startswith(_FORMULA_START)
                    or svg_esc(lab) != lab or any(c in lab for c in ',"\r\n')
                    for lab in labels)):
            return  # not the shape this batch writes: every site drawn by parts
        sites, quarters = n_int.shape
        n, events = n_int.astype(float), e_int.astype(float)
        x = np.asarray([_quarter_start(label) for label in labels], float) + 45
        has = n > 0
        p = np.divide(events, n, out=np.full_like(events, np.nan), where=has)
        limit = np.asarray(limit, float) if "limit" in chart else None
        with np.errstate(invalid="ignore"):
            above = has & (p > limit) if limit is not None else np.zeros(n.shape, bool)
        plain = has & ~above
        drawn = has.any(axis=1)
        for i, site in enumerate(chart["sites"][:sites]):
            self._code.setdefault(site, i)  # the first, as list.index finds it
        self._code = {site: i for site, i in self._code.items() if drawn[i]}
        self._has, self._p, self._limit, self._above, self._x = has, p, limit, above, x
        # Chart._ranges: x of the quarters with units, y from 0 to the largest of the band,
        # the limit, the baseline and the proportions (finite values only)
        xx = np.broadcast_to(x, n.shape)
        x0 = np.where(has, xx, np.inf).min(axis=1)
        x1 = np.where(has, xx, -np.inf).max(axis=1)
        tops = [np.where(has & np.isfinite(p), p, -np.inf).max(axis=1)]
        if limit is not None:
            tops.append(np.where(has & np.isfinite(limit), limit, -np.inf).max(axis=1))
        for value in ([low, high] if low is not None and high is not None else []) + [
                chart["p0"]]:
            if math.isfinite(float(value)):
                tops.append(np.full(sites, float(value)))
        y1 = np.maximum.reduce(tops)
        flat = x1 == x0
        x0, x1 = np.where(flat, x0 - 1, x0), np.where(flat, x1 + 1, x1)
        y1 = np.where(y1 == 0.0, 1.0, y1)
        y1 = y1 + (y1 - 0.0) * 0.05
        frames = np.column_stack([x0, x1, np.zeros(sites), y1])
        self._frames = [tuple(f) + _LAYOUT for f in frames.tolist()]
        counts = has.sum(axis=1)
        bounds = np.concatenate(([0], np.cumsum(counts)))
        xs = xx[has]
        self._limit_texts = (long_paths(xs, limit[has], bounds, frames, *_LAYOUT)
                             if limit is not None else [None] * sites)
        self._p_texts = long_paths(xs, p[has], bounds, frames, *_LAYOUT)
        # the markers: render's sx and sy, element by element, written from the table
        left, top, plot_w, plot_h = _LAYOUT
        with np.errstate(invalid="ignore", divide="ignore"):
            sx = left + (xx - x0[:, None]) / (x1 - x0)[:, None] * plot_w
            y_top = y1[:, None]
            sy = top + plot_h - (np.minimum(np.maximum(p, 0.0), y_top) - 0.0) / (
                y_top - 0.0) * plot_h
        tips = (np.array([svg_esc(lab) for lab in labels], dtype=object)[None, :] + ": "
                + _texts_of_ints(e_int.ravel()).reshape(n.shape) + "/"
                + _texts_of_ints(n_int.ravel()).reshape(n.shape))
        self._tips = tips
        self._plain = self._markers(plain, sx, sy, 0.0, tips, '<circle cx="', '" cy="',
                                    '" r="3" fill="#fff" stroke="#111" stroke-width="1.0"/>',
                                    _tenths, _tenths_table)
        self._above_marks = self._markers(
            above, sx, sy, 3.0, tips, '<rect x="', '" y="',
            '" width="6" height="6" fill="#111" stroke="#111" stroke-width="1.0"/>',
            _tenths, _tenths_table)
        # the CSV rows of every site: quarter, units, events, rate, limit, the constants
        rate = np.full(n.shape, "", dtype=object)
        rate[has] = list(map(repr, (events[has] / n[has]).tolist()))
        cells = np.full(n.shape, "", dtype=object)
        if limit is not None:
            finite = np.isfinite(limit)
            cells[finite] = list(map(repr, limit[finite].tolist()))
        tail = "," + ",".join(constants) + "\r\n"
        rows = (np.array(labels, dtype=object)[None, :] + "," + _texts_of_ints(
            n_int.ravel()).reshape(n.shape) + "," + _texts_of_ints(e_int.ravel()).reshape(
            n.shape) + "," + rate + "," + cells + tail)
        self._csv = ["".join(row) for row in rows.tolist()]

    @staticmethod
    def _markers(mask, sx, sy, shift, tips, head, middle, tail, tenths, table):
        """Return each site's markers at ``mask`` (None where a coordinate only
        formatting rounds right: that site's markers are drawn as usual)."""
        count = mask.sum(axis=1)
        out: list[list[str] | None] = [[] for _ in range(len(count))]
        if not mask.any():
            return out
        row = np.nonzero(mask)[0]
        px, py = sx[mask] - shift, sy[mask] - shift
        ok = np.ones(len(px), dtype=bool)
        whole = {}
        for name, values in (("x", px), ("y", py)):
            scaled = values * 10.0
            floor = np.floor(scaled)
            fraction = scaled - floor
            ok &= ((values >= 0.05) & (values < 4000.0)
                   & (np.abs(fraction - 0.5) > 1e-6))
            whole[name] = np.where(ok, floor + (fraction > 0.5), 0).astype(np.intp)
        text = table("")
        marks = ("<g><title>" + tips[mask] + "</title>" + head + text[whole["x"]] + middle
                 + text[whole["y"]] + tail + "</g>").tolist()
        bad = set(row[~ok].tolist())
        ends = np.cumsum(count).tolist()
        start = 0
        for site, end in enumerate(ends):
            out[site] = None if site in bad else marks[start:end]
            start = end
        return out

    def drawn(self, chart: dict[str, Any], site_id: str, title: str,
              guidance) -> Drawn | None:
        """Return the site's p-chart as :func:`pchart_svg` draws it, or None when this
        batch was made for another chart or guidance (or cannot write the site's)."""
        if chart is not self.chart or guidance != self.guidance:
            return None
        code = self._code.get(site_id)
        if code is None:
            return None
        frame = self._frames[code]

        def text_for(made):
            return lambda drawn_in: made if made is not None and drawn_in == frame else None

        has, above = self._has[code], self._above[code]
        tips = self._tips[code]
        limit = self._limit[code] if self._limit is not None else None
        svg = _pchart_chart(
            chart, title, guidance, self._x, has, self._p[code], limit, above,
            tips[has & ~above].tolist(), tips[above].tolist(),
            drawn=(text_for(self._limit_texts[code]), text_for(self._p_texts[code]),
                   text_for(self._plain[code]), text_for(self._above_marks[code])),
            ranges=frame[:4])
        return svg, list(PCHART_HEADERS), CsvBody(self._csv[code])


# -- CUSUMs --------------------------------------------------------------------------

class _Lines:
    """Every site's line of one chart (``day``, ``statistic``, site ``i``'s points from
    ``bounds[i]`` to ``bounds[i + 1]``), thinned and written for all sites at once: a
    report draws the chart for each of its sites, and a dozen numpy calls per site and
    chart cost more than the drawing (issue 11)."""

    day: np.ndarray
    statistic: np.ndarray
    bounds: list[int]
    _thinned: tuple | None
    _frames: np.ndarray | None
    _paths: dict[tuple, tuple[np.ndarray, list[str | None]]]

    def h(self, code: int) -> float | None:
        """Return the threshold drawn with site ``code``'s line (None: none)."""
        raise NotImplementedError

    def thinned(self, code: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the site's points as drawn (:func:`decimate` of its series), thinned for
        every site at once on the first call."""
        x, y, bounds = self._thin()
        return x[bounds[code]:bounds[code + 1]], y[bounds[code]:bounds[code + 1]]

    def _thin(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        if self._thinned is None:
            days = self.day.astype(float)
            stat = self.statistic.astype(float)
            keep = decimate_many(days, stat, self.bounds)
            sizes = np.diff(self.bounds)
            kept = np.bincount(np.repeat(np.arange(len(sizes)), sizes)[keep],
                               minlength=len(sizes))
            self._thinned = (days[keep], stat[keep],
                             np.concatenate(([0], np.cumsum(kept))).tolist())
        return self._thinned

    def path(self, code: int, frame: tuple) -> str | None:
        """Return the ``points`` text of the site's line in ``frame`` (``x0, x1, y0, y1,
        left, top, plot_w, plot_h``, see :meth:`Chart.line`), made for every site at once
        on the first call (:func:`long_paths`), or None: drawn as usual.

        The batch draws each site in the frame its chart would get (its days, 0 to the
        larger of its highest point and its threshold, padded); a text is used only for
        that very frame, so any other frame draws the line as before.
        """
        layout = tuple(frame[4:])
        made = self._paths.get(layout)
        if made is None:
            made = self._paths[layout] = self._made(*layout)
        frames, texts = made
        if code >= len(texts) or texts[code] is None or tuple(frames[code]) != tuple(frame[:4]):
            return None
        return texts[code]

    def _made(self, left: int, top: int, plot_w: int, plot_h: int):
        x, y, bounds = self._thin()
        frames = self._extents()
        return frames, long_paths(x, y, bounds, frames, left, top, plot_w, plot_h)

    def _marks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Return the points drawn as markers besides the line (``day``, ``statistic``,
        drawn or not, per point of :attr:`day`), or None: none."""
        return None

    def _extents(self) -> np.ndarray:
        """Return each site's frame ``(x0, x1, y0, y1)`` as ``Chart._ranges`` computes it
        for the chart :func:`cusum_svg` or :func:`tte_svg` draws (NaN for a site without
        points; a non-finite frame where a value is not finite: such a chart computes its
        own): x of the line and markers, y from 0 to the highest of the line, markers and
        threshold, padded."""
        if self._frames is not None:
            return self._frames
        x, y, bounds = self._thin()
        sizes = np.diff(bounds)
        starts = np.asarray(bounds[:-1])[sizes > 0]
        frames = np.full((len(sizes), 4), np.nan)
        if len(starts):
            x0 = np.minimum.reduceat(x, starts)
            x1 = np.maximum.reduceat(x, starts)
            top_y = np.maximum.reduceat(y, starts)
            marks = self._marks()
            if marks is not None:  # the markers (every point of a site's series)
                day, stat, drawn = marks
                full = np.asarray(self.bounds[:-1])[sizes > 0]
                with np.errstate(invalid="ignore"):
                    x0 = np.minimum(x0, np.minimum.reduceat(np.where(drawn, day, np.inf), full))
                    x1 = np.maximum(x1, np.maximum.reduceat(np.where(drawn, day, -np.inf),
                                                            full))
                    top_y = np.maximum(top_y, np.maximum.reduceat(
                        np.where(drawn, stat, -np.inf), full))
            h = np.array([self.h(code) for code in np.flatnonzero(sizes > 0).tolist()],
                         dtype=float)
            top_y = np.where(np.isnan(h), top_y, np.maximum(top_y, h))
            flat = x1 == x0
            x0, x1 = np.where(flat, x0 - 1, x0), np.where(flat, x1 + 1, x1)
            top_y = np.where(top_y == 0.0, 1.0, top_y)
            frames[sizes > 0] = np.column_stack(
                [x0, x1, np.zeros(len(x0)), top_y + (top_y - 0.0) * 0.05])
        self._frames = frames
        self._finite = np.isfinite(frames).all(axis=1).tolist()
        return frames

    def ranges(self, code: int) -> tuple[float, float, float, float] | None:
        """Return the frame the site's chart is drawn in (:meth:`_extents`), or None
        when a value is not finite (the chart then computes its own)."""
        frames = self._extents()
        if code >= len(frames) or not self._finite[code]:
            return None
        return tuple(frames[code].tolist())


class CusumSeries(_Lines):
    """One CUSUM chart's points for every site, indexed once: a report draws the chart
    for each of its sites, and finding a site's slice must not cost a pass over them all."""

    def __init__(self, chart: dict[str, Any]) -> None:
        self.chart = chart
        self.code = {site: i for i, site in enumerate(chart["sites"])}
        group = np.asarray(chart["group"])
        self.bounds = np.searchsorted(group, np.arange(len(chart["sites"]) + 1)).tolist()
        self.day = np.asarray(chart["day"])
        self.statistic = np.asarray(chart["statistic"])
        self.signal = np.asarray(chart["signal"])
        self.h_sites = np.asarray(chart.get("h_sites", []), dtype=float)
        self._thinned = None
        self._frames = None
        self._signals: tuple | None = None
        self._paths: dict[tuple, tuple[np.ndarray, list[str | None]]] = {}

    def signals(self, code: int) -> tuple[float, np.ndarray, np.ndarray, list[str]]:
        """Return site ``code``'s last statistic, and the days, statistics and ISO dates
        of its signals (points of the site's non-empty series), found for every site on
        the first call: a dozen numpy calls per site and chart were a third of drawing
        it (issue 11)."""
        if self._signals is None:
            fired = np.flatnonzero(self.signal.astype(bool))
            days = self.day[fired].astype(float)
            self._signals = (days, self.statistic[fired].astype(float), _iso_days(days),
                             np.searchsorted(fired, self.bounds).tolist())
        days, stat, texts, cuts = self._signals
        a, b = cuts[code], cuts[code + 1]
        last = self.statistic[self.bounds[code + 1] - 1:self.bounds[code + 1]].astype(float)
        return last[0], days[a:b], stat[a:b], texts[a:b]

    def _marks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the signal markers (:func:`cusum_svg` draws each crossing)."""
        return (self.day.astype(float), self.statistic.astype(float),
                self.signal.astype(bool))

    def h(self, code: int) -> float | None:
        """Return the site's threshold (the chart's where the site has none)."""
        h_sites = self.h_sites
        return (float(h_sites[code]) if code < len(h_sites) and np.isfinite(h_sites[code])
                else self.chart.get("h"))


class TteSeries(_Lines):
    """One time-to-event CUSUM's series for every site, in one array (:class:`_Lines`)."""

    def __init__(self, chart: dict[str, Any]) -> None:
        series = chart.get("series") or {}
        self.code = {site: i for i, site in enumerate(series)}
        parts = list(series.values())
        self.bounds = np.concatenate(([0], np.cumsum([len(p["day"]) for p in parts],
                                                     dtype=np.int64))).tolist()
        self.day = (np.concatenate([np.asarray(p["day"], dtype=float) for p in parts])
                    if parts else np.zeros(0))
        self.statistic = (np.concatenate([np.asarray(p["statistic"], dtype=float)
                                          for p in parts]) if parts else np.zeros(0))
        self._h = [p.get("h") for p in parts]
        self._thinned = None
        self._frames = None
        self._paths = {}

    def h(self, code: int) -> float | None:
        """Return the site's threshold (None: none)."""
        return self._h[code]


def _csv_of(columns: dict[str, Any], *, encoded: bool = False) -> str | memoryview:
    """Return Arrow arrays as CSV text: header, then one row per element, CRLF line ends
    (``encoded``: its bytes as Arrow wrote them, for the file; the series files are about
    100 MB for a thousand sites, and decoding them into text only for the writer to encode
    it again cost about 0.3 s of CPU).

    Only for columns of numbers, dates and site ids (checked against ``SITE_RE`` before a
    report is drawn), which need no quoting and cannot start a formula: Arrow writes them
    unquoted (``quoting_style="none"`` raises rather than write a value that would need
    quotes), numbers as their shortest text, missing values as empty cells.
    """
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    sink = pa.BufferOutputStream()
    pa_csv.write_csv(pa.table(columns), sink, pa_csv.WriteOptions(
        quoting_style="none", quoting_header="none", eol="\r\n"))
    if encoded:
        # unsigned bytes ("B", as bytes objects are), so comparing with a file is a memcmp
        return memoryview(sink.getvalue()).cast("B")  # ASCII: the text's UTF-8 bytes
    return sink.getvalue().to_pybytes().decode("ascii")


def _checked_sites(sites) -> np.ndarray:
    """Return a chart's site ids as an array, after checking each has the contract's form
    (they are written unquoted and unprefixed)."""
    bad = [site for site in sites if not SITE_RE.fullmatch(str(site))]
    if bad:
        raise ExternalSystemError(f"a stored chart holds a malformed site id {bad[0]!r}; "
                                  "not writing its data")
    return np.asarray(sites, dtype=object)


def _arrow(kind, values: np.ndarray, valid: np.ndarray | None = None):
    """Return ``values`` (already of ``kind``'s width) as an Arrow array, nulls where
    ``valid`` is False.

    Built from the array's own buffer rather than through ``pa.array``, which imports
    pandas on its first call (1.5 s of a fresh ``kyphowatch report``, for nothing).
    """
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    bitmap = None if valid is None else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(kind, len(values), [bitmap, pa.py_buffer(values)],
                                 null_count=-1 if valid is not None else 0)


def _site_column(names: list[str], codes: np.ndarray):
    """Return the Arrow text column of site ``names[code]`` for each of ``codes``."""
    import pyarrow as pa

    encoded = [name.encode("utf-8") for name in names]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(codes) + 1, dtype=np.int32)
    np.cumsum(lengths[codes], out=offsets[1:])
    if len(set(lengths.tolist())) == 1:  # ids of one length (the usual): a numpy gather
        text = np.array(encoded, dtype=f"S{lengths[0]}")[codes].tobytes()
    else:
        text = b"".join(map(encoded.__getitem__, codes.tolist()))
    return pa.Array.from_buffers(pa.string(), len(codes),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(text)],
                                 null_count=0)


def _texts_taken(kind, values: np.ndarray, codes: np.ndarray, valid: np.ndarray | None = None):
    """Return the Arrow column of ``values[codes]`` as text (nulls where ``valid`` is
    False), each distinct value formatted once.

    Arrow's CSV writer formats a column by casting it to text, so casting the few values
    and writing them through a dictionary writes the same bytes; a series file repeats a
    site's threshold on each of its rows and a day on each site's row of it (three
    million rows, a thousand sites, a thousand days), and formatting them row by row was
    a third of writing the files. A dictionary, not the texts taken per row: the writer
    expands it a batch at a time, so no column of millions of texts is ever held.
    """
    import pyarrow as pa

    texts = _arrow(kind, values, valid).cast(pa.string())
    return pa.DictionaryArray.from_arrays(
        _arrow(pa.int32(), np.asarray(codes, dtype=np.int32)), texts)


def _series_columns(names: list[str], codes: np.ndarray, days: np.ndarray,
                    stat: np.ndarray) -> dict[str, Any]:
    """Return the ``site`` (``names[code]`` per point), ``date`` and ``statistic``
    columns of a chart's series."""
    import pyarrow as pa

    days = np.asarray(days).astype(np.int32)
    first = int(days.min()) if len(days) else 0
    span = int(days.max()) - first + 1 if len(days) else 0
    dates = (_texts_taken(pa.date32(), np.arange(first, first + span, dtype=np.int32),
                          days - first) if span <= len(days)
             else _arrow(pa.date32(), days))  # days far apart: formatting each is less
    return {"site": _site_column(names, codes), "date": dates,
            # the drawing's precision; Arrow writes the shortest text of the rounded value
            "statistic": _arrow(pa.float64(), np.round(np.asarray(stat, dtype=float), 5))}


def _threshold_column(h: np.ndarray, codes: np.ndarray):
    """Return the text column of threshold ``h[code]`` per row (empty where h is not
    finite)."""
    import pyarrow as pa

    h = np.asarray(h, dtype=float)
    return _texts_taken(pa.float64(), h, codes, np.isfinite(h))


def cusum_csv(chart: dict[str, Any], *, encoded: bool = False) -> str | memoryview | None:
    """Return the data of a stored CUSUM chart for every site as CSV (None: no points).

    Columns ``site, date, statistic, signal, threshold_h``: one row per point in the
    stored order (by site, then date), the site's own threshold (the chart's where the
    site has none). Each site page's chart links to this file. ``encoded``: as bytes
    (:func:`_csv_of`).
    """
    import pyarrow as pa

    group = np.asarray(chart["group"], dtype="int64")
    if not len(group):
        return None
    sites = _checked_sites(chart["sites"])
    default = chart.get("h")
    h = np.full(len(sites), np.nan if default is None else float(default))
    own = np.asarray(chart.get("h_sites", []), dtype=float)[:len(sites)]
    h[:len(own)] = np.where(np.isfinite(own), own, h[:len(own)])
    columns = _series_columns(sites.tolist(), group, chart["day"], chart["statistic"])
    columns["signal"] = _arrow(pa.int8(), np.asarray(chart["signal"], dtype=bool).astype("int8"))
    columns["threshold_h"] = _threshold_column(h, group)
    return _csv_of(columns, encoded=encoded)


def tte_csv(chart: dict[str, Any], *, encoded: bool = False) -> str | memoryview | None:
    """Return the data of a stored time-to-event CUSUM for every site as CSV (None: no
    points): ``site, date, statistic, threshold_h``, by site then date (``encoded``: as
    bytes, :func:`_csv_of`)."""
    parts = [(site, s) for site, s in (chart.get("series") or {}).items() if len(s["day"])]
    if not parts:
        return None
    sizes = [len(s["day"]) for _, s in parts]
    names = _checked_sites([site for site, _ in parts]).tolist()
    codes = np.repeat(np.arange(len(names)), sizes)
    columns = _series_columns(
        names, codes, np.concatenate([np.asarray(s["day"]) for _, s in parts]),
        np.concatenate([np.asarray(s["statistic"], dtype=float) for _, s in parts]))
    columns["threshold_h"] = _threshold_column(
        [np.nan if s.get("h") is None else float(s["h"]) for _, s in parts], codes)
    return _csv_of(columns, encoded=encoded)


def cusum_svg(chart: dict[str, Any], site_id: str, title: str,
              series: CusumSeries | None = None) -> str | None:
    """Return one site's CUSUM path over time with its threshold and signal points (its
    data: :func:`cusum_csv`).

    ``series`` is the chart indexed by :class:`CusumSeries` (made here when not given).
    """
    series = series or CusumSeries(chart)
    code = series.code.get(site_id)
    if code is None:
        return None
    start, stop = series.bounds[code], series.bounds[code + 1]
    if start == stop:
        return None
    # the last statistic and the signals, found for every site of the chart at once
    last, fired_days, fired_stat, crossings = series.signals(code)
    h = series.h(code)
    x_label = ("date the outcome was known" if chart.get("order") == "outcome known"
               else "index date (procedure, or first procedure per patient)")
    description = (f"{title}: the statistic now stands at {last:.2f}"
                   + (f" against the site's threshold h = {h:.3f}" if h is not None else "")
                   + f"; {len(crossings)} crossings"
                   + (f", the last on {crossings[-1]}" if crossings else "") + ".")
    # the frame computed for every site at once (None: the chart computes its own)
    plot = Chart(title=title, x_label=x_label,
                 y_label="CUSUM statistic (log-likelihood ratio)", x_scale="date", y_min=0.0,
                 description=description, ranges=series.ranges(code))
    # thinned and its path text made for every site of the chart at once
    x, y = series.thinned(code)
    plot.line(x, y, label="CUSUM", width=1.1,
              drawn=lambda frame: series.path(code, frame))
    if h is not None:
        plot.hline(h, label=f"threshold h = {h:.3f}", style="dash")
    if crossings:
        plot.points(fired_days, fired_stat, label="signal (chart resets)", marker="triangle",
                    tips=[f"signal {d}" for d in crossings])
    return plot.render()


def tte_svg(chart: dict[str, Any], site_id: str, title: str,
            lines: TteSeries | None = None) -> str | None:
    """Return one site's time-to-event CUSUM (partial follow-up) with its threshold (its
    data: :func:`tte_csv`); ``lines``: the chart's :class:`TteSeries` (made here when not
    given)."""
    series = (chart.get("series") or {}).get(site_id)
    if not series or not len(series["day"]):
        return None
    stat = np.asarray(series["statistic"], dtype=float)
    h = series.get("h")
    plot = Chart(title=title, x_label="calendar date (events counted on their day)",
                 y_label="CUSUM statistic (log-likelihood ratio)", x_scale="date", y_min=0.0,
                 description=f"{title}: the statistic rises with each event and falls with "
                             "the time patients spend at risk without one; it now stands at "
                             f"{stat[-1]:.2f}"
                             + (f" against the threshold h = {h:.3f}." if h is not None
                                else "."))
    # thinned, its frame and path text made for every site of the chart at once
    lines = lines or TteSeries(chart)
    code = lines.code[site_id]
    plot.ranges = lines.ranges(code)
    x, y = lines.thinned(code)
    plot.line(x, y, label="time-to-event CUSUM", width=1.1,
              drawn=lambda frame: lines.path(code, frame))
    if h is not None:
        plot.hline(h, label=f"threshold h = {h:.3f}", style="dash")
    return plot.render()


# -- funnels -------------------------------------------------------------------------

SITE_TOKEN = "\x00SITE\x00"


def funnel_svg(chart: dict[str, Any], label: str, classes: dict[str, str],
               highlight: str | None = None) -> str:
    """Return the funnel plot: each site against the limits that decided.

    Exact binomial 95% and 99.8% limits are always drawn. When the engine found the sites
    overdispersed at ``as_of`` it decided with the phi-adjusted 99.8% limits instead, and
    those are drawn too and named as the decision limits, so no site sits inside the drawn
    decision limits while the engine calls it outside (or the reverse).

    ``classes`` maps sites to ``significant`` (outside and significant after the
    Benjamini-Hochberg correction: filled triangles, labelled), ``outside`` (outside but
    not significant: hollow squares, labelled) or ``within`` (small grey dots). The legend
    names each class, so shape and text carry it, not colour.

    Rare events (baseline below :data:`RARE_RATE`) are drawn as observed against expected
    events (both counts), so sites with no event spread along the expected axis instead
    of sitting on a line of zeros. ``highlight`` draws one site as a large black diamond.
    """
    template = funnel_template(chart, label, classes, highlight is not None)
    return template.for_site(highlight) if highlight else template.svg


def funnel_template(chart: dict[str, Any], label: str, classes: dict[str, str],
                    with_site: bool, layer: str | None = None) -> FunnelTemplate:
    """Return the funnel drawn once per metric and window; site pages add their marker.

    ``layer``: the address of a shared file (``../funnel-<metric>-<window>.svg``) that
    draws the network's limit curves and in-control cloud, the same on every site page
    (two thirds of a page's funnel bytes). The template then shows that file with one
    ``<image>`` in their place, the same size and place as the chart, and
    :attr:`FunnelTemplate.layer` is the file's text: an ``<svg>`` of the chart's size
    holding exactly the elements it replaces, so the drawn picture is the same.
    """
    n = np.asarray(chart["n"], float)
    events = np.asarray(chart["events"], float)
    has = n > 0
    limit = chart["limit"]
    key = f"{100 * limit:g}"
    mode = chart.get("overdispersion_mode", "none")
    p0 = float(chart["p0"])
    rare = p0 < RARE_RATE
    title = f"{SITE_TOKEN} highlighted: {label}" if with_site else f"Funnel plot: {label}"
    if rare:
        plot = Chart(title=title, x_label="expected events at the baseline (log scale)",
                     y_label="observed events", x_scale="log", y_min=0.0, height=340)
        x_of = n * p0
        y_of = events

        def curve_y(curves, name):
            return curves[name] * curves["n"]

        def curve_x(curves):
            return curves["n"] * p0
    else:
        plot = Chart(title=title, x_label="mature units per site (log scale)",
                     y_label="proportion with event", x_scale="log", y_min=0.0, height=340)
        x_of = n
        y_of = np.divide(events, n, out=np.zeros_like(events), where=has)

        def curve_y(curves, name):
            return curves[name]

        def curve_x(curves):
            return curves["n"]
    # Start the curves near the smallest site: exact limits are jagged at tiny n and would
    # squash the points the reader came for into the bottom of the plot.
    n_min = max(1.0, 0.5 * float(n[has].min())) if has.any() else 1.0
    n_max = max(n.max(initial=1) * 1.2, 20)
    curves = funnel_curves(p0, n_max, n_min=n_min, coverages=(0.95, limit))
    exact_label = f"{key}% limits (exact)" + ("" if mode != "none" else ", decision")
    plot.line(curve_x(curves), curve_y(curves, "upper_95"), label="95% limits (exact)",
              style="dot", width=1)
    plot.line(curve_x(curves), curve_y(curves, "lower_95"), style="dot", width=1)
    plot.line(curve_x(curves), curve_y(curves, f"upper_{key}"), label=exact_label,
              style="dash", width=1)
    plot.line(curve_x(curves), curve_y(curves, f"lower_{key}"), style="dash", width=1)
    if mode != "none":
        phi = float(chart.get("phi") or 1.0)
        adjusted = funnel_curves(p0, n_max, n_min=n_min, coverages=(limit,), phi=phi,
                                 overdispersion=mode)
        plot.line(curve_x(adjusted), curve_y(adjusted, f"upper_{key}"), style="dashdot",
                  width=1.2, label=f"{key}% limits, overdispersion \u03c6={phi:.2f}, decision")
        plot.line(curve_x(adjusted), curve_y(adjusted, f"lower_{key}"), style="dashdot",
                  width=1.2)
    if rare:
        plot.line(curve_x(curves), curves["n"] * p0, label="as expected (observed = expected)",
                  style="solid", width=1)
    else:
        plot.hline(p0, label=f"baseline {_pct(p0)}", style="solid")
    sites = chart["sites"]
    tips = [f"{s}: {int(e)} events in {int(k)} units" for s, e, k in
            zip(sites, events, n, strict=True)]
    kind = np.array([classes.get(s, "within") for s in sites])
    significant = (kind == "significant") & has
    outside = (kind == "outside") & has
    plain = has & ~significant & ~outside

    def pick(mask, values):
        return [v for v, keep in zip(values, mask, strict=True) if keep]

    plot.cloud(x_of[plain], y_of[plain], label=f"in control ({int(plain.sum())} sites)")
    if outside.any():
        plot.points(x_of[outside], y_of[outside], marker="square", filled=False,
                    label=f"outside, not significant after FDR ({int(outside.sum())})",
                    texts=pick(outside, sites), tips=pick(outside, tips))
    if significant.any():
        plot.points(x_of[significant], y_of[significant], marker="triangle",
                    label=f"outside, significant after FDR ({int(significant.sum())})",
                    texts=pick(significant, sites), tips=pick(significant, tips), size=1.3)
    stand_out = ", ".join(pick(significant, sites)) or "none"
    plot.description = (
        f"{label}: {int(has.sum())} sites; "
        + ("observed against expected events. " if rare else "proportion against units. ")
        + f"Outside the limits and significant after FDR: {stand_out}; outside but not "
        f"significant: {', '.join(pick(outside, sites)) or 'none'}."
        + (f" {SITE_TOKEN} is the large black diamond." if with_site else ""))
    svg = plot.render()
    shared = None
    if layer is not None:
        # the curves, reference line and cloud are drawn first and one after the other
        cloud = max(i for i, s in enumerate(plot.series) if s.kind == "cloud")
        start, end = plot.spans[0][0], plot.spans[cloud][1]
        width, height = plot.size
        shared = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
                  f'height="{height}" viewBox="0 0 {width} {height}">\n'
                  + "\n".join(plot.parts[start:end]) + "\n</svg>\n")
        image = (f'<image href="{_esc(layer)}" x="0" y="0" width="{width}" '
                 f'height="{height}"/>')
        svg = "\n".join([*plot.parts[:start], image, *plot.parts[end:]])
    template = FunnelTemplate(svg, plot, dict(zip(sites, zip(x_of, y_of, has, strict=True),
                                                  strict=True)))
    template.layer = shared
    return template


class FunnelTemplate:
    """A funnel rendered once; :meth:`for_site` adds one highlighted site (site pages)."""

    def __init__(self, svg: str, plot: Chart, points: dict[str, tuple]) -> None:
        self.svg, self.plot, self.points = svg, plot, points
        self.layer: str | None = None  # the shared file's text (funnel_template's layer)
        # Every site page draws each funnel: the template is cut once where the site's
        # name goes, and each point label's place is noted, so a page joins pieces instead
        # of searching the whole drawing (a thousand sites' points) three times.
        self._parts = svg.split(SITE_TOKEN)
        last = self._parts[-1]
        self._end = last.find("</svg>")
        self._labels: dict[str, tuple[int, int]] = {}
        if self._end < 0 or last.count("</svg>") != 1 or any(
                "</svg>" in part for part in self._parts[:-1]):
            self._parts = None  # not the shape drawn here: for_site searches as it used to
            return
        for match in re.finditer(r'font-weight="bold">([^<]*)</text>', last):
            if match.group(1) not in self._labels:
                start = last.rfind("<text ", 0, match.start())
                self._labels[match.group(1)] = (start, match.end())

    def for_site(self, site: str) -> str:
        """Return the funnel naming and highlighting ``site``."""
        name = _esc(site)
        if self._parts is None:
            return self._for_site_searching(site)
        last, end = self._parts[-1], self._end
        # the site's own point label would print beside the highlight's: drop it
        span = self._labels.get(name)
        if span is not None and not 0 <= span[0] < end:
            return self._for_site_searching(site)
        if span is None:
            last = last[:end] + self.marker(site) + last[end:]
        else:
            last = last[:span[0]] + last[span[1]:end] + self.marker(site) + last[end:]
        return name.join([*self._parts[:-1], last])

    def _for_site_searching(self, site: str) -> str:
        own = f'font-weight="bold">{_esc(site)}</text>'
        svg = self.svg
        end = svg.find(own)
        if end >= 0:
            start = svg.rfind("<text ", 0, end)
            svg = svg[:start] + svg[end + len(own):]
        return svg.replace("</svg>", self.marker(site) + "</svg>").replace(
            SITE_TOKEN, _esc(site))

    def marker(self, site: str) -> str:
        """Return the highlighted marker and label of ``site`` (empty when it has no data)."""
        from pipelines.report.svgplot import _marker

        point = self.points.get(site)
        if not point or not point[2]:
            return ""
        x, y = self.plot.project(point[0], point[1])
        return (f"<g><title>{_esc(site)} (this site)</title>"
                f"{_marker('diamond', x, y, True, '#111', 2.0)}</g>"
                f'<text x="{x + 12:.1f}" y="{y + 4:.1f}" font-size="13" font-weight="bold">'
                f"{_esc(site)}</text>")


def funnel_data(chart: dict[str, Any], classes: dict[str, str],
                limits: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Return the funnel's data: one row per site with its decision limits at its n."""
    p0 = float(chart["p0"])
    headers = ["site", "mature_units", "events", "rate", "expected_events_at_baseline",
               "lower_limit", "upper_limit", "class"]
    rows = []
    for site, k, e in zip(chart["sites"], chart["n"], chart["events"], strict=True):
        k, e = int(k), int(e)
        entry = limits.get(site) or {}
        rows.append([site, k, e, (e / k) if k else None, k * p0, entry.get("lower"),
                     entry.get("upper"),
                     FUNNEL_CLASS_TEXT.get(classes.get(site, "no data"), "no mature units")])
    return headers, rows
