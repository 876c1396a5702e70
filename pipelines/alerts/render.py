"""The words of an alert: e-mail subject, plain text, HTML and the webhook JSON body.

Everything here is built from the alert's stored payload, which holds aggregate figures,
file names and codes only: no patient, operator or hash value ever reaches a message.
Rendering is pure (no database, no network) so it can be tested and reused.

A message is written for a safety lead reading it on a phone: for a site x metric level
(payload type ``level``) the body opens with one plain sentence (what, where, how far off
the guidance, since when, how many methods agree), then when it started, one line per
method, a link to the evidence page and a next step in the order of VLAD's investigation
pyramid (data, case mix, structure, process, people). Digests (``digest``) list many
site-metrics in one message. Every text and HTML part ends with the acknowledge and
resolve commands and the screening disclaimer.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from typing import Any

from pipelines.surveillance.levels import recent_words

SUBJECT_PREFIX = "[kyphowatch]"
DIGEST_CAP = 50  # digest items listed one by one; the rest are counted ("and N more")
DISCLAIMER = "Control-chart signals are screening results for review, not a finding."
SYNTHETIC_NOTE = "Synthetic data (demo)."

_LEVEL_WORDS = {
    "alarm": "alarm",
    "under_reporting": "possible under-reporting",
    "watch": "watch",
}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                 "nine", "ten")  # fmt: skip

# VLAD's investigation pyramid, bottom up: rule out data and case mix before looking at
# structure, process and, last, people. ``{site}`` is filled in; the data step differs
# for under-reporting, where a low rate usually means missing records, not safer care.
_PYRAMID = (
    ("Data", "check the extract: are events coded, dated and sent completely for {site}?"),
    ("Case mix", "are {site}'s patients older or frailer than usual (risk-adjusted chart)?"),
    ("Structure", "any change in staff, equipment, cement or referrals?"),
    ("Process", "review technique, imaging and follow-up of the flagged cases."),
    ("People", "only after 1-4, with the team, to learn rather than blame."),
)
_UNDER_REPORTING_DATA = (
    "are complications recorded and sent for {site}? A rate below the guidance usually "
    "means missing records, not safer care."
)

_PAGE_STYLE = (
    "max-width:600px;margin:0 auto;padding:16px;background:#ffffff;color:#1f2328;"
    "font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;"
    "font-size:16px;line-height:1.45"
)
_BUTTON_STYLE = (
    "display:inline-block;padding:10px 14px;background:#0b5cad;color:#ffffff;"
    "text-decoration:none;border-radius:4px;font-weight:bold"
)
_CODE_STYLE = "font-family:Menlo,Consolas,monospace;font-size:13px;word-break:break-all"
_BANNER_COLOURS = {"alarm": "#b42318", "under_reporting": "#b54708"}


@dataclass(frozen=True)
class Message:
    """One rendered alert, ready for any channel."""

    alert_id: str
    kind: str
    title: str
    subject: str
    lines: list[tuple[str, str]]  # (label, value) in reading order
    text: str
    html: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class _Body:
    """What one payload type contributes: subject, structured lines, text and HTML body."""

    subject: str
    lines: list[tuple[str, str]]
    text: list[str]  # text lines before the common footer
    html: str  # HTML fragment before the common footer


# -- numbers in words ----------------------------------------------------------------------


def _number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _float(value: Any) -> float | None:
    """Return ``value`` as a finite float, or None when it is missing or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _num(value: Any) -> str:
    """Return a count or statistic for a reader: ``30``, ``14.2``, ``7.1``, ``1234``."""
    number = _float(value)
    if number is None:
        return "n/a" if value is None else str(value)
    if number.is_integer():
        return str(int(number))
    if abs(number) >= 100:
        return f"{number:.0f}"
    return f"{number:.3g}"


def _pct_digits(rate: Any) -> str | None:
    """Return a proportion as a percentage without the sign: 0.238 -> ``24``, 0.00066 -> ``0.066``.

    Two significant figures below 10%, whole numbers above, so a rare event is never shown
    as 0% and a common one carries no false precision.
    """
    number = _float(rate)
    if number is None:
        return None
    value = number * 100
    if value == 0:
        return "0"
    if abs(value) >= 10:
        return f"{value:.0f}"
    digits = 1 - math.floor(math.log10(abs(value)))
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _pct(rate: Any) -> str:
    """Return a proportion as a percentage for a reader: ``24%``, ``3.1%``, ``0.066%``."""
    digits = _pct_digits(rate)
    return "n/a" if digits is None else f"{digits}%"


def _p(value: Any) -> str:
    """Return a p-value for a reader: ``0.003``, ``0.031``, ``3.2e-5``, ``1e-12``."""
    number = _float(value)
    if number is None:
        return "n/a"
    if number <= 0:
        return "< 1e-300"
    if number >= 0.001:
        return f"{number:.2g}"
    mantissa, exponent = f"{number:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}" if mantissa != "1" else f"1e{int(exponent)}"


def _words(count: Any) -> str:
    """Return a small count in words (``four``), larger ones as digits."""
    number = _float(count)
    if number is not None and number.is_integer() and 0 <= number <= 10:
        return _NUMBER_WORDS[int(number)]
    return _num(count)


