"""Tests of the synthetic registry generator: reproducibility, calibration, drift, files, defects.

Statistical tolerances are derived from the binomial standard deviation (4 SD), never tuned by
hand; every run uses a fixed seed, so the tests are deterministic.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines import contract
from pipelines.cli import main
from pipelines.errors import InputRejected
from pipelines.simulate import (
    DEFECTS,
    FRACTURE_RATE_PER_PATIENT,
    LEAK_RATE,
    MAJOR_EVENT_RATE,
    SYMPTOMATIC_LEAK_RATE,
    Drift,
    calibrated_intercepts,
    parse_drift,
    simulate,
)

MAJOR_TYPES = ("death", "paralysis", "cord_compression", "canal_intrusion", "motor_deficit",
               "radiculopathy", "paraesthesia")
SMALL = dict(sites=8, start=date(2023, 1, 1), end=date(2023, 12, 31), seed=11)


def read_kind(out: Path, kind: str) -> pd.DataFrame:
    """Read every extract of one kind, oldest first, with the extract date of each row."""
    frames = []
    for path in sorted(out.glob(f"{kind}_*.csv")):
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        frame["extract"] = pd.Timestamp(contract.extract_stamp(path.name)[:8])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def newest(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    return frame.sort_values("extract", kind="stable").drop_duplicates(key, keep="last")


def bad_cells(row: dict, kind: str, extract: date) -> list[str]:
    """Return the contract rules a row breaks (the test's own reading of the contract)."""
    problems = []
    for spec in contract.COLUMNS[kind]:
        value = row[spec.name]
        if value == "":
            if spec.required:
                problems.append(f"empty {spec.name}")
            continue
        if value[0] in "=+-@":
            problems.append(f"formula {spec.name}")
        if spec.dtype == "id" and not re.match(contract.ID_PATTERN, value):
            problems.append(f"id {spec.name}")
        elif spec.dtype == "site" and not re.match(contract.SITE_PATTERN, value):
            problems.append(f"site {spec.name}")
        elif spec.dtype == "level" and not re.match(contract.LEVEL_PATTERN, value):
            problems.append(f"level {spec.name}")
        elif spec.dtype == "enum" and value not in spec.allowed:
            problems.append(f"enum {spec.name}")
        elif spec.dtype == "bool" and value not in ("true", "false"):
            problems.append(f"bool {spec.name}")
        elif spec.dtype == "int" and not (value.isdigit() and spec.low <= int(value) <= spec.high):
            problems.append(f"range {spec.name}")
        elif spec.dtype == "date":
            try:
                parsed = date.fromisoformat(value)
            except ValueError:
                problems.append(f"date {spec.name}")
                continue
            if not re.match(r"^\d{4}-\d{2}-\d{2}$", value):
                problems.append(f"date {spec.name}")
            if parsed > extract:
                problems.append(f"future {spec.name}")
    return problems


def sd_tolerance(p: float, n: int) -> float:
    return 4 * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, dict]:
    """A large single-file sample (about 150,000 procedures) for the calibration checks."""
    out = tmp_path_factory.mktemp("big")
    manifest = simulate(out, sites=300, start=date(2021, 1, 1), end=date(2023, 12, 31), seed=5,
                        single_file=True)
    return out, manifest


@pytest.fixture(scope="module")
def monthly(tmp_path_factory) -> tuple[Path, dict]:
    """A clean monthly series with corrections and late complications."""
    out = tmp_path_factory.mktemp("monthly")
    manifest = simulate(out, sites=30, start=date(2022, 1, 1), end=date(2024, 6, 30), seed=3)
    return out, manifest


# --- reproducibility -------------------------------------------------------------------------


def file_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    options = dict(SMALL, bad_row_rate=0.1, drifts=[parse_drift("S002:cement_leak:3:2023-06-01")])
    simulate(tmp_path / "a", **options)
    simulate(tmp_path / "b", **options)
    simulate(tmp_path / "c", **dict(options, seed=12))
    first, second, other = (file_bytes(tmp_path / name) for name in "abc")
    assert first == second
    assert len(first) == 12 * 2 + 1
    assert first["procedures_20231231.csv"] != other["procedures_20231231.csv"]


