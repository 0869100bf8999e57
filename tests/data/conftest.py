"""Fixtures of the data-layer tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from scipy import sparse


@pytest.fixture
def hold(tmp_path: Path) -> Callable[[str, np.ndarray], object]:
    """``hold(kind, X)``: ``X`` held as ``kind`` (dense, dense64, csr, csc, backed_csr, backed_csc, backed_dense).

    Backed kinds are read from an h5ad written to ``tmp_path`` (kept open by the test).
    """

    def held_as(kind: str, X: np.ndarray) -> object:
        if kind == "dense":
            return X
        if kind == "dense64":
            return X.astype(np.float64)
        if kind in ("csr", "csc"):
            return sparse.csr_matrix(X) if kind == "csr" else sparse.csc_matrix(X)
        stored = {"backed_csr": sparse.csr_matrix(X), "backed_csc": sparse.csc_matrix(X), "backed_dense": X}[kind]
        path = tmp_path / f"{kind}.h5ad"
        ad.AnnData(X=stored).write_h5ad(path)
        return ad.read_h5ad(path, backed="r").X

    return held_as
