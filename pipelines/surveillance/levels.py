"""Graded evidence: one level per site and metric, from every method's signals.

Levels (most severe first; docs/statistics.md section 8):

* ``alarm`` -- the metric's *alarm chart* (the one that spends the network false-alarm
  budget: a per-site threshold, :mod:`pipelines.surveillance.budget`) crossed its threshold,
  and the episode is current: its last crossing became detectable within ``hold_days``
  (365) of ``as_of``. Crossings less than ``hold_days`` apart are one episode, so a chart
  that restarts and crosses again while a drift lasts does not make a second alarm. Sentinel
  events and process failures are alarms by rule (every one is reviewed). Only alarms
  e-mail the safety team.
* ``watch`` -- short of an alarm: the alarm chart crossed its *watch* threshold (the same
  chart at the looser ``watch_per_site_year`` budget) within ``watch_hold_days`` (90), or at
  least ``watch_min_methods`` (3) corroborating methods (the other CUSUMs, funnels,
  p-chart) flag the site within that time.
  Watch shows in the report, ``kyphowatch sites`` and the weekly digest; it is not e-mailed.
* ``under_reporting`` -- a downward alarm chart (against the bottom of the guidance range)
  crossed: fewer events than even the best the guidance reports, most often missing reports.
  Goes to the data-quality recipients.
* ``immature`` / ``in_control`` -- as before: nothing to judge yet, or nothing current.

Recency is always the day a signal became *detectable*: for a CUSUM the day the crossing
case's outcome was known (``detail.detectable_on``), for the p-chart the quarter's end plus
the outcome window, for the funnel and rare-event tests the evaluation date, for the
time-to-event chart the day of the event. Never the index date of the crossing case: with a
365-day window that date is always more than a year old.

Everything here is pure: signals and per-site figures in, levels and episodes out.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from datetime import date, timedelta
from typing import Any

ALARM = "alarm"
WATCH = "watch"
UNDER_REPORTING = "under_reporting"
IMMATURE = "immature"
IN_CONTROL = "in_control"
LEVELS = (ALARM, WATCH, UNDER_REPORTING, IMMATURE, IN_CONTROL)
LEVEL_LABELS = {
    ALARM: "alarm",
    WATCH: "watch",
    UNDER_REPORTING: "under-reporting suspected",
    IMMATURE: "immature data",
    IN_CONTROL: "in control",
}

METHOD_LABELS = {
    "bernoulli_cusum": "Bernoulli CUSUM",
    "bernoulli_cusum_watch": "Bernoulli CUSUM (watch threshold)",
    "ra_cusum": "risk-adjusted CUSUM",
    "ra_cusum_watch": "risk-adjusted CUSUM (watch threshold)",
    "tte_cusum": "time-to-event CUSUM",
    "tte_cusum_watch": "time-to-event CUSUM (watch threshold)",
    "funnel_cumulative": "funnel (all data)",
    "funnel_12m": "funnel (last 12 months)",
    "pchart": "quarterly p-chart",
    "rare_exact": "exact rare-event test (12 months)",
    "sentinel": "sentinel event",
    "process": "process measure",
}
_RULE_KINDS = {"sentinel", "process"}
# The recent window of a level's rate, in index months counted back from as_of's month (as
# evidence.recent_observed_expected counts them for the report).
RECENT_MONTHS = 12
# A follow-up window longer than this moves the recent figure back to the newest index
# month with mature units: a 365-day window leaves the last 12 index months empty.
RECENT_SHIFT_AFTER_DAYS = 31


def _month_back(as_of: date, months: int) -> str:
    """Return the ``YYYY-MM`` of the index month ``months`` before ``as_of``'s month."""
    index = as_of.year * 12 + as_of.month - 1 - months
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def recent_months_before(window_days: int | None, as_of: date) -> tuple[int, int]:
    """Return the ``months_before_as_of`` range ``[first, last)`` of a metric's recent figure.

    The latest :data:`RECENT_MONTHS` index months of *mature* units. For a window of a month
    or less (leaks, major events) these are the last 12 index months (the newest one or two
    still filling); for a longer one (new fractures, 365 days) they end with the month of
    ``as_of - window_days``, the newest index month with a unit whose follow-up has ended:
    as_of 2024-11-20 gives 2022-12 to 2023-11 (months 12 to 23 before as_of). The level,
    the report, ``kyphowatch site`` and ``v_site_month_rates`` all sum these months.
    """
    window = int(window_days or 0)
    if window <= RECENT_SHIFT_AFTER_DAYS:
        return 0, RECENT_MONTHS
    last = as_of - timedelta(days=window)
    first = (as_of.year - last.year) * 12 + as_of.month - last.month
    return first, first + RECENT_MONTHS


