"""The monitor's faster paths give what the straightforward code gives, value for value.

Each check recomputes one step the way the monitor computed it before it was sped up
(a pandas groupby, a hash of the whole object array, a hash-table reindex, a units x bins
matrix) on a simulated registry, and compares exactly.
"""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest

from pipelines.settings import REPO_DIR
from pipelines.simulate import simulate_snapshot
from pipelines.surveillance import risk_model, survival
from pipelines.surveillance.outcomes import (
    OUTCOME_COLUMNS,
    _id_hashes,
    _id_strings,
    _positions,
    derive_outcomes,
)
from pipelines.surveillance.profile import load_profile

PROFILE = load_profile(REPO_DIR / "profiles" / "htg108.yaml")


@pytest.fixture(scope="module")
def snapshot():
    snap, _ = simulate_snapshot(PROFILE, sites=12, start=date(2022, 1, 1),
                                end=date(2023, 6, 30), seed=11, volume_scale=2)
    return snap


@pytest.mark.parametrize("metric_id", ["cement_leak", "new_fracture"])
def test_covariate_patterns_equal_the_groupby(snapshot, metric_id):
    units = derive_outcomes(snapshot, PROFILE.metric(metric_id))
    x = risk_model.design_matrix(units)
    x["y"] = units["y"].to_numpy(float)
    grouped = x.groupby(list(risk_model.CANDIDATE_TERMS), sort=True)["y"].agg(["sum", "count"])
    patterns, events, counts = risk_model.covariate_patterns(units, units["y"].to_numpy(float))
    assert np.array_equal(grouped.index.to_frame(index=False).to_numpy(), patterns.to_numpy())
    assert np.array_equal(grouped["sum"].to_numpy(float), events)
    assert np.array_equal(grouped["count"].to_numpy(), counts)



def _hashed_patterns(frame: pd.DataFrame, y: np.ndarray):
    """covariate_patterns as it was: every term and the key coded by pd.factorize."""
    key = np.zeros(len(frame), dtype=np.int64)
    values = []
    for term in risk_model.CANDIDATE_TERMS:
        codes, distinct = pd.factorize(risk_model.term_values(frame, term), sort=True)
        key = key * distinct.size + codes.astype(np.int64)
        values.append(distinct)
    inverse, keys = pd.factorize(key, sort=True)
    columns = {}
    rest = keys
    for term, distinct in zip(reversed(risk_model.CANDIDATE_TERMS), reversed(values),
                              strict=True):
        columns[term] = distinct[rest % distinct.size]
        rest = rest // distinct.size
    return (pd.DataFrame({t: columns[t] for t in risk_model.CANDIDATE_TERMS}),
            np.bincount(inverse, weights=y, minlength=len(keys)),
            np.bincount(inverse, minlength=len(keys)))


@pytest.mark.parametrize("variant", ["simulated", "wide_ages", "many_ages", "float_steroids",
                                     "object_columns", "one_level", "one_row"])
def test_counted_patterns_equal_the_hashed_ones(snapshot, variant):
    """Counting codes (bincount) gives the hashed patterns, and so does every fallback."""
    units = derive_outcomes(snapshot, PROFILE.metric("cement_leak"))
    if variant == "wide_ages":  # a range too wide to count: hashed
        units["age_years"] = units["age_years"] * (1 << 20) - (1 << 40)
    elif variant == "many_ages":  # ages counted, but too many patterns to count: hashed
        units["age_years"] = np.arange(len(units)) % 5000
    elif variant == "float_steroids":  # not booleans: hashed
        units["steroid_use"] = units["steroid_use"].astype(float)
    elif variant == "object_columns":  # plain strings, not categoricals
        for name in ("sex", "indication", "anaesthesia"):
            units[name] = units[name].astype(object)
    elif variant == "one_level":  # a term with one value, a level nobody has
        units = units.loc[(units["sex"] == "F") & (units["anaesthesia"] == "local")]
        units["sex"] = units["sex"].cat.remove_unused_categories()
    elif variant == "one_row":
        units = units.iloc[:1]
    y = units["y"].to_numpy(float)
    patterns, events, counts = risk_model.covariate_patterns(units, y)
    expected_patterns, expected_events, expected_counts = _hashed_patterns(units, y)
    assert len(patterns) > (0 if variant == "one_row" else 50)
    assert np.array_equal(patterns.to_numpy(), expected_patterns.to_numpy())
    assert patterns.dtypes.tolist() == expected_patterns.dtypes.tolist()
    assert np.array_equal(events, expected_events)
    assert np.array_equal(counts, expected_counts)

def test_patient_units_equal_the_reindex(snapshot):
    procs = snapshot.procedures
    pair = (procs["site_code"].to_numpy(np.int64) * (int(procs["patient_code"].max()) + 1)
            + procs["patient_code"].to_numpy(np.int64))
    _, first_rows = np.unique(pair, return_index=True)
    index_rows = np.sort(first_rows)
    metric = PROFILE.metric("new_fracture")
    assert metric.denominator == "patient"
    units = derive_outcomes(snapshot, metric, include_immature=True)
    assert units["unit_id"].tolist() == procs["procedure_id"].to_numpy()[index_rows].tolist()


