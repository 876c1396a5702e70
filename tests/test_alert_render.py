"""Alert messages as a safety lead reads them: subject, opening sentence, evidence, link, footer.

Rendering is pure, so these tests build payloads by hand (aggregates only, as the alert
rules store them) and read the text, HTML and webhook body that come out.
"""

from __future__ import annotations

import copy
import json
import re

import pytest

from pipelines.alerts.render import (
    DIGEST_CAP,
    DISCLAIMER,
    SUBJECT_PREFIX,
    SYNTHETIC_NOTE,
    render,
    webhook_body,
)

ALERT_ID = "abcdef0123456789abcdef"
SHORT_ID = ALERT_ID[:12]
URL = "https://reports.example.org/kyphowatch/report/latest/sites/S012.html"

EVIDENCE = [  # deliberately not in date order: the renderer sorts oldest first
    {"method": "funnel", "method_label": "Funnel (last 12 months)",
     "detectable_on": "2026-01-05", "episode_start": "2025-11-01",
     "statistic": 3.802, "threshold": 3.09, "statistic_label": "z-score",
     "statistic_is_rate": False, "observed": 50, "expected": 22.2, "n": 210, "p_value": 1e-12},
    {"method": "bernoulli_cusum", "method_label": "Bernoulli CUSUM",
     "detectable_on": "2025-10-17", "episode_start": "2025-06-02",
     "statistic": 7.1, "threshold": 5.7, "statistic_label": "CUSUM statistic",
     "statistic_is_rate": False, "observed": 30, "expected": 14.2, "n": 120, "p_value": None},
    {"method": "pchart", "method_label": "P-chart (quarterly)",
     "detectable_on": "2026-04-01", "episode_start": "2026-01-01",
     "statistic": 0.25, "threshold": 0.1317, "statistic_label": "quarterly rate",
     "statistic_is_rate": True, "observed": 15, "expected": 6.3, "n": 60, "p_value": 0.003},
]  # fmt: skip

LEVEL = {
    "type": "level",
    "site_id": "S012",
    "metric": "cement_leak",
    "metric_label": "Cement leakage (any)",
    "direction": "up",
    "level": "alarm",
    "since": "2025-10-17",
    "as_of": "2026-10-31",
    "recent": {"window_days": 365, "n": 210, "events": 50, "rate": 0.238,
               "ci_low": 0.18, "ci_high": 0.30},  # fmt: skip
    "guidance": {"low": 0.07, "high": 0.11, "baseline": 0.1056, "citation": "NICE HTG108 2.4.1"},
    "agree": 4,
    "methods_total": 5,
    "strongest": {"method_label": "funnel (last 12 months)", "p_value": 1e-12},
    "evidence": EVIDENCE,
    "case_mix": "explains little",
    "next_step": None,
    "where": URL,
    "where_is_url": True,
    "profile_name": "htg108",
    "profile_version": "1.1.0",
    "signal_keys": ["k1", "k2", "k3"],
}


def _row(payload, kind="safety", title="Alarm at S012: cement_leak"):
    return {"alert_id": ALERT_ID, "kind": kind, "title": title, "payload": payload, "episode": 1}


def _level(**changes):
    payload = copy.deepcopy(LEVEL)
    payload.update(changes)
    return payload


# -- level alarm ----------------------------------------------------------------------------


def test_level_alarm_subject_names_site_metric_level_and_numbers():
    subject = render(_row(LEVEL)).subject
    assert subject.startswith(SUBJECT_PREFIX)
    for word in ("ALARM", "S012", "cement leakage", "24%", "7-11%", "HTG108 2.4.1"):
        assert word in subject, word
    assert len(subject) <= 80  # fits a phone's notification line


def test_level_alarm_opens_with_one_plain_sentence():
    first = render(_row(LEVEL)).text.splitlines()[0]
    assert first.startswith("Cement leakage")
    for part in ("S012", "24%", "last 12 months", "NICE HTG108 2.4.1", "alarm since 2025-10-17",
                 "four of five methods agree", "p = 1e-12"):  # fmt: skip
        assert part in first, part
    assert "7–11%" in first or "7-11%" in first
    assert first.endswith(".") and first.count(". ") == 0  # one sentence


def test_level_alarm_lists_every_method_once_oldest_first():
    message = render(_row(LEVEL))
    text = message.text
    for e in EVIDENCE:
        assert text.count(e["method_label"]) == 1, e["method_label"]
    # the earliest evidence is there (the old renderer dropped the first signal)
    assert "2025-10-17" in text and "Bernoulli CUSUM" in text
    positions = [text.index(label) for label in
                 ("Bernoulli CUSUM", "Funnel (last 12 months)", "P-chart (quarterly)")]  # fmt: skip
    assert positions == sorted(positions)
    assert "Started: 2025-10-17" in text
    # the structured lines (webhook fields) carry one entry per method too
    labels = [name for name, _ in message.lines]
    assert [lb for lb in labels if lb in {e["method_label"] for e in EVIDENCE}] == [
        "Bernoulli CUSUM", "Funnel (last 12 months)", "P-chart (quarterly)"]