def recent_span(window_days: int | None, as_of: date) -> dict[str, Any]:
    """Return the index months of a metric's recent figure as words a reader sees.

    ``{"index_from": "2022-12", "index_to": "2023-11", "follow_up_days": 365}`` for a
    window longer than a month (its figure is not "the last 12 months"), else
    ``{"months": 12}``.
    """
    first, stop = recent_months_before(window_days, as_of)
    if not first:
        return {"months": RECENT_MONTHS}
    return {"months": RECENT_MONTHS, "index_from": _month_back(as_of, stop - 1),
            "index_to": _month_back(as_of, first), "follow_up_days": int(window_days)}


def recent_words(recent: dict[str, Any] | None) -> str:
    """Return the span of a recent figure in words, one wording for e-mail, report and CLI.

    ``procedures of 2022-12 to 2023-11, each followed for a year`` when the figure carries
    index months (:func:`recent_span`), else ``the last 12 months``.
    """
    recent = recent or {}
    if recent.get("index_from"):
        days = int(recent.get("follow_up_days") or 0)
        follow = "a year" if days == 365 else f"{days} days"
        return (f"procedures of {recent['index_from']} to {recent['index_to']}, "
                f"each followed for {follow}")
    return f"the last {recent.get('months') or RECENT_MONTHS} months"


def method_label(method: str) -> str:
    """Return the readable name of a method code (the code itself when unknown)."""
    return METHOD_LABELS.get(method, method.replace("_", " "))


def detail_of(signal: dict[str, Any]) -> dict[str, Any]:
    """Return a signal's detail as a dict (it is stored as JSON text)."""
    detail = signal.get("detail") or {}
    if isinstance(detail, str):
        return dict(_parsed_detail(detail))
    return detail


@functools.lru_cache(maxsize=4096)
def _parsed_detail(text: str) -> dict[str, Any]:
    """Return the JSON text parsed ({} when it is not JSON), once per text.

    Grading reads each signal's detail several times; callers get a copy (detail_of).
    """
    try:
        return json.loads(text)
    except ValueError:
        return {}


def _as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


def role_of(signal: dict[str, Any]) -> str:
    """Return the role of a signal's chart: alarm, watch or corroborating (old rows: alarm)."""
    if signal["method"] in _RULE_KINDS:
        return ALARM
    return detail_of(signal).get("role", ALARM)


def detectable_on(signal: dict[str, Any], window_days: int | None) -> date:
    """Return the day a signal became detectable (see the module docstring)."""
    detail = detail_of(signal)
    if detail.get("detectable_on"):
        return _as_date(detail["detectable_on"])
    day = _as_date(signal["signal_date"])
    if signal["method"] == "pchart":
        return day + timedelta(days=window_days or 0)
    return day


def last_seen(signal: dict[str, Any], window_days: int | None) -> date:
    """Return the last day an episode was flagged, on the detectable scale."""
    detail = detail_of(signal)
    if detail.get("last_flagged"):
        day = _as_date(detail["last_flagged"])
        return day + timedelta(days=window_days or 0) if signal["method"] == "pchart" else day
    return detectable_on(signal, window_days)


def is_current(signal: dict[str, Any], as_of: date, hold_days: int,
               window_days: int | None) -> bool:
    """Return True if a signal still counts at ``as_of`` (ongoing, or seen within the hold)."""
    if detail_of(signal).get("ongoing"):
        return True
    return last_seen(signal, window_days) > as_of - timedelta(days=hold_days)


def episodes(signals: Iterable[dict[str, Any]], as_of: date, hold_days: int,
             window_days: int | None) -> list[dict[str, Any]]:
    """Chain signals into episodes: a new one starts after a gap longer than ``hold_days``.

    Returns dicts with ``start`` (first detectable day), ``last`` (last flagged day), ``end``
    (``last + hold_days``, or None while current) and the member ``signals``.
    """
    spans = sorted(
        ((detectable_on(s, window_days), last_seen(s, window_days), s) for s in signals),
        key=lambda t: (t[0], t[1], t[2]["signal_key"]),
    )
    out: list[dict[str, Any]] = []
    for start, last, signal in spans:
        ongoing = bool(detail_of(signal).get("ongoing"))
        if out and start <= out[-1]["last"] + timedelta(days=hold_days):
            current = out[-1]
            current["last"] = max(current["last"], last)
            current["ongoing"] = current["ongoing"] or ongoing
            current["signals"].append(signal)
        else:
            out.append({"start": start, "last": last, "ongoing": ongoing, "signals": [signal]})
    for episode in out:
        end = episode["last"] + timedelta(days=hold_days)
        episode["end"] = None if episode["ongoing"] or end > as_of else end
    return out


