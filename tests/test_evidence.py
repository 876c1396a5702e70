"""How metric levels combine into a site's status; the level rules are in test_levels.py."""

from __future__ import annotations

from datetime import date, timedelta
from types import SimpleNamespace

from pipelines import evidence

AS_OF = date(2024, 6, 30)
PROFILE = SimpleNamespace(design=SimpleNamespace(funnel_rolling_days=365, hold_days=365),
                          metrics=())
LEVEL_OF = {"safety": "alarm", "watch": "watch", "under_reporting": "under_reporting",
            "immature": "immature", "ok": "in_control"}


def _result(statuses: dict[str, list[str]]):
    """A monitor result whose sites have the given per-metric states.

    Every site also has a sentinel and a process metric, as with the HTG108 profile; those
    are never immature.
    """
    metrics, signals = [], []
    for site, states in statuses.items():
        for kind in ("sentinel", "process"):
            metrics.append({"site_id": site, "metric": kind, "kind": kind, "n": 10,
                            "baseline": 0.0, "level": {"level": "in_control", "reason": "-"}})
        for i, state in enumerate(states):
            metric = f"m{i}"
            metrics.append({"site_id": site, "metric": metric, "kind": "outcome",
                            "n": 0 if state == "immature" else 50, "window_days": 30,
                            "baseline": 0.1,
                            "level": {"level": LEVEL_OF[state], "reason": state}})
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
        "S005": ["watch", "under_reporting"],
    })
    rows = {r["site_id"]: r for r in evidence.sites_payload(result, PROFILE,
                                                            evidence.SiteFacts())}
    assert {s: r["status"] for s, r in rows.items()} == {
        "S001": "in_control", "S002": "immature", "S003": "alarm", "S004": "under_reporting",
        "S005": "watch"}
    assert [s for s, r in rows.items() if r["flagged"]] == ["S003", "S004", "S005"]


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


def test_the_recent_interval_kernel_is_the_beta_quantile_bit_for_bit():
    # recent_observed_expected uses scipy.special.betaincinv (a light import) for the
    # Clopper-Pearson limits; it must equal stats.beta.ppf exactly, so the report's figures
    # match the engine's exact_interval to the last bit.
    import numpy as np
    from scipy import special, stats

    rng = np.random.default_rng(11)
    n = rng.integers(1, 5000, 20_000).astype(float)
    k = np.floor(rng.random(20_000) * n)
    low, high = k > 0, k < n
    assert np.array_equal(special.betaincinv(k[low], n[low] - k[low] + 1, 0.025),
                          stats.beta.ppf(0.025, k[low], n[low] - k[low] + 1))
    assert np.array_equal(special.betaincinv(k[high] + 1, n[high] - k[high], 0.975),
                          stats.beta.ppf(0.975, k[high] + 1, n[high] - k[high]))
