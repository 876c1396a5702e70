"""Devices and cement: each product against the others, lot clusters, device failures.

Products (DELTA-style, Resnic et al. 2010), within sites
--------------------------------------------------------
For each product named in the procedures (``balloon_product`` or ``cement_product``) and each
metric of ``beyond_site.devices.metrics``, the product is compared with *the other products of
the same kind used at the same site in the same 91-day quarter* (a cell; DELTA's concurrent
alternatives, stratified by site). Given a cell's events, each is the product's with
probability ``E / (E + F)`` under the null, ``E`` and ``F`` the two sides' case-mix expected
counts (network model): the site's own level, a site's drift and a trend common to every
product cancel, and a product used alone at a site gives no evidence there. For a CUSUM metric
the sequential test is the risk-adjusted Bernoulli CUSUM over the shared cells' events in date
order (the product's event or another's, at that share; alternative odds ratio
``odds_ratio``): it may spend ``safety_per_100_site_years / 100 x alarm.share`` false device
alerts per product-year, so ``ARL0 = the chart's events a year / that rate`` (Markov chain at
the mean share). Metrics whose site alarm is the rare exact test (major events) get the exact
conditional test of the product's events in the last 365 days, stratified by site and quarter
(:func:`conditional_rare_pvalue`), with the same alpha as the site's rare chart for that share.

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
    share_on_grid,
    site_quarter_cells,
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




RARE_STRATA = 4  # the rare test's 365 days in four strata of about a quarter each


def conditional_rare_pvalue(day: np.ndarray, y: np.ndarray, risk: np.ndarray,
                            other_day: np.ndarray, other_y: np.ndarray, other_risk: np.ndarray,
                            as_of_day: int, site: np.ndarray | None = None,
                            other_site: np.ndarray | None = None) -> tuple[int, float, float]:
    """Return (events, expected, P(X >= events)) of a product's last 365 days, given all events.

    The exact conditional test of two Poisson rates (Przyborowski & Wilenski 1940): within
    each quarter of the window (and each site, when ``site`` and ``other_site`` are given),
    given the events of the product and of the other products together (``n``), the
    product's count is Binomial(``n``, ``E / (E + F)``) under the null, where ``E`` and ``F``
    are the two sides' case-mix expected counts (network model). The common rate of the
    stratum cancels -- the site's own level too when strata are per site -- so neither the
    comparators' Poisson noise nor a drifting site is taken for the product's (a
    recalibrated expected spent 2.4 times the budget at alpha 1.25e-4 on undrifted
    1,000-site registries). Only strata with cases on both sides carry evidence: a product
    alone in a stratum has its events fixed by the total, and they are not counted.
    ``expected`` is the sum of ``n x E / (E + F)`` over those strata.
    """
    from pipelines.surveillance.distributions import binom_pmf  # scipy.stats's values

    mine, theirs = day > as_of_day - ROLLING_DAYS, other_day > as_of_day - ROLLING_DAYS

    def stratum(days: np.ndarray) -> np.ndarray:
        return np.minimum((as_of_day - days) * RARE_STRATA // ROLLING_DAYS, RARE_STRATA - 1)

    s_mine, s_theirs = stratum(day[mine]), stratum(other_day[theirs])
    cells = RARE_STRATA
    if site is not None and other_site is not None:
        codes, _ = pd.factorize(np.concatenate([np.asarray(site)[mine],
                                                np.asarray(other_site)[theirs]]))
        cells = RARE_STRATA * max(1, int(codes.max(initial=-1)) + 1)
        s_mine = s_mine + RARE_STRATA * codes[: len(s_mine)]
        s_theirs = s_theirs + RARE_STRATA * codes[len(s_mine):]
    observed = np.bincount(s_mine, weights=y[mine], minlength=cells)
    total = observed + np.bincount(s_theirs, weights=other_y[theirs], minlength=cells)
    e_mine = np.bincount(s_mine, weights=risk[mine], minlength=cells)
    e_theirs = np.bincount(s_theirs, weights=other_risk[theirs], minlength=cells)
    both = (e_mine > 0) & (e_theirs > 0)
    share = np.divide(e_mine, e_mine + e_theirs, out=np.zeros(cells), where=both)
    events = int(observed[both].sum())
    expected = float(np.sum(total[both] * share[both]))
    if events == 0:
        return 0, expected, 1.0
    pmf = np.ones(1)
    informative = both & (total > 0)
    for n, pi in zip(total[informative].astype(np.int64).tolist(),
                     share[informative].tolist(), strict=True):
        # one event (most strata of a site-stratified rare test): its pmf needs no scipy
        step = (np.array([1.0 - pi, pi]) if n == 1
                else binom_pmf(np.arange(n + 1), n, pi))
        pmf = np.convolve(pmf, step)
    return events, expected, float(min(1.0, pmf[events:].sum()))


def product_cusum(y: np.ndarray, risk: np.ndarray, odds_ratio: float, h: float
                  ) -> tuple[float, list[int]]:
    """Return (the statistic now, the cases at which it signalled); it restarts at 0."""
    value, signals = 0.0, []
    # A product has up to a million cases: ``max(0.0, value + weight)`` spelled as a
    # comparison does the same float operations (the same bits) without a builtin call.
    for index, weight in enumerate(cusum_weights(y, risk, odds_ratio).tolist()):
        value += weight
        if not value > 0.0:  # max(0.0, v) keeps 0.0 unless v is larger (NaN too)
            value = 0.0
        if value >= h:
            signals.append(index)
            value = 0.0
    return value, signals


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


def _product_chart(metric: Metric, profile: Profile, design: DeviceDesign,
                   cases: dict[str, np.ndarray], others: dict[str, np.ndarray] | None,
                   as_of_day: int) -> dict:
    """Return the product's test: ``cases`` and ``others`` hold index_day, y, risk and site
    arrays (``others`` only for a rare metric; a CUSUM's ``cases`` are the shared cells'
    events, ``y`` 1 for the product's, ``risk`` the product's share of the cell)."""
    day = cases["index_day"]
    y = cases["y"]
    rate = rate_per_unit_year(profile, metric)
    assert metric.alarm is not None
    if metric.alarm.method == "rare":
        assert others is not None
        events, _, p_value = conditional_rare_pvalue(
            day, y, cases["risk"], others["index_day"], others["y"], others["risk"], as_of_day,
            cases["site"], others["site"])
        alpha = rare_alpha(rate)
        signal = day_to_date(as_of_day) if events and p_value <= alpha else None
        return {"statistic": p_value, "threshold": alpha, "signal_date": signal,
                "signals": int(signal is not None)}
    if len(day) == 0:  # no event in a site and quarter shared with another product
        return {"statistic": 0.0, "threshold": None, "signal_date": None, "signals": 0}
    risk = cases["risk"]
    volume = len(day) / years_between(int(day[0]), as_of_day)
    # pi on the grid the operators' charts use: the exact mean moved every night, and each
    # new value was a new chain (tests/test_threshold_store.py).
    h = fir_threshold(share_on_grid(float(risk.mean())), design.odds_ratio,
                      arl0_for_volume(volume, rate), 0.0)
    value, signals = product_cusum(y, risk, design.odds_ratio, h)
    return {"statistic": finite(value), "threshold": h,
            "signal_date": day_to_date(int(day[signals[-1]])) if signals else None,
            "signals": len(signals)}


def _without_flagged_lots(units: pd.DataFrame, flagged_lots: frozenset[str]) -> np.ndarray:
    """Return, per unit, whether its cement ``product<US>lot`` key is not a flagged lot.

    Keys are built once per distinct (product, lot) pair, not per unit. A unit missing
    either column has no key (pandas' text of a missing value stays missing): kept.
    """
    product_code, products = pd.factorize(units["cement_product"])
    lot_code, lots = pd.factorize(units["cement_lot"])
    products, lots = products.tolist(), lots.tolist()
    named = (product_code >= 0) & (lot_code >= 0)
    pairs, pair_of_unit = np.unique(product_code[named] * len(lots) + lot_code[named],
                                    return_inverse=True)
    flagged = np.asarray([str(products[pair // len(lots)]) + LOT_KEY_SEPARATOR
                          + str(lots[pair % len(lots)]) in flagged_lots
                          for pair in pairs.tolist()], dtype=bool)
    keep = np.ones(len(units), dtype=bool)
    keep[named] = ~flagged[pair_of_unit]
    return keep


def product_charts(units_by_metric: dict[str, pd.DataFrame], profile: Profile,
                   design: DeviceDesign, failures: pd.DataFrame, as_of_day: int,
                   flagged_lots: frozenset[str] = frozenset(), *,
                   count_signals: bool = False) -> list[dict]:
    """Compare each product with the other products of its kind at the same sites, per metric.

    ``units_by_metric`` maps a metric id to its mature units with ``site_id``, the product
    columns and ``risk`` (the network case-mix model); ``failures`` has one row per
    device-failure complication with the product columns. A product's evidence is its cases
    that share a site and a 91-day quarter (a *cell*) with another product's cases: within
    a cell, given the cell's events, each is the product's with probability the product's
    share of the cell's case-mix risk under the null. A CUSUM metric charts the shared
    cells' events in date order (Bernoulli: the product's or not, at that share); a rare
    metric gets the site-stratified exact test (:func:`conditional_rare_pvalue`). A site's
    own level or drift, and a trend common to all products, cancel within the cell, and a
    product used alone at a site gives no evidence there. ``procedures``, ``events`` and ``expected`` count those cases
    (``expected``: the cell's events times the product's share of the cell's case-mix
    risk, summed). Balloons are compared without the cases of ``flagged_lots``
    (``product<US>lot`` keys of cement lots whose own test signalled): a bad lot would
    otherwise be blamed on whichever balloon its sites happen to use. ``count_signals``
    adds ``signals``: how many times the CUSUM signalled (and restarted), or whether the
    rare test did now.
    """
    rows = []
    for metric_id in design.metrics:
        metric = profile.metric(metric_id)
        assert metric.alarm is not None
        rare = metric.alarm.method == "rare"
        units = units_by_metric[metric_id]
        all_day = units["index_day"].to_numpy(np.int64)
        all_y = units["y"].to_numpy(np.int64)
        all_risk = units["risk"].to_numpy(float)
        all_site, _ = pd.factorize(units["site_id"])
        for column, kind in PRODUCT_COLUMNS.items():
            keep = units[column].notna().to_numpy(bool, copy=True)
            if kind == "balloon" and flagged_lots:
                keep &= _without_flagged_lots(units, flagged_lots)
            if not keep.any():
                continue
            # Products are factorised from the column itself: a categorical's codes, not a
            # string per unit.
            code, products = pd.factorize(units[column][keep])
            day, y, risk, site = all_day[keep], all_y[keep], all_risk[keep], all_site[keep]
            code_of = {product: index for index, product in enumerate(products.tolist())}
            # cells: a site in a 91-day quarter counted from the comparison's first day
            cells = site_quarter_cells(site, day, y, risk)
            cell, n_cells = cells.cell, cells.n_cells
            cell_cases, cell_events, cell_risk = cells.cases, cells.events, cells.risk
            for product in sorted(code_of):
                mine = code == code_of[product]
                if mine.all():
                    continue  # nothing to compare with
                mine_cases = np.bincount(cell[mine], minlength=n_cells)
                mine_risk = np.bincount(cell[mine], weights=risk[mine], minlength=n_cells)
                shared = (mine_cases > 0) & (mine_cases < cell_cases)
                evidence = mine & shared[cell]
                # the product's share of its cell's case-mix risk: under the null, the chance
                # that an event of the cell is the product's
                share = np.divide(mine_risk, cell_risk, out=np.zeros(n_cells),
                                  where=shared & (cell_risk > 0))
                expected = float(np.sum(cell_events * share))
                events = int(y[evidence].sum())
                if rare:
                    charted = mine
                    chart_y, chart_risk = y, risk
                    theirs = ~mine
                    others = {"index_day": day[theirs], "y": y[theirs], "risk": risk[theirs],
                              "site": site[theirs]}
                else:
                    # the events of the shared cells: each is the product's (1) or another's
                    # (0), with the product's share as its null probability
                    charted = (y == 1) & (share[cell] > 0.0) & (share[cell] < 1.0)
                    chart_y, chart_risk, others = mine.astype(np.int64), share[cell], None
                # a product's chart runs in date order (units come in (site, date) order)
                taken = np.flatnonzero(charted)
                taken = taken[np.argsort(day[taken], kind="stable")]
                cases = {"index_day": day[taken], "y": chart_y[taken],
                         "risk": chart_risk[taken], "site": site[taken]}
                test = _product_chart(metric, profile, design, cases, others, as_of_day)
                if not count_signals:
                    del test["signals"]
                rows.append({
                    "product": str(product), "metric": metric.id, "kind": kind,
                    "procedures": int(evidence.sum()), "events": events, "expected": expected,
                    "observed_expected": events / expected if expected > 0 else None,
                    "device_failures": int((failures[column] == product).sum())
                    if not failures.empty else 0,
                    **test,
                })
    return rows