def _statistic_view(signal: dict[str, Any]) -> dict[str, Any]:
    """Return statistic and threshold in the same unit, with a label for the e-mail."""
    method = signal["method"]
    detail = detail_of(signal)
    if method.startswith("funnel"):
        return {"statistic": detail.get("rate"), "threshold": detail.get("limit_rate"),
                "statistic_label": "rate", "statistic_is_rate": True}
    if method == "pchart":
        return {"statistic": signal.get("statistic"), "threshold": signal.get("threshold"),
                "statistic_label": "quarterly rate", "statistic_is_rate": True}
    if method == "rare_exact":
        return {"statistic": signal.get("statistic"), "threshold": signal.get("threshold"),
                "statistic_label": "events in 12 months", "statistic_is_rate": False}
    if method in _RULE_KINDS:
        return {"statistic": signal.get("statistic"), "threshold": signal.get("threshold"),
                "statistic_label": "events", "statistic_is_rate": False}
    return {"statistic": signal.get("statistic"), "threshold": signal.get("threshold"),
            "statistic_label": "CUSUM statistic", "statistic_is_rate": False}


def evidence_item(signal: dict[str, Any], window_days: int | None) -> dict[str, Any]:
    """Return one method's line of evidence (JSON-ready) for alerts, report and CLI."""
    n = signal.get("n")
    observed = signal.get("observed")
    return {
        "method": signal["method"],
        "method_label": method_label(signal["method"]),
        "detectable_on": detectable_on(signal, window_days).isoformat(),
        "episode_start": _as_date(signal["episode_start"]).isoformat(),
        **_statistic_view(signal),
        "observed": observed,
        "expected": signal.get("expected"),
        "n": n,
        "rate": observed / n if observed is not None and n else None,
        "p_value": signal.get("p_value"),
        "signal_key": signal["signal_key"],
    }


def _methods_for(metric, direction: str) -> list[str]:
    """Return the method codes run for ``metric`` in ``direction`` (funnel counts twice)."""
    out = []
    for method in metric.methods:
        if method == "funnel":
            out += ["funnel_cumulative", "funnel_12m"]
        elif method in ("ra_cusum", "tte_cusum", "rare") and direction == "down":
            continue
        else:
            out.append("rare_exact" if method == "rare" else method)
    return out


def _case_mix(current: list[dict[str, Any]], metric) -> str | None:
    if "ra_cusum" not in metric.methods or "bernoulli_cusum" not in metric.methods:
        return None
    methods = {s["method"].removesuffix("_watch") for s in current}
    if "bernoulli_cusum" in methods and "ra_cusum" in methods:
        return "explains little"
    if "bernoulli_cusum" in methods:
        return "explains part"
    return None


def next_step(level: str, site: str, metric_label: str, since: date | None,
              case_mix: str | None) -> str:
    """Return the recommended next step, in the order of VLAD's investigation pyramid."""
    if level == UNDER_REPORTING:
        return (f"Check complication capture at {site} first: are complications being "
                "recorded and sent with each extract (completeness, coding, late reports)? "
                "Then case mix, then local practice.")
    mix = {"explains little": "the risk-adjusted chart agrees, so case mix explains little",
           "explains part": "the risk-adjusted chart does not signal: compare the case mix "
                            "with the network's first"}.get(case_mix or "", "compare the "
                                                            "case mix with the network's")
    when = f" since {since.isoformat()}" if since else ""
    return (f"Work down the investigation pyramid: 1 data (are the {metric_label.lower()} "
            f"events at {site} coded and complete?), 2 case mix ({mix}), 3 structure "
            f"(equipment, staffing or referral changes{when}), 4 process (cement "
            "preparation per the manufacturer's instructions, HTG108 1.2), 5 people "
            "(training and supervision).")


