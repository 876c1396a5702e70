"""One page per site (``sites/<SITE>.html``): the flag first, then the evidence.

The page opens with one plain sentence per flagged metric (metric, level and since when,
rate in % against the guidance range, strength). Then, per metric, the charts in order of
usefulness: the cumulative observed-minus-expected (VLAD) chart with flag levels for the
direction that signalled, the quarterly p-chart with its exact limit and the guidance range
shaded, the CUSUMs (the signalling direction first), and a funnel plot with this site
highlighted. Recent (last 12 months) and whole-history observed/expected stand side by side.

Every chart links to its data as CSV. The short ones (observed/expected, VLAD, p-chart: a
few dozen rows) carry it in the page as a ``data:`` link that downloads as
``<SITE>-<chart>.csv``; the long series (CUSUM and time-to-event paths) and the funnels link
to one CSV per chart for the whole network, beside ``index.html``, whose ``site`` column
picks the site's rows (:func:`series_files`). A thousand-site report is then about a
thousand files instead of fourteen thousand, and each long series is formatted once for
every site, not site by site (issue 11).
"""

from __future__ import annotations

import base64
from functools import lru_cache
from typing import Any

from pipelines import evidence
from pipelines.evidence import readable_stamp
from pipelines.report.charts import (
    PchartBatch,
    VladBatch,
    cusum_csv,
    cusum_svg,
    pchart_svg,
    tte_csv,
    tte_svg,
    vlad_svg,
)
from pipelines.report.common import (
    METHOD_NAMES,
    _esc,
    _esc_name,
    _field,
    _header,
    _num,
    _page,
    _pct,
    _table,
    _utc,
    csv_text,
    figure,
    method_name,
    page_bytes,
    strength_text,
)
from pipelines.report.data import ReportData
from pipelines.report.funnels import FUNNEL_WINDOWS, funnel_csv_name
from pipelines.report.svgplot import forest

UNIT_WORDS = {"procedure": "procedures", "patient": "patients"}


def headline(data: ReportData, site_id: str, m: dict[str, Any]) -> str:
    """Return the plain sentence for one flagged metric (text; the caller escapes it)."""
    metric = data.metrics[m["metric"]]
    level = data.levels.get((site_id, m["metric"])) or {}
    status = m["status"]
    words = {evidence.STATUS_ALARM: "is at alarm", evidence.STATUS_WATCH: "is on watch",
             evidence.STATUS_UNDER_REPORTING: "looks under-reported"}[status]
    since = f" since {level['since']}" if level.get("since") else ""
    view = data.rate_view(site_id, m["metric"])
    units = UNIT_WORDS.get(metric.denominator, "units")
    b = metric.baseline
    if metric.kind in ("sentinel", "process"):
        events = (data.rows.get((site_id, m["metric"])) or {}).get("events") or 0
        counted = (f"{view['events']} of {view['n']} {units} ({view['span']})" if view
                   else f"{events} event{'s' if events != 1 else ''} in the data")
        what = ("a single sentinel event is a signal" if metric.kind == "sentinel"
                else f"the guidance ({metric.citation}) expects none")
        sentence = f"{metric.label} at {site_id} {words}{since}: {counted}; {what}."
    else:
        rate = (f"{_pct(view['rate'])} of {view['n']} {units} ({view['span']}) had the "
                "event" if view else "no mature units")
        guide = (f"the guidance range of {_pct(b.low)}\u2013{_pct(b.high)}"
                 if b.low is not None else f"the guidance baseline of {_pct(b.rate)}")
        sentence = (f"{metric.label} at {site_id} {words}{since}: {rate}, against {guide} "
                    f"({metric.citation}).")
    strength = strength_text(level)
    if strength:
        sentence += f" Evidence: {strength} agree."
    return sentence


def _recent_cell(data: ReportData, metric: str, recent: dict[str, Any]) -> str:
    """Return the recent rate with its index months when they are not the last 12
    (new fractures: the latest 12 months of mature units, as the e-mail words them)."""
    if not recent:
        return "-"
    span = data.recent_label(metric, short=True)
    dates = "" if span.startswith("last ") else f" ({_esc(span)})"
    return f"{_pct(recent.get('rate'))}{dates}"