@pytest.mark.parametrize(
    ("label", "expected", "forbidden"),
    [
        ("Bernoulli CUSUM", "CUSUM statistic 7.1 above its threshold 5.7", None),
        ("Funnel (last 12 months)", "z-score 3.8 above its threshold 3.09", "%"),
        ("P-chart (quarterly)", "quarterly rate 25% above its limit 13%", "0.1317"),
    ],
)
def test_level_evidence_puts_each_statistic_next_to_its_own_threshold(label, expected, forbidden):
    text = render(_row(LEVEL)).text
    line = next(x for x in text.splitlines() if x.startswith(f"- {label}"))
    assert expected in line
    assert "against threshold" not in line
    if forbidden == "%":  # a z-score is never shown against a proportion
        statistic_part = line.split(": ", 1)[1].split(";")[0]
        assert "%" not in statistic_part
    elif forbidden:
        assert forbidden not in line


def test_level_evidence_shows_counts_against_expected():
    text = render(_row(LEVEL)).text
    assert "30 of 120 (25%) against 14.2 expected" in text
    assert "p = 0.003" in text


@pytest.mark.parametrize("synthetic", [False, True])
def test_level_footer_in_text_and_html(synthetic):
    message = render(_row(LEVEL), synthetic=synthetic)
    for part in (message.text, message.html):
        assert DISCLAIMER in part
        assert f"kyphowatch alerts ack {SHORT_ID}" in part
        assert f"kyphowatch alerts resolve {SHORT_ID}" in part
        assert (SYNTHETIC_NOTE in part) is synthetic


def test_level_link_is_clickable_when_a_url():
    message = render(_row(LEVEL))
    assert f'<a href="{URL}"' in message.html
    assert re.search(r"<a href=[^>]*>Open the S012 evidence page</a>", message.html)
    assert URL in message.text
    assert "KYPHOWATCH_REPORT_BASE_URL" not in message.text


def test_level_path_gets_a_note_instead_of_a_link():
    path = "/var/reports/latest/sites/S012.html"
    message = render(_row(_level(where=path, where_is_url=False)))
    assert "<a href" not in message.html
    for part in (message.text, message.html):
        assert path in part
        assert "KYPHOWATCH_REPORT_BASE_URL" in part
        assert "kyphowatch site S012" in part


def test_level_escapes_payload_in_html():
    evil = "S<b>1</b>&"
    message = render(_row(_level(site_id=evil, where=f"https://h/r?site={evil}")))
    assert evil not in message.html
    assert "S&lt;b&gt;1&lt;/b&gt;&amp;" in message.html
    assert "<b>1</b>" not in message.html
    assert "\n" not in message.subject


def test_level_next_step_given_or_pyramid():
    given = render(_row(_level(next_step="Check the data first: is the extract complete?")))
    assert "Check the data first: is the extract complete?" in given.text
    assert "Structure:" not in given.text
    default = render(_row(LEVEL)).text
    steps = ["1. Data:", "2. Case mix:", "3. Structure:", "4. Process:", "5. People:"]
    positions = [default.index(step) for step in steps]
    assert positions == sorted(positions)


def test_the_recent_rate_names_its_index_months():
    payload = _level(recent={"months": 12, "n": 17, "events": 4, "rate": 4 / 17})
    message = render(_row(payload))
    assert "24% (4 of 17) in the last 12 months" in message.text


def test_under_reporting_subject_and_point_baseline():
    payload = _level(level="under_reporting", direction="down",
                     recent={"window_days": 365, "n": 400, "events": 0, "rate": 0.0},
                     guidance={"low": None, "high": None, "baseline": 0.00066,
                               "citation": "NICE HTG108 2.4.3"})  # fmt: skip
    message = render(_row(payload, kind="data_quality"))
    assert message.subject.startswith(f"{SUBJECT_PREFIX} data quality: S012 cement leakage below")
    first = message.text.splitlines()[0]
    assert "against 0.066% in NICE HTG108 2.4.3" in first
    assert "under-reporting since 2025-10-17" in first
    assert "1. Data: are complications recorded" in message.text


