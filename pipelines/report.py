"""``kyphowatch report``: one self-contained HTML file for the safety committee.

Why a single file: it is mailed, archived and opened offline, so every chart is a PNG
embedded as a data URI and there is no script or external stylesheet. The report shows the
monitor's signals, a funnel plot per metric, CUSUM charts for sites with a CUSUM signal,
p-charts, and the data-quality picture (files loaded or rejected, rows quarantined by
reason). It never shows a patient or operator reference: the engine reads neither, and the
data-quality section reports counts only, never quarantined raw values.

matplotlib is imported inside the plotting functions with the Agg backend, so importing
this module (the CLI does, for ``--help``) stays cheap and needs no display.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from pipelines.errors import ExternalSystemError
from pipelines.settings import Settings, load_settings

log = logging.getLogger(__name__)

MAX_CUSUM_CHARTS = 12
MAX_PCHART_SITES = 6


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def funnel_png(chart: dict[str, Any], label: str) -> str:
    """Return a base64 PNG funnel plot: each site's proportion against exact limits."""
    from pipelines.surveillance import funnel

    plt = _plt()
    n = np.asarray(chart["n"], float)
    events = np.asarray(chart["events"], float)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if n.max(initial=0) > 0:
        curves = funnel.funnel_curves(chart["p0"], max(n.max() * 1.1, 10),
                                      coverages=(0.95, chart["limit"]))
        for key, style in (("95", ":"), (f"{100 * chart['limit']:g}", "--")):
            ax.plot(curves["n"], curves[f"upper_{key}"], style, color="grey", lw=1,
                    label=f"{key}% limits")
            ax.plot(curves["n"], curves[f"lower_{key}"], style, color="grey", lw=1)
        has = n > 0
        ax.scatter(n[has], events[has] / n[has], s=14, color="tab:blue", zorder=3)
        ax.axhline(chart["p0"], color="black", lw=1, label="baseline")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("mature units (cumulative)")
    ax.set_ylabel("proportion")
    ax.set_title(label, fontsize=10)
    return _png(fig)


def cusum_png(chart: dict[str, Any], site_code: int, title: str) -> str:
    """Return a base64 PNG of one site's CUSUM path with its threshold and signals."""
    plt = _plt()
    rows = np.flatnonzero(np.asarray(chart["group"]) == site_code)
    days = np.asarray(chart["day"])[rows].astype("datetime64[D]")
    stat = np.asarray(chart["statistic"])[rows]
    signals = np.asarray(chart["signal"])[rows]
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.plot(days, stat, lw=0.8)
    ax.axhline(chart["h"], color="red", ls="--", lw=1, label=f"h = {chart['h']:.2f}")
    ax.scatter(days[signals], stat[signals], color="red", s=18, zorder=3)
    ax.set_ylabel("CUSUM")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.autofmt_xdate()
    return _png(fig)


