"""FlowMatching on RNA + protein (MuData with a protein modality): joint PCA space, both modalities predicted."""

from __future__ import annotations

import mudata as md
import numpy as np
import pytest
import torch

import vcell
from vcell._utils import log1p_cp10k, to_dense
from vcell.model import FlowMatching
from vcell.model._flow_matching import _joint_space
from vcell.module import FlowMatchingModule

QUIET = {"enable_progress_bar": False}
SMALL = {"n_components": 10, "n_hidden": 64, "n_layers": 2}


def _sim(seed: int = 0, **kw) -> md.MuData:
    args = {"n_cells": 500, "n_genes": 60, "n_perturbations": 3, "n_combos": 0, "n_proteins": 8, "seed": seed}
    return vcell.datasets.simulate(protein=True, **{**args, **kw})


def _setup(mdata) -> None:
    FlowMatching.setup_anndata(mdata, perturbation_key="perturbation", control="control", protein_modality="prot")


def _fit(mdata, *, epochs: int = 40, seed: int = 0, **init) -> FlowMatching:
    model = FlowMatching(mdata, **{**SMALL, **init})
    model.train(max_epochs=epochs, batch_size=128, seed=seed, accelerator="cpu", trainer_kwargs=QUIET)
    return model


def _labels(mdata) -> np.ndarray:
    return mdata["rna"].obs["vcell_perturbation"].astype(str).to_numpy()


@pytest.fixture(scope="module")
def planted():
    """Protein 1 x8 in the first perturbation's cells, protein 2 / 8 in the second's (counts; RNA untouched)."""
    mdata = _sim()
    labels = mdata["rna"].obs["perturbation"].astype(str).to_numpy()
    perts = sorted(set(labels) - {"control"})
    counts = to_dense(mdata["prot"].X).astype(np.float32)
    counts[labels == perts[0], 1] = np.round(counts[labels == perts[0], 1] * 8)
    counts[labels == perts[1], 2] = np.round(counts[labels == perts[1], 2] / 8)
    mdata["prot"].X = counts
    _setup(mdata)
    return mdata, perts, _fit(mdata)


def test_registration_and_joint_space():
    mdata = _sim(n_cells=200, n_genes=30, n_proteins=5)
    _setup(mdata)
    model = FlowMatching(mdata, n_components=6, n_hidden=16, protein_weight=0.5)
    assert model.protein_names_ == [str(n) for n in mdata["prot"].var_names]
    assert model.protein_modality_ == "prot"
    m = model.module
    assert m.n_proteins == 5
    assert tuple(m.pca_components.shape) == (6, 35)
    assert tuple(m.rna_projection.shape) == (6, 30)
    # the protein block (w * log1p(counts per 1e4)) carries protein_weight times the RNA block's total variance
    X = log1p_cp10k(to_dense(mdata["rna"].X)).astype(np.float64)
    P = log1p_cp10k(to_dense(mdata["prot"].X)).astype(np.float64)
    w = float(m.protein_scale)
    np.testing.assert_allclose((w * P).var(0).sum(), 0.5 * X.var(0).sum(), rtol=1e-4)
    # measured cells: coordinates of [x, w p]; decoding the coordinates of a cell = its PCA reconstruction
    x, p = torch.as_tensor(X[:4], dtype=torch.float32), torch.as_tensor(P[:4], dtype=torch.float32)
    z = m.encode(x, p)
    F = np.hstack([X[:4], w * P[:4]])
    C, mu, s = m.pca_components.numpy(), m.pca_mean.numpy(), float(m.scale)
    np.testing.assert_allclose(z.numpy(), (F - mu) @ C.T / s, rtol=1e-4, atol=1e-4)
    recon = ((F - mu) @ C.T) @ C + mu
    np.testing.assert_allclose(m.decode(z).numpy(), recon[:, :30], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m.decode_protein(z).numpy(), recon[:, 30:] / w, rtol=1e-4, atol=1e-4)
    # unmeasured cells (NaN rows, or no proteins at all): coordinates from RNA only
    p_nan = p.clone()
    p_nan[1] = float("nan")
    z_mix = m.encode(x, p_nan)
    z_rna = m.encode(x)
    torch.testing.assert_close(z_mix[[0, 2, 3]], z[[0, 2, 3]])
    torch.testing.assert_close(z_mix[1], z_rna[1])
    # an RNA-only registration of the same data: no protein buffers, RNA-sized components
    rna_only = _sim(n_cells=200, n_genes=30, n_proteins=5)
    FlowMatching.setup_anndata(rna_only, perturbation_key="perturbation", control="control")
    plain = FlowMatching(rna_only, n_components=6, n_hidden=16)
    assert plain.protein_names_ == []
    assert plain.module.n_proteins == 0
    assert tuple(plain.module.pca_components.shape) == (6, 30)
    assert not any("protein" in k or "rna_projection" in k for k in plain.module.state_dict())
    with pytest.raises(ValueError, match="no proteins"):
        plain.module.decode_protein(torch.zeros(1, 6))


