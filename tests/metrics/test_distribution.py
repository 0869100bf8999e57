from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from vcell.metrics import diversity, energy_distance, fit_pca, mmd, pca_project


def test_energy_distance_identical_is_zero(rng):
    X = rng.normal(size=(30, 4))
    assert energy_distance(X, X) == pytest.approx(0.0, abs=1e-9)
    assert energy_distance(X, X, squared=True) == pytest.approx(0.0, abs=1e-9)


def test_energy_distance_point_masses():
    X = np.tile([1.0, 1.0], (5, 1))
    Y = np.tile([4.0, 5.0], (3, 1))  # d = 5
    assert energy_distance(X, Y) == pytest.approx(10.0)
    assert energy_distance(X, Y, squared=True) == pytest.approx(50.0)


def test_energy_distance_hand_computed():
    X = np.array([[0.0], [2.0]])
    Y = np.array([[1.0]])
    # 2 * mean(1, 1) - mean(0, 2, 2, 0) - 0 = 2 - 1
    assert energy_distance(X, Y) == pytest.approx(1.0)


def test_energy_distance_squared_is_mean_shift(rng):
    X = rng.normal(size=(40, 3))
    Y = rng.normal(size=(25, 3)) * 3 + 1
    shift = X.mean(axis=0) - Y.mean(axis=0)
    assert energy_distance(X, Y, squared=True) == pytest.approx(2 * shift @ shift)


def test_energy_distance_subsampling_is_seeded(rng):
    X = rng.normal(size=(300, 3))
    Y = rng.normal(size=(300, 3)) + 0.5
    a = energy_distance(X, Y, max_cells=50, seed=1)
    assert a == energy_distance(X, Y, max_cells=50, seed=1)
    assert a != energy_distance(X, Y, max_cells=50, seed=2)
    assert energy_distance(X, Y, max_cells=None) == pytest.approx(energy_distance(X, Y, max_cells=300))


def test_energy_distance_matches_pertpy_edistance(rng):
    """pertpy 1.0's "edistance" is 2 mean|x-y| - mean|x-x'| - mean|y-y'| with Euclidean distances, diagonal included."""
    import pertpy as pt

    X = rng.normal(size=(60, 5))
    Y = rng.normal(size=(45, 5)) * 1.5 + 0.4
    expected = pt.tools.Distance(metric="edistance")(X, Y)
    assert energy_distance(X, Y, max_cells=None) == pytest.approx(expected, rel=1e-6)


def test_mmd_identical_shifted_and_hand_computed(rng):
    X = rng.normal(size=(80, 3))
    assert mmd(X, X) == pytest.approx(0.0, abs=1e-12)
    near = mmd(X, rng.normal(size=(80, 3)) + 0.2)
    far = mmd(X, rng.normal(size=(80, 3)) + 2.0)
    assert 0 <= near < far
    # two single points at squared distance 1: median scale 1, MMD^2_b = 2 - 2 exp(-1 / b)
    bw = (0.5, 1.0, 2.0)
    expected = np.mean([2 - 2 * np.exp(-1 / b) for b in bw])
    assert mmd(np.zeros((1, 1)), np.ones((1, 1)), bandwidths=bw) == pytest.approx(expected)
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(X, X, bandwidths=())


def test_median_scale_is_the_median_of_the_pooled_distances(rng):
    """The pooled distances are the upper triangles of dxx and dyy and all of dxy; the median reorders a copy only."""
    from vcell.metrics._common import sq_dists
    from vcell.metrics._distribution import _median_scale

    X, Y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3))
    dxx, dyy, dxy = sq_dists(X, X), sq_dists(Y, Y), sq_dists(X, Y)
    before = [d.copy() for d in (dxx, dyy, dxy)]
    pooled = np.concatenate([dxx[np.triu_indices(7, 1)], dyy[np.triu_indices(5, 1)], dxy.ravel()])
    assert _median_scale(dxx, dyy, dxy) == np.median(pooled)
    for d, b in zip((dxx, dyy, dxy), before, strict=True):
        np.testing.assert_array_equal(d, b)
    zeros = np.zeros((4, 4))  # median 0: the mean of the positive distances
    d = np.zeros((4, 3))
    d[0, 0] = 3.0
    assert _median_scale(zeros, np.zeros((3, 3)), d) == 3.0


def test_fit_pca_and_project(rng):
    X = rng.normal(size=(100, 8)) @ np.diag([5, 3, 1, 0.1, 0.1, 0.1, 0.1, 0.1])
    comps, mean = fit_pca(X, 3, seed=0)
    assert comps.shape == (3, 8)
    np.testing.assert_allclose(mean, X.mean(axis=0))
    np.testing.assert_allclose(comps @ comps.T, np.eye(3), atol=1e-8)
    Z = pca_project(X, comps, mean)
    np.testing.assert_allclose(Z, (X - mean) @ comps.T)
    np.testing.assert_allclose(pca_project(sparse.csr_matrix(X), comps, mean), Z, atol=1e-10)
    comps2, _ = fit_pca(X, 3, seed=0)
    np.testing.assert_array_equal(comps, comps2)
    assert fit_pca(X[:5], 50)[0].shape == (5, 8)  # capped
    with pytest.raises(ValueError, match="genes"):
        pca_project(X[:, :4], comps, mean)


def test_diversity(rng):
    real = rng.normal(size=(60, 4))
    same = diversity(real, real)
    assert same == {"variance_ratio": pytest.approx(1.0), "coverage": 1.0}
    collapsed = np.tile(real.mean(axis=0), (60, 1))
    d = diversity(collapsed, real)
    assert d["variance_ratio"] == pytest.approx(0.0)
    assert d["coverage"] < 0.5
    wide = diversity(real * 2, real)
    assert wide["variance_ratio"] == pytest.approx(4.0)
    comps, mean = fit_pca(real, 2)
    assert diversity(real, real, pca=(comps, mean))["coverage"] == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        diversity(real[:1], real)
