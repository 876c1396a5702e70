"""Case-mix model for the risk-adjusted CUSUM: who is expected to have the event.

A site that treats older, steroid-using, multi-level or malignant cases should not signal
merely for its case mix. The model is a logistic regression (statsmodels GLM, Binomial,
logit link) fitted on the pooled *mature* units of all sites, with these covariates:

* ``age10``: (age_years - 70) / 10 -- effect per 10 years, centred so the intercept is a
  70-year-old;
* ``sex_M``, ``sex_U`` (reference F);
* ``steroid_use`` (0/1);
* ``levels_treated - 1`` (per extra level);
* ``indication_malignancy``, ``indication_haemangioma``, ``indication_other``
  (reference osteoporosis);
* ``anaesthesia_general`` (reference local);
* ``balloons - 1`` (bipedicular vs unipedicular).

Columns that are constant in the data are dropped (a dummy for a category nobody has).
For speed the fit uses identical covariate patterns aggregated to (events, trials), which
gives exactly the same estimates as the per-case fit; log-likelihood, deviance and AIC are
reported on the per-case (Bernoulli) scale.

Recalibration: the pooled data may include sites that are out of control, and the guidance
baseline is the agreed reference. The intercept is therefore shifted by ``delta`` (solved
numerically, Brent's method) so that the mean expected risk over the fitted population
equals the profile baseline; the model keeps only the *relative* case-mix effects.

Fallback: with fewer events (or non-events) than ``min_events``, or fewer than 10 per
parameter, or when the fit fails to converge or separates, every case gets the flat
baseline and the reason is logged and stored with the model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import special

log = logging.getLogger(__name__)

CANDIDATE_TERMS = (
    "age10",
    "sex_M",
    "sex_U",
    "steroid_use",
    "extra_levels",
    "indication_malignancy",
    "indication_haemangioma",
    "indication_other",
    "anaesthesia_general",
    "extra_balloon",
)
EVENTS_PER_PARAMETER = 10
_P_FLOOR = 1e-6


def term_values(frame: pd.DataFrame, term: str) -> np.ndarray:
    """Return one candidate covariate column (a term of :data:`CANDIDATE_TERMS`) as floats.

    Categorical columns are fastest as pandas ``category`` dtype (as outcomes delivers them).
    """
    if term == "age10":
        return (frame["age_years"].to_numpy(float) - 70.0) / 10.0
    if term == "extra_levels":
        return frame["levels_treated"].to_numpy(float) - 1.0
    if term == "extra_balloon":
        return frame["balloons"].to_numpy(float) - 1.0
    if term == "steroid_use":
        return frame["steroid_use"].to_numpy(float)
    column, _, level = term.partition("_")
    if term == "anaesthesia_general":
        column, level = "anaesthesia", "general"
    return frame[column].eq(level).to_numpy(float)


def design_matrix(frame: pd.DataFrame) -> pd.DataFrame:
    """Return the candidate covariate columns (no intercept) for units in ``frame``."""
    return pd.DataFrame({term: term_values(frame, term) for term in CANDIDATE_TERMS},
                        index=frame.index)


def covariate_patterns(frame: pd.DataFrame, y: np.ndarray
                       ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Return (distinct covariate patterns, events, units) per pattern, patterns sorted.

    The same as grouping :func:`design_matrix` with ``y`` by every term (sorted, as
    ``groupby(..., sort=True)``), without the million-row frame: each term becomes integer
    codes in the order of its values, the codes one mixed-radix key, and a pattern's term
    values are read back from its key.
    """
    key = np.zeros(len(frame), dtype=np.int64)
    values: list[np.ndarray] = []
    space = 1  # the number of possible keys: the product of the terms' distinct counts
    for term in CANDIDATE_TERMS:
        codes, distinct = _term_codes(frame, term)
        codes = codes.astype(np.int64, copy=False)
        if distinct.size and key.size and int(key.max()) > (2**62) // distinct.size:
            raise OverflowError("too many covariate patterns for a 64-bit key")
        # In place: the same values without a million-row temporary per term.
        key *= distinct.size
        key += codes
        space *= max(distinct.size, 1)
        values.append(distinct)
    inverse, keys = _sorted_factorize(key, space)
    units = np.bincount(inverse, minlength=len(keys))
    events = np.bincount(inverse, weights=y, minlength=len(keys))
    columns: dict[str, np.ndarray] = {}
    rest = keys
    for term, distinct in zip(reversed(CANDIDATE_TERMS), reversed(values), strict=True):
        columns[term] = distinct[rest % distinct.size] if distinct.size else distinct
        rest = rest // max(distinct.size, 1)
    patterns = pd.DataFrame({term: columns[term] for term in CANDIDATE_TERMS})
    return patterns, events, units.astype(np.int64)


