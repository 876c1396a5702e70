"""The report's charts as inline SVG (see :mod:`pipelines.report.svgplot`)."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import numpy as np

from pipelines.report.svgplot import EPOCH, Chart, decimate

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


