"""Funnel plots: every site's event proportion against exact binomial limits around the baseline.

Why this module exists
----------------------
A CUSUM watches each site over time; a funnel plot compares all sites over the same window
(e.g. the last 365 days) in one picture, with control limits that widen for small sites so
that volume is not mistaken for performance (Spiegelhalter 2005, "Funnel plots for comparing
institutional performance", Stat Med 24:1185). Exact p-values per site, with
Benjamini-Hochberg false-discovery control across sites *and* metrics, turn the picture into
a list of sites worth a look.

Limits (no overdispersion): exact binomial with Spiegelhalter's interpolation
-------------------------------------------------------------------------------
For ``n`` cases at baseline ``p0`` and a tail probability ``q`` (``0.001``/``0.999`` for the
two-sided 99.8 % limits, ``0.025``/``0.975`` for 95 %), let ``r`` be the binomial ``q``-quantile
(``scipy.stats.binom.ppf``: the smallest ``r`` with ``F(r) >= q``) and interpolate for
discreteness (Spiegelhalter 2005, appendix A.1.1)::

    alpha = (F(r) - q) / (F(r) - F(r - 1)),   limit = (r - alpha) / n

so the plotted limits are smooth in ``n`` while matching the exact quantiles at whole counts.

Overdispersion (optional)
-------------------------
``z_i = (y_i - p0) / sqrt(p0 (1 - p0) / n_i)``. The z-scores are Winsorised at 10 % in each
tail and ``phi = mean(z_w^2)``. If ``I * phi`` is not above ``I - 1`` (``I`` sites) no
inflation is applied. Otherwise:

* ``"multiplicative"``: limits ``p0 +/- z_q sqrt(phi p0 (1 - p0) / n)``, adjusted z ``z / sqrt(phi)``;
* ``"additive"`` (random effects): ``tau^2 = (I phi - (I - 1)) / (sum w - sum w^2 / sum w)``
  with ``w = 1 / s^2``, ``s^2 = p0 (1 - p0) / n``; limits ``p0 +/- z_q sqrt(s^2 + tau^2)``,
  adjusted z ``(y - p0) / sqrt(s^2 + tau^2)``.

Inflated limits use the normal approximation, as in Spiegelhalter (2005).

P-values and false discovery
----------------------------
Per site exact binomial tail probabilities: ``p_upper = P(X >= x) = binom.sf(x - 1, n, p0)``
(deterioration), ``p_lower = P(X <= x) = binom.cdf(x, n, p0)`` (under-reporting) and the
two-sided ``min(1, 2 min(p_upper, p_lower))``. :func:`false_discovery_control` applies
``statsmodels.stats.multitest.multipletests(p, alpha, method="fdr_bh")`` to any array of
p-values (pass sites x metrics together) and returns the method name with the result; the
tail probabilities and ``fdr_bh`` are computed by :mod:`pipelines.surveillance.distributions`
(the same values, without importing ``scipy.stats`` and statsmodels into the monitor).

Public API
----------
``binomial_limits(n, p0, probability) -> array`` (proportion limit at one tail probability)
``funnel(events, n, p0, *, coverages=(0.95, 0.998), overdispersion="none",
winsor=0.1) -> FunnelResult``
``funnel_curves(p0, n_max, *, n_min=1, n_points=200, coverages=(0.95, 0.998), phi=1.0,
tau2=0.0, overdispersion="none") -> dict[str, np.ndarray]``
``estimate_overdispersion(z, n, p0, *, winsor=0.1) -> Overdispersion``
``exact_binomial_pvalues(events, n, p0) -> (p_upper, p_lower, p_two_sided)``
``false_discovery_control(pvalues, alpha=0.05, method="fdr_bh") -> FdrResult``
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.surveillance.distributions import binom_cdf, binom_sf, fdr_bh

# The limits live in a light module the report shares (one implementation, no scipy.stats).
from pipelines.surveillance.exact_limits import binomial_limits, coverage_limits, funnel_curves

__all__ = [
    "FdrResult",
    "FunnelResult",
    "Overdispersion",
    "binomial_limits",
    "estimate_overdispersion",
    "exact_binomial_pvalues",
    "false_discovery_control",
    "funnel",
    "funnel_curves",
    "one_sided_pvalue",
]

OVERDISPERSION_MODES = ("none", "multiplicative", "additive")


@dataclass(frozen=True)
class Overdispersion:
    """Winsorised overdispersion estimate and the inflation it implies."""

    phi: float
    tau2: float
    n_sites: int
    overdispersed: bool


@dataclass(frozen=True)
class FunnelResult:
    """Per-site funnel statistics; ``limits[coverage] = (lower, upper)`` proportions per site."""

    events: np.ndarray
    n: np.ndarray
    proportion: np.ndarray
    expected: np.ndarray
    p0: float
    z: np.ndarray
    z_adjusted: np.ndarray
    limits: dict[float, tuple[np.ndarray, np.ndarray]]
    above: dict[float, np.ndarray]
    below: dict[float, np.ndarray]
    p_upper: np.ndarray
    p_lower: np.ndarray
    p_two_sided: np.ndarray
    overdispersion_mode: str
    overdispersion: Overdispersion


@dataclass(frozen=True)
class FdrResult:
    """Benjamini-Hochberg (or another named) decision per p-value, in the input's shape."""

    reject: np.ndarray
    q_values: np.ndarray
    alpha: float
    method: str


