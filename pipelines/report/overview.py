"""The overview page (``index.html``): which sites, why, since when and how strong.

One row per site, most severe level first and, within a level, the strongest evidence first.
Every flagged cell states in text its level, since when, how strong ("p = 1e-12, 4 of 6
methods") and the rate in % against the guidance range, with a 12-month sparkline and
Making Data Count-style variation and assurance marks (explained in a legend). Sites with
every metric in control are folded into a plain ``<details>`` section: no script, so the
page still opens from disk, prints, and passes the report's Content-Security-Policy.
"""

from __future__ import annotations

from typing import Any

from pipelines import evidence
from pipelines.evidence import readable_stamp
from pipelines.report.charts import sparkline
from pipelines.report.common import (
    STATUS_MARK,
    _esc,
    _header,
    _page,
    _pct,
    _table,
    _utc,
    strength_text,
)
from pipelines.report.data import ReportData

MARK_LEGEND = [
    ("H", "special-cause variation, higher than expected (alarm or watch)"),
    ("L", "special-cause variation, lower than the guidance range (under-reporting?)"),
    ("~", "common-cause variation only (in control)"),
    ("P", "assurance: the 95% CI of the rate lies within the guidance range or below it"),
    ("F", "assurance: the 95% CI lies wholly above the guidance range"),
    ("?", "assurance: hit and miss, the 95% CI straddles the top of the guidance range"),
]


def _site_order(data: ReportData, site: dict[str, Any]) -> tuple:
    """Sort key: level first, then the strongest evidence of that level, then site id."""
    level = site["status"]
    p_values, agree = [], []
    for metric, entry in site["metrics"].items():
        if entry["status"] != level:
            continue
        detail = data.levels.get((site["site_id"], metric)) or {}
        strongest = detail.get("strongest") or {}
        if strongest.get("p_value") is not None:
            p_values.append(strongest["p_value"])
        agree.append(detail.get("agree") or 0)
    return (evidence.STATUS_ORDER.index(level), min(p_values, default=1.0),
            -max(agree, default=0), site["site_id"])


def _marks_html(marks: list[tuple[str, str]]) -> str:
    return "".join(f"<span class='mark' title='{_esc(meaning)}'>{_esc(letter)}"
                   f"<span class='sr'> ({_esc(meaning)})</span></span>"
                   for letter, meaning in marks)


def rate_line(data: ReportData, site: str, metric: str) -> str:
    """Return "23.1% of 180 (last 12 months), guidance range 7.0%-11.0%" as text."""
    m = data.metrics[metric]
    view = data.rate_view(site, metric)
    if m.kind == "sentinel":
        events = (data.rows.get((site, metric)) or {}).get("events") or 0
        return f"{events} event{'s' if events != 1 else ''}; any one is a signal"
    if view is None:
        return "no mature units yet"
    if m.kind == "process":
        return f"{view['events']} of {view['n']} ({view['span']})"
    b = m.baseline
    guide = (f"guidance {_pct(b.low)}\u2013{_pct(b.high)}" if b.low is not None
             else f"baseline {_pct(b.rate)}")
    return f"{_pct(view['rate'])} of {view['n']} ({view['span']}); {guide}"


def _cell(data: ReportData, site: str, metric: str, entry: dict[str, Any]) -> str:
    status = entry["status"]
    label = data.labels[metric]
    level = data.levels.get((site, metric)) or {}
    lines = []
    if status in evidence.FLAGGED and level.get("since"):
        lines.append(f"since {level['since']}")
        strength = strength_text(level)
        if strength:
            lines.append(strength)
    lines.append(rate_line(data, site, metric))
    spark = ""
    months = data.months.get((site, metric))
    m = data.metrics[metric]
    if months and m.kind != "sentinel":  # sentinel events have no monthly rate
        spark = sparkline(months, m.baseline.low, m.baseline.high, f"{site} {label}")
    text = "".join(f"<span class='cell-line'>{_esc(line)}</span>" for line in lines)
    return (f"<td class='st-{status}'><a href='sites/{_esc(site)}.html#{_esc(metric)}'>"
            f"<span class='cell-level'>{_esc(STATUS_MARK[status])}</span>"
            f"<span class='sr'> {_esc(site)}, {_esc(label)}</span></a>{text}{spark}"
            f"{_marks_html(data.marks(site, metric))}</td>")


