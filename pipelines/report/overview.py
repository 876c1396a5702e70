"""The overview page (``index.html``)."""

from __future__ import annotations

from pipelines import evidence
from pipelines.report.common import (
    STATUS_MARK,
    _esc,
    _header,
    _page,
    _table,
    _utc,
)
from pipelines.report.data import ReportData


def _status_cell(status: str, href: str, reason: str) -> str:
    return (f"<td class='st-{status}' title='{_esc(reason)}'><a href='{_esc(href)}'>"
            f"{_esc(STATUS_MARK[status])}</a></td>")


def index_page(data: ReportData) -> str:
    """Return the overview: status grid, open alerts and data quality."""
    body = [_header(data)]
    counts = {s: sum(1 for site in data.sites if site["status"] == s) for s in STATUS_MARK}
    body.append("<p>" + " \u00b7 ".join(f"{counts[s]} {_esc(evidence.STATUS_LABELS[s])}"
                                          for s in evidence.STATUS_ORDER) + " (sites, by their "
                "most severe metric; a site is immature only when no outcome metric is mature yet). A "
                "site is at <i>alarm</i> when its metric's alarm chart (threshold from the "
                "network false-alarm budget) crossed within the last "
                f"{data.profile.design.hold_days} days, at <i>watch</i> when its watch threshold "
                "did or several corroborating methods agree; "
                "see <a href='methods.html'>Methods</a>.</p>")
    body.append("<h2>Status by site and metric</h2>")
    headers = ["site", *[data.labels[m] for m in data.metric_ids], "open alerts",
               "last procedure", "newest extract", "rows quarantined", "complications pending"]
    rows = []
    ordered = sorted(data.sites, key=lambda s: (evidence.STATUS_ORDER.index(s["status"]),
                                                s["site_id"]))
    for site in ordered:
        href = f"sites/{site['site_id']}.html"
        cells = [f"<a href='{_esc(href)}'>{_esc(site['site_id'])}</a>"]
        for metric in data.metric_ids:
            entry = site["metrics"].get(metric)
            if entry is None:
                cells.append("<td>-</td>")
                continue
            cells.append(_status_cell(entry["status"], f"{href}#{metric}", entry["reason"]))
        cells += [str(site["open_alerts"]), _esc(site["last_procedure_date"]),
                  _esc(site["newest_extract"]), str(site["rows_quarantined"]),
                  str(site["complications_pending"])]
        rows.append(cells)
    # status cells come pre-wrapped in <td>; build this table by hand
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    trs = []
    for cells in rows:
        tds = [c if c.startswith("<td") else f"<td>{c}</td>" for c in cells]
        trs.append("<tr>" + "".join(tds) + "</tr>")
    body.append(f"<table class='grid'><thead><tr>{head}</tr></thead><tbody>{''.join(trs)}"
                "</tbody></table>")
    open_alerts = [(site, a) for site in sorted(data.facts.alerts)
                   for a in data.facts.alerts[site] if a["state"] != "resolved"]
    body.append(f"<h2>Open alerts ({len(open_alerts)})</h2>")
    body.append("<p class='note'>As recorded when this report was written; "
                "<code>kyphowatch alerts list</code> shows the live state.</p>")
    if open_alerts:
        body.append(_table(
            ["site", "kind", "metric", "title", "state", "raised (UTC)", "alert id"],
            [[f"<a href='sites/{_esc(s)}.html#alerts'>{_esc(s)}</a>", _esc(a["kind"]),
              _esc(a["metric"]), _esc(a["title"]), _esc(a["state"]), _esc(_utc(a["created_at"])),
              f"<code>{_esc(a['alert_id'][:12])}</code>"] for s, a in open_alerts],
        ))
    else:
        body.append("<p>No open site alerts.</p>")
    q = data.quality
    body.append("<h2>Data quality</h2>")
    body.append(_table(["kind", "status", "files", "rows read", "rows quarantined"],
                       [[_esc(f["kind"]), _esc(f["status"]), str(f["files"]),
                         str(f["rows_read"]), str(f["rows_quarantined"])] for f in q["files"]],
                       numeric={2, 3, 4}))
    if q["quarantine"]:
        body.append(_table(["kind", "quarantine reason", "rows"],
                           [[_esc(x["kind"]), _esc(x["reason"]), str(x["rows"])]
                            for x in q["quarantine"]], numeric={2}))
    if q["rejected"]:
        body.append("<h3>Rejected files (newest 20)</h3>")
        body.append(_table(["file", "reason", "processed"],
                           [[_esc(x["file"]), _esc(x["reason"]), _esc(x["at"])]
                            for x in q["rejected"]]))
    return _page("kyphowatch surveillance report", "\n".join(body))


