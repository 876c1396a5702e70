"""Stored threshold designs (schema version 9): computed once, read by every later process."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from pipelines.db import make_engine
from pipelines.schema import complication, procedure, threshold_design
from pipelines.surveillance import threshold_store
from pipelines.surveillance.arl import threshold_for_arl_risk_adjusted
from pipelines.surveillance.engine import (
    CASE_MIX_H_TOLERANCE,
    binned_case_mix,
    case_mix_risks,
    risk_adjusted_threshold,
)
from tests.test_engine import build_sites

REPO = Path(__file__).resolve().parents[1]

# Runs the monitor in a fresh interpreter (as an Airflow task does) and prints what it did.
_MONITOR = """
import json, sys
from pipelines.settings import load_settings
from pipelines.surveillance import threshold_store
from pipelines.surveillance.engine import run_monitor
settings = load_settings({"KYPHOWATCH_DEMO": "1", "KYPHOWATCH_REPORT_DIR": sys.argv[2]},
                         db_url=sys.argv[1])
result = run_monitor(settings)
fields = ("signal_key", "statistic", "threshold", "observed", "expected", "n", "detail")
print(json.dumps({
    "computed_in_process": threshold_store.computations(),
    "run": result.thresholds,
    "signals": [{k: s[k] for k in fields} for s in result.signals],
}, default=str))
"""


def _monitor_in_fresh_process(db_url: str, tmp_path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _MONITOR, db_url, str(tmp_path / "reports")],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_monitor_in_a_fresh_process_computes_no_thresholds(db_url, tmp_path):
    engine = make_engine(db_url)
    # Fractures, so that the time-to-event chart runs (and designs its Poisson threshold).
    build_sites(engine, sites=5, per_site=300, leak={"S005": 0.3}, fracture_rate=0.2)
    first = _monitor_in_fresh_process(db_url, tmp_path)
    with engine.connect() as conn:
        kinds = set(conn.scalars(sa.select(threshold_design.c.kind)))
    second = _monitor_in_fresh_process(db_url, tmp_path)
    engine.dispose()
    assert first["computed_in_process"] > 0 and first["run"]["computed"] > 0
    assert {"bernoulli_arl_curve", "poisson_threshold"} <= kinds
    assert second["computed_in_process"] == 0
    assert second["run"] == {"read": second["run"]["read"], "computed": 0}
    assert second["run"]["read"] >= first["run"]["computed"]
    assert first["signals"] and second["signals"] == first["signals"]


def test_a_stored_value_reads_back_bit_for_bit_and_a_race_is_harmless(sqlite_url):
    engine = make_engine(sqlite_url)
    curve = (np.array([0.25, 0.5]), np.array([[np.log(3.0), 1 / 3], [2.0, np.pi]]))
    stores = [threshold_store.open_store(engine, "p", "1") for _ in range(2)]
    for store in stores:  # both computed the design before either saved it
        with threshold_store.active(store):
            threshold_store.cached("test_curve", {"x": 1}, lambda: curve)
            threshold_store.cached("test_h", {"x": 1}, lambda: 0.1 + 0.2)
    for store in stores:
        threshold_store.save_store(engine, store)
    fresh = threshold_store.open_store(engine, "p", "1")
    with threshold_store.active(fresh):
        read = threshold_store.cached("test_curve", {"x": 1}, lambda: None)
        h = threshold_store.cached("test_h", {"x": 1}, lambda: None)
    assert fresh.counts() == {"read": 2, "computed": 0}
    assert h == 0.1 + 0.2
    for a, b in zip(read, curve, strict=True):
        assert np.array_equal(a, b)
    other = threshold_store.open_store(engine, "p", "2")  # another profile version
    assert not other.stored
    engine.dispose()


def test_the_risk_adjusted_threshold_is_stored_under_its_binned_case_mix(sqlite_url):
    engine = make_engine(sqlite_url)
    rng = np.random.default_rng(4)
    risks = 1.0 / (1.0 + np.exp(-(np.log(0.2 / 0.8) + rng.normal(0.0, 0.7, 5_000))))
    first = threshold_store.open_store(engine, "p", "1")
    with threshold_store.active(first):
        h = risk_adjusted_threshold(risks, 2.0, 150.0)
    threshold_store.save_store(engine, first)
    second = threshold_store.open_store(engine, "p", "1")
    with threshold_store.active(second):
        # the same case mix in another order: the same bins, read, not simulated again
        again = risk_adjusted_threshold(risks[::-1], 2.0, 150.0)
    with engine.connect() as conn:
        kinds = list(conn.scalars(sa.select(threshold_design.c.kind)))
    engine.dispose()
    assert first.counts()["computed"] + first.counts()["read"] >= 1
    assert second.counts() == {"read": 1, "computed": 0}
    assert again == h and "ra_cusum_h_simulated" in kinds


def test_binning_the_case_mix_moves_h_less_than_the_stated_tolerance():
    # A skewed case mix (logit-normal, sd 1, mean risk about 0.25): h over the full fitted
    # risks and over the 100 binned ones, averaged over two simulation seeds.
    rng = np.random.default_rng(5)
    logit = np.log(0.23 / 0.77) + rng.normal(0.0, 1.0, 100_000)
    risks = 1.0 / (1.0 + np.exp(-logit))
    binned = case_mix_risks(binned_case_mix(risks))
    assert binned.size == 100
    full = np.mean([threshold_for_arl_risk_adjusted(risks, 2.0, 2000, n_runs=4000, seed=s)
                    for s in (1, 2)])
    coarse = np.mean([threshold_for_arl_risk_adjusted(binned, 2.0, 2000, n_runs=4000, seed=s)
                      for s in (1, 2)])
    assert abs(full - coarse) < CASE_MIX_H_TOLERANCE


def test_a_new_day_of_cases_keeps_the_binned_case_mix():
    rng = np.random.default_rng(6)
    risks = 1.0 / (1.0 + np.exp(-(np.log(0.11 / 0.89) + rng.normal(0.0, 0.5, 200_000))))
    more = np.r_[risks, rng.choice(risks, 200)]
    assert np.array_equal(binned_case_mix(risks), binned_case_mix(more))


# The monitor in a fresh interpreter, printing the designs it computed and its risk models.
_MONITOR_MODELS = """
import json, sys
from pipelines.settings import load_settings
from pipelines.surveillance import threshold_store
from pipelines.surveillance.engine import run_monitor
settings = load_settings({"KYPHOWATCH_DEMO": "1", "KYPHOWATCH_REPORT_DIR": sys.argv[2]},
                         db_url=sys.argv[1])
