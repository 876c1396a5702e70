"""Small inline-SVG charts for the report: readable on screen and printed in black and white.

Why not matplotlib: the report has a page per site and a registry can have a thousand
sites; matplotlib costs tens of milliseconds per figure and its SVG output is large, where
these charts are built in about a millisecond as plain text. They need no script and no
font or stylesheet from the network, so a report opens from disk or an e-mail attachment.

Series are told apart by dash pattern and marker shape, never by colour alone; axes carry
labels with units; date axes print ISO dates (``YYYY-MM`` or ``YYYY-MM-DD``). Every chart is
an ``<svg role="img">`` with a ``<title>`` and ``<desc>`` for screen readers.

Text is 12 units high and the page never shrinks a chart below its natural width (it
scrolls inside its box on a phone instead, see ``pipelines.report.common.CSS``), so chart
text is never smaller than 12 px on screen. Point labels are placed so they do not overlap
each other (:func:`place_labels`).
"""

from __future__ import annotations

import hashlib
import html
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache

import numpy as np

DASHES = {"solid": "", "dash": "6 3", "dot": "1.5 2.5", "dashdot": "6 2 1.5 2", "long": "10 4"}
EPOCH = date(1970, 1, 1)


def _esc(text: object) -> str:
    return _escaped(str(text))


@lru_cache(maxsize=1 << 16)
def _escaped(text: str) -> str:
    """Return ``text`` escaped for SVG (cached by the text: charts repeat their labels)."""
    return html.escape(text, quote=True)


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:.4g}"
    return f"{value:.3g}"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Return round tick values covering [low, high] (1, 2, 2.5 or 5 times a power of 10)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def log_ticks(low: float, high: float) -> list[float]:
    """Return 1-2-5 ticks between ``low`` and ``high`` (both > 0)."""
    ticks = []
    for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        for mantissa in (1, 2, 5):
            value = mantissa * 10.0 ** exponent
            if low <= value <= high:
                ticks.append(value)
    return ticks


def date_ticks(low: int, high: int) -> tuple[list[int], str]:
    """Return tick positions (days since 1970-01-01) at month, quarter or year starts."""
    first, last = EPOCH + timedelta(days=int(low)), EPOCH + timedelta(days=int(high))
    months = (last.year - first.year) * 12 + last.month - first.month
    step = next(s for s in (1, 3, 6, 12, 24, 60) if months / s <= 8)
    ticks = []
    year, month = first.year, first.month
    while True:
        month_index = (year * 12 + month - 1)
        if month_index % step == 0:
            day = (date(year, month, 1) - EPOCH).days
            if day > high:
                break
            if day >= low:
                ticks.append(day)
        month += 1
        if month > 12:
            year, month = year + 1, 1
        if date(year, month, 1) > last:
            break
    style = "%Y" if step >= 12 else "%Y-%m"
    return ticks, style


@lru_cache(maxsize=256)
def _date_axis(low: int, high: int) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """Return date-axis ticks and their labels; charts of one report share a few ranges."""
    ticks, style = date_ticks(low, high)
    return (tuple(float(t) for t in ticks),
            tuple((EPOCH + timedelta(days=t)).strftime(style) for t in ticks))


