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
import operator
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from scipy import stats

from pipelines.db import make_engine, redact_url
from pipelines.errors import ExternalSystemError
from pipelines.schema import chart_status, monitor_run, signal, site_month_metric
from pipelines.settings import Settings
from pipelines.surveillance import cusum, funnel, pchart, rare
from pipelines.surveillance.arl import threshold_for_arl, threshold_for_arl_risk_adjusted
from pipelines.surveillance.outcomes import (
    Snapshot,
    day_to_date,
    derive_outcomes,
    latest_procedure_date,
    load_snapshot,
    process_outcomes,
    sentinel_events,
)
from pipelines.surveillance.profile import Metric, Profile, load_profile
from pipelines.surveillance.risk_model import RiskModel, fit_risk_model

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


# Simulation size for risk-adjusted thresholds: the standard error of the simulated ARL0 is
# about 2% at 2,000 runs. The seed is fixed so the same data give the same threshold.
RA_THRESHOLD_RUNS = 2000
RA_THRESHOLD_SEED = 20000441  # Steiner et al. (2000), Biostatistics 1:441

_ra_threshold_cache: dict[tuple[str, float, float], float] = {}


def risk_adjusted_threshold(risks: np.ndarray, odds_ratio: float, arl0: float) -> float:
    """Return h for the risk-adjusted CUSUM at the in-control ARL0, for this case mix.

    With heterogeneous expected risks the in-control run length of a Steiner CUSUM differs
    from the flat chart's at the mean risk, so h is found by simulation over the fitted
    risks themselves (:func:`pipelines.surveillance.arl.threshold_for_arl_risk_adjusted`).
    Cached per distinct risk array within the process.
    """
    digest = hashlib.sha256(np.ascontiguousarray(risks, dtype=np.float64).tobytes()).hexdigest()
    key = (digest, float(odds_ratio), float(arl0))
    if key not in _ra_threshold_cache:
        _ra_threshold_cache[key] = float(threshold_for_arl_risk_adjusted(
            risks, odds_ratio, arl0, n_runs=RA_THRESHOLD_RUNS, seed=RA_THRESHOLD_SEED,
        ))
    return _ra_threshold_cache[key]


@lru_cache(maxsize=256)
def cached_threshold(p0: float, odds_ratio: float, arl0: float, direction: str) -> float:
    """Return ``threshold_for_arl`` for a design, computed once per process."""
    return float(threshold_for_arl(p0, odds_ratio, arl0, direction))