result = run_monitor(settings)
print(json.dumps({"as_of": str(result.as_of), "computed": threshold_store.computations(),
                  "models": result.models}, default=str))
"""


def _monitor_models(db_url: str, tmp_path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _MONITOR_MODELS, db_url,
                           str(tmp_path / "reports")],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_new_day_in_the_quarter_reuses_the_fit_and_h_and_restated_history_refits(
        db_url, tmp_path):
    # The bundled profile refits the case-mix model quarterly (design.risk_model.refit) on
    # units known before the quarter began: one more day is charted with the stored model
    # and the stored RA-CUSUM h (nothing computed), while a late complication of a case
    # from before the quarter changes the training set, so the model is fitted again.
    from tests.test_outcomes import complication_row, insert, procedure_row

    engine = make_engine(db_url)
    build_sites(engine, sites=5, per_site=300, leak={"S005": 0.3})
    first = _monitor_models(db_url, tmp_path)
    as_of = date.fromisoformat(first["as_of"])
    new_day = as_of + timedelta(days=1)
    assert (new_day.month - 1) // 3 == (as_of.month - 1) // 3, "the fixture ends mid-quarter"
    insert(engine, [procedure_row(f"NEW-{i}", "S001", new_day, age=70 + i) for i in range(3)],
           [])
    second = _monitor_models(db_url, tmp_path)
    leak_first, leak_second = first["models"]["cement_leak"], second["models"]["cement_leak"]
    assert first["computed"] > 0 and second["as_of"] == new_day.isoformat()
    assert second["computed"] == 0
    assert leak_first["kind"] == "logistic" and leak_second == leak_first
    quarter_start = date(as_of.year, 3 * ((as_of.month - 1) // 3) + 1, 1)
    assert leak_first["trained_on"] == f"units known before {quarter_start}"

    with engine.connect() as conn:  # a leak-free case from the first year, reported late
        old_id, old_day = conn.execute(
            sa.select(procedure.c.procedure_id, procedure.c.procedure_date)
            .where(procedure.c.procedure_date < quarter_start - timedelta(days=200),
                   procedure.c.procedure_id.not_in(sa.select(complication.c.procedure_id)))
            .order_by(procedure.c.procedure_id).limit(1)).one()
    old_day = old_day if isinstance(old_day, date) else date.fromisoformat(str(old_day))
    insert(engine, [], [complication_row(f"LATE-{old_id}", old_id, old_id[1:5], old_day)])
    third = _monitor_models(db_url, tmp_path)
    engine.dispose()
    assert third["computed"] >= 1
    assert third["models"]["cement_leak"]["events"] == leak_first["events"] + 1


# The monitor in a fresh interpreter, printing the designs it computed, whether a case-mix
# model was fitted anywhere in it (statsmodels' GLM imported), and the beyond-site tables.
_MONITOR_BEYOND = """
import json, sys
import sqlalchemy as sa
from pipelines.db import make_engine
from pipelines.schema import device_lot_test, device_product_chart, operator_chart
from pipelines.settings import load_settings
from pipelines.surveillance import threshold_store
from pipelines.surveillance.engine import run_monitor
settings = load_settings({"KYPHOWATCH_DEMO": "1", "KYPHOWATCH_REPORT_DIR": sys.argv[2]},
                         db_url=sys.argv[1])