def test_outcome_columns_are_a_choice(snapshot):
    metric = PROFILE.metric("cement_leak")
    full = derive_outcomes(snapshot, metric)
    assert tuple(full.columns) == OUTCOME_COLUMNS
    some = derive_outcomes(snapshot, metric, columns=("y", "site_code"))
    pd.testing.assert_frame_equal(some, full[["y", "site_code"]])
    with pytest.raises(ValueError, match="unknown outcome columns"):
        derive_outcomes(snapshot, metric, columns=("nope",))


def test_id_hashes_and_positions():
    ids = np.array([f"S{i % 7:03d}-{i:06d}" for i in range(200_000)], dtype=object)
    strings = _id_strings(ids)
    assert np.array_equal(_id_hashes(strings), pd.util.hash_array(ids))
    wanted = _id_strings(np.array(["S003-000003", "missing", "S000-199997"], dtype=object))
    assert _positions(strings, wanted).tolist() == [3, -1, 199_997]



def test_hashed_positions_equal_the_string_match_and_fall_back_on_collisions(monkeypatch):
    from pipelines.surveillance import outcomes

    ids = np.array([f"S{i % 7:03d}-{i:06d}" for i in range(50_000)], dtype=object)
    strings = _id_strings(ids)
    rng = np.random.default_rng(8)
    wanted = _id_strings(np.concatenate([ids[rng.integers(0, 50_000, 20_000)],
                                         np.array(["missing", "S000-999999", ""],
                                                  dtype=object)]))
    expected = _positions(strings, wanted)
    assert (expected == -1).sum() == 3
    hashes = _id_hashes(strings)
    assert np.array_equal(outcomes._hashed_positions(strings, hashes, wanted), expected)
    fallbacks = []
    string_match = outcomes._positions
    monkeypatch.setattr(outcomes, "_positions",
                        lambda *args: fallbacks.append(1) or string_match(*args))
    # two procedure ids sharing a hash: the string match
    shared = hashes.copy()
    shared[10] = shared[11]
    assert np.array_equal(outcomes._hashed_positions(strings, shared, wanted), expected)
    assert len(fallbacks) == 1
    # a wanted id matched by another id's hash: the string match
    real_hashes = outcomes._id_hashes
    monkeypatch.setattr(outcomes, "_id_hashes",
                        lambda values: np.roll(real_hashes(values), 1))
    assert np.array_equal(outcomes._hashed_positions(strings, hashes, wanted), expected)
    assert len(fallbacks) == 2
    assert outcomes._hashed_positions(strings, hashes, wanted[:0]).tolist() == []

