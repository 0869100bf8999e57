from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse, stats

import vcell
from vcell.metrics import interval_coverage, predictive_interval


def test_exported():
    assert vcell.metrics.predictive_interval is predictive_interval
    assert vcell.metrics.interval_coverage is interval_coverage
    assert {"predictive_interval", "interval_coverage"} <= set(vcell.metrics.__all__)


def test_interval_of_0_to_99():
    # linear interpolation: quantile q of 0..99 is 99 q; 0.05 -> 4.95, 0.95 -> 94.05
    samples = np.arange(100.0)[:, None]
    lower, upper = predictive_interval(samples)
    np.testing.assert_allclose(lower, [4.95])
    np.testing.assert_allclose(upper, [94.05])
    lower, upper = predictive_interval(samples, level=0.5)  # quantiles 0.25, 0.75
    np.testing.assert_allclose(lower, [24.75])
    np.testing.assert_allclose(upper, [74.25])


def test_interval_is_per_gene():
    samples = np.column_stack([np.arange(100.0), 10 - np.arange(100.0) / 10, np.full(100, 3.0)])
    lower, upper = predictive_interval(samples, level=0.9)
    assert lower.shape == upper.shape == (3,)
    assert lower.dtype == upper.dtype == np.float64
    np.testing.assert_allclose(lower, [4.95, 10 - 9.405, 3.0])
    np.testing.assert_allclose(upper, [94.05, 10 - 0.495, 3.0])


def test_sparse_samples_match_dense(rng):
    dense = rng.poisson(1.0, size=(50, 8)).astype(float)
    lo_d, hi_d = predictive_interval(dense, level=0.8)
    lo_s, hi_s = predictive_interval(sparse.csr_matrix(dense), level=0.8)
    np.testing.assert_array_equal(lo_d, lo_s)
    np.testing.assert_array_equal(hi_d, hi_s)


@pytest.mark.parametrize("level", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan"), True, "0.9", None])
def test_invalid_level(level):
    with pytest.raises(ValueError, match="level"):
        predictive_interval(np.arange(10.0)[:, None], level=level)


@pytest.mark.parametrize("samples", [np.ones((1, 4)), np.ones(4)])
def test_too_few_samples(samples):
    with pytest.raises(ValueError, match="at least 2"):
        predictive_interval(samples)


def test_nan_samples_rejected():
    samples = np.arange(10.0)[:, None].copy()
    samples[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        predictive_interval(samples)


def test_coverage_on_a_grid():
    real = np.column_stack([np.arange(10.0)] * 4)  # 10 cells valued 0..9 in every gene
    lower = [2.0, 2.0, 2.5, -1.0]
    upper = [5.0, 2.0, 4.5, 20.0]
    # gene 0: 2,3,4,5 (both ends inclusive); gene 1: only 2; gene 2: 3,4; gene 3: all ten
    per_gene = interval_coverage(real, lower, upper, per_gene=True)
    assert isinstance(per_gene, np.ndarray)
    np.testing.assert_allclose(per_gene, [0.4, 0.1, 0.2, 1.0])
    mean = interval_coverage(real, lower, upper)
    assert isinstance(mean, float)
    assert mean == pytest.approx((0.4 + 0.1 + 0.2 + 1.0) / 4)


def test_coverage_of_own_samples_is_the_level():
    samples = np.arange(100.0)[:, None]
    lower, upper = predictive_interval(samples, level=0.9)
    assert interval_coverage(samples, lower, upper) == pytest.approx(0.9)  # 5..94


def test_coverage_sparse_real_and_infinite_bounds():
    real = sparse.csr_matrix(np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]))
    # gene 0 in [-inf, 0]: cells 0 and 2; gene 1 in [0.5, inf]: cell 0
    cov = interval_coverage(real, [-np.inf, 0.5], [0.0, np.inf], per_gene=True)
    np.testing.assert_allclose(cov, [2 / 3, 1 / 3])


def test_gaussian_calibration(rng):
    samples = rng.normal(size=(20000, 5))
    lower, upper = predictive_interval(samples, level=0.9)
    np.testing.assert_allclose(lower, stats.norm.ppf(0.05), atol=0.06)
    np.testing.assert_allclose(upper, stats.norm.ppf(0.95), atol=0.06)
    real = rng.normal(size=(5000, 5))
    assert interval_coverage(real, lower, upper) == pytest.approx(0.9, abs=0.015)
    # real cells twice as spread: P(|Z| < 1.645 / 2) = 0.589; an over-confident prediction
    wide = 2.0 * rng.normal(size=(5000, 5))
    expected = 2 * stats.norm.cdf(stats.norm.ppf(0.95) / 2) - 1
    assert interval_coverage(wide, lower, upper) == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize(
    ("lower", "upper", "match"),
    [
        (np.zeros(3), np.ones(4), r"lower .*\(4,\).*shape \(3,\)"),
        (np.zeros(4), np.ones(5), r"upper .*\(4,\).*shape \(5,\)"),
        (np.zeros((1, 4)), np.ones(4), r"lower .*shape \(1, 4\)"),
        (np.ones(4), np.zeros(4), "lower exceeds upper for 4 gene"),
        (np.array([0.0, np.nan, 0.0, 0.0]), np.ones(4), "lower holds NaN"),
    ],
)
def test_coverage_shape_and_value_errors(lower, upper, match):
    with pytest.raises(ValueError, match=match):
        interval_coverage(np.zeros((5, 4)), lower, upper)


def test_coverage_rejects_nan_real():
    real = np.zeros((3, 2))
    real[1, 1] = np.nan
    with pytest.raises(ValueError, match="real holds NaN"):
        interval_coverage(real, [0.0, 0.0], [1.0, 1.0])