def grade(metric, site_row: dict[str, Any], signals: list[dict[str, Any]], as_of: date,
          design, recent_months: tuple[int, int] | None = None) -> dict[str, Any]:
    """Return the level of one site and metric with the evidence that explains it.

    ``site_row`` is the engine's per-site figures for the metric (n, rate, funnel...),
    ``signals`` every signal of this site and metric, ``design`` the profile's design,
    ``recent_months`` the (units, events) of the site's recent index months
    (:func:`recent_months_before`: the figure the report shows; else the rolling funnel's).
    """
    hold, watch_hold = design.hold_days, design.watch_hold_days
    window = metric.window_days
    site = site_row["site_id"]
    current = [s for s in signals if is_current(
        s, as_of, hold if role_of(s) == ALARM else watch_hold, window)]
    result: dict[str, Any] = {"level": IN_CONTROL, "direction": None, "since": None}

    def chain(members, days=hold):
        return [e for e in episodes(members, as_of, days, window) if e["end"] is None]

    up = [s for s in signals if s["direction"] == "up"]
    down = [s for s in signals if s["direction"] == "down"]
    alarm_up = chain([s for s in up if role_of(s) == ALARM])
    alarm_down = chain([s for s in down if role_of(s) == ALARM])
    watch_up = chain([s for s in up if role_of(s) == WATCH], watch_hold)
    corroborating = {s["method"] for s in current
                     if s["direction"] == "up" and role_of(s) == "corroborating"}
    if alarm_up:
        result.update(level=ALARM, direction="up", since=alarm_up[0]["start"])
    elif watch_up or len(corroborating) >= design.watch_min_methods:
        firsts = [e["start"] for e in watch_up] + [
            detectable_on(s, window) for s in current
            if s["direction"] == "up" and role_of(s) == "corroborating"]
        result.update(level=WATCH, direction="up", since=min(firsts))
    elif alarm_down:
        result.update(level=UNDER_REPORTING, direction="down", since=alarm_down[0]["start"])
    elif metric.kind == "outcome" and not site_row.get("n"):
        result["level"] = IMMATURE
    direction = result["direction"]
    shown = [s for s in current if s["direction"] == direction] if direction else []
    by_method: dict[str, dict[str, Any]] = {}
    for s in sorted(shown, key=lambda s: (detectable_on(s, window), s["signal_key"])):
        by_method.setdefault(s["method"], s)
    evidence = [evidence_item(s, window) for s in by_method.values()]
    evidence.sort(key=lambda e: (e["detectable_on"], e["method"]))
    agree = len({e["method"].removesuffix("_watch") for e in evidence})
    p_values = [e for e in evidence if e["p_value"] is not None]
    strongest = min(p_values, key=lambda e: e["p_value"]) if p_values else None
    # The recent figure is one figure everywhere: the units of the latest 12 index months
    # with mature units (recent_months_before), as the report, `kyphowatch site` and
    # v_site_month_rates count them. User audits: the e-mail gave the rolling funnel's 365
    # days of matured units, 28 % (5 of 18), where the report said 23.5 % (4 of 17); and
    # for new fractures "41 % (144 of 355) in the last 12 months" for procedures a year
    # older, where the report said "-". The rolling funnel's figure only without monthly
    # figures.
    rolling = ((site_row.get("funnel") or {}).get("rolling") or {})
    recent = None
    if recent_months is not None and recent_months[0]:
        recent = {**recent_span(window, as_of), "n": recent_months[0],
                  "events": recent_months[1], "rate": recent_months[1] / recent_months[0]}
    elif rolling.get("n"):
        recent = {"window_days": design.funnel_rolling_days, "n": rolling["n"],
                  "events": rolling["events"], "rate": rolling["events"] / rolling["n"]}
        if (window or 0) > RECENT_SHIFT_AFTER_DAYS:
            # units whose follow-up ended in the last funnel_rolling_days: name their dates
            last = as_of - timedelta(days=window)
            first = last - timedelta(days=design.funnel_rolling_days - 1)
            recent.update(index_from=first.isoformat(), index_to=last.isoformat(),
                          follow_up_days=window)
    case_mix = _case_mix(shown, metric) if direction == "up" else None
    since = result["since"]
    result.update(
        since=since.isoformat() if since else None,
        first_evidence=evidence[0]["detectable_on"] if evidence else None,
        agree=agree,
        methods_total=len(_methods_for(metric, direction)) if direction else 0,
        strongest=({"method": strongest["method"], "method_label": strongest["method_label"],
                    "p_value": strongest["p_value"]} if strongest else None),
        evidence=evidence,
        recent=recent,
        guidance={"low": metric.baseline.low, "high": metric.baseline.high,
                  "baseline": metric.baseline.rate, "citation": metric.citation},
        case_mix=case_mix,
        next_step=(next_step(result["level"], site, metric.label, since, case_mix)
                   if result["level"] in (ALARM, UNDER_REPORTING) else None),
        signal_keys=sorted(s["signal_key"] for s in shown),
    )
    result["reason"] = reason_text(result)
    return result


