"""Funnel limits: exact binomial limits and the curves drawn from them, light to import.

One implementation for the monitor (:mod:`pipelines.surveillance.funnel`, which decides
signals with these limits) and the report (which draws them on every site page): the
report draws its funnels before its worker processes fork, so whatever this module imports
is paid serially, and ``scipy.stats`` (1-2 s to import on a busy machine) is not needed.
The binomial quantile and distribution function are evaluated by the ufuncs that
``scipy.stats.binom.ppf`` and ``.cdf`` call for these arguments (``0 < q < 1``,
``0 < p0 < 1``, whole ``n``), so the limits are ``scipy.stats``'s bit for bit
(``tests/test_funnel.py`` checks them against ``scipy.stats.binom``).

The exact limit at tail probability ``q`` is Spiegelhalter's interpolated binomial quantile:
``r`` the ``q`` quantile of Binomial(n, p0), ``alpha = (F(r) - q) / (F(r) - F(r - 1))`` and
the limit ``(r - alpha) / n``. With overdispersion the limits are normal,
``p0 +/- z_q sqrt(phi p0 (1 - p0) / n)`` (multiplicative) or
``p0 +/- z_q sqrt(p0 (1 - p0) / n + tau2)`` (additive).
"""

from __future__ import annotations

import numpy as np

# scipy.special is imported where it is used: commands that import the report package but
# draw no funnel (``kyphowatch sites``, 0.2 s of a 1 s budget) do not pay for it.

__all__ = ["binomial_limits", "funnel_curves", "normal_limits"]


def _binomial_cdf(k: np.ndarray, n: np.ndarray, p0: float) -> np.ndarray:
    """Return ``scipy.stats.binom.cdf(k, n, p0)`` for whole ``n``: 0 below 0, 1 from ``n`` on."""
    from scipy.special import _ufuncs as binom_ufuncs  # what scipy.stats.binom evaluates with

    k, n = np.broadcast_arrays(np.asarray(k, dtype=float), np.asarray(n, dtype=float))
    out = np.where(k >= n, 1.0, 0.0)
    inside = (k >= 0) & (k < n)
    out[inside] = np.clip(binom_ufuncs._binom_cdf(np.floor(k[inside]), n[inside], p0), 0, 1)
    return out


def binomial_limits(n, p0: float, probability: float) -> np.ndarray:
    """Return the interpolated exact binomial limit (as a proportion) at tail ``probability``.

    ``n`` holds whole numbers of units; the limit is NaN where ``n`` is 0.
    """
    n = np.asarray(n, dtype=float)
    _check_p0(p0)
    if not 0 < probability < 1:
        raise ValueError("probability must be strictly between 0 and 1")
    from scipy.special import _ufuncs as binom_ufuncs

    with np.errstate(invalid="ignore", divide="ignore"):
        r = binom_ufuncs._binom_ppf(probability, n, p0) + 0.0
        f_r = _binomial_cdf(r, n, p0)
        f_below = _binomial_cdf(r - 1, n, p0)
        step = f_r - f_below
        alpha = np.where(step > 0, (f_r - probability) / np.where(step > 0, step, 1.0), 0.0)
        limit = (r - alpha) / n
    limit = np.clip(limit, 0.0, 1.0)
    return np.where(n > 0, limit, np.nan)


def normal_limits(n, p0: float, tail: float, mode: str, phi: float = 1.0,
                  tau2: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Return the (lower, upper) normal limits at ``tail`` for an overdispersion ``mode``.

    ``multiplicative`` widens the binomial variance by ``phi``, ``additive`` adds ``tau2``;
    NaN where ``n`` is 0.
    """
    from scipy import special

    n = np.asarray(n, dtype=float)
    z_q = -special.ndtri(tail)  # scipy.stats.norm.isf(tail)
    with np.errstate(invalid="ignore", divide="ignore"):
        s2 = p0 * (1.0 - p0) / n
        spread = np.sqrt(phi * s2) if mode == "multiplicative" else np.sqrt(s2 + tau2)
    lower = np.where(n > 0, np.clip(p0 - z_q * spread, 0.0, 1.0), np.nan)
    upper = np.where(n > 0, np.clip(p0 + z_q * spread, 0.0, 1.0), np.nan)
    return lower, upper


def coverage_limits(n, p0: float, coverage: float, mode: str, phi: float = 1.0,
                    tau2: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Return the (lower, upper) limits holding ``coverage`` of in-control sites of size ``n``."""
    if not 0 < coverage < 1:
        raise ValueError("coverage must be strictly between 0 and 1")
    tail = (1.0 - coverage) / 2.0
    if mode == "none":
        return binomial_limits(n, p0, tail), binomial_limits(n, p0, 1.0 - tail)
    return normal_limits(n, p0, tail, mode, phi, tau2)


def funnel_curves(
    p0: float,
    n_max: float,
    *,
    n_min: float = 1,
    n_points: int = 200,
    coverages=(0.95, 0.998),
    phi: float = 1.0,
    tau2: float = 0.0,
    overdispersion: str = "none",
) -> dict[str, np.ndarray]:
    """Return the funnel curves for plotting: key ``"n"`` and ``"lower_<c>"``/``"upper_<c>"``.

    The grid is geometric from ``n_min`` to ``n_max`` (whole numbers, de-duplicated) and the
    coverage label is the percentage, e.g. ``upper_99.8``.
    """
    _check_p0(p0)
    grid = np.unique(np.round(np.geomspace(max(1, n_min), max(n_min, n_max), n_points)))
    curves = {"n": grid}
    for coverage in coverages:
        lower, upper = coverage_limits(grid, p0, coverage, overdispersion, phi, tau2)
        label = f"{100 * coverage:g}"
        curves[f"lower_{label}"] = lower
        curves[f"upper_{label}"] = upper
    return curves


def _check_p0(p0: float) -> None:
    if not 0 < p0 < 1:
        raise ValueError("p0 must be strictly between 0 and 1")
