"""The nightly monitor's shortcuts give exactly what they replace (issue 10 item 3)."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd

from pipelines.ingest import ingest_paths
from pipelines.surveillance import beyond_run, engine, funnel, risk_model, threshold_store
from pipelines.surveillance.engine import _month_labels, _months_of, run_monitor
from pipelines.surveillance.outcomes import COVARIATES
from pipelines.surveillance.risk_model import RiskModel
from tests.beyond_helpers import write_registry


def test_months_of_equals_numpys_calendar_conversion():
    rng = np.random.default_rng(3)
    # leap years, the 1970 origin, days before it, one day, and unsorted input
    for day in (rng.integers(-800, 20_500, 50_000), np.arange(-400, 800), np.array([11_016]),
                rng.integers(19_000, 19_100, 7)[::-1]):
        expected = day.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)
        assert np.array_equal(_months_of(day), expected)
        assert _months_of(day).dtype == np.int64
    assert _months_of(np.array([], dtype=np.int64)).shape == (0,)
    codes, labels = _month_labels(np.array([19_723, 19_754, 19_723]))  # 2024-01-01, 2024-02-01
    assert codes.tolist() == [0, 1, 0] and labels == ["2024-01", "2024-02"]


def test_the_training_units_risks_are_their_entries_of_every_units_risks():
    """The design case mix is taken from the prediction for all units: bit for bit."""
    rng = np.random.default_rng(5)
    n = 20_000
    units = pd.DataFrame({
        "age_years": rng.integers(50, 95, n), "sex": pd.Categorical(
            rng.choice(["F", "M", "U"], n)), "steroid_use": rng.random(n) < 0.2,
        "levels_treated": rng.integers(1, 4, n), "indication": pd.Categorical(
            rng.choice(["osteoporosis", "malignancy", "haemangioma", "other"], n)),
        "anaesthesia": pd.Categorical(rng.choice(["local", "general"], n)),
        "balloons": rng.integers(1, 3, n)})
    assert set(COVARIATES) <= set(units.columns)
    model = RiskModel(metric="m", baseline=0.1, kind="logistic",
                      terms=("age10", "sex_M", "steroid_use", "extra_levels",
                             "indication_malignancy", "anaesthesia_general", "extra_balloon"),
                      coefficients={"intercept": -2.2, "age10": 0.31, "sex_M": -0.17,
                                    "steroid_use": 0.45, "extra_levels": 0.12,
                                    "indication_malignancy": 0.8,
                                    "anaesthesia_general": -0.05, "extra_balloon": 0.07},
                      calibration_shift=0.013)
    training = rng.random(n) < 0.7
    every = model.predict(units)
    assert np.array_equal(every[training], model.predict(units.loc[training]))


def test_a_stored_design_is_parsed_once_and_handed_out_as_fresh_copies():
    store = threshold_store.ThresholdStore("p", "1")
    curve = (np.array([0.5, 1.0, 2.0]), np.array([1.0, 10.0, 100.0]))
    key = store.key("curve", threshold_store._canonical({"x": 1}))
    store.stored[key] = threshold_store._encode(curve)
    store.stored[store.key("h", threshold_store._canonical({"x": 2}))] = (
        threshold_store._encode(0.1 + 0.2))
    never = lambda: (_ for _ in ()).throw(AssertionError("computed"))  # noqa: E731
    with threshold_store.active(store):
        first = threshold_store.cached("curve", {"x": 1}, never)
        first[0][0] = -1.0  # a caller changing what it was given
        second = threshold_store.cached("curve", {"x": 1}, never)
        assert threshold_store.cached("h", {"x": 2}, never) == 0.1 + 0.2
    assert second[0].tolist() == [0.5, 1.0, 2.0] and second[1].tolist() == [1.0, 10.0, 100.0]
    assert second[0] is not first[0]
    assert store.counts() == {"read": 3, "computed": 0}


def test_one_sided_funnel_pvalues_are_exact_binomial_pvalues_sides():
    rng = np.random.default_rng(11)
    n = rng.integers(0, 400, (60, 30))
    n[3] = 0  # a site without units: NaN, as before
    events = rng.binomial(n, 0.12)
    for p0 in (0.05, 0.12, 0.3):
        upper, lower, _ = funnel.exact_binomial_pvalues(events, n, p0)
        for direction, expected in (("up", upper), ("down", lower)):
            got = funnel.one_sided_pvalue(events, n, p0, direction)
            assert np.array_equal(got, expected, equal_nan=True)
            assert np.isnan(got[3]).all()


def test_the_site_charts_reuse_the_device_charts_training_digest_of_the_same_units(
        tmp_path, sqlite_url, settings_for, monkeypatch):
    """Every digest handed out (memoised or not) is the digest of the units asked about."""
    planted = write_registry(tmp_path / "in", days=300)
    settings = settings_for(sqlite_url)
    assert ingest_paths(settings, planted["paths"]).exit_code == 0
    seen = []
    real = risk_model.shared_training_digest

    def checked(memo, key, units):
        known = key in memo
        digest = real(memo, key, units)
        assert digest == risk_model.training_digest(units), key
        seen.append((key[0], known))
        return digest

    monkeypatch.setattr(engine, "shared_training_digest", checked)
    monkeypatch.setattr(beyond_run, "shared_training_digest", checked)
    run_monitor(settings, planted["end"] - timedelta(days=1))
    # the operator charts' cement_leak fit came first; the site charts' read its digest
    assert ("cement_leak", False) in seen and ("cement_leak", True) in seen


def test_a_shared_training_digest_is_recomputed_for_other_units():
    units = pd.DataFrame({"y": [0, 1, 0, 0], "age_years": [70, 80, 75, 90],
                          "sex": pd.Categorical(["F", "M", "F", "F"]),
                          "steroid_use": [False, True, False, False],
                          "levels_treated": [1, 2, 1, 1],
                          "indication": pd.Categorical(["osteoporosis"] * 4),
                          "anaesthesia": pd.Categorical(["local"] * 4), "balloons": [2] * 4})
    memo: dict = {}
    first = risk_model.shared_training_digest(memo, ("m", 1), units)
    assert first == risk_model.training_digest(units)
    assert risk_model.shared_training_digest(memo, ("m", 1), units) == first
    other = units.assign(y=[1, 1, 0, 0])  # a late complication: one more event
    assert risk_model.shared_training_digest(memo, ("m", 1), other) == (
        risk_model.training_digest(other)) != first
    # the same size and events, other covariates (a corrected age): not the first's digest
    corrected = units.assign(age_years=[70, 80, 75, 60])
    assert risk_model.shared_training_digest(memo, ("m", 1), units) == first
    assert risk_model.shared_training_digest(memo, ("m", 1), corrected) == (
        risk_model.training_digest(corrected)) != first
