from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from scipy import sparse

import vcell
from vcell import datasets


def test_kang2018_shape_and_labels():
    adata = datasets.kang2018()
    assert adata.shape == (1975, 6998)
    assert sparse.issparse(adata.X)
    assert adata.X.dtype == np.float32
    vals = adata.X[:200].data
    np.testing.assert_array_equal(vals, np.round(vals))  # raw counts
    counts = adata.obs["perturbation"].value_counts()
    assert set(counts.index) == {"control", "IFNb"}
    assert counts["control"] == 936
    assert counts["IFNb"] == 1039
    assert adata.obs["cell_type"].nunique() == 7
    assert {"CD4T", "CD14+Mono", "B", "NK"} <= set(adata.obs["cell_type"])


def test_kang2018_is_bundled_not_shared(monkeypatch):
    """The demo data comes from inside the installed package, never from ../shared/data."""
    seen: list[Path] = []
    real_read = ad.read_h5ad

    def spy(filename, *args, **kwargs):
        seen.append(Path(filename).resolve())
        return real_read(filename, *args, **kwargs)

    monkeypatch.setattr(ad, "read_h5ad", spy)
    adata = datasets.kang2018()
    assert adata.n_obs == 1975
    assert len(seen) == 1
    package_dir = Path(vcell.__file__).resolve().parent
    assert seen[0].is_relative_to(package_dir)
    assert "shared" not in seen[0].relative_to(package_dir).parts


def test_available_and_load_by_name():
    assert datasets.available() == ["kang2018"]
    adata = datasets.load("kang2018")
    assert adata.shape == (1975, 6998)


def test_load_by_path(tmp_path):
    path = tmp_path / "sim.h5ad"
    datasets.simulate(n_cells=100, n_genes=10, n_perturbations=2, n_combos=1, seed=0).write_h5ad(path)
    for arg in (path, str(path)):
        adata = datasets.load(arg)
        assert adata.shape == (100, 10)


def test_load_unknown_name_or_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither a bundled dataset.*kang2018"):
        datasets.load("norman2019")
    with pytest.raises(FileNotFoundError, match="nope.h5ad"):
        datasets.load(tmp_path / "nope.h5ad")
