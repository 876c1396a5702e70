"""Parts of issue 12: migration 8 on an older warehouse, simulator drifts, profile checks, h."""

from __future__ import annotations

import copy
import csv
import json
from datetime import date

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from pipelines import schema
from pipelines.errors import InputRejected
from pipelines.settings import REPO_DIR
from pipelines.simulate import parse_drift, simulate
from pipelines.surveillance.beyond import (
    fir_arl,
    learning_budget,
    learning_false_signals,
    operator_thresholds,
    parse_beyond_site,
    rate_per_unit_year,
    steady_rate,
)
from pipelines.surveillance.operators import fir_cusum, new_operators, operator_pseudonym
from pipelines.surveillance.profile import ProfileError, load_profile, parse_profile

DEVICE_COLUMNS = ("balloon_product", "cement_product", "cement_lot", "udi_di")


def test_migration_8_upgrades_a_version_6_warehouse_with_data(db_url):
    engine = sa.create_engine(db_url)
    schema.migrate(engine)
    with engine.begin() as conn:  # turn it back into a version-6 warehouse holding a row
        for table in schema.BEYOND_SITE_TABLES:
            table.drop(conn)
        for table in ("procedure", "procedure_version"):
            for column in DEVICE_COLUMNS:
                conn.exec_driver_sql(f'ALTER TABLE "{table}" DROP COLUMN {column}')
        conn.execute(schema.schema_version.delete().where(schema.schema_version.c.version == 8))
        conn.exec_driver_sql(
            "INSERT INTO procedure (procedure_id, site_id, patient_hash, procedure_date, "
            "levels_treated, indication, anaesthesia, balloons, age_years, sex, steroid_use, "
            "mdt_discussed, source_checksum, extract_ts) VALUES ('P1', 'S001', 'h', "
            "'2024-01-01', 1, 'other', 'local', 1, 70, 'F', false, true, 'c', 't')")
    schema.migrate(engine)
    with engine.connect() as conn:
        row = conn.execute(sa.select(schema.procedure)).mappings().one()
        versions = set(conn.scalars(sa.select(schema.schema_version.c.version)))
        tables = set(sa.inspect(conn).get_table_names())
    engine.dispose()
    assert 8 in versions and {t.name for t in schema.BEYOND_SITE_TABLES} <= tables
    assert row["procedure_id"] == "P1" and all(row[c] is None for c in DEVICE_COLUMNS)


@pytest.mark.parametrize(("text", "phrase"), [
    ("PRODUCT:NOPE:cement_leak:2:2024-01-01", "product must be one of"),
    ("LOT:=BAD:cement_leak:2:2024-01-01", "lot must match"),
    ("OPERATOR:S001:cement_leak:3:30", "operator must be SITE-NN"),
    ("OPERATOR:S001-01:cement_leak:3:soon", "FIRST_N"),
    ("OPERATOR:S001-01:new_fracture:3:30", "metric must be one of"),
    ("LOT:HVR-202401:cement_leak:0:2024-01-01", "above 0"),
])
def test_bad_device_drifts_are_rejected_in_one_line(text, phrase):
    with pytest.raises(InputRejected, match=phrase):
        parse_drift(text)


@pytest.mark.parametrize("text", [
    "PRODUCT:VERTOBAL-15:cement_leak:2:2024-01-01",
    "LOT:HVR-202401:major_event:4:2024-01-01",
    "OPERATOR:S002-03:cement_leak:3:30",
    "S001:cement_leak:2:2024-01-01",
])
def test_drift_specs_parse_back(text):
    assert parse_drift(text).spec() == text


def test_simulator_writes_devices_and_drifts_exactly_the_named_cases(tmp_path):
    out = tmp_path / "sim"
    manifest = simulate(out, sites=3, start=date(2023, 1, 1), end=date(2023, 12, 31), seed=5,
                        drifts=["OPERATOR:S001-01:cement_leak:3:30",
                                "LOT:HVR-202306:cement_leak:4:2023-06-01"])
    rows = [row for path in sorted(out.glob("procedures_*.csv"))
            for row in csv.DictReader(path.open())]
    assert {r["cement_lot"][:4] for r in rows} <= {"HVR-", "OSV-", "VCV-"}
    assert all(r["balloon_product"] and r["udi_di"] for r in rows)
    lots = {r["cement_lot"] for r in rows if r["cement_lot"] == "HVR-202306"}
    assert lots, "the drifted lot was used"
    by_target = {d["target"]: d["procedures_affected"] for d in manifest["drift"]}
    operator_cases = {r["procedure_id"] for r in rows if r["operator_ref"] == "OP-S001-01"}
    assert by_target["OPERATOR"] == min(30, len(operator_cases))
    assert by_target["LOT"] == len({r["procedure_id"] for r in rows
                                    if r["cement_lot"] == "HVR-202306"})
    json.dumps(manifest)  # still JSON