def _summary_table(data: ReportData, site_id: str, payload: dict[str, Any]) -> str:
    rows = []
    for m in payload["metrics"]:
        metric = data.metrics[m["metric"]]
        level = data.levels.get((site_id, m["metric"])) or {}
        recent = data.recent_oe.get((site_id, m["metric"])) or {}
        whole = m.get("observed_expected") or {}
        b = metric.baseline
        guide = (f"{_pct(b.low)}\u2013{_pct(b.high)}" if b.low is not None
                 else f"baseline {_pct(b.rate)}")

        def ratio(oe):
            if not oe or oe.get("o_to_e") is None:
                return "-"
            return (f"{oe['o_to_e']:.2f} ({oe['o_to_e_ci_low']:.2f}\u2013"
                    f"{oe['o_to_e_ci_high']:.2f})")

        rows.append([f"<a href='#{_esc(m['metric'])}'>{_esc(m['label'])}</a>",
                     _esc(evidence.STATUS_LABELS[m["status"]]), _esc(level.get("since") or "-"),
                     _esc(strength_text(level) or "-"),
                     _recent_cell(data, m["metric"], recent), _pct(m.get("rate")),
                     _esc(guide), ratio(recent), ratio(whole)])
    return _table(["metric", "level", "since", "strength", "rate, recent 12 months",
                   "rate, all mature units", "guidance", "O/E recent 12 months (95% CI)",
                   "O/E all mature units (95% CI)"], rows, numeric={4, 5, 7, 8},
                  caption=f"{site_id}: every metric at a glance")


@lru_cache(maxsize=4096)
def _field_head(name: str, metric: str) -> str:
    """Return the opening of :func:`_field`'s span up to its value (a few dozen names)."""
    return f"<span data-field='{_esc_name(name)}' data-metric='{_esc_name(metric)}' data-value='"


def _number_field(value: Any, name: str, metric: str) -> str:
    """Return :func:`_field` of ``value`` (a metric table holds some 14 of them: numbers
    written from a cached opening; anything else through ``_field`` itself)."""
    kind = type(value)
    if kind is float and metric:
        return f"{_field_head(name, metric)}{value!r}'>{value:.4g}</span>"
    if kind is int and metric:
        return f"{_field_head(name, metric)}{value!r}'>{value}</span>"
    return _field(value, name, metric)


def _metric_table(m: dict[str, Any]) -> str:
    metric = m["metric"]
    rows = [
        ["level", _esc(evidence.STATUS_LABELS[m["status"]]) + f" <span class='note'>("
         f"{_esc(m['status_reason'])})</span>"],
        ["mature units", _number_field(m.get("n"), "n", metric)],
        ["events", _number_field(m.get("events"), "events", metric)],
        ["rate", _number_field(m.get("rate"), "rate", metric) + f" ({_pct(m.get('rate'))})"],
        ["exact 95% CI", _number_field(m.get("ci_low"), "ci_low", metric) + " \u2013 "
         + _number_field(m.get("ci_high"), "ci_high", metric)
         + f" ({_pct(m.get('ci_low'))}\u2013{_pct(m.get('ci_high'))})"],
        ["baseline", _number_field(m.get("baseline"), "baseline", metric)
         + f" ({_pct(m.get('baseline'))}) <span class='note'>({_esc(m.get('citation'))})"
         "</span>"],
    ]
    oe = m.get("observed_expected")
    if oe:
        rows += [
            ["expected (case mix)", _number_field(oe["expected"], "expected", metric)],
            ["expected at baseline", _number_field(oe["expected_at_baseline"], "expected_at_baseline",
                                            metric)],
            ["observed / expected", _number_field(oe["o_to_e"], "o_to_e", metric) + " (95% CI "
             + _number_field(oe["o_to_e_ci_low"], "o_to_e_ci_low", metric) + " \u2013 "
             + _number_field(oe["o_to_e_ci_high"], "o_to_e_ci_high", metric) + ")"],
        ]
    for name, c in sorted((m.get("cusum") or {}).items()):
        rows.append([_esc(method_name(name)),
                     _number_field(c["value"], f"cusum.{name}.value", metric)
                     + " / h " + _number_field(c["h"], f"cusum.{name}.h", metric)
                     + f" ({c['signals']} signals in history)"])
    for window, f in sorted((m.get("funnel") or {}).items()):
        name = method_name("funnel_cumulative" if window == "cumulative" else "funnel_12m")
        rows.append([_esc(name), f"{_esc(f['position'])}, z "
                     + _number_field(f["z_adjusted"], f"funnel.{window}.z_adjusted", metric)
                     + f", {f['events']}/{f['n']}"])
    if m.get("rare"):
        r = m["rare"]
        rows.append([f"rolling {r['rolling_days']} days", f"{r['events']}/{r['n']}, exact p "
                     + _number_field(r["p_value"], "rare.p_value", metric)])
    return _table(["figure", "value"], rows, caption=f"{m['label']}: figures")


