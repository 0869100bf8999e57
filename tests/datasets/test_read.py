from __future__ import annotations

import sys
import types

import anndata as ad
import mudata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from vcell import datasets
from vcell._utils import mudata_no_pull


def _tiny_adata(n: int = 6) -> ad.AnnData:
    X = sparse.csr_matrix(np.arange(n * 4, dtype=np.float32).reshape(n, 4))
    obs = pd.DataFrame(
        {"guide": ["ctrl", "A", "B"] * (n // 3), "perturbation": ["old"] * n},
        index=[f"c{i}" for i in range(n)],
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["g0", "g1", "g2", "g3"]))


def _write_gears(folder, *, gene_name: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    conditions = ["ctrl", "ctrl", "A+ctrl", "A+ctrl", "A+B", "B+ctrl"]
    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(conditions),
            "cell_type": ["K562"] * 6,
            "condition_name": [f"K562_{c}_1+1" for c in conditions],
            "dose_val": ["1+1"] * 6,
            "control": [1, 1, 0, 0, 0, 0],
        },
        index=[f"cell{i}" for i in range(6)],
    )
    var = pd.DataFrame(index=["ENSG01", "ENSG02", "ENSG03"])
    if gene_name:
        var["gene_name"] = ["A", "B", "C"]
    X = sparse.csr_matrix(np.log1p(np.arange(18, dtype=np.float32).reshape(6, 3)))
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(folder / "perturb_processed.h5ad")


def test_read_h5ad(tmp_path):
    path = tmp_path / "x.h5ad"
    _tiny_adata().write_h5ad(path)
    adata = datasets.read(path)
    assert isinstance(adata, ad.AnnData)
    assert adata.shape == (6, 4)
    assert list(adata.obs["perturbation"]) == ["old"] * 6  # untouched without perturbation_key
    adata = datasets.read(str(path), perturbation_key="guide")
    assert list(adata.obs["perturbation"]) == ["ctrl", "A", "B", "ctrl", "A", "B"]
    with pytest.raises(KeyError, match="'nokey'"):
        datasets.read(path, perturbation_key="nokey")


def test_read_h5mu(tmp_path):
    rna = _tiny_adata()
    prot = ad.AnnData(X=np.ones((6, 2), dtype=np.float32), obs=pd.DataFrame(index=rna.obs_names))
    prot.var_names = ["p0", "p1"]
    with mudata_no_pull():
        mdata = mudata.MuData({"rna": rna, "prot": prot})
        mdata.obs["guide"] = rna.obs["guide"].to_numpy()
        mdata.write_h5mu(tmp_path / "x.h5mu")
    out = datasets.read(tmp_path / "x.h5mu")
    assert isinstance(out, mudata.MuData)
    assert set(out.mod) == {"rna", "prot"}
    assert out["rna"].shape == (6, 4)
    assert out["prot"].shape == (6, 2)
    out = datasets.read(tmp_path / "x.h5mu", perturbation_key="guide")
    assert list(out.obs["perturbation"]) == ["ctrl", "A", "B"] * 2
    assert list(out["rna"].obs["perturbation"]) == ["ctrl", "A", "B"] * 2
    with pytest.raises(KeyError, match="'nokey'"):
        datasets.read(tmp_path / "x.h5mu", perturbation_key="nokey")


def test_read_gears_folder(tmp_path):
    folder = tmp_path / "norman"
    _write_gears(folder)
    adata = datasets.read(folder)
    assert adata.shape == (6, 3)
    assert list(adata.obs["perturbation"]) == ["ctrl", "ctrl", "A+ctrl", "A+ctrl", "A+B", "B+ctrl"]
    assert list(adata.obs["condition"]) == list(adata.obs["perturbation"])  # a copy, labels unchanged
    assert list(adata.var_names) == ["A", "B", "C"]
    assert list(adata.var["gene_id"]) == ["ENSG01", "ENSG02", "ENSG03"]
    assert adata.uns["vcell_source"] == {"format": "gears", "path": str(folder)}
    assert "cell_type" in adata.obs
    assert "condition_name" in adata.obs
    # the file itself reads the same way
    same = datasets.read(folder / "perturb_processed.h5ad")
    assert list(same.var_names) == ["A", "B", "C"]
    assert same.uns["vcell_source"]["format"] == "gears"


def test_read_gears_without_gene_name(tmp_path):
    _write_gears(tmp_path / "d", gene_name=False)
    adata = datasets.read(tmp_path / "d")
    assert list(adata.var_names) == ["ENSG01", "ENSG02", "ENSG03"]
    assert "perturbation" in adata.obs


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.h5ad.*\.h5ad.*\.h5mu.*GEARS"):
        datasets.read(tmp_path / "missing.h5ad")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"unknown data format '\.csv'.*expected an \.h5ad"):
        datasets.read(tmp_path / "table.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a GEARS data folder.*perturb_processed.h5ad"):
        datasets.read(empty)
    # pointing at the parent of a GEARS dataset folder names the subfolder that holds one
    _write_gears(tmp_path / "data" / "norman")
    with pytest.raises(ValueError, match=r"subfolders hold one: \['norman'\]"):
        datasets.read(tmp_path / "data")
    with pytest.raises(KeyError, match="'dose'"):
        datasets.read(tmp_path / "data" / "norman", perturbation_key="dose")


def test_from_pertpy_local_path(tmp_path):
    path = tmp_path / "norman_2019.h5ad"
    _tiny_adata().write_h5ad(path)
    adata = datasets.from_pertpy("norman_2019", path=path)
    assert adata.shape == (6, 4)
    with pytest.raises(FileNotFoundError):
        datasets.from_pertpy("norman_2019", path=tmp_path / "absent.h5ad")


def _fake_pertpy(monkeypatch, **loaders) -> None:
    fake = types.ModuleType("pertpy")
    fake.data = types.SimpleNamespace(**loaders)
    monkeypatch.setitem(sys.modules, "pertpy", fake)


def test_from_pertpy_offline_error(monkeypatch):
    calls = []

    def offline():
        calls.append(1)
        msg = "Temporary failure in name resolution"
        raise OSError(msg)

    _fake_pertpy(monkeypatch, norman_2019=offline)
    with pytest.raises(ConnectionError, match=r"norman_2019.*name resolution.*path="):
        datasets.from_pertpy("norman_2019")
    assert calls == [1]


def test_from_pertpy_calls_loader_and_rejects_unknown(monkeypatch):
    tiny = _tiny_adata()
    _fake_pertpy(monkeypatch, norman_2019=lambda: tiny)
    assert datasets.from_pertpy("norman_2019") is tiny
    with pytest.raises(ValueError, match=r"no dataset 'norman2019'.*norman_2019"):
        datasets.from_pertpy("norman2019")


def test_from_pertpy_offline_error_real_pertpy(monkeypatch):
    pertpy = pytest.importorskip("pertpy")

    def offline():
        msg = "network is unreachable"
        raise OSError(msg)

    monkeypatch.setattr(pertpy.data, "norman_2019", offline)
    with pytest.raises(ConnectionError, match="pass path= to a local copy"):
        datasets.from_pertpy("norman_2019")