def _range(guidance: dict[str, Any] | None, dash: str = "–") -> str | None:
    """Return the guidance range (``7–11%``), or its point baseline when it has no range."""
    guidance = guidance or {}
    low, high = _pct_digits(guidance.get("low")), _pct_digits(guidance.get("high"))
    if low is not None and high is not None:
        return f"{low}{dash}{high}%"
    if high is not None:
        return f"at most {high}%"
    if low is not None:
        return f"at least {low}%"
    if _float(guidance.get("baseline")) is not None:
        return _pct(guidance["baseline"])
    return None


def _window(days: Any) -> str:
    """Return a look-back window in words: 365 -> ``the last 12 months``."""
    number = _float(days)
    if number is None or number <= 0:
        return "recently"
    months = round(number / 30.44)
    if months >= 1 and abs(months * 30.44 - number) <= 3:
        return "the last month" if months == 1 else f"the last {months} months"
    return f"the last {_num(number)} days"


def _metric_words(payload: dict[str, Any]) -> str:
    """Return the metric for a subject line: ``Cement leakage (any)`` -> ``cement leakage``."""
    label = str(payload.get("metric_label") or payload.get("metric") or "metric")
    label = label.split(" (")[0].replace("_", " ").strip() or label
    if len(label) > 1 and not label[1].isupper():  # keep acronyms such as "MDT review"
        label = label[0].lower() + label[1:]
    return label


def _sentence_start(text: str) -> str:
    return text[:1].upper() + text[1:]


def _one_line(text: str) -> str:
    """Return ``text`` on one line (a header value must not carry a line break)."""
    return " ".join(text.split())


def _is_link(where: Any, flagged: Any = True) -> bool:
    return bool(flagged) and isinstance(where, str) and where.startswith(("https://", "http://"))


# -- HTML pieces ---------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _link_html(where: Any, text: str) -> str:
    return (f"<p><a href=\"{_esc(where)}\" style=\"{_BUTTON_STYLE}\">{_esc(text)}</a></p>"
            f"<p style=\"color:#57606a;{_CODE_STYLE}\">{_esc(where)}</p>")  # fmt: skip


def _table_html(lines: list[tuple[str, str]]) -> str:
    rows = []
    for name, value in lines:
        shown = (f"<a href=\"{_esc(value)}\">{_esc(value)}</a>" if _is_link(value)
                 else _esc(value))  # fmt: skip
        rows.append(
            "<tr><th align='left' valign='top' style='padding:4px 8px 4px 0;"
            f"white-space:nowrap'>{_esc(name)}</th>"
            f"<td style='padding:4px 0;word-break:break-word'>{shown}</td></tr>"
        )
    style = "border-collapse:collapse;font-size:14px"
    return f"<table cellspacing='0' style='{style}'>{''.join(rows)}</table>"


def _page(body: str) -> str:
    return (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"></head>"
        "<body style=\"margin:0;padding:0;background:#f6f8fa\">"
        f"<div style=\"{_PAGE_STYLE}\">{body}</div></body></html>"
    )


def _footer(short_id: str, synthetic: bool) -> tuple[list[str], str]:
    """Return the acknowledge/resolve commands and the disclaimer, as text lines and HTML."""
    ack = f"kyphowatch alerts ack {short_id} --by NAME --reason TEXT"
    resolve = f"kyphowatch alerts resolve {short_id} --by NAME --reason TEXT"
    disclaimer = (f"{SYNTHETIC_NOTE} " if synthetic else "") + DISCLAIMER
    text = ["", f"Acknowledge: {ack}", f"Resolve:     {resolve}", "", disclaimer]
    markup = (
        "<hr style='border:0;border-top:1px solid #d0d7de;margin:16px 0'>"
        f"<p style='font-size:13px'>Acknowledge: <code style=\"{_CODE_STYLE}\">{_esc(ack)}</code>"
        f"<br>Resolve: <code style=\"{_CODE_STYLE}\">{_esc(resolve)}</code></p>"
        f"<p style='font-size:13px;color:#57606a'>{_esc(disclaimer)}</p>"
    )
    return text, markup


# -- the older payload types: a label/value table ------------------------------------------


def _signal_lines(p: dict[str, Any]) -> list[tuple[str, str]]:
    # The interval is the method's own (a rate for funnel/p-chart, a count for rare-event
    # tests), so it gets its own line rather than being glued to observed/expected.
    interval = "n/a"
    if p.get("ci_low") is not None and p.get("ci_high") is not None:
        interval = f"{_number(p['ci_low'])} to {_number(p['ci_high'])}"
    n = f" (n = {p['n']})" if p.get("n") is not None else ""
    statistic = _number(p.get("statistic"))
    threshold = _number(p.get("threshold"))
    test = f"{statistic} against threshold {threshold}"
    if p.get("p_value") is not None:
        test += f"; p = {_number(p['p_value'])}"
    signals = p.get("signals") or []
    starts = [str(s["episode_start"]) for s in [p, *signals] if s.get("episode_start")]
    since = min(starts) if starts else None  # ISO dates sort as text
    count = max(len(signals), 1)
    return [
        ("Site", str(p.get("site_id"))),
        ("Metric", f"{p.get('metric')} (direction: {p.get('direction')})"),
        ("Latest", f"{p.get('method')}: observed {_number(p.get('observed'))} against "
                   f"expected {_number(p.get('expected'))}{n}"),  # fmt: skip
        ("Interval", interval),
        ("Statistic", test),
        ("Baseline", f"{_number(p.get('baseline'))}, {p.get('citation')} "
                     f"(profile {p.get('profile_name')} {p.get('profile_version')})"),  # fmt: skip
        ("Since", f"{since} (earliest episode start of {count} "
                  f"signal{'s' if count != 1 else ''})"),  # fmt: skip
        ("Signal date", str(p.get("signal_date"))),
        *_other_signals(p),
    ]