def _flag_levels(m: dict[str, Any], direction: str) -> list[tuple[str, float]]:
    suffix = f"_{direction}"
    charts = {k: v for k, v in (m.get("cusum") or {}).items() if k.endswith(suffix)
              and v.get("h")}
    chosen = [(role, v["h"]) for role in ("alarm", "watch")
              for v in charts.values() if v.get("role") == role]
    if not chosen:
        chosen = [(method_name(k.removesuffix(suffix)), v["h"]) for k, v in
                  sorted(charts.items())]
    return chosen[:3]


def vlad_batch(data: ReportData) -> VladBatch:
    """Return every site's VLAD charts made at once, from the inputs each site page draws
    them from (its months, the level's direction, the flags of the run's row); a page
    whose inputs differ draws its chart alone (:func:`vlad_svg` compares them)."""

    def make() -> VladBatch:
        inputs = []
        for key, months in data.months.items():
            metric, row = data.metrics.get(key[1]), data.rows.get(key)
            if metric is None or metric.kind != "outcome" or not months or row is None:
                continue
            direction = (data.levels.get(key) or {}).get("direction") or "up"
            inputs.append((key, months, direction, _flag_levels(row, direction),
                           metric.detect.odds_ratio if metric.detect else 2.0))
        return VladBatch(inputs)

    return data.chart_batch("vlad", make)


def pchart_batch(data: ReportData, metric_id: str) -> PchartBatch:
    """Return the p-chart of ``metric_id`` made for every site at once."""
    b = data.metrics[metric_id].baseline
    return data.chart_batch(("pchart", metric_id), lambda: PchartBatch(
        data.result.charts["pchart"][metric_id], (b.low, b.high)))


def site_batches(data: ReportData) -> None:
    """Make the charts drawn for every site at once (:func:`vlad_batch`,
    :func:`pchart_batch`) now, e.g. before the drawing processes fork (they share them)."""
    vlad_batch(data)
    for metric_id in data.result.charts.get("pchart", {}):
        if metric_id in data.metrics:
            pchart_batch(data, metric_id)


def series_csv_name(key: str) -> str:
    """Return the file name of a CUSUM's or time-to-event CUSUM's data for every site
    (beside ``index.html``); ``key`` is the run's chart key (``metric:method:direction``,
    or ``metric:tte``)."""
    return "series-" + key.replace(":", "-") + ".csv"


def series_files(data: ReportData, *, encoded: bool = False
                 ) -> dict[str, str | memoryview]:
    """Return ``{file name: CSV}`` of every CUSUM and time-to-event chart of the run, all
    sites in one file each (the site pages' charts link to them); ``encoded``: the CSV as
    its bytes, as they are written."""
    charts = data.result.charts
    out = {}
    for key, chart in sorted(charts.get("cusum", {}).items()):
        text = cusum_csv(chart, encoded=encoded)
        if text is not None:
            out[series_csv_name(key)] = text
    for metric_id, chart in sorted(charts.get("tte", {}).items()):
        text = tte_csv(chart, encoded=encoded)
        if text is not None:
            out[series_csv_name(f"{metric_id}:tte")] = text
    return out


