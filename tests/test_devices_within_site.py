"""Products are compared within sites: a site's drift is not a product's (docs/statistics.md 9).

Each case is a small synthetic registry (cement leak, the CUSUM metric, and major events, the
rare one) with the simulator's product rule: a site's main balloon and the next one for a
share of its procedures. The network-wide comparison (the 1.4.0 code) blamed the balloon a
drifting site uses most; the within-site one must not, must still find a balloon that is
worse at every site that uses it, and must find no evidence for a balloon used alone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.settings import REPO_DIR
from pipelines.surveillance.beyond import parse_beyond_site
from pipelines.surveillance.devices import conditional_rare_pvalue, product_charts
from pipelines.surveillance.profile import load_profile

AS_OF_DAY = 19_700
BALLOONS = ("BAL-A", "BAL-B", "BAL-C")
EMPTY = pd.DataFrame(columns=["balloon_product", "cement_product"])


def _units(seed: int, *, site_or: float = 1.0, product_or: float = 1.0, lone: bool = False,
           base: float = 0.1) -> pd.DataFrame:
    """Six sites over two years; site S001 drifts by ``site_or`` for the whole period, BAL-A
    (S001's main balloon) is worse by ``product_or`` everywhere; ``lone`` adds S007, where
    BAL-A is the only balloon and leaks at twice the odds."""
    rng = np.random.default_rng(seed)
    frames = []
    for site in range(7 if lone else 6):
        n = 1500
        day = np.sort(rng.integers(AS_OF_DAY - 730, AS_OF_DAY + 1, n))
        balloon = (site + (rng.random(n) < 0.3)) % 3 if site < 6 else np.zeros(n, int)
        risk = 1 / (1 + np.exp(-(np.log(base / (1 - base)) + rng.normal(0, 0.5, n))))
        odds = risk / (1 - risk)
        odds *= np.where(balloon == 0, product_or, 1.0)
        odds *= site_or if site == 0 else (2.0 if site == 6 else 1.0)
        y = (rng.random(n) < odds / (1 + odds)).astype(np.int64)
        frames.append(pd.DataFrame({
            "site_id": f"S{site + 1:03d}", "index_day": day, "y": y, "risk": risk,
            "balloon_product": np.asarray(BALLOONS, dtype=object)[balloon],
            "cement_product": None, "cement_lot": None}))
    return pd.concat(frames, ignore_index=True)


def _rows(units: pd.DataFrame, metric: str) -> dict[str, dict]:
    profile = load_profile(REPO_DIR / "profiles" / "htg108.yaml")
    devices = parse_beyond_site(profile).devices
    rows = product_charts({metric: units}, profile, devices.__class__(
        **{**devices.__dict__, "metrics": (metric,)}), EMPTY, AS_OF_DAY, count_signals=True)
    return {row["product"]: row for row in rows if row["kind"] == "balloon"}


# (case, registry, BAL-A signals?) on cement leak (the CUSUM)
LEAK_CASES = [
    # S001 (BAL-A's main site: about 1,050 of its 2,300 cases) at leak odds 2.5, no product
    # effect: the network comparison signalled BAL-A
    ("site_drift_is_not_the_product", dict(site_or=2.5), False),
    # BAL-A at odds 2.5 at every site that uses it: still found within sites
    ("product_effect_within_sites", dict(product_or=2.5), True),
]


@pytest.mark.parametrize("case", LEAK_CASES, ids=[c[0] for c in LEAK_CASES])
def test_leak_chart_signals_the_product_only_for_a_product_effect(case):
    _, registry, signals = case
    for seed in range(3):
        row = _rows(_units(seed, **registry), "cement_leak")["BAL-A"]
        assert (row["signals"] > 0) is signals, (seed, row)


# (case, registry, metric) for a balloon used alone at its only site
LONE_CASES = [("leak", "cement_leak", 0.1), ("major", "major_event", 0.01)]


@pytest.mark.parametrize("case", LONE_CASES, ids=[c[0] for c in LONE_CASES])
def test_a_product_used_alone_at_a_site_has_no_evidence_there(case):
    _, metric, base = case
    units = _units(4, lone=True, base=base)
    # BAL-A only at S007, where it is the only balloon (and S007 runs at twice the odds)
    units = units.loc[(units["site_id"] == "S007") | (units["balloon_product"] != "BAL-A")]
    row = _rows(units, metric)["BAL-A"]
    assert row["procedures"] == 0 and row["events"] == 0 and row["expected"] == 0
    assert row["signal_date"] is None
    assert row["statistic"] == (1.0 if metric == "major_event" else 0.0)


def test_site_stratified_rare_test_ignores_a_site_level():
    """Major events: the product's site runs at four times the rate of the others' sites."""
    as_of = 1000
    # site X: the product's 200 cases with 12 events, another product's 50 with 3 (the same
    # rate); site Y: the other product's 800 cases with 8 events
    day = np.full(200, as_of - 10)
    y = np.r_[np.ones(12), np.zeros(188)].astype(np.int64)
    other_day = np.full(850, as_of - 10)
    other_y = np.r_[np.ones(3), np.zeros(47), np.ones(8), np.zeros(792)].astype(np.int64)
    other_site = np.r_[np.full(50, "X"), np.full(800, "Y")]
    risk, other_risk = np.full(200, 0.01), np.full(850, 0.01)
    pooled = conditional_rare_pvalue(day, y, risk, other_day, other_y, other_risk, as_of)
    within = conditional_rare_pvalue(day, y, risk, other_day, other_y, other_risk, as_of,
                                     np.full(200, "X"), other_site)
    assert pooled[2] < 1e-3  # 12 of 23 events against a fifth of the risk: blamed
    assert within[0] == 12 and within[1] == pytest.approx(15 * 0.8)
    assert within[2] > 0.3  # 12 of site X's 15 events against four fifths of its risk


def test_leak_chart_counts_only_events_of_shared_site_quarters():
    """Two sites: at S001 both balloons, at S002 BAL-A alone with every case a leak."""
    day = np.r_[np.full(40, AS_OF_DAY - 30), np.full(40, AS_OF_DAY - 30)]
    units = pd.DataFrame({
        "site_id": ["S001"] * 40 + ["S002"] * 40, "index_day": day,
        "y": np.r_[np.tile([1, 0, 0, 0], 10), np.ones(40)].astype(np.int64),
        "risk": np.full(80, 0.2),
        "balloon_product": ["BAL-A"] * 30 + ["BAL-B"] * 10 + ["BAL-A"] * 40,
        "cement_product": None, "cement_lot": None})
    row = _rows(units, "cement_leak")["BAL-A"]
    # S001's 10 events, BAL-A's share of its risk 30/40: 7.5 expected, BAL-A had 8 of them
    assert (row["procedures"], row["events"]) == (30, 8)
    assert row["expected"] == pytest.approx(7.5)