def test_drift_and_bad_rows_leave_everything_else_unchanged(tmp_path):
    simulate(tmp_path / "plain", **SMALL)
    simulate(tmp_path / "drift", **SMALL, drifts=[parse_drift("S003:cement_leak:5:2023-01-01")])
    plain, drifted = read_kind(tmp_path / "plain", "complications"), read_kind(
        tmp_path / "drift", "complications")
    assert file_bytes(tmp_path / "plain").keys() == file_bytes(tmp_path / "drift").keys()
    for name, content in file_bytes(tmp_path / "plain").items():
        if name.startswith("procedures_"):
            assert (tmp_path / "drift" / name).read_bytes() == content
    others = plain[plain.site_id != "S003"].reset_index(drop=True)
    assert others.equals(drifted[drifted.site_id != "S003"].reset_index(drop=True))
    leaks = [(frame.site_id.eq("S003") & frame.event_type.eq("cement_leak")).sum()
             for frame in (plain, drifted)]
    assert leaks[1] > leaks[0]


# --- calibration -----------------------------------------------------------------------------


def test_intercepts_reproduce_the_baselines_on_the_reference_sample():
    intercepts = calibrated_intercepts()
    assert set(intercepts) == {"cement_leak", "symptomatic_given_leak", "new_fracture",
                               "major_event"}
    assert intercepts["major_event"] < intercepts["cement_leak"] < intercepts["new_fracture"]


def test_observed_rates_match_htg108_baselines(big):
    out, manifest = big
    end = pd.Timestamp(manifest["parameters"]["end"])
    procedures = read_kind(out, "procedures")
    complications = read_kind(out, "complications")
    procedures["day"] = pd.to_datetime(procedures.procedure_date)

    # Leaks are reported within 16 days: judge procedures with that much follow-up.
    followed = procedures[procedures.day <= end - pd.Timedelta(days=16)]
    leaks = complications[complications.event_type.eq("cement_leak")
                          & complications.procedure_id.isin(followed.procedure_id)]
    n = len(followed)
    assert abs(len(leaks) / n - LEAK_RATE) < sd_tolerance(LEAK_RATE, n)
    symptomatic = leaks.symptomatic.eq("true").sum()
    assert abs(symptomatic / n - SYMPTOMATIC_LEAK_RATE) < sd_tolerance(SYMPTOMATIC_LEAK_RATE, n)

    # New fracture per patient within a year (plus up to 90 days to be reported).
    firsts = procedures.sort_values("day").drop_duplicates("patient_ref")
    firsts = firsts[firsts.day <= end - pd.Timedelta(days=365 + 90)]
    fractures = complications[complications.event_type.isin(["new_fracture", "adjacent_fracture"])]
    patients_with = fractures.procedure_id[fractures.procedure_id.isin(firsts.procedure_id)]
    n = len(firsts)
    rate = patients_with.nunique() / n
    assert abs(rate - FRACTURE_RATE_PER_PATIENT) < sd_tolerance(FRACTURE_RATE_PER_PATIENT, n)
    assert len(patients_with) == patients_with.nunique()  # at most one per patient

    followed = procedures[procedures.day <= end - pd.Timedelta(days=61)]
    major = complications[complications.event_type.isin(MAJOR_TYPES)
                          & complications.severity.isin(["major", "fatal"])
                          & complications.procedure_id.isin(followed.procedure_id)]
    n = len(followed)
    assert abs(len(major) / n - MAJOR_EVENT_RATE) < sd_tolerance(MAJOR_EVENT_RATE, n)
    deaths = complications[complications.event_type.eq("death")]
    assert deaths.severity.eq("fatal").all() and len(deaths) > 0
    assert procedures.mdt_discussed.eq("true").all()


def test_site_volumes_span_the_stated_range(big):
    out, manifest = big
    volumes = np.array([site["annual_volume"] for site in manifest["sites"].values()])
    assert volumes.min() >= 20 and volumes.max() <= 600
    assert volumes.min() < 25 and volumes.max() > 500  # log-uniform over 300 sites
    procedures = read_kind(out, "procedures")
    per_year = procedures.site_id.value_counts() / 3
    assert per_year.min() < 30 and per_year.max() > 450
    assert per_year.max() / per_year.min() > 15
    assert sorted(per_year.index) == sorted(manifest["sites"])


