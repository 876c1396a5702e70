"""The distribution functions the monitor uses, without importing ``scipy.stats``.

Importing ``scipy.stats`` (and ``statsmodels.stats.multitest``, which imports it) costs
0.8-2.3 s of every monitor process, paid before the first row is read: a nightly monitor
spends about a tenth of its time there (issue 10). The monitor needs only a few functions of
three distributions and the Benjamini-Hochberg procedure. Each function here evaluates the
same ``scipy.special`` kernel that ``scipy.stats`` calls for it, with the same argument
checks, support edges and NaN results as ``scipy.stats``'s generic wrappers
(``rv_discrete.pmf/cdf/sf/ppf/isf`` and ``rv_continuous.ppf`` of SciPy 1.17), so the values are
``scipy.stats``'s bit for bit; :func:`fdr_bh` follows ``statsmodels.stats.multitest.
multipletests(method="fdr_bh")`` step by step. ``tests/test_distributions.py`` compares
every function with the library on grids that include the edges (``k`` outside the support,
``n`` = 0, ``p`` = 0 or 1, non-integer ``n``, NaN and infinite arguments, ``q`` = 0 or 1).

``scipy.special`` is imported inside the functions: a command that imports this module but
charts nothing does not pay for it.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "beta_ppf",
    "binom_cdf",
    "binom_isf",
    "binom_pmf",
    "binom_ppf",
    "binom_sf",
    "fdr_bh",
    "poisson_pmf",
    "poisson_ppf",
    "poisson_sf",
]


def _ufuncs():
    from scipy.special import _ufuncs  # the kernels scipy.stats.binom and .beta call

    return _ufuncs


def _finish(output: np.ndarray):
    """Return a 0-d result as a scalar, as scipy.stats does."""
    return output[()] if output.ndim == 0 else output


def _discrete_values(kind: str, x, args: tuple, support: tuple, valid, kernel):
    """``rv_discrete.pmf`` (``kind`` "pmf"), ``.cdf`` or ``.sf`` at ``x``.

    ``support`` is (a, b) broadcast with the arguments, ``valid`` the distribution's
    argument check, ``kernel(x, *args)`` its private function on the valid cells.
    """
    x = np.asarray(x)
    args = tuple(np.asarray(arg) for arg in args)
    low, high = support
    if kind == "pmf":
        inside = (x >= low) & (x <= high) & (np.floor(x) == x)
    else:
        inside = (x >= low) & (x < high)
    if kind != "pmf":
        inside = inside & np.isfinite(x)
    cond = valid & inside
    output = np.zeros(np.shape(cond), "d")
    if kind == "cdf":
        np.place(output, (x >= high) * (valid == valid), 1.0)
        np.place(output, np.isneginf(x) * (valid == valid), 0.0)
    np.place(output, (1 - valid) + np.isnan(x), np.nan)
    if kind == "sf":
        np.place(output, ((x < low) | np.isneginf(x)) & valid, 1.0)
    if np.any(cond):
        good = [_reduced(cond, v) for v in (x, *args)]
        np.place(output, cond, np.clip(kernel(*good), 0, 1))
    return _finish(output)


def _discrete_quantile(kind: str, q, args: tuple, support: tuple, valid, kernel):
    """``rv_discrete.ppf`` (``kind`` "ppf") or ``.isf`` at ``q``."""
    q = np.asarray(q)
    args = tuple(np.asarray(arg) for arg in args)
    low, high = support
    cond0 = valid & (np.asarray(0) == np.asarray(0))  # loc == loc, as scipy.stats
    inner = (q > 0) & (q < 1)
    to_low = ((q == 0) if kind == "ppf" else (q == 1)) & cond0
    to_high = ((q == 1) if kind == "ppf" else (q == 0)) & cond0
    cond = cond0 & inner
    output = np.full(np.shape(cond), fill_value=np.nan, dtype="d")
    np.place(output, to_low, _reduced(to_low, low - 1 + 0))
    np.place(output, to_high, _reduced(to_high, high + 0))
    if np.any(cond):
        good = [_reduced(cond, v) for v in (q, *args)]
        np.place(output, cond, kernel(*good) + 0)
    return _finish(output)


def _reduced(cond: np.ndarray, value) -> np.ndarray:
    """The cells of ``value`` where ``cond`` holds (``scipy.stats`` ``argsreduce``)."""
    value = np.atleast_1d(value)
    if np.all(cond):
        value, cond = np.broadcast_arrays(value, cond)
        return value.ravel()
    return value if np.size(value) == 1 else np.extract(cond, np.broadcast_to(value, cond.shape))


def _binom(n, p):
    n, p = np.asarray(n), np.asarray(p)
    valid = (n >= 0) & (n == np.round(n)) & (p >= 0) & (p <= 1)
    return (n, p), (0, n), valid


def binom_pmf(k, n, p):
    """``scipy.stats.binom.pmf(k, n, p)``."""
    args, support, valid = _binom(n, p)
    return _discrete_values("pmf", k, args, support, valid, _ufuncs()._binom_pmf)


def binom_cdf(k, n, p):
    """``scipy.stats.binom.cdf(k, n, p)``."""
    args, support, valid = _binom(n, p)
    return _discrete_values("cdf", k, args, support, valid,
                            lambda x, *a: _ufuncs()._binom_cdf(np.floor(x), *a))


def binom_sf(k, n, p):
    """``scipy.stats.binom.sf(k, n, p)``."""
    args, support, valid = _binom(n, p)
    return _discrete_values("sf", k, args, support, valid,
                            lambda x, *a: _ufuncs()._binom_sf(np.floor(x), *a))


def binom_ppf(q, n, p):
    """``scipy.stats.binom.ppf(q, n, p)``."""
    args, support, valid = _binom(n, p)
    return _discrete_quantile("ppf", q, args, support, valid, _ufuncs()._binom_ppf)


def binom_isf(q, n, p):
    """``scipy.stats.binom.isf(q, n, p)``."""
    args, support, valid = _binom(n, p)
    return _discrete_quantile("isf", q, args, support, valid, _ufuncs()._binom_isf)


def _poisson(mu):
    mu = np.asarray(mu)
    return (mu,), (0, np.inf), mu >= 0


def _poisson_pmf_kernel(k, mu):
    from scipy import special

    return np.exp(special.xlogy(k, mu) - special.gammaln(k + 1) - mu)


def poisson_pmf(k, mu):
    """``scipy.stats.poisson.pmf(k, mu)``."""
    args, support, valid = _poisson(mu)
    return _discrete_values("pmf", k, args, support, valid, _poisson_pmf_kernel)


def poisson_sf(k, mu):
    """``scipy.stats.poisson.sf(k, mu)``."""
    from scipy import special

    args, support, valid = _poisson(mu)
    return _discrete_values("sf", k, args, support, valid,
                            lambda x, m: special.pdtrc(np.floor(x), m))


def _poisson_ppf_kernel(q, mu):
    from scipy import special

    vals = np.ceil(special.pdtrik(q, mu))
    vals1 = np.maximum(vals - 1, 0)
    return np.where(special.pdtr(vals1, mu) >= q, vals1, vals)


def poisson_ppf(q, mu):
    """``scipy.stats.poisson.ppf(q, mu)``."""
    args, support, valid = _poisson(mu)
    return _discrete_quantile("ppf", q, args, support, valid, _poisson_ppf_kernel)


def beta_ppf(q, a, b):
    """``scipy.stats.beta.ppf(q, a, b)`` (``rv_continuous.ppf``, loc 0, scale 1)."""
    q, a, b = np.asarray(q), np.asarray(a), np.asarray(b)
    cond0 = (a > 0) & (b > 0) & (np.asarray(1) > 0) & (np.asarray(0) == np.asarray(0))
    cond = cond0 & (0 < q) & (q < 1)
    at_low, at_high = cond0 & (q == 0), cond0 & (q == 1)
    output = np.full(np.shape(cond), fill_value=np.nan)
    np.place(output, at_low, _reduced(at_low, 0.0 * 1 + 0))
    np.place(output, at_high, _reduced(at_high, 1.0 * 1 + 0))
    if np.any(cond):
        good = [_reduced(cond, v) for v in (q, a, b)]
        np.place(output, cond, _ufuncs()._beta_ppf(*good) * _reduced(cond, 1)
                 + _reduced(cond, 0))
    return _finish(output)


def fdr_bh(pvalues, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (reject, q-values) of the Benjamini-Hochberg procedure on a 1-d array.

    ``statsmodels.stats.multitest.multipletests(pvalues, alpha, method="fdr_bh")[:2]``,
    computed the same way (its sort, its ecdf factors, its monotone adjustment).
    """
    pvalues = np.asarray(pvalues)
    order = np.argsort(pvalues)
    ordered = np.take(pvalues, order)
    factor = np.arange(1, len(ordered) + 1) / float(len(ordered))
    reject = ordered <= factor * alpha
    if reject.any():
        reject[:max(np.nonzero(reject)[0])] = True
    corrected = np.minimum.accumulate((ordered / factor)[::-1])[::-1]
    corrected[corrected > 1] = 1
    out_q, out_reject = np.empty_like(corrected), np.empty_like(reject)
    out_q[order], out_reject[order] = corrected, reject
    return out_reject, out_q