# Widest range of small integers coded by counting (np.bincount) rather than hashing: its
# count and rank arrays (8 MB each at most) stay below the units' own columns.
_COUNTED_RANGE = 1 << 20
# Terms that are an integer column shifted and scaled (term_values): coded on the integers.
_INTEGER_TERMS = {"age10": "age_years", "extra_levels": "levels_treated",
                  "extra_balloon": "balloons"}


def _counted_codes(values: np.ndarray, space: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (codes in the order of the values, the distinct values) of integers in [0, space)."""
    present = np.bincount(values, minlength=space) > 0
    rank = np.cumsum(present) - 1
    return rank[values], np.flatnonzero(present)


def _sorted_factorize(values: np.ndarray, space: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``pd.factorize(values, sort=True)`` of integers in [0, space).

    Counting is a third of the time of hashing a million values when the range is small
    (the covariate patterns' keys, a term's few values); a wide range is hashed.
    """
    if 0 < len(values) and space <= _COUNTED_RANGE:
        return _counted_codes(values, space)
    return pd.factorize(values, sort=True)


def _term_codes(frame: pd.DataFrame, term: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``pd.factorize(term_values(frame, term), sort=True)``, counted where it can be.

    A 0/1 term is coded by its booleans, an integer term by its (shifted) integers; the
    distinct values are made by :func:`term_values`' own arithmetic on the distinct integers,
    so they are the same floats. Anything else (floats, missing values) is hashed as before.
    """
    source = _INTEGER_TERMS.get(term)
    if source is not None:
        integers = frame[source].to_numpy()
        if integers.dtype.kind in "iu" and len(integers):
            low, high = int(integers.min()), int(integers.max())
            if high - low < _COUNTED_RANGE:
                codes, distinct = _counted_codes((integers - low).astype(np.int64), high - low + 1)
                return codes, term_values(pd.DataFrame({source: distinct + low}), term)
    elif term != "steroid_use" or frame["steroid_use"].dtype == bool:
        # a level's indicator (Series.eq gives booleans), or steroid_use read as booleans
        flags = (_indicator(frame, term) if term != "steroid_use"
                 else frame["steroid_use"].to_numpy())
        if len(flags):
            codes, distinct = _counted_codes(flags.astype(np.int64), 2)
            return codes, distinct.astype(float)
    # factorize (hashing) rather than np.unique (a sort of a million values a term)
    return pd.factorize(term_values(frame, term), sort=True)


def _indicator(frame: pd.DataFrame, term: str) -> np.ndarray:
    """Return a level term's booleans (``term_values`` before the cast to float)."""
    column, _, level = term.partition("_")
    if term == "anaesthesia_general":
        column, level = "anaesthesia", "general"
    values = frame[column]
    if isinstance(values.dtype, pd.CategoricalDtype):
        # on the codes: comparing a categorical to a string costs as much as the counting
        categories = values.cat.categories
        if level not in categories:
            return np.zeros(len(values), dtype=bool)
        return values.cat.codes.to_numpy() == categories.get_loc(level)
    return values.eq(level).to_numpy(bool)


@dataclass
class RiskModel:
    """A fitted (or flat fallback) expected-risk model for one metric."""

    metric: str
    baseline: float
    kind: str  # "logistic" | "flat"
    terms: tuple[str, ...] = ()
    coefficients: dict[str, float] = field(default_factory=dict)
    standard_errors: dict[str, float] = field(default_factory=dict)
    calibration_shift: float = 0.0
    n: int = 0
    events: int = 0
    aic: float | None = None
    deviance: float | None = None
    c_statistic: float | None = None
    reason: str | None = None

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Return the recalibrated expected risk for each unit in ``frame``."""
        if self.kind == "flat" or frame.empty:
            return np.full(len(frame), self.baseline, dtype=float)
        eta = np.full(len(frame), self.coefficients["intercept"] + self.calibration_shift)
        for term in self.terms:  # one column at a time: no frame of every term
            eta += self.coefficients[term] * term_values(frame, term)
        return np.clip(special.expit(eta), _P_FLOOR, 1.0 - _P_FLOOR)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready description stored in ``monitor_run.models``."""

        def _round(value: float | None) -> float | None:
            return None if value is None or not math.isfinite(value) else round(value, 6)

        return {
            "metric": self.metric,
            "kind": self.kind,
            "baseline": self.baseline,
            "terms": list(self.terms),
            "coefficients": {k: _round(v) for k, v in self.coefficients.items()},
            "standard_errors": {k: _round(v) for k, v in self.standard_errors.items()},
            "calibration_shift": _round(self.calibration_shift),
            "n": self.n,
            "events": self.events,
            "aic": _round(self.aic),
            "deviance": _round(self.deviance),
            "c_statistic": _round(self.c_statistic),
            "reason": self.reason,
        }


    def to_state(self) -> dict[str, Any]:
        """Return every field exactly (no rounding): what the threshold store keeps."""
        return {**dataclasses.asdict(self), "terms": list(self.terms)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RiskModel:
        """Rebuild a model from :meth:`to_state`'s dict."""
        return cls(**{**state, "terms": tuple(state["terms"]),
                      "coefficients": dict(state["coefficients"]),
                      "standard_errors": dict(state["standard_errors"])})


@functools.cache
def _numpy_openblas() -> Any:
    """Return numpy's bundled OpenBLAS (ctypes), or None when numpy is built otherwise."""
    import ctypes

    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for path in sorted(libs.glob("libscipy_openblas64_*.so")):
        try:
            lib = ctypes.CDLL(str(path))
            lib.scipy_openblas_get_num_threads64_.restype = ctypes.c_int
            lib.scipy_openblas_set_num_threads64_.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            continue
        return lib
    return None


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run the block with numpy's OpenBLAS on one thread.

    The fit's least-squares and SVD calls are on a few thousand covariate patterns: a
    thread handles them in milliseconds, while OpenBLAS's worker threads, on a machine whose
    cores are busy, wait for each other for a tenth of a second a call.
    """
    lib = _numpy_openblas()
    if lib is None:
        yield
        return
    previous = lib.scipy_openblas_get_num_threads64_()
    lib.scipy_openblas_set_num_threads64_(1)
    try:
        yield
    finally:
        lib.scipy_openblas_set_num_threads64_(previous)


def _flat(metric: str, baseline: float, n: int, events: int, reason: str) -> RiskModel:
    log.info("risk model %s: flat baseline %.5g (%s)", metric, baseline, reason)
    return RiskModel(
        metric=metric, baseline=baseline, kind="flat", n=n, events=events, reason=reason
    )


def _c_statistic(eta: np.ndarray, events: np.ndarray, trials: np.ndarray) -> float:
    """Return the area under the ROC curve from pattern-level counts (ties count one half)."""
    order = np.argsort(eta, kind="mergesort")
    eta, events, nonevents = eta[order], events[order], (trials - events)[order]
    # Merge patterns whose linear predictors are equal: they are ties.
    boundaries = np.r_[True, np.diff(eta) > 1e-12]
    ids = np.cumsum(boundaries) - 1
    e = np.bincount(ids, weights=events)
    f = np.bincount(ids, weights=nonevents)
    below = np.cumsum(f) - f
    total = e.sum() * f.sum()
    return float(np.sum(e * (below + 0.5 * f)) / total) if total else float("nan")


def _shift_to_baseline(eta: np.ndarray, weights: np.ndarray, baseline: float) -> float:
    """Return the intercept shift that makes the weighted mean risk equal ``baseline``."""
    # Imported here: only a refit shifts (scipy.optimize is ~0.1 s of a monitor process).
    from scipy import optimize

    def gap(delta: float) -> float:
        return float(np.average(special.expit(eta + delta), weights=weights)) - baseline

    return float(optimize.brentq(gap, -30.0, 30.0, xtol=1e-12))


def design_day(as_of_day: int) -> int:
    """Return the first day (day number) of as_of's calendar quarter: the current design's start."""
    month = np.datetime64(int(as_of_day), "D").astype("datetime64[M]").astype(np.int64)
    quarter = np.datetime64(int(month - month % 3), "M").astype("datetime64[D]")
    return int(quarter.astype(np.int64))


def known_before_quarter(units: pd.DataFrame, window_days: int | None,
                         as_of_day: int) -> pd.DataFrame:
    """Return the ``units`` whose outcome was known before as_of's calendar quarter began.

    Known means index day + outcome window before :func:`design_day`: the training units of
    ``design.risk_model.refit: quarterly`` (docs/statistics.md section 3), the same for every
    run of a quarter, so the fit is read from the threshold store rather than refitted.
    """
    known = units["index_day"].to_numpy(np.int64) + int(window_days or 0)
    return units.loc[known < design_day(as_of_day)]


def training_digest(units: pd.DataFrame) -> str:
    """Return a digest of what a fit on ``units`` depends on: its covariate patterns' counts.

    The fit (:func:`fit_risk_model`) sees the units only as (covariate pattern, events,
    trials), so two training sets with the same digest give the same model; the rows' order
    does not matter. Late complications or corrected rows change the digest, and so refit.
    """
    patterns, events, counts = covariate_patterns(units, units["y"].to_numpy(float))
    digest = hashlib.sha256(",".join(patterns.columns).encode("utf-8"))
    for part in (patterns.to_numpy(np.float64), events.astype(np.float64),
                 counts.astype(np.float64)):
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()


def shared_training_digest(memo: dict, key: tuple, units: pd.DataFrame) -> str:
    """Return :func:`training_digest` of ``units``, computed once per ``memo`` and ``key``.

    ``memo`` belongs to one snapshot and ``key`` names a metric and its training rule: the
    operator/device charts and the site charts then derive the same training units from
    the same rows, and the second asks again. Their count and a fingerprint of every row
    (the sum of pandas' row hashes: outcome, covariates, order-free) must match the
    first's, else the digest is computed afresh (and replaces it): a set of the same size
    and events but other covariates never gets another set's fit. The fingerprint costs a
    quarter of the digest.
    """
    rows = pd.util.hash_pandas_object(units, index=False).to_numpy()
    check = (len(units), tuple(units.columns), int(rows.sum(dtype=np.uint64)))
    known = memo.get(key)
    if known is not None and known[0] == check:
        return known[1]
    digest = training_digest(units)
    memo[key] = (check, digest)
    return digest


def fitted_risk_model(metric: str, units: pd.DataFrame, baseline: float, *,
                      min_events: int = 50, digest: str | None = None) -> RiskModel:
    """Return :func:`fit_risk_model`'s model, fitted once per training set and stored.

    Keyed on :func:`training_digest` in the threshold store (``digest``, when the caller
    has it already: :func:`shared_training_digest`): a later run whose training units are
    the same (the same design quarter, no restated history) reads the fit instead of
    importing statsmodels and fitting again.
    """
    from pipelines.surveillance import threshold_store

    state = threshold_store.cached(
        "risk_model_fit",
        {"metric": metric, "baseline": float(baseline), "min_events": int(min_events),
         "training": digest if digest is not None else training_digest(units)},
        lambda: fit_risk_model(metric, units, baseline, min_events=min_events).to_state())
    return RiskModel.from_state(state)


def fit_risk_model(
    metric: str, units: pd.DataFrame, baseline: float, *, min_events: int = 50
) -> RiskModel:
    """Fit the case-mix model on pooled mature ``units`` (columns y + covariates) and recalibrate."""
    with _one_blas_thread():
        return _fit(metric, units, baseline, min_events)


def _fit(metric: str, units: pd.DataFrame, baseline: float, min_events: int) -> RiskModel:
    """Do :func:`fit_risk_model`'s work."""
    # The GLM's own modules, not statsmodels.api: the same classes, without the ~580
    # modules (some 26 MB, kept for the rest of the run) that api imports with them.
    from statsmodels.genmod import families
    from statsmodels.genmod.generalized_linear_model import GLM
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning
    from statsmodels.tools.tools import add_constant

    n = len(units)
    events = int(units["y"].sum()) if n else 0
    nonevents = n - events
    if min(events, nonevents) < min_events:
        return _flat(
            metric,
            baseline,
            n,
            events,
            f"too few events to fit: {events} events, {nonevents} non-events "
            f"(need {min_events} of each)",
        )
    covariates, successes, counts = covariate_patterns(units, units["y"].to_numpy(float))
    varying = [t for t in CANDIDATE_TERMS if covariates[t].nunique() > 1]
    if min(events, nonevents) < EVENTS_PER_PARAMETER * (len(varying) + 1):
        return _flat(
            metric,
            baseline,
            n,
            events,
            f"too few events for {len(varying) + 1} parameters: {events} events, "
            f"{nonevents} non-events (need {EVENTS_PER_PARAMETER} per parameter)",
        )
    exog = add_constant(covariates[varying].to_numpy(float), has_constant="add")
    if np.linalg.matrix_rank(exog) < exog.shape[1]:
        return _flat(metric, baseline, n, events,
                     "covariates are collinear in these data (rank-deficient design)")
    trials = counts.astype(float)
    endog = np.column_stack([successes, trials - successes])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            warnings.simplefilter("error", PerfectSeparationWarning)
            result = GLM(endog, exog, family=families.Binomial()).fit()
    except (ConvergenceWarning, PerfectSeparationWarning, np.linalg.LinAlgError, ValueError) as exc:
        return _flat(metric, baseline, n, events, f"fit failed: {type(exc).__name__}: {exc}")
    params = np.asarray(result.params, dtype=float)
    bse = np.asarray(result.bse, dtype=float)
    if not np.all(np.isfinite(params)) or not np.all(np.isfinite(bse)):
        return _flat(metric, baseline, n, events, "fit gave non-finite estimates")
    eta = exog @ params
    p = np.clip(special.expit(eta), _P_FLOOR, 1.0 - _P_FLOOR)
    # Per-case Bernoulli log-likelihood (the grouped fit's own llf adds binomial constants).
    llf = float(np.sum(successes * np.log(p) + (trials - successes) * np.log1p(-p)))
    names = ("intercept", *varying)
    return RiskModel(
        metric=metric,
        baseline=baseline,
        kind="logistic",
        terms=tuple(varying),
        coefficients=dict(zip(names, params.tolist(), strict=True)),
        standard_errors=dict(zip(names, bse.tolist(), strict=True)),
        calibration_shift=_shift_to_baseline(eta, trials, baseline),
        n=n,
        events=events,
        aic=-2.0 * llf + 2.0 * len(params),
        deviance=-2.0 * llf,
        c_statistic=_c_statistic(eta, successes, trials),
    )