def exact_binomial_pvalues(events, n, p0: float):
    """Return exact one-sided upper, lower and two-sided binomial p-values per site."""
    events = np.asarray(events, dtype=float)
    n = np.asarray(n, dtype=float)
    _check_counts(events, n)
    p_upper = binom_sf(events - 1, n, p0)
    p_lower = binom_cdf(events, n, p0)
    p_two = np.minimum(1.0, 2.0 * np.minimum(p_upper, p_lower))
    empty = n == 0
    for array in (p_upper, p_lower, p_two):
        array[empty] = np.nan
    return p_upper, p_lower, p_two


def one_sided_pvalue(events, n, p0: float, direction: str) -> np.ndarray:
    """Return :func:`exact_binomial_pvalues`' upper (``"up"``) or lower p-values alone.

    The same arithmetic on the same arrays, without the other side and the two-sided
    values: the monitor's funnel decision needs one side per direction.
    """
    events = np.asarray(events, dtype=float)
    n = np.asarray(n, dtype=float)
    _check_counts(events, n)
    p_value = binom_sf(events - 1, n, p0) if direction == "up" else binom_cdf(events, n, p0)
    p_value[n == 0] = np.nan
    return p_value


def estimate_overdispersion(z, n, p0: float, *, winsor: float = 0.1) -> Overdispersion:
    """Estimate phi from Winsorised z-scores and the additive tau^2 (Spiegelhalter 2005)."""
    z = np.asarray(z, dtype=float)
    n = np.asarray(n, dtype=float)
    usable = np.isfinite(z) & (n > 0)
    z, n = z[usable], n[usable]
    sites = int(z.size)
    if sites < 2:
        return Overdispersion(phi=1.0, tau2=0.0, n_sites=sites, overdispersed=False)
    low, high = np.quantile(z, [winsor, 1.0 - winsor])
    z_w = np.clip(z, low, high)
    phi = float(np.mean(z_w**2))
    overdispersed = sites * phi > sites - 1
    tau2 = 0.0
    if overdispersed:
        w = n / (p0 * (1.0 - p0))
        tau2 = float(max(0.0, (sites * phi - (sites - 1)) / (w.sum() - (w**2).sum() / w.sum())))
    return Overdispersion(phi=phi, tau2=tau2, n_sites=sites, overdispersed=bool(overdispersed))


def funnel(
    events,
    n,
    p0: float,
    *,
    coverages=(0.95, 0.998),
    overdispersion: str = "none",
    winsor: float = 0.1,
) -> FunnelResult:
    """Return funnel statistics for every site: z-scores, limits, exact p-values and flags."""
    if overdispersion not in OVERDISPERSION_MODES:
        raise ValueError(f"overdispersion must be one of {OVERDISPERSION_MODES}")
    events = np.asarray(events, dtype=float)
    n = np.asarray(n, dtype=float)
    _check_counts(events, n)
    _check_p0(p0)
    with np.errstate(invalid="ignore", divide="ignore"):
        proportion = np.where(n > 0, events / np.where(n > 0, n, 1.0), np.nan)
        s2 = p0 * (1.0 - p0) / n
        z = np.where(n > 0, (proportion - p0) / np.sqrt(s2), np.nan)
    od = estimate_overdispersion(z, n, p0, winsor=winsor)
    mode = overdispersion if od.overdispersed else "none"
    with np.errstate(invalid="ignore", divide="ignore"):
        if mode == "multiplicative":
            z_adjusted = z / np.sqrt(od.phi)
        elif mode == "additive":
            z_adjusted = (proportion - p0) / np.sqrt(s2 + od.tau2)
        else:
            z_adjusted = z.copy()
    limits, above, below = {}, {}, {}
    for coverage in coverages:
        lower, upper = coverage_limits(n, p0, coverage, mode, od.phi, od.tau2)
        limits[coverage] = (lower, upper)
        above[coverage] = proportion > upper
        below[coverage] = proportion < lower
    p_upper, p_lower, p_two = exact_binomial_pvalues(events, n, p0)
    return FunnelResult(
        events=events,
        n=n,
        proportion=proportion,
        expected=n * p0,
        p0=float(p0),
        z=z,
        z_adjusted=z_adjusted,
        limits=limits,
        above=above,
        below=below,
        p_upper=p_upper,
        p_lower=p_lower,
        p_two_sided=p_two,
        overdispersion_mode=mode,
        overdispersion=od,
    )


def false_discovery_control(pvalues, alpha: float = 0.05, method: str = "fdr_bh") -> FdrResult:
    """Apply ``multipletests(method=...)`` to all finite p-values; NaN entries are never rejected."""
    pvalues = np.asarray(pvalues, dtype=float)
    flat = pvalues.ravel()
    finite = np.isfinite(flat)
    reject = np.zeros(flat.shape, dtype=bool)
    q_values = np.full(flat.shape, np.nan)
    if finite.any():
        if method == "fdr_bh":  # the monitor's: computed here, as statsmodels does
            decided, corrected = fdr_bh(flat[finite], alpha)
        else:
            from statsmodels.stats.multitest import multipletests

            decided, corrected, _, _ = multipletests(flat[finite], alpha=alpha, method=method)
        reject[finite] = decided
        q_values[finite] = corrected
    return FdrResult(
        reject=reject.reshape(pvalues.shape),
        q_values=q_values.reshape(pvalues.shape),
        alpha=float(alpha),
        method=method,
    )


def _check_counts(events, n) -> None:
    if events.shape != n.shape:
        raise ValueError("events and n must have the same shape")
    if np.any(n < 0) or np.any(events < 0) or np.any(events > n):
        raise ValueError("counts must satisfy 0 <= events <= n")


def _check_p0(p0: float) -> None:
    if not 0 < p0 < 1:
        raise ValueError("p0 must be strictly between 0 and 1")
