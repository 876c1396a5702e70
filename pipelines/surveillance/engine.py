"""The monitor: apply the profile's methods to every site and keep one row per signal episode.

Why it is built this way
------------------------
* **Deterministic.** ``as_of`` defaults to the newest procedure date in the warehouse, never
  the wall clock, and every number is recomputed from the current tables (see
  :mod:`pipelines.surveillance.outcomes`). The same data, profile and as_of give the same
  run key and the same signals, byte for byte.
* **One signal per episode.** A signal's key is
  ``sha256(profile, site, metric, method, direction, episode_start)`` where
  ``episode_start`` is where the episode began: for a CUSUM the last date its statistic was 0
  before it crossed ``h`` (or the reset after the previous signal); for the funnel, p-chart
  and rare-event tests the first period of the consecutive run of out-of-limit periods; for a
  sentinel event its date; for the process measure the first failure of the month. Rerunning
  tomorrow re-derives the same episode and so the same key: rows are upserted by key, and
  keys no longer derived (a correction removed the excess) are marked ``active = false``.
  So are the active signals of any other profile, or other version of this one, that this
  run does not derive again (a profile switch; ``summary["retired_profiles"]`` records it).
* **History, not only today.** Every episode in the data's history is derived on every run
  (the funnel and rare tests are evaluated at each month end plus ``as_of``, the p-chart at
  each closed quarter). That is what makes an episode's start -- and thus its key -- stable.
* **Fast.** One read of the needed columns, vectorised outcome derivation, CUSUMs by
  cumulative sums (:mod:`pipelines.surveillance.cusum`), thresholds cached per design.

Methods per metric come from the profile: ``bernoulli_cusum`` (flat baseline; up, and down
for under-reporting where the profile says), ``ra_cusum`` (Steiner risk-adjusted, up; its threshold
is simulated over the fitted case-mix risks for the same ARL0, because heterogeneous risks
change the in-control run length), ``funnel`` (cumulative and rolling, exact limits with
multiplicative overdispersion; a site signals when it is outside the limit *and* its exact
one-sided p-value survives Benjamini-Hochberg across all sites, metrics and directions of that
evaluation), ``pchart`` (quarterly exact binomial, closed and mature quarters only), ``rare``
(exact binomial test on the rolling window), ``sentinel`` and ``process``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from pipelines.db import open_warehouse
from pipelines.schema import (
    chart_status,
    level_episode,
    monitor_run,
    signal,
    site_month_metric,
)
from pipelines.settings import Settings
from pipelines.surveillance import (
    budget,
    cusum,
    funnel,
    levels,
    pchart,
    rare,
    survival,
    threshold_store,
)
from pipelines.surveillance.arl import threshold_for_arl, threshold_for_arl_risk_adjusted
from pipelines.surveillance.beyond_run import (
    prepare_beyond_site,
    run_beyond_site,
    snapshot_extras,
)
from pipelines.surveillance.distributions import beta_ppf
from pipelines.surveillance.outcomes import (
    COVARIATES,
    Snapshot,
    day_to_date,
    derive_outcomes,
    latest_procedure_date,
    load_snapshot,
    process_outcomes,
    release_memory,
    sentinel_events,
)
from pipelines.surveillance.profile import Metric, Profile, load_profile
from pipelines.surveillance.risk_model import (
    RiskModel,
    design_day,
    fitted_risk_model,
    shared_training_digest,
)
from pipelines.surveillance.runs import (
    TTE_CHARTED_SINCE,
    CoreInBackground,
    FactsInBackground,
    MonitorResult,
    SeriesInBackground,
    check_as_of,
    is_look_ahead,
    look_ahead_grace,
    store_run,
    tte_charted_since,
)
from pipelines.surveillance.snapshot_cache import load_cached_snapshot, store_cache_aside

log = logging.getLogger(__name__)

SIGNAL_FIELDS = (
    "signal_key", "site_id", "metric", "method", "direction", "category", "episode_start",
    "signal_date", "observed", "expected", "n", "ci_low", "ci_high", "statistic", "threshold",
    "p_value", "baseline", "citation", "profile_name", "profile_version", "detail", "active",
    "first_seen_run", "last_seen_run",
)
FUNNEL_WINDOWS = ("cumulative", "rolling")
FUNNEL_METHOD = {"cumulative": "funnel_cumulative", "rolling": "funnel_12m"}
INTERVAL_LEVEL = 0.95
# Outcome windows up to this long are charted in the order outcomes became known (see
# outcome_metric); longer ones (a year of follow-up) in index order, plus the window.
INFORMATION_ORDER_MAX_WINDOW = 31
# Shortest span a site's volume (units a year, which sets its budget threshold) is measured
# over: a month, so that a site's first days do not read as an enormous volume.
MIN_VOLUME_DAYS = 30


# Simulation size for risk-adjusted thresholds at a fixed ARL0 (profiles without a
# false-alarm budget): 4,000 runs, as docs/statistics.md section 3 recommends for production
# (ARL0 standard error about 1.5 %). The seed is fixed so the same data give the same h.
RA_THRESHOLD_RUNS = 4000
RA_THRESHOLD_SEED = 20000441  # Steiner et al. (2000), Biostatistics 1:441
# The case mix a risk-adjusted threshold is simulated over, and stored under
# (docs/statistics.md section 3): CASE_MIX_BINS equal-probability bins of the fitted risks,
# each represented by its mid quantile rounded to CASE_MIX_LOGIT_STEP on the logit scale.
# The simulation draws risks with replacement, so only their distribution matters; 100 bins
# move h by less than CASE_MIX_H_TOLERANCE (tests/test_threshold_store.py), while a new day
# of data leaves the bins, and so the stored h, unchanged.
CASE_MIX_BINS = 100
CASE_MIX_LOGIT_STEP = 0.05
CASE_MIX_H_TOLERANCE = 0.05


def binned_case_mix(risks: np.ndarray) -> np.ndarray:
    """Return the case mix as integer logit steps: one per equal-probability bin, sorted."""
    risks = np.asarray(risks, dtype=np.float64)
    mid = np.quantile(risks, (np.arange(CASE_MIX_BINS) + 0.5) / CASE_MIX_BINS)
    mid = np.clip(mid, 1e-9, 1 - 1e-9)
    return np.round(np.log(mid / (1 - mid)) / CASE_MIX_LOGIT_STEP).astype(np.int64)


def case_mix_risks(steps: np.ndarray) -> np.ndarray:
    """Return the risks a binned case mix stands for (inverse of :func:`binned_case_mix`)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(steps, dtype=np.float64) * CASE_MIX_LOGIT_STEP))


def risk_adjusted_threshold(risks: np.ndarray, odds_ratio: float, arl0: float) -> float:
    """Return h for the risk-adjusted CUSUM at the in-control ARL0, for this case mix.

    With heterogeneous expected risks the in-control run length of a Steiner CUSUM differs
    from the flat chart's at the mean risk, so h is found by simulation over the case mix
    (:func:`pipelines.surveillance.arl.threshold_for_arl_risk_adjusted`), binned by
    :func:`binned_case_mix`. Stored per design and binned case mix
    (:mod:`pipelines.surveillance.threshold_store`): a later run reads it.
    """
    steps = binned_case_mix(risks)
    return threshold_store.cached(
        "ra_cusum_h_simulated",
        {"case_mix_logit_steps": steps.tolist(), "logit_step": CASE_MIX_LOGIT_STEP,
         "odds_ratio": float(odds_ratio), "arl0": float(arl0), "runs": RA_THRESHOLD_RUNS,
         "seed": RA_THRESHOLD_SEED},
        lambda: float(threshold_for_arl_risk_adjusted(
            case_mix_risks(steps), odds_ratio, arl0, n_runs=RA_THRESHOLD_RUNS,
            seed=RA_THRESHOLD_SEED)))


def cached_threshold(p0: float, odds_ratio: float, arl0: float, direction: str) -> float:
    """Return ``threshold_for_arl`` for a design, computed once and stored."""
    return threshold_store.cached(
        "bernoulli_h_markov",
        {"p0": float(p0), "odds_ratio": float(odds_ratio), "arl0": float(arl0),
         "direction": direction},
        lambda: float(threshold_for_arl(p0, odds_ratio, arl0, direction)))


@dataclass(frozen=True)
class _ChartedUnits:
    """One outcome metric's units, handed to every charting routine.

    ``group``/``y``/``day`` are the mature units in index order; the ``c_`` arrays are the
    CUSUM order (outcome known, or index order with ``lag`` days until a unit is known) and
    ``c_risk`` their case-mix risk at the baseline ``p0``.
    """

    group: np.ndarray
    y: np.ndarray
    day: np.ndarray
    c_group: np.ndarray
    c_y: np.ndarray
    c_day: np.ndarray
    c_risk: np.ndarray
    lag: int
    p0: float
    # Every unit, mature or still in follow-up, in index order (the time-to-event chart).
    all_group: np.ndarray | None = None
    all_index_day: np.ndarray | None = None
    all_event_day: np.ndarray | None = None
    # Units a year per site (every unit, mature or not; :meth:`_Computation._site_volumes`).
    volume: np.ndarray | None = None


# The method registry: every outcome method a profile may name (profile.METHODS_BY_KIND) and
# the routine of ``_Computation`` that charts it. A new method is one routine and one entry.
OUTCOME_METHODS = {
    "bernoulli_cusum": "_cusums",
    "ra_cusum": "_cusums",
    "tte_cusum": "_tte",
    "funnel": "_funnel_prepare",
    "pchart": "_pchart",
    "rare": "_rare",
}


def _shift_odds(risk: np.ndarray, p_from: float, p_to: float) -> np.ndarray:
    """Return ``risk`` with every odds multiplied by odds(p_to) / odds(p_from).

    Moves a case-mix model calibrated to the baseline to the guidance range's edge while
    keeping each patient's relative risk.
    """
    if p_from == p_to or not len(risk):
        return risk
    shift = np.log(p_to / (1 - p_to)) - np.log(p_from / (1 - p_from))
    logit = np.log(risk / (1 - risk)) + shift
    return 1.0 / (1.0 + np.exp(-logit))


