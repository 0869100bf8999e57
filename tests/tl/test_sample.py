"""tl.sample_perturbation: sampled cells with per-gene predictive intervals."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import vcell


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    n = 200
    X = 2.0 + 0.3 * rng.normal(size=(2 * n, 12))
    X[n:, :3] += 1.0
    obs = pd.DataFrame(
        {"perturbation": ["control"] * n + ["A"] * (n // 2) + ["B"] * (n // 2), "cell_type": ["t1", "t2"] * n},
        index=[f"c{i}" for i in range(2 * n)],
    )
    adata = ad.AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(12)]))
    vcell.model.ResidualDiffusion.setup_anndata(adata, perturbation_key="perturbation", control="control")
    # these tests check sample_perturbation's fields, intervals and seeding, not the model's fit: tiny and 2 epochs
    model = vcell.model.ResidualDiffusion(adata, mean_model="additive", n_components=3, n_hidden=8, n_layers=1)
    model.train(max_epochs=2, seed=0, accelerator="cpu", trainer_kwargs={"enable_progress_bar": False})
    return adata, model


def test_fields_and_intervals(fitted):
    adata, model = fitted
    before = adata.copy()
    out = vcell.tl.sample_perturbation(
        adata, model, perturbations=["A", "B"], n_samples=200, level=0.8, seed=0, n_steps=10
    )
    assert out.shape == (400, 12)
    assert list(out.obs["perturbation"].cat.categories) == ["A", "B"]
    assert out.obs_names.is_unique
    lo, hi, mean = (out.varm[f"vcell_sample_{k}"] for k in ("lower", "upper", "mean"))
    assert list(lo.columns) == ["A", "B"]
    assert list(lo.index) == list(adata.var_names)
    assert (lo.to_numpy() <= mean.to_numpy()).all()
    assert (mean.to_numpy() <= hi.to_numpy()).all()
    a = out.X[out.obs["perturbation"].to_numpy() == "A"]
    np.testing.assert_allclose(lo["A"].to_numpy(), np.quantile(a, 0.1, axis=0), rtol=1e-5)
    np.testing.assert_allclose(hi["A"].to_numpy(), np.quantile(a, 0.9, axis=0), rtol=1e-5)
    inside = ((a >= lo["A"].to_numpy()) & (a <= hi["A"].to_numpy())).mean()
    assert 0.78 <= inside <= 0.84  # an 80% interval holds about 80% of its own samples
    np.testing.assert_array_equal(out.layers["vcell_sample_upper"][-1], hi["B"].to_numpy(dtype=np.float32))
    assert out.uns["vcell_sample"]["params"]["level"] == 0.8
    assert out.uns["vcell_sample"]["params"]["n_steps"] == 10
    # the input is untouched
    assert adata.obs.equals(before.obs)
    assert list(adata.layers) == list(before.layers)
    assert adata.uns.keys() == before.uns.keys()


def test_cell_type_and_seed(fitted):
    adata, model = fitted
    kw = {"perturbations": "A", "cell_type": "t1", "seed": 3, "key_added": "s", "n_steps": 5}
    a = vcell.tl.sample_perturbation(adata, model, **kw)
    b = vcell.tl.sample_perturbation(adata, model, **kw)
    np.testing.assert_array_equal(a.X, b.X)
    src = adata.obs.loc[a.obs["vcell_source_cell"], "cell_type"]
    assert set(src) == {"t1"}
    assert "s_lower" in a.varm
    assert "s_upper" in a.layers


def test_errors(fitted):
    adata, model = fitted
    with pytest.raises(ValueError, match="duplicates"):
        vcell.tl.sample_perturbation(adata, model, perturbations=["A", "A"])
    with pytest.raises(ValueError, match="level"):
        vcell.tl.sample_perturbation(adata, model, perturbations="A", level=1.5)
    with pytest.raises(ValueError, match="n_samples"):
        vcell.tl.sample_perturbation(adata, model, perturbations="A", n_samples=1)
    with pytest.raises(KeyError, match="cell_type 'nk'"):
        vcell.tl.sample_perturbation(adata, model, perturbations="A", cell_type="nk")
    with pytest.raises(
        ValueError, match=r"Baseline cannot sample cells.*models that can: CausalVAE, ResidualDiffusion"
    ):
        vcell.tl.sample_perturbation(adata, model.mean_model, perturbations="A")


def test_uns_records_class_name_seed_and_cells_drawn(fitted, monkeypatch):
    adata, model = fitted
    monkeypatch.setattr(vcell.settings, "seed", 5)
    out = vcell.tl.sample_perturbation(adata, model, perturbations="A", cell_type="t2", n_steps=5)
    info = out.uns["vcell_sample"]
    assert info["model"] == "ResidualDiffusion"
    assert info["params"]["seed"] == 5  # settings.seed, as used
    n_start = int(((adata.obs["cell_type"] == "t2") & (adata.obs["perturbation"] == "control")).sum())
    assert info["params"]["n_samples"] == n_start == out.n_obs  # one per starting cell, not -1
