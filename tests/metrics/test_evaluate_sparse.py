"""evaluate reads sparse and backed matrices without densifying them whole, with the dense results."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from vcell.metrics import evaluate

N_GENES = 40
PERTS = ["A", "B", "C+D"]


def _log_expression(rng, n, shift):
    """log1p-like expression with many exact zeros, as real log1p(CP10k) data."""
    X = np.log1p(rng.poisson(np.exp(0.3 + shift), size=(n, N_GENES)).astype(np.float64))
    return X.astype(np.float32)


def _adata(X, labels=None):
    obs = pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])])
    if labels is not None:
        obs["perturbation"] = pd.Categorical(labels)
    return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))


@pytest.fixture(scope="module")
def dense():
    rng = np.random.default_rng(0)
    shifts = {p: np.zeros(N_GENES) for p in PERTS}
    for i, p in enumerate(PERTS):
        shifts[p][4 * i : 4 * i + 4] = [1.2, -0.8, 0.9, 1.5]
    control = _adata(_log_expression(rng, 80, np.zeros(N_GENES)))
    true = _adata(np.vstack([_log_expression(rng, 45, shifts[p]) for p in PERTS]), np.repeat(PERTS, 45))
    pred = _adata(np.vstack([_log_expression(rng, 30, 0.7 * shifts[p]) for p in PERTS]), np.repeat(PERTS, 30))
    return pred, true, control


def _held(adata, kind, path):
    out = adata.copy()
    if kind == "csr":
        out.X = sparse.csr_matrix(out.X)
    elif kind == "csc":
        out.X = sparse.csc_matrix(out.X)
    elif kind.startswith("backed"):
        out.X = sparse.csr_matrix(out.X) if kind == "backed_csr" else out.X
        out.write_h5ad(path)
        return ad.read_h5ad(path, backed="r")
    return out


@pytest.mark.parametrize("kind", ["csr", "csc", "backed_csr", "backed_dense"])
def test_evaluate_sparse_and_backed_equal_dense(dense, kind, tmp_path):
    kw = {"ceiling": True, "n_ceiling_splits": 2, "max_cells": 25, "n_comps": 5, "seed": 3}
    want = evaluate(*dense, **kw)
    held = [_held(a, kind, tmp_path / f"{name}.h5ad") for a, name in zip(dense, ("pred", "true", "ctrl"), strict=True)]
    got = evaluate(*held, **kw)
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got[["perturbation", "metric"]], want[["perturbation", "metric"]])
    for col in ("value", "ceiling"):
        np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), rtol=1e-6, atol=1e-9, equal_nan=True)


def test_evaluate_mixed_dense_prediction_sparse_truth(dense):
    pred, true, control = dense
    t, c = true.copy(), control.copy()
    t.X, c.X = sparse.csr_matrix(t.X), sparse.csr_matrix(c.X)
    kw = {"metrics": ["pearson_delta", "energy_distance", "mmd"], "max_cells": 20, "seed": 0}
    want = evaluate(pred, true, control, **kw)
    got = evaluate(pred, t, c, **kw)
    np.testing.assert_allclose(got["value"].to_numpy(), want["value"].to_numpy(), rtol=1e-6, atol=1e-9)