def pchart_png(chart: dict[str, Any], site_codes: list[int], title: str) -> str:
    """Return a base64 PNG of quarterly proportions with the exact upper limit per site."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(len(chart["labels"]))
    for code in site_codes:
        n = chart["n"][code]
        with np.errstate(invalid="ignore", divide="ignore"):
            p = np.where(n > 0, chart["events"][code] / np.where(n > 0, n, 1), np.nan)
        line = ax.plot(x, p, marker="o", ms=3, lw=1, label=chart["sites"][code])
        if "limit" in chart:
            ax.plot(x, chart["limit"][code], ls="--", lw=0.8, color=line[0].get_color())
    ax.axhline(chart["p0"], color="black", lw=1)
    step = max(1, len(x) // 12)
    ax.set_xticks(x[::step], [chart["labels"][i] for i in x[::step]], fontsize=7, rotation=45)
    ax.set_ylabel("proportion")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _png(fig)


def data_quality(settings: Settings) -> dict[str, Any]:
    """Return file-ledger counts by kind and status, and quarantined rows by reason."""
    from pipelines.db import make_engine, redact_url
    from pipelines.schema import file_ledger, quarantine

    try:
        engine = make_engine(settings.db_url)
        with engine.connect() as conn:
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
                sa.select(file_ledger.c.file_name, file_ledger.c.reason)
                .where(file_ledger.c.status == "rejected")
                .order_by(file_ledger.c.processed_at.desc()).limit(20)
            ).all()
        engine.dispose()
    except sa.exc.SQLAlchemyError as exc:
        raise ExternalSystemError(
            f"cannot read warehouse {redact_url(settings.db_url)}: {type(exc).__name__}"
        ) from exc
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
        "rejected": [{"file": f, "reason": r} for f, r in rejected],
    }


def _html_table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


CSS = """body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#eee}
h2{border-bottom:2px solid #444;margin-top:2em}img{max-width:100%;margin:0.3em 0}
.note{color:#555;font-size:12px}"""


def render_report(settings: Settings, as_of: date | None = None) -> str:
    """Return the report HTML for ``as_of`` (default: newest procedure date)."""
    from pipelines.surveillance.engine import evaluate
    from pipelines.surveillance.profile import load_profile

    profile = load_profile(settings.profile_path)
    result = evaluate(settings, as_of, profile=profile)
    quality = data_quality(settings)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>kyphowatch report"
             f"</title><style>{CSS}</style></head><body>"]
    parts.append("<h1>kyphowatch surveillance report</h1>")
    if result.as_of is None:
        parts.append("<p>The warehouse holds no procedures yet.</p>")
    else:
        parts.append(
            f"<p>Profile <b>{html.escape(profile.name)} {html.escape(profile.version)}</b> "
            f"({html.escape(profile.source_title)}, "
            f"<a href='{html.escape(profile.source_url)}'>{html.escape(profile.source_url)}</a>)"
            f", as of <b>{result.as_of.isoformat()}</b>, {result.summary.get('procedures', 0)} "
            f"procedures at {result.summary.get('sites', 0)} sites. Run "
            f"<code>{result.run_key[:16]}</code>.</p>"
            "<p class='note'>Only units whose outcome window has closed are charted; sentinel "
            "events count at once. Episodes are listed once, with the date the chart started "
            "rising.</p>"
        )
    parts.append("<h2>Signals</h2>")
    signals = sorted(result.signals, key=lambda s: (s["signal_date"], s["site_id"]),
                     reverse=True)
    counts = {}
    for s in signals:
        counts[(s["metric"], s["method"], s["category"])] = counts.get(
            (s["metric"], s["method"], s["category"]), 0) + 1
    parts.append(_html_table(["metric", "method", "category", "signals"],
                             [[m, me, c, n] for (m, me, c), n in sorted(counts.items())]))
    parts.append(_html_table(
        ["site", "metric", "method", "direction", "category", "episode start", "signalled",
         "observed", "n", "expected", "95% CI", "statistic", "threshold", "p", "citation"],
        [[s["site_id"], s["metric"], s["method"], s["direction"], s["category"],
          s["episode_start"], s["signal_date"], s["observed"], s["n"], s["expected"],
          f"{_cell(s['ci_low'])}-{_cell(s['ci_high'])}" if s["ci_low"] is not None else None,
          s["statistic"], s["threshold"], s["p_value"], s["citation"]] for s in signals[:300]],
    ))
    if len(signals) > 300:
        parts.append(f"<p class='note'>{len(signals) - 300} older signals not shown "
                     "(see the v_active_signals view).</p>")
    charts = result.charts
    labels = {m.id: m.label for m in profile.metrics}
    if charts.get("funnel"):
        parts.append("<h2>Funnel plots (cumulative, mature units)</h2>")
        for _key, chart in sorted(charts["funnel"].items()):
            if chart["window"] != "cumulative":
                continue
            label = labels.get(chart["metric"], chart["metric"])
            if not np.asarray(chart["n"], float).sum():
                # An empty plot would read as "no problem"; say why there is nothing yet.
                parts.append(f"<p><b>{html.escape(label)}</b>: no mature units yet (the outcome "
                             "window has not closed for any procedure).</p>")
                continue
            parts.append(_img(funnel_png(chart, label), f"funnel {chart['metric']}"))
    if charts.get("cusum"):
        parts.append("<h2>CUSUM charts for sites with a CUSUM signal</h2>")
        flagged = sorted({(s["metric"], s["method"], s["direction"], s["site_id"])
                          for s in signals if s["method"] in ("bernoulli_cusum", "ra_cusum")})
        drawn = 0
        # Deterioration first: those are the charts a committee reads first.
        flagged.sort(key=lambda f: (f[2] != "up", f[0], f[1], f[3]))
        for metric, method, direction, site in flagged:
            chart = charts["cusum"].get(f"{metric}:{method}:{direction}")
            if chart is None or drawn >= MAX_CUSUM_CHARTS:
                continue
            code = chart["sites"].index(site)
            parts.append(_img(cusum_png(chart, code, f"{site} {metric} {method} {direction}"),
                              f"cusum {site} {metric}"))
            drawn += 1
        if len(flagged) > drawn:
            parts.append(f"<p class='note'>{len(flagged) - drawn} more charts not drawn; use "
                         "<code>kyphowatch site SITE_ID</code>.</p>")
    if charts.get("pchart"):
        parts.append("<h2>Quarterly p-charts (closed, mature quarters)</h2>")
        for metric, chart in sorted(charts["pchart"].items()):
            flagged_sites = sorted({s["site_id"] for s in signals if s["metric"] == metric})
            codes = [chart["sites"].index(s) for s in flagged_sites if s in chart["sites"]]
            if not codes:
                totals = np.asarray(chart["n"]).sum(axis=1)
                codes = [int(c) for c in np.argsort(-totals)[:3]]
            parts.append(_img(pchart_png(chart, codes[:MAX_PCHART_SITES],
                                         labels.get(metric, metric)), f"p-chart {metric}"))
    parts.append("<h2>Data quality</h2>")
    parts.append(_html_table(["kind", "status", "files", "rows read", "rows quarantined"],
                             [[f["kind"], f["status"], f["files"], f["rows_read"],
                               f["rows_quarantined"]] for f in quality["files"]]))
    parts.append(_html_table(["kind", "quarantine reason", "rows"],
                             [[q["kind"], q["reason"], q["rows"]] for q in quality["quarantine"]]))
    if quality["rejected"]:
        parts.append(_html_table(["rejected file", "reason"],
                                 [[r["file"], r["reason"]] for r in quality["rejected"]]))
    if result.models:
        parts.append("<h2>Risk models</h2>")
        parts.append(_html_table(
            ["metric", "kind", "n", "events", "c-statistic", "calibration shift", "note"],
            [[m["metric"], m["kind"], m["n"], m["events"], m["c_statistic"],
              m["calibration_shift"], m["reason"]] for m in result.models.values()],
        ))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(settings: Settings, out_dir: Path | None = None,
                 as_of: date | None = None) -> Path:
    """Write ``kyphowatch-report-<as_of>.html`` into ``out_dir`` and return its path."""
    out_dir = Path(out_dir or settings.report_dir)
    text = render_report(settings, as_of)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = as_of.isoformat() if as_of else "latest"
    path = out_dir / f"kyphowatch-report-{stamp}.html"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
    return path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` sub-command."""
    parser = subparsers.add_parser(
        "report", help="write the HTML surveillance report",
        description="Write a self-contained HTML report (signals, funnel plots, CUSUM charts, "
        "p-charts, data quality).",
    )
    parser.add_argument("--db", help="warehouse URL (default: KYPHOWATCH_DB_URL)")
    parser.add_argument("--out", type=Path, help="output directory (default: report dir)")
    parser.add_argument("--as-of", help="evaluate as of this date (default: newest procedure)")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from pipelines.cli import parse_as_of

    path = write_report(load_settings(db_url=args.db), args.out, parse_as_of(args.as_of))
    print(path)
    return 0
