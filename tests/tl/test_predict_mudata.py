"""tl.predict_perturbation with a MuData: RNA and protein layers (CausalVAE with proteins)."""

from __future__ import annotations

import mudata as md
import numpy as np
import pytest

import vcell

QUIET = {"enable_progress_bar": False}


def _sim() -> md.MuData:
    return vcell.datasets.simulate(
        n_cells=200, n_genes=20, n_perturbations=2, n_combos=0, n_proteins=5, protein=True, seed=1
    )


@pytest.fixture(scope="module")
def fitted():
    mdata = _sim()
    vcell.model.CausalVAE.setup_anndata(
        mdata, perturbation_key="perturbation", control="control", protein_modality="prot"
    )
    model = vcell.model.CausalVAE(mdata, n_latent=4, n_hidden=16)
    model.train(max_epochs=3, seed=0, accelerator="cpu", trainer_kwargs=QUIET)
    return mdata, model


def test_writes_rna_and_protein_layers(fitted):
    mdata, model = fitted
    pert = model.atoms_[0]
    vcell.tl.predict_perturbation(mdata, model, perturbations=pert, key_added="pred")
    rna, prot = mdata["rna"], mdata["prot"]
    ctrl = (rna.obs["vcell_perturbation"] == "control").to_numpy()
    assert rna.layers["pred"].shape == (200, 20)
    assert prot.layers["pred"].shape == (200, 5)
    for layer in (rna.layers["pred"], prot.layers["pred"]):
        assert layer.dtype == np.float32
        assert np.isnan(layer[~ctrl]).all()
        assert np.isfinite(layer[ctrl]).all()
    np.testing.assert_array_equal(rna.obs["pred_source"].to_numpy(), ctrl)
    np.testing.assert_array_equal(prot.layers["pred"][ctrl], model.predict(mdata, perturbation=pert, modality="prot"))
    np.testing.assert_array_equal(rna.layers["pred"][ctrl], model.predict(mdata, perturbation=pert))
    assert rna.uns["pred"]["layers"] == ["pred"]
    assert rna.uns["pred"]["protein_layers"] == ["pred"]
    assert prot.uns["pred"]["params"]["perturbations"] == [pert]


def test_protein_modality_in_another_cell_order(fitted):
    """A new MuData whose protein modality lists the cells in another order: rows land on the right cells."""
    mdata, model = fitted
    order = np.random.default_rng(0).permutation(mdata.n_obs)
    other = md.MuData({"rna": mdata["rna"].copy(), "prot": mdata["prot"][order].copy()})
    del other["rna"].obsm["vcell_protein"]
    perts = list(model.atoms_)
    vcell.tl.predict_perturbation(other, model, perturbations=perts, key_added="p")
    for p in perts:
        key = f"p_{p}"
        back = other["prot"].layers[key][np.argsort(order)]
        ctrl = (mdata["rna"].obs["vcell_perturbation"] == "control").to_numpy()
        np.testing.assert_allclose(back[ctrl], model.predict(mdata, perturbation=p, modality="prot"), rtol=1e-6)
        assert np.isnan(back[~ctrl]).all()


def test_return_adata_gives_a_mudata(fitted):
    mdata, model = fitted
    out = vcell.tl.predict_perturbation(mdata, model, perturbations=model.atoms_[:2], return_adata=True)
    n_ctrl = int((mdata["rna"].obs["vcell_perturbation"] == "control").sum())
    assert isinstance(out, md.MuData)
    assert out["rna"].shape == (2 * n_ctrl, 20)
    assert out["prot"].shape == (2 * n_ctrl, 5)
    assert list(out["prot"].var_names) == list(mdata["prot"].var_names)
    assert list(out["rna"].obs_names) == list(out["prot"].obs_names)


def test_rna_only_model_with_a_mudata_writes_rna_only():
    mdata = _sim()
    vcell.model.CausalVAE.setup_anndata(mdata, perturbation_key="perturbation", control="control")
    model = vcell.model.CausalVAE(mdata, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, seed=0, accelerator="cpu", trainer_kwargs=QUIET)
    vcell.tl.predict_perturbation(mdata, model, perturbations=model.atoms_[0])
    assert mdata["rna"].layers["vcell_pred"].shape == (200, 20)
    assert "vcell_pred" not in mdata["prot"].layers
    with pytest.raises(KeyError, match="no 'rna' modality"):
        vcell.tl.predict_perturbation(md.MuData({"gex": mdata["rna"]}), model, perturbations=model.atoms_[0])


def test_sample_perturbation_returns_both_modalities(fitted):
    """sample_perturbation of a protein model: a MuData, proteins with their own means and intervals."""
    mdata, model = fitted
    perts = list(model.atoms_)
    out = vcell.tl.sample_perturbation(mdata, model, perturbations=perts, n_samples=30, key_added="s", seed=0)
    assert isinstance(out, md.MuData)
    rna, prot = out["rna"], out["prot"]
    assert rna.shape == (60, 20)
    assert prot.shape == (60, 5)
    assert list(prot.var_names) == model.protein_names_
    assert prot.obs_names.equals(rna.obs_names)
    assert list(prot.obs["perturbation"]) == list(rna.obs["perturbation"])
    for p in perts:
        rows = (prot.obs["perturbation"] == p).to_numpy()
        np.testing.assert_allclose(prot.varm["s_mean"][p].to_numpy(), prot.X[rows].mean(0), rtol=1e-6)
    assert (prot.varm["s_lower"].to_numpy() <= prot.varm["s_upper"].to_numpy()).all()
    assert prot.layers["s_upper"].shape == prot.shape
    assert prot.uns["s"]["model"] == "CausalVAE"
    again = vcell.tl.sample_perturbation(mdata, model, perturbations=perts, n_samples=30, key_added="s", seed=0)
    np.testing.assert_array_equal(again["prot"].X, prot.X)
