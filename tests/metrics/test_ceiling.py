from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from vcell.metrics import ceiling, mse_top_de, pearson_delta


def test_ceiling_constant_cells():
    assert ceiling(mse_top_de, np.ones((10, 3))) == 0.0


def test_ceiling_splits_halves_and_passes_arguments(rng):
    X = rng.normal(size=(11, 4))
    seen = []

    def spy(a, b, ref, *, genes):
        seen.append((a.shape[0], b.shape[0], ref, genes))
        rows = {tuple(r) for r in a} | {tuple(r) for r in b}
        assert len(rows) == 11  # the halves partition the cells
        return 1.0

    assert ceiling(spy, X, "REF", genes=[0], n_splits=4, seed=0) == 1.0
    assert seen == [(5, 6, "REF", [0])] * 4


def test_ceiling_seeded_and_sparse(rng):
    ref = np.zeros(20)
    X = rng.normal(size=(40, 20)) + np.linspace(-1, 1, 20)
    a = ceiling(pearson_delta, X, ref, seed=3)
    assert a == ceiling(pearson_delta, X, ref, seed=3)
    assert a == pytest.approx(ceiling(pearson_delta, sparse.csr_matrix(X), ref, seed=3))
    assert 0.5 < a <= 1.0


def test_ceiling_undefined():
    assert np.isnan(ceiling(mse_top_de, np.ones((1, 3))))
    with pytest.raises(ValueError, match="n_splits"):
        ceiling(mse_top_de, np.ones((4, 3)), n_splits=0)