def decimate(x: np.ndarray, y: np.ndarray, max_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first, min, max and last point of each bucket so peaks survive thinning."""
    n = len(x)
    if n <= max_points:
        return x, y
    buckets = max_points // 4
    bucket = np.arange(n) * buckets // n  # contiguous, nearly equal buckets
    starts = np.flatnonzero(np.concatenate(([True], bucket[1:] != bucket[:-1])))
    ends = np.append(starts[1:], n) - 1
    order = np.lexsort((y, bucket))  # by bucket, then by value
    keep = np.zeros(n, dtype=bool)  # the kept indices, in order, each once
    keep[starts] = keep[ends] = keep[order[starts]] = keep[order[ends]] = True
    return x[keep], y[keep]



def decimate_many(x: np.ndarray, y: np.ndarray, bounds, max_points: int = 400) -> np.ndarray:
    """Return which points :func:`decimate` keeps of many series at once (series ``i`` is
    ``x[bounds[i]:bounds[i + 1]]``): the same points as ``decimate`` of each series.

    One pass over every site's points of a chart instead of a dozen numpy calls per site.
    """
    bounds = np.asarray(bounds, dtype=np.int64)
    sizes = np.diff(bounds)
    keep = np.ones(len(x), dtype=bool)
    long = sizes > max_points
    if not long.any():
        return keep
    buckets = max_points // 4
    series = np.repeat(np.arange(len(sizes)), sizes)
    local = np.arange(len(x)) - np.repeat(bounds[:-1], sizes)
    thinned = np.flatnonzero(long[series])
    # decimate's buckets of each long series, numbered across the series
    group = series[thinned] * buckets + local[thinned] * buckets // sizes[series[thinned]]
    starts = np.flatnonzero(np.concatenate(([True], group[1:] != group[:-1])))
    ends = np.append(starts[1:], len(group)) - 1
    order = np.lexsort((y[thinned], group))  # by bucket, then by value (stable, as there)
    kept = np.zeros(len(group), dtype=bool)
    kept[starts] = kept[ends] = kept[order[starts]] = kept[order[ends]] = True
    keep[thinned] = kept
    return keep


def long_paths(x: np.ndarray, y: np.ndarray, bounds, frames: np.ndarray, left: int, top: int,
               plot_w: int, plot_h: int) -> list[str | None]:
    """Return the ``points`` text of many lines at once: line ``i`` (``x, y`` between
    ``bounds[i]`` and ``bounds[i + 1]``) drawn in the frame ``frames[i] = (x0, x1, y0, y1)``
    of a linear chart, as :meth:`Chart.render` draws it: through :func:`_long_path` (at
    least :data:`_LONG_PATH` numbers), else every point as ``%.1f`` writes it (the table's
    text, :func:`_tenths_pairs`). None where it would not be drawn so (an empty line, a
    value that is not finite, a coordinate only formatting rounds right, a long line of
    one repeated point): those are drawn as usual.

    The same float64 arithmetic as ``render``'s ``sx`` and ``sy``, element by element, and
    :func:`straight_points` run on every line at once; tests hold the two to each other.
    """
    bounds = np.asarray(bounds, dtype=np.int64)
    sizes = np.diff(bounds)
    out: list[str | None] = [None] * len(sizes)
    if not len(x):
        return out
    series = np.repeat(np.arange(len(sizes)), sizes)
    x0, x1, y0, y1 = (np.repeat(np.asarray(frames[:, i], dtype=float), sizes)
                      for i in range(4))
    with np.errstate(invalid="ignore", divide="ignore"):  # frames of empty lines: NaN
        sx = left + (x - x0) / (x1 - x0) * plot_w
        sy = top + plot_h - (np.minimum(np.maximum(y, y0), y1) - y0) / (y1 - y0) * plot_h
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(sx) & np.isfinite(sy)
    for values in (sx, sy):  # _tenths' conditions, point by point
        scaled = values * 10.0
        fraction = scaled - np.floor(scaled)
        ok &= (values >= 0.05) & (values < _TABLE_TOP) & (np.abs(fraction - 0.5) > 1e-6)
    bad = np.bincount(series[~ok], minlength=len(sizes))
    eligible = (bad == 0) & (sizes > 0)
    long = 2 * sizes >= _LONG_PATH  # the others keep every point
    if not eligible.any():
        return out
    chosen = np.flatnonzero(eligible[series])
    series, sx, sy = series[chosen], sx[chosen], sy[chosen]
    tx = (np.floor(sx * 10.0) + (sx * 10.0 - np.floor(sx * 10.0) > 0.5)).astype(np.intp)
    ty = (np.floor(sy * 10.0) + (sy * 10.0 - np.floor(sy * 10.0) > 0.5)).astype(np.intp)
    # straight_points of every line: first without repeats of the point before ...
    same = (series[1:] == series[:-1]) & long[series[1:]]
    repeat = same & (np.diff(tx) == 0) & (np.diff(ty) == 0)
    kept = np.flatnonzero(np.concatenate(([True], ~repeat)))
    counts = np.bincount(series[kept], minlength=len(sizes))
    # ... then without points the line runs straight through, within one line
    dx, dy = np.diff(tx[kept]), np.diff(ty[kept])
    inside = (series[kept][1:] == series[kept][:-1]) & long[series[kept][1:]]
    through = (inside[:-1] & inside[1:] & (dx[:-1] * dy[1:] == dy[:-1] * dx[1:])
               & (dx[:-1] * dx[1:] + dy[:-1] * dy[1:] > 0))
    middle = np.ones(len(kept), dtype=bool)  # both ends of the whole, of each line too
    middle[1:-1] = ~through
    shown = kept[middle]
    parts = np.empty(2 * len(shown), dtype=object)
    parts[0::2] = _tenths_table(",")[tx[shown]]
    parts[1::2] = _tenths_table(" ")[ty[shown]]
    texts = parts.tolist()
    ends = 2 * np.cumsum(np.bincount(series[shown], minlength=len(sizes)))
    for i in np.flatnonzero(eligible).tolist():
        if counts[i] > 1 or not long[i]:  # a long line of one point: drawn as usual
            out[i] = "".join(texts[ends[i - 1] if i else 0:ends[i]]).rstrip()
    return out


@dataclass
class _Series:
    kind: str  # line | points | hline | errorbar
    x: np.ndarray
    y: np.ndarray
    label: str | None = None
    style: str = "solid"
    marker: str = "circle"
    filled: bool = True
    width: float = 1.4
    step: bool = False
    tone: str = "#111"
    y2: np.ndarray | None = None
    texts: list[str] | None = None
    tips: list[str] | None = None
    size: float = 1.0
    # a line's ``points`` text (a step line's: of its staircase) or the markers' elements,
    # made beforehand for a frame (:func:`long_paths`): called with the frame the chart is
    # drawn in, it returns them, or None to draw as usual
    drawn: Callable[[tuple], str | None] | None = None


@dataclass
class Chart:
    """An x/y chart rendered to an inline SVG string."""

    title: str
    x_label: str
    y_label: str
    x_scale: str = "linear"  # linear | log | date
    width: int = 720
    height: int = 280
    y_min: float | None = None
    y_max: float | None = None
    description: str = ""
    series: list[_Series] = field(default_factory=list)
    # (x0, x1, y0, y1) as _ranges would compute them, when the caller has computed them
    # for many charts at once (pipelines.report.charts' batches; tests hold the two equal)
    ranges: tuple[float, float, float, float] | None = None

    def line(self, x, y, *, label=None, style="solid", width=1.4, step=False, tone="#111",
             drawn=None):
        """Add a line (``step=True`` draws a staircase, for cumulative statistics).

        ``drawn(frame)`` may return the line's ``points`` text, made beforehand for the
        frame ``(x0, x1, y0, y1, left, top, plot_w, plot_h)`` the chart is drawn in (the
        same text it would be drawn as; None: drawn as usual).
        """
        self.series.append(_Series("line", np.asarray(x, float), np.asarray(y, float), label,
                                   style=style, width=width, step=step, tone=tone,
                                   drawn=drawn))

    def points(self, x, y, *, label=None, marker="circle", filled=True, texts=None, tips=None,
               tone="#111", size=1.0, drawn=None):
        """Add markers; ``texts`` labels points on the chart, ``tips`` adds hover titles.

        ``drawn(frame)`` may return the markers' elements, made beforehand for the frame
        the chart is drawn in (the same elements they would be drawn as; None: drawn as
        usual). Not with ``texts``: labels are placed among every series' labels.
        """
        self.series.append(_Series("points", np.asarray(x, float), np.asarray(y, float), label,
                                   marker=marker, filled=filled, texts=texts, tips=tips,
                                   tone=tone, size=size, drawn=drawn))

    def band(self, low, high, *, label=None, tone="#e4e4e4"):
        """Add a shaded horizontal band (a guidance range) behind everything else."""
        self.series.insert(0, _Series("band", np.array([]), np.array([float(low), float(high)]),
                                      label, tone=tone))

    def cloud(self, x, y, *, label=None, tone="#777"):
        """Add many small dots as one path (thousands of sites cost one element)."""
        self.series.append(_Series("cloud", np.asarray(x, float), np.asarray(y, float), label,
                                   tone=tone))

    def hline(self, y, *, label=None, style="dash", tone="#111"):
        """Add a horizontal reference line across the plot."""
        self.series.append(_Series("hline", np.array([]), np.array([float(y)]), label,
                                   style=style, tone=tone))

    def errorbars(self, x, low, high, *, label=None):
        """Add vertical interval bars."""
        self.series.append(_Series("errorbar", np.asarray(x, float), np.asarray(low, float),
                                   label, y2=np.asarray(high, float)))

    # -- rendering ------------------------------------------------------------------------
    def _ranges(self) -> tuple[float, float, float, float]:
        xs = [s.x for s in self.series if s.x.size]
        ys = [s.y for s in self.series] + [s.y2 for s in self.series if s.y2 is not None]
        xv = np.concatenate(xs) if xs else np.array([0.0, 1.0])
        yv = np.concatenate(ys) if ys else np.array([0.0, 1.0])
        xv, yv = xv[np.isfinite(xv)], yv[np.isfinite(yv)]
        if self.x_scale == "log":
            xv = xv[xv > 0]
        x0, x1 = (float(xv.min()), float(xv.max())) if xv.size else (0.0, 1.0)
        y0, y1 = (float(yv.min()), float(yv.max())) if yv.size else (0.0, 1.0)
        if self.y_min is not None:
            y0 = self.y_min
        if self.y_max is not None:
            y1 = self.y_max
        if self.x_scale == "log":
            x0, x1 = x0 / 1.3, max(x1, x0 * 1.01) * 1.3
        elif x1 == x0:
            x0, x1 = x0 - 1, x1 + 1
        if y1 == y0:
            y1 = y0 + (abs(y0) or 1.0)
        pad = (y1 - y0) * 0.05
        return x0, x1, (y0 if self.y_min is not None else y0 - pad), y1 + pad

    def render(self) -> str:
        """Return the chart as an ``<svg>`` element."""
        left, top = 64, 30
        # the parts that depend on the chart's kind, not its site (frame, axis names,
        # legend), made once per kind and legend (:func:`_skeleton`)
        # (the width as its text: 1 and 1.0 are one key to a cache but two texts)
        legend = tuple((s.kind, s.label, s.style, s.tone, str(s.width), s.marker, s.filled)
                       for s in self.series if s.label)
        (height, plot_w, plot_h, frame_rect, axis_names,
         legend_parts) = _skeleton(self.width, self.height, self.x_label, self.y_label, legend)
        x0, x1, y0, y1 = self.ranges if self.ranges is not None else self._ranges()
        log = self.x_scale == "log"

        lo, hi = (math.log10(x0), math.log10(x1)) if log else (0.0, 1.0)

        def sx(value):
            value = np.asarray(value, float)
            if log:
                return left + (np.log10(np.maximum(value, 1e-12)) - lo) / (hi - lo) * plot_w
            return left + (value - x0) / (x1 - x0) * plot_w

        def sy(value):
            # np.minimum/np.maximum: np.clip's result without its wrapper's cost per call
            value = np.minimum(np.maximum(np.asarray(value, float), y0), y1)
            return top + plot_h - (value - y0) / (y1 - y0) * plot_h

        # Scalar twins of sx and sy for ticks: the same float64 arithmetic in the same
        # order (so the same bytes), without numpy's per-call cost on a single number.
        def sx1(value: float) -> float:
            if log:
                return float(sx(value))
            return left + (float(value) - x0) / (x1 - x0) * plot_w

        def sy1(value: float) -> float:
            return top + plot_h - (min(max(float(value), y0), y1) - y0) / (y1 - y0) * plot_h

        # Deterministic ids (same report, same bytes); titles differ between charts on a page.
        ident = "c" + hashlib.sha1(f"{self.title}|{self.y_label}|{self.x_label}".encode()).hexdigest()[:10]
        title = _esc(self.title)
        out = [
            f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="chart" '
            f'viewBox="0 0 {self.width} {height}" width="{self.width}" height="{height}" '
            f'aria-labelledby="{ident}t {ident}d" font-family="sans-serif" font-size="12">',
            f'<title id="{ident}t">{title}</title>',
            f'<desc id="{ident}d">{_esc(self.description) if self.description else title}'
            '</desc>',
            frame_rect,
            f'<text x="{left}" y="16" font-size="13" '  # left: in view on a phone
            f'font-weight="bold">{_esc(_shorten(self.title, (self.width - left) // 7))}</text>',
        ]
        # axes and grid
        if log:
            xt = log_ticks(x0, x1)
            out.extend(_x_grid([sx1(t) for t in xt], [_fmt(t) for t in xt], top, plot_h))
        else:
            out.extend(_linear_x_axis(self.x_scale, x0, x1, left, top, plot_w, plot_h))
        out.extend(_y_axis(y0, y1, left, top, plot_w, plot_h))
        out.extend(axis_names)
        labels: list[tuple[float, float, str]] = []
        self._frame = None if log else (x0, x1, y0, y1, left, top, plot_w, plot_h)
        # where each series' elements sit in the output (a funnel hands the network's
        # curves and cloud to a shared file: pipelines.report.charts.funnel_template)
        self.spans = []
        for s in self.series:
            start = len(out)
            out.extend(self._draw(s, sx, sy, sy1, left, plot_w, labels))
            self.spans.append((start, len(out)))
        if labels:
            out.extend(place_labels(labels, (left, top, left + plot_w, top + plot_h)))
        self.project = lambda x, y: (float(sx(x)), float(sy(y)))
        # legend under the plot: a sample of each series' line or marker, then its label
        out.extend(legend_parts)
        out.append("</svg>")
        self.parts, self.size = out, (self.width, height)
        return "\n".join(out)

    @staticmethod
    def _path(points, s: _Series) -> str:
        return Chart._polyline([v for point in points for v in point], s)

    @staticmethod
    def _polyline(flat: list[float], s: _Series) -> str:
        """Return a polyline through ``flat`` = [x0, y0, x1, y1, ...]."""
        # one formatting call for the whole path: charts of a thousand-site report are
        # mostly these numbers
        return Chart._polyline_text((_pair_format(len(flat) // 2) % tuple(flat)).rstrip(), s)

    @staticmethod
    def _polyline_text(text: str, s: _Series) -> str:
        dash = DASHES.get(s.style, "")
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        return (f'<polyline points="{text}" fill="none" stroke="{s.tone}" '
                f'stroke-width="{s.width}"{dash_attr}/>')

    def _draw(self, s: _Series, sx, sy, sy1, left, plot_w, labels) -> list[str]:
        if s.kind == "hline":
            y = sy1(s.y[0])
            return [self._path([(left, y), (left + plot_w, y)], s)]
        if s.kind == "band":
            y_high, y_low = sy1(s.y[1]), sy1(s.y[0])
            return [f'<rect x="{left}" y="{y_high:.1f}" width="{plot_w}" '
                    f'height="{max(y_low - y_high, 0.5):.1f}" fill="{s.tone}"/>']
        # a line's text made beforehand (a step line's: of its staircase, as drawn below)
        # needs none of the masking
        if s.kind == "line" and s.drawn is not None and self._frame is not None:
            text = s.drawn(self._frame)
            if text is not None:
                return [self._polyline_text(text, s)]
        ok = np.isfinite(s.x) & np.isfinite(s.y)
        if self.x_scale == "log":
            ok &= s.x > 0
        x, y = s.x[ok], s.y[ok]
        if s.kind == "line":
            if s.step:
                x, y = np.repeat(x, 2)[1:], np.repeat(y, 2)[:-1]
            if not len(x):
                return []
            if 2 * len(x) >= _LONG_PATH:
                return [self._polyline_text(_long_path(sx(x), sy(y)), s)]
            return [self._polyline(_interleave(sx(x), sy(y)), s)]
        if s.kind == "cloud":
            if not len(x):
                return []
            dots = _dots(sx(x).tolist(), sy(y).tolist())
            return [f'<path d="{dots}" stroke="{s.tone}" stroke-width="4" '
                    'stroke-linecap="round" fill="none"/>']
        if s.kind == "errorbar":
            hi = s.y2[ok]
            parts = []
            for xv, lo_v, hi_v in zip(sx(x).tolist(), sy(y).tolist(), sy(hi).tolist(), strict=True):
                parts.append(f'<path d="M{xv - 3:.1f},{lo_v:.1f}h6M{xv:.1f},{lo_v:.1f}V{hi_v:.1f}'
                             f'M{xv - 3:.1f},{hi_v:.1f}h6" stroke="#111" stroke-width="0.9" '
                             'fill="none"/>')
            return parts
        if s.drawn is not None and not s.texts and self._frame is not None:
            made = s.drawn(self._frame)
            if made is not None:
                return made
        parts = []
        texts = [t for t, k in zip(s.texts, ok, strict=True) if k] if s.texts else None
        tips = [t for t, k in zip(s.tips, ok, strict=True) if k] if s.tips else None
        for i, (xv, yv) in enumerate(zip(sx(x).tolist(), sy(y).tolist(), strict=True)):
            mark = _marker(s.marker, xv, yv, s.filled, s.tone, s.size)
            if tips:
                mark = f"<g><title>{_esc(tips[i])}</title>{mark}</g>"
            parts.append(mark)
            if texts and texts[i]:
                labels.append((xv, yv, texts[i]))
        return parts


@lru_cache(maxsize=4096)
def _skeleton(width: int, base_height: int, x_label: str, y_label: str,
              legend: tuple[tuple, ...]) -> tuple:
    """Return the parts of a chart that depend on its kind, not on its data: the height
    with the legend's rows, the plot's width and height, the plot frame, the axis names
    and the legend's elements (``legend``: kind, label, style, tone, line width as text,
    marker and fill of each labelled series). The charts of one kind on a thousand site pages share
    a few of these (a CUSUM's legend differs only by its threshold), so each is made once
    (issue 11); the text is :meth:`Chart.render`'s as it made it chart by chart."""
    left, right, top, bottom = 64, 16, 30, 52
    longest = max((len(entry[1]) for entry in legend), default=0)
    plot_w = width - left - right
    # as many legend columns as fit the longest label at about 6.5 units a character
    columns = next((c for c in (3, 2) if 34 + 6.5 * longest <= plot_w / c), 1)
    legend_rows = math.ceil(len(legend) / columns)
    height = base_height + 16 * legend_rows
    plot_h = base_height - top - bottom
    frame_rect = (f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" '
                  'fill="#fff" stroke="#444" stroke-width="0.8"/>')
    axis_names = (f'<text x="{left + plot_w / 2:.0f}" y="{top + plot_h + 32}" '
                  f'text-anchor="middle">{_esc(x_label)}</text>',
                  f'<text transform="translate(14,{top + plot_h / 2:.0f}) rotate(-90)" '
                  f'text-anchor="middle">{_esc(y_label)}</text>')
    parts = []
    for i, (kind, label, style, tone, line_width, marker, filled) in enumerate(legend):
        parts.extend(_legend_entry(i, columns, left, top, plot_w, plot_h, kind, label, style,
                                   tone, line_width, marker, filled))
    return height, plot_w, plot_h, frame_rect, axis_names, tuple(parts)


# The frame of a chart (grid, tick labels, legend) is drawn from a few numbers, and the
# charts of one report share most of them (one date range, one set of legend entries), so
# each piece is cached by those numbers. The arithmetic is that of render's sx1 and sy1.

@lru_cache(maxsize=4096)
def _linear_x_axis(scale: str, x0: float, x1: float, left: int, top: int, plot_w: int,
                   plot_h: int) -> tuple[str, ...]:
    """Return the vertical grid lines and tick labels of a date or linear x axis."""
    if scale == "date":
        xt, x_text = _date_axis(int(x0), int(x1))
    else:
        xt = nice_ticks(x0, x1)
        x_text = [_fmt(t) for t in xt]
    return _x_grid([left + (float(t) - x0) / (x1 - x0) * plot_w for t in xt], x_text, top,
                   plot_h)


def _x_grid(positions: list[float], texts, top: int, plot_h: int) -> tuple[str, ...]:
    bottom_y, label_y = top + plot_h, top + plot_h + 14
    out = []
    for px, text in zip(positions, texts, strict=True):
        out.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom_y}" '
                   'stroke="#ddd" stroke-width="0.6"/>')
        out.append(f'<text x="{px:.1f}" y="{label_y}" text-anchor="middle">'
                   f'{_esc(text)}</text>')
    return tuple(out)