class _Figures:
    """Charts of one page with their data: short tables inside the page as ``data:``
    links, long series as links to the network's file (:func:`series_files`)."""

    def __init__(self, data: ReportData, site_id: str) -> None:
        self.data, self.site_id, self.parts = data, site_id, []

    def add(self, drawn, slug: str, what: str) -> None:
        if drawn is None:
            return
        svg, headers, rows = drawn
        # base64, not percent-encoding: one C call, and the page stays plain ASCII
        href = "data:text/csv;charset=utf-8;base64," + base64.b64encode(
            csv_text(headers, rows).encode("utf-8")).decode("ascii")
        self.parts.append(figure(svg, href, what, download=f"{self.site_id}-{slug}.csv"))

    def add_series(self, svg: str | None, key: str, what: str) -> None:
        if svg is None:
            return
        self.parts.append(figure(svg, "../" + series_csv_name(key),
                                 f"{what} (every site; this site's rows have site "
                                 f"{self.site_id})"))


def site_page(data: ReportData, site_id: str) -> str:
    """Return one site's page."""
    return _page(f"Site {site_id}", "\n".join(_site_body(data, site_id)), depth=1)


def site_page_bytes(data: ReportData, site_id: str) -> bytes:
    """Return one site's page as UTF-8 (:func:`site_page`'s bytes, encoded part by part)."""
    return page_bytes(f"Site {site_id}", _site_body(data, site_id), depth=1)


def _site_body(data: ReportData, site_id: str) -> list[str]:
    """Return the parts of a site page's body, to be joined by line ends."""
    payload = data.site(site_id)
    charts = data.result.charts
    body = [_header(data)]
    flagged = [m for m in payload["metrics"] if m["status"] in evidence.FLAGGED]
    if flagged:
        body.extend(f"<p class='lead'>{_esc(headline(data, site_id, m))}</p>" for m in flagged)
    else:
        body.append(f"<p class='lead'>No metric at {_esc(site_id)} is flagged: overall "
                    f"{_esc(evidence.STATUS_LABELS[payload['status']])}.</p>")
    body.append("<p>Metrics: " + ", ".join(f"<a href='#{_esc(m['metric'])}'>{_esc(m['label'])}"
                                           "</a>" for m in payload["metrics"]) + ".</p>")
    body.append(_summary_table(data, site_id, payload))
    figures = _Figures(data, site_id)
    ratios = [m for m in payload["metrics"] if m["kind"] == "outcome"]
    if ratios:
        rows, csv_rows = [], []
        for m in ratios:
            for span, oe in ((data.recent_label(m["metric"], short=True),
                              data.recent_oe.get((site_id, m["metric"]))),
                             ("all mature units", m["observed_expected"])):
                short = m["label"] if len(m["label"]) <= 28 else m["label"][:27] + "\u2026"
                label = f"{short}, {span}"
                rows.append((label, oe and oe["o_to_e"], oe and oe["o_to_e_ci_low"],
                             oe and oe["o_to_e_ci_high"]))
                csv_rows.append([m["metric"], span, oe and oe.get("observed"),
                                 oe and oe.get("expected"), oe and oe["o_to_e"],
                                 oe and oe["o_to_e_ci_low"], oe and oe["o_to_e_ci_high"]])
        stand_out = [r[0] for r in rows if r[2] is not None and r[2] > 1]
        svg = forest(rows, title=f"{site_id}: observed / expected events, recent and whole "
                                 "history (exact 95% CI)",
                     x_label="observed / expected (1 = as expected for the case mix)",
                     description=f"{site_id}: observed/expected per outcome metric for the "
                     "recent 12 months and for all mature units. Intervals wholly above 1: "
                     + (", ".join(stand_out) if stand_out else "none") + ".")
        figures.add((svg, ["metric", "span", "observed", "expected", "o_to_e",
                           "o_to_e_ci_low", "o_to_e_ci_high"], csv_rows),
                    "observed-expected", f"{site_id} observed/expected")
        body.extend(figures.parts)
        figures.parts = []
    dq = payload["data_quality"]
    body.append(_table(["procedures", "last procedure", "newest extract", "rows quarantined",
                        "complications pending"],
                       [[_num(dq["procedures"]), _esc(dq["last_procedure_date"]),
                         _esc(readable_stamp(dq["newest_extract"])),
                         _num(dq["rows_quarantined"]), _num(dq["complications_pending"])]],
                       caption=f"{site_id}: data quality"))
    for m in payload["metrics"]:
        body.extend(_metric_section(data, site_id, m, payload, charts, figures))
    body.extend(_tail(payload, site_id))
    return body