def test_rna_projection_by_hand(rng):
    """``rna_projection``: least squares when the space is complete; the PPCA posterior mean otherwise."""
    X, P = rng.normal(size=(40, 4)), rng.normal(size=(40, 2)) * 3.0
    full = _joint_space(X, P, 6, 1.0)  # all 6 components: the RNA block determines the coordinates exactly
    w = full["protein_scale"]
    np.testing.assert_allclose((w * P).var(0).sum(), X.var(0).sum(), rtol=1e-10)
    C, mu, s = full["components"], full["mean"], full["scale"]
    z_lstsq = np.linalg.lstsq(C[:, :4].T, (X - mu[:4]).T, rcond=None)[0].T / s
    np.testing.assert_allclose((X - mu[:4]) @ full["rna_projection"].T, z_lstsq, atol=1e-8)
    part = _joint_space(X, P, 2, 1.0)
    C, mu, s = part["components"], part["mean"], part["scale"]
    F = np.hstack([X, part["protein_scale"] * P])
    a = (F - mu) @ C.T
    lam = (a**2).mean(0)
    s2 = np.mean((X - mu[:4] - a @ C[:, :4]) ** 2)
    Cr = C[:, :4]
    expected = np.linalg.solve(Cr @ Cr.T + s2 * np.diag(1 / lam), Cr) / s
    np.testing.assert_allclose(part["rna_projection"], expected, rtol=1e-8, atol=1e-10)


def test_planted_protein_shift_is_predicted(planted):
    mdata, perts, model = planted
    labels = _labels(mdata)
    P = log1p_cp10k(to_dense(mdata["prot"].X))
    ctrl = P[labels == "control"].mean(0)
    for pert, protein, sign in [(perts[0], 1, 1.0), (perts[1], 2, -1.0)]:
        true = P[labels == pert].mean(0) - ctrl
        pred = model.predict(mdata, perturbation=pert, modality="prot")
        assert pred.shape == ((labels == "control").sum(), 8)
        assert pred.dtype == np.float32
        shift = pred.mean(0) - ctrl
        others = np.delete(shift, protein)
        print(pert, "planted true/pred:", round(true[protein], 3), round(shift[protein], 3), "others", others.round(2))
        assert np.sign(shift[protein]) == sign
        assert 0.7 * abs(true[protein]) < abs(shift[protein]) < 1.3 * abs(true[protein])
        assert abs(shift[protein]) > 2.5 * np.abs(others).max()
    # the third perturbation (no planted shift) keeps its own, small protein changes: nothing leaks into it
    free = model.predict(mdata, perturbation=perts[2], modality="prot").mean(0) - ctrl
    np.testing.assert_allclose(free, P[labels == perts[2]].mean(0) - ctrl, atol=0.2)
    # RNA, trajectories and sampled cells of the same flow
    assert model.predict(mdata, perturbation=perts[0]).shape == ((labels == "control").sum(), 60)
    assert model.get_trajectory(mdata, perturbation=perts[0], n_steps=2).shape == (3, (labels == "control").sum(), 10)
    cells = model.sample(mdata, perturbation=perts[0], n_cells=6, seed=0)
    assert cells.shape == (6, 60)
    prot = cells.obsm["protein"]
    assert list(prot.columns) == model.protein_names_
    assert list(prot.index) == list(cells.obs_names)
    src = mdata["rna"].obs_names.get_indexer(cells.obs["vcell_source_cell"])
    np.testing.assert_allclose(
        prot.to_numpy(), model.predict(mdata, perturbation=perts[0], controls=src, modality="prot"), rtol=1e-6
    )
    np.testing.assert_allclose(cells.X, model.predict(mdata, perturbation=perts[0], controls=src), rtol=1e-6)


def test_residual_and_decoded_proteins(planted):
    """``residual=True`` adds the decoded protein change to each cell's own proteins; ``False`` decodes the end."""
    mdata, perts, model = planted
    labels = _labels(mdata)
    P = log1p_cp10k(to_dense(mdata["prot"].X))[labels == "control"]
    same = model.predict(mdata, perturbation="control", modality="prot")  # identity map: own proteins, ~unchanged
    assert np.abs(same - P).mean() < 0.25 * np.abs(P - P.mean(0)).mean()
    dec = model.predict(mdata, perturbation=perts[0], modality="prot", residual=False)
    res = model.predict(mdata, perturbation=perts[0], modality="prot")
    assert np.isfinite(dec).all()
    assert (dec >= 0).all()
    np.testing.assert_allclose(dec.mean(0), res.mean(0), atol=0.25)  # same mean change, other cell detail
    assert not np.allclose(dec, res)


