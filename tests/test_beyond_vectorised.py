"""The operator and device charts give, bit for bit, what the straightforward loops gave.

The charts were rewritten without a pandas frame per operator or product and without a
builtin call per case (``beyond_run`` on a million procedures). The reference here is the
code as it was: a groupby per operator with ``max(0.0, value + weight)`` per case, and a
product loop on frames. Both run on one synthetic registry with a learning operator, a
drifting product and a bad cement lot, with the extra columns as categoricals (PostgreSQL's
read) and as plain strings (SQLite's); every row must be equal, floats included.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.reference import PRODUCT_COLUMNS
from pipelines.settings import REPO_DIR
from pipelines.surveillance.beyond import (
    QUARTER_DAYS,
    arl0_for_volume,
    finite,
    fir_threshold,
    operator_thresholds,
    parse_beyond_site,
    rate_per_unit_year,
    share_on_grid,
    years_between,
)
from pipelines.surveillance.budget import rare_alpha
from pipelines.surveillance.cusum import cusum_weights
from pipelines.surveillance.devices import (
    LOT_KEY_SEPARATOR,
    conditional_rare_pvalue,
    lot_tests,
    product_charts,
)
from pipelines.surveillance.operators import (
    ROLLING_DAYS,
    new_operators,
    operator_charts,
    operator_pseudonym,
    operator_rare_tests,
    operator_volume,
)
from pipelines.surveillance.outcomes import day_to_date
from pipelines.surveillance.profile import load_profile

AS_OF_DAY = 19_700  # 2023-12-09


def _registry(seed: int, categorical: bool) -> dict[str, pd.DataFrame]:
    """Return units of cement_leak and major_event in (site, date) order, with extras."""
    rng = np.random.default_rng(seed)
    frames = []
    for site in range(6):
        n = 900 + 150 * site
        day = np.sort(rng.integers(AS_OF_DAY - 700, AS_OF_DAY + 1, n))
        operator = rng.integers(0, 4, n)
        # operator 4 starts a year in: new to the site, worse for their first 40 cases
        late = day > AS_OF_DAY - 350
        operator[late & (rng.random(n) < 0.3)] = 4
        balloon = (site + (rng.random(n) < 0.3)) % 3
        cement = (site + (rng.random(n) < 0.2)) % 2
        lot = np.char.add(f"L{site % 3}-", ((day - day.min()) // 60).astype(str)).astype(object)
        bad_lot = (site % 2 == 0) & (day > AS_OF_DAY - 200) & (rng.random(n) < 0.3)
        lot[bad_lot] = "L-BAD"
        risk = 1 / (1 + np.exp(-rng.normal(-2.2, 0.5, n)))
        odds = risk / (1 - risk)
        odds[(operator == 4) & (np.cumsum(operator == 4) <= 40)] *= 4.0
        odds[balloon == 2] *= 1.6
        odds[bad_lot] *= 5.0
        y = (rng.random(n) < odds / (1 + odds)).astype(np.int64)
        major = (rng.random(n) < np.where(balloon == 1, 0.04, 0.004)).astype(np.int64)
        products = np.array(["BAL-A", "BAL-B", "BAL-C"], dtype=object)[balloon]
        products[rng.random(n) < 0.02] = None  # unnamed products and operators are skipped
        operators = np.array([f"{site}{o}" * 32 for o in operator], dtype=object)
        operators[rng.random(n) < 0.02] = None
        frames.append(pd.DataFrame({
            "site_id": f"S{site + 1:03d}", "index_day": day, "y": y, "major": major,
            "risk": risk, "operator_hash": operators, "balloon_product": products,
            "cement_product": np.array(["CEM-X", "CEM-Y"], dtype=object)[cement],
            "cement_lot": lot}))
    units = pd.concat(frames, ignore_index=True)
    if categorical:
        for name in ("site_id", "operator_hash", "balloon_product", "cement_product",
                     "cement_lot"):
            units[name] = units[name].astype("category")
    major = units.assign(y=units.pop("major"), risk=units["risk"] / 10)
    return {"cement_leak": units, "major_event": major}


# --- the reference: the loops as they were -----------------------------------------------

def _ref_fir_cusum(y, p, odds_ratio, h, head_start, start=None):
    weights = cusum_weights(np.asarray(y), np.asarray(p, dtype=float), odds_ratio).tolist()
    limits = np.broadcast_to(np.asarray(h, dtype=float), (len(weights),)).tolist()
    value = (head_start if start is None else start) * (limits[0] if limits else 0.0)
    path = np.empty(len(weights))
    signals = []
    for index, (weight, limit) in enumerate(zip(weights, limits, strict=True)):
        value = max(0.0, value + weight)
        path[index] = value
        if value >= limit:
            signals.append(index)
            value = head_start * limit
    return path, np.asarray(signals, dtype=np.int64)


def _ref_operator_charts(units, profile, design, as_of_day):
    """A frame per operator; their events of the site-quarters shared with a colleague."""
    from dataclasses import replace

    from pipelines.surveillance.budget import significant

    metric = profile.metric(design.cusum_metric)
    known = units.loc[units["operator_hash"].notna()]
    rate = rate_per_unit_year(profile, metric)
    is_new = new_operators(known, design.established_within_days)
    first_day = int(known["index_day"].min())
    quarter = (known["index_day"] - first_day) // QUARTER_DAYS
    rows = []
    grouped = known.sort_values(["site_id", "operator_hash"], kind="stable").groupby(
        ["site_id", "operator_hash"], sort=True, observed=True)
    for (site_id, operator_hash), cases in grouped:
        at_site = known.loc[(known["site_id"] == site_id).to_numpy()]
        site_quarter = quarter.loc[at_site.index]
        mine_all = (at_site["operator_hash"] == operator_hash).to_numpy()
        ys, shares, days, procedures, events, expected = [], [], [], 0, 0, 0.0
        for q in sorted(set(site_quarter[mine_all].tolist())):
            cell = at_site.loc[(site_quarter == q).to_numpy()]
            mine = (cell["operator_hash"] == operator_hash).to_numpy()
            if mine.all():
                continue  # no colleague in this quarter
            pi = cell["risk"].to_numpy()[mine].sum() / cell["risk"].sum()
            procedures += int(mine.sum())
            events += int(cell["y"].to_numpy()[mine].sum())
            expected += cell["y"].sum() * pi
            hit = cell.loc[cell["y"].to_numpy() == 1]
            order = np.argsort(hit["index_day"].to_numpy(), kind="stable")
            ys += (hit["operator_hash"] == operator_hash).to_numpy()[order].astype(int).tolist()
            shares += [pi] * len(hit)
            days += hit["index_day"].to_numpy()[order].tolist()
        own = cases["index_day"].to_numpy(np.int64)
        row = {"site_id": str(site_id), "operator": operator_pseudonym(str(operator_hash)),
               "metric": metric.id, "method": "fir_cusum", "procedures": procedures,
               "events": events, "expected": float(expected), "statistic": 0.0,
               "threshold": None, "head_start": design.head_start, "signal_date": None,
               "signal_procedure": None, "signals": 0,
               "first_procedure_date": day_to_date(int(own[0]))}
        if ys:
            new = bool(is_new.loc[(site_id, operator_hash)])
            steps = max(1, round(design.learning_procedures * len(ys) / procedures))
            p0 = significant(min(max(round(float(np.mean(shares)) / 0.05) * 0.05, 0.05), 0.95), 2)
            thresholds = operator_thresholds(
                p0, replace(design, learning_procedures=steps),
                operator_volume(len(ys), int(own[0]), int(days[-1])), rate, new=new)
            nth = own[design.learning_procedures - 1] if len(own) >= design.learning_procedures \
                else np.inf
            h = np.array([thresholds.learning if new and d <= nth else thresholds.steady
                          for d in days])
            path, signals = _ref_fir_cusum(ys, shares, design.odds_ratio, h, design.head_start,
                                           start=thresholds.start)
            last = int(signals[-1]) if len(signals) else None
            row.update({
                "statistic": finite(path[-1]), "threshold": float(h[-1]),
                "signal_date": day_to_date(int(days[last])) if last is not None else None,
                "signal_procedure": int(np.sum(own <= days[last])) if last is not None
                else None,
                "signals": len(signals)})
        rows.append(row)
    return rows


def _ref_operator_rare_tests(units, profile, design, as_of_day):
    """A frame per operator; the conditional test against the colleagues at the site."""
    metric = profile.metric(design.rare_metric)
    alpha = rare_alpha(rate_per_unit_year(profile, metric))
    known = units.loc[units["operator_hash"].notna()]
    rows = []
    for (site_id, operator_hash), cases in known.groupby(["site_id", "operator_hash"],
                                                          sort=True, observed=True):
        others = known.loc[((known["site_id"] == site_id)
                            & (known["operator_hash"] != operator_hash)).to_numpy()]
        day = cases["index_day"].to_numpy(np.int64)
        events, expected, p_value = conditional_rare_pvalue(
            day, cases["y"].to_numpy(np.int64), cases["risk"].to_numpy(float),
            others["index_day"].to_numpy(np.int64), others["y"].to_numpy(np.int64),
            others["risk"].to_numpy(float), as_of_day)
        window = as_of_day - ROLLING_DAYS

        def quarter(days):
            return np.minimum((as_of_day - days) * 4 // ROLLING_DAYS, 3)

        theirs = set(quarter(others["index_day"].to_numpy(np.int64)[
            others["index_day"].to_numpy(np.int64) > window]).tolist())
        procedures = sum(1 for d in day if d > window and int(quarter(d)) in theirs)
        signalled = events > 0 and p_value <= alpha
        rows.append({
            "site_id": str(site_id), "operator": operator_pseudonym(str(operator_hash)),
            "metric": metric.id, "method": "rare", "procedures": procedures,
            "events": events, "expected": expected, "statistic": p_value, "threshold": alpha,
            "head_start": None,
            "signal_date": day_to_date(as_of_day) if signalled else None,
            "signal_procedure": None, "signals": int(signalled),
            "first_procedure_date": day_to_date(int(day[0])),
        })
    return rows


def _ref_product_cusum(y, risk, odds_ratio, h):
    value, signals = 0.0, []
    for index, weight in enumerate(cusum_weights(y, risk, odds_ratio).tolist()):
        value = max(0.0, value + weight)
        if value >= h:
            signals.append(index)
            value = 0.0
    return value, signals


def _ref_product_chart(metric, profile, design, cases, others, as_of_day):
    """``cases``: a rare metric's product cases; a CUSUM's shared events (y: the product's)."""
    day = cases["index_day"].to_numpy(np.int64)
    y = cases["y"].to_numpy(np.int64)
    risk = cases["risk"].to_numpy(float)
    rate = rate_per_unit_year(profile, metric)
    if metric.alarm.method == "rare":
        events, _, p_value = conditional_rare_pvalue(
            day, y, risk, others["index_day"].to_numpy(np.int64),
            others["y"].to_numpy(np.int64), others["risk"].to_numpy(float), as_of_day,
            cases["site_id"].astype(str).to_numpy(), others["site_id"].astype(str).to_numpy())
        alpha = rare_alpha(rate)
        signal = day_to_date(as_of_day) if events and p_value <= alpha else None
        return {"statistic": p_value, "threshold": alpha, "signal_date": signal,
                "signals": int(signal is not None)}
    if cases.empty:
        return {"statistic": 0.0, "threshold": None, "signal_date": None, "signals": 0}
    volume = len(cases) / years_between(int(day[0]), as_of_day)
    h = fir_threshold(share_on_grid(float(risk.mean())), design.odds_ratio,
                      arl0_for_volume(volume, rate), 0.0)
    value, signals = _ref_product_cusum(y, risk, design.odds_ratio, h)
    return {"statistic": finite(value), "threshold": h,
            "signal_date": day_to_date(int(day[signals[-1]])) if signals else None,
            "signals": len(signals)}


def _ref_product_charts(units_by_metric, profile, design, failures, as_of_day, flagged_lots):
    """Per product a frame per site and quarter (a cell), the cells' sums by groupby."""
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
            if named.empty:
                continue
            named = named.assign(
                product=named[column].astype(str), site=named["site_id"].astype(str),
                quarter=(named["index_day"] - named["index_day"].min()) // QUARTER_DAYS)
            for product in sorted(named["product"].unique()):
                mine = named["product"] == product
                if mine.all():
                    continue
                by_cell = named.assign(mine=mine, mine_risk=named["risk"].where(mine, 0.0)
                                       ).groupby(["site", "quarter"])
                cells = by_cell.agg(n=("y", "size"), n_mine=("mine", "sum"), events=("y", "sum"),
                                    risk=("risk", "sum"), mine_risk=("mine_risk", "sum"))
                shared = cells.loc[(cells["n_mine"] > 0) & (cells["n_mine"] < cells["n"])]
                share = shared["mine_risk"] / shared["risk"]
                in_shared = pd.MultiIndex.from_frame(named[["site", "quarter"]]).isin(
                    shared.index)
                evidence = named.loc[mine & in_shared]
                if metric.alarm.method == "rare":
                    cases, others = named.loc[mine], named.loc[~mine]
                else:
                    shared_events = named.loc[in_shared & (named["y"] == 1)]
                    cell_share = share.reindex(pd.MultiIndex.from_frame(
                        shared_events[["site", "quarter"]])).to_numpy()
                    cases = pd.DataFrame({
                        "index_day": shared_events["index_day"].to_numpy(),
                        "y": (shared_events["product"] == product).to_numpy().astype(np.int64),
                        "risk": cell_share})
                    cases = cases.loc[(cases["risk"] > 0) & (cases["risk"] < 1)]
                    others = None
                cases = cases.sort_values("index_day", kind="stable")
                expected = float((shared["events"] * share).sum())
                events = int(evidence["y"].sum())
                test = _ref_product_chart(metric, profile, design, cases, others, as_of_day)
                rows.append({
                    "product": product, "metric": metric.id, "kind": kind,
                    "procedures": len(evidence), "events": events, "expected": expected,
                    "observed_expected": events / expected if expected > 0 else None,
                    "device_failures": int((failures[column] == product).sum())
                    if not failures.empty else 0,
                    **test,
                })
    return rows


def _close(got: list[dict], want: list[dict]) -> bool:
    """Rows equal, floats to 1e-9 relative (the cells' sums are added in another order)."""
    assert [row.keys() for row in got] == [row.keys() for row in want]
    for mine, theirs in zip(got, want, strict=True):
        for key, value in mine.items():
            if isinstance(value, float) and theirs[key] is not None:
                assert value == pytest.approx(theirs[key], rel=1e-9, abs=1e-12), key
            else:
                assert value == theirs[key], (key, mine, theirs)
    return True


@pytest.mark.parametrize("categorical", [True, False], ids=["postgres-read", "sqlite-read"])
def test_charts_equal_the_straightforward_loops_bit_for_bit(categorical):
    profile = load_profile(REPO_DIR / "profiles" / "htg108.yaml")
    design = parse_beyond_site(profile)
    ops, dev = design.operators, design.devices
    units = _registry(12, categorical)
    failures = pd.DataFrame({"balloon_product": ["BAL-A", "BAL-C", "BAL-A"],
                             "cement_product": ["CEM-X", "CEM-X", "CEM-Y"]}, dtype=object)
    leak, major = units[ops.cusum_metric], units[ops.rare_metric]

    charts = operator_charts(leak, profile, ops, AS_OF_DAY)
    assert _close(charts, _ref_operator_charts(leak, profile, ops, AS_OF_DAY))
    assert any(row["signals"] for row in charts)  # the learning operator is caught
    rare = operator_rare_tests(major, profile, ops, AS_OF_DAY)
    assert _close(rare, _ref_operator_rare_tests(major, profile, ops, AS_OF_DAY))

    lots = lot_tests(pd.DataFrame({
        "product": leak["cement_product"].to_numpy(), "lot": leak["cement_lot"].to_numpy(),
        "site_id": leak["site_id"].array, "index_day": leak["index_day"].to_numpy(),
        "y": leak["y"].to_numpy(), "risk": leak["risk"].to_numpy()}), dev, AS_OF_DAY)
    flagged = frozenset(row["product"] + LOT_KEY_SEPARATOR + row["lot"]
                        for row in lots if row["signal_date"])
    assert flagged == {cement + LOT_KEY_SEPARATOR + "L-BAD" for cement in ("CEM-X", "CEM-Y")}
    for lots_now in (frozenset(), flagged):
        products = product_charts(units, profile, dev, failures, AS_OF_DAY, lots_now,
                                  count_signals=True)
        assert _close(products, _ref_product_charts(units, profile, dev, failures, AS_OF_DAY,
                                                     lots_now))
        assert {row["metric"] for row in products} == set(dev.metrics)
        assert any(row["signals"] for row in products)  # the drifting balloon, the bad lot


@pytest.mark.parametrize("arrow", [True, False])
def test_extra_rows_match_get_indexer(arrow):
    """Arrow's ``index_in`` gives each unit the row ``Index.get_indexer`` gave, -1 if absent."""
    from pipelines.surveillance.beyond_run import _ExtraRows
    from pipelines.surveillance.outcomes import _id_strings

    rng = np.random.default_rng(7)
    ids = np.array([f"P{i:07d}" for i in rng.permutation(5000)], dtype=object)
    index = pd.Index(_id_strings(ids) if arrow else ids, dtype=None if arrow else object)
    extras = pd.DataFrame({"operator_hash": np.zeros(len(ids))}, index=index)
    units = np.concatenate([ids[rng.integers(0, len(ids), 3000)], ["P9999999", "nope"]])
    unit_id = pd.Series(_id_strings(units))
    expected = pd.Index(ids, dtype=object).get_indexer(pd.Index(units, dtype=object))
    rows_of = _ExtraRows(extras)
    position = rows_of(unit_id)
    assert position.dtype == np.intp
    np.testing.assert_array_equal(position, expected)
    assert rows_of(pd.Series(_id_strings(units.copy()))) is position  # same units: reused