def _metric_section(data: ReportData, site_id: str, m: dict[str, Any], payload, charts,
                    figures: _Figures) -> list[str]:
    metric_id = m["metric"]
    metric = data.metrics[metric_id]
    label = m["label"]
    level = data.levels.get((site_id, metric_id)) or {}
    direction = level.get("direction") or "up"
    out = [f"<h2 id='{_esc(metric_id)}'>{_esc(label)}</h2>"]
    if m["status"] in evidence.FLAGGED:
        out.append(f"<p><b>{_esc(headline(data, site_id, m))}</b></p>")
    out.append(_metric_table(m))
    months = data.months.get((site_id, metric_id))
    if months and metric.kind == "outcome":
        odds = metric.detect.odds_ratio if metric.detect else 2.0
        way = "more events" if direction == "up" else "fewer events"
        figures.add(vlad_svg(months, f"{site_id} {label}: observed \u2212 expected ({way})",
                             direction=direction, flags=_flag_levels(m, direction),
                             odds_ratio=odds, batch=vlad_batch(data),
                             key=(site_id, metric_id)),
                    f"{metric_id}-vlad", f"{site_id} {label}, observed minus expected")
    if metric_id in charts.get("pchart", {}):
        b = metric.baseline
        figures.add(pchart_svg(charts["pchart"][metric_id], site_id,
                               f"{site_id} {label}: quarterly p-chart",
                               guidance=(b.low, b.high),
                               batch=pchart_batch(data, metric_id)),
                    f"{metric_id}-pchart", f"{site_id} {label}, quarterly p-chart")
    cusums = [(key, c) for key, c in sorted(charts.get("cusum", {}).items())
              if c["metric"] == metric_id]
    cusums.sort(key=lambda item: (item[1]["direction"] != direction,
                                  item[1].get("role") != "alarm", item[0]))
    for key, chart in cusums:
        name = METHOD_NAMES.get(chart["method"], chart["method"])
        way = "more events (up)" if chart["direction"] == "up" else "fewer events (down)"
        figures.add_series(cusum_svg(chart, site_id, f"{site_id} {label}: {name}, {way}",
                                     data.cusum_series(key)),
                           key, f"{site_id} {label}, {name} {chart['direction']}")
    if metric_id in charts.get("tte", {}):
        figures.add_series(tte_svg(charts["tte"][metric_id], site_id,
                                   f"{site_id} {label}: time-to-event CUSUM, more events (up)",
                                   data.tte_series(metric_id)),
                           f"{metric_id}:tte", f"{site_id} {label}, time-to-event CUSUM")
    for window in FUNNEL_WINDOWS:
        template = data.funnel_templates.get((metric_id, window))
        if template is None or (window == "rolling" and m["status"] not in evidence.FLAGGED):
            continue
        figures.parts.append(figure(template.for_site(site_id),
                                    f"../{funnel_csv_name(metric_id, window)}",
                                    f"{label} funnel ({window}), every site, {site_id} "
                                    "highlighted"))
    out.extend(figures.parts)
    figures.parts = []
    signals = [s for s in payload["signals"] if s["metric"] == metric_id]
    if signals:
        out.append(f"<h3>Signals ({len(signals)})</h3>")
        out.append(_table(
            ["method", "direction", "category", "episode start", "signalled", "observed",
             "n", "expected", "95% CI", "statistic", "threshold", "p"],
            [[_esc(method_name(s["method"])), _esc(s["direction"]),
              _esc(str(s["category"]).replace("_", " ")), _esc(s["episode_start"]),
              _esc(s["signal_date"]), _num(s["observed"]), _num(s["n"]), _num(s["expected"]),
              f"{_num(s['ci_low'])}\u2013{_num(s['ci_high'])}"
              if s["ci_low"] is not None else "-",
              _num(s["statistic"]), _num(s["threshold"]), _num(s["p_value"])]
             for s in sorted(signals, key=lambda s: s["signal_date"], reverse=True)],
            numeric={5, 6, 7, 9, 10, 11}, caption=f"{site_id} {label}: signals"))
    return out


def _tail(payload: dict[str, Any], site_id: str) -> list[str]:
    body = []
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
    return body