def test_missing_protein_rows_train_and_predict():
    """~20% of cells without proteins (NaN rows): they train and predict from their RNA, without NaN."""
    mdata = _sim(seed=1, n_cells=300, n_genes=40, n_proteins=6)
    counts = to_dense(mdata["prot"].X).astype(np.float32)
    missing = np.random.default_rng(0).random(mdata.n_obs) < 0.2
    counts[missing] = np.nan
    mdata["prot"].X = counts
    _setup(mdata)
    model = _fit(mdata, epochs=5)
    assert np.isfinite(model.history_["train_loss"].to_numpy()).all()
    ctrl = _labels(mdata) == "control"
    assert (ctrl & missing).any()
    assert (ctrl & ~missing).any()
    pert = model.atoms_[0]
    rna = model.predict(mdata, perturbation=pert)
    prot = model.predict(mdata, perturbation=pert, modality="prot")
    assert np.isfinite(rna).all()
    assert np.isfinite(prot).all()
    assert prot.shape == (ctrl.sum(), 6)
    # an unmeasured control starts from proteins reconstructed from its RNA: close to the measured controls'
    P = log1p_cp10k(to_dense(mdata["prot"].X)[ctrl & ~missing])
    unmeasured = prot[missing[ctrl]]
    assert (
        np.abs(
            unmeasured.mean(0) - model.predict(mdata, perturbation=pert, modality="prot")[~missing[ctrl]].mean(0)
        ).max()
        < 0.5
    )
    assert (
        np.abs(model.predict(mdata, perturbation="control", modality="prot")[missing[ctrl]].mean(0) - P.mean(0)).max()
        < 0.5
    )
    # every non-test cell unmeasured: no joint space can be fitted
    bare = _sim(seed=1, n_cells=100, n_genes=20, n_proteins=3)
    bare["prot"].X = np.full(bare["prot"].shape, np.nan, dtype=np.float32)
    _setup(bare)
    with pytest.raises(ValueError, match="no non-test cell has measured proteins"):
        FlowMatching(bare, n_components=4)


def test_save_load_same_seed_and_predict_perturbation(planted, tmp_path, protein_round_trip):
    mdata, perts, model = planted
    pert = perts[0]
    rna, prot = model.predict(mdata, perturbation=pert), model.predict(mdata, perturbation=pert, modality="prot")
    # save/load, and a fresh MuData (proteins not yet copied into obsm) gets its proteins attached
    protein_round_trip(model, mdata, pert, tmp_path / "fm", rna, prot, load_adata=mdata)
    # same seed, same model (a small one: retraining the planted fixture took as long as the fixture)
    small = _sim(n_cells=150, n_genes=20, n_proteins=4)
    _setup(small)
    first, again = _fit(small, epochs=2, seed=3), _fit(small, epochs=2, seed=3)
    p = first.atoms_[0]
    expected = first.predict(small, perturbation=p, modality="prot")
    np.testing.assert_array_equal(again.predict(small, perturbation=p, modality="prot"), expected)
    assert not np.allclose(_fit(small, epochs=2, seed=4).predict(small, perturbation=p, modality="prot"), expected)
    # tl.predict_perturbation writes both modalities
    vcell.tl.predict_perturbation(mdata, model, perturbations=pert, key_added="fm_pred")
    ctrl = _labels(mdata) == "control"
    assert mdata["rna"].layers["fm_pred"].shape == (mdata.n_obs, 60)
    assert mdata["prot"].layers["fm_pred"].shape == (mdata.n_obs, 8)
    np.testing.assert_array_equal(mdata["rna"].layers["fm_pred"][ctrl], rna)
    np.testing.assert_array_equal(mdata["prot"].layers["fm_pred"][ctrl], prot)
    assert np.isnan(mdata["prot"].layers["fm_pred"][~ctrl]).all()


def test_errors():
    rna_only = _sim(n_cells=150, n_genes=20, n_proteins=3)
    FlowMatching.setup_anndata(rna_only, perturbation_key="perturbation", control="control")
    plain = _fit(rna_only, epochs=1, n_components=4)
    with pytest.raises(ValueError, match="no proteins"):
        plain.predict(perturbation=plain.atoms_[0], modality="prot")
    assert "protein" not in plain.sample(perturbation=plain.atoms_[0], n_cells=3, seed=0).obsm
    with pytest.raises(ValueError, match="modality"):
        plain.predict(perturbation=plain.atoms_[0], modality="adt")
    with pytest.raises(ValueError, match="protein_weight"):
        FlowMatching(rna_only, protein_weight=0.0)
    with pytest.raises(ValueError, match="n_proteins"):
        FlowMatchingModule(3, 1, 2, n_proteins=-1)
    m = FlowMatchingModule(3, 1, 2, n_proteins=2)
    with pytest.raises(ValueError, match="protein_scale"):
        m.set_space(np.eye(2, 5), np.zeros(5), 1.0)
    with pytest.raises(ValueError, match="rna_projection"):
        m.set_space(np.eye(2, 5), np.zeros(5), 1.0, protein_scale=1.0, rna_projection=np.zeros((2, 5)))