def _headline_index(p: dict[str, Any], signals: list[dict[str, Any]]) -> int | None:
    """Return the position in ``signals`` of the signal the headline describes, if any."""
    key = p.get("signal_key")
    if key is not None:
        for i, other in enumerate(signals):
            if other.get("signal_key") == key:
                return i
    fields = ("method", "episode_start", "signal_date")
    for i, other in enumerate(signals):
        if all(other.get(f) == p.get(f) for f in fields):
            return i
    return None


def _other_signals(p: dict[str, Any]) -> list[tuple[str, str]]:
    """Return one line per further method / episode flagging the same site and metric.

    The headline is the newest signal; every other one is listed, oldest first, so the
    earliest evidence is never dropped and the headline is not repeated.
    """
    signals = [s for s in (p.get("signals") or []) if isinstance(s, dict)]
    skip = _headline_index(p, signals)
    others = [s for i, s in enumerate(signals) if i != skip]
    others.sort(key=lambda s: (str(s.get("episode_start") or ""), str(s.get("signal_date") or ""),
                               str(s.get("method") or "")))  # fmt: skip
    lines = []
    for other in others:
        lines.append((
            "Also",
            f"{other.get('method')}: observed {_number(other.get('observed'))} against "
            f"expected {_number(other.get('expected'))}, statistic "
            f"{_number(other.get('statistic'))} against threshold "
            f"{_number(other.get('threshold'))}, since {other.get('episode_start')} "
            f"(signal {other.get('signal_date')})",
        ))  # fmt: skip
    return lines


def _rejected_lines(p: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("File", str(p.get("file_name"))),
        ("Reason", str(p.get("reason"))),
        ("Checksum", str(p.get("checksum"))),
        ("Processed at", str(p.get("processed_at"))),
    ]


def _quarantine_lines(p: dict[str, Any]) -> list[tuple[str, str]]:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted((p.get("quarantine_reasons") or {}).items()))
    return [
        ("File", str(p.get("file_name"))),
        ("Quarantined", f"{p.get('rows_quarantined')} of {p.get('rows_read')} rows "
                        f"({float(p.get('share') or 0):.1%}; threshold "
                        f"{float(p.get('threshold') or 0):.0%})"),  # fmt: skip
        ("Reasons", reasons or "n/a"),
        ("Checksum", str(p.get("checksum"))),
    ]


def _silent_lines(p: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("Site", str(p.get("site_id"))),
        ("Last procedure", str(p.get("last_procedure_date"))),
        ("Silent for", f"{p.get('days_silent')} days before {p.get('as_of')} "
                       f"(threshold {p.get('silent_days_threshold')} days)"),  # fmt: skip
    ]


def _task_failure_lines(p: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("DAG", str(p.get("dag_id"))),
        ("Task", f"{p.get('task_id')} (try {p.get('try_number')})"),
        ("Run", str(p.get("run_id"))),
        ("Error", str(p.get("error"))),
        ("Next", "fix the cause; the next success closes this alert, and files still in "
                 "landing are picked up again automatically"),
    ]


def _heartbeat_lines(p: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("Last extract", str(p.get("last_extract_at"))),
        ("Silent for", f"{p.get('hours_silent')} hours (threshold {p.get('threshold_hours')} h)"),
    ]


def _channel_outage_lines(p: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("Channel", str(p.get("channel"))),
        ("Failing since", f"{p.get('failing_since')} ({p.get('minutes')} minutes; threshold "
                          f"{p.get('threshold_minutes')})"),  # fmt: skip
    ]


_LINES = {
    "signal": _signal_lines,
    "rejected_file": _rejected_lines,
    "quarantine_share": _quarantine_lines,
    "silent_site": _silent_lines,
    "task_failure": _task_failure_lines,
    "heartbeat": _heartbeat_lines,
    "channel_outage": _channel_outage_lines,
}


_KIND_LABELS = {"safety": "safety", "training_review": "confidential training review",
                "device": "device"}


def _table_body(p: dict[str, Any], title: str, kind: str,
                alert_line: tuple[str, str]) -> _Body:  # fmt: skip
    """Return the body of the older payload types: the title over a label/value table."""
    # Payloads of issue 12 (operators, devices, Yellow Cards) carry their own label/value lines.
    lines = _LINES.get(p.get("type"), lambda q: [(str(a), str(b)) for a, b in q.get("lines", [])])(p)
    lines.append(("Where to look", str(p.get("where"))))
    lines.append(alert_line)
    label = _KIND_LABELS.get(kind, "data quality")
    width = max(len(name) for name, _ in lines) + 2
    text = [title, "", *(f"{(name + ':').ljust(width)} {value}" for name, value in lines)]
    markup = f"<h2 style='font-size:19px;margin:0 0 12px'>{_esc(title)}</h2>{_table_html(lines)}"
    return _Body(f"{SUBJECT_PREFIX} {label}: {title}", lines, text, markup)