def test_device_drifts_leave_every_other_value_unchanged(tmp_path):
    simulate(tmp_path / "a", sites=2, start=date(2023, 1, 1), end=date(2023, 6, 30), seed=9)
    drifted = simulate(tmp_path / "b", sites=2, start=date(2023, 1, 1), end=date(2023, 6, 30),
                       seed=9, drifts=["PRODUCT:KYPHON-EXPRESS-II:major_event:50:2023-01-01"])
    assert drifted["drift"][0]["procedures_affected"] > 0
    procedures = sorted(p.name for p in (tmp_path / "a").glob("procedures_*.csv"))
    for name in procedures:  # the procedures, devices included, are the same
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    complications = sorted(p.name for p in (tmp_path / "a").glob("complications_*.csv"))
    assert any((tmp_path / "a" / n).read_text() != (tmp_path / "b" / n).read_text()
               for n in complications)


def _profile_with(change):
    profile = load_profile(REPO_DIR / "profiles" / "htg108.yaml")
    data = copy.deepcopy(profile.raw)
    change(data["beyond_site"])
    return parse_profile(data)


@pytest.mark.parametrize(("change", "phrase"), [
    (lambda d: d["operators"].update(head_start=1.5), "operators.head_start"),
    (lambda d: d["operators"].update(learning_share=1.0), "operators.learning_share"),
    (lambda d: d["operators"].pop("tenure_years"), "operators.tenure_years"),
    (lambda d: d["operators"].update(cusum_metric="new_fracture"), "per-procedure outcome"),
    (lambda d: d["devices"].update(failure_event_types=["bent_needle"]), "failure_event_types"),
    (lambda d: d["regulator"].update(device_related=[]), "needs at least one rule"),
    (lambda d: d["regulator"].update(send_within_days=0), "send_within_days"),
])
def test_bad_beyond_site_settings_name_the_key(change, phrase):
    with pytest.raises(ProfileError, match=phrase):
        parse_beyond_site(_profile_with(change))


def _operator_design():
    profile = load_profile(REPO_DIR / "profiles" / "htg108.yaml")
    design = parse_beyond_site(profile).operators
    return design, rate_per_unit_year(profile, profile.metric(design.cusum_metric))


@pytest.mark.parametrize("volume", [30, 60, 200])
def test_new_operator_thresholds_spend_the_tenure_budget(volume):
    design, rate = _operator_design()
    p0 = 0.106  # the network mean risk as the thresholds round it (three figures)
    h = operator_thresholds(p0, design, volume, rate, new=True)
    alpha = learning_budget(design, rate)
    assert alpha == pytest.approx(design.learning_share * rate * design.tenure_years)
    # h1 spends the learning budget over the first N procedures, and not much less
    spent = learning_false_signals(p0, 3.0, h.learning, 0.5, design.learning_procedures)
    assert alpha * 0.9 <= spent <= alpha * 1.005
    assert learning_false_signals(p0, 3.0, h.learning * 0.9, 0.5,
                                  design.learning_procedures) > alpha
    # h2: the rest of the tenure budget over the remaining years, ARL read from the head start
    years = design.tenure_years - design.learning_procedures / volume
    assert alpha + steady_rate(design, rate, volume) * years == pytest.approx(
        rate * design.tenure_years)
    arl = fir_arl(p0, p0, 3.0, h.steady, 0.5)
    assert arl == pytest.approx(volume / steady_rate(design, rate, volume), rel=0.03)
    assert h.steady >= h.learning
    assert h.per_case(40).tolist() == [h.learning] * 30 + [h.steady] * 10
    # h1 does not depend on volume (the phase is counted in procedures)
    assert operator_thresholds(p0, design, 2 * volume, rate, new=True).learning == h.learning


def test_established_operator_has_no_learning_phase_and_spends_the_rate():
    design, rate = _operator_design()
    h = operator_thresholds(0.106, design, 60, rate, new=False)
    assert h.learning is None and h.start == 0.0 and set(h.per_case(5).tolist()) == {h.steady}
    assert fir_arl(0.106, 0.106, 3.0, h.steady, 0.5) == pytest.approx(60 / rate, rel=0.03)


