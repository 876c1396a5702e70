"""From the false-alarm budget to thresholds: derivation rules, and a check by simulation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipelines.settings import load_settings
from pipelines.surveillance import budget, cusum, survival
from pipelines.surveillance.arl import arl_markov
from pipelines.surveillance.profile import load_profile

PROFILE = load_profile(load_settings({"KYPHOWATCH_DEMO": "1"}).profile_path)


def test_each_chart_spends_its_share_of_the_network_budget():
    leak = PROFILE.metric("cement_leak")
    fracture = PROFILE.metric("new_fracture")
    total = PROFILE.design.budget.safety_per_100_site_years / 100
    assert budget.chart_rate(PROFILE, leak, "up") == pytest.approx(total * leak.alarm.share)
    assert budget.chart_rate(PROFILE, fracture, "up") == pytest.approx(
        total * fracture.alarm.share)
    shares = sum(m.alarm.share for m in PROFILE.metrics if m.alarm)
    assert shares <= 1.0  # the alarm charts together never exceed the stated budget
    # one downward chart in htg108 (cement leak): it gets the whole under-reporting budget
    assert budget.chart_rate(PROFILE, leak, "down") == pytest.approx(
        PROFILE.design.budget.under_reporting_per_100_site_years / 100)
    assert budget.chart_rate(PROFILE, leak, "up", "watch") == (
        PROFILE.design.budget.watch_per_site_year)


@pytest.mark.parametrize("volume", [50, 100, 200, 400])
def test_a_larger_site_gets_a_higher_threshold_and_the_same_false_alarms_a_year(volume):
    rate = budget.chart_rate(PROFILE, PROFILE.metric("cement_leak"), "up")
    arl0 = budget.arl0_for(volume, rate)
    h = budget.bernoulli_threshold(0.11, 2.0, arl0, "up")
    attained = arl_markov(0.11, 0.11, 2.0, h)
    # false alarms a year at the top of the range: volume / ARL0, as budgeted (within 2 %)
    assert volume / attained == pytest.approx(rate, rel=0.02)
    smaller = budget.bernoulli_threshold(0.11, 2.0, budget.arl0_for(volume / 2, rate), "up")
    assert smaller < h


def test_threshold_curve_matches_bisection_of_the_markov_chain():
    from pipelines.surveillance.arl import threshold_for_arl

    for arl0 in (2_000, 20_000, 80_000):
        assert budget.bernoulli_threshold(0.11, 2.0, arl0, "up") == pytest.approx(
            threshold_for_arl(0.11, 2.0, arl0, "up"), abs=0.02)


@pytest.mark.parametrize("mu", [0.01, 0.05, 0.12])
def test_time_to_event_threshold_reaches_its_arl0_on_the_markov_chain(mu):
    arl0_days = 365.25 / 0.0135
    h = budget.poisson_threshold(mu, 2.0, arl0_days)
    assert budget.poisson_cusum_arl(mu, 2.0, h) == pytest.approx(arl0_days, rel=0.05)


def test_reference_hazard_integrates_to_the_top_of_the_range():
    rng = np.random.default_rng(3)
    n = 5000
    index = rng.integers(0, 365, n)
    event = rng.random(n) < 0.2
    onset = 10 + np.floor(355 * rng.beta(1.0, 2.5, n)).astype(int)
    end = np.where(event, index + onset + 1, index + 365)
    hazard = survival.reference_hazard(index, end, event, 365, 0.23)
    widths = np.diff(np.r_[np.arange(0, 365, survival.BIN_DAYS), 365])
    assert float((hazard * widths).sum()) == pytest.approx(-math.log(1 - 0.23))
    assert hazard[0] > hazard[-1]  # the shape follows the data: fractures come early


@pytest.mark.slow
def test_per_site_thresholds_give_the_budgeted_false_alarm_rate_by_simulation():
    """Simulate in-control sites at the top of the range and count false crossings a year.

    200 sites of 200 procedures a year for 20 years, Bernoulli at p = 0.11: the budget for
    the leak chart is 1.35 false alarms per 100 site-years, so about 54 are expected.
    """
    rng = np.random.default_rng(20261129)
    sites, per_year, years = 200, 200, 20
    rate = budget.chart_rate(PROFILE, PROFILE.metric("cement_leak"), "up")
    h = budget.bernoulli_threshold(0.11, 2.0, budget.arl0_for(per_year, rate), "up")
    n = per_year * years
    group = np.repeat(np.arange(sites), n)
    y = (rng.random(sites * n) < 0.11).astype(np.int8)
    result = cusum.grouped_cusum(group, y, np.full(sites * n, 0.11), 2.0, h, n_groups=sites)
    alarms = int(result.signal.sum())
    expected = rate * sites * years
    # Poisson-ish count: within 4 standard deviations of what the budget allows
    assert abs(alarms - expected) < 4 * math.sqrt(expected) + 2, (alarms, expected)


@pytest.mark.slow
def test_time_to_event_threshold_by_simulation_of_daily_counts():
    """Daily Poisson counts at the reference hazard: false crossings a year match the budget."""
    rng = np.random.default_rng(7)
    mu, theta, sites, days = 0.12, 2.0, 300, 365 * 20
    rate = 0.0135 * 4  # four times the leak share, so the test sees enough crossings
    h = budget.poisson_threshold(mu, theta, 365.25 / rate)
    observed = rng.poisson(mu, size=(sites, days)).astype(float)
    result = survival.tte_cusum(np.full((sites, days), mu), observed, theta,
                                np.full(sites, h))
    alarms = int(result.signal.sum())
    expected = rate * sites * days / 365.25
    assert abs(alarms - expected) < 4 * math.sqrt(expected) + 2, (alarms, expected)


def test_documented_threshold_tables_are_the_engines():
    """docs/statistics.md carries the tables the engine's functions give for the profile."""
    from pipelines.surveillance.threshold_tables import markdown

    documented = (Path(__file__).resolve().parents[1] / "docs" / "statistics.md").read_text(
        encoding="utf-8")
    for row in markdown(PROFILE).splitlines():
        if row:
            assert row in documented, f"docs/statistics.md is missing or differs: {row}"


def test_budget_spent_at_baseline_lowers_the_threshold_and_keeps_arl0_at_the_pooled_rate():
    """The pooled-rate design: ARL0 holds at 0.106 while the chart tests against 0.11."""
    from pipelines.surveillance.arl import arl_markov

    edge = budget.bernoulli_threshold(0.11, 2.0, 15000, "up")
    pooled = budget.bernoulli_threshold(0.11, 2.0, 15000, "up", 0.106)
    assert pooled < edge
    assert arl_markov(0.106, 0.11, 2.0, pooled, "up") == pytest.approx(15000, rel=0.02)
    # At the top of the range the same threshold false-alarms more often, by a bounded factor.
    assert 1.4 < 15000 / arl_markov(0.11, 0.11, 2.0, pooled, "up") < 2.0