# -- type "level": one site x metric at alarm or under-reporting level ---------------------


def _agreement(p: dict[str, Any]) -> str | None:
    """Return how many methods agree, in words: ``four of five methods agree``."""
    agree, total = _float(p.get("agree")), _float(p.get("methods_total"))
    if agree is None:
        return None
    if total is not None and total >= agree:
        if agree == total and total > 1:
            return f"all {_words(total)} methods agree"
        verb = "signals" if agree == 1 else "agree"
        return f"{_words(agree)} of {_words(total)} methods {verb}"
    return "one method signals" if agree == 1 else f"{_words(agree)} methods agree"


def _strongest(p: dict[str, Any]) -> str | None:
    strongest = p.get("strongest") or {}
    if not isinstance(strongest, dict) or _float(strongest.get("p_value")) is None:
        return None
    label = strongest.get("method_label") or "strongest method"
    return f"strongest {label} at p = {_p(strongest['p_value'])}"


def _rate_phrase(p: dict[str, Any]) -> str | None:
    """Return the recent rate, its counts and window: ``24% (50 of 210) in the last 12 months``,
    or ``30% (98 of 327) among procedures of 2022-12 to 2023-11, each followed for a year``."""
    recent = p.get("recent") or {}
    if _float(recent.get("rate")) is None:
        return None
    counts = ""
    if recent.get("events") is not None and recent.get("n") is not None:
        counts = f" ({_num(recent['events'])} of {_num(recent['n'])})"
    if recent.get("index_from"):  # a follow-up window: the index months, not "the last 12"
        return f"{_pct(recent['rate'])}{counts} among {recent_words(recent)}"
    months = _float(recent.get("months"))
    window = (f"the last {_num(months)} months" if months and months > 1
              else _window(recent.get("window_days")))
    return f"{_pct(recent['rate'])}{counts} in {window}"


def _level_sentence(p: dict[str, Any]) -> str:
    """Return the one plain sentence that opens a level alert."""
    site = p.get("site_id")
    metric = _sentence_start(str(p.get("metric_label") or p.get("metric")))
    guidance = p.get("guidance") or {}
    expected = _range(guidance)
    citation = guidance.get("citation")
    against = ""
    if expected:
        against = f" against {expected}" + (f" in {citation}" if citation else "")
    rate = _rate_phrase(p)
    if rate:
        first = f"{metric} at {site}: {rate}{against}"
    else:  # no recent rate: say which side of the guidance the methods found
        side = "below" if p.get("direction") == "down" else "above"
        first = f"{metric} at {site} is {side} the guidance"
        if expected:
            first += f" of {expected}" + (f" in {citation}" if citation else "")
    level = str(p.get("level") or "signal")
    since = p.get("since") or _earliest(p.get("evidence"), "detectable_on")
    state = _LEVEL_WORDS.get(level, level.replace("_", " "))
    state += f" since {since}" if since else ""
    tail = [x for x in (_agreement(p), _strongest(p)) if x]
    return f"{first}; {state}" + (", " + ", ".join(tail) if tail else "") + "."


def _earliest(rows: Any, field: str) -> str | None:
    values = [str(r[field]) for r in (rows or []) if isinstance(r, dict) and r.get(field)]
    return min(values) if values else None


