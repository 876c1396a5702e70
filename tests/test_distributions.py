"""pipelines.surveillance.distributions gives scipy.stats's and statsmodels' values bit for bit.

The monitor evaluates its binomial, Poisson and beta functions and the Benjamini-Hochberg
procedure without importing scipy.stats (about a second of every monitor process). These
tests compare every function with the library itself on grids that include the edges: counts
outside the support, n = 0, p = 0 or 1, non-integer n, NaN and infinite arguments, q = 0 or 1,
scalars and 0-d results.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from pipelines.surveillance import distributions as dist

COUNTS = np.array([-np.inf, -3, -1, -0.5, 0, 0.5, 1, 2, 3, 5, 7, 10, 19, 20, 21, 50, 99, 100,
                   101, 1e4, np.inf, np.nan])
SIZES = np.array([0, 1, 2, 5, 20, 100, 101, 2.5, -1, 1e4, 3e5, np.nan, np.inf])
PROBABILITIES = np.array([0, 1e-9, 1e-4, 0.01, 0.07, 0.11, 0.5, 0.9, 1, -0.1, 1.1, np.nan])
QUANTILES = np.array([0, 1e-300, 1e-12, 1e-6, 1.25e-4, 0.001, 0.025, 0.05, 0.5, 0.975, 0.999,
                      1 - 1e-12, 1, -0.1, 1.1, np.nan])
RATES = np.array([0, 1e-6, 0.01, 0.3, 1, 2.5, 7, 33, 500, 1e5, -1, np.nan, np.inf])


def _same(ours, theirs) -> None:
    """Equal bit for bit: same shape, dtype, and bytes (NaN where NaN, -0.0 where -0.0)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert ours.tobytes() == theirs.tobytes(), np.argwhere(
        ~((ours == theirs) | (np.isnan(ours) & np.isnan(theirs))))


def _grid(*axes):
    return np.meshgrid(*axes, indexing="ij")


@pytest.mark.parametrize("name", ["pmf", "cdf", "sf"])
def test_binomial_values(name):
    k, n, p = _grid(COUNTS, SIZES, PROBABILITIES)
    with np.errstate(all="ignore"):
        _same(getattr(dist, f"binom_{name}")(k, n, p), getattr(stats.binom, name)(k, n, p))
        # the monitor's shapes: counts per site against one p0, and scalars
        _same(getattr(dist, f"binom_{name}")(COUNTS, 100, 0.07),
              getattr(stats.binom, name)(COUNTS, 100, 0.07))
        for value in (0, 3.0, 100, -1, np.nan):
            _same(getattr(dist, f"binom_{name}")(value, 100, 0.07),
                  getattr(stats.binom, name)(value, 100, 0.07))


@pytest.mark.parametrize("name", ["ppf", "isf"])
def test_binomial_quantiles(name):
    q, n, p = _grid(QUANTILES, SIZES, PROBABILITIES)
    with np.errstate(all="ignore"):
        _same(getattr(dist, f"binom_{name}")(q, n, p), getattr(stats.binom, name)(q, n, p))
        sizes = np.arange(0, 400, 7, dtype=float)
        _same(getattr(dist, f"binom_{name}")(1.25e-4, sizes, 0.09),
              getattr(stats.binom, name)(1.25e-4, sizes, 0.09))
        _same(getattr(dist, f"binom_{name}")(0.05, 37.0, 0.2),
              getattr(stats.binom, name)(0.05, 37.0, 0.2))


@pytest.mark.parametrize("name", ["pmf", "sf", "ppf"])
def test_poisson(name):
    first = QUANTILES if name == "ppf" else COUNTS
    x, mu = _grid(first, RATES)
    with np.errstate(all="ignore"):
        _same(getattr(dist, f"poisson_{name}")(x, mu), getattr(stats.poisson, name)(x, mu))
        _same(getattr(dist, f"poisson_{name}")(first, 2.5),
              getattr(stats.poisson, name)(first, 2.5))
        _same(getattr(dist, f"poisson_{name}")(first[3], 2.5),
              getattr(stats.poisson, name)(first[3], 2.5))


def test_beta_quantile():
    shapes = np.array([0, 1e-3, 0.5, 1, 2, 7, 100, 1e4, -1, np.nan, np.inf])
    q, a, b = _grid(QUANTILES, shapes, shapes)
    with np.errstate(all="ignore"):
        _same(dist.beta_ppf(q, a, b), stats.beta.ppf(q, a, b))
        events = np.arange(0, 60, dtype=float)
        _same(dist.beta_ppf(0.025, events, 60 - events + 1),
              stats.beta.ppf(0.025, events, 60 - events + 1))
        _same(dist.beta_ppf(0.975, 3.0, 8.0), stats.beta.ppf(0.975, 3.0, 8.0))


@pytest.mark.parametrize("seed", range(6))
def test_benjamini_hochberg(seed):
    rng = np.random.default_rng(seed)
    size = [1, 2, 17, 200, 1000, 5000][seed]
    p = rng.uniform(size=size) ** rng.uniform(0.5, 8)
    tied = rng.uniform(size=size) < 0.2
    p[tied] = rng.choice(p, size=int(tied.sum()))  # ties among the p-values
    p[: size // 10] = 1.0  # and at 1
    for alpha in (0.01, 0.05, 0.2):
        reject, q = dist.fdr_bh(p, alpha)
        expected_reject, expected_q, _, _ = multipletests(p, alpha=alpha, method="fdr_bh")
        _same(reject, expected_reject)
        _same(q, expected_q)


def test_the_monitor_imports_neither_scipy_stats_nor_statsmodels():
    """What this module is for: a monitor process starts without them (about a second)."""
    code = ("import sys, pipelines.surveillance.engine, pipelines.surveillance.beyond_run; "
            "print(sorted(m for m in ('scipy.stats', 'statsmodels') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=300)
    assert result.stdout.strip() == "[]"


def test_a_monitor_that_reads_its_designs_imports_no_solver():
    """SciPy's sparse solver and optimiser (about 0.3 s) load only when a design or refit needs them.

    A monitor after the first reads its threshold designs from the store and its risk model
    from the stored fit, so its process should not pay for them at import.
    """
    code = ("import sys, pipelines.surveillance.engine, pipelines.surveillance.beyond_run; "
            "print(sorted({m.split('.')[1] for m in sys.modules "
            "if m.startswith(('scipy.sparse', 'scipy.optimize'))}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=300)
    assert result.stdout.strip() == "[]"
