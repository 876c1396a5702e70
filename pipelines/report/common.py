"""Shared pieces of the report pages: names, status marks, style sheet, HTML helpers."""

from __future__ import annotations

import html
import math
import os
import re
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

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

# Phones (400 px): the page never scrolls sideways. Tables and charts scroll inside their own
# box (.scroll); charts keep their natural width there, so their 12-unit text stays 12 px;
# the grid's first column (the site) stays in view while its box scrolls.
CSS = """body{font-family:sans-serif;margin:1.5em auto;max-width:1150px;color:#111;padding:0 1em;
line-height:1.35}*{box-sizing:border-box}
nav{border-bottom:2px solid #333;padding:.4em 0;margin-bottom:1em;display:flex;flex-wrap:wrap;
gap:.3em 1.2em}a{color:#0b3d91}
.scroll{max-width:100%;overflow-x:auto;margin:.5em 0 1.5em;position:relative}
table{border-collapse:separate;border-spacing:0;font-size:13px}
td,th{border:1px solid #999;border-width:0 1px 1px 0;padding:3px 6px;text-align:left;
vertical-align:top;background:#fff}tr>:first-child{border-left-width:1px}
thead tr:first-child>*{border-top-width:1px}
th{background:#eee}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.grid td:first-child,table.grid th:first-child{position:sticky;left:0;z-index:1;
box-shadow:2px 0 0 #666}table.grid td{min-width:10em}table.grid th .cell-line{white-space:normal;max-width:8em;font-size:12px}table.grid td:first-child{min-width:0}
h2{border-bottom:1px solid #444;margin-top:1.8em}p,li,summary{overflow-wrap:anywhere}
figure{margin:.4em 0 1.4em}figure .scroll{margin:0}
svg.chart{display:block;max-width:none;height:auto}
figcaption{font-size:13px;margin-top:.2em}.note{color:#444;font-size:13px}
.lead{font-size:17px;border-left:4px solid #111;padding-left:.6em}
.cell-level{font-weight:bold;display:block}.cell-line{display:block;white-space:nowrap}
.mark{display:inline-block;border:1px solid #333;border-radius:3px;padding:0 3px;
font-size:11px;font-weight:bold;margin-right:3px}
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);
white-space:nowrap}svg.spark{display:block;margin-top:2px}
.st-alarm{background:#fdd}.st-watch{background:#fff3c4}.st-under_reporting{background:#ffe9c6}
.st-immature{background:#f2f2f2;color:#444}.st-in_control{background:#fff}
a:focus{outline:3px solid #111;outline-offset:1px}
@media print{nav{display:none}a{color:#000;text-decoration:none}
.st-alarm,.st-watch,.st-under_reporting,.st-immature{background:none}h2{break-before:auto}
svg.chart{break-inside:avoid}.scroll{overflow:visible}}"""


def output_directory(text: str) -> Path:
    """Return ``--out`` as a directory path, for argparse (``type=``): exit 2 if it cannot be.

    An empty value would write into the current directory (a repository root, say) and an
    existing file cannot hold pages: both are refused here, before any reading.
    """
    import argparse

    if not text.strip():
        raise argparse.ArgumentTypeError("an empty --out would write into the current "
                                         "directory; name the report's directory")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return path


def prepare_output_directory(path: Path) -> None:
    """Create ``path`` (and its parents) or raise ConfigError (exit 3) saying why not."""
    from pipelines.errors import ConfigError

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output directory {path}: "
                          f"{exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write into the output directory {path}: permission denied")


# -- small HTML helpers -------------------------------------------------------------------

def _esc(value: Any) -> str:
    return _escaped("" if value is None else str(value))


@lru_cache(maxsize=1 << 16)
def _escaped(text: str) -> str:
    """Return ``text`` escaped for HTML; a report escapes the same few thousand texts (names,
    labels, dates) over and over, and a cache lookup costs a third of escaping. Keyed by the
    text itself, never the value it came from (``0.0`` and ``-0.0`` are equal keys)."""
    return html.escape(text, quote=True)


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
    """Return a proportion as a percentage: 23.1%, 0.28%, 0.066% (never 0.0% for a rate)."""
    if value is None:
        return "-"
    percent = 100 * float(value)
    if percent == 0:
        return "0%"
    if abs(percent) >= 1:
        return f"{percent:.1f}%"
    return f"{percent:.2g}%"


def guidance_text(metric) -> str:
    """Return the guidance range (or baseline) of a profile metric, in %, with its section."""
    b = metric.baseline
    if b.low is not None and b.high is not None:
        return f"guidance range {_pct(b.low)}\u2013{_pct(b.high)}"
    return f"guidance baseline {_pct(b.rate)}"


