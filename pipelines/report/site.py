"""One page per site (``sites/<SITE>.html``)."""

from __future__ import annotations

from typing import Any

from pipelines import evidence
from pipelines.report.charts import cusum_svg, pchart_svg, tte_svg
from pipelines.report.common import (
    METHOD_NAMES,
    _esc,
    _field,
    _header,
    _num,
    _page,
    _pct,
    _table,
    _utc,
)
from pipelines.report.data import ReportData
from pipelines.report.svgplot import forest


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