def exact_interval(events, n, level: float = INTERVAL_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Return the Clopper-Pearson (exact) interval for events/n, elementwise (NaN where n = 0)."""
    events = np.asarray(events, dtype=float)
    n = np.asarray(n, dtype=float)
    tail = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(events > 0, stats.beta.ppf(tail, events, n - events + 1), 0.0)
        high = np.where(events < n, stats.beta.ppf(1.0 - tail, events + 1, n - events), 1.0)
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


@dataclass
class MonitorResult:
    """Everything one monitor run derived; ``to_dict()`` is the JSON form."""

    run_key: str
    as_of: date | None
    profile_name: str
    profile_version: str
    data_fingerprint: str
    signals: list[dict[str, Any]] = field(default_factory=list)
    new_signal_keys: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    site_metrics: list[dict[str, Any]] = field(default_factory=list)
    # Mature units, events and expected events per site, metric and index month (the
    # ``site_month_metric`` table; not part of to_dict()).
    site_months: list[dict[str, Any]] = field(default_factory=list, repr=False)
    # Chart series for the report (arrays; not part of to_dict()).
    charts: dict[str, Any] = field(default_factory=dict, repr=False)
    persisted: bool = False
    seconds: float = 0.0

    @property
    def active_signals(self) -> list[dict[str, Any]]:
        """Return the signals present in this run (all of ``signals``)."""
        return [s for s in self.signals if s.get("active", True)]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (dates as ISO strings, detail decoded)."""

        def clean(row: dict[str, Any]) -> dict[str, Any]:
            out = {}
            for key, value in row.items():
                if isinstance(value, date):
                    out[key] = value.isoformat()
                elif key == "detail" and isinstance(value, str):
                    out[key] = json.loads(value)
                else:
                    out[key] = value
            return out

        return {
            "run_key": self.run_key,
            "as_of": self.as_of.isoformat() if self.as_of else None,
            "profile": {"name": self.profile_name, "version": self.profile_version},
            "data_fingerprint": self.data_fingerprint,
            "persisted": self.persisted,
            "signals": [clean(s) for s in self.signals],
            "new_signal_keys": list(self.new_signal_keys),
            "summary": self.summary,
            "models": self.models,
            "site_metrics": [clean(m) for m in self.site_metrics],
        }


class _Builder:
    """Collect signal rows for one computation."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, metric: Metric, site: str, method: str, direction: str, episode_start: date,
            signal_date: date, *, observed: float | None, n: int | None,
            expected: float | None, statistic: float | None, threshold: float | None,
            p_value: float | None = None, detail: dict[str, Any] | None = None) -> None:
        key = signal_key(self.profile.name, site, metric.id, method, direction, episode_start)
        ci_low = ci_high = None
        if observed is not None and n:
            low, high = exact_interval(observed, n)
            ci_low, ci_high = _finite(low), _finite(high)
        self.rows[key] = {
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
            "ci_low": ci_low,
            "ci_high": ci_high,
            "statistic": _finite(statistic),
            "threshold": _finite(threshold),
            "p_value": _finite(p_value),
            "baseline": float(metric.baseline.rate),
            "citation": metric.citation,
            "profile_name": self.profile.name,
            "profile_version": self.profile.version,
            "detail": json.dumps(detail or {}, sort_keys=True, default=_json_default),
        }

    def sorted_rows(self) -> list[dict[str, Any]]:
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


def _month_labels(day: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Return (month index per day, 'YYYY-MM' label per month index) for epoch days."""
    months = np.asarray(day, dtype=np.int64).astype("datetime64[D]").astype("datetime64[M]")
    codes = months.astype(np.int64)
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

    def __init__(self, profile: Profile, snapshot: Snapshot) -> None:
        self.profile = profile
        self.snapshot = snapshot
        self.as_of_day = snapshot.as_of_day
        self.sites = [str(s) for s in snapshot.procedures["site_id"].cat.categories]
        self.site_code = {site: i for i, site in enumerate(self.sites)}
        first = int(snapshot.procedures["procedure_day"].min()) if len(snapshot.procedures) else (
            self.as_of_day)
        self.eval_days = _evaluation_days(first, self.as_of_day)
        self.builder = _Builder(profile)
        self.models: dict[str, Any] = {}
        self.summary: dict[str, Any] = {"metrics": {}}
        self.site_metrics: dict[tuple[str, str], dict[str, Any]] = {}
        self.site_months: list[dict[str, Any]] = []
        self.charts: dict[str, Any] = {"cusum": {}, "funnel": {}, "pchart": {}}
        # funnel rows to be decided together (FDR across sites and metrics)
        self.funnel_tests: list[dict[str, Any]] = []

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
        cell = group.astype(np.int64) * len(labels) + month
        cells, inverse = np.unique(cell, return_inverse=True)
        units = np.bincount(inverse).tolist()
        events = np.rint(np.bincount(inverse, weights=y)).astype(np.int64).tolist()
        expect = np.bincount(inverse, weights=expected).tolist()
        site = [self.sites[c] for c in (cells // len(labels)).tolist()]
        month = [labels[c] for c in (cells % len(labels)).tolist()]
        baseline = float(metric.baseline.rate)
        denominator = metric.denominator or "procedure"
        # Computed here, not in the view: SQL that turns a date into text depends on the
        # PostgreSQL session's DateStyle.
        as_of_month = int(np.datetime64(int(self.as_of_day), "D").astype("datetime64[M]")
                          .astype(np.int64))
        self.site_months.extend(
            {"site_id": s, "metric": metric.id, "month": m, "denominator": denominator,
             "units": u, "events": e, "expected": x, "baseline": baseline,
             "months_before_as_of": as_of_month - ((int(m[:4]) - 1970) * 12 + int(m[5:7]) - 1)}
            for s, m, u, e, x in zip(site, month, units, events, expect, strict=True)
        )

    # -- outcome metrics ------------------------------------------------------------------
    def outcome_metric(self, metric: Metric) -> None:
        units = derive_outcomes(self.snapshot, metric)
        p0 = metric.baseline.rate
        group = units["site_code"].to_numpy(np.int64)
        y = units["y"].to_numpy(np.int64)
        day = units["index_day"].to_numpy(np.int64)
        n_sites = len(self.sites)
        n_per_site = np.bincount(group, minlength=n_sites)
        events_per_site = np.bincount(group, weights=y, minlength=n_sites)
        expected_risk = np.full(len(units), p0)
        model: RiskModel | None = None
        if "ra_cusum" in metric.methods:
            model = fit_risk_model(metric.id, units, p0,
                                   min_events=self.profile.design.risk_min_events)
            self.models[metric.id] = model.to_dict()
            expected_risk = model.predict(units)
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
            "mature_units": int(len(units)), "events": int(y.sum()),
            "rate": _finite(y.mean()) if len(units) else None,
            "risk_model": model.kind if model else None,
        }
        detect = metric.detect
        assert detect is not None
        for direction in detect.directions:
            odds_ratio = detect.odds_ratio if direction == "up" else 1.0 / detect.odds_ratio
            if "bernoulli_cusum" in metric.methods:
                self._cusum(metric, "bernoulli_cusum", direction, odds_ratio, units, group, y,
                            day, np.full(len(units), p0))
            if "ra_cusum" in metric.methods and direction == "up":
                self._cusum(metric, "ra_cusum", direction, odds_ratio, units, group, y, day,
                            expected_risk)
        if "funnel" in metric.methods:
            self._funnel_prepare(metric, group, y, day)
        if "pchart" in metric.methods:
            self._pchart(metric, group, y, day)
        if "rare" in metric.methods:
            self._rare(metric, group, y, day)

    def _cusum(self, metric: Metric, method: str, direction: str, odds_ratio: float,
               units: pd.DataFrame, group: np.ndarray, y: np.ndarray, day: np.ndarray,
               risk: np.ndarray) -> None:
        detect = metric.detect
        p0 = metric.baseline.rate
        risk_varies = method == "ra_cusum" and len(risk) and float(np.ptp(risk)) > 0
        if risk_varies:
            h = risk_adjusted_threshold(risk, odds_ratio, detect.arl0)
            threshold_method = f"simulation over the fitted risks ({RA_THRESHOLD_RUNS} runs)"
        else:
            h = cached_threshold(round(p0, 12), odds_ratio, detect.arl0, direction)
            threshold_method = "Markov chain at the baseline"
        n_sites = len(self.sites)
        result = cusum.grouped_cusum(group, y, risk, odds_ratio, h, n_groups=n_sites)
        stat = result.statistic
        signal_rows = result.signal_rows
        starts = np.searchsorted(group, np.arange(n_sites), side="left")
        label = f"{metric.id}:{method}:{direction}"
        self.charts["cusum"][label] = {
            "metric": metric.id, "method": method, "direction": direction, "h": h,
            "group": group, "day": day, "statistic": stat, "signal": result.signal,
            "sites": self.sites,
        }
        summary = result.summary
        for code, site in enumerate(self.sites):
            entry = self._site_entry(site, metric)
            entry.setdefault("cusum", {})[f"{method}_{direction}"] = {
                "value": _finite(summary.last_value[code]), "h": h,
                "signals": int(summary.n_signals[code]),
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
                metric, self.sites[code], method, direction, day_to_date(day[begin]),
                day_to_date(day[row]), observed=float(observed), n=n, expected=float(expected),
                statistic=float(stat[row]), threshold=h,
                detail={
                    "odds_ratio": odds_ratio, "arl0": detect.arl0,
                    "window_days": metric.window_days,
                    "detectable_on": day_to_date(day[row] + metric.window_days),
                    "risk_adjusted": method == "ra_cusum",
                    "threshold_method": threshold_method,
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

    def _funnel_prepare(self, metric: Metric, group, y, day) -> None:
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
                p_up, p_down, _ = funnel.exact_binomial_pvalues(
                    test["events"], test["n"], test["metric"].baseline.rate
                )
                test["pvals"] = {"up": p_up, "down": p_down}
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
                phi = np.ones(n_points)
                modes = ["none"] * n_points
                for j in sorted(candidates):
                    if not n[:, j].any():
                        continue
                    res = funnel.funnel(events[:, j], n[:, j], metric.baseline.rate,
                                        coverages=(0.95, limit), overdispersion="multiplicative")
                    outside["up"][:, j] = res.above[limit]
                    outside["down"][:, j] = res.below[limit]
                    z_adj[:, j] = res.z_adjusted
                    lower[:, j], upper[:, j] = res.limits[limit]
                    phi[j] = res.overdispersion.phi if res.overdispersion_mode != "none" else 1.0
                    modes[j] = res.overdispersion_mode
                test.update(outside=outside, z=z_adj, lower=lower, upper=upper, phi=phi,
                            modes=modes)
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

    def _pchart(self, metric: Metric, group, y, day) -> None:
        design = self.profile.design
        p0 = metric.baseline.rate
        alpha = (1.0 - design.pchart_limit) / 2.0
        months = day.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)
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
            res = pchart.pchart(events, n, p0, alpha, side=side)
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

    def _rare(self, metric: Metric, group, y, day) -> None:
        design = self.profile.design
        p0 = metric.baseline.rate
        mature = day + metric.window_days
        points = self.eval_days
        n_cum, e_cum = self._site_cumulative(group, y, mature, points)
        n_old, e_old = self._site_cumulative(group, y, mature, points - design.rare_rolling_days)
        n, events = n_cum - n_old, e_cum - e_old
        flagged = np.zeros(n.shape, bool)
        pvals = np.full(n.shape, np.nan)
        network = []
        for j in range(len(points)):
            res = rare.rare_event_tests(events[:, j], n[:, j], p0, alpha=design.rare_alpha)
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
                critical = rare.critical_event_count(n[code, j], p0, design.rare_alpha)
                self.builder.add(
                    metric, self.sites[code], "rare_exact", "up",
                    day_to_date(_month_start(points[first])), day_to_date(points[first]),
                    observed=float(events[code, j]), n=int(n[code, j]),
                    expected=float(n[code, j] * p0), statistic=float(events[code, j]),
                    threshold=_finite(critical), p_value=_finite(pvals[code, j]),
                    detail={
                        "test": "exact binomial, one-sided", "alpha": design.rare_alpha,
                        "rolling_days": design.rare_rolling_days,
                        "first_flagged": day_to_date(points[first]),
                        "last_flagged": day_to_date(points[j]), "ongoing": j == last,
                    },
                )

    # -- sentinel and process -------------------------------------------------------------
    def sentinel_metric(self, metric: Metric) -> None:
        events = sentinel_events(self.snapshot, metric)
        counts = events.groupby("site_id", observed=True).size() if len(events) else pd.Series(dtype=int)
        for site in self.sites:
            self._site_entry(site, metric)["events"] = int(counts.get(site, 0))
        self.summary["metrics"][metric.id] = {"events": int(len(events))}
        if events.empty:
            return
        for (site, event_day), rows in events.groupby(["site_id", "event_day"], sort=True, observed=True):
            types = rows["event_type"].value_counts().sort_index()
            self.builder.add(
                metric, site, "sentinel", "up", day_to_date(event_day), day_to_date(event_day),
                observed=float(len(rows)), n=None, expected=None, statistic=float(len(rows)),
                threshold=1.0,
                detail={"event_types": {str(k): int(v) for k, v in types.items()},
                        "rule": "any single event is a signal"},
            )

    def process_metric(self, metric: Metric) -> None:
        frame = process_outcomes(self.snapshot, metric)
        if frame.empty:
            return
        frame["month"] = frame["index_day"].to_numpy().astype("datetime64[D]").astype(
            "datetime64[M]")
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


def compute(profile: Profile, snapshot: Snapshot) -> _Computation:
    """Derive every signal, model and per-site figure for a snapshot (no database writes)."""
    work = _Computation(profile, snapshot)
    for metric in profile.metrics:
        if metric.kind == "outcome":
            work.outcome_metric(metric)
        elif metric.kind == "sentinel":
            work.sentinel_metric(metric)
        else:
            work.process_metric(metric)
    work.funnel_decide()
    return work


def run_key_for(as_of: date, profile: Profile, fingerprint: str) -> str:
    """Return the deterministic key of a run: hash(as_of, profile name and version, data)."""
    text = "|".join((as_of.isoformat(), profile.name, profile.version, fingerprint))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _open_engine(settings: Settings) -> sa.Engine:
    try:
        engine = make_engine(settings.db_url)
        with engine.connect() as conn:
            conn.execute(sa.select(1))
        return engine
    except sa.exc.SQLAlchemyError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExternalSystemError(
            f"cannot open warehouse {redact_url(settings.db_url)}: {first_line}"
        ) from exc


def evaluate(settings: Settings, as_of: date | None = None, *, persist: bool = False,
             profile: Profile | None = None) -> MonitorResult:
    """Compute the monitor for ``as_of`` (default: newest procedure date); optionally store it."""
    started = time.perf_counter()
    profile = profile or load_profile(settings.profile_path)
    engine = _open_engine(settings)
    try:
        with engine.connect() as conn:
            as_of = as_of or latest_procedure_date(conn)
            if as_of is None:
                log.info("monitor: the warehouse holds no procedures; nothing to monitor")
                return MonitorResult(run_key="", as_of=None, profile_name=profile.name,
                                     profile_version=profile.version, data_fingerprint="")
            snapshot = load_snapshot(conn, profile, as_of)
        loaded = time.perf_counter()
        work = compute(profile, snapshot)
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
        )
        if persist:
            _persist(engine, result, profile)
        result.seconds = time.perf_counter() - started
        log.info(
            "monitor %s as of %s: %d signals (%d new), %d procedures, %.2fs (read %.2fs)",
            profile.name, as_of, len(rows), len(result.new_signal_keys),
            len(snapshot.procedures), result.seconds, loaded - started,
        )
        return result
    finally:
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
             attempts: int = 3) -> None:
    """Record the run and upsert its signals by key; deactivate keys no longer derived.

    Also replaces the profile's current picture (``chart_status``, ``site_month_metric``)
    when this run is at least as new as the stored one.

    Two monitors racing on the same new key is resolved by retrying: the loser sees the
    row on its second attempt and updates it instead.
    """
    for attempt in range(1, attempts + 1):
        try:
            _persist_once(engine, result, profile)
            result.persisted = True
            return
        except sa.exc.IntegrityError:
            if attempt == attempts:
                raise
            log.warning("monitor: concurrent run wrote the same signals; retrying (%d)", attempt)


def _persist_once(engine: sa.Engine, result: MonitorResult, profile: Profile) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        stored = conn.execute(
            sa.select(signal.c.signal_key, signal.c.first_seen_run, signal.c.signal_date).where(
                signal.c.profile_name == result.profile_name
            )
        ).all()
        existing = {key: first_seen for key, first_seen, _ in stored}
        # A run for a past as_of (a rerun or backfill) cannot see episodes that signalled
        # later, so it must not deactivate them; only what it could have derived is judged.
        judged = {key for key, _, signal_date in stored if signal_date <= result.as_of}
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
        present = set()
        inserts, updates = [], []
        for row in result.signals:
            key = row["signal_key"]
            present.add(key)
            row["active"] = True
            row["last_seen_run"] = result.run_key
            if key in existing:
                row["first_seen_run"] = existing[key]
                updates.append({f"b_{f}": row[f] for f in (*_UPDATABLE, "signal_key")})
            else:
                row["first_seen_run"] = result.run_key
                inserts.append({f: row[f] for f in SIGNAL_FIELDS})
        if inserts:
            conn.execute(signal.insert(), inserts)
        if updates:
            conn.execute(
                signal.update()
                .where(signal.c.signal_key == sa.bindparam("b_signal_key"))
                .values({f: sa.bindparam(f"b_{f}") for f in _UPDATABLE}),
                updates,
            )
        gone = [key for key in judged if key not in present]
        for start in range(0, len(gone), 500):
            conn.execute(
                signal.update()
                .where(signal.c.signal_key.in_(gone[start:start + 500]), signal.c.active)
                .values(active=False)
            )
        result.new_signal_keys = sorted(row["signal_key"] for row in inserts)
        _replace_current_picture(conn, result, profile)


def _replace_current_picture(conn: sa.Connection, result: MonitorResult,
                             profile: Profile) -> None:
    """Replace the profile's ``chart_status`` and ``site_month_metric`` rows with this run's.

    Only when this run's as_of is on or after the stored one: a backfill for a past date
    must not overwrite newer figures. A rerun for the same as_of replaces them (corrections,
    or a new kyphowatch version deriving the status differently). Rows are deleted and bulk
    inserted (COPY on PostgreSQL): about 0.1 s for 13,500 monthly rows.
    """
    from pipelines.evidence import status_rows

    constants = {"profile_name": result.profile_name, "run_key": result.run_key,
                 "as_of": result.as_of, "profile_version": result.profile_version}
    for table in (chart_status, site_month_metric):
        mine = table.c.profile_name == result.profile_name
        stored = conn.execute(sa.select(sa.func.max(table.c.as_of)).where(mine)).scalar()
        if stored is not None and _as_date(stored) > result.as_of:
            log.info("monitor: %s holds as_of %s, newer than this run's %s; left unchanged",
                     table.name, stored, result.as_of)
            continue
        rows = status_rows(result, profile) if table is chart_status else result.site_months
        conn.execute(table.delete().where(mine))
        _bulk_insert(conn, table, rows, constants)


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
    copy = dialect.name == "postgresql" and dialect.driver == "psycopg"
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