def test_learning_false_signals_match_a_simulation_with_restarts():
    p0, h, head_start, n = 38 / 360, 2.5, 0.5, 30  # a low h: several signals per run
    expected = learning_false_signals(p0, 3.0, h, head_start, n)
    rng = np.random.default_rng(3)
    runs = 20_000
    y = rng.random((runs, n)) < p0
    signals = sum(len(fir_cusum(row, np.full(n, p0), 3.0, h, head_start).signals) for row in y)
    standard_error = np.sqrt(expected / runs)  # about Poisson
    assert abs(signals / runs - expected) < 4 * standard_error + 0.01 * expected


def test_fir_cusum_restarts_at_the_head_start_and_pseudonyms_hide_the_digest():
    path = fir_cusum([1, 1, 1, 1, 0], [0.1] * 5, 3.0, 1.8, 0.5)
    # an event weighs ln 3 - ln 1.2 = 0.92: from h/2 = 0.9 one event crosses h = 1.8 each time
    assert path.signals.tolist() == [0, 1, 2, 3]
    assert path.statistic[-1] == pytest.approx(0.9 - 0.1823, abs=1e-3)
    digest = "ab" * 32
    assert operator_pseudonym(digest) == "OP-ababababab" and digest not in operator_pseudonym(digest)


def test_fir_cusum_uses_the_threshold_in_force_and_can_start_at_zero():
    # an event weighs ln 3 - ln 1.2 = 0.916; a non-event -0.182
    y, p = [1, 1, 1, 1, 1], [0.1] * 5
    path = fir_cusum(y, p, 3.0, [1.8, 1.8, 4.0, 4.0, 4.0], 0.5, start=0.0)
    # from 0: 0.92, 1.83 (signal at h1 = 1.8, restart at 0.9), 1.82, 2.73, 3.65 (< h2 = 4)
    assert path.signals.tolist() == [1]
    assert path.statistic[0] == pytest.approx(0.9163, abs=1e-3)
    assert path.statistic[-1] == pytest.approx(0.9 + 3 * 0.9163, abs=1e-3)


def test_new_operators_are_those_who_began_after_the_sites_data():
    known = pd.DataFrame({
        "site_id": ["S1"] * 4 + ["S2"] * 2,
        "operator_hash": ["a", "b", "c", "a", "a", "b"],
        "index_day": [100, 250, 281, 400, 0, 181],
    })
    is_new = new_operators(known, 180)
    # S1 begins on day 100: b (day 250) is within 180 days, c (281) is not; S2 begins at 0
    assert is_new.to_dict() == {("S1", "a"): False, ("S1", "b"): False, ("S1", "c"): True,
                                ("S2", "a"): False, ("S2", "b"): True}


@pytest.mark.parametrize(("events", "n", "expected"), [
    (0, 5, 38 / 360),  # a young warehouse: the guidance's pooled rate
    (9, 100, 38 / 360),
    (30, 30, 38 / 360),  # no non-events
    (30, 200, 0.15),  # enough data: the network's observed rate
])
def test_calibration_rate_falls_back_to_the_guidance(events, n, expected):
    from pipelines.surveillance.devices import calibration_rate

    metric = load_profile(REPO_DIR / "profiles" / "htg108.yaml").metric("cement_leak")
    units = pd.DataFrame({"y": [1] * events + [0] * (n - events)})
    assert calibration_rate(metric, units) == pytest.approx(expected)


def test_clinical_leads_setting_maps_sites_and_rejects_a_bad_pair():
    from pipelines.settings import ConfigurationError, load_settings

    settings = load_settings({"KYPHOWATCH_CLINICAL_LEADS": "S001=a@x.org, S001=b@x.org,S002=c@y.org"})
    assert settings.clinical_leads == {"S001": ("a@x.org", "b@x.org"), "S002": ("c@y.org",)}
    with pytest.raises(ConfigurationError, match="SITE=address"):
        load_settings({"KYPHOWATCH_CLINICAL_LEADS": "S001:a@x.org"})


