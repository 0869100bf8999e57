from __future__ import annotations

import numpy as np
import pytest

import vcell


@pytest.fixture(scope="module")
def trained(kang_path):
    import anndata as ad

    adata = ad.read_h5ad(kang_path)
    vcell.model.Baseline.setup_anndata(
        adata, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
    )
    model = vcell.model.Baseline(adata, method="additive")
    model.train()
    return adata, model


def test_layers_written_only_on_selected_controls(trained):
    adata, model = trained
    adata = adata.copy()
    X_before = adata.X.copy()
    obs_before, uns_before, layers_before = set(adata.obs), set(adata.uns), set(adata.layers)
    vcell.tl.predict_perturbation(adata, model, perturbations=["IFNb"], cell_type="CD4T", key_added="pred")
    assert set(adata.layers) - layers_before == {"pred"}
    assert set(adata.obs) - obs_before == {"pred_source"}
    assert set(adata.uns) - uns_before == {"pred"}
    assert (adata.X != X_before).nnz == 0
    layer = adata.layers["pred"]
    assert layer.shape == adata.shape
    assert layer.dtype == np.float32
    sel = ((adata.obs["cell_type"] == "CD4T") & (adata.obs["perturbation"] == "control")).to_numpy()
    np.testing.assert_array_equal(adata.obs["pred_source"].to_numpy(), sel)
    assert np.isfinite(layer[sel]).all()
    assert np.isnan(layer[~sel]).all()
    assert adata.uns["pred"]["params"]["perturbations"] == ["IFNb"]
    np.testing.assert_allclose(layer[sel], model.predict(adata, perturbation="IFNb", controls=sel))


def test_several_perturbations_get_one_layer_each(trained):
    adata, model = trained
    adata = adata.copy()
    vcell.tl.predict_perturbation(adata, model, perturbations=["IFNb", "control"], key_added="p")
    assert {"p_IFNb", "p_control"} <= set(adata.layers)


def test_return_adata(trained):
    adata, model = trained
    before = adata.copy()
    out = vcell.tl.predict_perturbation(adata, model, perturbations="IFNb", cell_type="B", return_adata=True)
    n_b = int(((adata.obs["cell_type"] == "B") & (adata.obs["perturbation"] == "control")).sum())
    assert out.shape == (n_b, adata.n_vars)
    assert (out.obs["perturbation"] == "IFNb").all()
    assert set(out.obs["vcell_source_cell"]) <= set(adata.obs_names)
    assert list(out.var_names) == list(adata.var_names)
    assert "vcell_pred" not in adata.layers
    assert set(adata.obs.columns) == set(before.obs.columns)


def test_errors(trained):
    adata, model = trained
    with pytest.raises(KeyError, match="LPS"):
        vcell.tl.predict_perturbation(adata, model, perturbations="LPS", return_adata=True)
    with pytest.raises(KeyError, match="Neuron"):
        vcell.tl.predict_perturbation(adata, model, perturbations="IFNb", cell_type="Neuron", return_adata=True)
    with pytest.raises(ValueError, match="empty"):
        vcell.tl.predict_perturbation(adata, model, perturbations=[], return_adata=True)
    with pytest.raises(ValueError, match="genes|var_names"):
        vcell.tl.predict_perturbation(adata[:, :100].copy(), model, perturbations="IFNb", return_adata=True)


def test_uns_records_class_name_and_seed_used(trained, monkeypatch):
    adata, model = trained
    adata = adata.copy()
    monkeypatch.setattr(vcell.settings, "seed", 7)
    vcell.tl.predict_perturbation(adata, model, perturbations="IFNb", cell_type="B", key_added="p")
    assert adata.uns["p"]["model"] == "Baseline"  # the plain class name, not its repr "'Baseline'"
    assert adata.uns["p"]["params"]["seed"] == 7  # the seed used (settings.seed), not a -1 placeholder
    out = vcell.tl.predict_perturbation(adata, model, perturbations="IFNb", cell_type="B", seed=3, return_adata=True)
    assert out.uns["vcell_pred"]["model"] == "Baseline"
    assert out.uns["vcell_pred"]["params"]["seed"] == 3
