"""Synthetic registry extracts that behave like the real thing, from a stated model.

Why this exists: the loader, the surveillance engine, the demo and the benchmarks all need
registry extracts with the awkward properties of real ones -- very unequal site volumes, a
case mix, outcomes whose averages match the NICE HTG108 baselines, complications that arrive
weeks or months after their procedure, rows re-sent later with a corrected value, optional
drift at named sites, and the occasional defective row -- without touching any patient data.
The same seed always gives byte-identical files, so tests and benchmarks can rely on exact
output. ``docs/simulator.md`` states the model in full; the constants below are the model.

Outcome model (per procedure unless stated), logistic in six covariates: age per 10 years
above 75, female sex, steroid use, extra levels treated (levels_treated - 1), malignancy and
haemangioma (both against osteoporosis; "other" shares the osteoporosis baseline). Each
intercept is solved numerically (``scipy.optimize.brentq``) so that the mean risk over a fixed
reference sample of the case mix equals the baseline:

* cement leak 38/360 per procedure (HTG108 2.4.1); a leak is symptomatic so that symptomatic
  leaks are 1/360 per procedure (about 1 leak in 38);
* new or adjacent fracture within 365 days, 26/115 per patient (2.4.2), drawn once per patient
  at the first procedure;
* major event (death, paralysis, cord compression, canal intrusion, motor deficit, permanent
  radiculopathy or paraesthesia) 33 per 50,000 procedures (2.4.4);
* minor events (balloon rupture, infection, allergy, epidural bleeding, minor radiculopathy,
  paraesthesia, other) at small constant rates;
* every in-control procedure is discussed by the MDT (NICE 1.2).

A drift multiplies the odds of one metric at one site for procedures dated on or after its
start date. Sites, patients and bad rows use their own child streams of the seed; every draw
about a procedure or an event (outcomes, onsets, lags, levels, corrections) is keyed by that
procedure's stable identity (see :class:`_Keyed`), so a drift or a bad-row rate changes only
what it names and the same seed always gives the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.contract import (
    ANAESTHESIA,
    COMPLICATION_COLUMNS,
    EVENT_TYPES,
    INDICATIONS,
    LOT_PATTERN,
    PROCEDURE_COLUMNS,
    SEVERITIES,
    SEXES,
    SITE_PATTERN,
    kind_of,
)
from pipelines.errors import InputRejected

if TYPE_CHECKING:
    from pipelines.surveillance.outcomes import Snapshot
    from pipelines.surveillance.profile import Profile

GENERATOR = "kyphowatch.simulate"
MODEL_VERSION = 1

# --- baselines (NICE HTG108) -------------------------------------------------------------
LEAK_RATE = 38 / 360  # 2.4.1: cement leak per procedure
SYMPTOMATIC_LEAK_RATE = 1 / 360  # 2.4.1: symptomatic leak per procedure
FRACTURE_RATE_PER_PATIENT = 26 / 115  # 2.4.2: new/adjacent fracture within a year, per patient
MAJOR_EVENT_RATE = 33 / 50_000  # 2.4.4: 33 per 40,000-60,000 procedures (midpoint)
# NICE 1.2 expects every procedure to be discussed; a drift needs odds to multiply, so the
# odds ratio for mdt_discussion acts on this reference probability of *not* being discussed.
MDT_REFERENCE_MISS = 0.01

DRIFT_METRICS = (
    "cement_leak",
    "symptomatic_cement_leak",
    "new_fracture",
    "major_event",
    "mdt_discussion",
)

# --- risk model: odds ratios per covariate -------------------------------------------------
COVARIATES = (
    "age_per_10y_over_75",
    "female",
    "steroid_use",
    "extra_levels",
    "malignancy",
    "haemangioma",
)
ODDS_RATIOS: dict[str, tuple[float, ...]] = {
    # osteoporotic bone and multi-level / lytic lesions leak more; haemangiomas are vascular
    "cement_leak": (1.05, 1.00, 1.10, 1.20, 1.80, 2.00),
    # a leak from a destroyed posterior wall is more often symptomatic
    "symptomatic_given_leak": (1.00, 1.00, 1.00, 1.20, 2.50, 1.50),
    # fragility drives new fractures; haemangioma patients have normal bone
    "new_fracture": (1.25, 1.30, 1.30, 1.15, 0.90, 0.30),
    "major_event": (1.50, 0.90, 1.20, 1.30, 2.50, 1.00),
}
CALIBRATION_SEED = 20_260_108
CALIBRATION_SAMPLE = 400_000

# --- case mix --------------------------------------------------------------------------
INDICATION_SHARES = (0.80, 0.14, 0.02, 0.04)  # order of contract INDICATIONS
AGE_MEAN = (78.0, 67.0, 55.0, 70.0)
AGE_SD = (8.0, 10.0, 12.0, 11.0)
AGE_RANGE = (25, 100)
FEMALE_SHARE = (0.72, 0.48, 0.55, 0.55)
SEX_UNKNOWN_SHARE = 0.005
STEROID_SHARE = (0.12, 0.30, 0.03, 0.10)
LEVEL_SHARES = (
    (0.68, 0.20, 0.08, 0.03, 0.01),
    (0.50, 0.25, 0.13, 0.08, 0.04),
    (0.90, 0.08, 0.02, 0.00, 0.00),
    (0.70, 0.20, 0.07, 0.02, 0.01),
)
TWO_BALLOON_SHARE = 0.75
GENERAL_ANAESTHESIA_SHARE = 0.65
PROCEDURES_PER_OPERATOR_YEAR = 60
MAX_OPERATORS = 12

# --- volumes and patients ---------------------------------------------------------------
ANNUAL_VOLUME_RANGE = (20.0, 600.0)  # log-uniform per site, before --volume-scale
REPEAT_SHARE = 0.08  # patients with a second procedure at the same site
REPEAT_GIVEN_FRACTURE = 0.25  # a new fracture often brings the patient back
REPEAT_GIVEN_NO_FRACTURE = (REPEAT_SHARE - FRACTURE_RATE_PER_PATIENT * REPEAT_GIVEN_FRACTURE) / (
    1 - FRACTURE_RATE_PER_PATIENT
)

# --- complications: type, onset window (days after procedure), reporting lag ------------
FRACTURE_WINDOW = (10, 365)  # onset; Beta(1, 2.5) skews it towards the first months
ADJACENT_SHARE = 0.45
FRACTURE_SYMPTOMATIC_SHARE = 0.85
LEAK_ONSET_SHARES = (0.80, 0.15, 0.05)  # 0, 1, 2 days after the procedure
LEAK_REPORT_LAG = (1, 14)
FRACTURE_REPORT_LAG = (7, 90)
OTHER_REPORT_LAG = (1, 30)
PROCEDURE_REPORT_LAG = (0, 3)
# major event type: (share of major events, latest onset day, severity)
MAJOR_EVENTS = {
    "death": (0.20, 30, "fatal"),
    "paralysis": (0.10, 7, "major"),
    "cord_compression": (0.15, 7, "major"),
    "canal_intrusion": (0.15, 2, "major"),
    "motor_deficit": (0.15, 14, "major"),
    "radiculopathy": (0.15, 30, "major"),
    "paraesthesia": (0.10, 30, "major"),
}
# minor event type: (probability per procedure, latest onset day, share symptomatic)
MINOR_EVENTS = {
    "balloon_rupture": (0.010, 0, 0.0),
    "infection": (0.002, 30, 1.0),
    "allergy": (0.001, 0, 1.0),
    "epidural_bleeding": (0.001, 2, 1.0),
    "radiculopathy": (0.004, 30, 1.0),
    "paraesthesia": (0.003, 30, 1.0),
    "other": (0.002, 60, 0.5),
}
# Levels of thoracolumbar kyphoplasty, weighted towards the junction.
LEVELS = ("T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5")
LEVEL_WEIGHTS = (1, 1, 2, 3, 4, 5, 6, 10, 14, 14, 9, 6, 4, 2)
EVENTS_WITHOUT_LEVEL = frozenset(
    {"death", "allergy", "infection", "paralysis", "motor_deficit", "paraesthesia", "other"}
)

# --- corrections and defects ------------------------------------------------------------
CORRECTION_SHARE = 0.01
CORRECTION_LAG = (7, 60)  # days after the first delivery's extract date
PROCEDURE_CORRECTED_FIELDS = ("levels_treated", "age_years", "anaesthesia")
COMPLICATION_CORRECTED_FIELDS = ("severity", "symptomatic")
_ROW_DEFECTS = (
    "bad_date",
    "future_date",
    "out_of_range",
    "unknown_enum",
    "empty_required",
    "formula",
    "bad_site_id",
    "duplicate_id",
)
DEFECTS = {
    "procedures": _ROW_DEFECTS,
    "complications": (*_ROW_DEFECTS, "event_before_procedure"),
}
FORMULA = '=HYPERLINK("http://x","y")'
FUTURE_OFFSET_DAYS = 3650  # future dates are 10-11 years after the extract date
MAX_BAD_ROW_RATE = 0.5
MAX_SITES = 9_999
MAX_DAYS = 366 * 30
CADENCES = ("daily", "weekly", "monthly")
CHUNK_ROWS = 50_000

EPOCH = date(1970, 1, 1)
_SITE_RE = re.compile(SITE_PATTERN)
_ISO_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True)
class Drift:
    """A change in one site's risk: the odds of ``metric`` times ``odds_ratio`` from a date."""

    site_id: str  # for a PRODUCT, LOT or OPERATOR drift: the product, lot or SITE-NN
    metric: str
    odds_ratio: float
    from_date: date
    # Issue 12: what drifts (SITE, PRODUCT, LOT, OPERATOR); an operator drift applies to the
    # operator's first ``first_procedures`` procedures (a learning curve), not from a date.
    target: str = "SITE"
    first_procedures: int = 0

    def spec(self) -> str:
        """Return the drift text (``SITE:METRIC:ODDS_RATIO:FROM_DATE`` etc.) that parses back."""
        if self.target == "OPERATOR":
            return (f"OPERATOR:{self.site_id}:{self.metric}:{self.odds_ratio:g}:"
                    f"{self.first_procedures}")
        text = f"{self.site_id}:{self.metric}:{self.odds_ratio:g}:{self.from_date.isoformat()}"
        return text if self.target == "SITE" else f"{self.target}:{text}"