def test_at_risk_by_bin_equals_the_matrix():
    rng = np.random.default_rng(3)
    index_day = rng.integers(0, 700, 50_000)
    end_day = index_day + rng.integers(0, 400, 50_000)
    event = rng.random(50_000) < 0.1
    hazard = survival.reference_hazard(index_day, end_day, event, 365, 0.1)
    # the former units x bins computation
    n_bins = 13
    edges = np.arange(n_bins + 1) * survival.BIN_DAYS
    edges[-1] = 365
    widths = np.diff(edges).astype(float)
    duration = np.clip(end_day - index_day, 0, 365)
    at_risk = np.clip(duration[:, None] - edges[None, :-1], 0, widths[None, :]).sum(axis=0)
    event_bin = np.minimum((duration[event] - 1).clip(min=0) // survival.BIN_DAYS, n_bins - 1)
    shape = np.bincount(event_bin, minlength=n_bins) / at_risk
    expected = shape * (-np.log1p(-0.1) / float((shape * widths).sum()))
    assert np.array_equal(hazard, expected)


@pytest.mark.parametrize(("rows", "sites"), [(0, 7), (1, 7), (5000, 7), (5000, 400),
                                             (5000, 300_000)])
def test_chart_order_equals_the_three_key_lexsort(rows, sites):
    """Equal to the lexsort: keys of one or two 16-bit digits, and past 2**32 (lexsort)."""
    from pipelines.surveillance.outcomes import _chart_order

    rng = np.random.default_rng(rows)
    site = rng.integers(0, sites, rows).astype(np.int64)
    day = rng.integers(-400, 20000, rows).astype(np.int64)  # dates before 1970 too
    # few distinct ties: equal (site, day, tie) rows keep their order in both
    tie = rng.integers(0, 3, rows).astype(np.uint64) * np.uint64(2**63 + 5)
    order = _chart_order(site, day, tie)
    assert np.array_equal(order, np.lexsort((tie, day, site)))
    if rows > 1 and sites < 1000:
        assert len(np.unique(site * 100_000 + day)) < rows  # ties on (site, day) were there


def test_sentinel_signals_equal_the_groupby(snapshot):
    """Sentinel signals counted on runs of the sorted events equal a groupby per (site, day)."""
    import dataclasses

    from pipelines.surveillance import engine
    from pipelines.surveillance.outcomes import day_to_date, sentinel_events

    metric = next(m for m in PROFILE.metrics if m.kind == "sentinel")
    # many sentinel events, several on one site and day, of several types
    rng = np.random.default_rng(4)
    rows = rng.integers(0, len(snapshot.procedures), 60)
    rows = np.concatenate([rows, rows[:20], rows[:10]])
    complications = pd.DataFrame({
        "procedure_row": rows.astype(np.int64),
        "event_day": snapshot.procedures["procedure_day"].to_numpy()[rows]
        + rng.integers(0, 3, len(rows)),
        "event_type": pd.Categorical(rng.choice(list(metric.numerator.event_types), len(rows))),
        "symptomatic": rng.random(len(rows)) < 0.5,
        "severity": pd.Categorical(rng.choice(["minor", "major", "fatal"], len(rows))),
    })
    snapshot = dataclasses.replace(snapshot, complications=complications)
    work = engine._Computation(PROFILE, snapshot)
    work.sentinel_metric(metric)
    events = sentinel_events(snapshot, metric)
    expected = engine._Builder(PROFILE)
    for (site, event_day), rows in events.groupby(["site_id", "event_day"], sort=True,
                                                  observed=True):
        types = rows["event_type"].value_counts().sort_index()
        expected.add(metric, site, "sentinel", "up", day_to_date(event_day),
                     day_to_date(event_day), observed=float(len(rows)), n=None, expected=None,
                     statistic=float(len(rows)), threshold=1.0,
                     detail={"event_types": {str(k): int(v) for k, v in types.items()},
                             "rule": "any single event is a signal"})
    assert len(expected.rows) > 30
    assert list(work.builder.rows.items()) == list(expected.rows.items())
    # several events on one site and day, of more than one type, were there to count
    assert any(json_types(row) > 1 for row in expected.rows.values())


def json_types(row: dict) -> int:
    import json

    return sum(json.loads(row["detail"])["event_types"].values())


def test_charts_in_known_order_equal_the_where_and_lexsort(snapshot):
    """The outcome-known chart order, built in place and freed as it goes, equals the
    straightforward ``np.where`` + ``np.lexsort`` over every unit, array for array."""
    from pipelines.surveillance.engine import INFORMATION_ORDER_MAX_WINDOW, compute

    work = compute(PROFILE, snapshot)
    as_of = snapshot.as_of_day
    checked = 0
    for metric in PROFILE.metrics:
        window = metric.window_days or 0
        if (metric.kind != "outcome" or PROFILE.design.budget is None
                or window > INFORMATION_ORDER_MAX_WINDOW):
            continue
        everyone = derive_outcomes(snapshot, metric, include_immature=True,
                                   columns=("site_code", "index_day", "y", "event_day"))
        group = everyone["site_code"].to_numpy(np.int64)
        index_day = everyone["index_day"].to_numpy(np.int64)
        event_day = everyone["event_day"].to_numpy(np.int64)
        y = everyone["y"].to_numpy(np.int64)
        seen = (index_day + window <= as_of) | (event_day >= 0)
        known = np.where(y[seen] == 1, event_day[seen], index_day[seen] + window)
        order = np.lexsort((known, group[seen]))
        for label, chart in work.charts["cusum"].items():
            if label.startswith(f"{metric.id}:"):
                assert chart["group"].dtype == np.int64 and chart["day"].dtype == np.int64
                assert np.array_equal(chart["group"], group[seen][order])
                assert np.array_equal(chart["day"], known[order])
                checked += 1
    assert checked >= 3


@pytest.mark.parametrize("metric_id", ["cement_leak", "new_fracture"])
def test_risk_training_rows_equal_the_mature_units_known_before_the_quarter(snapshot,
                                                                            metric_id):
    """The training rows taken from every unit by one mask equal the mature units' copy
    filtered by ``known_before_quarter`` (what the monitor fitted on before), row for row."""
    from pipelines.surveillance.engine import _Computation
    from pipelines.surveillance.outcomes import COVARIATES

    metric = PROFILE.metric(metric_id)
    work = _Computation(PROFILE, snapshot)
    everyone = derive_outcomes(snapshot, metric, include_immature=True,
                               columns=("site_code", "index_day", "y", "event_day",
                                        *COVARIATES))
    index_day = everyone["index_day"].to_numpy(np.int64)
    is_mature = index_day + int(metric.window_days) <= snapshot.as_of_day
    columns = ["y", "index_day", *COVARIATES]
    before = risk_model.known_before_quarter(everyone[columns].loc[is_mature],
                                             metric.window_days, snapshot.as_of_day)
    now = everyone[columns].loc[work._risk_training(metric, is_mature, index_day)]
    assert PROFILE.design.risk_refit == "quarterly" and 0 < len(now) < is_mature.sum()
    pd.testing.assert_frame_equal(now, before)
