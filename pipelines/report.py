"""``kyphowatch report``: the static HTML evidence report for analysts and safety teams.

Layout of a report directory::

    index.html           overview: status grid (sites x metrics), open alerts, data quality
    funnels.html         a funnel plot per metric, flagged sites labelled
    methods.html         baselines with their HTG108 sections, thresholds and their designed
                         false-alarm rates, risk models and their fit, profile and as-of date
    sites/<SITE>.html    per site: CUSUM and risk-adjusted CUSUM over time, quarterly
                         p-chart, observed versus expected, case mix against the network,
                         recent complications, signals, alerts and their history
    report.json          the overview as data (the same rows as ``kyphowatch sites --json``)

Why it is built this way: the report is opened from disk, from an e-mail or through the
Airflow plugin, so every page is static HTML with inline SVG charts (see
:mod:`pipelines.svgplot`), no script and nothing fetched from the network. Every number on a
site page comes from :meth:`pipelines.evidence.Evidence.site_payload`, the same call behind
``kyphowatch site --json``; the per-site figures carry ``data-field`` attributes so that
agreement is tested. No patient or operator reference is ever read: the engine turns
patient digests into counters, case mix is aggregated in SQL, and the data-quality section
shows counts and reasons, never quarantined raw values.

:func:`publish_report` renders into ``<report_dir>/builds/<as_of>-<stamp>/`` and then swaps
two symlinks, ``<report_dir>/<as_of>`` and (when this is the newest date)
``<report_dir>/latest``, so a reader (or the Airflow plugin) never sees a half-written
report, a republished date replaces its pages all at once, and a backfill for an old date
never replaces a newer ``latest``. Old dated reports are pruned (``KYPHOWATCH_REPORT_KEEP``).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import re
import shutil
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from pipelines import evidence
from pipelines.contract import SITE_PATTERN
from pipelines.errors import ExternalSystemError
from pipelines.settings import Settings, load_settings
from pipelines.svgplot import EPOCH, Chart, decimate, forest

log = logging.getLogger(__name__)
SITE_RE = re.compile(SITE_PATTERN)

METHOD_NAMES = {
    "bernoulli_cusum": "Bernoulli CUSUM",
    "ra_cusum": "risk-adjusted CUSUM (Steiner)",
    "tte_cusum": "time-to-event CUSUM",
    "rare": "exact rare-event test",
    "bernoulli_cusum_watch": "Bernoulli CUSUM (watch threshold)",
    "ra_cusum_watch": "risk-adjusted CUSUM (watch threshold)",
    "tte_cusum_watch": "time-to-event CUSUM (watch threshold)",
    "funnel_cumulative": "funnel (cumulative)",
    "funnel_12m": "funnel (rolling 12 months)",
    "pchart": "quarterly p-chart",
    "rare_exact": "exact rare-event test",
    "sentinel": "sentinel event",
    "process": "process measure",
}
STATUS_MARK = {  # text marks, so the grid reads the same printed in black and white
    evidence.STATUS_ALARM: "\u25b2 alarm",
    evidence.STATUS_WATCH: "\u25b3 watch",
    evidence.STATUS_UNDER_REPORTING: "\u25bc under-reporting?",
    evidence.STATUS_IMMATURE: "\u2026 immature",
    evidence.STATUS_IN_CONTROL: "\u2713 in control",
}

CSS = """body{font-family:sans-serif;margin:1.5em auto;max-width:1150px;color:#111;padding:0 1em}
nav{border-bottom:2px solid #333;padding:.4em 0;margin-bottom:1em}nav a{margin-right:1.2em}
table{border-collapse:collapse;font-size:12px;margin:.5em 0 1.5em}
td,th{border:1px solid #999;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#eee}td.num{text-align:right;font-variant-numeric:tabular-nums}
h2{border-bottom:1px solid #444;margin-top:1.8em}svg.chart{max-width:100%;height:auto;
display:block;margin:.4em 0 1em}.note{color:#444;font-size:12px}
.st-alarm{background:#fdd;font-weight:bold}.st-watch{background:#fff3c4}.st-under_reporting{background:#ffe9c6;
font-weight:bold}.st-immature{background:#f2f2f2;color:#555}.st-in_control{background:#fff}
@media print{nav{display:none}a{color:#000;text-decoration:none}
.st-alarm,.st-watch,.st-under_reporting,.st-immature{background:none}h2{break-before:auto}
svg.chart{break-inside:avoid}}"""


# -- small HTML helpers -------------------------------------------------------------------

def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """Return a table; cells are trusted HTML (callers escape text with :func:`_esc`)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f"<td class='num'>{c}</td>" if i in numeric else f"<td>{c}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _field(value: Any, name: str, metric: str | None = None, digits: int = 4) -> str:
    """Return a number cell tagged with its JSON field (tests compare it with the CLI)."""
    attrs = f" data-field='{_esc(name)}'"
    if metric:
        attrs += f" data-metric='{_esc(metric)}'"
    raw = "" if value is None else repr(value)
    return f"<span{attrs} data-value='{_esc(raw)}'>{_esc(_num(value, digits))}</span>"


def _page(title: str, body: str, depth: int = 0, subtitle: str = "") -> str:
    up = "../" * depth
    nav = (f"<nav><a href='{up}index.html'>Overview</a><a href='{up}funnels.html'>Funnel plots"
           f"</a><a href='{up}methods.html'>Methods</a></nav>")
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>{nav}"
            f"<h1>{_esc(title)}</h1>{subtitle}{body}</body></html>\n")


def _utc(stamp: str | None) -> str:
    """Return an ISO timestamp to the second (stored in UTC; SQLite drops the offset)."""
    return "-" if not stamp else stamp[:19].replace("T", " ")


def _day(value: Any) -> int:
    when = value if isinstance(value, date) else date.fromisoformat(str(value)[:10])
    return (when - EPOCH).days


# -- data ------------------------------------------------------------------------------

def data_quality(settings: Settings) -> dict[str, Any]:
    """Return file-ledger counts by kind and status, and quarantined rows by reason."""
    from pipelines.db import reading
    from pipelines.schema import file_ledger, quarantine

    with reading(settings.db_url) as conn:
        files = conn.execute(
            sa.select(file_ledger.c.kind, file_ledger.c.status, sa.func.count(),
                      sa.func.sum(file_ledger.c.rows_read),
                      sa.func.sum(file_ledger.c.rows_quarantined))
            .group_by(file_ledger.c.kind, file_ledger.c.status)
            .order_by(file_ledger.c.kind, file_ledger.c.status)
        ).all()
        reasons_rows = conn.execute(
            sa.select(quarantine.c.kind, quarantine.c.reasons, sa.func.count())
            .group_by(quarantine.c.kind, quarantine.c.reasons)
        ).all()
        rejected = conn.execute(
            sa.select(file_ledger.c.file_name, file_ledger.c.reason,
                      file_ledger.c.processed_at)
            .where(file_ledger.c.status == "rejected")
            .order_by(file_ledger.c.processed_at.desc()).limit(20)
        ).all()
    by_reason: dict[tuple[str, str], int] = {}
    for kind, reasons, count in reasons_rows:
        try:
            codes = json.loads(reasons) if reasons else []
        except ValueError:
            codes = [str(reasons)]
        for code in codes or ["unknown"]:
            by_reason[(kind, str(code))] = by_reason.get((kind, str(code)), 0) + int(count)
    return {
        "files": [{"kind": k or "-", "status": s, "files": int(c), "rows_read": int(r or 0),
                   "rows_quarantined": int(q or 0)} for k, s, c, r, q in files],
        "quarantine": [{"kind": k, "reason": r, "rows": c}
                       for (k, r), c in sorted(by_reason.items())],
        "rejected": [{"file": f, "reason": r, "at": evidence.iso(at)}
                     for f, r, at in rejected],
    }


class ReportData:
    """Everything one report renders, gathered once."""

    def __init__(self, settings: Settings, as_of: date | None) -> None:
        from pipelines.surveillance.profile import load_profile
        from pipelines.surveillance.runs import read_or_compute

        self.profile = load_profile(settings.profile_path)
        self.result = read_or_compute(settings, self.profile, as_of)
        self.as_of = self.result.as_of
        self.facts = evidence.read_site_facts(settings, self.as_of)
        self.quality = data_quality(settings)
        self.evidence = evidence.Evidence(
            self.result, self.profile, self.facts,
            evidence.recent_complications_by_site(settings, self.as_of),
        )
        self.sites = self.evidence.sites
        self.labels = {m.id: m.label for m in self.profile.metrics}
        self.metric_ids = [m.id for m in self.profile.metrics]

    def site(self, site_id: str) -> dict[str, Any]:
        return self.evidence.site_payload(site_id)


# -- charts ----------------------------------------------------------------------------

def funnel_svg(chart: dict[str, Any], label: str, signalled: set[str],
               outside: set[str]) -> str:
    """Return the funnel plot: each site's proportion against the limits that decided.

    Exact binomial 95% and 99.8% limits are always drawn. When the engine found the sites
    overdispersed at ``as_of`` it decided with the phi-adjusted 99.8% limits instead, and
    those are drawn too and named as the decision limits, so no site sits inside the drawn
    decision limits while the engine calls it outside (or the reverse). ``signalled`` sites
    (a current signal for the metric) are filled triangles; ``outside`` sites (beyond the
    decision limit but not significant after Benjamini-Hochberg) are hollow squares.
    """
    from pipelines.surveillance import funnel

    n = np.asarray(chart["n"], float)
    events = np.asarray(chart["events"], float)
    has = n > 0
    limit = chart["limit"]
    key = f"{100 * limit:g}"
    mode = chart.get("overdispersion_mode", "none")
    plot = Chart(title=f"Funnel plot: {label}",
                 x_label="mature units per site (log scale)",
                 y_label="proportion with event", x_scale="log", y_min=0.0, height=340,
                 description=f"Funnel plot for {label}: {int(has.sum())} sites.")
    # Start the curves near the smallest site: exact limits are jagged at tiny n and would
    # squash the points the reader came for into the bottom of the plot.
    n_min = max(1.0, 0.5 * float(n[has].min())) if has.any() else 1.0
    n_max = max(n.max(initial=1) * 1.2, 20)
    curves = funnel.funnel_curves(chart["p0"], n_max, n_min=n_min, coverages=(0.95, limit))
    exact_label = f"{key}% limits (exact)" + ("" if mode != "none" else ", decision")
    plot.line(curves["n"], curves["upper_95"], label="95% limits (exact)", style="dot", width=1)
    plot.line(curves["n"], curves["lower_95"], style="dot", width=1)
    plot.line(curves["n"], curves[f"upper_{key}"], label=exact_label, style="dash", width=1)
    plot.line(curves["n"], curves[f"lower_{key}"], style="dash", width=1)
    if mode != "none":
        phi = float(chart.get("phi") or 1.0)
        adjusted = funnel.funnel_curves(chart["p0"], n_max, n_min=n_min, coverages=(limit,),
                                        phi=phi, overdispersion=mode)
        plot.line(adjusted["n"], adjusted[f"upper_{key}"], style="dashdot", width=1.2,
                  label=f"{key}% limits, overdispersion \u03c6={phi:.2f}, decision")
        plot.line(adjusted["n"], adjusted[f"lower_{key}"], style="dashdot", width=1.2)
    plot.hline(chart["p0"], label=f"baseline {chart['p0']:.4g}", style="solid")
    sites = chart["sites"]
    rate = np.divide(events, n, out=np.zeros_like(events), where=has)
    tips = [f"{s}: {int(e)}/{int(k)}" for s, e, k in zip(sites, events, n, strict=True)]
    in_signal = np.array([s in signalled for s in sites]) & has
    in_outside = np.array([s in outside for s in sites]) & has & ~in_signal
    plain = has & ~in_signal & ~in_outside

    def pick(mask, values):
        return [v for v, keep in zip(values, mask, strict=True) if keep]

    plot.points(n[plain], rate[plain], label="site", marker="circle", filled=False,
                tips=pick(plain, tips))
    if in_outside.any():
        plot.points(n[in_outside], rate[in_outside], marker="square", filled=False,
                    label="outside, not significant after FDR",
                    texts=pick(in_outside, sites), tips=pick(in_outside, tips))
    if in_signal.any():
        plot.points(n[in_signal], rate[in_signal], label="current signal", marker="triangle",
                    texts=pick(in_signal, sites), tips=pick(in_signal, tips))
    return plot.render()


def tte_svg(chart: dict[str, Any], site_id: str, title: str) -> str | None:
    """Return one site's time-to-event CUSUM (partial follow-up) with its threshold."""
    series = (chart.get("series") or {}).get(site_id)
    if not series or not len(series["day"]):
        return None
    days = np.asarray(series["day"], dtype=float)
    stat = np.asarray(series["statistic"], dtype=float)
    h = series.get("h")
    plot = Chart(title=title, x_label="calendar date (events counted on their day)",
                 y_label="CUSUM statistic (log-likelihood ratio)", x_scale="date", y_min=0.0,
                 description=f"{title}: the statistic rises with each event and falls with "
                             "the time patients spend at risk without one"
                             + (f"; threshold h = {h:.3f}." if h is not None else "."))
    x, y = decimate(days, stat)
    plot.line(x, y, label="time-to-event CUSUM", width=1.1)
    if h is not None:
        plot.hline(h, label=f"threshold h = {h:.3f}", style="dash")
    return plot.render()


def cusum_svg(chart: dict[str, Any], site_id: str, title: str) -> str | None:
    """Return one site's CUSUM path over time with its threshold and signal points."""
    if site_id not in chart["sites"]:
        return None
    code = chart["sites"].index(site_id)
    group = np.asarray(chart["group"])
    start, stop = np.searchsorted(group, [code, code + 1])
    if start == stop:
        return None
    days = np.asarray(chart["day"])[start:stop].astype(float)
    stat = np.asarray(chart["statistic"])[start:stop].astype(float)
    fired = np.asarray(chart["signal"])[start:stop].astype(bool)
    h_sites = np.asarray(chart.get("h_sites", []), dtype=float)
    h = float(h_sites[code]) if code < len(h_sites) and np.isfinite(h_sites[code]) else (
        chart.get("h"))
    x_label = ("date the outcome was known" if chart.get("order") == "outcome known"
               else "index date (procedure, or first procedure per patient)")
    plot = Chart(title=title, x_label=x_label,
                 y_label="CUSUM statistic (log-likelihood ratio)", x_scale="date", y_min=0.0,
                 description=f"{title}: {len(stat)} points shown, {int(fired.sum())} "
                             f"crossings of the site's threshold h = {h:.3f}."
                 if h is not None else f"{title}: {len(stat)} points shown.")
    x, y = decimate(days, stat)
    plot.line(x, y, label="CUSUM", width=1.1)
    if h is not None:
        plot.hline(h, label=f"threshold h = {h:.3f}", style="dash")
    if fired.any():
        plot.points(days[fired], stat[fired], label="signal (chart resets)", marker="triangle",
                    tips=[f"signal {(EPOCH + timedelta(days=int(d))).isoformat()}"
                          for d in days[fired]])
    return plot.render()


def pchart_svg(chart: dict[str, Any], site_id: str, title: str) -> str | None:
    """Return the site's quarterly proportions with the exact upper limit and baseline."""
    if site_id not in chart["sites"]:
        return None
    code = chart["sites"].index(site_id)
    n = np.asarray(chart["n"][code], float)
    if not n.any():
        return None
    events = np.asarray(chart["events"][code], float)
    starts = []
    for label in chart["labels"]:
        year, quarter = label.split("-Q")
        starts.append((date(int(year), 3 * (int(quarter) - 1) + 1, 1) - EPOCH).days)
    x = np.asarray(starts, float) + 45  # plot each quarter at its middle
    has = n > 0
    p = np.divide(events, n, out=np.full_like(events, np.nan), where=has)
    plot = Chart(title=title, x_label="quarter (plotted at mid-quarter)",
                 y_label="proportion with event", x_scale="date", y_min=0.0,
                 description=f"{title}: {int(has.sum())} closed quarters with units.")
    limit = np.asarray(chart["limit"][code], float) if "limit" in chart else None
    if limit is not None:
        plot.line(x[has], limit[has], style="dash", width=1,
                  label=f"upper limit (exact, {100 * chart['alpha']:g}% per quarter)")
    plot.hline(chart["p0"], label=f"baseline {chart['p0']:.4g}", style="solid")
    plot.line(x[has], p[has], width=1, style="dot")
    with np.errstate(invalid="ignore"):
        above = has & (p > limit) if limit is not None else np.zeros(len(n), bool)
    plot.points(x[has & ~above], p[has & ~above], label="quarter", marker="circle",
                filled=False, tips=[f"{lab}: {int(e)}/{int(k)}" for lab, e, k, keep in zip(
                    chart["labels"], events, n, has & ~above, strict=True) if keep])
    if above.any():
        plot.points(x[above], p[above], label="above limit", marker="square",
                    tips=[f"{lab}: {int(e)}/{int(k)}" for lab, e, k, keep in zip(
                        chart["labels"], events, n, above, strict=True) if keep])
    return plot.render()


# -- pages -----------------------------------------------------------------------------

def _header(data: ReportData) -> str:
    r, p = data.result, data.profile
    return (f"<p>Profile <b>{_esc(p.name)} {_esc(p.version)}</b> ({_esc(p.source_title)}), "
            f"data as of <b>{r.as_of.isoformat()}</b>: {r.summary.get('procedures', 0)} "
            f"procedures at {r.summary.get('sites', 0)} sites. Monitor run "
            f"<code>{r.run_key[:16]}</code>.</p>")


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


def _metric_table(m: dict[str, Any]) -> str:
    metric = m["metric"]
    rows = [
        ["status", _esc(evidence.STATUS_LABELS[m["status"]]) + f" <span class='note'>("
         f"{_esc(m['status_reason'])})</span>"],
        ["mature units", _field(m.get("n"), "n", metric)],
        ["events", _field(m.get("events"), "events", metric)],
        ["rate", _field(m.get("rate"), "rate", metric)],
        ["exact 95% CI", _field(m.get("ci_low"), "ci_low", metric) + " \u2013 "
         + _field(m.get("ci_high"), "ci_high", metric)],
        ["baseline", _field(m.get("baseline"), "baseline", metric)
         + f" <span class='note'>({_esc(m.get('citation'))})</span>"],
    ]
    oe = m.get("observed_expected")
    if oe:
        rows += [
            ["expected (case mix)", _field(oe["expected"], "expected", metric)],
            ["expected at baseline", _field(oe["expected_at_baseline"], "expected_at_baseline",
                                            metric)],
            ["observed / expected", _field(oe["o_to_e"], "o_to_e", metric) + " (95% CI "
             + _field(oe["o_to_e_ci_low"], "o_to_e_ci_low", metric) + " \u2013 "
             + _field(oe["o_to_e_ci_high"], "o_to_e_ci_high", metric) + ")"],
        ]
    for name, c in sorted((m.get("cusum") or {}).items()):
        rows.append([f"CUSUM {_esc(name)}", _field(c["value"], f"cusum.{name}.value", metric)
                     + " / h " + _field(c["h"], f"cusum.{name}.h", metric)
                     + f" ({c['signals']} signals in history)"])
    for window, f in sorted((m.get("funnel") or {}).items()):
        rows.append([f"funnel {window}", f"{_esc(f['position'])}, z "
                     + _field(f["z_adjusted"], f"funnel.{window}.z_adjusted", metric)
                     + f", {f['events']}/{f['n']}"])
    if m.get("rare"):
        r = m["rare"]
        rows.append([f"rolling {r['rolling_days']} days", f"{r['events']}/{r['n']}, exact p "
                     + _field(r["p_value"], "rare.p_value", metric)])
    return _table(["figure", "value"], rows)


def site_page(data: ReportData, site_id: str) -> str:
    """Return one site's page."""
    payload = data.site(site_id)
    charts = data.result.charts
    body = [_header(data)]
    body.append(f"<p>Worst status: <b>{_esc(evidence.STATUS_LABELS[payload['status']])}</b>. "
                "Metrics: " + ", ".join(f"<a href='#{_esc(m['metric'])}'>{_esc(m['label'])}</a>"
                                        for m in payload["metrics"]) + ".</p>")
    dq = payload["data_quality"]
    body.append(_table(["procedures", "last procedure", "newest extract", "rows quarantined",
                        "complications pending"],
                       [[_num(dq["procedures"]), _esc(dq["last_procedure_date"]),
                         _esc(dq["newest_extract"]), _num(dq["rows_quarantined"]),
                         _num(dq["complications_pending"])]]))
    ratios = [(m["label"], m["observed_expected"]) for m in payload["metrics"]
              if m["kind"] == "outcome"]
    if ratios:
        body.append(forest(
            [(label, oe and oe["o_to_e"], oe and oe["o_to_e_ci_low"],
              oe and oe["o_to_e_ci_high"]) for label, oe in ratios],
            title=f"{site_id}: observed / expected events (exact 95% CI)",
            x_label="observed / expected (1 = as expected for the case mix)",
        ))
    for m in payload["metrics"]:
        metric = m["metric"]
        body.append(f"<h2 id='{_esc(metric)}'>{_esc(m['label'])}</h2>")
        body.append(_metric_table(m))
        for _, chart in sorted(charts.get("cusum", {}).items()):
            if chart["metric"] != metric:
                continue
            name = METHOD_NAMES.get(chart["method"], chart["method"])
            way = "deterioration (up)" if chart["direction"] == "up" else (
                "fewer events than baseline (down)")
            svg = cusum_svg(chart, site_id, f"{site_id} {m['label']}: {name}, {way}")
            if svg:
                body.append(svg)
        if metric in charts.get("tte", {}):
            svg = tte_svg(charts["tte"][metric], site_id,
                          f"{site_id} {m['label']}: time-to-event CUSUM, deterioration (up)")
            if svg:
                body.append(svg)
        if metric in charts.get("pchart", {}):
            svg = pchart_svg(charts["pchart"][metric], site_id,
                             f"{site_id} {m['label']}: quarterly p-chart")
            if svg:
                body.append(svg)
        signals = [s for s in payload["signals"] if s["metric"] == metric]
        if signals:
            body.append(f"<h3>Signals ({len(signals)})</h3>")
            body.append(_table(
                ["method", "direction", "category", "episode start", "signalled", "observed",
                 "n", "expected", "95% CI", "statistic", "threshold", "p"],
                [[_esc(METHOD_NAMES.get(s["method"], s["method"])), _esc(s["direction"]),
                  _esc(s["category"]), _esc(s["episode_start"]), _esc(s["signal_date"]),
                  _num(s["observed"]), _num(s["n"]), _num(s["expected"]),
                  f"{_num(s['ci_low'])}\u2013{_num(s['ci_high'])}"
                  if s["ci_low"] is not None else "-",
                  _num(s["statistic"]), _num(s["threshold"]), _num(s["p_value"])]
                 for s in sorted(signals, key=lambda s: s["signal_date"], reverse=True)],
                numeric={5, 6, 7, 9, 10, 11},
            ))
    mix = payload["casemix"]
    body.append("<h2 id='casemix'>Case mix against the network</h2>")
    labels = {"procedures": "procedures", "mean_age": "mean age (years)",
              "share_age_80_plus": "aged 80 or over", "share_female": "female",
              "share_malignancy": "malignancy indication", "share_steroid_use": "steroid use",
              "share_general_anaesthesia": "general anaesthesia",
              "mean_levels": "levels treated (mean)", "share_3plus_levels": "3 or more levels"}
    rows = []
    for key, label in labels.items():
        site_value, network_value = mix["site"].get(key), mix["network"].get(key)
        fmt = _pct if key.startswith("share_") else _num
        rows.append([_esc(label), fmt(site_value), fmt(network_value)])
    body.append(_table(["characteristic", site_id, "network"], rows, numeric={1, 2}))
    body.append("<h2 id='complications'>Recent complications</h2>")
    if payload["recent_complications"]:
        body.append("<p class='note'>Newest first, at most "
                    f"{evidence.RECENT_COMPLICATIONS}; no patient, operator or record "
                    "reference is shown.</p>")
        body.append(_table(["event date", "type", "severity", "symptomatic", "level"],
                           [[_esc(c["event_date"]), _esc(c["event_type"]), _esc(c["severity"]),
                             "yes" if c["symptomatic"] else "no", _esc(c["vertebral_level"])]
                            for c in payload["recent_complications"]]))
    else:
        body.append("<p>No complications reported.</p>")
    body.append("<h2 id='alerts'>Alerts</h2>")
    if payload["alerts"]:
        for a in payload["alerts"]:
            body.append(f"<h3>{_esc(a['title'])} <span class='note'>({_esc(a['state'])}, "
                        f"episode {a['episode']}, id {_esc(a['alert_id'][:12])})</span></h3>")
            body.append(_table(["at (UTC)", "from", "to", "by", "reason"],
                               [[_esc(_utc(h["at"])), _esc(h["from_state"]), _esc(h["to_state"]),
                                 _esc(h["actor"]), _esc(h["reason"])] for h in a["history"]]))
    else:
        body.append("<p>No alerts for this site.</p>")
    return _page(f"Site {site_id}", "\n".join(body), depth=1)


def methods_page(data: ReportData) -> str:
    """Return the methods page: baselines, thresholds, models, profile and data as-of."""
    p, r = data.profile, data.result
    d = p.design
    body = [_header(data)]
    body.append(f"<p>Source: <a href='{_esc(p.source_url)}'>{_esc(p.source_title)}</a>. "
                f"Profile file version {_esc(p.version)}. Only units whose outcome window has "
                "closed are charted; sentinel events count at once.</p>")
    body.append("<h2>Baselines</h2>")
    rows = []
    for m in p.metrics:
        b = m.baseline
        counts = f"{b.events}/{b.total}" if b.events is not None else "-"
        span = f"{b.low:.4g}\u2013{b.high:.4g}" if b.low is not None else "-"
        rows.append([_esc(m.label), _esc(m.kind), _num(b.rate), counts, span,
                     _esc(m.denominator), _num(m.window_days),
                     _esc(f"{p.citation} section {b.section}"),
                     _esc(", ".join(METHOD_NAMES.get(x, x) for x in m.methods))])
    body.append(_table(["metric", "kind", "baseline rate", "events/total", "guidance range",
                        "denominator", "outcome window (days)", "guidance section", "methods"],
                       rows))
    body.append("<h2>Network false-alarm budget</h2>")
    budget = r.summary.get("alarm_budget")
    if budget:
        body.append(
            f"<p>The safety team accepts {budget['safety_per_100_site_years']:g} false alarm "
            "e-mails per 100 site-years from sites performing within the guidance range. Each "
            "metric's alarm chart receives a share of that budget, and its threshold h is "
            "derived <i>per site</i> from the site's own volume (ARL0 = units a year / false "
            "alarms per site-year), so a large site is not flagged more often by chance than "
            "a small one. For this network of "
            f"{_num(r.summary.get('sites'))} sites that is at most "
            f"<b>{budget['expected_false_alarms_per_year']:g} false alarm e-mails a year</b> "
            "if every site performed at the top of the guidance range (fewer nearer the "
            "baseline). Sentinel events are e-mailed one by one; they are not false alarms. "
            "Under-reporting spends "
            f"{budget['under_reporting_per_100_site_years']:g} per 100 site-years; the watch "
            f"level {budget['watch_per_site_year']:g} per chart and site-year.</p>")
        body.append(_table(
            ["metric", "alarm chart", "share", "false alarms per site-year",
             "sites", "expected false alarms a year"],
            [[_esc(p.metric(k).label), _esc(METHOD_NAMES.get(v["method"], v["method"])),
              f"{v['share']:g}", f"{v['per_site_year']:.4g}", _num(v["sites"]),
              f"{v['expected_false_alarms_per_year']:.3g}"]
             for k, v in budget["metrics"].items()]))
    body.append("<h2>Thresholds and their designed false-alarm rates</h2>")
    body.append(f"<p>Corroborating charts (those that do not carry a metric's alarm) are "
                f"designed for ARL0 = {d.arl0:g} units; their signals grade a site "
                "<i>watch</i> when several agree. The alarm charts' thresholds come from the "
                "budget above, per site: the table gives their range over the sites. No "
                "threshold is tuned.</p>")
    rows = []
    for _, chart in sorted(r.charts.get("cusum", {}).items()):
        metric = p.metric(chart["metric"])
        odds = metric.detect.odds_ratio if chart["direction"] == "up" else (
            1 / metric.detect.odds_ratio)
        h_sites = np.asarray(chart.get("h_sites", [chart["h"]]), dtype=float)
        h_sites = h_sites[np.isfinite(h_sites)]
        if chart.get("role") == "alarm" and budget:
            how = "Markov chain per site, ARL0 from the false-alarm budget"
            arl0 = "per site"
        else:
            how = ("simulation over the fitted case-mix risks" if chart["method"] == "ra_cusum"
                   else "Markov-chain ARL at the reference rate")
            arl0 = f"{metric.detect.arl0:g}"
        h_text = ("-" if not h_sites.size else f"{h_sites.min():.3f}" if np.ptp(h_sites) < 1e-9
                  else f"{h_sites.min():.3f}–{h_sites.max():.3f}")
        rows.append([_esc(metric.label), _esc(METHOD_NAMES[chart["method"]]),
                     _esc(chart["direction"]), _esc(chart.get("role", "alarm")),
                     f"{odds:.3g}", h_text, arl0, _esc(how)])
    body.append(_table(["metric", "chart", "direction", "role", "odds ratio to detect", "h",
                        "ARL0", "how h was found"], rows))
    body.append(_table(["method", "false-alarm design"], [
        ["funnel plot", f"exact binomial limits at {100 * d.funnel_limit:g}% two-sided "
         f"({100 * (1 - d.funnel_limit) / 2:g}% per side), multiplicative overdispersion; a "
         f"site is flagged only if its exact p-value also survives Benjamini-Hochberg at q = "
         f"{d.funnel_fdr_q:g} across all sites, metrics and directions of the evaluation"],
        ["quarterly p-chart", f"exact binomial limit at {100 * (1 - d.pchart_limit) / 2:g}% "
         "per side per quarter (closed, mature quarters only)"],
        ["rare-event test", f"one-sided exact binomial test at alpha = {d.rare_alpha:g} on "
         f"the rolling {d.rare_rolling_days} days"],
        ["time-to-event CUSUM", "daily Poisson CUSUM over patients in follow-up; h per "
         "site from the budget (Markov chain of the daily chart)"],
        ["sentinel event", "any single event is a signal (no false-alarm rate by design)"],
    ]))
    body.append("<h2>Risk models</h2>")
    if r.models:
        body.append(_table(
            ["metric", "kind", "units", "events", "terms", "c-statistic", "AIC",
             "calibration shift", "note"],
            [[_esc(m["metric"]), _esc(m["kind"]), _num(m["n"]), _num(m["events"]),
              _esc(", ".join(m["terms"])), _num(m["c_statistic"]), _num(m["aic"]),
              _num(m["calibration_shift"]), _esc(m["reason"])] for m in r.models.values()],
        ))
    body.append("<h2>Data</h2>")
    body.append(_table(["item", "value"], [
        ["as of", _esc(r.as_of.isoformat())], ["procedures", _num(r.summary.get("procedures"))],
        ["sites", _num(r.summary.get("sites"))], ["monitor run key", _esc(r.run_key)],
        ["data fingerprint", _esc(r.data_fingerprint)],
        ["evaluation points", _num(r.summary.get("evaluation_points"))],
    ]))
    return _page("Methods", "\n".join(body))


def render_report(settings: Settings, as_of: date | None = None) -> dict[str, str]:
    """Return the report as ``{relative path: text}`` for ``as_of`` (default: newest data)."""
    data = ReportData(settings, as_of)
    if data.as_of is None:
        empty = _page("kyphowatch surveillance report",
                      "<p>The warehouse holds no procedures yet: nothing to report.</p>")
        return {"index.html": empty, "report.json": json.dumps({"as_of": None, "sites": []})}
    pages = {
        "index.html": index_page(data),
        "funnels.html": funnels_page(data),
        "methods.html": methods_page(data),
        "report.json": json.dumps({
            "as_of": data.as_of.isoformat(), "run_key": data.result.run_key,
            "profile": {"name": data.profile.name, "version": data.profile.version},
            "sites": data.sites,
        }, indent=2, sort_keys=True),
    }
    for site in data.sites:
        # Site ids become file names and links; the contract guarantees their form, and a
        # report must never write outside its folder if a warehouse was filled some other way.
        if not SITE_RE.match(site["site_id"]):
            raise ExternalSystemError(f"warehouse holds a malformed site id "
                                      f"{site['site_id']!r}; not writing its page")
        pages[f"sites/{site['site_id']}.html"] = site_page(data, site["site_id"])
    return pages


def write_report(settings: Settings, out_dir: Path | None = None,
                 as_of: date | None = None) -> Path:
    """Write the report into ``out_dir`` (default: the report dir) and return its index.

    Pages are written to a temporary directory beside ``out_dir`` and moved in one by one
    with atomic renames. When ``out_dir`` already held a kyphowatch report (its
    ``report.json``), site pages of sites no longer in the data are removed; other files
    are never touched.
    """
    out_dir = Path(out_dir or settings.report_dir)
    pages = render_report(settings, as_of)
    ours = (out_dir / "report.json").exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sites").mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        for relative, text in pages.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        for relative in pages:
            os.replace(staging / relative, out_dir / relative)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if ours:
        for stale in (out_dir / "sites").glob("*.html"):
            if f"sites/{stale.name}" not in pages:
                stale.unlink()
    log.info("report: %d pages written to %s", len(pages), out_dir)
    return out_dir / "index.html"


BUILDS = "builds"
LATEST = "latest"
EMPTY = "empty"


def _point(link: Path, target: str) -> None:
    """Make ``link`` a symlink to ``target`` atomically (a new link renamed over the old)."""
    if link.exists() and not link.is_symlink():
        shutil.rmtree(link)  # a real directory left by an older kyphowatch
    temporary = link.with_name(f".{link.name}-{os.getpid()}")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(target)
    os.replace(temporary, link)


def _dated(name: str) -> date | None:
    try:
        return date.fromisoformat(name)
    except ValueError:
        return None


def publish_report(settings: Settings, as_of: date | None = None) -> Path:
    """Publish the report for ``as_of`` and move ``latest`` to it if it is the newest.

    Layout under the report dir: ``builds/<as_of>-<stamp>/`` holds each complete render;
    ``<as_of>`` is a symlink to the newest build of that date and ``latest`` a symlink to
    the newest date. Every change is a symlink swap, so readers (and the Airflow plugin)
    see a whole old report or a whole new one, even when the same date is republished.
    ``latest`` only points at ``empty`` (the no-data page) until real data is published.
    Dated reports beyond ``settings.report_keep`` are deleted, oldest first.
    """
    from pipelines.db import reading
    from pipelines.surveillance.outcomes import latest_procedure_date

    if as_of is None:
        with reading(settings.db_url) as conn:
            as_of = latest_procedure_date(conn)
    root = Path(settings.report_dir)
    folder = as_of.isoformat() if as_of else EMPTY
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    build = root / BUILDS / f"{folder}-{stamp}-{os.getpid()}"
    write_report(settings, build, as_of)
    previous = os.readlink(root / folder) if (root / folder).is_symlink() else None
    _point(root / folder, f"{BUILDS}/{build.name}")
    if previous and (root / previous).is_dir():
        os.utime(root / previous)  # unlinked now: _prune keeps it ten minutes for readers
    latest = root / LATEST
    current = _dated(os.readlink(latest)) if latest.is_symlink() else None
    if as_of is not None and (current is None or as_of >= current):
        _point(latest, folder)
    elif as_of is None and not latest.is_symlink():
        _point(latest, folder)
    _prune(root, settings.report_keep)
    return root / folder / "index.html"


def _prune(root: Path, keep: int) -> None:
    """Delete dated reports beyond the newest ``keep`` and builds no link points to.

    Builds that lost their link less than ten minutes ago are kept for readers still
    paging through them.
    """
    latest = root / LATEST
    protected = os.readlink(latest) if latest.is_symlink() else None
    dated = sorted((p for p in root.iterdir() if p.is_symlink() and _dated(p.name)),
                   key=lambda p: p.name, reverse=True)
    for link in dated[keep:]:
        if link.name != protected:
            link.unlink()
    linked = {Path(os.readlink(p)).name for p in root.iterdir() if p.is_symlink()}
    cutoff = time.time() - 600
    for build in (root / BUILDS).iterdir():
        if build.name not in linked and build.stat().st_mtime < cutoff:
            shutil.rmtree(build, ignore_errors=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` sub-command."""
    parser = subparsers.add_parser(
        "report", help="write the HTML evidence report",
        description="Write the static HTML report (overview, funnel plots, a page per site, "
        "methods) into a directory; it works offline and opens from disk.",
    )
    parser.add_argument("--db", help="warehouse URL (default: KYPHOWATCH_DB_URL)")
    parser.add_argument("--out", type=Path,
                        help="write into this directory only (default: publish into the "
                        "report dir as <as-of>/ and move the latest link if newest)")
    parser.add_argument("--as-of", help="evaluate as of this date (default: newest procedure)")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from pipelines.cli import parse_as_of
    from pipelines.db import require_warehouse

    settings = load_settings(db_url=args.db)
    require_warehouse(settings.db_url)
    as_of = parse_as_of(args.as_of)
    if args.out:
        path = write_report(settings, args.out, as_of)
    else:
        path = publish_report(settings, as_of)
    print(path)
    return 0