def _evidence(p: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the evidence rows oldest first, at most one per method (the earliest)."""
    rows = [r for r in (p.get("evidence") or []) if isinstance(r, dict)]
    rows = sorted(rows, key=lambda r: (str(r.get("detectable_on") or ""),
                                       str(r.get("episode_start") or "")))  # fmt: skip
    seen: set[str] = set()
    unique = []
    for row in rows:
        method = str(row.get("method") or row.get("method_label"))
        if method not in seen:
            seen.add(method)
            unique.append(row)
    return unique


def _statistic_phrase(e: dict[str, Any]) -> str | None:
    """Return a method's statistic next to its own threshold, in the statistic's own unit.

    ``statistic_is_rate`` covers both numbers: a rate is shown as a percentage, anything
    else (CUSUM statistic, z-score, a count) as a plain number with its label.
    """
    statistic, threshold = e.get("statistic"), e.get("threshold")
    if statistic is None:
        return None
    is_rate = bool(e.get("statistic_is_rate"))
    show = _pct if is_rate else _num
    label = str(e.get("statistic_label") or ("rate" if is_rate else "statistic"))
    phrase = f"{label} {show(statistic)}"
    s, t = _float(statistic), _float(threshold)
    if threshold is None:
        return phrase
    where = "at"
    if s is not None and t is not None:
        where = "above" if s > t else "below" if s < t else "at"
    noun = "limit" if is_rate else "threshold"
    return f"{phrase} {where} its {noun} {show(threshold)}"


def _counts_phrase(e: dict[str, Any]) -> str | None:
    """Return observed against expected: ``30 of 120 (25%) against 14.2 expected``."""
    observed, expected, n = e.get("observed"), e.get("expected"), e.get("n")
    if observed is None:
        return None
    phrase = _num(observed)
    n_value, o_value = _float(n), _float(observed)
    if n_value:
        phrase += f" of {_num(n)}"
        if o_value is not None:
            phrase += f" ({_pct(o_value / n_value)})"
    if expected is not None:
        phrase += f" against {_num(expected)} expected"
    return phrase


def _evidence_text(e: dict[str, Any]) -> str:
    """Return one method's evidence in words, without the method's name."""
    when = f"detectable on {e.get('detectable_on') or 'n/a'}"
    start = e.get("episode_start")
    if start and start != e.get("detectable_on"):
        when += f" (episode start {start})"
    details = [_statistic_phrase(e), _counts_phrase(e)]
    if _float(e.get("p_value")) is not None:
        details.append(f"p = {_p(e['p_value'])}")
    shown = "; ".join(d for d in details if d)
    return f"{when}: {shown}" if shown else when


def _method_label(e: dict[str, Any]) -> str:
    return str(e.get("method_label") or e.get("method") or "method")


def _next_steps(p: dict[str, Any]) -> list[str]:
    """Return the next step: the payload's own sentence, else the investigation pyramid."""
    if p.get("next_step"):
        return [str(p["next_step"])]
    site = p.get("site_id")
    steps = []
    for i, (name, what) in enumerate(_PYRAMID, start=1):
        if name == "Data" and p.get("level") == "under_reporting":
            what = _UNDER_REPORTING_DATA
        steps.append(f"{i}. {name}: {what.format(site=site)}")
    return steps


def _case_mix(p: dict[str, Any]) -> str | None:
    value = p.get("case_mix")
    return f"risk adjustment {value} of the difference" if value else None


def _level_subject(p: dict[str, Any]) -> str:
    site, metric, level = p.get("site_id"), _metric_words(p), p.get("level")
    rate = _pct((p.get("recent") or {}).get("rate"))
    expected = _range(p.get("guidance"), dash="-")
    versus = ""
    if rate != "n/a":
        versus = f": {rate} vs {expected}" if expected else f": {rate}"
    if level == "under_reporting":
        side = "below" if p.get("direction") != "up" else "above"
        return f"{SUBJECT_PREFIX} data quality: {site} {metric} {side} range{versus}"
    citation = str((p.get("guidance") or {}).get("citation") or "").removeprefix("NICE ")
    cited = f" ({citation})" if citation and expected else ""
    return f"{SUBJECT_PREFIX} {str(level or 'signal').upper()} {site} {metric}{versus}{cited}"


def _where(p: dict[str, Any], command: str) -> tuple[str, str, bool]:
    """Return where to look (URL or path), the text of its link or note, and whether it links."""
    where = p.get("where")
    if _is_link(where, p.get("where_is_url", True)):
        return str(where), "", True
    note = (f"(no report URL is configured: set KYPHOWATCH_REPORT_BASE_URL to get a link; "
            f"or run: {command})")  # fmt: skip
    return str(where) if where else "n/a", note, False


def _level_body(p: dict[str, Any], alert_line: tuple[str, str]) -> _Body:
    """Return the body of a ``level`` alert: sentence, start, methods, link, next step."""
    site = p.get("site_id")
    sentence = _level_sentence(p)
    since = p.get("since") or _earliest(p.get("evidence"), "detectable_on")
    evidence = _evidence(p)
    earliest_start = _earliest(evidence, "episode_start")
    started = f"{since or 'n/a'} (first signal of this episode)"
    if earliest_start and since and earliest_start < str(since):
        started = (f"{since} (first signal of this episode; the earliest method dates "
                   f"the change to {earliest_start})")  # fmt: skip
    recent = p.get("recent") or {}
    recent_text = _rate_phrase(p) or "n/a"
    if _float(recent.get("ci_low")) is not None and _float(recent.get("ci_high")) is not None:
        recent_text += f", interval {_pct_digits(recent['ci_low'])}–{_pct(recent['ci_high'])}"
    guidance = p.get("guidance") or {}
    guidance_text = _range(guidance) or "n/a"
    if _float(guidance.get("baseline")) is not None and guidance.get("low") is not None:
        guidance_text += f" (baseline {_pct(guidance['baseline'])})"
    if guidance.get("citation"):
        guidance_text += f", {guidance['citation']}"
    if p.get("profile_name"):
        guidance_text += f"; profile {p['profile_name']} {p.get('profile_version') or ''}".rstrip()
    level = str(p.get("level") or "signal")
    level_text = {
        "alarm": "alarm (safety)",
        "under_reporting": "possible under-reporting (data quality)",
    }.get(level, level)
    agreement = ", ".join(x for x in (_agreement(p), _strongest(p)) if x) or "n/a"
    steps = _next_steps(p)
    case_mix = _case_mix(p)
    where, note, is_url = _where(p, f"kyphowatch site {site}")
    link_text = f"Open the {site} evidence page"

    lines: list[tuple[str, str]] = [
        ("Summary", sentence),
        ("Site", str(site)),
        ("Metric", f"{p.get('metric_label') or p.get('metric')} ({p.get('metric')})"),
        ("Level", f"{level_text}, direction {p.get('direction')}"),
        ("Recent", recent_text),
        ("Guidance", guidance_text),
        ("Started", started),
        ("Agreement", agreement),
        *((_method_label(e), _evidence_text(e)) for e in evidence),
    ]
    if case_mix:
        lines.append(("Case mix", case_mix))
    lines.append(("Next step", " ".join(steps)))
    lines.append(("Where to look", f"{where} {note}".rstrip()))
    lines.append(alert_line)

    text = [sentence, "", f"Started: {started}"]
    if evidence:
        text.append("Evidence, oldest first:")
        text += [f"- {_method_label(e)}, {_evidence_text(e)}" for e in evidence]
    if case_mix:
        text.append(f"Case mix: {case_mix}.")
    text += ["", f"{link_text}: {where}" if is_url else f"Evidence page: {where}"]
    if note:
        text.append(note)
    text += ["", "Next step:", *steps, ""]
    text += [f"Recent:   {recent_text}", f"Guidance: {guidance_text}",
             f"Alert:    {alert_line[1]}"]  # fmt: skip

    colour = _BANNER_COLOURS.get(level, "#57606a")
    markup = [
        f"<p style='margin:0 0 8px;font-size:13px;font-weight:bold;color:{colour};"
        f"letter-spacing:.04em'>{_esc(level_text.upper())} &middot; {_esc(site)}</p>",
        f"<p style='margin:0 0 12px;font-size:17px'><strong>{_esc(sentence)}</strong></p>",
        f"<p style='margin:0 0 8px'><b>Started:</b> {_esc(started)}</p>",
    ]
    if evidence:
        items = "".join(f"<li style='margin-bottom:6px'><b>{_esc(_method_label(e))}</b>, "
                        f"{_esc(_evidence_text(e))}</li>" for e in evidence)  # fmt: skip
        markup.append(f"<p style='margin:0'><b>Evidence, oldest first:</b></p>"
                      f"<ul style='padding-left:20px;margin:4px 0 8px'>{items}</ul>")  # fmt: skip
    if case_mix:
        markup.append(f"<p style='margin:0 0 8px'><b>Case mix:</b> {_esc(case_mix)}.</p>")
    if is_url:
        markup.append(_link_html(where, link_text))
    else:
        markup.append(f"<p>Evidence page: <code style=\"{_CODE_STYLE}\">{_esc(where)}</code>"
                      f"<br><small>{_esc(note)}</small></p>")  # fmt: skip
    if p.get("next_step"):
        markup.append(f"<p><b>Next step:</b> {_esc(steps[0])}</p>")
    else:
        items = "".join(f"<li>{_esc(step.split('. ', 1)[1])}</li>" for step in steps)
        markup.append(f"<p style='margin:0'><b>Next step</b> (investigation pyramid):</p>"
                      f"<ol style='padding-left:20px;margin:4px 0 8px'>{items}</ol>")  # fmt: skip
    markup.append(_table_html([("Recent", recent_text), ("Guidance", guidance_text),
                               alert_line]))  # fmt: skip
    return _Body(_level_subject(p), lines, text, "".join(markup))


# -- sentinel events: death, paralysis, cord compression ------------------------------------


def _event_words(event: dict[str, Any]) -> str:
    """Return what happened in words (``death``, ``2 paralysis``); types only, no reference."""
    types = event.get("event_types") or {}
    parts = []
    for name, count in sorted(types.items()) if isinstance(types, dict) else ():
        word = str(name).replace("_", " ")
        parts.append(word if count == 1 else f"{_num(count)} x {word}")
    return " and ".join(parts) or "a sentinel event"


def _sentinel_events(p: dict[str, Any]) -> list[dict[str, Any]]:
    events = [e for e in (p.get("events") or []) if isinstance(e, dict)]
    if not events and p.get("signal_date"):  # alerts stored before the payload named them
        events = [{"date": p.get("signal_date"), "event_types": p.get("event_types") or {}}]
    return events


def _sentinel_body(p: dict[str, Any], alert_line: tuple[str, str]) -> _Body:
    """Return the body of a sentinel alert: what happened and when, the guidance, how long
    the site stays at alarm and the next step; no row without a value."""
    site = p.get("site_id")
    events = _sentinel_events(p)
    happened = "; ".join(f"{_event_words(e)} on {e.get('date')}" for e in events)
    first = _event_words(events[0]) if events else "a sentinel event"
    guidance = p.get("guidance") or {}
    cite = guidance.get("citation") or p.get("citation")
    guidance_text = None
    if guidance.get("text") or cite:
        guidance_text = ", ".join(str(x) for x in (cite, guidance.get("text")) if x)
        guidance_text += ": every such event is reviewed, whatever the site's rate"
    until = p.get("alarm_until")
    count = len(events)
    sentence = (f"{site} reported {happened or 'a sentinel event'}"
                + (f": {site} is at alarm until {until} (a sentinel event holds the alarm "
                   f"{p.get('hold_days') or 365} days)" if until else "")
                + ".")  # fmt: skip
    step = str(p.get("next_step") or "Review the case with the clinical team.")
    where, note, is_url = _where(p, f"kyphowatch site {site}")
    profile = (f"{p['profile_name']} {p.get('profile_version') or ''}".rstrip()
               if p.get("profile_name") else None)
    lines: list[tuple[str, str]] = [("Summary", sentence), ("Site", str(site))]
    if happened:
        lines.append(("Event" + ("s" if count != 1 else ""), happened))
    if until:
        lines.append(("Alarm until", str(until)))
    if guidance_text:
        lines.append(("Guidance", guidance_text))
    if profile:
        lines.append(("Profile", profile))
    lines += [("Next step", step), ("Where to look", f"{where} {note}".rstrip()), alert_line]

    text = [sentence, ""]
    if guidance_text:
        text += [f"Guidance: {guidance_text}.", ""]
    text += ["Next step:", step, ""]
    text.append(f"Open the {site} evidence page: {where}" if is_url else f"Evidence page: {where}")
    if note:
        text.append(note)
    text += ["", f"Alert:    {alert_line[1]}"]

    markup = [
        "<p style='margin:0 0 8px;font-size:13px;font-weight:bold;color:#b42318;"
        f"letter-spacing:.04em'>SENTINEL EVENT &middot; {_esc(site)}</p>",
        f"<p style='margin:0 0 12px;font-size:17px'><strong>{_esc(sentence)}</strong></p>",
    ]
    if guidance_text:
        markup.append(f"<p style='margin:0 0 8px'><b>Guidance:</b> {_esc(guidance_text)}.</p>")
    markup.append(f"<p><b>Next step:</b> {_esc(step)}</p>")
    if is_url:
        markup.append(_link_html(where, f"Open the {site} evidence page"))
    else:
        markup.append(f"<p>Evidence page: <code style=\"{_CODE_STYLE}\">{_esc(where)}</code>"
                      f"<br><small>{_esc(note)}</small></p>")  # fmt: skip
    markup.append(_table_html([row for row in lines if row[0] not in ("Summary", "Next step",
                                                                      "Where to look")]))
    when = events[0].get("date") if events else None
    subject = (f"{SUBJECT_PREFIX} SENTINEL {site}: {first}" + (f" on {when}" if when else "")
               + (f" and {count - 1} more" if count > 1 else ""))
    if cite:
        subject += f" ({str(cite).removeprefix('NICE ')})"
    return _Body(subject, lines, text, "".join(markup))


# -- type "digest": the weekly watch list or the first-run (backfill) summary --------------


def _digest_item(item: dict[str, Any]) -> tuple[str, str]:
    """Return one digest item as (``site metric``, a short line in words)."""
    level = str(item.get("level") or "watch")
    state = {"alarm": "ALARM"}.get(level, _LEVEL_WORDS.get(level, level.replace("_", " ")))
    dates = f" since {item.get('since')}" if item.get("since") else ""
    if item.get("until"):
        dates += f" until {item['until']}"
    words = [f"{state}{dates}"]
    expected = _range(item.get("guidance"))
    if _float(item.get("rate")) is not None:
        # the level's recent figure with its counts and span, as the level e-mail words it
        rate = _rate_phrase({"recent": item["recent"]}) if item.get("recent") else None
        words.append((rate or _pct(item["rate"])) + (f" against {expected}" if expected else ""))
    if _float(item.get("agree")) is not None:
        agree = _float(item["agree"])
        words.append(f"{_words(agree)} method{'s' if agree != 1 else ''}")
    if item.get("reason"):
        words.append(str(item["reason"]))
    label = item.get("metric_label") or item.get("metric")
    site = item.get("site_id")
    return f"{site} {item.get('metric')}", f"{site} {label}: {'; '.join(words)}"


def _digest_sentence(p: dict[str, Any], items: list[dict[str, Any]]) -> str:
    as_of = p.get("as_of")
    if p.get("digest") == "backfill":
        still_open = sum(1 for i in items if not i.get("until"))
        count = len(items)
        return (f"First run over past data as of {as_of}: {count} past "
                f"episode{'s' if count != 1 else ''} found, summarised here instead of one "
                f"e-mail each; {_words(still_open)} still open.")  # fmt: skip
    levels: dict[str, int] = {}
    for item in items:
        level = str(item.get("level") or "watch")
        levels[level] = levels.get(level, 0) + 1
    order = sorted(levels, key=lambda lv: (lv != "alarm", lv != "under_reporting", lv))
    parts = ", ".join(f"{_words(levels[lv])} {_LEVEL_WORDS.get(lv, lv.replace('_', ' '))}"
                      for lv in order)  # fmt: skip
    week = f" ({p['period']})" if p.get("period") else ""
    count = len(items)
    head = f"Watch list as of {as_of}{week}: {count} site-metric{'s' if count != 1 else ''}"
    return f"{head} to keep an eye on" + (f" ({parts})." if parts else ".")


def _digest_subject(p: dict[str, Any], count: int) -> str:
    if p.get("digest") == "backfill":
        watch = _folded_watch(p)
        if watch:
            n = len(watch["items"])
            return (f"{SUBJECT_PREFIX} backfill summary: {count} past "
                    f"episode{'s' if count != 1 else ''}; watch list {watch.get('period')}: "
                    f"{n} site-metric{'s' if n != 1 else ''}")  # fmt: skip
        return (f"{SUBJECT_PREFIX} backfill summary: {count} past "
                f"episode{'s' if count != 1 else ''} (not e-mailed one by one)")  # fmt: skip
    period = p.get("period") or p.get("as_of")
    return (f"{SUBJECT_PREFIX} weekly watch list {period}: {count} "
            f"site-metric{'s' if count != 1 else ''}")  # fmt: skip


def _folded_watch(p: dict[str, Any]) -> dict[str, Any] | None:
    """Return the watch list a history summary carries (a first sync's one e-mail), if any."""
    watch = p.get("watch") if p.get("digest") == "backfill" else None
    if not isinstance(watch, dict):
        return None
    items = [i for i in (watch.get("items") or []) if isinstance(i, dict)]
    return {**watch, "items": items} if items else None


def _digest_section(items: list[dict[str, Any]], heading: str | None
                    ) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Return one digest list (at most ``DIGEST_CAP`` items) as (lines, text, HTML parts)."""
    shown = [_digest_item(i) for i in items[:DIGEST_CAP]]
    more = len(items) - len(shown)
    lines = ([("Section", heading)] if heading else []) + shown
    text = ([heading] if heading else []) + [f"- {line}" for _, line in shown]
    rows = "".join(f"<li style='margin-bottom:4px'>{_esc(line)}</li>" for _, line in shown)
    markup = ([f"<p style='margin:12px 0 4px;font-size:15px'><strong>{_esc(heading)}"
               f"</strong></p>"] if heading else [])  # fmt: skip
    markup.append(f"<ul style='padding-left:20px;margin:0 0 8px;font-size:14px'>{rows}</ul>")
    if more:
        lines.append(("More", f"and {more} more"))
        text.append(f"and {more} more (see the report)")
        markup.append(f"<p>and {more} more (see the report)</p>")
    return lines, text, markup


def _digest_body(p: dict[str, Any], alert_line: tuple[str, str]) -> _Body:
    """Return the body of a digest: one summary sentence, one line per item, then a link.

    A history summary that carries the week's watch list (``watch``) lists the sites at
    watch first (what is happening now), then the past episodes.
    """
    items = [i for i in (p.get("items") or []) if isinstance(i, dict)]
    sentence = _digest_sentence(p, items)
    watch = _folded_watch(p)
    sections: list[tuple[list[dict[str, Any]], str | None]] = [(items, None)]
    if watch:
        n = len(watch["items"])
        sentence += (f" At watch now ({watch.get('period')}): {_words(n)} "
                     f"site-metric{'s' if n != 1 else ''}, listed first.")  # fmt: skip
        sections = [(watch["items"], f"At watch now ({watch.get('period')})"),
                    (items, "Past episodes")]
    where, note, is_url = _where(p, "kyphowatch report")

    lines: list[tuple[str, str]] = [("Summary", sentence)]
    text = [sentence, ""]
    markup = [f"<p style='margin:0 0 12px;font-size:17px'><strong>{_esc(sentence)}</strong></p>"]
    for section_items, heading in sections:
        section_lines, section_text, section_markup = _digest_section(section_items, heading)
        lines += section_lines
        text += section_text
        markup += section_markup
    lines.append(("Where to look", f"{where} {note}".rstrip()))
    lines.append(alert_line)

    text += ["", f"Open the report: {where}" if is_url else f"Report: {where}"]
    if note:
        text.append(note)
    text += ["", f"Alert: {alert_line[1]}"]

    if is_url:
        markup.append(_link_html(where, "Open the report"))
    else:
        markup.append(f"<p>Report: <code style=\"{_CODE_STYLE}\">{_esc(where)}</code>"
                      f"<br><small>{_esc(note)}</small></p>")  # fmt: skip
    markup.append(f"<p style='font-size:13px'>Alert: {_esc(alert_line[1])}</p>")
    return _Body(_digest_subject(p, len(items)), lines, text, "".join(markup))


# -- public API ----------------------------------------------------------------------------


def render(alert_row: dict[str, Any], *, synthetic: bool = False) -> Message:
    """Render an ``alert`` row (payload as stored JSON or dict) into a :class:`Message`.

    ``synthetic`` (demo mode) marks the message as coming from synthetic data.
    """
    payload = alert_row["payload"]
    if isinstance(payload, str):
        payload = json.loads(payload)
    kind = alert_row["kind"]
    title = alert_row["title"]
    alert_id = alert_row["alert_id"]
    short_id = alert_id[:12]
    alert_line = ("Alert", f"{short_id} (episode {alert_row.get('episode', 1)}, {kind})")
    kind_of_payload = payload.get("type")
    if kind_of_payload == "level":
        body = _level_body(payload, alert_line)
    elif kind_of_payload == "sentinel" or (kind_of_payload == "signal"
                                           and payload.get("method") == "sentinel"):
        body = _sentinel_body(payload, alert_line)
    elif kind_of_payload == "digest":
        body = _digest_body(payload, alert_line)
    else:
        body = _table_body(payload, title, kind, alert_line)
    footer_text, footer_html = _footer(short_id, synthetic)
    return Message(
        alert_id=alert_id,
        kind=kind,
        title=title,
        subject=_one_line(body.subject),
        lines=body.lines,
        text="\n".join([*body.text, *footer_text]) + "\n",
        html=_page(body.html + footer_html),
        payload=payload,
    )


def webhook_body(message: Message, message_id: str) -> dict[str, Any]:
    """Return the JSON body for a Slack/Teams-style webhook: ``text`` plus structured fields."""
    return {
        "id": message_id,
        "alert_id": message.alert_id,
        "kind": message.kind,
        "title": message.title,
        "text": f"*{message.subject}*\n" + "\n".join(f"{k}: {v}" for k, v in message.lines),
        "fields": [{"title": name, "value": value} for name, value in message.lines],
        "payload": message.payload,
    }