def test_drift_raises_the_site_leak_odds_by_about_the_odds_ratio(tmp_path):
    ratio = 3.0
    drifted_sites = [f"S{number:03d}" for number in range(1, 7)]
    drifts = [Drift(site, "cement_leak", ratio, date(2023, 1, 1)) for site in drifted_sites]
    drifts.append(parse_drift("S007:mdt_discussion:20:2023-07-01"))
    simulate(tmp_path, sites=20, start=date(2022, 1, 1), end=date(2023, 12, 15), seed=9,
             drifts=drifts, volume_scale=2.0, single_file=True)
    procedures = read_kind(tmp_path, "procedures")
    leaks = read_kind(tmp_path, "complications").query("event_type == 'cement_leak'")
    procedures["leak"] = procedures.procedure_id.isin(leaks.procedure_id)
    exposed = procedures.site_id.isin(drifted_sites) & (procedures.procedure_date >= "2023-01-01")
    table = [[(procedures.leak & group).sum(), (~procedures.leak & group).sum()]
             for group in (exposed, ~exposed)]
    (a, b), (c, d) = table
    log_or = math.log(a * d / (b * c))
    standard_error = math.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
    assert abs(log_or - math.log(ratio)) < 4 * standard_error

    not_discussed = procedures[procedures.mdt_discussed.eq("false")]
    assert len(not_discussed) > 0
    assert set(not_discussed.site_id) == {"S007"}
    assert (not_discussed.procedure_date >= "2023-07-01").all()


# --- files, timing of arrivals, manifest ------------------------------------------------------


def test_files_follow_the_contract_and_the_cadence(monthly):
    out, manifest = monthly
    stamps = sorted({contract.extract_stamp(path.name)[:8] for path in out.glob("*.csv")})
    assert stamps[-1] == "20240630" and len(stamps) == 30
    for stamp in stamps:
        day = date(int(stamp[:4]), int(stamp[4:6]), int(stamp[6:]))
        assert (day + timedelta(days=1)).day == 1  # every extract closes a month
        for kind in contract.KINDS:
            path = out / f"{kind}_{stamp}.csv"
            with path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
                handle.seek(0)
                header = next(csv.reader(handle))
            assert header == [spec.name for spec in contract.COLUMNS[kind]]
            for row in rows:
                assert bad_cells(row, kind, day) == []
            assert contract.kind_of(path.name) == kind
    assert {site for site in manifest["sites"]} == {f"S{n:03d}" for n in range(1, 31)}


def test_complications_follow_their_procedures(monthly):
    out, _ = monthly
    procedures = read_kind(out, "procedures").drop_duplicates("procedure_id")  # first delivery
    complications = read_kind(out, "complications").merge(
        procedures[["procedure_id", "procedure_date", "site_id", "extract"]],
        on="procedure_id", suffixes=("", "_procedure"), validate="many_to_one")
    assert len(complications) == len(read_kind(out, "complications"))  # no orphans
    assert (complications.event_date >= complications.procedure_date).all()
    assert (complications.site_id == complications.site_id_procedure).all()
    assert (pd.to_datetime(complications.event_date) <= complications.extract).all()
    assert (complications.extract >= complications.extract_procedure).all()
    late = complications.extract > complications.extract_procedure
    assert late.any()
    gap = (pd.to_datetime(complications.event_date)
           - pd.to_datetime(complications.procedure_date)).dt.days
    leak_gap = gap[complications.event_type.eq("cement_leak")]
    fracture_gap = gap[complications.event_type.isin(["new_fracture", "adjacent_fracture"])]
    assert leak_gap.between(0, 2).all()
    assert fracture_gap.between(10, 365).all() and fracture_gap.median() < 180
    assert re.fullmatch(r"C-S\d{3}-\d{6}-\d+", complications.complication_id.iloc[0])


