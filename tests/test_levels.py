"""Graded evidence (levels.grade), recency and the guidance-range rule, table-driven."""

from __future__ import annotations

import json
from datetime import date, timedelta

import pytest

from pipelines.settings import load_settings
from pipelines.surveillance import levels
from pipelines.surveillance.profile import load_profile

AS_OF = date(2024, 6, 30)
PROFILE = load_profile(load_settings({"KYPHOWATCH_DEMO": "1"}).profile_path)
LEAK = PROFILE.metric("cement_leak")
FRACTURE = PROFILE.metric("new_fracture")
SENTINEL = PROFILE.metric("sentinel_event")
SITE = {"site_id": "S001", "n": 300,
        "funnel": {"rolling": {"n": 200, "events": 42}}}


def sig(method, day, *, role=None, direction="up", detectable=None, last=None, ongoing=False,
        p=None, key=None, statistic=5.0, threshold=4.0):
    """Return one signal row as the engine builds it (detail as JSON text)."""
    detail = {}
    if role:
        detail["role"] = role
    if detectable:
        detail["detectable_on"] = detectable.isoformat()
    if last:
        detail["last_flagged"] = last.isoformat()
    if ongoing:
        detail["ongoing"] = True
    if method.startswith("funnel"):
        detail.update(rate=0.21, limit_rate=0.16)
    return {"signal_key": key or f"{method}-{day}-{role}-{direction}", "site_id": "S001",
            "metric": "cement_leak", "method": method, "direction": direction,
            "episode_start": day - timedelta(days=60), "signal_date": day,
            "observed": 20.0, "expected": 9.0, "n": 100, "statistic": statistic,
            "threshold": threshold, "p_value": p, "detail": json.dumps(detail)}


RECENT = AS_OF - timedelta(days=30)
OLD = AS_OF - timedelta(days=400)


@pytest.mark.parametrize(("site", "signals", "level"), [
    (SITE, [], "in_control"),
    ({"site_id": "S001", "n": 0}, [], "immature"),
    # the alarm chart (per-site budget threshold) crossed recently: alarm
    (SITE, [sig("ra_cusum", RECENT, role="alarm", detectable=RECENT)], "alarm"),
    # ... but not once the hold (365 days) has passed
    (SITE, [sig("ra_cusum", OLD, role="alarm", detectable=OLD)], "in_control"),
    # the same chart at its watch threshold: watch, never alarm
    (SITE, [sig("ra_cusum_watch", RECENT, role="watch", detectable=RECENT)], "watch"),
    # two corroborating methods are not enough (they read the same data); three are a watch
    (SITE, [sig("bernoulli_cusum", RECENT, role="corroborating", detectable=RECENT),
            sig("funnel_12m", RECENT, role="corroborating", ongoing=True, p=1e-4)],
     "in_control"),
    (SITE, [sig("bernoulli_cusum", RECENT, role="corroborating", detectable=RECENT),
            sig("funnel_12m", RECENT, role="corroborating", ongoing=True, p=1e-4),
            sig("pchart", RECENT, role="corroborating", p=1e-3)], "watch"),
    # a watch lasts 90 days after its crossing, an alarm 365
    (SITE, [sig("ra_cusum_watch", AS_OF - timedelta(days=120), role="watch",
                detectable=AS_OF - timedelta(days=120))], "in_control"),
    # a downward alarm chart: under-reporting (data quality)
    (SITE, [sig("bernoulli_cusum", RECENT, role="alarm", direction="down",
                detectable=RECENT)], "under_reporting"),
    # alarm outranks watch and under-reporting
    (SITE, [sig("ra_cusum", RECENT, role="alarm", detectable=RECENT),
            sig("ra_cusum_watch", RECENT, role="watch", detectable=RECENT),
            sig("bernoulli_cusum", RECENT, role="alarm", direction="down",
                detectable=RECENT)], "alarm"),
    # rows written before levels existed carry no role: every method was an alarm then
    (SITE, [sig("pchart", RECENT)], "alarm"),
    # a long funnel episode still ongoing at as_of counts as current evidence
    (SITE, [sig("funnel_12m", OLD, role="corroborating", ongoing=True, p=1e-3),
            sig("funnel_cumulative", OLD, role="corroborating", last=RECENT, p=1e-3),
            sig("bernoulli_cusum", RECENT, role="corroborating", detectable=RECENT)],
     "watch"),
])
def test_level_rules(site, signals, level):
    assert levels.grade(LEAK, site, signals, AS_OF, PROFILE.design)["level"] == level


def test_a_sentinel_event_is_an_alarm_by_rule_for_a_year():
    event = dict(sig("sentinel", RECENT), metric="sentinel_event", detail="{}")
    assert levels.grade(SENTINEL, {"site_id": "S001"}, [event], AS_OF,
                        PROFILE.design)["level"] == "alarm"
    old = dict(event, signal_date=OLD)
    assert levels.grade(SENTINEL, {"site_id": "S001"}, [old], AS_OF,
                        PROFILE.design)["level"] == "in_control"


