from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

from vcell import pp
from vcell._utils import log1p_cp10k


def counts(rng, n=30, g=12):
    X = rng.poisson(3.0, size=(n, g)).astype(np.float32)
    X[0] = 0  # a cell without counts
    X[1, 0] = 50
    return X


def test_hand_computed():
    adata = ad.AnnData(np.array([[25.0, 75.0], [0.0, 0.0]], dtype=np.float32))
    pp.log_normalize(adata)
    expected = np.log1p(np.array([[2500.0, 7500.0], [0.0, 0.0]]))
    np.testing.assert_allclose(adata.layers["log1p_cp10k"], expected, rtol=1e-6)
    assert adata.layers["log1p_cp10k"].dtype == np.float32


def test_dense_matches_utils(rng):
    X = counts(rng)
    adata = ad.AnnData(X.copy())
    pp.log_normalize(adata, key_added="lognorm")
    np.testing.assert_array_equal(adata.layers["lognorm"], log1p_cp10k(X))
    np.testing.assert_array_equal(adata.X, X)


def test_sparse_stays_sparse(rng):
    X = counts(rng)
    adata = ad.AnnData(sparse.csr_matrix(X))
    pp.log_normalize(adata)
    out = adata.layers["log1p_cp10k"]
    assert sparse.issparse(out)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.toarray(), log1p_cp10k(X), rtol=1e-6)
    np.testing.assert_array_equal(adata.X.toarray(), X)


def test_layer_target_sum_and_copy(rng):
    X = counts(rng)
    adata = ad.AnnData(np.zeros_like(X))
    adata.layers["counts"] = X
    out = pp.log_normalize(adata, layer="counts", target_sum=100.0, copy=True)
    assert "log1p_cp10k" not in adata.layers
    np.testing.assert_allclose(out.layers["log1p_cp10k"], log1p_cp10k(X, target_sum=100.0), rtol=1e-6)


def test_errors(rng):
    adata = ad.AnnData(counts(rng))
    with pytest.raises(KeyError, match="'counts'"):
        pp.log_normalize(adata, layer="counts")
    with pytest.raises(ValueError, match="target_sum"):
        pp.log_normalize(adata, target_sum=0)
    adata.X[2, 2] = -1
    with pytest.raises(ValueError, match="negative"):
        pp.log_normalize(adata)


def test_kang(kang_path):
    adata = ad.read_h5ad(kang_path)
    pp.log_normalize(adata)
    out = adata.layers["log1p_cp10k"]
    assert out.shape == adata.shape
    assert sparse.issparse(out)
    np.testing.assert_allclose(out[:50].toarray(), log1p_cp10k(adata.X[:50]), rtol=1e-6)
