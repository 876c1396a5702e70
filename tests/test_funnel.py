"""Funnel plot tests: limits against a brute-force binomial scan, p-values against scipy, BH."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from pipelines.surveillance.funnel import (
    binomial_limits,
    estimate_overdispersion,
    exact_binomial_pvalues,
    false_discovery_control,
    funnel,
    funnel_curves,
)


def brute_force_limit(n, p0, q):
    """Spiegelhalter (2005) A.1.1 by scanning the cumulative distribution directly."""
    cdf = np.cumsum(stats.binom.pmf(np.arange(n + 1), n, p0))
    r = int(np.argmax(cdf >= q - 1e-15))
    below = cdf[r - 1] if r > 0 else 0.0
    alpha = (cdf[r] - q) / (cdf[r] - below)
    return max(0.0, (r - alpha) / n)  # the interpolation can dip below 0 when r = 0


@pytest.mark.parametrize("p0", [0.11, 0.23, 1 / 360])
@pytest.mark.parametrize("q", [0.001, 0.025, 0.975, 0.999])
def test_interpolated_limits_match_brute_force(p0, q):
    sizes = np.array([5, 17, 60, 200, 731, 2500])
    got = binomial_limits(sizes, p0, q)
    expected = [brute_force_limit(int(n), p0, q) for n in sizes]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_limits_approach_the_normal_approximation_for_large_n():
    n, p0 = 200_000, 0.11
    upper = binomial_limits(n, p0, 0.999)
    assert upper == pytest.approx(p0 + stats.norm.isf(0.001) * np.sqrt(p0 * (1 - p0) / n), rel=1e-3)


def test_limits_bracket_the_exact_quantiles():
    # At whole counts the interpolated limit lies between r - 1 and r (as counts).
    sizes, p0 = np.arange(1, 400), 0.09
    upper = binomial_limits(sizes, p0, 0.999) * sizes
    r = stats.binom.ppf(0.999, sizes, p0)
    assert np.all(upper <= r + 1e-9)
    assert np.all(upper >= r - 1 - 1e-9)


def test_pvalues_match_scipy_binomtest():
    events, n, p0 = np.array([0, 3, 12, 40]), np.array([30, 40, 60, 200]), 0.11
    upper, lower, _ = exact_binomial_pvalues(events, n, p0)
    for x, size, pu, pl in zip(events, n, upper, lower, strict=True):
        assert pu == pytest.approx(stats.binomtest(int(x), int(size), p0, "greater").pvalue)
        assert pl == pytest.approx(stats.binomtest(int(x), int(size), p0, "less").pvalue)


def test_funnel_flags_only_the_outlying_site():
    n = np.array([100, 200, 300, 400, 150, 250])
    events = np.round(n * 0.11).astype(int)
    events[3] = 90  # 22.5 % at n = 400: far above the 99.8 % limit
    result = funnel(events, n, 0.11)
    assert result.above[0.998].tolist() == [False, False, False, True, False, False]
    assert not result.below[0.998].any()
    assert result.overdispersion_mode == "none"
    lower, upper = result.limits[0.998]
    np.testing.assert_allclose(upper, binomial_limits(n, 0.11, 0.999))
    np.testing.assert_allclose(result.z, (events / n - 0.11) / np.sqrt(0.11 * 0.89 / n))


def test_winsorised_phi_by_hand():
    z = np.array([-5, -1, -0.5, 0, 0.5, 1, 1, 1.5, 2, 2.5, 6], dtype=float)
    # 11 values: the 10 % / 90 % quantiles are the 2nd and 10th values, -1 and 2.5.
    clipped = np.array([-1, -1, -0.5, 0, 0.5, 1, 1, 1.5, 2, 2.5, 2.5])
    n = np.full(11, 100.0)
    od = estimate_overdispersion(z, n, 0.2)
    assert od.phi == pytest.approx(np.mean(clipped**2))
    w = n / (0.2 * 0.8)
    tau2 = (11 * od.phi - 10) / (w.sum() - (w**2).sum() / w.sum())
    assert od.overdispersed
    assert od.tau2 == pytest.approx(tau2)


def test_overdispersed_data_widens_the_limits():
    rng = np.random.default_rng(8)
    n = rng.integers(50, 600, 80)
    rates = rng.beta(11, 89, 80)  # between-site variation around 0.11
    events = rng.binomial(n, rates)
    plain = funnel(events, n, 0.11)
    additive = funnel(events, n, 0.11, overdispersion="additive")
    multiplicative = funnel(events, n, 0.11, overdispersion="multiplicative")
    assert plain.overdispersion.phi > 1.5
    assert additive.overdispersion_mode == "additive"
    assert additive.overdispersion.tau2 > 0
    assert np.all(additive.limits[0.998][1] > plain.limits[0.998][1] - 1e-3)
    assert np.all(multiplicative.z_adjusted**2 <= plain.z**2 + 1e-12)
    assert additive.above[0.998].sum() <= plain.above[0.998].sum()


def test_funnel_curves_match_limits():
    curves = funnel_curves(0.11, 1000, n_points=50)
    assert set(curves) == {"n", "lower_95", "upper_95", "lower_99.8", "upper_99.8"}
    np.testing.assert_allclose(curves["upper_99.8"], binomial_limits(curves["n"], 0.11, 0.999))
    assert curves["n"][0] == 1 and curves["n"][-1] == 1000


def test_benjamini_hochberg_by_hand_and_method_reported():
    p = np.array([0.001, 0.01, 0.03, 0.04, 0.5])
    result = false_discovery_control(p, alpha=0.05)
    assert result.method == "fdr_bh"
    assert result.reject.tolist() == [True, True, True, True, False]
    np.testing.assert_allclose(result.q_values, multipletests(p, 0.05, "fdr_bh")[1])


def test_fdr_across_sites_and_metrics_keeps_shape_and_skips_nan():
    p = np.array([[0.0001, np.nan, 0.2], [0.03, 0.004, 0.9]])
    result = false_discovery_control(p, alpha=0.05)
    assert result.reject.shape == (2, 3)
    assert not result.reject[0, 1] and np.isnan(result.q_values[0, 1])
    finite = p[np.isfinite(p)]
    np.testing.assert_allclose(
        result.q_values[np.isfinite(p)], multipletests(finite, 0.05, "fdr_bh")[1]
    )


def test_empty_sites_get_nan_not_errors():
    result = funnel(np.array([0, 3]), np.array([0, 30]), 0.11)
    assert np.isnan(result.z[0]) and np.isnan(result.p_upper[0])
    assert np.isfinite(result.p_upper[1])


def test_bad_counts_are_refused():
    with pytest.raises(ValueError):
        funnel(np.array([5]), np.array([3]), 0.11)


def _scipy_stats_limit(n, p0, q):
    """The interpolated limit through the public ``scipy.stats.binom`` (the reference)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        r = stats.binom.ppf(q, n, p0)
        f_r = stats.binom.cdf(r, n, p0)
        step = f_r - stats.binom.cdf(r - 1, n, p0)
        alpha = np.where(step > 0, (f_r - q) / np.where(step > 0, step, 1.0), 0.0)
        limit = np.clip((r - alpha) / n, 0.0, 1.0)
    return np.where(n > 0, limit, np.nan)


