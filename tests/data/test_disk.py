"""Row subsets of a (backed) AnnData written to disk block by block."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import vcell
from vcell.data._disk import backed_row_subset


@pytest.mark.parametrize("kind", ["dense", "csr", "csc", "backed_csr", "backed_csc", "backed_dense"])
def test_backed_row_subset_holds_the_rows_in_order(hold, tmp_path, monkeypatch, kind):
    """X rows (any storage), obs, obsm and layers of the selected cells, in the order asked; X stays on disk."""
    monkeypatch.setattr(vcell.settings, "chunk_elements", 12)  # blocks of 2 rows: many appends
    rng = np.random.default_rng(0)
    X = rng.poisson(0.7, (9, 6)).astype(np.float32)
    a = ad.AnnData(
        X=hold(kind, X),
        obs=pd.DataFrame({"g": pd.Categorical(list("aabbccdde"))}, index=[f"c{i}" for i in range(9)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(6)]),
    )
    a.obsm["emb"] = np.arange(18.0).reshape(9, 2)
    a.layers["counts"] = sparse.csr_matrix(X * 2)
    a.uns["note"] = {"k": 1}
    rows = np.array([7, 0, 3, 8, 4])
    sub = backed_row_subset(a, rows, tmp_path / "sub.h5ad")
    try:
        assert sub.isbacked
        got = sub.X[:]
        got = got.toarray() if sparse.issparse(got) else np.asarray(got)
        np.testing.assert_array_equal(got, X[rows])
        assert sub.obs_names.tolist() == [f"c{i}" for i in rows]
        assert sub.obs["g"].tolist() == list("dabec")
        np.testing.assert_array_equal(sub.obsm["emb"], a.obsm["emb"][rows])
        np.testing.assert_array_equal(sub.layers["counts"].toarray(), X[rows] * 2)
        assert sub.uns["note"] == {"k": 1}
        sub.uns["note"]["k"] = 2  # its own copy
        assert a.uns["note"]["k"] == 1
    finally:
        sub.file.close()


def test_backed_row_subset_of_no_rows(tmp_path):
    a = ad.AnnData(X=sparse.csr_matrix(np.ones((3, 2), np.float32)))
    sub = backed_row_subset(a, np.array([], dtype=int), tmp_path / "empty.h5ad")
    assert sub.shape == (0, 2)
    sub.file.close()
