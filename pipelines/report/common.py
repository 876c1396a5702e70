"""Shared pieces of the report pages: names, status marks, style sheet, HTML helpers."""

from __future__ import annotations

import html
import re
from datetime import date
from typing import Any

from pipelines import evidence
from pipelines.contract import SITE_PATTERN
from pipelines.report.svgplot import EPOCH

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




def _header(data) -> str:
    """Return the line naming profile, as-of date, volume and monitor run."""
    r, p = data.result, data.profile
    return (f"<p>Profile <b>{_esc(p.name)} {_esc(p.version)}</b> ({_esc(p.source_title)}), "
            f"data as of <b>{r.as_of.isoformat()}</b>: {r.summary.get('procedures', 0)} "
            f"procedures at {r.summary.get('sites', 0)} sites. Monitor run "
            f"<code>{r.run_key[:16]}</code>.</p>")