def _grid(data: ReportData, sites: list[dict[str, Any]], caption: str) -> str:
    head = "".join(f"<th scope='col'>{_esc(h)}</th>" for h in
                   ["site", *[data.labels[m] for m in data.metric_ids], "open alerts"])
    trs = []
    for site in sites:
        sid = site["site_id"]
        # which metrics carry the level, so a flag in a column off screen is not missed
        which = [data.labels[m].split(" (")[0] for m in data.metric_ids
                 if (site["metrics"].get(m) or {}).get("status") == site["status"]
                 and site["status"] in evidence.FLAGGED]
        cells = [f"<th scope='row'><a href='sites/{_esc(sid)}.html'>{_esc(sid)}</a>"
                 f"<span class='cell-line'>{_esc(evidence.STATUS_LABELS[site['status']])}"
                 "</span>" + (f"<span class='note cell-line'>{_esc('; '.join(which))}</span>"
                              if which else "") + "</th>"]
        for metric in data.metric_ids:
            entry = site["metrics"].get(metric)
            cells.append("<td>-</td>" if entry is None else _cell(data, sid, metric, entry))
        cells.append(f"<td class='num'>{site['open_alerts']}</td>")
        trs.append(f"<tr id='site-{_esc(sid)}'>{''.join(cells)}</tr>")
    return (f"<div class='scroll'><table class='grid'><caption class='sr'>{_esc(caption)}"
            f"</caption><thead><tr>{head}</tr></thead><tbody>{''.join(trs)}</tbody></table>"
            "</div>")


def _alert_signal(data: ReportData, alert: dict[str, Any]) -> tuple[str, str]:
    """Return (signal date, level) of an alert: its signal's date, or the level's start."""
    signal = data.signals_by_key.get(alert.get("signal_key") or "")
    level = data.evidence.status.get((alert.get("site_id"), alert["metric"]), {})
    day = signal["signal_date"] if signal else (
        (data.levels.get((alert.get("site_id"), alert["metric"])) or {}).get("since"))
    status = level.get("status")
    return (str(day) if day else "-",
            evidence.STATUS_LABELS.get(status, "-") if status else "-")