def test_limits_are_scipy_stats_binom_bit_for_bit():
    # The limits are evaluated by the ufuncs behind scipy.stats.binom (so the report need
    # not import scipy.stats); they must be its values exactly, at every size and rate.
    rng = np.random.default_rng(11)
    sizes = np.concatenate([[0.0, 1.0, 2.0, 7.0], np.round(10.0 ** rng.uniform(0, 4.7, 400))])
    rates = [0.0001, 1 / 360, 0.09, 0.11, 0.23, 0.5, 0.9999, *10.0 ** rng.uniform(-4, -0.05, 20)]
    for p0 in rates:
        for q in (0.0005, 0.001, 0.025, 0.975, 0.999, 0.9995):
            ours, reference = binomial_limits(sizes, p0, q), _scipy_stats_limit(sizes, p0, q)
            assert ours.tobytes() == reference.tobytes(), (p0, q)


@pytest.mark.parametrize("mode", ["multiplicative", "additive"])
def test_overdispersed_curves_use_the_normal_quantile(mode):
    curves = funnel_curves(0.11, 2000, coverages=(0.998,), phi=2.5, tau2=0.0004,
                           overdispersion=mode)
    n = curves["n"]
    s2 = 0.11 * 0.89 / n
    spread = np.sqrt(2.5 * s2) if mode == "multiplicative" else np.sqrt(s2 + 0.0004)
    upper = np.clip(0.11 + stats.norm.isf(0.001) * spread, 0, 1)
    assert curves["upper_99.8"].tobytes() == upper.tobytes()


def test_the_report_draws_funnels_without_importing_scipy_stats():
    # The report draws every funnel before its workers fork: an import there is paid serially.
    import subprocess
    import sys

    code = ("import sys; import pipelines.report.charts as c; "
            "c.funnel_curves(0.11, 500); print('scipy.stats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
