"""Detection benchmark: designed vs simulated ARL0 and the delay to detect a doubling of the odds.

Why: the thresholds are solved from a false-alarm target, so the first thing to show is that
the simulated in-control run length matches the design (within 10 %). The second is what the
chart buys: the delay, in procedures and in days for a site doing 200 procedures a year, to
detect a sustained odds ratio of 2 that starts after one in-control year -- compared with a
quarterly exact p-chart tuned to the same false-alarm rate. For the major-complication metric
(33 / 50,000) the CUSUM is powerless and the table says why, then reports the rare-event rules.

Run: ``.venv/bin/python benchmarks/bench_detection.py`` (about a minute; exits 0).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.surveillance.arl import (  # noqa: E402
    arl0_for_false_alarm_probability,
    arl_markov,
    arl_simulate,
    threshold_for_arl,
)
from pipelines.surveillance.cusum import alternative_probability, grouped_cusum  # noqa: E402
from pipelines.surveillance.pchart import matched_critical_count  # noqa: E402
from pipelines.surveillance.rare import MAJOR_EVENT_RATE, critical_event_count  # noqa: E402

VOLUME_PER_YEAR = 200
CASES_PER_QUARTER = VOLUME_PER_YEAR // 4
DAYS_PER_CASE = 365.0 / VOLUME_PER_YEAR
BURN_IN = VOLUME_PER_YEAR  # the shift starts after one in-control year
SHIFT = 2.0
SEED = 20240601

def profile_rate(metric_id: str) -> float:
    """Return a metric's baseline rate (events / total) from the HTG108 guidance profile."""
    profile = yaml.safe_load((REPO / "profiles" / "htg108.yaml").read_text())
    baseline = next(m for m in profile["metrics"] if m["id"] == metric_id)["baseline"]
    return baseline["events"] / baseline["total"]


METRICS = [
    # (label, p0 from the profile, odds ratio of the chart, true odds ratio of the shift)
    ("cement_leak (up)", profile_rate("cement_leak"), 2.0, 2.0),
    ("cement_leak (down: under-reporting)", profile_rate("cement_leak"), 0.5, 0.5),
    ("symptomatic_cement_leak", profile_rate("symptomatic_cement_leak"), 2.0, 2.0),
    ("new_fracture", profile_rate("new_fracture"), 2.0, 2.0),
    ("major_event", MAJOR_EVENT_RATE, 2.0, 2.0),
]


def design_arl0() -> float:
    """Return ARL0 from the guidance profile (derived there from a site-year false-alarm target)."""
    profile = yaml.safe_load((REPO / "profiles" / "htg108.yaml").read_text())
    return float(profile["design"]["arl0"])


def steady_state_delay(p0, chart_or, true_or, h, runs, seed):
    """Simulate sites in control for one year then shifted; return delays of runs with no false alarm."""
    p1 = float(alternative_probability(p0, true_or))
    arl1 = arl_markov(p1, p0, chart_or, h)
    length = BURN_IN + int(8 * arl1) + 50
    rng = np.random.default_rng(seed)
    position = np.tile(np.arange(length), runs)
    risk = np.where(position < BURN_IN, p0, p1)
    y = (rng.random(runs * length) < risk).astype(np.int8)
    group = np.repeat(np.arange(runs), length)
    result = grouped_cusum(group, y, p0, chart_or, h, n_groups=runs)
    first = result.summary.first_signal
    signalled_at = np.where(first >= 0, first - group[np.maximum(first, 0)] * length, length)
    clean = signalled_at >= BURN_IN  # no false alarm before the change
    delays = signalled_at[clean] - BURN_IN + 1
    censored = int(np.sum(signalled_at[clean] >= length))
    return delays, arl1, censored, float(np.mean(~clean))