# Issue 12: products each site uses (reference/devices.yaml), monthly cement lots, UDI-DIs.
BALLOON_PRODUCTS = ("KYPHON-XPANDER-II", "KYPHON-EXPRESS-II", "VERTOBAL-15", "STABILIT-BT")
CEMENT_PRODUCTS = ("KYPHON-HV-R", "OSTEOPAL-V", "VERTECEM-V")
LOT_PREFIX = {"KYPHON-HV-R": "HVR", "OSTEOPAL-V": "OSV", "VERTECEM-V": "VCV"}
BALLOON_UDI_DI = ("00643169007222", "00643169007239", "04046963000017", "00885074000012")
# Share of a site's procedures done with its second product (the rest: its main product).
SECOND_PRODUCT_SHARE = 0.2
TARGET_DRIFT_METRICS = ("cement_leak", "symptomatic_cement_leak", "major_event")
_OPERATOR_RE = re.compile(r"^([A-Z0-9]{3,8})-(\d{1,3})$")


def _parse_target_drift(parts: list[str], shown: str) -> Drift:
    """Parse ``PRODUCT|LOT:NAME:METRIC:OR:FROM_DATE`` or ``OPERATOR:SITE-NN:METRIC:OR:FIRST_N``."""
    target, name, metric, ratio_text, last = parts
    target = target.upper()
    if metric not in TARGET_DRIFT_METRICS:
        raise InputRejected(f"drift {shown}: a {target} drift's metric must be one of "
                            f"{', '.join(TARGET_DRIFT_METRICS)}")
    try:
        odds_ratio = float(ratio_text)
    except ValueError:
        raise InputRejected(f"drift {shown}: odds ratio {ratio_text!r} is not a number") from None
    if not (math.isfinite(odds_ratio) and 0 < odds_ratio <= 1000):
        raise InputRejected(f"drift {shown}: odds ratio must be above 0 and at most 1000")
    if target == "OPERATOR":
        if not _OPERATOR_RE.fullmatch(name):
            raise InputRejected(f"drift {shown}: operator must be SITE-NN, e.g. S001-02")
        if not last.isdigit() or not 1 <= int(last) <= 100_000:
            raise InputRejected(f"drift {shown}: expected OPERATOR:SITE-NN:METRIC:OR:FIRST_N, "
                                "FIRST_N the number of first procedures affected")
        return Drift(name, metric, odds_ratio, EPOCH, target, int(last))
    if target == "PRODUCT" and name not in BALLOON_PRODUCTS + CEMENT_PRODUCTS:
        raise InputRejected(f"drift {shown}: product must be one of "
                            f"{', '.join(BALLOON_PRODUCTS + CEMENT_PRODUCTS)}")
    if target == "LOT" and not re.fullmatch(LOT_PATTERN, name):
        raise InputRejected(f"drift {shown}: lot must match {LOT_PATTERN}, e.g. HVR-202403")
    return Drift(name, metric, odds_ratio, _parse_date(last, f"drift {shown}: start date"), target)


def parse_drift(text: str) -> Drift:
    """Parse a drift; raise InputRejected with one line if bad.

    ``SITE:METRIC:ODDS_RATIO:FROM_DATE``, or (issue 12) ``PRODUCT:NAME:METRIC:OR:FROM_DATE``,
    ``LOT:LOT_ID:METRIC:OR:FROM_DATE``, ``OPERATOR:SITE-NN:METRIC:OR:FIRST_N``.
    """
    shown = repr(text)[:80]
    parts = [part.strip() for part in str(text).split(":")]
    if len(parts) == 5 and parts[0].upper() in ("PRODUCT", "LOT", "OPERATOR"):
        return _parse_target_drift(parts, shown)
    if len(parts) != 4:
        raise InputRejected(
            f"drift {shown}: expected SITE:METRIC:ODDS_RATIO:FROM_DATE, "
            "e.g. S003:cement_leak:2.5:2024-01-01"
        )
    site_id, metric, ratio_text, from_text = parts
    if not _SITE_RE.fullmatch(site_id):
        raise InputRejected(f"drift {shown}: site id must match {SITE_PATTERN}")
    if metric not in DRIFT_METRICS:
        raise InputRejected(f"drift {shown}: metric must be one of {', '.join(DRIFT_METRICS)}")
    try:
        odds_ratio = float(ratio_text)
    except ValueError:
        raise InputRejected(f"drift {shown}: odds ratio {ratio_text!r} is not a number") from None
    if not (math.isfinite(odds_ratio) and 0 < odds_ratio <= 1000):
        raise InputRejected(f"drift {shown}: odds ratio must be above 0 and at most 1000")
    from_date = _parse_date(from_text, f"drift {shown}: start date")
    return Drift(site_id, metric, odds_ratio, from_date)


def _parse_date(text: str, what: str) -> date:
    if not _ISO_DATE_RE.fullmatch(text or ""):
        raise InputRejected(f"{what} {text!r} is not an ISO date (YYYY-MM-DD)")
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InputRejected(f"{what} {text!r} is not a valid date") from None


def _day(value: date) -> int:
    return (value - EPOCH).days


def _iso(days: np.ndarray) -> list[str]:
    return np.datetime_as_string(np.asarray(days, dtype="int64").astype("datetime64[D]")).tolist()


# --- keyed random numbers ------------------------------------------------------------------


class _Keyed:
    """Uniform draws that depend only on (seed, stream, entity key), not on any other row.

    A counter-based generator (the splitmix64 finaliser) keyed by a stable identity -- a
    patient's first or second procedure, or one event source of a procedure -- means a drift
    that adds a leak at one site leaves every other row's dates, lags and corrections as they
    were, which sequential draws from one generator could not.
    """

    def __init__(self, seed: int):
        self.seed_key = np.random.SeedSequence(seed).generate_state(1, np.uint64)[0]

    @staticmethod
    def _mix(x: np.ndarray) -> np.ndarray:
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    def uniform(self, keys: np.ndarray, stream: str) -> np.ndarray:
        """Return one uniform in [0, 1) per key for the named stream."""
        stream_key = np.uint64(int(hashlib.sha256(stream.encode()).hexdigest()[:16], 16))
        x = self._mix(self._mix(np.asarray(keys, np.uint64) ^ stream_key) ^ self.seed_key)
        return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def integers(self, keys: np.ndarray, stream: str, low: int, high: int) -> np.ndarray:
        """Return one whole number in [low, high] per key."""
        return low + np.floor(self.uniform(keys, stream) * (high - low + 1)).astype(np.int64)

    def choice(self, keys: np.ndarray, stream: str, shares) -> np.ndarray:
        """Return one category index per key, drawn with the given shares."""
        cumulative = np.cumsum(np.asarray(shares, float) / np.sum(shares))
        return np.minimum(np.searchsorted(cumulative, self.uniform(keys, stream), side="right"),
                          len(cumulative) - 1)


# --- case mix and risk model -------------------------------------------------------------


