"""The methods page (``methods.html``)."""

from __future__ import annotations

import numpy as np

from pipelines.report.common import (
    METHOD_NAMES,
    _esc,
    _header,
    _num,
    _page,
    _table,
)
from pipelines.report.data import ReportData


def _tte_notes(result) -> list[tuple[str, str]]:
    """Return (metric, why) for each time-to-event chart this run did not chart, or kept
    charted below the start rule ("charted since ...", engine ``_tte``)."""
    metrics = result.summary.get("metrics", {})
    return [(k, v.get("tte") or v["tte_kept"]) for k, v in sorted(metrics.items())
            if isinstance(v, dict) and (v.get("tte") or v.get("tte_kept"))]


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
         "site from the budget (Markov chain of the daily chart)"
         + "".join(f"; {_esc(p.metric(k).label)}: {_esc(note)}" for k, note in _tte_notes(r))],
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


