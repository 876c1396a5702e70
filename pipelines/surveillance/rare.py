"""Rare and sentinel events: the rules that work where a CUSUM cannot.

Why this module exists
----------------------
Major complications of balloon kyphoplasty are rare (NICE HTG108 section 2.4.4: 33 in 50,000
procedures, about 1 in 1,500). A site doing 200 procedures a year expects one such event every
~7.6 years, so a chart tuned to a tolerable false-alarm rate needs several events to move and
reacts years late (``benchmarks/bench_detection.py`` shows this). Two rules replace it:

* **Sentinel rule** -- any death, paralysis or cord compression is a signal at once, whatever
  the rate: each one warrants review (:func:`sentinel_mask`).
* **Exact one-sided tests** over a rolling window, per site and network-wide, against the
  baseline rate: ``P(X >= x)`` under ``Poisson(n p0)`` (:func:`poisson_upper_pvalue`) and under
  ``Binomial(n, p0)`` (:func:`binomial_upper_pvalue`). The binomial is exact for a per-procedure
  risk; the Poisson is its standard rare-event approximation and also serves person-time
  denominators. Thresholds come from a stated one-sided ``alpha`` (the profile's
  ``rare.alpha``), never from a hand-picked count.

Mid-p
-----
With ``mid_p=True`` the p-value is ``P(X > x) + P(X = x) / 2`` (Lancaster's mid-p). Exact
discrete tests are conservative (attained size below alpha); mid-p is closer to nominal on
average but can exceed alpha, so the default is the ordinary exact p-value and mid-p is
reported only when asked for.

Public API
----------
``MAJOR_EVENT_RATE = 33 / 50_000``; ``SENTINEL_EVENT_TYPES = ("death", "paralysis",
"cord_compression")``
``sentinel_mask(event_types, sentinel_types=SENTINEL_EVENT_TYPES) -> bool array``
``poisson_upper_pvalue(observed, expected, *, mid_p=False) -> array``
``binomial_upper_pvalue(events, n, p0, *, mid_p=False) -> array``
``critical_event_count(n, p0, alpha) -> array`` (smallest count that signals)
``rare_event_tests(events, n, p0=MAJOR_EVENT_RATE, *, alpha=0.001, mid_p=False) -> RareEventResult``
(per site and network-wide)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pipelines.surveillance.distributions import (
    binom_isf,
    binom_pmf,
    binom_sf,
    poisson_pmf,
    poisson_sf,
)

__all__ = [
    "MAJOR_EVENT_RATE",
    "SENTINEL_EVENT_TYPES",
    "RareEventResult",
    "binomial_upper_pvalue",
    "critical_event_count",
    "poisson_upper_pvalue",
    "rare_event_tests",
    "sentinel_mask",
]

# NICE HTG108 section 2.4.4: 33 major complications in 50,000 procedures.
MAJOR_EVENT_RATE = 33 / 50_000
SENTINEL_EVENT_TYPES = ("death", "paralysis", "cord_compression")


@dataclass(frozen=True)
class RareEventResult:
    """Per-site and network-wide exact upper-tail tests against a baseline rate."""

    events: np.ndarray
    n: np.ndarray
    expected: np.ndarray
    p_binomial: np.ndarray
    p_poisson: np.ndarray
    signal: np.ndarray
    network_events: int
    network_n: int
    network_expected: float
    network_p_binomial: float
    network_p_poisson: float
    network_signal: bool
    p0: float
    alpha: float
    mid_p: bool


def sentinel_mask(event_types, sentinel_types: Iterable[str] = SENTINEL_EVENT_TYPES) -> np.ndarray:
    """Return True for every event row whose type is a sentinel event (signal at once)."""
    values = np.asarray(event_types).astype(str)
    wanted = sorted({str(kind).strip().lower() for kind in sentinel_types})
    if values.size == 0:
        return np.zeros(values.shape, dtype=bool)
    return np.isin(np.char.lower(np.char.strip(values)), wanted)


def poisson_upper_pvalue(observed, expected, *, mid_p: bool = False) -> np.ndarray:
    """Return P(X >= observed) for X ~ Poisson(expected), or the mid-p version."""
    observed = np.asarray(observed, dtype=float)
    expected = np.asarray(expected, dtype=float)
    if np.any(observed < 0) or np.any(expected < 0):
        raise ValueError("counts and expected values must not be negative")
    if mid_p:
        return poisson_sf(observed, expected) + 0.5 * poisson_pmf(observed, expected)
    return poisson_sf(observed - 1, expected)


def binomial_upper_pvalue(events, n, p0: float, *, mid_p: bool = False) -> np.ndarray:
    """Return P(X >= events) for X ~ Binomial(n, p0), or the mid-p version; NaN where n == 0."""
    events = np.asarray(events, dtype=float)
    n = np.asarray(n, dtype=float)
    if np.any(n < 0) or np.any(events < 0) or np.any(events > n):
        raise ValueError("counts must satisfy 0 <= events <= n")
    if not 0 < p0 < 1:
        raise ValueError("p0 must be strictly between 0 and 1")
    if mid_p:
        p = binom_sf(events, n, p0) + 0.5 * binom_pmf(events, n, p0)
    else:
        p = binom_sf(events - 1, n, p0)
    return np.where(n > 0, p, np.nan)


def critical_event_count(n, p0: float, alpha: float) -> np.ndarray:
    """Return the smallest event count whose exact binomial upper p-value is <= ``alpha``."""
    if not 0 < alpha < 1:
        raise ValueError("alpha must be strictly between 0 and 1")
    return binom_isf(alpha, np.asarray(n, dtype=float), p0) + 1.0


def rare_event_tests(
    events,
    n,
    p0: float = MAJOR_EVENT_RATE,
    *,
    alpha: float = 0.001,
    mid_p: bool = False,
) -> RareEventResult:
    """Test every site and the whole network for more events than the baseline rate allows."""
    events = np.asarray(events, dtype=np.int64)
    n = np.asarray(n, dtype=np.int64)
    if events.shape != n.shape:
        raise ValueError("events and n must have the same shape")
    expected = n * p0
    p_binomial = binomial_upper_pvalue(events, n, p0, mid_p=mid_p)
    p_poisson = np.where(n > 0, poisson_upper_pvalue(events, expected, mid_p=mid_p), np.nan)
    network_events, network_n = int(events.sum()), int(n.sum())
    network_p_binomial = (
        float(binomial_upper_pvalue(network_events, network_n, p0, mid_p=mid_p))
        if network_n
        else float("nan")
    )
    network_p_poisson = (
        float(poisson_upper_pvalue(network_events, network_n * p0, mid_p=mid_p))
        if network_n
        else float("nan")
    )
    return RareEventResult(
        events=events,
        n=n,
        expected=expected,
        p_binomial=p_binomial,
        p_poisson=p_poisson,
        signal=np.nan_to_num(p_binomial, nan=1.0) <= alpha,
        network_events=network_events,
        network_n=network_n,
        network_expected=float(network_n * p0),
        network_p_binomial=network_p_binomial,
        network_p_poisson=network_p_poisson,
        network_signal=bool(network_p_binomial <= alpha),
        p0=float(p0),
        alpha=float(alpha),
        mid_p=bool(mid_p),
    )