def pchart_delay(p0, true_or, arl0):
    """Exact expected delay of a quarterly p-chart (change aligned with a quarter start)."""
    design = matched_critical_count(p0, CASES_PER_QUARTER, arl0)
    p1 = float(alternative_probability(p0, true_or))
    if true_or > 1:
        power = stats.binom.sf(design.critical_count - 1, CASES_PER_QUARTER, p1)
    else:  # lower p-chart: mirror design on the lower tail
        counts = np.arange(0, CASES_PER_QUARTER + 1)
        attained = stats.binom.cdf(counts, CASES_PER_QUARTER, p0)
        arl = CASES_PER_QUARTER / np.where(attained > 0, attained, np.nan)
        best = int(np.nanargmin(np.abs(np.log(arl / arl0))))
        power = stats.binom.cdf(best, CASES_PER_QUARTER, p1)
        return CASES_PER_QUARTER / power, float(arl[best]), best
    return CASES_PER_QUARTER / power, design.arl0_cases, design.critical_count


def rare_rule_delays(p, alpha, runs, seed):
    """Years until a rolling 365-day window holds the critical count, simulated event by event."""
    c = int(critical_event_count(VOLUME_PER_YEAR, MAJOR_EVENT_RATE, alpha))
    rate = VOLUME_PER_YEAR * p  # events per year
    rng = np.random.default_rng(seed)
    n_events = 4000
    times = np.cumsum(rng.exponential(1.0 / rate, size=(runs, n_events)), axis=1)
    span = times[:, c - 1 :] - times[:, : -(c - 1)]
    hit = span <= 1.0
    found = hit.any(axis=1)
    first = np.argmax(hit, axis=1)
    years = times[np.arange(runs), first + c - 1]
    return c, years[found], int((~found).sum())