def _draw_patients(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Draw patient-level covariates: indication, sex, age at first procedure, steroid use."""
    indication = rng.choice(len(INDICATIONS), size=n, p=INDICATION_SHARES)
    age_raw = rng.normal(np.take(AGE_MEAN, indication), np.take(AGE_SD, indication))
    age = np.clip(np.rint(age_raw), *AGE_RANGE).astype(np.int64)
    sex_draw = rng.random(n)
    female_cut = np.take(FEMALE_SHARE, indication) * (1 - SEX_UNKNOWN_SHARE)
    sex = np.where(sex_draw < female_cut, 0, np.where(sex_draw < 1 - SEX_UNKNOWN_SHARE, 1, 2))
    steroid = rng.random(n) < np.take(STEROID_SHARE, indication)
    return {"indication": indication, "age": age, "sex": sex, "steroid": steroid}


def _draw_procedure_details(rng: np.random.Generator, indication: np.ndarray) -> dict:
    """Draw procedure-level covariates: levels treated, balloons, anaesthesia."""
    n = indication.size
    cumulative = np.cumsum(np.asarray(LEVEL_SHARES), axis=1)
    cumulative[:, -1] = 1.0
    levels = 1 + (rng.random(n)[:, None] > cumulative[indication]).sum(axis=1)
    balloons = np.where(rng.random(n) < TWO_BALLOON_SHARE, 2, 1)
    anaesthesia = np.where(rng.random(n) < GENERAL_ANAESTHESIA_SHARE, 1, 0)
    return {"levels": levels.astype(np.int64), "balloons": balloons, "anaesthesia": anaesthesia}


def _design(age, sex, steroid, levels, indication) -> np.ndarray:
    """Return the covariate matrix in the order of COVARIATES."""
    return np.column_stack(
        [
            (age - 75) / 10.0,
            sex == 0,
            steroid,
            levels - 1,
            indication == INDICATIONS.index("malignancy"),
            indication == INDICATIONS.index("haemangioma"),
        ]
    ).astype(np.float64)


def _linear(design: np.ndarray, outcome: str) -> np.ndarray:
    return design @ np.log(np.asarray(ODDS_RATIOS[outcome]))


@lru_cache(maxsize=1)
def calibrated_intercepts() -> dict[str, float]:
    """Solve each intercept so the mean risk over the reference case mix equals its baseline."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    patients = _draw_patients(rng, CALIBRATION_SAMPLE)
    details = _draw_procedure_details(rng, patients["indication"])
    design = _design(
        patients["age"], patients["sex"], patients["steroid"], details["levels"],
        patients["indication"],
    )

    def solve(linear: np.ndarray, target: float, scale: np.ndarray | float = 1.0) -> float:
        from scipy.optimize import brentq  # only when calibrating (once, cached)

        return float(brentq(lambda b: float(np.mean(scale * expit(b + linear))) - target, -30, 30,
                            xtol=1e-12))

    leak = solve(_linear(design, "cement_leak"), LEAK_RATE)
    leak_risk = expit(leak + _linear(design, "cement_leak"))
    return {
        "cement_leak": leak,
        "symptomatic_given_leak": solve(
            _linear(design, "symptomatic_given_leak"), SYMPTOMATIC_LEAK_RATE, leak_risk
        ),
        "new_fracture": solve(_linear(design, "new_fracture"), FRACTURE_RATE_PER_PATIENT),
        "major_event": solve(_linear(design, "major_event"), MAJOR_EVENT_RATE),
    }


def _drift_offsets(
    drifts: tuple[Drift, ...], metric: str, site: np.ndarray, day: np.ndarray, site_ids: list
) -> np.ndarray:
    """Return the log-odds shift of ``metric`` for each procedure (0 where no drift applies)."""
    offset = np.zeros(site.size)
    for drift in drifts:
        if drift.metric == metric and drift.target == "SITE":
            hit = (site == site_ids.index(drift.site_id)) & (day >= _day(drift.from_date))
            offset[hit] += math.log(drift.odds_ratio)
    return offset


def _assign_devices(keyed: _Keyed, proc: dict, site_ids: list) -> dict:
    """Give each procedure a balloon, a cement, a monthly cement lot and its operator rank.

    Each site has a main balloon and cement (by site number) and uses the next product in the
    list for ``SECOND_PRODUCT_SHARE`` of its procedures; a cement lot is the product's lot of
    the procedure's month, shared by every site using it. Draws are keyed, so the outcomes of
    other metrics do not change.
    """
    key, site = proc["key"], proc["site"]
    balloon = (site + (keyed.uniform(key, "balloon product") < SECOND_PRODUCT_SHARE)) % len(
        BALLOON_PRODUCTS)
    cement = (site + (keyed.uniform(key, "cement product") < SECOND_PRODUCT_SHARE)) % len(
        CEMENT_PRODUCTS)
    month = proc["day"].astype("datetime64[D]").astype("datetime64[M]").astype(str)
    prefix = np.asarray([LOT_PREFIX[name] for name in CEMENT_PRODUCTS])[cement]
    lot = np.strings.add(np.strings.add(prefix, "-"), np.strings.replace(month, "-", ""))
    # each operator's procedures in date order: 1 for their first
    order = np.lexsort((key, proc["day"], proc["operator"], site))
    pair = (site * 1000 + proc["operator"])[order]
    starts = np.r_[True, pair[1:] != pair[:-1]]
    run_start = np.maximum.accumulate(np.where(starts, np.arange(pair.size), 0))
    rank = np.empty(pair.size, np.int64)
    rank[order] = np.arange(pair.size) - run_start + 1
    return {"balloon": balloon, "cement": cement, "lot": lot, "operator_rank": rank}


def _target_mask(drift: Drift, proc: dict, devices: dict, site_ids: list) -> np.ndarray:
    """Return which procedures a PRODUCT, LOT or OPERATOR drift applies to."""
    if drift.target == "OPERATOR":
        site_text, number = drift.site_id.rsplit("-", 1)
        return ((proc["site"] == site_ids.index(site_text)) & (proc["operator"] == int(number))
                & (devices["operator_rank"] <= drift.first_procedures))
    after = proc["day"] >= _day(drift.from_date)
    if drift.target == "LOT":
        return after & (devices["lot"] == drift.site_id)
    if drift.site_id in BALLOON_PRODUCTS:
        return after & (devices["balloon"] == BALLOON_PRODUCTS.index(drift.site_id))
    return after & (devices["cement"] == CEMENT_PRODUCTS.index(drift.site_id))


# --- the cohort --------------------------------------------------------------------------


def _weekdays(start_day: int, end_day: int) -> np.ndarray:
    days = np.arange(start_day, end_day + 1)
    weekdays = days[(days + 3) % 7 < 5]  # 1970-01-01 was a Thursday
    return weekdays if weekdays.size else days


def _to_weekday(days: np.ndarray) -> np.ndarray:
    weekday = (days + 3) % 7
    return days + np.where(weekday == 5, 2, np.where(weekday == 6, 1, 0))


def _simulate_cohort(streams, sites: int, start_day: int, end_day: int, volume_scale: float,
                     drifts: tuple[Drift, ...], site_ids: list[str]) -> dict:
    """Draw sites, patients and procedures (sorted by site, date) with their covariates."""
    site_rng, cohort_rng = streams["sites"], streams["cohort"]
    low, high = ANNUAL_VOLUME_RANGE
    annual_volume = np.exp(site_rng.uniform(math.log(low), math.log(high), sites)) * volume_scale
    operators = np.clip(np.rint(annual_volume / PROCEDURES_PER_OPERATOR_YEAR), 1, MAX_OPERATORS)
    years = (end_day - start_day + 1) / 365.25
    patients_per_site = site_rng.poisson(annual_volume * years / (1 + REPEAT_SHARE))

    pat_site = np.repeat(np.arange(sites), patients_per_site)
    n_patients = pat_site.size
    pool = _weekdays(start_day, end_day)
    first_day = pool[cohort_rng.integers(0, pool.size, n_patients)]
    order = np.lexsort((first_day, pat_site))
    pat_site, first_day = pat_site[order], first_day[order]
    patients = _draw_patients(cohort_rng, n_patients)
    site_start = np.concatenate([[0], np.cumsum(patients_per_site)[:-1]])
    pat_seq = np.arange(n_patients) - site_start[pat_site] + 1
    first = _draw_procedure_details(cohort_rng, patients["indication"])

    # New fracture, per patient, at the first procedure.
    design = _design(patients["age"], patients["sex"], patients["steroid"], first["levels"],
                     patients["indication"])
    fracture_risk = expit(
        calibrated_intercepts()["new_fracture"]
        + _linear(design, "new_fracture")
        + _drift_offsets(drifts, "new_fracture", pat_site, first_day, site_ids)
    )
    fracture = cohort_rng.random(n_patients) < fracture_risk
    lo, hi = FRACTURE_WINDOW
    fracture_day = first_day + lo + np.floor((hi - lo + 1) * cohort_rng.beta(1.0, 2.5, n_patients))
    fracture_day = fracture_day.astype(np.int64)
    adjacent = cohort_rng.random(n_patients) < ADJACENT_SHARE
    fracture_symptomatic = cohort_rng.random(n_patients) < FRACTURE_SYMPTOMATIC_SHARE

    # Second procedure at the same site: after the new fracture, or months later.
    repeat_p = np.where(fracture, REPEAT_GIVEN_FRACTURE, REPEAT_GIVEN_NO_FRACTURE)
    repeat = cohort_rng.random(n_patients) < repeat_p
    gap = np.maximum(30, np.rint(cohort_rng.lognormal(math.log(200), 0.6, n_patients)))
    after_fracture = fracture_day + cohort_rng.integers(7, 61, n_patients)
    second_day = _to_weekday(np.where(fracture, after_fracture, first_day + gap).astype(np.int64))
    repeat &= second_day <= end_day
    second_details = _draw_procedure_details(cohort_rng, patients["indication"])
    operator_draw = cohort_rng.random((2, n_patients))

    rep = np.flatnonzero(repeat)
    patient = np.concatenate([np.arange(n_patients), rep])
    proc = {
        "site": pat_site[patient],
        "patient": patient,
        "day": np.concatenate([first_day, second_day[rep]]),
        "is_first": np.concatenate([np.ones(n_patients, bool), np.zeros(rep.size, bool)]),
        "age": np.concatenate([
            patients["age"],
            np.minimum(110, patients["age"][rep] + (second_day[rep] - first_day[rep]) // 365),
        ]),
        "sex": patients["sex"][patient],
        "steroid": patients["steroid"][patient],
        "indication": patients["indication"][patient],
        "operator": 1 + np.floor(
            np.concatenate([operator_draw[0], operator_draw[1][rep]])
            * operators[pat_site[patient]]
        ).astype(np.int64),
    }
    for key in ("levels", "balloons", "anaesthesia"):
        proc[key] = np.concatenate([first[key], second_details[key][rep]])
    order = np.lexsort((proc["patient"], proc["day"], proc["site"]))
    for key, value in proc.items():  # one key at a time keeps the peak memory low
        small = np.int8 if key in ("sex", "indication", "levels", "balloons", "anaesthesia") else (
            np.int32 if value.dtype.kind == "i" else value.dtype)
        proc[key] = value[order].astype(small)
    del order
    counts = np.bincount(proc["site"], minlength=sites)
    proc_site_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    proc["seq"] = np.arange(proc["day"].size) - proc_site_start[proc["site"]] + 1
    # Stable identity of a procedure: its patient and whether it is their first or second.
    proc["key"] = proc["patient"].astype(np.int64) * 2 + (~proc["is_first"])
    first_proc_of_patient = np.empty(n_patients, np.int64)
    first_proc_of_patient[proc["patient"][proc["is_first"]]] = np.flatnonzero(proc["is_first"])
    return {
        "annual_volume": annual_volume,
        "pat_seq": pat_seq,
        "proc": proc,
        "fracture": {
            "proc": first_proc_of_patient[fracture],
            "day": fracture_day[fracture],
            "adjacent": adjacent[fracture],
            "symptomatic": fracture_symptomatic[fracture],
        },
        "n_patients": n_patients,
        "repeat_procedures": int(rep.size),
    }


def _simulate_outcomes(keyed: _Keyed, proc: dict, drifts, site_ids) -> dict:
    """Draw leaks, major and minor events and MDT discussion for every procedure."""
    key = proc["key"]
    intercepts = calibrated_intercepts()
    design = _design(proc["age"], proc["sex"], proc["steroid"], proc["levels"], proc["indication"])

    devices = _assign_devices(keyed, proc, site_ids)

    def offsets(metric: str) -> np.ndarray:
        offset = _drift_offsets(drifts, metric, proc["site"], proc["day"], site_ids)
        for drift in drifts:
            if drift.target != "SITE" and drift.metric == metric:
                offset[_target_mask(drift, proc, devices, site_ids)] += math.log(drift.odds_ratio)
        return offset

    leak_risk = expit(intercepts["cement_leak"] + _linear(design, "cement_leak")
                      + offsets("cement_leak"))
    symptomatic_risk = leak_risk * expit(
        intercepts["symptomatic_given_leak"] + _linear(design, "symptomatic_given_leak")
    )
    symptomatic_shift = offsets("symptomatic_cement_leak")
    shifted = symptomatic_shift != 0
    symptomatic_risk[shifted] = expit(logit(symptomatic_risk[shifted]) + symptomatic_shift[shifted])
    leak_draw = keyed.uniform(key, "leak")
    leak = leak_draw < np.maximum(leak_risk, symptomatic_risk)
    symptomatic_leak = leak_draw < symptomatic_risk

    major_risk = expit(intercepts["major_event"] + _linear(design, "major_event")
                       + offsets("major_event"))
    major = keyed.uniform(key, "major") < major_risk
    minor = {name: keyed.uniform(key, f"minor:{name}") < spec[0]
             for name, spec in MINOR_EVENTS.items()}

    miss_shift = offsets("mdt_discussion")
    miss_risk = np.where(miss_shift != 0, expit(logit(MDT_REFERENCE_MISS) + miss_shift), 0.0)
    mdt_discussed = ~(keyed.uniform(key, "mdt") < miss_risk)
    return {
        "leak": leak,
        "symptomatic_leak": symptomatic_leak,
        "major": major,
        "minor": minor,
        "mdt_discussed": mdt_discussed,
        "devices": devices,
    }


def _build_complications(keyed: _Keyed, proc: dict, fracture: dict, outcomes: dict) -> dict:
    """Turn outcomes into complication events with onset dates, levels and reporting lags.

    Every event comes from one source (leak, fracture, major event, or one kind of minor
    event) of one procedure; its key -- procedure key times 16 plus the source number -- keys
    all its draws.
    """
    parts = []
    type_code = {name: code for code, name in enumerate(EVENT_TYPES)}
    severity_code = {name: code for code, name in enumerate(SEVERITIES)}

    def add(source, proc_idx, onset, types, symptomatic, severity, lag):
        keys = proc["key"][proc_idx].astype(np.int64) * 16 + source
        parts.append((proc_idx, proc["day"][proc_idx] + onset, types, symptomatic, severity,
                      keyed.integers(keys, "report lag", *lag), keys))

    idx = np.flatnonzero(outcomes["leak"])
    keys = proc["key"][idx].astype(np.int64) * 16
    add(0, idx, keyed.choice(keys, "leak onset", LEAK_ONSET_SHARES),
        np.full(idx.size, type_code["cement_leak"]), outcomes["symptomatic_leak"][idx],
        np.full(idx.size, severity_code["minor"]), LEAK_REPORT_LAG)

    add(1, fracture["proc"], fracture["day"] - proc["day"][fracture["proc"]],
        np.where(fracture["adjacent"], type_code["adjacent_fracture"], type_code["new_fracture"]),
        fracture["symptomatic"], np.full(fracture["proc"].size, severity_code["minor"]),
        FRACTURE_REPORT_LAG)

    idx = np.flatnonzero(outcomes["major"])
    keys = proc["key"][idx].astype(np.int64) * 16 + 2
    kinds = keyed.choice(keys, "major type", [spec[0] for spec in MAJOR_EVENTS.values()])
    latest = np.asarray([spec[1] for spec in MAJOR_EVENTS.values()])[kinds]
    onset = np.floor(keyed.uniform(keys, "major onset") * (latest + 1)).astype(np.int64)
    add(2, idx, onset, np.asarray([type_code[name] for name in MAJOR_EVENTS])[kinds],
        np.ones(idx.size, bool),
        np.asarray([severity_code[spec[2]] for spec in MAJOR_EVENTS.values()])[kinds],
        OTHER_REPORT_LAG)

    for source, (name, (_, latest_day, symptomatic_share)) in enumerate(MINOR_EVENTS.items(), 3):
        idx = np.flatnonzero(outcomes["minor"][name])
        keys = proc["key"][idx].astype(np.int64) * 16 + source
        add(source, idx, keyed.integers(keys, "minor onset", 0, latest_day),
            np.full(idx.size, type_code[name]),
            keyed.uniform(keys, "minor symptomatic") < symptomatic_share,
            np.full(idx.size, severity_code["minor"]), OTHER_REPORT_LAG)

    names = ("proc", "day", "type", "symptomatic", "severity", "lag", "key")
    comp = {name: np.concatenate([part[i] for part in parts]) for i, name in enumerate(names)}
    comp["day"] = comp["day"].astype(np.int64)
    level = keyed.choice(comp["key"], "level", LEVEL_WEIGHTS)
    no_level = np.isin(comp["type"], [type_code[name] for name in EVENTS_WITHOUT_LEVEL])
    comp["level"] = np.where(no_level, -1, level)
    return comp


def _extract_days(start: date, end: date, cadence: str) -> np.ndarray:
    """Return the extract dates (as day numbers): the end of each cadence period, and ``end``."""
    if cadence == "daily":
        return np.arange(_day(start), _day(end) + 1)
    stamps = []
    if cadence == "weekly":
        current = start + timedelta(days=(6 - start.weekday()) % 7)  # first Sunday
        while current < end:
            stamps.append(current)
            current += timedelta(days=7)
    else:
        current = start
        while True:
            following = date(current.year + current.month // 12, current.month % 12 + 1, 1)
            month_end = following - timedelta(days=1)
            if month_end >= end:
                break
            stamps.append(month_end)
            current = following
    stamps.append(end)
    return np.asarray([_day(stamp) for stamp in stamps], dtype=np.int64)


# --- deliveries: which rows go into which file --------------------------------------------


@dataclass
class _Deliveries:
    """Rows of one kind across all files: entity index, file, and the erroneous field if any."""

    entity: np.ndarray
    extract: np.ndarray
    wrong_field: np.ndarray  # -1: true values; k: field k holds the value later corrected
    correction: np.ndarray  # True for the re-sent row carrying the corrected value


def _plan_deliveries(keyed: _Keyed, kind: str, keys: np.ndarray, extract: np.ndarray,
                     ext_days: np.ndarray, n_fields: int, with_corrections: bool) -> _Deliveries:
    """Send every entity in its extract; re-send ~1% later with a corrected value."""
    n = extract.size
    entity = np.arange(n)
    wrong_field = np.full(n, -1)
    chosen = keyed.uniform(keys, f"{kind} corrected") < CORRECTION_SHARE
    field = keyed.integers(keys, f"{kind} corrected field", 0, n_fields - 1)
    corrected_day = ext_days[extract] + keyed.integers(keys, f"{kind} correction lag",
                                                       *CORRECTION_LAG)
    fixed = np.flatnonzero(chosen & (corrected_day <= ext_days[-1])) if with_corrections else (
        np.zeros(0, np.int64))
    wrong_field[fixed] = field[fixed]
    corrected_extract = np.searchsorted(ext_days, corrected_day[fixed])
    rows = _Deliveries(
        entity=np.concatenate([entity, fixed]),
        extract=np.concatenate([extract, corrected_extract]),
        wrong_field=np.concatenate([wrong_field, np.full(fixed.size, -1)]),
        correction=np.concatenate([np.zeros(n, bool), np.ones(fixed.size, bool)]),
    )
    order = np.lexsort((rows.entity, rows.extract))
    return _Deliveries(rows.entity[order], rows.extract[order], rows.wrong_field[order],
                       rows.correction[order])


# --- formatting rows -----------------------------------------------------------------------


class _Formatter:
    """Render procedure and complication rows as contract-ordered lists of strings."""

    def __init__(self, site_ids: list[str], cohort: dict, outcomes: dict, comp: dict):
        self.site_ids = np.asarray(site_ids)
        self.proc = cohort["proc"]
        self.pat_seq = cohort["pat_seq"]
        self.mdt = outcomes["mdt_discussed"]
        self.devices = outcomes["devices"]
        self.comp = comp
        self.seq_width = max(6, len(str(int(self.proc["seq"].max(initial=0)))))
        self.pat_width = max(5, len(str(int(self.pat_seq.max(initial=0)))))
        self.comp_proc = comp["proc"]

    def procedure_ids(self, idx: np.ndarray) -> np.ndarray:
        seq = np.strings.zfill(self.proc["seq"][idx].astype(str), self.seq_width)
        return np.strings.add(np.strings.add(self.site_ids[self.proc["site"][idx]], "-"), seq)

    def procedures(self, idx: np.ndarray, wrong: np.ndarray) -> list[list[str]]:
        proc = self.proc
        site = self.site_ids[proc["site"][idx]]
        patient = np.strings.zfill(self.pat_seq[proc["patient"][idx]].astype(str), self.pat_width)
        operator = np.strings.zfill(proc["operator"][idx].astype(str), 2)
        levels = proc["levels"][idx].copy()
        age = proc["age"][idx].copy()
        anaesthesia = proc["anaesthesia"][idx].copy()
        # The first delivery of a corrected row carries a plausible wrong value.
        hit = wrong == PROCEDURE_CORRECTED_FIELDS.index("levels_treated")
        levels[hit] = np.where(levels[hit] == 1, 2, levels[hit] - 1)
        hit = wrong == PROCEDURE_CORRECTED_FIELDS.index("age_years")
        age[hit] = np.where(age[hit] >= 100, age[hit] - 2, age[hit] + 2)
        hit = wrong == PROCEDURE_CORRECTED_FIELDS.index("anaesthesia")
        anaesthesia[hit] = 1 - anaesthesia[hit]
        return [
            self.procedure_ids(idx).tolist(),
            site.tolist(),
            np.strings.add(np.strings.add(np.strings.add("PT-", site), "-"), patient).tolist(),
            np.strings.add(np.strings.add(np.strings.add("OP-", site), "-"), operator).tolist(),
            _iso(proc["day"][idx]),
            levels.astype(str).tolist(),
            np.asarray(INDICATIONS)[proc["indication"][idx]].tolist(),
            np.asarray(ANAESTHESIA)[anaesthesia].tolist(),
            proc["balloons"][idx].astype(str).tolist(),
            age.astype(str).tolist(),
            np.asarray(SEXES)[proc["sex"][idx]].tolist(),
            _bools(proc["steroid"][idx]),
            _bools(self.mdt[idx]),
            np.asarray(BALLOON_PRODUCTS)[self.devices["balloon"][idx]].tolist(),
            np.asarray(CEMENT_PRODUCTS)[self.devices["cement"][idx]].tolist(),
            self.devices["lot"][idx].tolist(),
            np.asarray(BALLOON_UDI_DI)[self.devices["balloon"][idx]].tolist(),
        ]

    def complications(self, idx: np.ndarray, wrong: np.ndarray) -> list[list[str]]:
        comp = self.comp
        proc_idx = comp["proc"][idx]
        proc_ids = self.procedure_ids(proc_idx)
        severity = comp["severity"][idx].copy()
        symptomatic = comp["symptomatic"][idx].copy()
        hit = wrong == COMPLICATION_CORRECTED_FIELDS.index("severity")
        # minor first reported as major, major as minor, fatal as major
        severity[hit] = np.asarray([1, 0, 1])[severity[hit]]
        hit = wrong == COMPLICATION_CORRECTED_FIELDS.index("symptomatic")
        symptomatic[hit] = ~symptomatic[hit]
        level = np.asarray(("",) + LEVELS)[comp["level"][idx] + 1]
        return [
            np.strings.add(np.strings.add(np.strings.add("C-", proc_ids), "-"),
                           comp["seq"][idx].astype(str)).tolist(),
            proc_ids.tolist(),
            self.site_ids[self.proc["site"][proc_idx]].tolist(),
            _iso(comp["day"][idx]),
            np.asarray(EVENT_TYPES)[comp["type"][idx]].tolist(),
            _bools(symptomatic),
            np.asarray(SEVERITIES)[severity].tolist(),
            level.tolist(),
        ]


def _bools(values: np.ndarray) -> list[str]:
    return np.where(values, "true", "false").tolist()


# --- defects -------------------------------------------------------------------------------

_PROC_COL = {spec.name: i for i, spec in enumerate(PROCEDURE_COLUMNS)}
_COMP_COL = {spec.name: i for i, spec in enumerate(COMPLICATION_COLUMNS)}
_PROC_OUT_OF_RANGE = (("levels_treated", ("0", "11", "12")), ("age_years", ("12", "130", "7")),
                      ("balloons", ("0", "3")))
_PROC_UNKNOWN_ENUM = (("indication", ("trauma", "unknown", "myeloma")),
                      ("anaesthesia", ("sedation", "spinal")), ("sex", ("X", "Q")),
                      ("steroid_use", ("maybe",)), ("mdt_discussed", ("pending",)))
_PROC_REQUIRED = tuple(spec.name for spec in PROCEDURE_COLUMNS
                       if spec.required and spec.name != "procedure_id")
_COMP_UNKNOWN_ENUM = (("event_type", ("leak", "haematoma", "fracture")),
                      ("severity", ("moderate", "severe")), ("symptomatic", ("maybe",)))
_COMP_REQUIRED = tuple(spec.name for spec in COMPLICATION_COLUMNS
                       if spec.required and spec.name != "complication_id")
_BAD_SITE_IDS = ("S1", "SITE000001", "S 001", "S#01")
_BAD_LEVELS = ("L9", "T14", "C9")


def _bad_date(iso: str, variant: int) -> str:
    year, month, day = iso[:4], iso[5:7], iso[8:10]
    return (f"{day}/{month}/{year}", f"{year}-02-30", f"{year}-13-{day}")[variant % 3]


def _pick(options: tuple, variant: int):
    return options[variant % len(options)]


def _apply_defect(kind: str, defect: str, row: list[list[str]], at: int, variant: int,
                  extract_day: int, procedure_day: int | None) -> None:
    """Overwrite row ``at`` of the column lists with one defect of the named type."""
    cols = _PROC_COL if kind == "procedures" else _COMP_COL
    date_col = cols["procedure_date" if kind == "procedures" else "event_date"]
    if defect == "bad_date":
        row[date_col][at] = _bad_date(row[date_col][at], variant)
    elif defect == "future_date":
        row[date_col][at] = _iso(np.asarray([extract_day + FUTURE_OFFSET_DAYS + variant % 365]))[0]
    elif defect == "out_of_range":
        if kind == "procedures":
            name, values = _pick(_PROC_OUT_OF_RANGE, variant)
            row[cols[name]][at] = _pick(values, variant // 7)
        else:
            row[cols["vertebral_level"]][at] = _pick(_BAD_LEVELS, variant)
    elif defect == "unknown_enum":
        choices = _PROC_UNKNOWN_ENUM if kind == "procedures" else _COMP_UNKNOWN_ENUM
        name, values = _pick(choices, variant)
        row[cols[name]][at] = _pick(values, variant // 7)
    elif defect == "empty_required":
        names = _PROC_REQUIRED if kind == "procedures" else _COMP_REQUIRED
        row[cols[_pick(names, variant)]][at] = ""
    elif defect == "formula":
        row[cols["patient_ref" if kind == "procedures" else "vertebral_level"]][at] = FORMULA
    elif defect == "bad_site_id":
        row[cols["site_id"]][at] = _pick(_BAD_SITE_IDS, variant)
    elif defect == "event_before_procedure":
        row[date_col][at] = _iso(np.asarray([procedure_day - 1 - variant % 60]))[0]
    # duplicate_id is applied to the delivery plan before formatting (an exact copy of a row)


@dataclass
class _BadRows:
    """Defective rows of one file: positions, defect codes, variants and duplicate sources."""

    position: np.ndarray
    defect: np.ndarray
    variant: np.ndarray


def _choose_bad_rows(rng, n_rows: int, rate: float, kind: str) -> _BadRows:
    """Pick about ``rate`` of a file's rows, always leaving most of the file valid."""
    if rate <= 0 or n_rows < 3:
        empty = np.zeros(0, np.int64)
        return _BadRows(empty, empty, empty)
    count = min(int(math.floor(rate * n_rows + rng.random())), (n_rows - 1) // 2)
    position = np.sort(rng.choice(n_rows, size=count, replace=False))
    defect = rng.integers(0, len(DEFECTS[kind]), count)
    variant = rng.integers(0, 1 << 30, count)
    return _BadRows(position, defect, variant)


def _duplicate_sources(n_rows: int, bad: np.ndarray) -> np.ndarray:
    """For each bad position, the nearest preceding clean row (else the nearest following)."""
    clean = np.setdiff1d(np.arange(n_rows), bad)
    before = np.searchsorted(clean, bad) - 1
    after = np.minimum(before + 1, clean.size - 1)
    return np.where(before >= 0, clean[np.maximum(before, 0)], clean[after])


# --- writing ------------------------------------------------------------------------------


def _write_csv(path: Path, header: list[str], chunks: Iterable[list[list[str]]]) -> str:
    """Write header and row chunks atomically; return the SHA-256 of the bytes written."""
    digest = hashlib.sha256()
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        for index, columns in enumerate(_with_header(header, chunks)):
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            if index == 0:
                writer.writerow(header)
            writer.writerows(zip(*columns, strict=True))
            data = buffer.getvalue().encode("utf-8")
            digest.update(data)
            handle.write(data)
    os.replace(temporary, path)
    return digest.hexdigest()


def _with_header(header: list[str], chunks: Iterable[list[list[str]]]):
    empty = True
    for columns in chunks:
        empty = False
        yield columns
    if empty:
        yield [[] for _ in header]


def _check_arguments(sites, start, end, seed, bad_row_rate, cadence, volume_scale) -> None:
    if not isinstance(sites, int) or isinstance(sites, bool) or not 1 <= sites <= MAX_SITES:
        raise InputRejected(f"sites must be a whole number from 1 to {MAX_SITES}, got {sites!r}")
    if not isinstance(start, date) or not isinstance(end, date):
        raise InputRejected("start and end must be dates")
    if end < start:
        raise InputRejected(f"end {end} is before start {start}")
    if (end - start).days + 1 > MAX_DAYS:
        raise InputRejected(f"the period {start}..{end} is longer than {MAX_DAYS // 366} years")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputRejected(f"seed must be a non-negative whole number, got {seed!r}")
    if not (isinstance(bad_row_rate, int | float) and 0 <= bad_row_rate <= MAX_BAD_ROW_RATE):
        raise InputRejected(f"bad row rate must be between 0 and {MAX_BAD_ROW_RATE}, "
                            f"got {bad_row_rate!r}")
    if cadence not in CADENCES:
        raise InputRejected(f"cadence must be one of {', '.join(CADENCES)}, got {cadence!r}")
    if not (isinstance(volume_scale, int | float) and 0 < volume_scale <= 100):
        raise InputRejected(f"volume scale must be above 0 and at most 100, got {volume_scale!r}")


def _check_drifts(drifts, sites: int, site_ids: list[str], end: date) -> tuple[Drift, ...]:
    checked = []
    for drift in drifts:
        drift = parse_drift(drift) if isinstance(drift, str) else drift
        if not isinstance(drift, Drift):
            raise InputRejected(f"drift {drift!r} is neither a Drift nor a drift spec")
        site_id = drift.site_id.rsplit("-", 1)[0] if drift.target == "OPERATOR" else (
            drift.site_id if drift.target == "SITE" else None)
        if site_id is not None and site_id not in site_ids:
            raise InputRejected(f"drift {drift.spec()}: site {site_id} is not simulated "
                                f"(sites are {site_ids[0]}..{site_ids[-1]})")
        if drift.from_date > end:
            raise InputRejected(f"drift {drift.spec()}: starts after the end date {end}")
        checked.append(drift)
    return tuple(checked)


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputRejected(f"output {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    clashes = sorted(p.name for p in out_dir.iterdir()
                     if kind_of(p.name) or p.name == "manifest.json")
    if clashes:
        raise InputRejected(f"output directory {out_dir} already holds extract files "
                            f"({clashes[0]}, ...); choose an empty directory")


def expit(x):
    """Return scipy's logistic function (imported on first use: the CLI starts faster)."""
    from scipy.special import expit as scipy_expit

    return scipy_expit(x)


def logit(p):
    """Return scipy's logit (imported on first use)."""
    from scipy.special import logit as scipy_logit

    return scipy_logit(p)


def site_id_list(sites: int) -> list[str]:
    """Return the simulated site ids: S001, S002, ... (wider when there are over 999 sites)."""
    width = max(3, len(str(sites)))
    return [f"S{number:0{width}d}" for number in range(1, sites + 1)]


def simulate(
    out_dir: Path,
    *,
    sites: int,
    start: date,
    end: date,
    seed: int,
    drifts: Iterable[Drift | str] = (),
    bad_row_rate: float = 0.0,
    cadence: str = "monthly",
    single_file: bool = False,
    volume_scale: float = 1.0,
) -> dict:
    """Write synthetic extract files and ``manifest.json`` into ``out_dir``; return the manifest.

    ``volume_scale`` multiplies every site's annual volume (20-600 procedures a year before
    scaling); the benchmark uses it to reach about a million procedures.
    """
    _check_arguments(sites, start, end, seed, bad_row_rate, cadence, volume_scale)
    site_ids = site_id_list(sites)
    drifts = _check_drifts(drifts, sites, site_ids, end)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)

    names = ("sites", "cohort", "bad")
    streams = dict(zip(names, (np.random.default_rng(child) for child in
                               np.random.SeedSequence(seed).spawn(len(names))), strict=True))
    start_day, end_day = _day(start), _day(end)
    cohort = _simulate_cohort(streams, sites, start_day, end_day, volume_scale, drifts, site_ids)
    proc = cohort["proc"]
    keyed = _Keyed(seed)
    outcomes = _simulate_outcomes(keyed, proc, drifts, site_ids)
    comp = _build_complications(keyed, proc, cohort["fracture"], outcomes)

    # Reporting: a procedure arrives 0-3 days after it (the final extract holds everything up
    # to the end date); a complication once its reporting lag has passed, never before its
    # procedure; events not reported by the end date are simply not in any file yet.
    ext_days = (np.asarray([end_day]) if single_file else _extract_days(start, end, cadence))
    lag = keyed.integers(proc["key"], "procedure report lag", *PROCEDURE_REPORT_LAG)
    proc_arrival = np.minimum(proc["day"] + lag, end_day)
    proc_extract = np.searchsorted(ext_days, proc_arrival)
    reported = comp["day"] + comp["lag"] <= end_day
    unreported = int((~reported).sum())
    comp = {key: value[reported] for key, value in comp.items()}
    order = np.lexsort((comp["type"], comp["day"], comp["proc"]))
    comp = {key: value[order] for key, value in comp.items()}
    starts = np.flatnonzero(np.r_[True, comp["proc"][1:] != comp["proc"][:-1]]) if (
        comp["proc"].size) else np.zeros(0, np.int64)
    run_start = np.repeat(starts, np.diff(np.r_[starts, comp["proc"].size]))
    comp["seq"] = np.arange(comp["proc"].size) - run_start + 1
    comp_arrival = np.maximum(comp["day"] + comp["lag"], proc_arrival[comp["proc"]])
    comp_extract = np.searchsorted(ext_days, comp_arrival)
    late = comp_extract > proc_extract[comp["proc"]]

    proc_rows = _plan_deliveries(keyed, "procedures", proc["key"], proc_extract, ext_days,
                                 len(PROCEDURE_CORRECTED_FIELDS), not single_file)
    comp_rows = _plan_deliveries(keyed, "complications", comp["key"], comp_extract, ext_days,
                                 len(COMPLICATION_CORRECTED_FIELDS), not single_file)
    formatter = _Formatter(site_ids, cohort, outcomes, comp)

    bad_counts = {kind: dict.fromkeys(DEFECTS[kind], 0) for kind in DEFECTS}
    clean_delivered = {"procedures": np.zeros(proc["day"].size, bool),
                       "complications": np.zeros(comp["proc"].size, bool)}
    files = []
    bad_rng = streams["bad"]
    for x, ext_day in enumerate(ext_days.tolist()):
        stamp = (EPOCH + timedelta(days=ext_day)).strftime("%Y%m%d")
        for kind, rows in (("procedures", proc_rows), ("complications", comp_rows)):
            lo, hi = np.searchsorted(rows.extract, [x, x + 1])
            entity = rows.entity[lo:hi].copy()
            wrong = rows.wrong_field[lo:hi].copy()
            corrections = int(rows.correction[lo:hi].sum())
            bad = _choose_bad_rows(bad_rng, entity.size, bad_row_rate, kind)
            duplicate = bad.defect == DEFECTS[kind].index("duplicate_id")
            if duplicate.any():
                source = _duplicate_sources(entity.size, bad.position)[duplicate]
                entity[bad.position[duplicate]] = entity[source]
                wrong[bad.position[duplicate]] = wrong[source]
            clean_mask = np.ones(entity.size, bool)
            clean_mask[bad.position] = False
            clean_delivered[kind][entity[clean_mask]] = True
            for code, count in zip(*np.unique(bad.defect, return_counts=True), strict=True):
                bad_counts[kind][DEFECTS[kind][code]] += int(count)
            header = [spec.name for spec in (PROCEDURE_COLUMNS if kind == "procedures"
                                             else COMPLICATION_COLUMNS)]
            name = f"{kind}_{stamp}.csv"
            digest = _write_csv(out_dir / name, header, _render_chunks(
                formatter, kind, entity, wrong, bad, ext_day, proc, comp))
            files.append({"name": name, "kind": kind, "extract_date": _iso([ext_day])[0],
                          "rows": int(entity.size), "corrections": corrections,
                          "bad_rows": int(bad.position.size), "sha256": digest})

    manifest = _manifest(
        sites=sites, start=start, end=end, seed=seed, drifts=drifts, bad_row_rate=bad_row_rate,
        cadence=cadence, single_file=single_file, volume_scale=volume_scale, site_ids=site_ids,
        cohort=cohort, outcomes=outcomes, comp=comp, late=late, unreported=unreported,
        proc_rows=proc_rows, comp_rows=comp_rows, bad_counts=bad_counts,
        clean_delivered=clean_delivered, files=files,
    )
    temporary = out_dir / ".manifest.json.tmp"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, out_dir / "manifest.json")
    return manifest


def simulate_snapshot(
    profile: Profile,
    *,
    sites: int,
    start: date,
    end: date,
    seed: int,
    drifts: Iterable[Drift | str] = (),
    volume_scale: float = 1.0,
    as_of: date | None = None,
) -> tuple[Snapshot, dict]:
    """Simulate a registry straight into a monitor :class:`Snapshot`: no files, no database.

    The cohort, outcomes and complications are the same draws as :func:`simulate` with the
    same arguments (same seed streams, same keyed draws), so a site's procedures and events
    are the ones its extracts would carry, with their true values. Unlike the files, every
    event dated up to ``as_of`` (default ``end``) is present: no reporting lag, no
    corrections, no bad rows. The rows are shaped as the warehouse hands them to
    :func:`pipelines.surveillance.outcomes.load_snapshot` (ISO dates, contract strings,
    booleans, whole numbers; a patient number stands in for ``patient_hash``) and coded by
    :func:`pipelines.surveillance.outcomes.snapshot_from_rows`.

    Returns ``(snapshot, info)``; ``info`` holds ``site_ids``, ``annual_volume`` (site id ->
    procedures a year, after ``volume_scale``), ``drifts`` (the parsed :class:`Drift` tuple),
    ``start``, ``end`` and ``as_of``.
    """
    from pipelines.surveillance.outcomes import snapshot_from_rows, snapshot_needs

    _check_arguments(sites, start, end, seed, 0.0, "monthly", volume_scale)
    site_ids = site_id_list(sites)
    drifts = _check_drifts(drifts, sites, site_ids, end)
    as_of = end if as_of is None else as_of
    if not isinstance(as_of, date):
        raise InputRejected("as_of must be a date")

    names = ("sites", "cohort", "bad")
    streams = dict(zip(names, (np.random.default_rng(child) for child in
                               np.random.SeedSequence(seed).spawn(len(names))), strict=True))
    cohort = _simulate_cohort(streams, sites, _day(start), _day(end), volume_scale, drifts,
                              site_ids)
    proc = cohort["proc"]
    keyed = _Keyed(seed)
    outcomes = _simulate_outcomes(keyed, proc, drifts, site_ids)
    comp = _build_complications(keyed, proc, cohort["fracture"], outcomes)
    formatter = _Formatter(site_ids, cohort, outcomes, comp)
    needs_patient, event_types = snapshot_needs(profile)
    as_of_day = _day(as_of)

    def ids(rows: np.ndarray) -> np.ndarray:
        if not rows.size:
            return np.empty(0, dtype=object)
        return formatter.procedure_ids(rows).astype(object)

    idx = np.flatnonzero(proc["day"] <= as_of_day)
    proc_rows = {
        "procedure_id": ids(idx),
        "site_id": np.asarray(site_ids, dtype=object)[proc["site"][idx]],
        "procedure_date": np.asarray(_iso(proc["day"][idx]), dtype=object),
        "age_years": proc["age"][idx].astype(np.int64),
        "sex": np.asarray(SEXES, dtype=object)[proc["sex"][idx]],
        "steroid_use": proc["steroid"][idx].astype(bool),
        "levels_treated": proc["levels"][idx].astype(np.int64),
        "indication": np.asarray(INDICATIONS, dtype=object)[proc["indication"][idx]],
        "anaesthesia": np.asarray(ANAESTHESIA, dtype=object)[proc["anaesthesia"][idx]],
        "balloons": proc["balloons"][idx].astype(np.int64),
        "mdt_discussed": outcomes["mdt_discussed"][idx].astype(bool),
    }
    if needs_patient:
        proc_rows["patient_hash"] = proc["patient"][idx].astype(np.int64)

    type_codes = [EVENT_TYPES.index(name) for name in event_types]
    keep = ((comp["day"] <= as_of_day) & (proc["day"][comp["proc"]] <= as_of_day)
            & np.isin(comp["type"], type_codes))
    chosen = np.flatnonzero(keep)
    chosen = chosen[np.lexsort((comp["type"][chosen], comp["day"][chosen], comp["proc"][chosen]))]
    comp_rows = {
        "procedure_id": ids(comp["proc"][chosen]),
        "event_date": np.asarray(_iso(comp["day"][chosen]), dtype=object),
        "event_type": np.asarray(EVENT_TYPES, dtype=object)[comp["type"][chosen]],
        "symptomatic": comp["symptomatic"][chosen].astype(bool),
        "severity": np.asarray(SEVERITIES, dtype=object)[comp["severity"][chosen]],
    }
    snapshot = snapshot_from_rows(proc_rows, comp_rows, as_of, needs_patient)
    info = {
        "site_ids": site_ids,
        "annual_volume": {site_id: float(volume) for site_id, volume in
                          zip(site_ids, cohort["annual_volume"], strict=True)},
        "drifts": drifts,
        "start": start,
        "end": end,
        "as_of": as_of,
    }
    return snapshot, info


def _render_chunks(formatter: _Formatter, kind: str, entity, wrong, bad: _BadRows, ext_day: int,
                   proc: dict, comp: dict):
    """Yield the file's rows in chunks, with the defects of that chunk applied."""
    render: Callable = formatter.procedures if kind == "procedures" else formatter.complications
    for lo in range(0, entity.size, CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, entity.size)
        columns = render(entity[lo:hi], wrong[lo:hi])
        first, last = np.searchsorted(bad.position, [lo, hi])
        for position, code, variant in zip(bad.position[first:last].tolist(),
                                           bad.defect[first:last].tolist(),
                                           bad.variant[first:last].tolist(), strict=True):
            procedure_day = None
            if kind == "complications":
                procedure_day = int(proc["day"][comp["proc"][entity[position]]])
            _apply_defect(kind, DEFECTS[kind][code], columns, position - lo, variant, ext_day,
                          procedure_day)
        yield columns


def _by_type(types: np.ndarray) -> dict[str, int]:
    counts = np.bincount(types, minlength=len(EVENT_TYPES)) if types.size else (
        np.zeros(len(EVENT_TYPES), np.int64))
    return {name: int(count) for name, count in zip(EVENT_TYPES, counts, strict=True)}


def _manifest(*, sites, start, end, seed, drifts, bad_row_rate, cadence, single_file,
              volume_scale, site_ids, cohort, outcomes, comp, late, unreported, proc_rows,
              comp_rows, bad_counts, clean_delivered, files) -> dict:
    """Assemble the manifest: parameters, model, counts and the files written."""
    proc = cohort["proc"]
    type_code = {name: code for code, name in enumerate(EVENT_TYPES)}
    major_types = [type_code[name] for name in MAJOR_EVENTS]
    major = np.isin(comp["type"], major_types) & (comp["severity"] >= SEVERITIES.index("major"))
    symptomatic_leaks = (comp["type"] == type_code["cement_leak"]) & comp["symptomatic"]
    clean_procs = clean_delivered["procedures"]
    clean_comps = clean_delivered["complications"]

    def corrections(rows: _Deliveries, fields: tuple[str, ...]) -> dict:
        fixed = rows.entity[rows.correction]
        wrong = np.full(int(rows.entity.max(initial=-1)) + 1, -1)
        first = ~rows.correction
        wrong[rows.entity[first]] = rows.wrong_field[first]
        codes = wrong[fixed]
        return {"rows": int(fixed.size),
                "by_field": {f: int((codes == i).sum()) for i, f in enumerate(fields)}}

    drift_rows = []
    for drift in drifts:
        if drift.target == "SITE":
            site = site_ids.index(drift.site_id)
            affected = (proc["site"] == site) & (proc["day"] >= _day(drift.from_date))
        else:
            affected = _target_mask(drift, proc, outcomes["devices"], site_ids)
        drift_rows.append({"spec": drift.spec(), "target": drift.target, "site_id": drift.site_id,
                           "metric": drift.metric, "odds_ratio": drift.odds_ratio,
                           "from_date": drift.from_date.isoformat(),
                           "procedures_affected": int(affected.sum())})
    site_counts = np.bincount(proc["site"], minlength=sites)
    return {
        "generator": GENERATOR,
        "model_version": MODEL_VERSION,
        "parameters": {
            "sites": sites, "start": start.isoformat(), "end": end.isoformat(), "seed": seed,
            "cadence": "single_file" if single_file else cadence, "single_file": single_file,
            "bad_row_rate": bad_row_rate, "volume_scale": volume_scale,
            "drifts": [drift.spec() for drift in drifts],
        },
        "model": {
            "baselines": {
                "cement_leak_per_procedure": LEAK_RATE,
                "symptomatic_cement_leak_per_procedure": SYMPTOMATIC_LEAK_RATE,
                "new_fracture_per_patient_365d": FRACTURE_RATE_PER_PATIENT,
                "major_event_per_procedure": MAJOR_EVENT_RATE,
                "mdt_reference_miss_for_drift": MDT_REFERENCE_MISS,
            },
            "covariates": list(COVARIATES),
            "odds_ratios": {name: list(values) for name, values in ODDS_RATIOS.items()},
            "intercepts": {name: round(value, 6) for name, value in
                           calibrated_intercepts().items()},
        },
        "drift": drift_rows,
        "counts": {
            "sites": sites,
            "procedures": int(proc["day"].size),
            "patients": int(cohort["n_patients"]),
            "repeat_procedures": cohort["repeat_procedures"],
            "mdt_not_discussed": int((~outcomes["mdt_discussed"]).sum()),
            "complications": int(comp["proc"].size),
            "complications_by_type": _by_type(comp["type"]),
            "symptomatic_cement_leaks": int(symptomatic_leaks.sum()),
            "major_events": int(major.sum()),
            "late_complications": int(late.sum()),
            "unreported_complications": unreported,
            "corrections": {
                "procedures": corrections(proc_rows, PROCEDURE_CORRECTED_FIELDS),
                "complications": corrections(comp_rows, COMPLICATION_CORRECTED_FIELDS),
            },
            "rows_written": {
                "procedures": int(proc_rows.entity.size),
                "complications": int(comp_rows.entity.size),
            },
            "bad_rows": {
                "total": sum(sum(by_defect.values()) for by_defect in bad_counts.values()),
                **bad_counts,
            },
            "delivered_clean": {
                "procedures": int(clean_procs.sum()),
                "patients": int(np.count_nonzero(
                    np.bincount(proc["patient"][clean_procs], minlength=1))),
                "complications": int(clean_comps.sum()),
                "complications_by_type": _by_type(comp["type"][clean_comps]),
            },
            "files_written": len(files) + 1,
        },
        "sites": {
            site_id: {"annual_volume": round(float(volume), 1), "procedures": int(count)}
            for site_id, volume, count in zip(site_ids, cohort["annual_volume"], site_counts,
                                              strict=True)
        },
        "files": files,
    }


# --- command line ---------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add the ``simulate`` sub-command."""
    parser = subparsers.add_parser(
        "simulate",
        help="write synthetic registry extracts (reproducible from a seed)",
        description="Write synthetic procedure/complication extracts and manifest.json. "
        "The model is documented in docs/simulator.md.",
    )
    parser.add_argument("--out", help="output directory (created; must hold no extracts)")
    parser.add_argument("--sites", help="number of sites (S001, S002, ...)")
    parser.add_argument("--start", help="first procedure date, YYYY-MM-DD")
    parser.add_argument("--end", help="last procedure date and last extract date, YYYY-MM-DD")
    parser.add_argument("--seed", help="random seed; the same seed gives identical files")
    parser.add_argument("--drift", action="append", default=[],
                        metavar="SITE:METRIC:ODDS_RATIO:FROM_DATE",
                        help=f"raise the odds of METRIC ({', '.join(DRIFT_METRICS)}) at SITE "
                        "from FROM_DATE; also PRODUCT:NAME:METRIC:OR:FROM_DATE, "
                        "LOT:LOT_ID:METRIC:OR:FROM_DATE and OPERATOR:SITE-NN:METRIC:OR:FIRST_N "
                        "(the operator's first N procedures); repeatable")
    parser.add_argument("--bad-row-rate", default="0", help="share of defective rows, 0-0.5")
    parser.add_argument("--cadence", default="monthly", help="daily, weekly or monthly extracts")
    parser.add_argument("--single-file", action="store_true",
                        help="write one procedures and one complications file (no corrections)")
    parser.add_argument("--volume-scale", default="1",
                        help="multiply every site's annual volume (20-600 before scaling)")
    parser.set_defaults(handler=_handle)


def _number(text: str | None, what: str, kind: type) -> int | float:
    if text is None:
        raise InputRejected(f"--{what} is required")
    try:
        return kind(text)
    except ValueError:
        raise InputRejected(f"--{what} {text!r} is not a {'whole ' if kind is int else ''}number"
                            ) from None


def _handle(args: argparse.Namespace) -> int:
    """Run ``kyphowatch simulate`` and print a short summary (no patient references)."""
    if not args.out:
        raise InputRejected("--out is required")
    for flag in ("start", "end"):
        if not getattr(args, flag):
            raise InputRejected(f"--{flag} is required")
    manifest = simulate(
        Path(args.out),
        sites=_number(args.sites, "sites", int),
        start=_parse_date(args.start, "--start"),
        end=_parse_date(args.end, "--end"),
        seed=_number(args.seed, "seed", int),
        drifts=[parse_drift(text) for text in args.drift],
        bad_row_rate=_number(args.bad_row_rate, "bad-row-rate", float),
        cadence=args.cadence,
        single_file=args.single_file,
        volume_scale=_number(args.volume_scale, "volume-scale", float),
    )
    counts = manifest["counts"]
    print(
        f"simulated {counts['procedures']} procedures ({counts['patients']} patients) at "
        f"{counts['sites']} sites, {manifest['parameters']['start']}.."
        f"{manifest['parameters']['end']}; {counts['complications']} complications "
        f"({counts['late_complications']} late), "
        f"{counts['corrections']['procedures']['rows'] + counts['corrections']['complications']['rows']}"
        f" corrections, {counts['bad_rows']['total']} bad rows; "
        f"{counts['files_written']} files in {args.out}"
    )
    return 0