def test_recency_is_when_a_new_fracture_signal_became_detectable_not_its_index_date():
    # A CUSUM on the 365-day proportion crosses at a patient treated 14 months ago; the
    # crossing became detectable when that patient's year closed, two months ago.
    index_day = AS_OF - timedelta(days=425)
    crossing = sig("bernoulli_cusum", index_day, role="alarm",
                   detectable=index_day + timedelta(days=365))
    graded = levels.grade(FRACTURE, SITE, [crossing], AS_OF, PROFILE.design)
    assert graded["level"] == "alarm"
    assert graded["since"] == (index_day + timedelta(days=365)).isoformat()
    # A p-chart quarter of new fractures is known only a window after the quarter ends.
    quarter_end = date(2023, 3, 31)
    pchart = sig("pchart", quarter_end, role="alarm")
    assert levels.detectable_on(pchart, FRACTURE.window_days) == date(2024, 3, 30)
    assert levels.grade(FRACTURE, SITE, [pchart], AS_OF, PROFILE.design)["level"] == "alarm"
    # The time-to-event chart signals on the event's own day.
    tte = sig("tte_cusum", RECENT, role="alarm", detectable=RECENT)
    assert levels.detectable_on(tte, FRACTURE.window_days) == RECENT


def test_crossings_within_the_hold_are_one_episode_and_later_ones_a_new_one():
    first = AS_OF - timedelta(days=900)
    crossings = [sig("ra_cusum", d, role="alarm", detectable=d, key=str(d)) for d in (
        first, first + timedelta(days=200), first + timedelta(days=800))]
    episodes = levels.episodes(crossings, AS_OF, 365, 30)
    assert [(e["start"], len(e["signals"])) for e in episodes] == [
        (first, 2), (first + timedelta(days=800), 1)]
    assert episodes[0]["end"] == first + timedelta(days=200 + 365)
    assert episodes[1]["end"] is None  # still current at as_of


def test_evidence_lists_every_method_once_oldest_first_with_statistics_in_one_unit():
    early = AS_OF - timedelta(days=200)
    signals = [
        sig("funnel_12m", RECENT, role="corroborating", ongoing=True, p=1e-12),
        sig("ra_cusum", early, role="alarm", detectable=early, key="a"),
        sig("ra_cusum", RECENT, role="alarm", detectable=RECENT, key="b"),
        sig("ra_cusum_watch", RECENT - timedelta(days=10), role="watch",
            detectable=RECENT - timedelta(days=10)),
        sig("bernoulli_cusum", early, role="corroborating", detectable=early),  # too old
    ]
    graded = levels.grade(LEAK, SITE, signals, AS_OF, PROFILE.design)
    assert graded["level"] == "alarm"
    assert graded["since"] == early.isoformat()  # the first crossing of the episode
    methods = [e["method"] for e in graded["evidence"]]
    assert methods == ["ra_cusum", "ra_cusum_watch", "funnel_12m"]
    assert graded["evidence"][0]["signal_key"] == "a"  # the earliest crossing, not the newest
    funnel = graded["evidence"][2]
    assert funnel["statistic_is_rate"] and (funnel["statistic"], funnel["threshold"]) == (
        0.21, 0.16)  # a rate against a rate, not a z-score against a proportion
    assert graded["agree"] == 2  # the watch and alarm thresholds are one method
    assert graded["strongest"]["p_value"] == 1e-12
    assert graded["recent"]["rate"] == pytest.approx(0.21)  # the rolling funnel's, no months
    by_months = levels.grade(LEAK, SITE, signals, AS_OF, PROFILE.design, (17, 4))
    assert (by_months["recent"]["n"], by_months["recent"]["events"],
            by_months["recent"]["months"]) == (17, 4, 12)
    assert by_months["recent"]["rate"] == pytest.approx(4 / 17)
    assert graded["guidance"]["high"] == 0.11 and "2.4.1" in graded["guidance"]["citation"]
    assert "investigation pyramid" in graded["next_step"]
    assert "since " + early.isoformat() in graded["reason"]


@pytest.mark.parametrize(("metric_id", "direction", "reference"), [
    ("cement_leak", "up", 0.11),  # HTG108 2.4.1: 7-11%
    ("cement_leak", "down", 0.07),
    ("new_fracture", "up", 0.23),  # 2.4.2: 18-23%
    ("major_event", "up", 0.000825),  # 2.4.4: 33 per 40,000
    ("symptomatic_cement_leak", "up", 1 / 360),  # a point baseline: no range
])
def test_charts_test_against_the_edge_of_the_guidance_range(metric_id, direction, reference):
    assert PROFILE.metric(metric_id).reference(direction) == pytest.approx(reference)
