"""Chunked statistics (vcell.data._chunked) equal the in-memory results, on every kind of matrix AnnData holds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

import vcell
from vcell._utils import group_means as dense_group_means
from vcell._utils import log1p_cp10k
from vcell.data import (
    check_expression,
    check_finite_nonnegative,
    gene_mean_var,
    group_means,
    group_sums,
    is_count_matrix,
    iter_row_blocks,
    library_sizes,
)

KINDS = ("dense", "dense64", "csr", "csc", "backed_csr", "backed_csc", "backed_dense")
CHUNK = 7 * 30  # 7 rows of 30 genes: 123 cells give 18 blocks, the last one short


def _counts(n: int = 123, n_genes: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.negative_binomial(2, 0.1, size=(n, n_genes)).astype(np.float32)
    X[rng.random((n, n_genes)) < 0.6] = 0  # sparse, as real counts
    X[5] = 0  # a cell without counts
    return X


@pytest.fixture(params=KINDS)
def held(request, hold):
    X = _counts()
    return X, hold(request.param, X)


def test_row_blocks_cover_every_row_in_order_within_the_budget(held):
    X, M = held
    seen = []
    for start, stop, block in iter_row_blocks(M, chunk_elements=CHUNK):
        assert block.shape == (stop - start, X.shape[1])
        assert block.shape[0] * block.shape[1] <= CHUNK
        assert isinstance(block, np.ndarray | sparse.csr_matrix)
        seen.append(block.toarray() if sparse.issparse(block) else block)
    np.testing.assert_array_equal(np.vstack(seen), X)
    rows = np.array([100, 3, 3, 50, 7, 0])  # any order, repeats allowed
    got = np.vstack(
        [b.toarray() if sparse.issparse(b) else b for *_, b in iter_row_blocks(M, rows=rows, chunk_elements=60)]
    )
    np.testing.assert_array_equal(got, X[rows])


def test_library_sizes_and_checks(held):
    X, M = held
    np.testing.assert_allclose(library_sizes(M, chunk_elements=CHUNK), X.sum(1, dtype=np.float64), rtol=1e-12)
    check_finite_nonnegative(M, chunk_elements=CHUNK)
    assert is_count_matrix(M, chunk_elements=CHUNK)
    assert check_expression(M, chunk_elements=CHUNK)


def test_chunked_group_means_equal_in_memory(held):
    X, M = held
    labels = np.random.default_rng(1).choice(["a", "b", "c", "d"], size=X.shape[0])
    for transform, E in (("log1p_cp10k", log1p_cp10k(X)), (None, X)):
        got = group_means(M, labels, transform=transform, chunk_elements=CHUNK)
        want = dense_group_means(E, labels)
        assert list(got.index) == list(want.index)
        np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-6, atol=1e-6)
    # missing labels leave their cells out
    some = labels.astype(object)
    some[::3] = None
    got = group_means(M, some, transform="log1p_cp10k", chunk_elements=CHUNK)
    keep = np.array([s is not None for s in some])
    want = dense_group_means(log1p_cp10k(X)[keep], labels[keep])
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-6, atol=1e-6)
    few = np.full(X.shape[0], None, dtype=object)  # most cells unlabelled: only the labelled ones are read
    few[40:60] = labels[40:60]
    got = group_means(M, few, transform="log1p_cp10k", chunk_elements=CHUNK)
    want = dense_group_means(log1p_cp10k(X)[40:60], labels[40:60])
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-6, atol=1e-6)


def test_chunked_gene_mean_var_equal_in_memory(held):
    X, M = held
    for transform, E in (("log1p_cp10k", log1p_cp10k(X).astype(np.float64)), (None, X.astype(np.float64))):
        mean, var = gene_mean_var(M, transform=transform, ddof=1, chunk_elements=CHUNK)
        np.testing.assert_allclose(mean, E.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(var, E.var(0, ddof=1), rtol=1e-6, atol=1e-9)
    rows = np.arange(0, X.shape[0], 2)
    mean, var = gene_mean_var(M, rows=rows, chunk_elements=CHUNK)
    np.testing.assert_allclose(var, X[rows].astype(np.float64).var(0), rtol=1e-6, atol=1e-9)


def test_weighted_group_sums_with_nan_skipped():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 6))
    X[rng.random(X.shape) < 0.1] = np.nan
    W = sparse.random(3, 40, density=0.5, random_state=3)
    sums, counts = group_sums(X, W, skipna=True, chunk_elements=12)
    np.testing.assert_allclose(sums, W @ np.nan_to_num(X), rtol=1e-12)
    member = (W.toarray() != 0).astype(float)
    np.testing.assert_array_equal(counts, member @ np.isfinite(X))
    got = group_means(X, np.repeat(["x", "y"], 20), skipna=True, chunk_elements=12)
    want = dense_group_means(X, np.repeat(["x", "y"], 20), skipna=True)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-12)


def test_checks_read_every_value_not_only_the_first():
    X = _counts(n=400, n_genes=50)
    X = np.minimum(X, 20)  # low-depth counts: no value above 20 in the first 10,000 values ...
    X[-1, -1] = 31  # ... but the screen has larger counts further on
    for M in (X, sparse.csr_matrix(X)):
        assert is_count_matrix(M, chunk_elements=500)
        assert check_expression(M, chunk_elements=500)
    Y = X.copy()
    Y[-2, 3] = 0.5  # one non-integer value at the end: not counts
    assert not is_count_matrix(sparse.csr_matrix(Y), chunk_elements=500)
    with pytest.raises(ValueError, match=r"non-integer values up to 31: neither raw counts"):  # nor log data
        check_expression(sparse.csr_matrix(Y), chunk_elements=500)
    assert not check_expression(sparse.csr_matrix(np.log1p(Y)), chunk_elements=500)
    Y[-2, 3] = -1.0
    for check in (check_finite_nonnegative, check_expression):
        with pytest.raises(ValueError, match=r"adata\.X contains negative values \(min -1[,)]"):
            check(Y, name="adata.X", chunk_elements=500)
    Y[-3, 3] = np.nan  # NaN is reported first, wherever it is
    for check in (check_finite_nonnegative, check_expression):
        with pytest.raises(ValueError, match="NaN or infinite"):
            check(sparse.csr_matrix(Y), chunk_elements=500)
    assert not is_count_matrix(np.log1p(X))
    assert not check_expression(np.log1p(X))
    assert is_count_matrix(sparse.csr_matrix((3, 4)))  # no stored value


def test_utils_checks_go_through_the_chunked_reader():
    X = np.zeros((3000, 10), dtype=np.float32)
    X[-1, 0] = 25  # beyond the first 10,000 values
    assert vcell._utils.is_count_matrix(X)


def test_chunk_budget_from_settings(monkeypatch):
    X = np.ones((10, 4))
    monkeypatch.setattr(vcell.settings, "chunk_elements", 8)
    assert [stop - start for start, stop, _ in iter_row_blocks(X)] == [2] * 5
    with pytest.raises(ValueError, match="chunk_elements"):
        next(iter_row_blocks(X, chunk_elements=0))