def test_level_with_missing_numbers_still_renders():
    payload = _level(recent=None, guidance={"low": None, "high": None, "baseline": None},
                     strongest=None, evidence=[], agree=None, methods_total=None,
                     case_mix=None, where=None, where_is_url=False)  # fmt: skip
    message = render(_row(payload))
    first = message.text.splitlines()[0]
    assert "S012" in first and "alarm since 2025-10-17" in first
    assert "n/a" not in first
    json.dumps(webhook_body(message, "<m@x>"))


# -- numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "shown"),
    [(0.238, "24%"), (0.031, "3.1%"), (0.0008, "0.08%"), (0.00066, "0.066%"), (0.1056, "11%")],
)
def test_rates_keep_enough_figures(rate, shown):
    payload = _level(recent={"window_days": 365, "rate": rate},
                     guidance={"low": None, "high": None, "baseline": 0.00066,
                               "citation": "NICE HTG108 2.4.3"})  # fmt: skip
    first = render(_row(payload)).text.splitlines()[0]
    assert f"S012: {shown} in the last 12 months" in first
    assert "against 0.066%" in first
    assert " 0% " not in first and "against 0%" not in first


# -- old "signal" payloads --------------------------------------------------------------------


def _signal(method, episode_start, signal_date, observed, key):
    return {"signal_key": key, "site_id": "S003", "metric": "cement_leak", "method": method,
            "direction": "up", "category": "safety", "episode_start": episode_start,
            "signal_date": signal_date, "observed": observed, "expected": 0.105, "n": 120,
            "ci_low": 0.15, "ci_high": 0.28, "statistic": 5.3, "threshold": 4.5,
            "p_value": 0.0004, "baseline": 0.1056, "citation": "NICE HTG108 2.4.1",
            "profile_name": "htg108", "profile_version": "1.0.0"}  # fmt: skip


def test_signal_lists_every_signal_once_and_since_is_earliest():
    signals = [  # ordered as the alert rules store them: by episode start, then method
        _signal("bernoulli_cusum", "2024-01-01", "2024-03-31", 0.211, "k-old"),
        _signal("funnel", "2024-02-01", "2024-04-30", 0.222, "k-mid"),
        _signal("pchart", "2024-03-01", "2024-06-30", 0.233, "k-new"),
    ]
    headline = signals[2]  # the newest signal is the headline
    payload = {"type": "signal", **headline, "methods": ["bernoulli_cusum", "funnel", "pchart"],
               "signal_keys": ["k-mid", "k-new", "k-old"], "signals": signals,
               "where": "https://reports.example.org/latest/sites/S003.html"}  # fmt: skip
    message = render(_row(payload, title="Safety signal at S003: cement_leak above expected"))
    text = message.text
    for method, observed in (("bernoulli_cusum", "0.211"), ("funnel", "0.222"), ("pchart", "0.233")):
        assert text.count(f"{method}: observed {observed}") == 1, method
    assert dict(message.lines)["Since"].startswith("2024-01-01")
    also = [value for name, value in message.lines if name == "Also"]
    assert [a.split(":")[0] for a in also] == ["bernoulli_cusum", "funnel"]  # oldest first
    assert '<a href="https://reports.example.org/latest/sites/S003.html">' in message.html


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"type": "rejected_file", "file_name": "procedures_1.csv", "reason": "bad header",
          "checksum": "c1", "processed_at": "2024-02-01", "where": "/r/latest/index.html"},
         "bad header"),
        ({"type": "quarantine_share", "file_name": "p.csv", "rows_quarantined": 30,
          "rows_read": 100, "share": 0.3, "threshold": 0.1,
          "quarantine_reasons": {"bad_date": 30}, "checksum": "c2", "where": "/r"},
         "30 of 100 rows (30.0%; threshold 10%)"),
        ({"type": "silent_site", "site_id": "S009", "last_procedure_date": "2024-01-01",
          "days_silent": 60, "as_of": "2024-03-01", "silent_days_threshold": 45, "where": "/r"},
         "60 days before 2024-03-01"),
    ],
)  # fmt: skip
def test_older_types_keep_their_lines_and_gain_the_footer_in_html(payload, expected):
    message = render(_row(payload, kind="data_quality", title="Something"), synthetic=True)
    assert message.subject == f"{SUBJECT_PREFIX} data quality: Something"
    assert expected in message.text
    for part in (message.text, message.html):
        assert DISCLAIMER in part and SYNTHETIC_NOTE in part
        assert f"alerts ack {SHORT_ID}" in part and f"alerts resolve {SHORT_ID}" in part


# -- digests ----------------------------------------------------------------------------------