result = run_monitor(settings)
tables = {}
with make_engine(sys.argv[1]).connect() as conn:
    for name, table in (("operators", operator_chart), ("products", device_product_chart),
                        ("lots", device_lot_test)):
        rows = conn.execute(sa.select(table)).mappings().all()
        tables[name] = [{k: v for k, v in r.items() if k not in ("run_key", "as_of")}
                        for r in rows]
print(json.dumps({"as_of": str(result.as_of), "computed": threshold_store.computations(),
                  "fitted": "statsmodels.genmod.generalized_linear_model" in sys.modules,
                  "tables": tables}, default=str))
"""


def _monitor_beyond(db_url: str, tmp_path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _MONITOR_BEYOND, db_url,
                           str(tmp_path / "reports")],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _by_key(rows: list[dict], key: tuple[str, ...]) -> dict[tuple, dict]:
    return {tuple(row[k] for k in key): row for row in rows}


def test_a_new_day_in_the_quarter_reads_the_beyond_site_fits_and_keeps_their_charts(
        db_url, tmp_path):
    # Operators, products and lots (beyond_run.py) follow the profile's quarterly refit: a
    # second nightly run in the same quarter, in a fresh process, fits no case-mix model at
    # all (site or beyond-site) and computes no design; an operator, product or lot whose
    # mature cases did not change keeps its expected count, and with the same h its chart.
    from tests.test_outcomes import complication_row, digest, insert, procedure_row

    start, days = date(2023, 1, 2), 540
    rng = np.random.default_rng(12)
    procs, comps = [], []
    for s in range(1, 6):
        site = f"S{s:03d}"
        offsets = np.sort(rng.integers(0, days, 300))
        leaks = rng.random(300) < (0.3 if site == "S005" else 38 / 360)
        for i, (offset, leaked) in enumerate(zip(offsets.tolist(), leaks.tolist(), strict=True)):
            pid, day = f"P{site}-{i:05d}", start + timedelta(days=offset)
            procs.append(procedure_row(
                pid, site, day, age=60 + (i % 30), steroid_use=bool(i % 7 == 0),
                operator_hash=digest(f"op-{site}-{i % 3}"),
                balloon_product=("BalloonA", "BalloonB")[i % 2],
                cement_product=("CementA", "CementB")[i % 2], cement_lot=f"LOT{i % 4}"))
            if leaked:
                comps.append(complication_row(f"C{pid}", pid, site, day))
    engine = make_engine(db_url)
    insert(engine, procs, comps)
    first = _monitor_beyond(db_url, tmp_path)
    as_of = date.fromisoformat(first["as_of"])
    new_day = as_of + timedelta(days=1)
    assert (new_day.month - 1) // 3 == (as_of.month - 1) // 3, "the fixture ends mid-quarter"
    insert(engine, [procedure_row(f"NEW-{i}", "S001", new_day, age=70 + i,
                                  operator_hash=digest("op-S001-0"),
                                  balloon_product="BalloonA", cement_product="CementA",
                                  cement_lot="LOT0") for i in range(3)], [])
    engine.dispose()
    second = _monitor_beyond(db_url, tmp_path)
    assert second["as_of"] == new_day.isoformat()
    assert first["computed"] > 0 and first["fitted"]
    assert second["computed"] == 0 and not second["fitted"]

    keys = {"operators": ("site_id", "operator", "metric"), "products": ("product", "metric"),
            "lots": ("product", "lot", "metric")}
    unchanged = same_h = 0
    for name, key in keys.items():
        before, after = _by_key(first["tables"][name], key), _by_key(second["tables"][name], key)
        assert before and before.keys() == after.keys()
        for k, row in before.items():
            if (row["procedures"], row["events"]) != (after[k]["procedures"],
                                                      after[k]["events"]):
                continue
            if name != "lots":
                # Operators and products are charted within sites: a colleague's case that
                # matured today moves the cell's share pi, and with it the expected count
                # (docs/statistics.md section 9); what must not move is the model, asserted
                # above (nothing fitted, no design computed).
                continue
            unchanged += 1
            # The same stored model: the same expected risks, hence the same expected count.
            assert after[k]["expected"] == row["expected"], (name, k)
            # A chart's h is not the model's: an operator's follows their volume a year
            # (cases over their tenure up to as_of) and the network's mean risk over all
            # mature units, which a new day may nudge; with the same h, the same chart.
            if after[k].get("threshold") == row.get("threshold"):
                same_h += 1
                assert after[k] == row, (name, k)
    assert unchanged > 0 and same_h > 0
