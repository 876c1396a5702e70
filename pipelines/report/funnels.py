"""The funnel plots page (``funnels.html``) and the funnels drawn on site pages.

Markers tell three classes apart by shape and by text in the legend: outside the decision
limits and significant after the Benjamini-Hochberg correction (filled triangle), outside
but not significant (hollow square), in control (small dot). Only outside sites are
labelled, and labels are placed so they never overlap. Rare events are drawn as observed
against expected counts. Each funnel's data is written once, as
``funnel-<metric>-<window>.csv`` beside ``funnels.html``; site pages link to the same file.
"""

from __future__ import annotations

import numpy as np

from pipelines import evidence
from pipelines.report.charts import FUNNEL_CLASS_TEXT, funnel_data, funnel_template
from pipelines.report.common import (
    _esc,
    _header,
    _page,
    _pct,
    _table,
    csv_text,
    figure,
)
from pipelines.report.data import ReportData

FUNNEL_WINDOWS = {"cumulative": "cumulative, all mature units",
                  "rolling": "units that matured in the last {days} days"}


def funnel_csv_name(metric: str, window: str) -> str:
    """Return the file name of a funnel's data (beside ``funnels.html``)."""
    return f"funnel-{metric}-{window}.csv"


def funnel_layer_name(metric: str, window: str) -> str:
    """Return the file name of a funnel's shared curves and cloud (beside ``funnels.html``;
    every site page's funnel shows it, :func:`build_funnel_templates`)."""
    return f"funnel-{metric}-{window}.svg"


def exact_interval(events, n, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Return the Clopper-Pearson interval of events/n, elementwise (NaN where n = 0).

    The same numbers as :func:`pipelines.surveillance.engine.exact_interval` (bit for bit:
    tests/test_report.py), through ``scipy.special.betaincinv``, the kernel of
    ``stats.beta.ppf``: importing the engine for it brought pandas, statsmodels and
    scipy.stats into every report, about 1.9 s of a 1,000-site report's 7-9 s (issue 11).
    """
    from scipy.special import betaincinv

    events = np.asarray(events, dtype=float)
    n = np.asarray(n, dtype=float)
    tail = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(events > 0, betaincinv(events, n - events + 1, tail), 0.0)
        high = np.where(events < n, betaincinv(events + 1, n - events, 1.0 - tail), 1.0)
    empty = n <= 0
    return np.where(empty, np.nan, low), np.where(empty, np.nan, high)


def _charts(data: ReportData):
    """Yield ``(metric, window, chart, title, classes)`` for every funnel with data."""
    days = data.profile.design.funnel_rolling_days
    funnels = data.result.charts.get("funnel", {})
    for metric in data.metric_ids:
        for window, caption in FUNNEL_WINDOWS.items():
            chart = funnels.get(f"{metric}:{window}")
            if chart is None:
                continue
            title = f"{data.labels[metric]} ({caption.format(days=days)})"
            classes = {s: data.funnel_class.get((metric, window, s), "no data")
                       for s in chart["sites"]}
            yield metric, window, chart, title, classes


def build_funnel_templates(data: ReportData) -> None:
    """Draw each funnel once for the site pages (``data.funnel_templates``).

    The network's limit curves and cloud are the same on every site page, so they are
    drawn once into a file beside ``funnels.html`` (``data.funnel_layers``: ``{file name:
    SVG}``) that each page's funnel shows as an image under its own title, points and
    highlighted site: a thousand-site report then writes them 8 times, not 8,000 (about a
    third of the site pages' bytes; docs/report.md).
    """
    data.funnel_templates, data.funnel_layers = {}, {}
    for metric, window, chart, title, classes in _charts(data):
        if np.asarray(chart["n"], float).sum():
            name = funnel_layer_name(metric, window)
            template = funnel_template(chart, title, classes, True, layer=f"../{name}")
            data.funnel_templates[(metric, window)] = template
            data.funnel_layers[name] = template.layer


def funnels_page(data: ReportData) -> str:
    """Return the funnel plots per metric (cumulative and rolling), outside sites listed."""
    days = data.profile.design.funnel_rolling_days
    body = [_header(data), "<p class='note'>Each point is a site: its proportion of mature "
            "units with the event against its number of mature units (for rare events: its "
            "observed against its expected number of events). Filled triangles: outside the "
            "decision limits <i>and</i> significant after the Benjamini-Hochberg correction "
            "across all sites, metrics and directions. Hollow squares: outside the limits "
            "but not significant after that correction. Small dots: in control. Outside "
            "sites are labelled and listed under the plot. The cumulative plot shows the "
            f"whole history; the rolling plot the units whose outcome window closed in the "
            f"last {days} days, where a recent change shows first.</p>"]
    current = None
    for metric, window, chart, title, classes in _charts(data):
        if metric != current:
            body.append(f"<h2 id='{_esc(metric)}'>{_esc(data.labels[metric])}</h2>")
            current = metric
        n = np.asarray(chart["n"], float)
        events = np.asarray(chart["events"], float)
        if not n.sum():
            body.append(f"<p>{_esc(title)}: no mature units (the outcome window has not "
                        "closed for any procedure in it).</p>")
            continue
        limits = {s: (data.rows.get((s, metric), {}).get("funnel") or {}).get(window) or {}
                  for s in chart["sites"]}
        headers, rows = funnel_data(chart, classes, limits)
        name = funnel_csv_name(metric, window)
        data.files[name] = csv_text(headers, rows)
        template = funnel_template(chart, title, classes, False)
        body.append(figure(template.svg, name, f"{title}, every site"))
        low, high = exact_interval(events, n)
        listed = []
        for code, site in enumerate(chart["sites"]):
            kind = classes.get(site)
            if kind not in ("significant", "outside"):
                continue
            position = limits[site].get("position", "no data")
            listed.append((kind != "significant", site, [
                f"<a href='sites/{_esc(site)}.html#{_esc(metric)}'>{_esc(site)}</a>",
                _esc(FUNNEL_CLASS_TEXT[kind]), _esc(position),
                _esc(evidence.STATUS_LABELS[data.evidence.status[(site, metric)]["status"]]),
                str(int(events[code])), str(int(n[code])), _pct(events[code] / n[code]),
                f"{_pct(float(low[code]))}\u2013{_pct(float(high[code]))}",
            ]))
        if listed:
            body.append(_table(["site", "class", "position", "level now", "events", "units",
                                "rate", "exact 95% CI"],
                               [row for *_, row in sorted(listed)], numeric={4, 5, 6},
                               caption=f"{title}: sites outside the limits"))
    return _page("Funnel plots", "\n".join(body))