def test_operator_charts_give_a_new_operator_the_learning_phase_and_not_an_established_one():
    from dataclasses import replace

    from pipelines.surveillance.operators import operator_charts, operator_volume

    profile = load_profile(REPO_DIR / "profiles" / "htg108.yaml")
    design, rate = _operator_design()
    p = 0.1
    # "a" practises every day from the site's first; "b" begins on day 300 (5 cases, no
    # event). They share the quarter of days 273-363 (day 364 begins the next), where all 4 events are a's.
    events = {280, 290, 310, 320}
    units = pd.DataFrame({
        "site_id": "S1", "operator_hash": ["a" * 64] * 365 + ["b" * 64] * 5,
        "index_day": list(range(365)) + list(range(300, 305)),
        "y": [int(d in events) for d in range(365)] + [0] * 5, "risk": p,
    }).sort_values("index_day", kind="stable")
    rows = {r["operator"]: r for r in operator_charts(units, profile, design, as_of_day=364)}
    established, new = rows["OP-" + "a" * 10], rows["OP-" + "b" * 10]
    share_b = 5 / 96  # b's share of the quarter's case-mix risk (a 91 cases, b 5)
    # b's learning phase is designed as 30 x (4 charted events / 5 shared procedures) steps
    # (the share on its 0.05 grid; volume over the time to the latest charted event, day 320)
    h1 = operator_thresholds(0.05, replace(design, learning_procedures=24),
                             operator_volume(4, 300, 320), rate, new=True).learning
    assert new["threshold"] == h1  # 5 cases: still in the learning phase
    # the new chart starts at the head start and loses ln(1 + 2 pi) per event of a's
    assert new["statistic"] == pytest.approx(0.5 * h1 - 4 * np.log1p(2 * share_b))
    assert established["threshold"] == operator_thresholds(
        0.95, design, operator_volume(4, 0, 320), rate, new=False).steady
    # an established chart starts at 0; a's four events gain ln(3 / (1 + 2 pi)) each
    assert established["statistic"] == pytest.approx(4 * np.log(3 / (1 + 2 * 91 / 96)))
    assert (new["procedures"], established["procedures"]) == (5, 91)  # the shared quarter
    assert new["signals"] == established["signals"] == 0


def test_operator_volume_counts_observed_time_floored_at_a_quarter():
    from pipelines.surveillance.operators import operator_volume

    assert operator_volume(30, 0, 182) == pytest.approx(30 / (183 / 365.25))  # not 30 a year
    assert operator_volume(5, 0, 9) == pytest.approx(20.0)  # ten days: a quarter's floor
    assert operator_volume(120, 0, 730) == pytest.approx(120 / (731 / 365.25))


# --- products against the other products (issue 12 follow-up: false device alarms) ---------


def test_rare_product_test_is_the_exact_binomial_given_all_events():
    from scipy import stats

    from pipelines.surveillance.devices import conditional_rare_pvalue

    as_of = 1000
    day = np.full(50, as_of - 10)  # one stratum: the newest quarter
    y = np.r_[np.ones(9), np.zeros(41)].astype(np.int64)
    other_day = np.full(150, as_of - 20)
    other_y = np.r_[np.ones(6), np.zeros(144)].astype(np.int64)
    events, expected, p_value = conditional_rare_pvalue(
        day, y, np.full(50, 0.02), other_day, other_y, np.full(150, 0.02), as_of)
    assert events == 9
    assert expected == pytest.approx(15 * 0.25)  # 15 events, the product's quarter of the risk
    assert p_value == pytest.approx(stats.binom.sf(8, 15, 0.25))
    old = day - 400  # outside the 365-day window: not counted
    assert conditional_rare_pvalue(old, y, np.full(50, 0.02), other_day, other_y,
                                   np.full(150, 0.02), as_of)[0] == 0


def test_rare_product_test_holds_its_size_when_the_comparators_are_noisy():
    """A product at the comparators' rate: the test's size stays at alpha.

    Testing against an expected count recalibrated to the comparators' observed count (the
    1.3.0 code) takes their Poisson noise for knowledge and rejects several times too often.
    """
    from pipelines.surveillance.devices import conditional_rare_pvalue
    from pipelines.surveillance.rare import poisson_upper_pvalue

    rng = np.random.default_rng(12)
    alpha, runs, expected_mine, expected_others = 0.005, 4000, 20.0, 60.0
    mine_events = rng.poisson(expected_mine, runs)
    other_events = rng.poisson(expected_others, runs)
    as_of = 500
    ours = old = 0
    for o, c in zip(mine_events.tolist(), other_events.tolist(), strict=True):
        # one case per event plus event-free cases carrying the expected risk
        day, other_day = np.full(o + 1, as_of), np.full(c + 1, as_of)
        y, other_y = np.r_[np.ones(o), 0].astype(np.int64), np.r_[np.ones(c), 0].astype(np.int64)
        risk = np.r_[np.zeros(o), expected_mine]
        other_risk = np.r_[np.zeros(c), expected_others]
        ours += conditional_rare_pvalue(day, y, risk, other_day, other_y, other_risk,
                                        as_of)[2] <= alpha
        recalibrated = expected_mine * c / expected_others
        old += poisson_upper_pvalue(o, recalibrated) <= alpha if o else False
    assert ours / runs <= alpha * 1.3  # exact (conservative) test; Monte Carlo tolerance
    assert old / runs > 2 * alpha  # the recalibrated expected overspends: this test can fail