def test_manifest_counts_equal_the_files(monthly):
    out, manifest = monthly
    counts = manifest["counts"]
    procedures_all = read_kind(out, "procedures")
    complications_all = read_kind(out, "complications")
    procedures = newest(procedures_all, "procedure_id")
    complications = newest(complications_all, "complication_id")
    assert counts["procedures"] == len(procedures) == counts["delivered_clean"]["procedures"]
    assert counts["patients"] == procedures.patient_ref.nunique()
    assert counts["complications"] == len(complications)
    observed_types = complications.event_type.value_counts().to_dict()
    assert {k: v for k, v in counts["complications_by_type"].items() if v} == observed_types
    assert counts["symptomatic_cement_leaks"] == (
        complications.event_type.eq("cement_leak") & complications.symptomatic.eq("true")).sum()
    assert counts["major_events"] == (complications.event_type.isin(MAJOR_TYPES)
                                      & complications.severity.isin(["major", "fatal"])).sum()
    assert counts["rows_written"] == {"procedures": len(procedures_all),
                                      "complications": len(complications_all)}
    first_extract = procedures_all.groupby("procedure_id").extract.min()
    late = complications_all.drop_duplicates("complication_id").extract.values > (
        first_extract.loc[complications_all.drop_duplicates("complication_id").procedure_id].values)
    assert counts["late_complications"] == late.sum() > 0
    assert counts["files_written"] == len(list(out.iterdir()))
    for entry in manifest["files"]:
        data = (out / entry["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert data.count(b"\n") - 1 == entry["rows"]
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_corrections_resend_the_same_id_later_with_one_changed_field(monthly):
    out, manifest = monthly
    for kind, key in (("procedures", "procedure_id"), ("complications", "complication_id")):
        rows = read_kind(out, kind)
        repeated = rows[rows.duplicated(key, keep=False)].sort_values([key, "extract"])
        expected = manifest["counts"]["corrections"][kind]
        assert len(repeated) == 2 * expected["rows"] > 0
        assert sum(expected["by_field"].values()) == expected["rows"]
        changed = {}
        for _, pair in repeated.groupby(key):
            old, new = pair.iloc[0], pair.iloc[1]
            assert new.extract > old.extract
            fields = [c for c in pair.columns if c != "extract" and old[c] != new[c]]
            assert len(fields) == 1
            changed[fields[0]] = changed.get(fields[0], 0) + 1
        assert changed == {f: n for f, n in expected["by_field"].items() if n}
    share = manifest["counts"]["corrections"]["procedures"]["rows"] / manifest["counts"][
        "procedures"]
    assert 0.005 < share < 0.015


def test_single_file_and_other_cadences(tmp_path):
    single = simulate(tmp_path / "single", **SMALL, single_file=True)
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == [
        "complications_20231231.csv", "manifest.json", "procedures_20231231.csv"]
    assert single["counts"]["corrections"]["procedures"]["rows"] == 0
    weekly = simulate(tmp_path / "weekly", **dict(SMALL, end=date(2023, 3, 1)), cadence="weekly")
    days = sorted({date.fromisoformat(f["extract_date"]) for f in weekly["files"]})
    assert all(day.weekday() == 6 for day in days[:-1]) and days[-1] == date(2023, 3, 1)
    daily = simulate(tmp_path / "daily", **dict(SMALL, end=date(2023, 1, 10)), cadence="daily")
    assert len(daily["files"]) == 20  # both kinds, every day, empty ones with a header only
    assert (tmp_path / "daily" / "complications_20230101.csv").read_text() == ",".join(
        spec.name for spec in contract.COMPLICATION_COLUMNS) + "\n"
    wide = simulate(tmp_path / "wide", sites=1001, start=date(2023, 1, 1),
                    end=date(2023, 1, 31), seed=1, volume_scale=0.1, single_file=True)
    assert "S1001" in wide["sites"] and "S0001" in wide["sites"]


# --- defective rows --------------------------------------------------------------------------


def test_bad_rows_replace_the_stated_share_with_detectable_defects(tmp_path):
    rate = 0.2
    options = dict(sites=25, start=date(2023, 1, 1), end=date(2023, 12, 31), seed=4)
    clean = simulate(tmp_path / "clean", **options)
    dirty = simulate(tmp_path / "dirty", **options, bad_row_rate=rate)
    procedures = newest(read_kind(tmp_path / "clean", "procedures"), "procedure_id")
    procedure_day = dict(zip(procedures.procedure_id, procedures.procedure_date, strict=True))
    assert [f["rows"] for f in clean["files"]] == [f["rows"] for f in dirty["files"]]

    changed_total = rows_total = 0
    for entry in dirty["files"]:
        kind, extract = entry["kind"], date.fromisoformat(entry["extract_date"])
        with (tmp_path / "clean" / entry["name"]).open(newline="") as handle:
            good_rows = list(csv.DictReader(handle))
        with (tmp_path / "dirty" / entry["name"]).open(newline="") as handle:
            dirty_rows = list(csv.DictReader(handle))
        key = contract.KEY_COLUMN[kind]
        id_counts = pd.Series([row[key] for row in dirty_rows]).value_counts()
        changed = [row for good, row in zip(good_rows, dirty_rows, strict=True) if good != row]
        assert len(changed) == entry["bad_rows"]
        assert entry["bad_rows"] < max(1, entry["rows"]) / 2  # never a whole bad file
        for row in changed:
            problems = bad_cells(row, kind, extract)
            if kind == "complications" and row["procedure_id"] in procedure_day:
                if row["event_date"] < procedure_day[row["procedure_id"]]:
                    problems.append("event before procedure")
            if id_counts.get(row[key], 0) > 1:
                problems.append("duplicate id")
            assert problems, row
        changed_total += len(changed)
        rows_total += entry["rows"]
    assert abs(changed_total / rows_total - rate) < sd_tolerance(rate, rows_total)
    bad = dirty["counts"]["bad_rows"]
    assert bad["total"] == changed_total
    for kind, defects in DEFECTS.items():
        assert set(bad[kind]) == set(defects)
        assert all(count > 0 for count in bad[kind].values()), bad[kind]
    assert dirty["counts"]["delivered_clean"]["procedures"] < clean["counts"]["procedures"]
    formula = (tmp_path / "dirty").glob("procedures_*.csv")
    assert any('"=HYPERLINK(""http://x"",""y"")"' in path.read_text() for path in formula)


# --- input checks and the command line --------------------------------------------------------


@pytest.mark.parametrize("text", [
    "S001:cement_leak:2",
    "S001:cement_leak:2:2024-01-01:extra",
    "s001:cement_leak:2:2024-01-01",
    "S001:leak:2:2024-01-01",
    "S001:cement_leak:two:2024-01-01",
    "S001:cement_leak:0:2024-01-01",
    "S001:cement_leak:-1:2024-01-01",
    "S001:cement_leak:nan:2024-01-01",
    "S001:cement_leak:2:2024-02-30",
    "S001:cement_leak:2:20240101",
    "",
])
def test_parse_drift_rejects_bad_specs(text):
    with pytest.raises(InputRejected) as caught:
        parse_drift(text)
    assert "\n" not in str(caught.value)


def test_parse_drift_reads_a_good_spec():
    drift = parse_drift("S010:mdt_discussion:4.5:2024-03-01")
    assert drift == Drift("S010", "mdt_discussion", 4.5, date(2024, 3, 1))
    assert parse_drift(drift.spec()) == drift


@pytest.mark.parametrize("changes", [
    dict(end=date(2022, 12, 31)),
    dict(sites=0),
    dict(bad_row_rate=0.6),
    dict(bad_row_rate=-0.1),
    dict(cadence="hourly"),
    dict(seed=-1),
    dict(drifts=["S099:cement_leak:2:2023-02-01"]),
    dict(drifts=["S001:cement_leak:2:2024-02-01"]),
])
def test_simulate_rejects_bad_arguments(tmp_path, changes):
    with pytest.raises(InputRejected):
        simulate(tmp_path, **dict(SMALL, **changes))
    assert not any(tmp_path.iterdir())


def test_simulate_refuses_a_directory_that_already_holds_extracts(tmp_path):
    simulate(tmp_path, **dict(SMALL, sites=1, end=date(2023, 1, 31)))
    with pytest.raises(InputRejected, match="already holds extract files"):
        simulate(tmp_path, **SMALL)


def test_cli_writes_files_and_prints_a_summary_without_references(tmp_path, capsys):
    code = main(["simulate", "--out", str(tmp_path), "--sites", "3", "--start", "2023-01-01",
                 "--end", "2023-03-31", "--seed", "1", "--drift",
                 "S001:new_fracture:2:2023-02-01", "--bad-row-rate", "0.05"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "simulated" in printed and "PT-" not in printed and "OP-" not in printed
    assert (tmp_path / "procedures_20230331.csv").exists()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["drift"][0]["spec"] == "S001:new_fracture:2:2023-02-01"


@pytest.mark.parametrize("arguments", [
    ["--sites", "3", "--start", "2023-02-01", "--end", "2023-01-01", "--seed", "1"],
    ["--sites", "three", "--start", "2023-01-01", "--end", "2023-02-01", "--seed", "1"],
    ["--sites", "3", "--start", "2023-13-01", "--end", "2023-02-01", "--seed", "1"],
    ["--sites", "3", "--start", "2023-01-01", "--end", "2023-02-01"],
    ["--sites", "3", "--start", "2023-01-01", "--end", "2023-02-01", "--seed", "1",
     "--bad-row-rate", "0.9"],
    ["--sites", "3", "--start", "2023-01-01", "--end", "2023-02-01", "--seed", "1",
     "--drift", "S001:leak:2:2023-01-01"],
    ["--sites", "3", "--start", "2023-01-01", "--end", "2023-02-01", "--seed", "1",
     "--cadence", "yearly"],
])
def test_cli_rejects_bad_arguments_with_exit_2_and_one_line(tmp_path, capsys, arguments):
    code = main(["simulate", "--out", str(tmp_path / "out"), *arguments])
    assert code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines()
                   if line.startswith("kyphowatch: error:")]
    assert len(error_lines) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
