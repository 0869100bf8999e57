"""Streamed PCA (vcell.data.fit_pca_streamed, vcell.metrics.fit_pca) equals scikit-learn's on every matrix kind."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import sparse
from sklearn.decomposition import PCA

import vcell
from vcell._utils import log1p_cp10k
from vcell.data import fit_pca_streamed
from vcell.data._chunked import _flip_signs
from vcell.metrics import fit_pca

KINDS = ("dense", "csr", "csc", "backed_csr", "backed_csc", "backed_dense")
CHUNK = 9 * 25  # 9 rows of 25 genes: many blocks


def _counts(n: int = 400, n_genes: int = 25, seed: int = 0) -> np.ndarray:
    """Counts with a planted rank-4 structure, so the leading components are well separated."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n, 4)) * np.array([2.0, 1.5, 1.0, 0.7])
    rate = np.exp(1.0 + 0.5 * factors @ rng.normal(size=(4, n_genes)))
    X = rng.poisson(rate).astype(np.float32)
    X[rng.random(X.shape) < 0.3] = 0
    return X


def _sklearn(E: np.ndarray, k: int, solver: str = "full") -> tuple[np.ndarray, np.ndarray]:
    pca = PCA(n_components=k, svd_solver=solver, random_state=0).fit(np.asarray(E, dtype=np.float64))
    return pca.components_, pca.mean_


def _assert_same_up_to_sign(got: np.ndarray, want: np.ndarray, atol: float = 1e-6) -> None:
    assert got.shape == want.shape
    signs = np.sign(np.sum(got * want, axis=1))
    np.testing.assert_allclose(got, signs[:, None] * want, atol=atol, rtol=0)


def _largest_entry_positive(C: np.ndarray) -> bool:
    return bool(np.all(C[np.arange(len(C)), np.argmax(np.abs(C), axis=1)] > 0))


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_pca_equals_sklearn(kind, hold):
    X = _counts()
    M = hold(kind, X)
    rows = np.flatnonzero(np.arange(X.shape[0]) % 3 != 1)  # a subset of the cells, as a training set
    want, want_mean = _sklearn(log1p_cp10k(X[rows]), 6)
    comps, mean = fit_pca_streamed(M, 6, rows=rows, transform="log1p_cp10k", chunk_elements=CHUNK)
    _assert_same_up_to_sign(comps, want)
    np.testing.assert_allclose(mean, want_mean, atol=1e-9)
    assert _largest_entry_positive(comps)
    # without transform, all rows, a function as transform: the same contract
    want, _ = _sklearn(X, 5)
    _assert_same_up_to_sign(fit_pca_streamed(M, 5, chunk_elements=CHUNK)[0], want)
    want, _ = _sklearn(np.sqrt(X[rows]), 5)
    root = fit_pca_streamed(M, 5, rows=rows, transform=lambda b: b.sqrt() if sparse.issparse(b) else np.sqrt(b))
    _assert_same_up_to_sign(root[0], want)
    # metrics.fit_pca streams everything that is not small and dense: same space
    comps, mean = fit_pca(M, 6, rows=rows, transform="log1p_cp10k", seed=0)
    _assert_same_up_to_sign(comps, _sklearn(log1p_cp10k(X[rows]), 6)[0])


def test_streamed_pca_matches_sklearn_exact_solvers_both_shapes():
    rng = np.random.default_rng(1)
    for n, n_genes in ((500, 30), (80, 60)):  # sklearn "auto": covariance_eigh, then full SVD
        L = rng.normal(size=(n, 5)) * np.array([6.0, 5.0, 4.0, 3.0, 2.0])
        X = L @ rng.normal(size=(5, n_genes)) + 0.3 * rng.normal(size=(n, n_genes))
        want, want_mean = _sklearn(X, 5, solver="auto")
        for M in (X, sparse.csr_matrix(X)):
            comps, mean = fit_pca_streamed(M, 5, chunk_elements=4 * n_genes)
            _assert_same_up_to_sign(comps, want)
            np.testing.assert_allclose(mean, want_mean, atol=1e-12)
        # vcell's sign convention (largest entry positive: scikit-learn >= 1.5's svd_flip; 1.4's differs, so the
        # reference is made vcell's): identical, not only up to sign
        np.testing.assert_allclose(fit_pca_streamed(X, 5)[0], _flip_signs(want), atol=1e-6)


