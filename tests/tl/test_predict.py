from __future__ import annotations

import numpy as np
import pandas as pd
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
    assert set(adata.uns) - uns_before == {"pred", "vcell_spaces"}
    assert set(adata.uns["vcell_spaces"]) == {"pred"}  # the space of the layer written
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


def test_new_anndata_without_harmonize(trained, kang_path):
    """A fresh AnnData with only the raw perturbation column predicts as a harmonised one; nothing else is written."""
    import anndata as ad

    _, model = trained
    fresh = ad.read_h5ad(kang_path)  # never harmonised: obs["perturbation"] holds the raw labels
    assert "vcell_perturbation" not in fresh.obs
    harmonised = fresh.copy()
    vcell.pp.harmonize(harmonised, perturbation_key="perturbation", control="control")
    obs_before, uns_before, layers_before = fresh.obs.copy(), set(fresh.uns), set(fresh.layers)

    vcell.tl.predict_perturbation(fresh, model, perturbations="IFNb", cell_type="NK", key_added="p")
    vcell.tl.predict_perturbation(harmonised, model, perturbations="IFNb", cell_type="NK", key_added="p")
    np.testing.assert_array_equal(fresh.layers["p"], harmonised.layers["p"])
    np.testing.assert_array_equal(fresh.obs["p_source"], harmonised.obs["p_source"])
    assert (
        fresh.obs["p_source"].sum()
        == ((fresh.obs["cell_type"] == "NK") & (fresh.obs["perturbation"] == "control")).sum()
    )
    pd.testing.assert_frame_equal(fresh.obs.drop(columns="p_source"), obs_before)  # only the documented column added
    assert set(fresh.uns) - uns_before == {"p", "vcell_spaces"}
    assert set(fresh.layers) - layers_before == {"p"}
    np.testing.assert_array_equal(
        model.predict(fresh, perturbation="IFNb"), model.predict(harmonised, perturbation="IFNb")
    )


def test_new_anndata_without_any_label_column(trained, kang_path):
    import anndata as ad

    _, model = trained
    bare = ad.read_h5ad(kang_path)
    del bare.obs["perturbation"]
    with pytest.raises(KeyError, match=r"'vcell_perturbation'.*'perturbation'.*harmonize"):
        vcell.tl.predict_perturbation(bare, model, perturbations="IFNb")
    mask = np.zeros(bare.n_obs, dtype=bool)
    mask[:5] = True
    out = vcell.tl.predict_perturbation(bare, model, perturbations="IFNb", controls=mask, return_adata=True)
    assert out.n_obs == 5  # explicit controls= need no labels


def test_causal_vae_predicts_new_anndata_without_harmonize():
    adata = vcell.datasets.simulate(n_cells=200, n_genes=20, n_perturbations=2, n_combos=0, seed=0)
    fresh = adata.copy()
    vcell.model.CausalVAE.setup_anndata(adata, perturbation_key="perturbation", control="control")
    model = vcell.model.CausalVAE(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, seed=0, accelerator="cpu", trainer_kwargs={"enable_progress_bar": False})
    pert = model.vocab.atoms[0]
    obs_before = fresh.obs.copy()
    # starting cells that are not controls: their own (raw-labelled) perturbation is encoded as in training
    some = np.flatnonzero((fresh.obs["perturbation"] != "control").to_numpy())[:10]
    for controls in (None, some):
        np.testing.assert_allclose(
            model.predict(fresh, perturbation=pert, controls=controls),
            model.predict(adata, perturbation=pert, controls=controls),
            rtol=1e-5,
            atol=1e-6,
        )
    pd.testing.assert_frame_equal(fresh.obs, obs_before)