def main() -> int:
    started = time.perf_counter()
    arl0 = design_arl0()
    print("kyphowatch detection benchmark")
    print(
        f"design ARL0 = {arl0:.0f} procedures (profile; {arl0_for_false_alarm_probability(0.05, 100):.0f}"
        " from P(false alarm per site-year) = 0.05 at 100 procedures/year)"
    )
    print(
        f"site volume {VOLUME_PER_YEAR}/year; shift OR {SHIFT} starts after {BURN_IN} in-control"
        " procedures; delays exclude runs with a false alarm before the change\n"
    )
    header = (
        f"{'metric':36} {'p0':>8} {'h':>6} {'ARL0 markov':>11} {'ARL0 sim':>13} {'dev':>6} "
        f"{'ARL1(0)':>8} {'CUSUM delay':>12} {'days':>7} {'p-chart delay':>13} {'days':>7} "
        f"{'p-chart ARL0':>12} {'CUSUM delay @ p-chart ARL0':>26}"
    )
    print(header)
    print("-" * len(header))
    notes = []
    for index, (label, p0, chart_or, true_or) in enumerate(METRICS):
        h = threshold_for_arl(p0, chart_or, arl0)
        markov0 = arl_markov(p0, p0, chart_or, h)
        sim0 = arl_simulate(p0, p0, chart_or, h, n_runs=4000, seed=SEED + index)
        deviation = sim0.arl / arl0 - 1.0
        runs = 1500 if p0 > 0.01 else 600
        delays, arl1, censored, false_share = steady_state_delay(
            p0, chart_or, true_or, h, runs, SEED + 100 + index
        )
        mean_delay = float(np.mean(delays))
        se = float(np.std(delays, ddof=1) / np.sqrt(delays.size))
        pc_delay, pc_arl0, pc_count = pchart_delay(p0, true_or, arl0)
        # Discreteness stops the p-chart hitting ARL0 exactly, so also run the CUSUM at the
        # p-chart's attained ARL0: the like-for-like comparison.
        h_matched = threshold_for_arl(p0, chart_or, pc_arl0)
        matched_delays, _, _, _ = steady_state_delay(
            p0, chart_or, true_or, h_matched, runs, SEED + 200 + index
        )
        print(
            f"{label:36} {p0:8.5f} {h:6.3f} {markov0:11.0f} {sim0.arl:7.0f}±{sim0.standard_error:<5.0f}"
            f" {deviation:+6.1%} {arl1:8.0f} {mean_delay:7.0f}±{se:<4.0f} {mean_delay * DAYS_PER_CASE:7.0f}"
            f" {pc_delay:13.0f} {pc_delay * DAYS_PER_CASE:7.0f} {pc_arl0:12.0f}"
            f" {np.mean(matched_delays):12.0f} (h {h_matched:.3f})"
        )
        if censored:
            notes.append(f"{label}: {censored} runs had not signalled by the end of the simulation")
        if abs(deviation) > 0.10:
            notes.append(
                f"{label}: simulated ARL0 is {deviation:+.0%} off the design because the statistic is"
                " discrete: see the major-event note below"
            )
        notes.append(
            f"{label}: p-chart signals when a quarter of {CASES_PER_QUARTER} has"
            f" {'>=' if true_or > 1 else '<='} {pc_count} events; "
            f"{false_share:.1%} of CUSUM runs false-alarmed during the in-control year"
        )
    print()
    for note in notes:
        print("  - " + note)

    print("\nmajor_event (33/50,000): why the CUSUM is powerless, and what is used instead")
    w_event = np.log(alternative_probability(MAJOR_EVENT_RATE, 2.0) / MAJOR_EVENT_RATE)
    print(
        f"  one event adds {w_event:.4f} to the CUSUM and each event-free procedure removes only"
        f" {np.log1p(MAJOR_EVENT_RATE):.5f}. ARL0 jumps from {1 / MAJOR_EVENT_RATE:.0f} (h just"
        " under one event: every event signals) to about 4,500 (two events within ~1,050"
        " procedures): no threshold gives 2,000. At the design ARL0 only"
        f" {arl0 * MAJOR_EVENT_RATE:.1f} events are expected in control, so a doubled risk"
        " cannot be told from chance for years at one site."
    )
    for alpha in (0.001,):
        c, years_in, cens_in = rare_rule_delays(MAJOR_EVENT_RATE, alpha, 2000, SEED + 7)
        _, years_out, cens_out = rare_rule_delays(
            float(alternative_probability(MAJOR_EVENT_RATE, 2.0)), alpha, 2000, SEED + 8
        )
        attained = stats.binom.sf(c - 1, VOLUME_PER_YEAR, MAJOR_EVENT_RATE)
        print(
            f"  exact one-sided binomial test, rolling 365 days, alpha {alpha}: signals at >= {c}"
            f" events in {VOLUME_PER_YEAR} procedures (attained size {attained:.5f});"
            f" mean years to signal: in control {np.mean(years_in):.0f}, at OR 2"
            f" {np.mean(years_out):.0f} (censored {cens_in + cens_out})"
        )
    network_n = 1000 * VOLUME_PER_YEAR
    c_net = int(critical_event_count(network_n, MAJOR_EVENT_RATE, 0.001))
    power = stats.binom.sf(
        c_net - 1, network_n, float(alternative_probability(MAJOR_EVENT_RATE, 2))
    )
    print(
        f"  network-wide (1,000 sites x {VOLUME_PER_YEAR}/year = {network_n:,} procedures/year):"
        f" signals at >= {c_net} events (expected {network_n * MAJOR_EVENT_RATE:.0f}); power"
        f" against OR 2 within one year {power:.4f}"
    )
    print(
        "  sentinel rule: every death, paralysis or cord compression signals at once (delay 0),"
        " independent of any rate."
    )
    print(f"\nruntime {time.perf_counter() - started:.1f} s")
    from benchmarks.beyond_site_scenarios import main as beyond_site_scenarios

    return beyond_site_scenarios()  # issue 12: operators and cement lots, PASS/MISS


if __name__ == "__main__":
    raise SystemExit(main())
