"""Devices and cement: each product against the others, lot clusters, device failures.

Products (DELTA-style, Resnic et al. 2010)
-----------------------------------------
For each product named in the procedures (``balloon_product`` or ``cement_product``) and each
metric of ``beyond_site.devices.metrics``, the expected risk of the product's cases is the
network's case-mix risk recalibrated to *the other products of the same kind* in the same
calendar quarter (:func:`concurrent`; one model per metric keeps a million-procedure run fast). Observed/expected (O/E) summarises it; the sequential test is the
risk-adjusted CUSUM on the product's cases in date order (alternative odds ratio
``odds_ratio``), charted like a site: it may spend ``safety_per_100_site_years / 100 x
alarm.share`` false device alerts per product-year, so ``ARL0 = the product's procedures a
year / that rate`` (Markov chain at the mean expected risk). Metrics whose site alarm is the
rare exact test (major events) get the rolling 365-day exact Poisson test instead, with the
same alpha as the site's rare chart for that share.

Cement lots
-----------
For each (cement product, lot) with at least ``lot_min_procedures`` cases, the lot's events
of ``lot_metric`` are compared with their case-mix expected count (the network model) by the
exact Poisson upper tail ``P(X >= observed)``; a lot used at several sites is one lot. The
network may spend ``lot_false_alarms_per_year`` false lot alerts a year: each monthly
evaluation spends a twelfth, split equally over the lots tested (Bonferroni), so
``alpha_lot = lot_false_alarms_per_year / 12 / lots tested``.

Device failures (``failure_event_types``: balloon rupture, other device failure) are counted
per product. Nothing here names a patient or an operator.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.reference import PRODUCT_COLUMNS
from pipelines.surveillance.beyond import (
    DeviceDesign,
    arl0_for_volume,
    finite,
    fir_threshold,
    rate_per_unit_year,
    years_between,
)
from pipelines.surveillance.budget import rare_alpha
from pipelines.surveillance.cusum import cusum_weights
from pipelines.surveillance.operators import ROLLING_DAYS
from pipelines.surveillance.outcomes import day_to_date
from pipelines.surveillance.profile import Metric, Profile
from pipelines.surveillance.rare import poisson_upper_pvalue

EVALUATIONS_PER_YEAR = 12
MIN_CALIBRATION_EVENTS = 10
LOT_KEY_SEPARATOR = "\x1f"  # flagged lots are "product<US>lot" (a lot id is per product)


def calibration_rate(metric: Metric, units: pd.DataFrame) -> float:
    """Return the rate expected risks are calibrated to: observed, or the guidance's for rare events.

    A rare metric's observed network rate is often 0 (no expected events, so any event would
    be infinitely surprising); its expected counts use the guidance's pooled rate instead, as
    do a young warehouse's (fewer than ``MIN_CALIBRATION_EVENTS`` events, or no non-events).
    """
    assert metric.alarm is not None
    events = int(units["y"].sum()) if not units.empty else 0
    if (metric.alarm.method == "rare" or events < MIN_CALIBRATION_EVENTS
            or events == len(units)):
        return metric.baseline.rate
    return events / len(units)


QUARTER_DAYS = 91
# Fewer comparator events than this in a quarter: that quarter keeps the whole-period model.
MIN_QUARTER_EVENTS = 5


def concurrent(risk: np.ndarray, day: np.ndarray, others: pd.DataFrame,
               others_risk: np.ndarray) -> np.ndarray:
    """Recalibrate a product's expected risks to the other products *in the same quarter*.

    DELTA compares a device with its concurrent alternatives: a rise that every product
    shares (a season, a bad operator using all of them) is not the product's. Per calendar
    quarter the log odds move by ``logit(others' observed rate) - logit(others' mean
    expected risk)``.
    """
    quarter = day // QUARTER_DAYS
    other_quarter = others["index_day"].to_numpy(np.int64) // QUARTER_DAYS
    other_y = others["y"].to_numpy(float)
    adjusted = risk.copy()
    for q in np.unique(quarter):
        mask = other_quarter == q
        events = other_y[mask].sum()
        if events < MIN_QUARTER_EVENTS or events == mask.sum():
            continue
        shift = (np.log(events / (mask.sum() - events))
                 - np.log(others_risk[mask].mean() / (1 - others_risk[mask].mean())))
        mine = quarter == q
        odds = adjusted[mine] / (1 - adjusted[mine]) * np.exp(shift)
        adjusted[mine] = odds / (1 + odds)
    return adjusted


def lot_alpha(false_alarms_per_year: float, lots_tested: int) -> float:
    """Return the per-lot alpha of one evaluation (Bonferroni over the lots tested)."""
    return false_alarms_per_year / EVALUATIONS_PER_YEAR / max(1, lots_tested)


def lot_tests(lots: pd.DataFrame, design: DeviceDesign, as_of_day: int) -> list[dict]:
    """Test every lot of ``lots`` (one row per case: product, lot, site_id, index_day, y, risk)."""
    if lots.empty:
        return []
    summary = lots.groupby(["product", "lot"], sort=True, observed=True).agg(
        procedures=("y", "size"), events=("y", "sum"), expected=("risk", "sum"),
        sites=("site_id", "nunique"))
    tested = summary.loc[summary["procedures"] >= design.lot_min_procedures]
    alpha = lot_alpha(design.lot_false_alarms_per_year, len(tested))
    p_values = poisson_upper_pvalue(tested["events"].to_numpy(float),
                                    tested["expected"].to_numpy(float))
    rows = []
    for ((product, lot), row), p_value in zip(tested.iterrows(), p_values, strict=True):
        signalled = row["events"] > 0 and p_value <= alpha
        rows.append({
            "product": str(product), "lot": str(lot), "metric": design.lot_metric,
            "procedures": int(row["procedures"]), "sites": int(row["sites"]),
            "events": int(row["events"]), "expected": float(row["expected"]),
            "p_value": float(p_value), "alpha": alpha,
            "signal_date": day_to_date(as_of_day) if signalled else None,
        })
    return rows


def _product_chart(metric: Metric, profile: Profile, design: DeviceDesign, cases: pd.DataFrame,
                   risk: np.ndarray, as_of_day: int) -> dict:
    day = cases["index_day"].to_numpy(np.int64)
    y = cases["y"].to_numpy(np.int64)
    rate = rate_per_unit_year(profile, metric)
    assert metric.alarm is not None
    if metric.alarm.method == "rare":
        recent = day > as_of_day - ROLLING_DAYS
        events, expected = int(y[recent].sum()), float(risk[recent].sum())
        p_value = float(poisson_upper_pvalue(events, expected)) if events else 1.0
        alpha = rare_alpha(rate)
        signal = day_to_date(as_of_day) if events and p_value <= alpha else None
        return {"statistic": p_value, "threshold": alpha, "signal_date": signal}
    volume = len(cases) / years_between(int(day[0]), as_of_day)
    h = fir_threshold(float(risk.mean()), design.odds_ratio, arl0_for_volume(volume, rate), 0.0)
    value, last_signal = 0.0, None
    for index, weight in enumerate(cusum_weights(y, risk, design.odds_ratio).tolist()):
        value = max(0.0, value + weight)
        if value >= h:
            last_signal, value = index, 0.0
    return {"statistic": finite(value), "threshold": h,
            "signal_date": day_to_date(int(day[last_signal])) if last_signal is not None else None}


def product_charts(units_by_metric: dict[str, pd.DataFrame], profile: Profile,
                   design: DeviceDesign, failures: pd.DataFrame, as_of_day: int,
                   flagged_lots: frozenset[str] = frozenset()) -> list[dict]:
    """Compare each product with the other products of its kind, per metric.

    ``units_by_metric`` maps a metric id to its mature units with the product columns and
    ``risk`` (the network case-mix model); ``failures`` has one row per device-failure
    complication with the product columns. Balloons are compared without the cases of
    ``flagged_lots`` (``product<US>lot`` keys of cement lots whose own test signalled): a bad lot would otherwise be
    blamed on whichever balloon its sites happen to use.
    """
    rows = []
    for metric_id in design.metrics:
        metric = profile.metric(metric_id)
        units = units_by_metric[metric_id]
        for column, kind in PRODUCT_COLUMNS.items():
            named = units.loc[units[column].notna()]
            if kind == "balloon" and flagged_lots:
                lot_key = (named["cement_product"].astype(str) + LOT_KEY_SEPARATOR
                           + named["cement_lot"].astype(str))
                named = named.loc[~lot_key.isin(flagged_lots)]
            for product in sorted(named[column].unique()):
                mine = named[column] == product
                others = named.loc[~mine]
                # units come in (site, date) order; a product's chart runs in date order
                cases = named.loc[mine].sort_values("index_day", kind="stable")
                if others.empty:
                    continue  # nothing to compare with
                risk = concurrent(cases["risk"].to_numpy(float),
                                  cases["index_day"].to_numpy(np.int64),
                                  others, others["risk"].to_numpy(float))
                expected = float(risk.sum())
                events = int(cases["y"].sum())
                test = _product_chart(metric, profile, design, cases, risk, as_of_day)
                rows.append({
                    "product": str(product), "metric": metric.id, "kind": kind,
                    "procedures": len(cases), "events": events, "expected": expected,
                    "observed_expected": events / expected if expected > 0 else None,
                    "device_failures": int((failures[column] == product).sum())
                    if not failures.empty else 0,
                    **test,
                })
    return rows