def exact_interval(events, n, level: float = INTERVAL_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Return the Clopper-Pearson (exact) interval for events/n, elementwise (NaN where n = 0)."""
    events = np.asarray(events, dtype=float)
    n = np.asarray(n, dtype=float)
    tail = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(events > 0, beta_ppf(tail, events, n - events + 1), 0.0)
        high = np.where(events < n, beta_ppf(1.0 - tail, events + 1, n - events), 1.0)
    empty = n <= 0
    return np.where(empty, np.nan, low), np.where(empty, np.nan, high)


def signal_key(profile: str, site: str, metric: str, method: str, direction: str,
               episode_start: date) -> str:
    """Return the deterministic key of one signal episode."""
    text = "|".join((profile, site, metric, method, direction, episode_start.isoformat()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None


class _Builder:
    """Collect signal rows for one computation."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.rows: dict[str, dict[str, Any]] = {}
        # (row, observed, n) whose exact interval is still to compute: all at once, since
        # one vectorised call costs what a single scalar one does.
        self._pending: list[tuple[dict[str, Any], float, int]] = []

    def add(self, metric: Metric, site: str, method: str, direction: str, episode_start: date,
            signal_date: date, *, observed: float | None, n: int | None,
            expected: float | None, statistic: float | None, threshold: float | None,
            p_value: float | None = None, detail: dict[str, Any] | None = None) -> None:
        key = signal_key(self.profile.name, site, metric.id, method, direction, episode_start)
        row = self.rows[key] = {
            "signal_key": key,
            "site_id": site,
            "metric": metric.id,
            "method": method,
            "direction": direction,
            "category": metric.category_for(direction),
            "episode_start": episode_start,
            "signal_date": signal_date,
            "observed": _finite(observed),
            "expected": _finite(expected),
            "n": None if n is None else int(n),
            "ci_low": None,
            "ci_high": None,
            "statistic": _finite(statistic),
            "threshold": _finite(threshold),
            "p_value": _finite(p_value),
            "baseline": float(metric.baseline.rate),
            "citation": metric.citation,
            "profile_name": self.profile.name,
            "profile_version": self.profile.version,
            "detail": json.dumps(detail or {}, sort_keys=True, default=_json_default),
        }
        if observed is not None and n:
            self._pending.append((row, observed, n))

    def fill_intervals(self) -> None:
        """Give every row added since the last call its exact interval (ci_low, ci_high)."""
        if not self._pending:
            return
        rows, observed, n = zip(*self._pending, strict=True)
        low, high = exact_interval(np.asarray(observed, dtype=float),
                                   np.asarray(n, dtype=float))
        for row, lo, hi in zip(rows, low.tolist(), high.tolist(), strict=True):
            row["ci_low"], row["ci_high"] = _finite(lo), _finite(hi)
        self._pending = []

    def sorted_rows(self) -> list[dict[str, Any]]:
        self.fill_intervals()
        return sorted(
            self.rows.values(),
            key=lambda r: (r["metric"], r["site_id"], r["method"], r["direction"],
                           r["episode_start"]),
        )


def _json_default(value: Any) -> Any:
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Return (first, last) index pairs of consecutive True runs in a 1-D bool array."""
    padded = np.r_[False, flags.astype(bool), False]
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _months_of(day: np.ndarray) -> np.ndarray:
    """Return each epoch day's month number (months since 1970-01, as ``datetime64[M]``).

    The same integers as ``day.astype("datetime64[D]").astype("datetime64[M]")``, looked up
    in a table of the few hundred distinct days: numpy's calendar conversion per unit cost
    about twice the lookup on a million units, and each metric converts its units twice.
    """
    day = np.asarray(day, dtype=np.int64)
    if not len(day):
        return day.copy()
    low = int(day.min())
    table = (np.arange(low, int(day.max()) + 1, dtype=np.int64).astype("datetime64[D]")
             .astype("datetime64[M]").astype(np.int64))
    return table[day - low]


def _month_labels(day: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Return (month index per day, 'YYYY-MM' label per month index) for epoch days."""
    codes = _months_of(day)
    if not len(codes):
        return codes, []
    first = int(codes.min())
    labels = [str(m) for m in np.arange(first, int(codes.max()) + 1).astype("datetime64[M]")]
    return codes - first, labels


def _month_start(day: int) -> int:
    return int(np.datetime64(int(day), "D").astype("datetime64[M]").astype("datetime64[D]")
               .astype(np.int64))


def _evaluation_days(first_day: int, as_of_day: int) -> np.ndarray:
    """Return each month end from ``first_day``'s month up to as_of, then as_of itself."""
    months = np.arange(
        np.datetime64(int(first_day), "D").astype("datetime64[M]"),
        np.datetime64(int(as_of_day), "D").astype("datetime64[M]") + 1,
    )
    ends = ((months + 1).astype("datetime64[D]") - np.timedelta64(1, "D")).astype(np.int64)
    ends = ends[ends < as_of_day]
    return np.r_[ends, as_of_day].astype(np.int64)


class _Computation:
    """One monitor computation over a snapshot (no writes)."""

    def __init__(self, profile: Profile, snapshot: Snapshot,
                 tte_charted_since: dict[str, date] | None = None) -> None:
        self.profile = profile
        self.snapshot = snapshot
        # Per metric, the as_of of the earliest stored run that charted its time-to-event
        # chart (runs.tte_charted_since, read by evaluate): from then on it stays charted.
        self.tte_charted_since = dict(tte_charted_since or {})
        self.as_of_day = snapshot.as_of_day
        self.sites = [str(s) for s in snapshot.procedures["site_id"].cat.categories]
        self.site_code = {site: i for i, site in enumerate(self.sites)}
        first = int(snapshot.procedures["procedure_day"].min()) if len(snapshot.procedures) else (
            self.as_of_day)
        self.eval_days = _evaluation_days(first, self.as_of_day)
        self.builder = _Builder(profile)
        self.models: dict[str, Any] = {}
        # Expected risks of each metric's case-mix training units (quarterly refit only).
        self.design_risks: dict[str, np.ndarray] = {}
        # False alarms a year per alarm chart if every site sat at the range edge.
        self.edge_false_alarms: dict[str, float] = {}
        self.summary: dict[str, Any] = {"metrics": {}}
        self.site_metrics: dict[tuple[str, str], dict[str, Any]] = {}
        self.site_months: list[dict[str, Any]] = []
        self.charts: dict[str, Any] = {"cusum": {}, "funnel": {}, "pchart": {}}
        # funnel rows to be decided together (FDR across sites and metrics)
        self.funnel_tests: list[dict[str, Any]] = []
        # Seconds per step, "metric:step" (what the benchmark breaks the compute time into).
        self.timings: dict[str, float] = {}

    @contextmanager
    def _timed(self, label: str) -> Iterator[None]:
        """Add the seconds spent in the block to ``timings[label]``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[label] = self.timings.get(label, 0.0) + time.perf_counter() - started

    # -- helpers --------------------------------------------------------------------------
    def _site_entry(self, site: str, metric: Metric) -> dict[str, Any]:
        key = (site, metric.id)
        if key not in self.site_metrics:
            self.site_metrics[key] = {
                "site_id": site, "metric": metric.id, "label": metric.label,
                "kind": metric.kind, "baseline": metric.baseline.rate,
                "citation": metric.citation,
            }
        return self.site_metrics[key]

    def _monthly(self, metric: Metric, group: np.ndarray, y: np.ndarray, day: np.ndarray,
                 expected: np.ndarray) -> None:
        """Aggregate units, events and expected events per site and month of the index date.

        ``group``/``y``/``day``/``expected`` are exactly the units the charts use (mature
        only), so the months of a site add up to its ``site_metrics`` n and events.
        """
        if not len(group):
            return
        month, labels = _month_labels(day)
        cell = group.astype(np.int64, copy=False) * len(labels)
        cell += month
        del month
        # Counted over the (site, month) space (sites x months cells) instead of np.unique's
        # sort, whose copies of a million cells were a metric's peak memory: the same cells
        # in the same (sorted) order, and each cell's sums added in the same row order.
        units_in = np.bincount(cell)
        cells = np.flatnonzero(units_in)
        units = units_in[cells].tolist()
        events = np.rint(np.bincount(cell, weights=y)[cells]).astype(np.int64).tolist()
        expect = np.bincount(cell, weights=expected)[cells].tolist()
        del cell, units_in
        site = [self.sites[c] for c in (cells // len(labels)).tolist()]
        month_index = cells % len(labels)
        month = [labels[c] for c in month_index.tolist()]
        baseline = float(metric.baseline.rate)
        denominator = metric.denominator or "procedure"
        # Computed here, not in the view: SQL that turns a date into text depends on the
        # PostgreSQL session's DateStyle. Month numbers count from 1970-01, as datetime64[M].
        as_of_month = int(np.datetime64(int(self.as_of_day), "D").astype("datetime64[M]")
                          .astype(np.int64))
        first_month = int(np.datetime64(labels[0], "M").astype(np.int64))
        before = (as_of_month - first_month - month_index).tolist()
        self.site_months.extend(
            {"site_id": s, "metric": metric.id, "month": m, "denominator": denominator,
             "units": u, "events": e, "expected": x, "baseline": baseline,
             "months_before_as_of": b}
            for s, m, u, e, x, b in zip(site, month, units, events, expect, before, strict=True)
        )

    # -- outcome metrics ------------------------------------------------------------------
    def outcome_metric(self, metric: Metric) -> None:
        with self._timed(f"{metric.id}:outcomes"):
            # Derived once, immature units included: the mature units are a subset in the
            # same order (derive_outcomes(include_immature=False) keeps exactly these rows),
            # and the outcome-known order and the time-to-event chart need the rest.
            everyone = derive_outcomes(
                self.snapshot, metric, include_immature=True,
                columns=("site_code", "index_day", "y", "event_day",
                         *(COVARIATES if "ra_cusum" in metric.methods else ())))
            all_group = everyone["site_code"].to_numpy(np.int64)
            all_index_day = everyone["index_day"].to_numpy(np.int64)
            all_event_day = everyone["event_day"].to_numpy(np.int64)
            all_y = everyone["y"].to_numpy(np.int64)
            if "ra_cusum" not in metric.methods:
                # Only the risk model reads the frame again: freed before the copies below.
                everyone = None
            window = metric.window_days or 0
            is_mature = all_index_day + int(metric.window_days) <= self.as_of_day
            volume = self._site_volumes(all_group, all_index_day)
        p0 = metric.baseline.rate
        group = all_group[is_mature]
        y = all_y[is_mature]
        day = all_index_day[is_mature]
        n_units = len(group)
        n_sites = len(self.sites)
        n_per_site = np.bincount(group, minlength=n_sites)
        events_per_site = np.bincount(group, weights=y, minlength=n_sites)
        model: RiskModel | None = None
        all_risk: np.ndarray | None = None
        if "ra_cusum" in metric.methods:
            with self._timed(f"{metric.id}:risk_model"):
                # Only the columns and rows the fit reads, copied once (the mature units
                # and then their training rows, two copies, were a first run's peak).
                before_quarter = self.profile.design.risk_refit == "quarterly"
                trained = self._risk_training(metric, is_mature, all_index_day)
                training = everyone[["y", "index_day", *COVARIATES]].loc[trained]
                # The operator/device charts (computed first) digested the same training
                # units of this snapshot: the units known before the quarter began.
                digest = (shared_training_digest(
                    self.snapshot.training_digests,
                    (metric.id, "known before", design_day(self.as_of_day)), training)
                    if before_quarter else None)
                model = fitted_risk_model(metric.id, training.reset_index(drop=True), p0,
                                          min_events=self.profile.design.risk_min_events,
                                          digest=digest)
                del training
                self.models[metric.id] = model.to_dict()
                # A unit's risk depends on its own covariates only: predicted once for all.
                all_risk = model.predict(everyone)
                if before_quarter:
                    self.models[metric.id]["trained_on"] = (
                        f"units known before {day_to_date(design_day(self.as_of_day))}")
                    # The RA-CUSUM's h is simulated over the training case mix: one design
                    # (and one stored h) per quarter, however many days are added to it.
                    # predict works unit by unit (elementwise), so the training units' risks
                    # are their entries of all_risk, bit for bit: not predicted twice.
                    self.design_risks[metric.id] = all_risk[trained]
                del trained
                expected_risk = all_risk[is_mature]
        else:
            expected_risk = np.full(n_units, p0)
        del everyone
        expected_per_site = np.bincount(group, weights=expected_risk, minlength=n_sites)
        self._monthly(metric, group, y, day, expected_risk)
        low, high = exact_interval(events_per_site, n_per_site)
        for code, site in enumerate(self.sites):
            entry = self._site_entry(site, metric)
            entry.update(
                n=int(n_per_site[code]), events=int(events_per_site[code]),
                rate=_finite(events_per_site[code] / n_per_site[code]) if n_per_site[code]
                else None,
                ci_low=_finite(low[code]), ci_high=_finite(high[code]),
                expected=_finite(expected_per_site[code]),
                window_days=metric.window_days, denominator=metric.denominator,
            )
        self.summary["metrics"][metric.id] = {
            "mature_units": int(n_units), "events": int(y.sum()),
            "rate": _finite(y.mean()) if n_units else None,
            "risk_model": model.kind if model else None,
        }
        detect = metric.detect
        assert detect is not None
        if self.profile.design.budget is not None and window <= INFORMATION_ORDER_MAX_WINDOW:
            # Outcomes in the order they became known: an event on its day (the case may
            # still be inside its window), an event-free case when its window closes. The
            # same increments, up to a window earlier, and exactly what a nightly run on
            # as_of can see: nothing known after as_of is in the chart.
            with self._timed(f"{metric.id}:known_order"):
                seen = (all_index_day + window <= self.as_of_day) | (all_event_day >= 0)
                k_y = all_y[seen]
                all_y = None
                # The day each outcome became known, built in place: the same values as
                # np.where(event, event day, index day + window) without its temporaries.
                known = all_index_day[seen]
                known += window
                np.copyto(known, all_event_day[seen], where=k_y == 1)
                if "tte_cusum" not in metric.methods:
                    # Only the time-to-event chart reads every unit's days again.
                    all_index_day = all_event_day = None
                order = np.lexsort((known, all_group[seen]))
                # Each unsorted copy is dropped as soon as its sorted one exists: all of
                # them alive at once were a metric's peak memory.
                c_day = known[order]
                del known
                c_y = k_y[order]
                del k_y
                c_group = all_group[seen][order]
                # Without a risk model every risk is p0 whatever the order.
                c_risk = (all_risk[seen][order] if all_risk is not None
                          else np.full(len(order), p0))
                all_risk = None
                lag = 0
                del seen, order
        else:
            c_group, c_y, c_day, lag = group, y, day, window
            c_risk = expected_risk
        # Only the time-to-event chart reads every unit (mature or not); without it the
        # full-length arrays are dropped before the charts' own arrays are made.
        del all_y, all_risk, is_mature
        if "tte_cusum" not in metric.methods:
            all_group = all_index_day = all_event_day = None
        charted = _ChartedUnits(group=group, y=y, day=day, c_group=c_group, c_y=c_y,
                                c_day=c_day, c_risk=c_risk, lag=lag, p0=p0,
                                all_group=all_group, all_index_day=all_index_day,
                                all_event_day=all_event_day, volume=volume)
        done: set[str] = set()
        for method, routine in OUTCOME_METHODS.items():  # registry order: CUSUMs first
            if method in metric.methods and routine not in done:  # the CUSUMs share one pass per direction
                done.add(routine)
                with self._timed(f"{metric.id}:{routine.lstrip('_')}"):
                    getattr(self, routine)(metric, charted)

    def _risk_training(self, metric: Metric, is_mature: np.ndarray,
                       index_day: np.ndarray) -> np.ndarray:
        """Return which units the case-mix model is fitted on (``design.risk_model.refit``).

        ``quarterly``: the units whose outcome was known before the current quarter began
        (:func:`risk_model.known_before_quarter`), so every run of a quarter fits the same
        model (read from the threshold store) and designs the same RA-CUSUM case mix; units
        of the current quarter are charted with it but do not move it (a Phase I / Phase II
        split, refitted at each quarter). Restated history before the quarter changes the
        training set and so refits. ``every_run``: every mature unit. ``is_mature`` and
        ``index_day`` are per unit; the answer is a mask over the same units (the rows
        :func:`risk_model.known_before_quarter` keeps of the mature ones, in their order).
        """
        if self.profile.design.risk_refit != "quarterly":
            return is_mature
        known = index_day + int(metric.window_days or 0)
        return is_mature & (known < design_day(self.as_of_day))

    def _cusums(self, metric: Metric, units: _ChartedUnits) -> None:
        """Run the metric's Bernoulli and risk-adjusted CUSUMs in each direction."""
        detect = metric.detect
        assert detect is not None
        for direction in detect.directions:
            odds_ratio = detect.odds_ratio if direction == "up" else 1.0 / detect.odds_ratio
            reference = self._reference(metric, direction)
            if "bernoulli_cusum" in metric.methods:
                self._cusum(metric, "bernoulli_cusum", direction, odds_ratio, units.c_group,
                            units.c_y, units.c_day, np.full(len(units.c_y), reference),
                            units.lag, units.volume)
            if "ra_cusum" in metric.methods and direction == "up":
                self._cusum(metric, "ra_cusum", direction, odds_ratio, units.c_group,
                            units.c_y, units.c_day,
                            _shift_odds(units.c_risk, units.p0, reference), units.lag,
                            units.volume)

    def _reference(self, metric: Metric, direction: str) -> float:
        """Return the rate charts in ``direction`` test against (range edge under a budget)."""
        if self.profile.design.budget is None:
            return metric.baseline.rate
        return metric.reference(direction)

    def _role(self, metric: Metric, method: str, direction: str) -> str:
        """Return a chart's role: ``alarm`` (budgeted), or ``corroborating`` (fixed ARL0).

        Under a false-alarm budget the metric's alarm chart (upward) and every downward
        CUSUM (under-reporting) get per-site thresholds from the budget; the other charts
        keep the profile's ARL0 and add evidence. Without a budget every chart alarms.
        """
        if self.profile.design.budget is None:
            return "alarm"
        if direction == "down" and method in ("bernoulli_cusum", "ra_cusum", "tte_cusum"):
            return "alarm"
        if metric.alarm is not None and metric.alarm.method == method and direction == "up":
            return "alarm"
        return "corroborating"

    def _site_volumes(self, group: np.ndarray, index_day: np.ndarray) -> np.ndarray:
        """Return each site's units a year: every unit it has indexed, over its span.

        ``group``/``index_day`` are every unit of the metric, mature or still in its window:
        the site's throughput, which is the rate at which its chart receives units once
        it runs (a chart in outcome order or index order takes each unit a window late,
        but takes as many a year). The span runs from the site's first index day to
        as_of, and is at least ``MIN_VOLUME_DAYS``. Counting only the charted units over a
        span floored at a year, as before, read a site in its first months (and any
        chart whose units mature a window late) as doing a fraction of its work, which
        lowered ARL0 and h: in the network replay (benchmarks/bench_network_replay.py)
        sites in a registry's first weeks alarmed on two or three leaks.
        """
        n_sites = len(self.sites)
        first = np.full(n_sites, self.as_of_day, dtype=np.int64)
        if len(group):
            np.minimum.at(first, group, index_day)
        units = np.bincount(group, minlength=n_sites).astype(float)
        span_days = np.maximum(self.as_of_day - first + 1, MIN_VOLUME_DAYS)
        return units / (span_days / 365.25)

    def _spent_at_baseline(self, direction: str) -> bool:
        """Return True when upward false alarms are counted at the pooled baseline rate."""
        budget_ = self.profile.design.budget
        return budget_ is not None and budget_.spent_at == "baseline" and direction == "up"

    def _budget_thresholds(self, metric: Metric, direction: str, odds_ratio: float,
                           group: np.ndarray, risk: np.ndarray, volume: np.ndarray,
                           level: str) -> tuple[np.ndarray, np.ndarray]:
        """Return (h per site, ARL0 per site) from the false-alarm budget.

        ``ARL0 = units a year / false alarms per site-year`` (:mod:`budget`). The threshold
        is the Bernoulli CUSUM's at the site's mean reference risk, rounded to two
        significant figures (for a risk-adjusted chart an approximation whose accuracy the
        slow test checks by simulation). With the budget spent at the baseline
        (``design.false_alarm_budget.spent_at``) the ARL0 holds for the site's case mix at
        the pooled rate while the chart still tests against the range edge; the ARL at the
        edge itself is kept in ``self.edge_arl`` for the budget summary.
        """
        n_sites = len(self.sites)
        rate = budget.chart_rate(self.profile, metric, direction, level)
        units = np.bincount(group, minlength=n_sites).astype(float)
        mean_risk = np.bincount(group, weights=risk, minlength=n_sites) / np.maximum(units, 1)
        at_baseline = self._spent_at_baseline(direction)
        edge, pooled = self._reference(metric, direction), float(metric.baseline.rate)
        h = np.full(n_sites, np.inf)
        arl0 = np.zeros(n_sites)
        edge_arl = np.zeros(n_sites)
        for code in range(n_sites):
            if not units[code]:
                continue
            arl0[code] = budget.arl0_for(volume[code], rate)
            p_site = budget.significant(float(mean_risk[code]), 2)
            # The site's case mix at the pooled rate: its rounded reference risk moved back
            # by the same odds ratio, so the curve cache stays keyed on two figures of p.
            p_true = (budget.significant(float(_shift_odds(np.array([p_site]), edge,
                                                           pooled)[0]), 3)
                      if at_baseline else None)
            h[code] = budget.bernoulli_threshold(p_site, odds_ratio,
                                                 budget.significant(arl0[code], 2), direction,
                                                 p_true)
            edge_arl[code] = (budget.bernoulli_arl(p_site, odds_ratio, h[code], direction)
                              if at_baseline else arl0[code])
        if level == "alarm":
            self.edge_false_alarms[metric.id] = float(np.sum(
                np.divide(volume, edge_arl, out=np.zeros(n_sites), where=edge_arl > 0)))
        return h, arl0

    def _cusum(self, metric: Metric, method: str, direction: str, odds_ratio: float,
               group: np.ndarray, y: np.ndarray, day: np.ndarray, risk: np.ndarray,
               lag: int, volume: np.ndarray) -> None:
        """Run one CUSUM per site (rows in chart order; ``day + lag`` is when a row is known)."""
        detect = metric.detect
        role = self._role(metric, method, direction)
        n_sites = len(self.sites)
        if self.profile.design.budget is not None and role == "alarm":
            h_sites, arl0_sites = self._budget_thresholds(metric, direction, odds_ratio, group,
                                                          risk, volume, "alarm")
            threshold_method = "Markov chain per site, ARL0 from the false-alarm budget"
        else:
            risk_varies = method == "ra_cusum" and len(risk) and float(np.ptp(risk)) > 0
            if risk_varies:
                mix = risk
                if metric.id in self.design_risks and len(self.design_risks[metric.id]):
                    # the design quarter's case mix, at this chart's reference rate
                    mix = _shift_odds(self.design_risks[metric.id],
                                      float(metric.baseline.rate),
                                      self._reference(metric, direction))
                h = risk_adjusted_threshold(mix, odds_ratio, detect.arl0)
                threshold_method = (f"simulation over the fitted case mix in {CASE_MIX_BINS} "
                                    f"bins ({RA_THRESHOLD_RUNS} runs)")
            else:
                h = cached_threshold(round(float(risk[0]) if len(risk) else
                                           metric.baseline.rate, 12),
                                     odds_ratio, detect.arl0, direction)
                threshold_method = "Markov chain at the reference rate"
            h_sites = np.full(n_sites, float(h))
            arl0_sites = np.full(n_sites, float(detect.arl0))
        finite_h = np.where(np.isfinite(h_sites), h_sites, 1e9)
        result = cusum.grouped_cusum(group, y, risk, odds_ratio, finite_h, n_groups=n_sites)
        self._record_cusum(metric, method, direction, odds_ratio, role, group, y, day, risk,
                           lag, result, h_sites, arl0_sites, threshold_method)
        if self.profile.design.budget is not None and role == "alarm" and direction == "up":
            # The watch threshold: the same chart at the (looser) watch budget.
            h_watch, arl0_watch = self._budget_thresholds(metric, direction, odds_ratio, group,
                                                          risk, volume, "watch")
            watch = cusum.grouped_cusum(group, y, risk, odds_ratio,
                                        np.where(np.isfinite(h_watch), h_watch, 1e9),
                                        n_groups=n_sites)
            self._record_cusum(metric, method, direction, odds_ratio, "watch", group, y, day,
                               risk, lag, watch, h_watch, arl0_watch, threshold_method)

    def _record_cusum(self, metric: Metric, method: str, direction: str, odds_ratio: float,
                      role: str, group: np.ndarray, y: np.ndarray, day: np.ndarray,
                      risk: np.ndarray, lag: int, result: cusum.CusumResult, h_sites: np.ndarray,
                      arl0_sites: np.ndarray, threshold_method: str) -> None:
        """Store a CUSUM pass: chart series, per-site figures and one signal per crossing."""
        n_sites = len(self.sites)
        stat = result.statistic
        signal_rows = result.signal_rows
        starts = np.searchsorted(group, np.arange(n_sites), side="left")
        name = method if role != "watch" else f"{method}_watch"
        if role != "watch":
            label = f"{metric.id}:{method}:{direction}"
            self.charts["cusum"][label] = {
                "metric": metric.id, "method": method, "direction": direction,
                "h": float(np.nanmedian(np.where(np.isfinite(h_sites), h_sites, np.nan)))
                if np.isfinite(h_sites).any() else None,
                "h_sites": h_sites, "role": role,
                "order": "outcome known" if lag == 0 else "index date",
                "group": group, "day": day, "statistic": stat, "signal": result.signal,
                "sites": self.sites,
            }
        summary = result.summary
        for code, site in enumerate(self.sites):
            entry = self._site_entry(site, metric)
            entry.setdefault("cusum", {})[f"{name}_{direction}"] = {
                "value": _finite(summary.last_value[code]), "h": _finite(h_sites[code]),
                "signals": int(summary.n_signals[code]), "role": role,
                "arl0": _finite(arl0_sites[code]),
            }
        if not signal_rows.size:
            return
        # Where each episode began: the last row at 0 (or the previous reset) before crossing.
        idx = np.arange(len(stat))
        marks = np.where((stat <= 1e-12) | result.signal, idx, -1)
        last_mark = np.maximum.accumulate(marks)
        cum_y = np.cumsum(y)
        cum_e = np.cumsum(risk)
        for row in signal_rows.tolist():
            code = int(group[row])
            before = int(last_mark[row - 1]) if row > 0 else -1
            if before < starts[code]:
                begin, rise_from = int(starts[code]), int(starts[code])
            else:
                begin, rise_from = before, before + 1
            n = row - rise_from + 1
            observed = cum_y[row] - (cum_y[rise_from - 1] if rise_from > 0 else 0)
            expected = cum_e[row] - (cum_e[rise_from - 1] if rise_from > 0 else 0.0)
            self.builder.add(
                metric, self.sites[code], name, direction, day_to_date(day[begin]),
                day_to_date(day[row]), observed=float(observed), n=n, expected=float(expected),
                statistic=float(stat[row]), threshold=float(h_sites[code]),
                detail={
                    "odds_ratio": odds_ratio, "arl0": _finite(arl0_sites[code]),
                    "window_days": metric.window_days, "role": role,
                    "detectable_on": day_to_date(day[row] + lag),
                    "chart_order": "outcome known" if lag == 0 else "index date",
                    "risk_adjusted": method == "ra_cusum",
                    "reference_rate": _finite(float(np.mean(risk[rise_from:row + 1]))),
                    "threshold_method": threshold_method,
                },
            )

    def _tte(self, metric: Metric, units: _ChartedUnits | None = None) -> None:
        """Run the time-to-event CUSUM (partial follow-up; :mod:`survival`) for every site."""
        if units is None or units.all_group is None:
            everyone = derive_outcomes(self.snapshot, metric, include_immature=True)
            site = everyone["site_code"].to_numpy(np.int64)
            index_day = everyone["index_day"].to_numpy(np.int64)
            event_day = everyone["event_day"].to_numpy(np.int64)
        else:
            site, index_day, event_day = (units.all_group, units.all_index_day,
                                          units.all_event_day)
        if not len(site):
            return
        detect = metric.detect
        reference = self._reference(metric, "up")
        theta = survival.hazard_ratio_for(reference, detect.odds_ratio)
        n_sites = len(self.sites)
        follow = survival.follow_up(site, index_day, event_day, n_sites,
                                    int(metric.window_days), self.as_of_day, reference)
        as_of = day_to_date(self.as_of_day)
        since = self.tte_charted_since.get(metric.id)
        noted = self.summary["metrics"][metric.id]
        if not survival.charts_at(follow.shape_estimated, since, as_of):
            # A registry's first year: the network has not followed enough patients through
            # the window to give the hazard's shape (survival.shape_estimable), and a chart
            # on a guessed shape alarms at normal sites. The proportion charts wait for
            # mature units in the same way.
            noted["tte"] = (
                f"not charted yet: the network has not followed {survival.MIN_PATIENTS_PER_BIN} "
                f"patients through every part of the {metric.window_days}-day window")
            return
        # Charted: the stored decision that keeps it so in every later run (survival.charts_at).
        since = since if since is not None and since <= as_of else as_of
        noted[TTE_CHARTED_SINCE] = since.isoformat()
        if not follow.shape_estimated:
            noted["tte_kept"] = (
                f"charted since {since.isoformat()}; this run's data fall below the start rule "
                f"({survival.MIN_PATIENTS_PER_BIN} patients through every part of the "
                f"{metric.window_days}-day window) and the chart is kept, on the hazard they "
                "give, so that an open alarm is neither closed nor sent again")
        mu = follow.mean_daily_expected()
        role = self._role(metric, "tte_cusum", "up")
        levels_to_run = [role] + (["watch"] if role == "alarm" and self.profile.design.budget
                                  else [])
        days = follow.days
        for level in levels_to_run:
            ratio = 1.0
            if self.profile.design.budget is not None:
                rate = budget.chart_rate(self.profile, metric, "up", level)
                arl0_days = budget.significant(365.25 / rate, 2)
                if self._spent_at_baseline("up"):
                    # In-control hazard at the pooled rate over the reference (range-edge)
                    # hazard: the same ratio for every site (one reference hazard shape).
                    ratio = budget.significant(
                        math.log1p(-float(metric.baseline.rate)) / math.log1p(-reference), 3)
            else:
                arl0_days = float(detect.arl0)  # legacy: the profile's ARL0, read as days
            h = np.array([budget.poisson_threshold(budget.significant(float(m), 2), theta,
                                                   arl0_days, ratio) if m > 0 else np.inf
                          for m in mu])
            if level != "watch" and self.profile.design.budget is not None:
                edge = [budget.poisson_arl_days(budget.significant(float(m), 2), theta,
                                                float(hh)) if m > 0 and ratio != 1.0
                        else arl0_days for m, hh in zip(mu, h, strict=True)]
                self.edge_false_alarms[metric.id] = float(sum(
                    365.25 / a for a, m in zip(edge, mu, strict=True) if m > 0))
            result = survival.tte_cusum(follow.expected, follow.observed, theta,
                                        np.where(np.isfinite(h), h, 1e9))
            name = "tte_cusum" if level != "watch" else "tte_cusum_watch"
            if level != "watch":
                self.charts.setdefault("tte", {})[metric.id] = {
                    "metric": metric.id, "sites": self.sites, "first_day": follow.first_day,
                    "statistic": result.statistic, "h_sites": h,
                    "hazard": follow.hazard.tolist(),
                }
            for code, site in enumerate(self.sites):
                entry = self._site_entry(site, metric)
                entry.setdefault("cusum", {})[f"{name}_up"] = {
                    "value": _finite(result.statistic[code, -1]), "h": _finite(h[code]),
                    "signals": int(result.signal[code].sum()), "role": level,
                    "arl0_days": arl0_days, "expected_per_day": _finite(mu[code]),
                }
            for code, col in zip(*np.nonzero(result.signal), strict=True):
                stat = result.statistic[code]
                zero = np.flatnonzero((stat[:col] <= 1e-12) | result.signal[code, :col])
                begin = int(zero[-1]) + 1 if zero.size else 0
                observed = float(follow.observed[code, begin:col + 1].sum())
                expected = float(follow.expected[code, begin:col + 1].sum())
                self.builder.add(
                    metric, self.sites[code], name, "up", day_to_date(int(days[begin])),
                    day_to_date(int(days[col])), observed=observed, n=None,
                    expected=expected, statistic=float(stat[col]), threshold=float(h[code]),
                    detail={
                        "role": level, "hazard_ratio": theta, "arl0_days": arl0_days,
                        "window_days": metric.window_days, "reference_rate": reference,
                        "detectable_on": day_to_date(int(days[col])),
                        "chart_order": "event day (partial follow-up)",
                        "expected_per_day": _finite(mu[code]),
                        "threshold_method": "Markov chain of the daily Poisson CUSUM, "
                                            "ARL0 from the false-alarm budget",
                    },
                )

    def _site_cumulative(self, group: np.ndarray, y: np.ndarray, mature_day: np.ndarray,
                         points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (n, events) per site x point for units mature on or before each point."""
        n_sites = len(self.sites)
        n = np.zeros((n_sites, len(points)), dtype=np.int64)
        events = np.zeros((n_sites, len(points)), dtype=np.int64)
        starts = np.searchsorted(group, np.arange(n_sites), side="left")
        ends = np.searchsorted(group, np.arange(n_sites), side="right")
        for code in range(n_sites):
            a, b = starts[code], ends[code]
            if a == b:
                continue
            cum = np.r_[0, np.cumsum(y[a:b])]
            k = np.searchsorted(mature_day[a:b], points, side="right")
            n[code] = k
            events[code] = cum[k]
        return n, events

    def _funnel_prepare(self, metric: Metric, units: _ChartedUnits) -> None:
        group, y, day = units.group, units.y, units.day
        design = self.profile.design
        mature = day + metric.window_days
        points = self.eval_days
        n_cum, e_cum = self._site_cumulative(group, y, mature, points)
        n_old, e_old = self._site_cumulative(group, y, mature, points - design.funnel_rolling_days)
        windows = {"cumulative": (n_cum, e_cum), "rolling": (n_cum - n_old, e_cum - e_old)}
        for window, (n, events) in windows.items():
            self.funnel_tests.append(
                {"metric": metric, "window": window, "n": n, "events": events}
            )

    def funnel_decide(self) -> None:
        """Run every funnel, apply BH across sites, metrics and directions per evaluation.

        Exact p-values for all evaluation points come first (vectorised); the funnel limits
        are then computed only where a site survives BH, since a site is flagged only when
        it is both outside the limit and a BH discovery, plus at as_of for the report.
        """
        design = self.profile.design
        limit = design.funnel_limit
        n_points = len(self.eval_days)
        for window in FUNNEL_WINDOWS:
            tests = [t for t in self.funnel_tests if t["window"] == window]
            if not tests:
                continue
            for test in tests:
                metric = test["metric"]
                test["pvals"] = {
                    d: funnel.one_sided_pvalue(test["events"], test["n"],
                                               self._reference(metric, d), d)
                    for d in ("up", "down")}
                test["q"] = {d: np.full(test["n"].shape, np.nan) for d in ("up", "down")}
            candidates = {n_points - 1}
            for j in range(n_points):
                pieces, places = [], []
                for t_index, test in enumerate(tests):
                    for direction in test["metric"].detect.directions:
                        pieces.append(test["pvals"][direction][:, j])
                        places.append((t_index, direction))
                fdr = funnel.false_discovery_control(
                    np.concatenate(pieces), alpha=design.funnel_fdr_q
                )
                if fdr.reject.any():
                    candidates.add(j)
                offset = 0
                for (t_index, direction), piece in zip(places, pieces, strict=True):
                    tests[t_index]["q"][direction][:, j] = fdr.q_values[offset:offset + len(piece)]
                    offset += len(piece)
            for test in tests:
                metric: Metric = test["metric"]
                n, events = test["n"], test["events"]
                outside = {d: np.zeros(n.shape, bool) for d in ("up", "down")}
                z_adj = np.full(n.shape, np.nan)
                lower = np.full(n.shape, np.nan)
                upper = np.full(n.shape, np.nan)
                edge_lower = np.full(n.shape, np.nan)
                edge_upper = np.full(n.shape, np.nan)
                phi = np.ones(n_points)
                modes = ["none"] * n_points
                for j in sorted(candidates):
                    if not n[:, j].any():
                        continue
                    res = funnel.funnel(events[:, j], n[:, j], metric.baseline.rate,
                                        coverages=(0.95, limit), overdispersion="multiplicative")
                    # Under a guidance range, "outside" is judged against limits drawn around
                    # the range's edge for each direction; the display keeps the baseline's.
                    edges = {d: self._reference(metric, d) for d in ("up", "down")}
                    by_direction = {
                        d: res if edges[d] == metric.baseline.rate else funnel.funnel(
                            events[:, j], n[:, j], edges[d], coverages=(0.95, limit),
                            overdispersion="multiplicative")
                        for d in ("up", "down")
                    }
                    outside["up"][:, j] = by_direction["up"].above[limit]
                    outside["down"][:, j] = by_direction["down"].below[limit]
                    edge_upper[:, j] = by_direction["up"].limits[limit][1]
                    edge_lower[:, j] = by_direction["down"].limits[limit][0]
                    z_adj[:, j] = res.z_adjusted
                    lower[:, j], upper[:, j] = res.limits[limit]
                    phi[j] = res.overdispersion.phi if res.overdispersion_mode != "none" else 1.0
                    modes[j] = res.overdispersion_mode
                test.update(outside=outside, z=z_adj, lower=lower, upper=upper, phi=phi,
                            modes=modes, edge_lower=edge_lower, edge_upper=edge_upper)
                self._funnel_signals(test, window)

    def _funnel_signals(self, test: dict[str, Any], window: str) -> None:
        metric: Metric = test["metric"]
        design = self.profile.design
        method = FUNNEL_METHOD[window]
        points = self.eval_days
        n, events = test["n"], test["events"]
        p0 = metric.baseline.rate
        last = len(points) - 1
        self.charts["funnel"][f"{metric.id}:{window}"] = {
            "metric": metric.id, "window": window, "p0": p0, "sites": self.sites,
            "n": n[:, last], "events": events[:, last], "phi": float(test["phi"][last]),
            # which limits decided at as_of: exact binomial ("none") or overdispersion-adjusted
            "overdispersion_mode": test["modes"][last], "limit": design.funnel_limit,
        }
        for code, site in enumerate(self.sites):
            entry = self._site_entry(site, metric)
            position = "no data"
            if n[code, last]:
                position = "within"
                if test["outside"]["up"][code, last]:
                    position = "above"
                elif test["outside"]["down"][code, last]:
                    position = "below"
            entry.setdefault("funnel", {})[window] = {
                "n": int(n[code, last]), "events": int(events[code, last]),
                "z_adjusted": _finite(test["z"][code, last]),
                "lower": _finite(test["lower"][code, last]),
                "upper": _finite(test["upper"][code, last]),
                "position": position,
                "q_up": _finite(test["q"]["up"][code, last]),
            }
        for direction in metric.detect.directions:
            flagged = test["outside"][direction] & (
                np.nan_to_num(test["q"][direction], nan=1.0) <= design.funnel_fdr_q
            )
            for code in np.flatnonzero(flagged.any(axis=1)).tolist():
                for first, last_in_run in _runs(flagged[code]):
                    j = last_in_run
                    self.builder.add(
                        metric, self.sites[code], method, direction,
                        day_to_date(_month_start(points[first])), day_to_date(points[first]),
                        observed=float(events[code, j]), n=int(n[code, j]),
                        expected=float(n[code, j] * p0),
                        statistic=float(test["z"][code, j]),
                        threshold=float(test["upper" if direction == "up" else "lower"][code, j]),
                        p_value=float(test["pvals"][direction][code, j]),
                        detail={
                            "role": "corroborating" if self.profile.design.budget else "alarm",
                            "rate": float(events[code, j] / n[code, j]),
                            "limit_rate": _finite(test["edge_upper" if direction == "up"
                                                       else "edge_lower"][code, j]),
                            "reference_rate": self._reference(metric, direction),
                            "window": window,
                            "rolling_days": design.funnel_rolling_days if window == "rolling"
                            else None,
                            "limit": design.funnel_limit, "q_value": _finite(
                                test["q"][direction][code, j]),
                            "phi": _finite(test["phi"][j]),
                            "first_flagged": day_to_date(points[first]),
                            "last_flagged": day_to_date(points[j]),
                            "ongoing": j == len(points) - 1,
                            "statistic": "overdispersion-adjusted z",
                        },
                    )

    def _pchart(self, metric: Metric, units: _ChartedUnits) -> None:
        group, y, day = units.group, units.y, units.day
        design = self.profile.design
        p0 = metric.baseline.rate
        alpha = (1.0 - design.pchart_limit) / 2.0
        months = _months_of(day)
        quarter = months // 3
        quarter_end = (
            ((quarter + 1) * 3).astype("datetime64[M]").astype("datetime64[D]").astype(np.int64)
            - 1
        )
        closed = quarter_end + metric.window_days <= self.as_of_day
        if not closed.any():
            return
        q_first = int(quarter[closed].min())
        q_last = int(quarter[closed].max())
        n_periods = q_last - q_first + 1
        events, n = pchart.aggregate_periods(
            group[closed], quarter[closed] - q_first, y[closed], len(self.sites), n_periods
        )
        labels = []
        for q in range(q_first, q_last + 1):
            labels.append(f"{1970 + q // 4}-Q{q % 4 + 1}")
        self.charts["pchart"][metric.id] = {
            "metric": metric.id, "sites": self.sites, "labels": labels, "events": events,
            "n": n, "p0": p0, "alpha": alpha,
        }
        for direction in metric.detect.directions:
            side = "upper" if direction == "up" else "lower"
            res = pchart.pchart(events, n, self._reference(metric, direction), alpha, side=side)
            if direction == "up":
                self.charts["pchart"][metric.id]["limit"] = res.limit
            for code in np.flatnonzero(res.signal.any(axis=1)).tolist():
                for first, last_in_run in _runs(res.signal[code]):
                    q0 = q_first + first
                    start_day = int(
                        np.datetime64(q0 * 3, "M").astype("datetime64[D]").astype(np.int64)
                    )
                    first_end = int(
                        np.datetime64((q0 + 1) * 3, "M").astype("datetime64[D]").astype(np.int64)
                    ) - 1
                    run = slice(first, last_in_run + 1)
                    run_n = int(n[code, run].sum())
                    self.builder.add(
                        metric, self.sites[code], "pchart", direction, day_to_date(start_day),
                        day_to_date(first_end),
                        observed=float(events[code, run].sum()), n=run_n,
                        expected=run_n * p0,
                        statistic=_finite(res.proportion[code, last_in_run]),
                        threshold=_finite(res.limit[code, last_in_run]),
                        p_value=_finite(res.p_value[code, last_in_run]),
                        detail={
                            "role": "corroborating" if self.profile.design.budget else "alarm",
                            "reference_rate": self._reference(metric, direction),
                            "period": "quarter", "alpha": alpha,
                            "last_flagged": day_to_date(int(np.datetime64(
                                (q_first + last_in_run + 1) * 3, "M").astype("datetime64[D]")
                                .astype(np.int64)) - 1),
                            "ongoing": last_in_run == n_periods - 1,
                            "quarters": [
                                {"quarter": labels[k], "events": int(events[code, k]),
                                 "n": int(n[code, k]),
                                 "limit": _finite(res.limit[code, k]),
                                 "p_value": _finite(res.p_value[code, k])}
                                for k in range(first, last_in_run + 1)
                            ],
                        },
                    )

    def _rare(self, metric: Metric, units: _ChartedUnits) -> None:
        group, y, day = units.group, units.y, units.day
        design = self.profile.design
        p0 = self._reference(metric, "up")
        role = self._role(metric, "rare", "up")
        alpha = design.rare_alpha
        if design.budget is not None and role == "alarm":
            alpha = budget.rare_alpha(budget.chart_rate(self.profile, metric, "up"))
        mature = day + metric.window_days
        points = self.eval_days
        n_cum, e_cum = self._site_cumulative(group, y, mature, points)
        n_old, e_old = self._site_cumulative(group, y, mature, points - design.rare_rolling_days)
        n, events = n_cum - n_old, e_cum - e_old
        flagged = np.zeros(n.shape, bool)
        pvals = np.full(n.shape, np.nan)
        network = []
        for j in range(len(points)):
            res = rare.rare_event_tests(events[:, j], n[:, j], p0, alpha=alpha)
            flagged[:, j] = res.signal
            pvals[:, j] = res.p_binomial
            network.append(res.network_p_binomial)
        last = len(points) - 1
        self.summary["metrics"].setdefault(metric.id, {})["network_rare_p"] = _finite(
            network[last])
        for code, site in enumerate(self.sites):
            self._site_entry(site, metric)["rare"] = {
                "n": int(n[code, last]), "events": int(events[code, last]),
                "p_value": _finite(pvals[code, last]),
                "rolling_days": design.rare_rolling_days,
            }
        for code in np.flatnonzero(flagged.any(axis=1)).tolist():
            for first, j in _runs(flagged[code]):
                critical = rare.critical_event_count(n[code, j], p0, alpha)
                self.builder.add(
                    metric, self.sites[code], "rare_exact", "up",
                    day_to_date(_month_start(points[first])), day_to_date(points[first]),
                    observed=float(events[code, j]), n=int(n[code, j]),
                    expected=float(n[code, j] * p0), statistic=float(events[code, j]),
                    threshold=_finite(critical), p_value=_finite(pvals[code, j]),
                    detail={
                        "role": role, "reference_rate": p0,
                        "test": "exact binomial, one-sided", "alpha": alpha,
                        "rolling_days": design.rare_rolling_days,
                        "first_flagged": day_to_date(points[first]),
                        "last_flagged": day_to_date(points[j]), "ongoing": j == last,
                    },
                )

    # -- levels ---------------------------------------------------------------------------
    def grade(self) -> None:
        """Give every site and metric its level (:mod:`levels`) and list the level episodes."""
        self.builder.fill_intervals()
        by_pair: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in self.builder.rows.values():
            by_pair.setdefault((row["site_id"], row["metric"]), []).append(row)
        as_of = day_to_date(self.as_of_day)
        design = self.profile.design
        recent: dict[tuple[str, str], tuple[int, int]] = {}
        spans = {m.id: levels.recent_months_before(m.window_days, as_of)
                 for m in self.profile.metrics}
        for month in self.site_months:
            first, stop = spans.get(month["metric"], (0, levels.RECENT_MONTHS))
            if first <= month["months_before_as_of"] < stop:
                pair = (month["site_id"], month["metric"])
                units, events = recent.get(pair, (0, 0))
                recent[pair] = (units + month["units"], events + month["events"])
        self.level_episodes: list[dict[str, Any]] = []
        for metric in self.profile.metrics:
            for site in self.sites:
                entry = self._site_entry(site, metric)
                signals = by_pair.get((site, metric.id), [])
                entry["level"] = levels.grade(metric, entry, signals, as_of, design,
                                              recent.get((site, metric.id)))
                self.level_episodes += levels.level_episodes(metric, site, signals, as_of,
                                                             design)
        self.level_episodes.sort(key=lambda e: (e["start"], e["site_id"], e["metric"],
                                                e["level"]))
        self.summary["levels"] = {
            name: sum(1 for e in self.site_metrics.values() if e["level"]["level"] == name)
            for name in levels.LEVELS
        }
        self.summary["alarm_budget"] = self.budget_summary()

    def budget_summary(self) -> dict[str, Any] | None:
        """Return the false-alarm budget and what it means for this network, per year.

        ``expected_false_alarms_per_year`` holds for sites at the in-control rate the budget
        is spent at (``spent_at``: the guidance's pooled rate, or the range edge);
        ``if_every_site_at_range_edge`` is the worst in-control case, from each site's
        threshold and Markov-chain ARL at the edge.
        """
        design = self.profile.design
        if design.budget is None:
            return None
        per_metric = {}
        for metric in self.profile.metrics:
            if metric.alarm is None:
                continue
            rate = budget.chart_rate(self.profile, metric, "up")
            active = sum(1 for site in self.sites
                         if self.site_metrics.get((site, metric.id), {}).get("n"))
            expected = round(rate * active, 4)
            per_metric[metric.id] = {
                "method": metric.alarm.method, "share": metric.alarm.share,
                "per_site_year": rate, "sites": active,
                "expected_false_alarms_per_year": expected,
                "if_every_site_at_range_edge": round(
                    self.edge_false_alarms.get(metric.id, expected), 4),
            }
        total = sum(m["expected_false_alarms_per_year"] for m in per_metric.values())
        edge = sum(m["if_every_site_at_range_edge"] for m in per_metric.values())
        spent_at = design.budget.spent_at
        return {
            "safety_per_100_site_years": design.budget.safety_per_100_site_years,
            "under_reporting_per_100_site_years":
                design.budget.under_reporting_per_100_site_years,
            "watch_per_site_year": design.budget.watch_per_site_year,
            "spent_at": spent_at,
            "metrics": per_metric,
            "expected_false_alarms_per_year": round(total, 3),
            "if_every_site_at_range_edge": round(edge, 3),
            "note": ("false safety alarms a year for this network if every site performed at "
                     + ("the guidance's pooled rate" if spent_at == "baseline"
                        else "the top of the guidance range")
                     + "; sentinel events are not false alarms"),
        }

    # -- sentinel and process -------------------------------------------------------------
    def sentinel_metric(self, metric: Metric) -> None:
        events = sentinel_events(self.snapshot, metric)
        counts = events.groupby("site_id", observed=True).size() if len(events) else pd.Series(dtype=int)
        for site in self.sites:
            self._site_entry(site, metric)["events"] = int(counts.get(site, 0))
        self.summary["metrics"][metric.id] = {"events": int(len(events))}
        if events.empty:
            return
        # sentinel_events sorts by site (its categorical's codes: site names in order), day
        # and type, so each (site, day) is one run of rows, in groupby(sort=True) order:
        # counted on the arrays, not a frame and a value_counts per group.
        sites = events["site_id"].array
        codes = sites.codes.astype(np.int64)
        days = events["event_day"].to_numpy(np.int64)
        types = events["event_type"].to_numpy(object).tolist()
        starts = np.flatnonzero(np.r_[True, (codes[1:] != codes[:-1]) | (days[1:] != days[:-1])])
        for start, end in zip(starts.tolist(), [*starts[1:].tolist(), len(days)], strict=True):
            event_day = day_to_date(int(days[start]))
            self.builder.add(
                metric, sites.categories[codes[start]], "sentinel", "up", event_day, event_day,
                observed=float(end - start), n=None, expected=None,
                statistic=float(end - start), threshold=1.0,
                detail={"event_types": {str(k): int(v) for k, v
                                        in sorted(Counter(types[start:end]).items())},
                        "rule": "any single event is a signal"},
            )

    def process_metric(self, metric: Metric) -> None:
        frame = process_outcomes(self.snapshot, metric)
        if frame.empty:
            return
        frame["month"] = _months_of(frame["index_day"].to_numpy()).astype("datetime64[M]")
        # process_outcomes keeps one row per procedure, in the snapshot's order
        self._monthly(
            metric, self.snapshot.procedures["site_code"].to_numpy(np.int64),
            frame["failed"].to_numpy(np.int64), frame["index_day"].to_numpy(np.int64),
            np.full(len(frame), float(metric.baseline.rate)),
        )
        totals = frame.groupby("site_id", observed=True)["failed"].agg(["sum", "count"])
        low, high = exact_interval(totals["sum"].to_numpy(), totals["count"].to_numpy())
        for i, (site, row) in enumerate(totals.iterrows()):
            self._site_entry(site, metric).update(
                n=int(row["count"]), events=int(row["sum"]),
                rate=float(row["sum"] / row["count"]), ci_low=_finite(low[i]),
                ci_high=_finite(high[i]),
            )
        self.summary["metrics"][metric.id] = {
            "procedures": int(len(frame)), "failures": int(frame["failed"].sum())
        }
        monthly = frame.groupby(["site_id", "month"], sort=True, observed=True).agg(
            failures=("failed", "sum"), procedures=("failed", "size")
        )
        failed = frame.loc[frame["failed"] == 1]
        first_failure = failed.groupby(["site_id", "month"], sort=True, observed=True)["index_day"].min()
        for (site, month), first_day in first_failure.items():
            counts = monthly.loc[(site, month)]
            self.builder.add(
                metric, site, "process", "up", day_to_date(first_day), day_to_date(first_day),
                observed=float(counts["failures"]), n=int(counts["procedures"]), expected=0.0,
                statistic=float(counts["failures"]), threshold=1.0,
                detail={"month": str(month), "requirement": f"{metric.process_field} is "
                        f"{str(not metric.process_failure_value).lower()} for every procedure",
                        "rule": "any procedure without it is a process signal"},
            )


def compute(profile: Profile, snapshot: Snapshot,
            tte_charted_since: dict[str, date] | None = None) -> _Computation:
    """Derive every signal, model and per-site figure for a snapshot (no database writes).

    ``tte_charted_since``: per metric, the as_of since when stored runs chart its
    time-to-event chart (:func:`runs.tte_charted_since`; none: the start rule alone).
    """
    work = _Computation(profile, snapshot, tte_charted_since)
    for metric in profile.metrics:
        with work._timed(f"{metric.id}:total"):
            if metric.kind == "outcome":
                work.outcome_metric(metric)
            elif metric.kind == "sentinel":
                work.sentinel_metric(metric)
            else:
                work.process_metric(metric)
            # Each metric's units are garbage now: the next metric starts from what is kept.
            release_memory()
    with work._timed("all:funnel_decide"):
        work.funnel_decide()
    with work._timed("all:grade"):
        work.grade()
    return work


def run_key_for(as_of: date, profile: Profile, fingerprint: str) -> str:
    """Return the deterministic key of a run: hash(as_of, profile name and version, data)."""
    text = "|".join((as_of.isoformat(), profile.name, profile.version, fingerprint))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Network evaluations run by this process. One Airflow cycle (ingest, monitor, alerts, run
# in one process by dags/kyphowatch_testrun.py) must evaluate exactly once: every reader
# reads the stored run. The test run prints this and tests/test_dags.py checks it.
_evaluations = 0


def evaluations_in_this_process() -> int:
    """Return how many times :func:`evaluate` has run in this process."""
    return _evaluations


def evaluate(settings: Settings, as_of: date | None = None, *, persist: bool = False,
             profile: Profile | None = None) -> MonitorResult:
    """Compute the monitor for ``as_of`` (default: newest procedure date); optionally store it."""
    global _evaluations
    _evaluations += 1
    started = time.perf_counter()
    profile = profile or load_profile(settings.profile_path)
    engine = open_warehouse(settings.db_url)
    facts = None
    try:
        # The snapshot cache's write (a full read's: about 1.5 s of the server's time)
        # overlaps the snapshot's build and the operator and device charts; it is waited
        # for before compute, so its blobs are gone before the run's memory peak.
        with store_cache_aside():
            with engine.connect() as conn:
                newest = latest_procedure_date(conn)
                check_as_of(profile, as_of, newest, conn)
                as_of = as_of or newest
                if as_of is None:
                    log.info("monitor: the warehouse holds no procedures; nothing to monitor")
                    return MonitorResult(run_key="", as_of=None, profile_name=profile.name,
                                         profile_version=profile.version, data_fingerprint="")
                # A stored run also charts operators and devices: their columns come in the
                # same read (PostgreSQL), not in a second pass over the procedures.
                # A stored run (the nightly monitor) reads through the warehouse's snapshot
                # cache: only the rows written since its last run (snapshot_cache.py).
                read = load_cached_snapshot if persist else load_snapshot
                snapshot = read(conn, profile, as_of,
                                extras=snapshot_extras(profile) if persist else ())
                # Charted once, a time-to-event chart stays charted (survival.charts_at):
                # the decision is read from the stored runs, as the thresholds are.
                charted_since = tte_charted_since(
                    conn, profile.name, as_of,
                    [m.id for m in profile.metrics if "tte_cusum" in m.methods])
            loaded = time.perf_counter()
            # Operators, devices and lots on the same snapshot (issue 12; beyond_run.py):
            # computed first, while only the snapshot is alive, and stored after the run.
            prepared = prepare_beyond_site(engine, profile, snapshot) if persist else None
        charted = time.perf_counter()  # a wait for the cache's write counts here
        # The run's procedure facts are a scan in the server (about 0.8 s for 1M
        # procedures) that needs only as_of: started here, it runs while compute holds the
        # client (the server is idle then), not while the store's threads want both cores.
        # The store waits for it, and so does a failure before the store (finally below).
        if persist and engine.dialect.name == "postgresql":
            facts = FactsInBackground(engine, as_of)
        store = threshold_store.open_store(engine, profile.name, profile.version)
        with threshold_store.active(store):
            work = compute(profile, snapshot, charted_since)
        threshold_store.save_store(engine, store)
        computed = time.perf_counter()
        run_key = run_key_for(as_of, profile, snapshot.fingerprint)
        rows = work.builder.sorted_rows()
        for row in rows:
            row.update(active=True, first_seen_run=run_key, last_seen_run=run_key)
        work.summary.update(
            sites=len(work.sites), procedures=int(len(snapshot.procedures)),
            signals=len(rows), signals_by_method=_count_by(rows, "method"),
            signals_by_metric=_count_by(rows, "metric"),
            evaluation_points=int(len(work.eval_days)),
        )
        result = MonitorResult(
            run_key=run_key, as_of=as_of, profile_name=profile.name,
            profile_version=profile.version, data_fingerprint=snapshot.fingerprint,
            signals=rows, summary=work.summary, models=work.models,
            site_metrics=[work.site_metrics[k] for k in sorted(work.site_metrics)],
            site_months=sorted(work.site_months,
                               key=lambda r: (r["metric"], r["site_id"], r["month"])),
            charts=work.charts,
            level_episodes=[{"site_id": e["site_id"], "metric": e["metric"],
                             "direction": e["direction"], "level": e["level"],
                             "start_date": e["start"], "last_date": e["last"],
                             "end_date": e["end"], "signals": e["signals"]}
                            for e in work.level_episodes],
            thresholds=store.counts(),
        )
        result.timings = {"read": loaded - started, "compute": computed - charted}
        result.compute_timings = dict(work.timings)
        if persist:
            _persist(engine, result, profile, facts=facts)
            release_memory()
            stored = time.perf_counter()
            # The store stays active: a design wrapped in threshold_store.cached there is
            # stored and read like the site charts' (the FIR curves are not wrapped yet).
            with threshold_store.active(store):
                run_beyond_site(engine, profile, snapshot, run_key, settings.expectations_dir,
                                prepared)
            threshold_store.save_store(engine, store)
            result.timings.update(store=stored - computed,
                                  beyond_site=charted - loaded + time.perf_counter() - stored)
        result.seconds = time.perf_counter() - started
        log.info(
            "monitor %s as of %s: %d signals (%d new), %d procedures, %.2fs (read %.2fs); "
            "thresholds: %d read, %d computed",
            profile.name, as_of, len(rows), len(result.new_signal_keys),
            len(snapshot.procedures), result.seconds, loaded - started, store.read,
            store.computed,
        )
        return result
    finally:
        if facts is not None:  # never left scanning past a failure (joined: no-op after)
            facts.wait()
        engine.dispose()


def run_monitor(settings: Settings, as_of: date | None = None) -> MonitorResult:
    """Run the monitor, upsert its signals and record the run; return what it found."""
    return evaluate(settings, as_of, persist=True)


def _count_by(rows: list[dict[str, Any]], key: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[key]] = counts.get(row[key], 0) + 1
    return dict(sorted(counts.items()))


_UPDATABLE = tuple(
    f for f in SIGNAL_FIELDS if f not in ("signal_key", "first_seen_run")
)


def _persist(engine: sa.Engine, result: MonitorResult, profile: Profile,
             attempts: int = 3, facts: FactsInBackground | None = None) -> None:
    """Record the run and upsert its signals by key; deactivate keys no longer derived.

    Also replaces the profile's current picture (``chart_status``, ``site_month_metric``)
    when this run is at least as new as the stored one. A run for an earlier date stores
    the run only: the signals and the picture stay as the newest run left them.

    Two monitors racing on the same new key is resolved by retrying: the loser sees the
    row on its second attempt and updates it instead.

    ``facts``: the run's procedure facts already being aggregated (evaluate starts them
    before compute, for ``result.as_of``); else they are started here.
    """
    # PostgreSQL aggregates the run's procedure facts on another connection meanwhile
    # (runs.FactsInBackground): once for every attempt, and always waited for, so a failed
    # attempt neither leaves the scan running nor starts another; SQLite in its own
    # transaction, as before.
    if result.procedure_facts is not None:
        if facts is not None:
            facts.wait()
        facts = None
    elif facts is None and engine.dialect.name == "postgresql":
        facts = FactsInBackground(engine, result.as_of)
    # Likewise the sites' chart parts are packed in a thread while the transaction waits
    # for the server (runs.SeriesInBackground); on SQLite there is no such wait.
    series = SeriesInBackground(result) if engine.dialect.name == "postgresql" else None
    try:
        for attempt in range(1, attempts + 1):
            try:
                _persist_once(engine, result, profile, facts, series)
                result.persisted = True
                return
            except Exception as error:
                if not _duplicate_key(error) or attempt == attempts:
                    raise
                log.warning("monitor: concurrent run wrote the same signals; retrying (%d)",
                            attempt)
    finally:
        if facts is not None:
            facts.wait()
        if series is not None:
            series.wait()


def _duplicate_key(error: BaseException) -> bool:
    """Return True for a unique-key violation, through SQLAlchemy or from psycopg's COPY.

    The signals go in with COPY on the raw psycopg connection (:func:`_upsert_signals`),
    whose violation is psycopg's own ``IntegrityError``, not SQLAlchemy's.
    """
    if isinstance(error, sa.exc.IntegrityError):
        return True
    psycopg = sys.modules.get("psycopg")  # a psycopg error means psycopg is imported
    return psycopg is not None and isinstance(error, psycopg.IntegrityError)


def _persist_once(engine: sa.Engine, result: MonitorResult, profile: Profile,
                  facts: FactsInBackground | None = None,
                  series: SeriesInBackground | None = None) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        stored = conn.execute(
            sa.select(signal.c.signal_key, signal.c.first_seen_run, signal.c.signal_date).where(
                signal.c.profile_name == result.profile_name
            )
        ).all()
        # Before the current picture is read to write its changes (replace_rows). The
        # signals read just before are not covered, as before: a rival that stored the same
        # new keys meanwhile makes this attempt fail on a duplicate key and retry.
        lock_monitor_store(conn)
        existing = {key: first_seen for key, first_seen, _ in stored}
        # A run for a date before the current picture's (a backfill, or a reader asking for
        # a past date with no stored run) stores itself and leaves the signal table alone,
        # as it leaves the current picture: the rows hold the newest run's figures and
        # states, which alerts read, and a past view must not replace them.
        # So does a look-ahead (a date more than the shortest outcome window after the
        # newest procedure, to let longer windows close; or a mistyped year): on it every hold has run out, so alerts would read
        # every alarm as cleared, and as the newest picture it would outrank every later
        # nightly run until the data caught up with it (user audit, 2026-12-07). A picture
        # left by such a run before this rule is replaced by the next run on the data.
        picture_as_of = conn.execute(
            sa.select(sa.func.max(chart_status.c.as_of))
            .where(chart_status.c.profile_name == result.profile_name)).scalar()
        picture_as_of = _as_date(picture_as_of) if picture_as_of is not None else None
        newest = latest_procedure_date(conn)
        look_ahead = is_look_ahead(profile, result.as_of, newest)
        # A picture that is itself a look-ahead (left by a run before this rule) yields to
        # any run from the newest procedure on; one within the grace (the extract's day,
        # say) stays the picture against an earlier run, as every picture does.
        current_day = (min(picture_as_of, newest) if picture_as_of is not None
                       and is_look_ahead(profile, picture_as_of, newest) else picture_as_of)
        backdated = look_ahead or (current_day is not None and current_day > result.as_of)
        if look_ahead:
            log.info("monitor: a run as of %s, more than %d days after the newest procedure "
                     "(%s): stored, the current picture and the signal table left unchanged",
                     result.as_of, look_ahead_grace(profile), newest)
        elif backdated:
            log.info("monitor: a run as of %s, before the current picture's %s: stored, the "
                     "signal table left unchanged", result.as_of, picture_as_of)
        # A run for a past as_of (a rerun or backfill) cannot see episodes that signalled
        # later, so it must not deactivate them; only what it could have derived is judged.
        judged = {key for key, _, signal_date in stored if signal_date <= result.as_of}
        present = {row["signal_key"] for row in result.signals}
        retired = _retire_replaced_profiles(conn, result, present)
        if retired:
            result.summary["retired_profiles"] = retired
        run_exists = conn.execute(
            sa.select(monitor_run.c.run_key).where(monitor_run.c.run_key == result.run_key)
        ).first()
        if run_exists is None:
            conn.execute(
                monitor_run.insert().values(
                    run_key=result.run_key, as_of=result.as_of,
                    profile_name=result.profile_name, profile_version=result.profile_version,
                    data_fingerprint=result.data_fingerprint,
                    models=json.dumps(result.models, sort_keys=True),
                    summary=json.dumps(result.summary, sort_keys=True),
                    computed_at=now,
                )
            )
        elif retired:  # a rerun of a stored run after another profile ran: keep the record
            conn.execute(monitor_run.update().where(monitor_run.c.run_key == result.run_key)
                         .values(summary=json.dumps(result.summary, sort_keys=True)))
        inserts, updates = [], []
        for row in result.signals:
            key = row["signal_key"]
            row["active"] = True
            row["last_seen_run"] = result.run_key
            if key in existing:
                row["first_seen_run"] = existing[key]
                if not backdated:
                    updates.append({f: row[f] for f in (*_UPDATABLE, "signal_key")})
            else:
                row["first_seen_run"] = result.run_key
                if not backdated:
                    inserts.append({f: row[f] for f in SIGNAL_FIELDS})
        result.new_signal_keys = sorted(row["signal_key"] for row in inserts)
        # The run's core part holds the signals as set just above and nothing written
        # below: packed in a thread while this transaction waits for the server (as the
        # sites' parts are; PostgreSQL only, like them).
        core = CoreInBackground(result) if series is not None else None
        try:
            _upsert_signals(conn, inserts, updates)
            gone = [] if backdated else [key for key in judged if key not in present]
            for start in range(0, len(gone), 500):
                conn.execute(
                    signal.update()
                    .where(signal.c.signal_key.in_(gone[start:start + 500]), signal.c.active)
                    .values(active=False)
                )
            if not backdated:
                _replace_current_picture(conn, result, profile)
            store_run(conn, result, facts.result if facts is not None else None,
                      series.result if series is not None else None,
                      core.core if core is not None else None,
                      core.site_metrics if core is not None else None)
        finally:
            if core is not None:  # never left packing past a failed attempt
                core.wait()


def _upsert_signals(conn: sa.Connection, inserts: list[dict[str, Any]],
                   updates: list[dict[str, Any]]) -> None:
    """Insert the new signals and update the known ones (every field but the first run).

    PostgreSQL (psycopg): the rows go in with COPY, the updates through a temporary table
    and one ``UPDATE ... FROM`` (a statement per signal took about 0.3 s for the 3,800
    signals of a 1M-procedure run); elsewhere an executemany of each, as before. Every
    column is text, an integer, a date or a double: COPY stores the same values.
    """
    if not _copies(conn):
        if inserts:
            conn.execute(signal.insert(), inserts)
        if updates:
            conn.execute(
                signal.update()
                .where(signal.c.signal_key == sa.bindparam("b_signal_key"))
                .values({f: sa.bindparam(f"b_{f}") for f in _UPDATABLE}),
                [{f"b_{f}": row[f] for f in row} for row in updates],
            )
        return
    if inserts:
        _bulk_insert(conn, signal, inserts, {})
    if updates:
        staged = sa.Table("signal_staged", sa.MetaData(),
                          *(sa.Column(c.name, c.type) for c in signal.c
                            if c.name in (*_UPDATABLE, "signal_key")),
                          prefixes=["TEMPORARY"], postgresql_on_commit="DROP")
        staged.create(conn)
        _bulk_insert(conn, staged, updates, {})
        conn.execute(signal.update().where(signal.c.signal_key == staged.c.signal_key)
                     .values({f: staged.c[f] for f in _UPDATABLE}))
        staged.drop(conn)


def _copies(conn: sa.Connection) -> bool:
    """Return True when rows can be written with COPY (PostgreSQL through psycopg)."""
    return conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg"


def _retire_replaced_profiles(conn: sa.Connection, result: MonitorResult,
                              present: set[str]) -> list[dict[str, Any]]:
    """Deactivate the active signals of every other profile, or other version of this one.

    The configured profile is the one the monitor runs; a signal another profile (or an
    earlier version) raised and this run does not derive again is that profile's finding,
    not this one's, and would otherwise stay active for ever. A signal this run derives
    again keeps its key (the key carries the profile's name, not its version) and is
    updated to this version by the upsert. Returns one entry per retired profile version
    (the audit entry, kept in the run's summary) and logs it.
    """
    replaced = sa.or_(signal.c.profile_name != result.profile_name,
                      signal.c.profile_version != result.profile_version)
    stale = conn.execute(
        sa.select(signal.c.signal_key, signal.c.profile_name, signal.c.profile_version)
        .where(signal.c.active, replaced)
    ).all()
    by_profile: dict[tuple[str, str], list[str]] = {}
    for key, name, version in stale:
        if key not in present:
            by_profile.setdefault((name, version), []).append(key)
    retired = []
    for (name, version), keys in sorted(by_profile.items()):
        for start in range(0, len(keys), 500):
            conn.execute(signal.update().where(signal.c.signal_key.in_(keys[start:start + 500]))
                         .values(active=False))
        successor = (result.profile_version if name == result.profile_name
                     else f"{result.profile_name} {result.profile_version}")
        reason = f"profile {name} {version} replaced by {successor}"
        log.warning("monitor: %s: %d active signal(s) retired", reason, len(keys))
        retired.append({"profile_name": name, "profile_version": version,
                        "signals": len(keys), "reason": reason})
    return retired


def _replace_current_picture(conn: sa.Connection, result: MonitorResult,
                             profile: Profile) -> None:
    """Replace the profile's ``chart_status``, ``site_month_metric`` and ``level_episode``
    rows with this run's.

    Called only for a run that is the current picture (:func:`_persist` decides: not a
    backfill for a date before the picture's, not a look-ahead past the newest procedure).
    A rerun for the same as_of replaces them (corrections, or a new kyphowatch version
    deriving the status differently). Rows are deleted and bulk inserted (COPY on
    PostgreSQL): about 0.1 s for 13,500 monthly rows; a rerun of the stored run writes only
    the rows that differ (:func:`replace_rows`).
    """
    constants = {"profile_name": result.profile_name, "run_key": result.run_key,
                 "as_of": result.as_of, "profile_version": result.profile_version}
    for table in (chart_status, site_month_metric, level_episode):
        rows = {chart_status.name: lambda: levels.status_rows(result, profile),
                site_month_metric.name: lambda: result.site_months,
                level_episode.name: lambda: result.level_episodes}[table.name]()
        replace_rows(conn, table, rows, constants)


# Arbitrary constant naming the monitor's store among PostgreSQL advisory locks (the
# migration and key locks use others).
_STORE_LOCK_KEY = 0x6B79_6D6F_6E73_7472  # "kymonstr"

# False: every current-picture and operator/device row is deleted and inserted again, as
# before (the tests compare the two ways; the stored tables must be the same).
STORE_CHANGES_ONLY = True


def lock_monitor_store(conn: sa.Connection) -> None:
    """Serialise the monitor's store transactions on this warehouse until ``conn`` commits.

    :func:`replace_rows` writes only what differs from the stored rows, so two monitors
    storing at once must not both compare against the same stored state. What the lock does
    not cover (review, 2026-12-07): the site tables and the operator/device tables are two
    transactions, each locked on its own, so two monitors of the same date on different
    data can leave one's site tables beside the other's operator tables until the next run;
    and the active signals are read before the lock is taken, so a signal another monitor
    committed meanwhile is not deactivated by this run (the next run judges it). Schedule
    one monitor per warehouse (the DAG's ``max_active_runs=1``). PostgreSQL: a
    transaction-level advisory lock. SQLite: the database's write lock, taken by a write
    that changes nothing (the driver begins the transaction before it; a later upgrade from
    a read would fail at once instead of waiting for the other writer).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_STORE_LOCK_KEY)))
    elif conn.dialect.name == "sqlite":
        conn.execute(monitor_run.update().where(sa.false())
                     .values(run_key=monitor_run.c.run_key))


def _same_values(new: tuple, old: tuple, floats: list[int]) -> bool:
    """Return True when ``new`` would be stored as the stored ``old`` already is.

    Tuple equality, plus the sign of a zero in the float columns (positions ``floats``):
    -0.0 == 0.0, but they are stored apart. Every other pair that compares equal is stored
    alike (an int and its double, numpy's and Python's numbers); a NaN never equals the
    stored one, so a row holding one is rewritten, as before.
    """
    if new != old:
        return False
    for i in floats:
        value = new[i]
        if value == 0 and math.copysign(1.0, value) != math.copysign(1.0, old[i]):
            return False
    return True


def _getter(columns: list[str]) -> Any:
    """Return a function giving a row's values of ``columns`` as a tuple (even of one)."""
    if len(columns) == 1:
        column = columns[0]
        return lambda row: (row[column],)
    return operator.itemgetter(*columns) if columns else lambda row: ()


def replace_rows(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]],
                 constants: dict[str, Any]) -> None:
    """Make the profile's rows of ``table`` equal ``rows`` (plus ``constants``), as a
    delete of them and a bulk insert would, but writing only what differs.

    The profile is ``constants["profile_name"]``; rows are matched by the table's primary
    key. A stored row whose other columns differ, or whose key is gone, is deleted; a new
    or changed row is inserted. That is done only when every stored row already carries
    ``constants`` (a rerun of the stored run: the same run key, as_of and version).
    Otherwise, or when more than half the rows changed, or with ``STORE_CHANGES_ONLY``
    off, every row is deleted and inserted again: each row carries its run's key, and
    setting a new one on the unchanged rows (an UPDATE of every row: 0.75 s for the 21,000
    monthly rows of a 186k-procedure warehouse) cost more than copying them all in again
    (about 0.2 s). The caller holds :func:`lock_monitor_store`.
    """
    mine = table.c.profile_name == constants["profile_name"]
    changed: list = []
    keys = [c.name for c in table.primary_key.columns if c.name not in constants]
    others = [c.name for c in table.columns if c.name not in constants and c.name not in keys]
    fixed = {c: v for c, v in constants.items() if c in table.c and c != "profile_name"}
    moved = bool(fixed) and conn.execute(
        sa.select(sa.literal(1)).where(mine, sa.or_(*(table.c[c] != v for c, v in fixed.items())))
        .limit(1)).first() is not None
    if STORE_CHANGES_ONLY and not moved:
        width = len(keys)
        floats = [i for i, c in enumerate(others) if isinstance(table.c[c].type, sa.Float)]
        stored = {tuple(row[:width]): tuple(row[width:])
                  for row in conn.execute(sa.select(*(table.c[c] for c in keys + others))
                                          .where(mine))}
        key_of, values_of = _getter(keys), _getter(others)
        gone = set(stored)
        for row in rows:
            try:
                key, values = key_of(row), values_of(row)
            except KeyError:  # a missing column is stored as NULL (_bulk_insert)
                key = tuple(row.get(c) for c in keys)
                values = tuple(row.get(c) for c in others)
            was = stored.get(key)
            gone.discard(key)
            if was is None or not _same_values(values, was, floats):
                changed.append((key, row))
        if len(changed) * 2 <= len(rows):
            # Deleted first: a changed row goes back in under its own key.
            doomed = [key for key, _ in changed if key in stored] + sorted(gone, key=repr)
            columns = sa.tuple_(*(table.c[c] for c in keys))
            for start in range(0, len(doomed), 200):
                conn.execute(table.delete().where(mine, columns.in_(doomed[start:start + 200])))
            _bulk_insert(conn, table, [row for _, row in changed], constants)
            log.info("monitor: %s: %d of %d rows written (%d deleted)", table.name,
                     len(changed), len(rows), len(doomed))
            return
    conn.execute(table.delete().where(mine))
    _bulk_insert(conn, table, rows, constants)
    if STORE_CHANGES_ONLY:
        log.info("monitor: %s: all %d rows written (%s)", table.name, len(rows),
                 "a new run" if moved else f"{len(changed)} changed")


def _bulk_insert(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]],
                 constants: dict[str, Any]) -> None:
    """Insert ``rows`` (plus ``constants`` in every row) in the connection's transaction.

    PostgreSQL (psycopg) uses COPY; SQLite the driver's executemany, without SQLAlchemy's
    per-row bind processing (which cost more than the insert itself). A key missing from a
    row is stored as NULL.
    """
    if not rows:
        return
    fixed = [c.name for c in table.columns if c.name in constants]
    varying = [c.name for c in table.columns if c.name not in constants]
    columns = varying + fixed
    dialect = conn.dialect
    copy = _copies(conn)
    raw_sqlite = dialect.name == "sqlite" and not any(
        isinstance(table.c[c].type, sa.Date | sa.DateTime) for c in varying
    )
    tail = tuple(constants[c] for c in fixed)
    if raw_sqlite:  # dates as SQLAlchemy stores them on SQLite (ISO text)
        tail = tuple(v.isoformat() if isinstance(v, date) else v for v in tail)
    get = operator.itemgetter(*varying)
    try:
        values = [(*get(row), *tail) for row in rows]
    except KeyError:
        values = [(*(row.get(c) for c in varying), *tail) for row in rows]
    if copy:
        driver = conn.connection.driver_connection
        with driver.cursor() as cursor, cursor.copy(
            f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
        ) as stream:
            for row in values:
                stream.write_row(row)
    elif raw_sqlite:
        # Identifiers are the schema's own table and column names; every value is bound.
        sql = (f"INSERT INTO {table.name} ({', '.join(columns)}) "  # noqa: S608
               f"VALUES ({', '.join('?' for _ in columns)})")
        conn.exec_driver_sql(sql, values)
    else:
        conn.execute(table.insert(), [dict(zip(columns, row, strict=True)) for row in values])


def _as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])
