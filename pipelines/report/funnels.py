"""The funnel plots page (``funnels.html``)."""

from __future__ import annotations

import numpy as np

from pipelines import evidence
from pipelines.report.charts import funnel_svg
from pipelines.report.common import (
    _esc,
    _header,
    _num,
    _page,
    _table,
)
from pipelines.report.data import ReportData

FUNNEL_WINDOWS = {"cumulative": "cumulative, all mature units",
                  "rolling": "units that matured in the last {days} days"}


def funnels_page(data: ReportData) -> str:
    """Return the funnel plots per metric (cumulative and rolling), flagged sites labelled."""
    from pipelines.surveillance.engine import exact_interval

    days = data.profile.design.funnel_rolling_days
    body = [_header(data), "<p class='note'>Each point is a site: its proportion of mature "
            "units with the event against its number of mature units. Sites with a current "
            "signal for the metric are filled triangles; sites outside the decision limits "
            "of that plot whose exact p-value did not survive the Benjamini-Hochberg "
            "correction are hollow squares; both are labelled and listed under the plot. "
            "The cumulative plot shows the whole history; the rolling plot the units whose "
            f"outcome window closed in the last {days} days, where a recent change shows "
            "first.</p>"]
    status = data.evidence.status
    funnels = data.result.charts.get("funnel", {})
    positions = {(m["site_id"], m["metric"]): m.get("funnel") or {}
                 for m in data.result.site_metrics}
    for metric in data.metric_ids:
        if f"{metric}:cumulative" not in funnels:
            continue
        label = data.labels[metric]
        body.append(f"<h2 id='{_esc(metric)}'>{_esc(label)}</h2>")
        for window, caption in FUNNEL_WINDOWS.items():
            chart = funnels.get(f"{metric}:{window}")
            if chart is None:
                continue
            n = np.asarray(chart["n"], float)
            events = np.asarray(chart["events"], float)
            title = f"{label} ({caption.format(days=days)})"
            if not n.sum():
                body.append(f"<p>{_esc(title)}: no mature units (the outcome window has not "
                            "closed for any procedure in it).</p>")
                continue
            signalled = {s for s in chart["sites"] if status.get((s, metric), {}).get(
                "status") in evidence.FLAGGED}
            outside = {s for s in chart["sites"]
                       if (positions.get((s, metric), {}).get(window) or {}).get("position")
                       in ("above", "below")}
            flagged = signalled | outside
            body.append(funnel_svg(chart, title, signalled, outside))
            low, high = exact_interval(events, n)
            rows = []
            for code, site in enumerate(chart["sites"]):
                if site not in flagged:
                    continue
                position = (positions.get((site, metric), {}).get(window) or {}).get(
                    "position", "no data")
                rate = events[code] / n[code] if n[code] else None
                rows.append([
                    f"<a href='sites/{_esc(site)}.html#{_esc(metric)}'>{_esc(site)}</a>",
                    _esc(evidence.STATUS_LABELS[status[(site, metric)]["status"]]),
                    _esc(position), _num(int(events[code])), _num(int(n[code])), _num(rate),
                    f"{_num(float(low[code]))}\u2013{_num(float(high[code]))}"
                    if n[code] else "-",
                ])
            if rows:
                body.append(_table(["site", "status", "position in this plot", "events",
                                    "units", "rate", "exact 95% CI"], rows,
                                   numeric={3, 4, 5}))
    return _page("Funnel plots", "\n".join(body))