def test_randomized_streamed_pca_is_seeded_and_accurate():
    rng = np.random.default_rng(2)
    L = rng.normal(size=(600, 6)) * np.array([8.0, 6.0, 5.0, 4.0, 3.0, 2.0])
    X = sparse.csr_matrix(L @ rng.normal(size=(6, 200)) + 0.1 * rng.normal(size=(600, 200)))
    exact, mean = fit_pca_streamed(X, 6, method="covariance")
    a, mean_a = fit_pca_streamed(X, 6, method="randomized", seed=3, chunk_elements=5000)
    b, _ = fit_pca_streamed(X, 6, method="randomized", seed=3, chunk_elements=5000)
    np.testing.assert_array_equal(a, b)  # deterministic for a seed
    _assert_same_up_to_sign(a, exact)
    np.testing.assert_allclose(mean_a, mean, atol=1e-12)
    _assert_same_up_to_sign(fit_pca_streamed(X, 6, method="randomized", seed=4)[0], exact)
    np.testing.assert_allclose(a @ a.T, np.eye(6), atol=1e-10)


def test_fit_pca_small_dense_unchanged_and_sparse_same_space():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(120, 15)) @ np.diag(np.linspace(3, 0.5, 15))
    comps, mean = fit_pca(X, 4, seed=7)
    pca = PCA(n_components=4, svd_solver="auto", random_state=7).fit(X)
    np.testing.assert_array_equal(comps, _flip_signs(pca.components_))  # scikit-learn's result, vcell's signs
    np.testing.assert_array_equal(mean, pca.mean_)
    scomps, smean = fit_pca(sparse.csr_matrix(X), 4, seed=7)
    _assert_same_up_to_sign(scomps, comps)
    np.testing.assert_allclose(scomps, comps, atol=1e-6)  # and the same signs
    np.testing.assert_allclose(smean, mean, atol=1e-12)
    rows = np.arange(0, 120, 2)
    np.testing.assert_array_equal(fit_pca(X, 4, rows=rows, seed=7)[0], fit_pca(X[rows], 4, seed=7)[0])


def test_fit_pca_on_large_sparse_stays_far_below_the_dense_size(monkeypatch):
    monkeypatch.setattr(vcell.settings, "chunk_elements", 1 << 20)
    rng = np.random.default_rng(4)
    X = sparse.random(20_000, 500, density=0.1, format="csr", dtype=np.float32, random_state=5)
    X.data = rng.integers(1, 30, X.nnz).astype(np.float32)
    dense_bytes = X.shape[0] * X.shape[1] * 8
    tracemalloc.start()
    try:
        comps, _ = fit_pca(X, 50, transform="log1p_cp10k", seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert comps.shape == (50, 500)
    assert peak < 0.3 * dense_bytes, f"peak {peak / 1e6:.1f} MB vs {dense_bytes / 1e6:.0f} MB dense"


def test_streamed_pca_input_errors():
    X = np.ones((5, 3))
    with pytest.raises(ValueError, match="n_comps"):
        fit_pca_streamed(X, 0)
    with pytest.raises(ValueError, match="at least 2 cells"):
        fit_pca_streamed(X, 2, rows=[1])
    with pytest.raises(ValueError, match="method"):
        fit_pca_streamed(X, 2, method="svd")
    with pytest.raises(ValueError, match="transform"):
        fit_pca_streamed(X, 2, transform="log")
    with pytest.raises(ValueError, match="at least 2 cells"):
        fit_pca(sparse.csr_matrix(X[:1]), 2)
    assert fit_pca_streamed(X[:3], 10)[0].shape == (3, 3)  # capped at min(n_cells, n_genes)