def reason_text(level: dict[str, Any]) -> str:
    """Return a short, readable reason for a level (grid cells, CLI, digests)."""
    name = level["level"]
    if name == IMMATURE:
        return "no unit has completed its outcome window yet"
    if name == IN_CONTROL:
        return "no current signal"
    parts = [f"{LEVEL_LABELS[name]} since {level['since']}"]
    if level.get("agree"):
        parts.append(f"{level['agree']} of {level['methods_total']} methods"
                     if level.get("methods_total") else f"{level['agree']} methods")
    strongest = level.get("strongest")
    if strongest and strongest.get("p_value") is not None:
        parts.append(f"p = {strongest['p_value']:.1g}")
    return "; ".join(parts)


def level_episodes(metric, site: str, signals: list[dict[str, Any]], as_of: date,
                   design) -> list[dict[str, Any]]:
    """Return every alarm, watch and under-reporting episode of one site and metric."""
    window = metric.window_days
    out = []
    groups = (
        (ALARM, "up", [s for s in signals if s["direction"] == "up" and role_of(s) == ALARM]),
        (WATCH, "up", [s for s in signals if s["direction"] == "up" and role_of(s) == WATCH]),
        (UNDER_REPORTING, "down",
         [s for s in signals if s["direction"] == "down" and role_of(s) == ALARM]),
    )
    for level, direction, members in groups:
        hold = design.watch_hold_days if level == WATCH else design.hold_days
        for episode in episodes(members, as_of, hold, window):
            out.append({
                "site_id": site, "metric": metric.id, "direction": direction, "level": level,
                "start": episode["start"], "end": episode["end"], "last": episode["last"],
                "signals": len(episode["signals"]),
            })
    return out


def status_rows(result, profile, *, detail: bool = True) -> list[dict[str, Any]]:
    """Return one status row per site and metric for a monitor result (grid and table).

    ``detail=False`` leaves out ``level_detail`` (the level's facts as JSON text, for the
    ``chart_status`` table): encoding it for 6,000 rows was a tenth of a second of
    ``kyphowatch sites``, which never shows it.
    """
    if result.as_of is None:
        return []
    hold = profile.design.hold_days
    windows = {m.id: m.window_days for m in profile.metrics}
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in result.signals:
        by_pair.setdefault((s["site_id"], s["metric"]), []).append(s)
    rows = []
    for m in result.site_metrics:
        signals = by_pair.get((m["site_id"], m["metric"]), [])
        level = m.get("level") or {"level": IN_CONTROL, "reason": "no current signal"}
        charts = {k: v for k, v in (m.get("cusum") or {}).items()
                  if k.endswith("_up") and v.get("h") and v.get("role") != "watch"}
        cusum_key = max(charts, key=lambda k: (charts[k]["value"] or 0) / charts[k]["h"],
                        default=None)
        window = windows.get(m["metric"])
        rows.append({
            "site_id": m["site_id"], "metric": m["metric"], "status": level["level"],
            "reason": level["reason"], "n": m.get("n"), "events": m.get("events"),
            "rate": m.get("rate"), "ci_low": m.get("ci_low"), "ci_high": m.get("ci_high"),
            "expected": m.get("expected"), "baseline": m["baseline"],
            "cusum_chart": cusum_key,
            "cusum_value": charts[cusum_key]["value"] if cusum_key else None,
            "cusum_threshold": charts[cusum_key]["h"] if cusum_key else None,
            "funnel_position": ((m.get("funnel") or {}).get("cumulative") or {}).get("position"),
            "signals_recent": sum(1 for s in signals
                                  if is_current(s, result.as_of, hold, window)),
            "signals_total": len(signals),
            "level_since": _as_date(level["since"]) if level.get("since") else None,
        })
        if detail:
            rows[-1]["level_detail"] = json.dumps(
                {k: v for k, v in level.items() if k not in ("level", "reason")},
                sort_keys=True, default=str)
    return rows