@lru_cache(maxsize=4096)
def _y_axis(y0: float, y1: float, left: int, top: int, plot_w: int,
            plot_h: int) -> tuple[str, ...]:
    """Return the horizontal grid lines and tick labels of the y axis."""
    out = []
    for t in nice_ticks(y0, y1):
        py = top + plot_h - (min(max(float(t), y0), y1) - y0) / (y1 - y0) * plot_h
        out.append(f'<line x1="{left}" y1="{py:.1f}" x2="{left + plot_w}" y2="{py:.1f}" '
                   'stroke="#ddd" stroke-width="0.6"/>')
        out.append(f'<text x="{left - 5}" y="{py + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    return tuple(out)


@lru_cache(maxsize=4096)
def _legend_entry(i: int, columns: int, left: int, top: int, plot_w: int, plot_h: int,
                  kind: str, label: str, style: str, tone: str, width: float, marker: str,
                  filled: bool) -> tuple[str, str]:
    """Return legend entry ``i``: a sample of the series' line or marker, then its label."""
    col, row = i % columns, i // columns
    lx = left + col * (plot_w / columns)
    ly = top + plot_h + 46 + row * 16
    if kind in ("line", "hline"):
        sample = Chart._path([(lx, ly), (lx + 26, ly)],
                             _Series(kind, _NONE, _NONE, style=style, tone=tone, width=width))
    elif kind == "band":
        sample = f'<rect x="{lx}" y="{ly - 5}" width="26" height="10" fill="{tone}"/>'
    elif kind == "cloud":
        sample = f'<circle cx="{lx + 13}" cy="{ly}" r="2" fill="{tone}"/>'
    elif kind == "points":
        sample = _marker(marker, lx + 13, ly, filled, tone)
    else:
        sample = (f'<line x1="{lx + 13}" y1="{ly - 5}" x2="{lx + 13}" y2="{ly + 5}" '
                  'stroke="#111"/>')
    return sample, (f'<text x="{lx + 32:.1f}" y="{ly + 4}">'
                    f'{_legend_text(label, int((plot_w / columns - 34) / 6.5))}</text>')


_NONE = np.array([])


def _dots(xs: list[float], ys: list[float]) -> str:
    """Return the path data of round dots at ``xs, ys`` (rounded to whole units, as
    ``%.0f`` rounds), each place once, from left to right, as moves relative to the dot
    before (``m1,-35h0``, a fifth shorter than ``M561,203h0``).

    The path is stroked as one shape, so neither a dot drawn again on the same place (in
    a thousand-site funnel a tenth to a half of the dots: rare events pile up at few
    counts) nor the order of the dots changes the ink; whole units add up exactly.
    """
    places = sorted({(int(f"{px:.0f}"), int(f"{py:.0f}"))
                     for px, py in zip(xs, ys, strict=True)})
    parts = [f"M{places[0][0]},{places[0][1]}h0"]
    for (x0, y0), (x1, y1) in zip(places, places[1:], strict=False):
        parts.append(f"m{x1 - x0},{y1 - y0}h0")
    return "".join(parts)


def _interleave(xs: np.ndarray, ys: np.ndarray) -> list[float]:
    """Return ``[x0, y0, x1, y1, ...]`` (np.column_stack's order, without its overhead)."""
    flat = np.empty(2 * len(xs))
    flat[0::2], flat[1::2] = xs, ys
    return flat.tolist()


@lru_cache(maxsize=4096)
def _legend_text(label: str, chars: int) -> str:
    """Return a legend label shortened and escaped (charts of a report share most labels)."""
    return _esc(_shorten(label, chars))


@lru_cache(maxsize=1024)
def _pair_format(points: int) -> str:
    return "%.1f,%.1f " * points


# Paths of at least this many numbers (the CUSUM paths: up to 400 points) are written
# through a table of texts, without the points a reader cannot see (:func:`_long_path`);
# below it formatting is cheaper.
_LONG_PATH = 200
# The largest coordinate the table holds: charts are at most a few hundred units wide/high.
_TABLE_TOP = 4000.0


@lru_cache(maxsize=2)
def _tenths_table(end: str = "") -> np.ndarray:
    """Return ``"%.1f" % (i / 10) + end`` for i up to 10 * :data:`_TABLE_TOP`."""
    return np.array([f"{i / 10:.1f}{end}" for i in range(int(_TABLE_TOP * 10) + 1)],
                    dtype=object)


def _tenths(values: np.ndarray) -> np.ndarray | None:
    """Return ``values`` in tenths as ``%.1f`` rounds them (integers), or None.

    The rounding is done as ``%.1f`` does it (to the nearest, from the exact binary
    value): ``v * 10`` is off by far less than 1e-6 below 4,000, so it rounds the same way
    unless it lies within 1e-6 of a half; such values (and any below 0.05, where ``-0.0``
    could appear, or above the table) give None, and the caller formats them after all.
    """
    scaled = values * 10.0
    whole = np.floor(scaled)
    fraction = scaled - whole
    if not ((values >= 0.05) & (values < _TABLE_TOP)
            & (np.abs(fraction - 0.5) > 1e-6)).all():
        return None
    return (whole + (fraction > 0.5)).astype(np.intp)


def _pairs_text(xs: np.ndarray, ys: np.ndarray) -> str:
    """Return the ``x,y x,y ...`` text of coordinates in tenths (:func:`_tenths`)."""
    # x texts with their comma, y texts with their space: half the pieces to join
    parts = np.empty(2 * len(xs), dtype=object)
    parts[0::2] = _tenths_table(",")[xs]
    parts[1::2] = _tenths_table(" ")[ys]
    return "".join(parts.tolist()).rstrip()


def _tenths_pairs(flat: list[float]) -> str:
    """Return ``("%.1f,%.1f " * n % tuple(flat)).rstrip()``: the same text, looked up
    (a coordinate's text is the table's entry for its value in :func:`_tenths`); every
    point, as :func:`_long_path` writes those it keeps (the tests hold the two to it)."""
    tenths = _tenths(np.asarray(flat, dtype=float))
    if tenths is None:
        return (_pair_format(len(flat) // 2) % tuple(flat)).rstrip()
    return _pairs_text(tenths[0::2], tenths[1::2])


def straight_points(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Return the indices of the points of a polyline (integer coordinates) that a
    reader can see: without repeats of the point before, and without points lying
    straight on, and between, the points before and after them.

    Dropping those draws the same line: every step between two kept points is one
    straight segment the old path ran along in the same direction, end to end (so also
    the same length, and the same dash pattern). Drops at once are as good as one by one:
    a run of dropped points has every step in one direction, so its ends join straight.
    A path of one repeated point keeps its first and last (zero length, as before).
    """
    n = len(xs)
    if n < 3:
        return np.arange(n)
    dx, dy = np.diff(xs), np.diff(ys)
    still = (dx == 0) & (dy == 0)
    keep = None
    if still.any():  # each point unless it repeats the one before
        keep = np.flatnonzero(np.concatenate(([True], ~still)))
        if len(keep) == 1:
            return np.array([0, n - 1])
        dx, dy = np.diff(xs[keep]), np.diff(ys[keep])
    # a point is on the way: the steps into and out of it are parallel (cross product 0)
    # and point the same way (dot product > 0); exact in integers
    through = ((dx[:-1] * dy[1:] == dy[:-1] * dx[1:])
               & (dx[:-1] * dx[1:] + dy[:-1] * dy[1:] > 0))
    shown = np.concatenate(([True], ~through, [True]))
    return np.flatnonzero(shown) if keep is None else keep[shown]


def _long_path(xs: np.ndarray, ys: np.ndarray) -> str:
    """Return the ``points`` text of a long path (screen coordinates ``xs``, ``ys``) as
    written, in tenths, without the points :func:`straight_points` drops (the CUSUMs'
    runs at zero, the funnel limits' clipped ends, straight stretches): the same line in
    fewer bytes. The chart's data is complete in its CSV."""
    flat = np.empty(2 * len(xs))
    flat[0::2], flat[1::2] = xs, ys
    tenths = _tenths(flat)
    if tenths is None:  # a value only formatting rounds right: as before, every point
        return (_pair_format(len(xs)) % tuple(flat.tolist())).rstrip()
    tx, ty = tenths[0::2], tenths[1::2]
    kept = straight_points(tx, ty)
    return _pairs_text(tx[kept], ty[kept])


def _shorten(text: str, chars: int) -> str:
    """Return ``text`` cut to ``chars`` characters with an ellipsis (the full text is in
    the title and description)."""
    text = str(text)
    return text if len(text) <= max(chars, 8) else text[:max(chars, 8) - 1] + "\u2026"


LABEL_CHAR_W, LABEL_H = 7.0, 12.0  # bold 11-unit sans-serif: a generous box per character


def place_labels(labels: list[tuple[float, float, str]],
                 frame: tuple[float, float, float, float]) -> list[str]:
    """Return ``<text>`` elements labelling points so that no two labels overlap.

    Each label tries eight places around its point, then steps further out vertically; a
    label moved away from its point gets a thin leader line. Labels are placed from the top
    of the plot down, so the outliers a reader looks for keep the closest places.
    """
    left, top, right, bottom = frame
    placed: list[tuple[float, float, float, float]] = []
    out = []
    for x, y, text in sorted(labels, key=lambda item: (item[1], item[0])):
        w, h = LABEL_CHAR_W * len(text) + 2, LABEL_H
        candidates = [(x + 6, y - 6 - h), (x + 6, y + 6), (x - 6 - w, y - 6 - h),
                      (x - 6 - w, y + 6), (x - w / 2, y - 8 - h), (x - w / 2, y + 8),
                      (x + 7, y - h / 2), (x - 7 - w, y - h / 2)]
        for step in range(1, 12):
            candidates += [(x + 6, y - 6 - h - step * h), (x + 6, y + 6 + step * h),
                           (x - 6 - w, y - 6 - h - step * h), (x - 6 - w, y + 6 + step * h)]
        chosen = None
        for cx, cy in candidates:
            cx = min(max(cx, left + 1), right - w - 1)
            cy = min(max(cy, top + 1), bottom - h - 1)
            box = (cx, cy, cx + w, cy + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                       for b in placed):
                chosen = box
                break
        if chosen is None:
            continue  # no room at all: the table under the chart still names the site
        placed.append(chosen)
        cx, cy = chosen[0], chosen[1]
        near_x = min(max(x, cx), cx + w)
        near_y = min(max(y, cy), cy + h)
        if math.hypot(near_x - x, near_y - y) > 12:
            out.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{near_x:.1f}" y2="{near_y:.1f}" '
                       'stroke="#555" stroke-width="0.6"/>')
        out.append(f'<text x="{cx + 1:.1f}" y="{cy + h - 2:.1f}" font-size="11" '
                   f'font-weight="bold">{_esc(text)}</text>')
    return out


def _marker(shape: str, x: float, y: float, filled: bool, tone: str = "#111",
            size: float = 1.0) -> str:
    fill = tone if filled else "#fff"
    k = size
    common = f'fill="{fill}" stroke="{tone}" stroke-width="{1.0 if k <= 1 else 1.6}"'
    if shape == "square":
        return (f'<rect x="{x - 3 * k:.1f}" y="{y - 3 * k:.1f}" width="{6 * k:g}" '
                f'height="{6 * k:g}" {common}/>')
    if shape == "triangle":
        return (f'<path d="M{x:.1f},{y - 4.5 * k:.1f}L{x + 4 * k:.1f},{y + 3 * k:.1f}'
                f'L{x - 4 * k:.1f},{y + 3 * k:.1f}Z" {common}/>')
    if shape == "diamond":
        return (f'<path d="M{x:.1f},{y - 4.5 * k:.1f}L{x + 4.5 * k:.1f},{y:.1f}L{x:.1f},'
                f'{y + 4.5 * k:.1f}L{x - 4.5 * k:.1f},{y:.1f}Z" {common}/>')
    if shape == "cross":
        return (f'<path d="M{x - 4 * k:.1f},{y - 4 * k:.1f}L{x + 4 * k:.1f},{y + 4 * k:.1f}'
                f'M{x - 4 * k:.1f},{y + 4 * k:.1f}L{x + 4 * k:.1f},{y - 4 * k:.1f}" '
                f'stroke="{tone}" stroke-width="1.6"/>')
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{3 * k:g}" {common}/>'


def forest(rows: list[tuple[str, float, float, float]], *, title: str, x_label: str,
           reference: float = 1.0, width: int = 720, description: str = "") -> str:
    """Return a forest plot: one row per ``(label, estimate, low, high)`` with its interval.

    Used for observed/expected ratios: a square at the estimate, a bar for the interval
    and a dashed reference line (1 = as expected). Intervals running past the axis end in
    an arrow head and their upper bound is written beside them.
    """
    # room for the longest label (about 6 px a character at 11 px sans-serif)
    left = min(380, 20 + 6.5 * max((len(r[0]) for r in rows), default=10))
    right, top, row_h = 70, 30, 24
    height = top + row_h * len(rows) + 48
    plot_w = width - left - right
    # The axis shows every estimate (and at least twice the reference), at most 20x;
    # only interval tails may run past it.
    estimates = [e for _, e, _, _ in rows if e is not None and math.isfinite(e)]
    x1 = min(max([2.0 * reference, *(1.25 * e for e in estimates)]), 20.0)
    ticks = nice_ticks(0.0, x1)
    x1 = max(x1, ticks[-1])

    def sx(value: float) -> float:
        return left + min(max(value, 0.0), x1) / x1 * plot_w

    ident = "f" + hashlib.sha1(f"{title}|{x_label}".encode()).hexdigest()[:10]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="chart" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'aria-labelledby="{ident}t {ident}d" font-family="sans-serif" font-size="12">',
        f'<title id="{ident}t">{_esc(title)}</title>',
        f'<desc id="{ident}d">{_esc(description or title)}</desc>',
        f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13" '
        f'font-weight="bold">{_esc(title)}</text>',
    ]
    bottom = top + row_h * len(rows)
    for t in ticks:
        px = sx(t)
        out.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom}" stroke="#ddd" '
                   'stroke-width="0.6"/>')
        out.append(f'<text x="{px:.1f}" y="{bottom + 14}" text-anchor="middle">{_fmt(t)}</text>')
    ref = sx(reference)
    out.append(f'<line x1="{ref:.1f}" y1="{top}" x2="{ref:.1f}" y2="{bottom}" stroke="#111" '
               'stroke-dasharray="6 3"/>')
    out.append(f'<text x="{left + plot_w / 2:.0f}" y="{bottom + 32}" text-anchor="middle">'
               f'{_esc(x_label)}</text>')
    for i, (label, estimate, low, high) in enumerate(rows):
        y = top + row_h * i + row_h / 2
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{_esc(label)}</text>')
        if estimate is None or low is None or high is None:
            out.append(f'<text x="{left + 4}" y="{y + 4:.1f}">no mature units</text>')
            continue
        x_low, x_high = sx(low), sx(high)
        out.append(f'<line x1="{x_low:.1f}" y1="{y:.1f}" x2="{x_high:.1f}" y2="{y:.1f}" '
                   'stroke="#111" stroke-width="1.4"/>')
        if high > x1:
            out.append(f'<path d="M{x_high:.1f},{y:.1f}l-6,-4v8z" fill="#111"/>')
            out.append(f'<text x="{x_high + 4:.1f}" y="{y + 4:.1f}">{_fmt(high)}</text>')
        out.append(f'<rect x="{sx(estimate) - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" '
                   'fill="#111"/>')
    out.append("</svg>")
    return "\n".join(out)
