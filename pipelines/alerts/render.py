"""The words of an alert: e-mail subject, plain text, HTML and the webhook JSON body.

Everything here is built from the alert's stored payload, which holds aggregate figures,
file names and codes only: no patient, operator or hash value ever reaches a message.
Rendering is pure (no database, no network) so it can be tested and reused.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Any

SUBJECT_PREFIX = "[kyphowatch]"


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


def _number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


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
    return [
        ("Site", str(p.get("site_id"))),
        ("Metric", str(p.get("metric"))),
        ("Method", f"{p.get('method')} (direction: {p.get('direction')})"),
        ("Observed", f"{_number(p.get('observed'))} against expected "
                     f"{_number(p.get('expected'))}{n}"),  # fmt: skip
        ("Interval", interval),
        ("Statistic", test),
        ("Baseline", f"{_number(p.get('baseline'))}, {p.get('citation')} "
                     f"(profile {p.get('profile_name')} {p.get('profile_version')})"),  # fmt: skip
        ("Since", f"{p.get('episode_start')} (episode start)"),
        ("Signal date", str(p.get("signal_date"))),
        *_other_signals(p),
    ]


def _other_signals(p: dict[str, Any]) -> list[tuple[str, str]]:
    """Return one line per further method / episode flagging the same site and metric."""
    lines = []
    for other in (p.get("signals") or [])[1:]:
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


_LINES = {
    "signal": _signal_lines,
    "rejected_file": _rejected_lines,
    "quarantine_share": _quarantine_lines,
    "silent_site": _silent_lines,
}


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
    lines = _LINES.get(payload.get("type"), lambda p: [])(payload)
    lines.append(("Where to look", str(payload.get("where"))))
    lines.append(("Alert", f"{alert_id[:12]} (episode {alert_row.get('episode', 1)}, {kind})"))
    label = "safety" if kind == "safety" else "data quality"
    subject = f"{SUBJECT_PREFIX} {label}: {title}"
    width = max(len(label) for label, _ in lines) + 2
    text_lines = [title, "", *(f"{(name + ':').ljust(width)} {value}" for name, value in lines)]
    text_lines += [
        "",
        f"Acknowledge: kyphowatch alerts ack {alert_id[:12]} --by NAME --reason TEXT",
        f"Resolve:     kyphowatch alerts resolve {alert_id[:12]} --by NAME --reason TEXT",
        "",
        ("Synthetic data (demo). " if synthetic else "")
        + "Control-chart signals are screening results for review, not a finding.",
    ]
    rows = "".join(
        f"<tr><th align='left'>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>"
        for name, value in lines
    )
    html_body = (
        "<html><body>"
        f"<h2>{html.escape(title)}</h2>"
        f"<table cellpadding='4'>{rows}</table>"
        f"<p>Acknowledge: <code>kyphowatch alerts ack {alert_id[:12]} --by NAME --reason TEXT"
        "</code></p>"
        "</body></html>"
    )
    return Message(
        alert_id=alert_id,
        kind=kind,
        title=title,
        subject=subject,
        lines=lines,
        text="\n".join(text_lines) + "\n",
        html=html_body,
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