def index_page(data: ReportData, devices: str = "") -> str:
    """Return the overview: the graded grid, open alerts, devices (``devices``: the section
    from :func:`pipelines.report.beyond.overview_section`) and data quality."""
    body = [_header(data)]
    counts = {s: sum(1 for site in data.sites if site["status"] == s) for s in STATUS_MARK}
    body.append("<p>" + " \u00b7 ".join(f"<b>{counts[s]}</b> {_esc(evidence.STATUS_LABELS[s])}"
                                          for s in evidence.STATUS_ORDER) + " (sites, by their "
                "most severe metric). A site is at <i>alarm</i> when its metric's alarm chart "
                "(threshold from the network false-alarm budget) crossed within the last "
                f"{data.profile.design.hold_days} days, at <i>watch</i> when its watch threshold "
                "did or several corroborating methods agree; "
                "see <a href='methods.html'>Methods</a>.</p>")
    ordered = sorted(data.sites, key=lambda s: _site_order(data, s))
    calm = [s for s in ordered if s["status"] == evidence.STATUS_IN_CONTROL]
    attention = [s for s in ordered if s["status"] != evidence.STATUS_IN_CONTROL]
    body.append("<h2 id='grid'>Sites needing attention</h2>")
    body.append("<p class='note'>Each cell: level; since when and how strong (smallest "
                "p-value among the methods that agree, and how many of the metric's methods "
                "agree); the rate in % with its span and the guidance range; the monthly "
                "rate over the last 12 months (shaded band: guidance range); marks as in the "
                "legend below. The site's page explains every figure.</p>")
    if attention:
        body.append(_grid(data, attention, "Sites with a flagged or immature metric, most "
                          "severe first"))
    else:
        body.append("<p>No site has a flagged or immature metric.</p>")
    if calm:
        body.append(f"<details id='in-control'><summary>{len(calm)} sites with every metric "
                    "in control (show)</summary>")
        body.append(_grid(data, calm, "Sites with every metric in control"))
        body.append("</details>")
    body.append("<h3>Legend</h3>")
    body.append("<ul class='note'>" + "".join(
        f"<li>{_esc(STATUS_MARK[s])}: {_esc(evidence.STATUS_LABELS[s])}</li>"
        for s in evidence.STATUS_ORDER) + "".join(
        f"<li><span class='mark'>{_esc(letter)}</span> {_esc(text)}</li>"
        for letter, text in MARK_LEGEND) + "</ul>")
    open_alerts = [(site, a) for site in sorted(data.facts.alerts)
                   for a in data.facts.alerts[site] if a["state"] != "resolved"]
    body.append(f"<h2 id='alerts'>Open alerts ({len(open_alerts)})</h2>")
    body.append("<p class='note'>As recorded when this report was written; "
                "<code>kyphowatch alerts list</code> shows the live state.</p>")
    if open_alerts:
        rows = []
        for s, a in sorted(open_alerts, key=lambda item: (
                _alert_signal(data, {**item[1], "site_id": item[0]})[0], item[0]),
                reverse=True):
            day, level = _alert_signal(data, {**a, "site_id": s})
            rows.append([f"<a href='sites/{_esc(s)}.html#alerts'>{_esc(s)}</a>",
                         _esc(level), _esc(data.labels.get(a["metric"], a["metric"] or "-")),
                         _esc(day), _esc(a["title"]), _esc(a["state"]),
                         _esc(_utc(a["created_at"])), f"<code>{_esc(a['alert_id'][:12])}</code>"])
        body.append(_table(["site", "level now", "metric", "signal date", "title", "state",
                            "raised (UTC)", "alert id"], rows, caption="Open alerts"))
    else:
        body.append("<p>No open site alerts.</p>")
    body.append(devices)
    q = data.quality
    body.append("<h2 id='quality'>Data quality</h2>")
    newest = max((s["newest_extract"] for s in data.sites if s["newest_extract"]), default=None)
    body.append(f"<p>Newest extract: <b>{_esc(readable_stamp(newest))}</b>.</p>")
    body.append(_table(["kind", "status", "files", "rows read", "rows quarantined"],
                       [[_esc(f["kind"]), _esc(f["status"]), str(f["files"]),
                         str(f["rows_read"]), str(f["rows_quarantined"])] for f in q["files"]],
                       numeric={2, 3, 4}, caption="Files loaded"))
    if q["quarantine"]:
        body.append(_table(["kind", "quarantine reason", "rows"],
                           [[_esc(x["kind"]), _esc(x["reason"]), str(x["rows"])]
                            for x in q["quarantine"]], numeric={2}))
    if q["rejected"]:
        body.append("<h3>Rejected files (newest 20)</h3>")
        body.append(_table(["file", "reason", "processed"],
                           [[_esc(x["file"]), _esc(x["reason"]), _esc(readable_stamp(x["at"]))]
                            for x in q["rejected"]]))
    body.append("<h3>Per site</h3>")
    body.append(_table(
        ["site", "procedures", "last procedure", "newest extract", "rows quarantined",
         "complications pending"],
        [[f"<a href='sites/{_esc(s['site_id'])}.html'>{_esc(s['site_id'])}</a>",
          str(s["procedures"]), _esc(s["last_procedure_date"] or "-"),
          _esc(readable_stamp(s["newest_extract"])), str(s["rows_quarantined"]),
          str(s["complications_pending"])] for s in sorted(data.sites,
                                                           key=lambda s: s["site_id"])],
        numeric={1, 4, 5}, caption="Data quality per site"))
    return _page("kyphowatch surveillance report", "\n".join(body))

