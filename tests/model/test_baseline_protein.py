"""Baselines on RNA + protein: joint features, per-modality predictions, cells without proteins."""

from __future__ import annotations

import dataclasses

import mudata as md
import numpy as np
import pytest

import vcell
from vcell._utils import log1p_cp10k, to_dense

SETUP = {"perturbation_key": "perturbation", "control": "control"}


def _sim(n_missing: int = 0) -> md.MuData:
    mdata = vcell.datasets.simulate(
        n_cells=600, n_genes=40, n_perturbations=3, n_combos=1, protein=True, n_proteins=6, seed=0
    )
    if n_missing:
        P = to_dense(mdata["prot"].X).astype(np.float32)
        P[:n_missing] = np.nan
        mdata["prot"].X = P
    return mdata


def _fit(mdata, method: str, **kw) -> vcell.model.Baseline:
    vcell.model.Baseline.setup_anndata(mdata, protein_modality="prot", **SETUP, **kw)
    model = vcell.model.Baseline(mdata, method=method)
    model.train()
    return model


def test_additive_protein_shift_is_the_measured_mean_shift():
    """Additive protein prediction of a single = control cells + (mean of its cells - mean of controls), measured cells only."""
    mdata = _sim(n_missing=60)
    model = _fit(mdata, "additive")
    assert model.protein_names_ == [str(n) for n in mdata["prot"].var_names]
    labels = mdata["rna"].obs["vcell_perturbation"].astype(str).to_numpy()
    P = to_dense(mdata["prot"].X)
    measured = np.isfinite(P).all(1)
    E = np.full(P.shape, np.nan, dtype=np.float32)
    E[measured] = log1p_cp10k(P[measured])
    single = sorted(set(labels) - {"control"} - {lab for lab in labels if "+" in lab})[0]
    shift = E[measured & (labels == single)].mean(0) - E[measured & (labels == "control")].mean(0)
    ctrl = np.flatnonzero(labels == "control")
    pred = model.predict(mdata, perturbation=single, controls=ctrl, modality="prot")
    assert pred.shape == (len(ctrl), 6)
    ok = measured[ctrl]
    np.testing.assert_allclose(pred[ok], np.maximum(E[ctrl][ok] + shift, 0), atol=1e-5)
    assert np.isnan(pred[~ok]).all()  # a control without proteins has nothing to shift
    assert ok.sum() < len(ctrl)


@pytest.mark.parametrize("method", ["mean", "additive", "linear"])
def test_rna_predictions_unchanged_by_proteins(method):
    mdata = _sim(n_missing=60)
    joint = _fit(mdata, method)
    rna = mdata["rna"].copy()
    vcell.model.Baseline.setup_anndata(rna, **SETUP)
    single = vcell.model.Baseline(rna, method=method)
    single.train()
    combo = next(lab for lab in joint.vocab.conditions if "+" in lab)
    for pert in (joint.vocab.atoms[0], combo):
        if method == "additive" or pert != combo:
            a = joint.predict(mdata, perturbation=pert)
            b = single.predict(rna, perturbation=pert)
            assert not np.isnan(a).any()
            if method == "linear":  # one joint G over genes and proteins: close, not identical
                assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
            else:
                np.testing.assert_allclose(a, b, atol=1e-5)


def test_predict_perturbation_writes_both_modalities_and_save_load(tmp_path):
    mdata = _sim()
    model = _fit(mdata, "additive")
    pert = model.vocab.atoms[1]
    assert vcell.tl.predict_perturbation(mdata, model, perturbations=[pert], key_added="pred") is None
    out = mdata
    assert out["prot"].layers["pred"].shape == mdata["prot"].shape
    ctrl = (mdata["rna"].obs["vcell_perturbation"] == "control").to_numpy()
    assert np.isfinite(out["prot"].layers["pred"][ctrl]).all()
    assert np.isnan(out["prot"].layers["pred"][~ctrl]).all()
    model.save(tmp_path / "m")
    loaded = vcell.model.Baseline.load(tmp_path / "m", adata=mdata)
    assert loaded.protein_names_ == model.protein_names_
    for modality in ("rna", "prot"):
        np.testing.assert_array_equal(
            loaded.predict(mdata, perturbation=pert, modality=modality),
            model.predict(mdata, perturbation=pert, modality=modality),
        )


def test_protein_errors():
    mdata = _sim()
    vcell.model.Baseline.setup_anndata(mdata["rna"], **SETUP)
    rna_only = vcell.model.Baseline(mdata["rna"], method="additive")
    rna_only.train()
    pert = rna_only.vocab.atoms[1]
    with pytest.raises(ValueError, match="no proteins"):
        rna_only.predict(perturbation=pert, modality="prot")
    with pytest.raises(ValueError, match="modality must be"):
        rna_only.predict(perturbation=pert, modality="adt")
    with pytest.raises(KeyError, match="'adt'"):
        vcell.model.Baseline.setup_anndata(mdata, protein_modality="adt", **SETUP)
    with pytest.raises(ValueError, match="needs a MuData"):
        vcell.model.Baseline.setup_anndata(mdata["rna"].copy(), protein_modality="prot", **SETUP)
    shuffled = md.MuData({"rna": mdata["rna"].copy(), "prot": mdata["prot"][:500].copy()})
    with pytest.raises(ValueError, match="cells differ between modalities"):
        vcell.model.Baseline.setup_anndata(shuffled, protein_modality="prot", **SETUP)
    no_rna = md.MuData({"gex": mdata["rna"].copy(), "prot": mdata["prot"].copy()})
    with pytest.raises(KeyError, match="no 'rna' modality"):
        vcell.model.Baseline.setup_anndata(no_rna, **SETUP)

    class RnaOnly(vcell.model.Baseline):
        capabilities = dataclasses.replace(vcell.model.Baseline.capabilities, models_proteins=False)

    RnaOnly.setup_anndata(mdata, protein_modality="prot", **SETUP)
    with pytest.raises(ValueError, match="RnaOnly does not model proteins"):
        RnaOnly(mdata)