def method_name(code: str | None) -> str:
    """Return the readable name of a method or chart code (``funnel_12m``, ``ra_cusum_up``)."""
    if not code:
        return "-"
    if code in METHOD_NAMES:
        return METHOD_NAMES[code]
    for suffix, way in (("_up", "up"), ("_down", "down")):
        if code.endswith(suffix) and code[: -len(suffix)] in METHOD_NAMES:
            return f"{METHOD_NAMES[code[: -len(suffix)]]}, {way}"
    return code.replace("_", " ")


def strength_text(level: dict[str, Any] | None) -> str:
    """Return how strong a level's evidence is: ``p = 1e-12, 4 of 6 methods``."""
    if not level:
        return ""
    parts = []
    strongest = level.get("strongest") or {}
    if strongest.get("p_value") is not None:
        parts.append(f"p = {strongest['p_value']:.1g}")
    agree, total = level.get("agree"), level.get("methods_total")
    if agree:
        parts.append(f"{agree} of {total} methods" if total else
                     f"{agree} method{'s' if agree > 1 else ''}")
    return ", ".join(parts)


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset(),
           caption: str = "") -> str:
    """Return a table in a box that scrolls sideways on a phone; cells are trusted HTML
    (callers escape text with :func:`_esc`)."""
    head = _table_head(tuple(headers))
    rows = rows if isinstance(rows, list) else list(rows)
    try:  # cells of text (all of a report's): each row one join (issue 11)
        body = _rows_text(rows, numeric)
    except TypeError:  # a cell that is not text: each formatted, as an f-string does
        body = []
        for row in rows:
            cells = "".join(f"<td class='num'>{c}</td>" if i in numeric else f"<td>{c}</td>"
                            for i, c in enumerate(row))
            body.append(f"<tr>{cells}</tr>")
    cap = f"<caption class='sr'>{_esc(caption)}</caption>" if caption else ""
    return (f"<div class='scroll'><table>{cap}<thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


@lru_cache(maxsize=1024)
def _table_head(headers: tuple[str, ...]) -> str:
    """Return the header cells of :func:`_table` (a report's tables share a few dozen)."""
    return "".join(f"<th>{_esc(h)}</th>" for h in headers)


def _rows_text(rows: list[list[str]], numeric) -> list[str]:
    """Return the ``<tr>`` of each row of text cells (TypeError: a cell is not text)."""
    body = []
    if not numeric:
        for row in rows:
            body.append("<tr><td>" + "</td><td>".join(row) + "</td></tr>" if row else
                        "<tr></tr>")
        return body
    width = max(map(len, rows), default=0)
    opens = ["<td class='num'>" if i in numeric else "<td>" for i in range(width)]
    for row in rows:
        body.append("<tr>" + "</td>".join(map(str.__add__, opens, row)) + "</td></tr>"
                    if row else "<tr></tr>")
    return body


class CsvBody(str):
    """Data rows already written as CSV, each line ended by CRLF: ISO dates and numbers
    only, so nothing to quote or neutralise. The long chart series are formatted so, column
    by column, in :mod:`pipelines.report.charts`; :func:`csv_text` puts them under the header
    as they are."""


def rounded_texts(values, digits: int) -> list[str]:
    """Return ``repr(round(v, digits))`` of each float, and NaN as an empty cell.

    The CSV cells of the chart series: fixed-point formatting with the trailing zeros cut
    gives the same text as ``repr`` of the rounded value (both are the correctly rounded
    decimal, and up to 15 significant digits a decimal is the shortest text of its float)
    at about half the cost. Outside that range (more than 15 significant digits, tiny
    values ``repr`` writes with an exponent), and for NaN and infinities, the value goes
    through ``repr(round(...))`` itself.
    """
    spec = f".{digits}f"
    limit = 10.0 ** (15 - digits)  # at most 15 significant digits
    tiny = 10.0 ** -4  # below this, repr switches to an exponent (1e-05)
    out = []
    for v in values.tolist() if isinstance(values, np.ndarray) else values:
        if -limit < v < limit and not (digits > 4 and 0 < abs(v) < tiny):
            text = format(v, spec).rstrip("0")
            out.append(text + "0" if text[-1] == "." else text)
        else:
            out.append("" if v != v else repr(round(v, digits)))
    return out


@lru_cache(maxsize=64)
def _csv_head(headers: tuple[str, ...]) -> str:
    import csv
    import io

    head = io.StringIO()
    csv.writer(head, lineterminator="\r\n").writerow([evidence.csv_cell(h) for h in headers])
    return head.getvalue()


def csv_text(headers: list[str], rows: list[list[Any]]) -> str:
    """Return chart data as CSV, formula-safe by the rules of :func:`evidence.csv_cell`.

    Text starting like a formula gets a ``'``; numbers stay numbers (negative ones too);
    None and NaN are empty cells. Written here rather than through ``evidence.write_csv``
    because a report writes thousands of these files (CUSUM series of hundreds of rows):
    the work is done column by column, and columns of plain numbers and plain text (no
    comma, quote or line break) are joined directly instead of through the csv module.
    """
    import csv
    import io

    head = _csv_head(tuple(headers))
    if not rows:
        return head
    if isinstance(rows, CsvBody):
        return head + rows
    unsafe = evidence._FORMULA_START
    columns = list(zip(*rows, strict=True))
    plain = True
    for i, column in enumerate(columns):
        kinds = set(map(type, column))
        if kinds <= {int, float} and not math.isnan(math.fsum(column)):
            columns[i] = list(map(repr, column))  # the long series: numbers only
            continue
        cells = [("'" + v if v.startswith(unsafe) else v) if type(v) is str
                 else "" if v is None or v != v else repr(v) if type(v) in (int, float)
                 else str(v) for v in column]
        joined = "\x00".join(cells)
        plain = plain and not any(c in joined for c in ',"\r\n')
        columns[i] = cells
    if plain:
        return head + "\r\n".join(map(",".join, zip(*columns, strict=True))) + "\r\n"
    body = io.StringIO()
    csv.writer(body, lineterminator="\r\n").writerows(zip(*columns, strict=True))
    return head + body.getvalue()


def figure(svg: str, csv_href: str, what: str, download: str | None = None) -> str:
    """Return a chart in its scrolling box with the link to its data as CSV beside it.

    ``download`` names the file a ``data:`` link saves as (a file link keeps its name).
    """
    name = f"='{_esc(download)}'" if download else ""
    return (f"<figure><div class='scroll'>{svg}</div><figcaption><a href='{_esc(csv_href)}' "
            f"download{name}>Data behind this chart (CSV): {_esc(what)}</a></figcaption>"
            "</figure>")


def _field(value: Any, name: str, metric: str | None = None, digits: int = 4) -> str:
    """Return a number cell tagged with its JSON field (tests compare it with the CLI)."""
    attrs = f" data-field='{_esc_name(name)}'"
    if metric:
        attrs += f" data-metric='{_esc_name(metric)}'"
    if value is None:
        return f"<span{attrs} data-value=''>-</span>"
    if type(value) in (int, float):  # digits, sign, point, e, inf, nan: nothing to escape
        return f"<span{attrs} data-value='{value!r}'>{_num(value, digits)}</span>"
    return f"<span{attrs} data-value='{_esc(repr(value))}'>{_esc(_num(value, digits))}</span>"


@lru_cache(maxsize=4096)
def _esc_name(text: str) -> str:
    """Return :func:`_esc` of a field or metric name (a few names, escaped once each)."""
    return _esc(text)


def _page(title: str, body: str, depth: int = 0, subtitle: str = "") -> str:
    return _page_head(title, depth, subtitle) + body + _PAGE_TAIL


def _page_head(title: str, depth: int = 0, subtitle: str = "") -> str:
    """Return a page up to its body (:func:`_page` is head, body, :data:`_PAGE_TAIL`)."""
    up = "../" * depth
    nav = (f"<nav><a href='{up}index.html'>Overview</a><a href='{up}funnels.html'>Funnel plots"
           f"</a><a href='{up}devices.html'>Devices and cement lots</a>"
           f"<a href='{up}methods.html'>Methods</a></nav>")
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            # an empty inline icon: the browser would otherwise fetch /favicon.ico
            f"<link rel='icon' href='data:,'>"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>{nav}"
            f"<h1>{_esc(title)}</h1>{subtitle}")


_PAGE_TAIL = "</body></html>\n"


def page_bytes(title: str, parts: list[str], depth: int = 0) -> bytes:
    """Return ``_page(title, "\\n".join(parts), depth)`` encoded as UTF-8, part by part.

    A site page holds a few non-ASCII characters (dashes, the minus sign), which make the
    whole 200 kB page a two-byte string; encoding that costs far more than encoding its
    parts, most of them plain ASCII (the charts), each on its own. UTF-8 of a join is
    the join of the UTF-8s, so the bytes are the same.
    """
    body = b"\n".join([part.encode("utf-8") for part in parts])
    return b"".join([_page_head(title, depth).encode("utf-8"), body,
                     _PAGE_TAIL.encode("utf-8")])


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


