"""Status rules of the overview grid, table-driven on tiny hand-made monitor results."""

from __future__ import annotations

from datetime import date, timedelta
from types import SimpleNamespace

import pytest

from pipelines import evidence

AS_OF = date(2024, 6, 30)
PROFILE = SimpleNamespace(design=SimpleNamespace(funnel_rolling_days=365))


def _signal(category, signal_date, ongoing=False, method="bernoulli_cusum", last=None):
    detail = {"ongoing": ongoing} if ongoing else {}
    if last:
        detail["last_flagged"] = last.isoformat()
    return {"site_id": "S001", "metric": "cement_leak", "category": category,
            "method": method, "signal_date": signal_date, "detail": detail}


OUTCOME = {"kind": "outcome", "n": 120, "window_days": 30}


@pytest.mark.parametrize(("row", "signals", "status"), [
    (OUTCOME, [], "in_control"),
    (OUTCOME, [_signal("safety", date(2024, 5, 1))], "signal"),
    (OUTCOME, [_signal("process", date(2024, 5, 1))], "signal"),
    (OUTCOME, [_signal("under_reporting", date(2024, 5, 1))], "under_reporting"),
    # safety outranks under-reporting when both are recent
    (OUTCOME, [_signal("under_reporting", date(2024, 6, 1)),
               _signal("safety", date(2023, 9, 1))], "signal"),
    # older than the 365-day window: history, not a current flag ...
    (OUTCOME, [_signal("safety", date(2023, 7, 1))], "in_control"),  # as_of - 365 days
    (OUTCOME, [_signal("safety", date(2023, 7, 2))], "signal"),
    # ... unless the episode is still ongoing at as_of (funnel, rare-event tests)
    (OUTCOME, [_signal("safety", date(2022, 1, 31), ongoing=True, method="funnel_12m")],
     "signal"),
    # a long p-chart or funnel episode: first flagged years ago, last flagged recently
    (OUTCOME, [_signal("safety", date(2022, 3, 31), method="pchart",
                       last=date(2024, 3, 31))], "signal"),
    (OUTCOME, [_signal("safety", date(2022, 3, 31), method="pchart",
                       last=date(2023, 3, 31))], "in_control"),
    # detail as stored in the signal table: a JSON string
    (OUTCOME, [dict(_signal("safety", date(2021, 1, 31), method="funnel_12m"),
                    detail='{"last_flagged": "2024-05-31", "ongoing": false}')], "signal"),
    ({"kind": "outcome", "n": 0, "window_days": 365}, [], "immature"),
    # a sentinel metric has no denominator and is never immature
    ({"kind": "sentinel"}, [], "in_control"),
])
def test_metric_status(row, signals, status):
    assert evidence.metric_status(row, signals, AS_OF, 365)[0] == status


def _result(statuses: dict[str, list[str]]):
    """A monitor result whose sites have the given per-metric states.

    Every site also has a sentinel and a process metric, as with the HTG108 profile; those
    are never immature.
    """
    metrics, signals = [], []
    for site, states in statuses.items():
        for kind in ("sentinel", "process"):
            metrics.append({"site_id": site, "metric": kind, "kind": kind, "n": 10,
                            "baseline": 0.0})
        for i, state in enumerate(states):
            metric = f"m{i}"
            metrics.append({"site_id": site, "metric": metric, "kind": "outcome",
                            "n": 0 if state == "immature" else 50, "window_days": 30,
                            "baseline": 0.1})
            if state in ("safety", "under_reporting"):
                signals.append({"site_id": site, "metric": metric, "category": state,
                                "method": "bernoulli_cusum", "signal_date": AS_OF})
    return SimpleNamespace(as_of=AS_OF, site_metrics=metrics, signals=signals)


def test_site_status_is_the_most_severe_metric_but_immature_only_when_nothing_is_mature():
    result = _result({
        "S001": ["immature", "ok"],
        "S002": ["immature", "immature"],
        "S003": ["ok", "safety", "under_reporting"],
        "S004": ["under_reporting", "immature"],
    })
    rows = {r["site_id"]: r for r in evidence.sites_payload(result, PROFILE,
                                                            evidence.SiteFacts())}
    assert {s: r["status"] for s, r in rows.items()} == {
        "S001": "in_control", "S002": "immature", "S003": "signal", "S004": "under_reporting"}
    assert [s for s, r in rows.items() if r["flagged"]] == ["S003", "S004"]


def test_engine_pchart_episodes_say_when_they_were_last_flagged(sqlite_url, settings_for):
    from pipelines.db import make_engine
    from pipelines.surveillance.engine import evaluate
    from tests.test_engine import build_sites

    build_sites(make_engine(sqlite_url), sites=3, per_site=600, leak={"S003": 0.4}, seed=8)
    result = evaluate(settings_for(sqlite_url))
    episodes = [s for s in result.signals if s["method"] == "pchart" and s["site_id"] == "S003"]
    assert episodes
    for s in episodes:
        detail = evidence._detail(s)
        last = date.fromisoformat(detail["last_flagged"])
        assert s["signal_date"] <= last <= result.as_of
        after = last + timedelta(days=1)
        assert after.day == 1 and after.month in (1, 4, 7, 10)  # the end of a quarter
    newest = max(episodes, key=lambda s: s["signal_date"])
    assert evidence._detail(newest)["ongoing"] is True  # the site leaks to the end