def _items(count, *, level="watch", until=None):
    return [{"site_id": f"S{i:03d}", "metric": "new_fracture",
             "metric_label": "New vertebral fracture within a year (per patient)",
             "level": level, "since": "2025-01-10", "until": until, "rate": 0.29,
             "guidance": {"low": 0.07, "high": 0.11, "citation": "NICE HTG108 2.4.2"},
             "agree": 2, "reason": "CUSUM rising"} for i in range(1, count + 1)]  # fmt: skip


@pytest.mark.parametrize(
    ("digest", "period", "count", "subject"),
    [
        ("watch", "2026-W44", 5, "[kyphowatch] weekly watch list 2026-W44: 5 site-metrics"),
        ("backfill", None, 38,
         "[kyphowatch] backfill summary: 38 past episodes (not e-mailed one by one)"),
        ("watch", "2026-W45", DIGEST_CAP + 7,
         f"[kyphowatch] weekly watch list 2026-W45: {DIGEST_CAP + 7} site-metrics"),
    ],
)  # fmt: skip
def test_digest_lists_items_up_to_the_cap(digest, period, count, subject):
    until = "2025-06-30" if digest == "backfill" else None
    payload = {"type": "digest", "digest": digest, "as_of": "2026-10-31", "period": period,
               "items": _items(count, until=until), "where": "https://h/report/latest/index.html",
               "where_is_url": True}  # fmt: skip
    message = render(_row(payload, kind="safety", title="digest"))
    assert message.subject == subject
    text = message.text
    listed = [x for x in text.splitlines() if x.startswith("- S")]
    assert len(listed) == min(count, DIGEST_CAP)
    assert listed[0].startswith("- S001 New vertebral fracture within a year (per patient): ")
    assert "since 2025-01-10" in listed[0] and "29% against 7–11%" in listed[0]
    if digest == "backfill":
        assert "until 2025-06-30" in listed[0]
    more = count - DIGEST_CAP
    assert (f"and {more} more" in text) is (more > 0)
    assert (f"and {more} more" in message.html) is (more > 0)
    assert text.splitlines()[0].endswith(".")
    assert '<a href="https://h/report/latest/index.html"' in message.html
    for part in (text, message.html):
        assert DISCLAIMER in part
        assert f"alerts ack {SHORT_ID}" in part and f"alerts resolve {SHORT_ID}" in part


# -- webhook ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        LEVEL,
        {"type": "digest", "digest": "watch", "as_of": "2026-10-31", "period": "2026-W44",
         "items": _items(3), "where": "/r/latest/index.html", "where_is_url": False},
        {"type": "silent_site", "site_id": "S009", "last_procedure_date": "2024-01-01",
         "days_silent": 60, "as_of": "2024-03-01", "silent_days_threshold": 45, "where": "/r"},
    ],
)  # fmt: skip
def test_webhook_body_for_every_type(payload):
    message = render(_row(json.dumps(payload)))  # payload as stored JSON text
    body = webhook_body(message, "<id@kyphowatch>")
    json.dumps(body)
    assert body["id"] == "<id@kyphowatch>" and body["alert_id"] == ALERT_ID
    assert body["text"].startswith(f"*{message.subject}*\n")
    assert [f["title"] for f in body["fields"]] == [name for name, _ in message.lines]
    assert any(f["title"] == "Alert" and SHORT_ID in f["value"] for f in body["fields"])


def test_a_history_summary_carrying_the_watch_list_lists_both_each_capped():
    """A first sync's one summary e-mail: the sites at watch first, then the past episodes,
    each list capped on its own."""
    watch_items = _items(DIGEST_CAP + 3)
    past = _items(4, until="2025-06-30")
    payload = {"type": "digest", "digest": "backfill", "as_of": "2026-10-31", "period": None,
               "items": past, "watch": {"period": "2026-W44", "as_of": "2026-10-31",
                                        "items": watch_items},
               "where": "https://h/report/latest/index.html", "where_is_url": True}
    message = render(_row(payload, kind="safety", title="digest"))
    assert message.subject == ("[kyphowatch] backfill summary: 4 past episodes; "
                               f"watch list 2026-W44: {DIGEST_CAP + 3} site-metrics")
    text = message.text.splitlines()
    assert "At watch now (2026-W44)" in text[0]
    heads = [text.index("At watch now (2026-W44)"), text.index("Past episodes")]
    listed = [i for i, line in enumerate(text) if line.startswith("- S")]
    assert len(listed) == DIGEST_CAP + 4
    assert heads[0] < listed[0] and listed[DIGEST_CAP - 1] < heads[1] < listed[DIGEST_CAP]
    assert "and 3 more (see the report)" in text[heads[0]:heads[1]]
    assert all("until 2025-06-30" in text[i] for i in listed[DIGEST_CAP:])
    assert message.html.index("At watch now") < message.html.index("Past episodes")
    assert ("Section", "Past episodes") in message.lines
