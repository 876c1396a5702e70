"""Operator and cement-lot scenarios of the detection benchmark (issue 12).

Called by ``bench_detection.py``; prints PASS or MISS against the issue's targets:

1. a new operator whose cement-leak odds ratio is 3 for their first 30 procedures is alarmed
   within a median of 25 procedures (the engine's FIR risk-adjusted CUSUM, ``fir_cusum``, at
   the threshold the engine derives for that operator's volume);
2. a cement lot with a leak odds ratio of 4, used at 5 sites, is found before the lot's
   60th procedure (the engine's exact lot test, ``lot_tests``, evaluated as the lot's
   procedures arrive, with the Bonferroni alpha of a network testing ``LOTS_TESTED`` lots);
3. false training-review alerts of in-control operators stay within the budget per
   operator-year (the cement-leak CUSUM's share: 3 per 100 x 0.45 = 0.0135).

Case mix: expected risks are drawn logit-normal around the guidance's pooled leak rate
(38/360) with a standard deviation of 0.5 on the logit scale (about the spread of the
simulator's case-mix model); the chart sees the true expected risk of each case.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd

from pipelines.settings import REPO_DIR
from pipelines.surveillance.beyond import (
    operator_threshold,
    parse_beyond_site,
    rate_per_unit_year,
)
from pipelines.surveillance.cusum import alternative_probability
from pipelines.surveillance.devices import lot_alpha, lot_tests
from pipelines.surveillance.operators import fir_cusum
from pipelines.surveillance.profile import load_profile
from pipelines.surveillance.rare import poisson_upper_pvalue

OPERATOR_VOLUME = 60  # procedures a year (the simulator's PROCEDURES_PER_OPERATOR_YEAR)
LEARNING_OR, LEARNING_CASES, TARGET_MEDIAN = 3.0, 30, 25
LOT_OR, LOT_SITES, LOT_TARGET = 4.0, 5, 60
# Lots tested at one evaluation in a 60-site network after 4 years: 3 cements x 48 months.
LOTS_TESTED = 144
SEED = 20261206


def _risks(rng: np.random.Generator, p: float, n) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(math.log(p / (1 - p)) + rng.normal(0.0, 0.5, n))))


def _learning_curve(profile, design, rng, runs: int = 2000) -> tuple[float, float, float]:
    metric = profile.metric(design.cusum_metric)
    p0 = metric.baseline.rate
    rate = rate_per_unit_year(profile, metric)
    h = operator_threshold(p0, design.odds_ratio, OPERATOR_VOLUME, rate, design.head_start)
    delays = []
    for _ in range(runs):
        risk = _risks(rng, p0, 400)
        truth = risk.copy()
        truth[:LEARNING_CASES] = alternative_probability(risk[:LEARNING_CASES], LEARNING_OR)
        y = (rng.random(risk.size) < truth).astype(np.int64)
        path = fir_cusum(y, risk, design.odds_ratio, h, design.head_start)
        delays.append(int(path.signals[0]) + 1 if len(path.signals) else math.inf)
    delays = np.asarray(delays, dtype=float)
    return h, float(np.median(delays)), float(np.mean(delays <= LEARNING_CASES))


def _false_training_alerts(profile, design, rng, operators: int = 4000, years: int = 5
                           ) -> tuple[float, float]:
    metric = profile.metric(design.cusum_metric)
    p0 = metric.baseline.rate
    rate = rate_per_unit_year(profile, metric)
    h = operator_threshold(p0, design.odds_ratio, OPERATOR_VOLUME, rate, design.head_start)
    alarms = 0
    for _ in range(operators):
        risk = _risks(rng, p0, OPERATOR_VOLUME * years)
        y = (rng.random(risk.size) < risk).astype(np.int64)
        alarms += len(fir_cusum(y, risk, design.odds_ratio, h, design.head_start).signals)
    return alarms / (operators * years), rate


def _lot_detection(profile, design, rng, runs: int = 1000) -> tuple[float, float]:
    p0 = profile.metric(design.lot_metric).baseline.rate
    found_at = []
    for _ in range(runs):
        risk = _risks(rng, p0, 200)
        y = (rng.random(risk.size) < alternative_probability(risk, LOT_OR)).astype(np.int64)
        site = rng.integers(0, LOT_SITES, risk.size).astype(str)
        events, expected = np.cumsum(y), np.cumsum(risk)
        # the lot's exact test after each of its procedures (a nightly run sees a lot's few
        # new procedures a day); alpha as in a network testing LOTS_TESTED lots
        alpha = lot_alpha(design.lot_false_alarms_per_year, LOTS_TESTED)
        p_values = poisson_upper_pvalue(events, expected)
        hit = np.flatnonzero((p_values <= alpha)
                             & (np.arange(1, risk.size + 1) >= design.lot_min_procedures))
        found = math.inf
        if hit.size:
            found = int(hit[0]) + 1
            # the engine's own test agrees at that procedure
            frame = pd.DataFrame({"product": "C", "lot": "L", "site_id": site[:found],
                                  "index_day": np.arange(found), "y": y[:found],
                                  "risk": risk[:found]})
            [row] = lot_tests(frame, design, found)
            assert math.isclose(row["p_value"], p_values[found - 1])
        found_at.append(found)
    return float(np.median(found_at)), lot_alpha(design.lot_false_alarms_per_year, LOTS_TESTED)


def main() -> int:
    """Print the three scenarios with PASS or MISS."""
    started = time.perf_counter()
    profile = load_profile(REPO_DIR / "profiles" / "htg108.yaml")
    beyond = parse_beyond_site(profile)
    assert beyond.operators is not None and beyond.devices is not None
    rng = np.random.default_rng(SEED)
    print("\noperators and cement lots (issue 12)")
    h, median, within = _learning_curve(profile, beyond.operators, rng)
    verdict = "PASS" if median <= TARGET_MEDIAN else "MISS"
    print(f"  new operator, leak OR {LEARNING_OR:g} for the first {LEARNING_CASES} procedures, "
          f"{OPERATOR_VOLUME}/year (h {h:.2f}, head start {beyond.operators.head_start:g} h): "
          f"median alarm at procedure {median:.0f} (target <= {TARGET_MEDIAN}) {verdict}; "
          f"{within:.0%} alarmed within the first {LEARNING_CASES}")
    false_rate, budget = _false_training_alerts(profile, beyond.operators, rng)
    verdict = "PASS" if false_rate <= budget * 1.1 else "MISS"
    print(f"  false training-review alerts per operator-year (in control, {OPERATOR_VOLUME}/year,"
          f" 20,000 operator-years): {false_rate:.4f} (budget {budget:.4f}, +10 % "
          f"simulation tolerance) {verdict}")
    median_lot, alpha = _lot_detection(profile, beyond.devices, rng)
    verdict = "PASS" if median_lot < LOT_TARGET else "MISS"
    print(f"  cement lot, leak OR {LOT_OR:g} at {LOT_SITES} sites (alpha {alpha:.1e} per lot, "
          f"{LOTS_TESTED} lots tested): median found at the lot's procedure {median_lot:.0f} "
          f"(target < {LOT_TARGET}) {verdict}")
    print(f"  runtime {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
