from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import vcell
from vcell._utils import log1p_cp10k


def _planted(seed: int = 0, n: int = 60, n_genes: int = 40) -> tuple[ad.AnnData, dict[str, np.ndarray]]:
    """Log-space data with exactly additive planted shifts: control, A, B, A+B in two cell types."""
    rng = np.random.default_rng(seed)
    base = {"t1": rng.uniform(1, 2, n_genes), "t2": rng.uniform(1, 2, n_genes)}
    shift = {"A": np.zeros(n_genes), "B": np.zeros(n_genes)}
    shift["A"][:5] = 1.0
    shift["B"][5:10] = -0.5
    rows, obs = [], []
    for ct in ("t1", "t2"):
        for cond in ("control", "A", "B", "A+B"):
            eff = sum((shift[a] for a in cond.split("+")), np.zeros(n_genes)) if cond != "control" else 0
            rows.append(base[ct] + eff + rng.normal(0, 0.05, (n, n_genes)))
            obs += [(cond, ct)] * n
    X = np.clip(np.concatenate(rows), 0, None).astype(np.float32)
    obs = pd.DataFrame(obs, columns=["perturbation", "cell_type"], index=[f"c{i}" for i in range(len(obs))])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])), shift


def _fit(adata, method, **kw):
    vcell.model.Baseline.setup_anndata(
        adata, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
    )
    model = vcell.model.Baseline(adata, method=method, **kw)
    model.train()
    return model


def test_additive_recovers_planted_combo_it_never_saw():
    adata, shift = _planted()
    train = adata[adata.obs["perturbation"] != "A+B"].copy()
    model = _fit(train, "additive")
    ctrl = (train.obs["vcell_perturbation"] == "control").to_numpy()
    pred = model.predict(train, perturbation="A+B")
    assert pred.shape == (ctrl.sum(), train.n_vars)
    delta = pred.mean(0) - train.X[ctrl].mean(0)
    np.testing.assert_allclose(delta, shift["A"] + shift["B"], atol=0.05)


def test_control_baseline_returns_controls_and_mean_is_constant_shift():
    adata, _ = _planted()
    ctrl = (adata.obs["perturbation"] == "control").to_numpy()
    np.testing.assert_allclose(_fit(adata.copy(), "control").predict(perturbation="A"), adata.X[ctrl], atol=1e-6)
    model = _fit(adata.copy(), "mean")
    pa, pb = model.predict(perturbation="A"), model.predict(perturbation="B")
    np.testing.assert_allclose(pa, pb)
    pert_mean = adata.X[~ctrl].mean(0) - adata.X[ctrl].mean(0)
    np.testing.assert_allclose(pa.mean(0) - adata.X[ctrl].mean(0), pert_mean, atol=0.02)


def test_additive_cell_type_transfer_uses_other_types_shift():
    adata, shift = _planted()
    held = (adata.obs["cell_type"] == "t2") & (adata.obs["perturbation"] == "A")
    train = adata[~held.to_numpy()].copy()
    model = _fit(train, "additive")
    t2_ctrl = ((train.obs["cell_type"] == "t2") & (train.obs["vcell_perturbation"] == "control")).to_numpy()
    pred = model.predict(train, perturbation="A", controls=t2_ctrl)
    np.testing.assert_allclose(pred.mean(0) - train.X[t2_ctrl].mean(0), shift["A"], atol=0.05)


def test_linear_gene_embedding_predicts_training_conditions():
    adata, shift = _planted()
    adata.var_names = ["A", "B", *adata.var_names[2:]]
    model = _fit(adata, "linear", n_components=3, ridge=1e-6)
    assert model.linear_embedding_mode_ == "gene"
    ctrl = (adata.obs["vcell_perturbation"] == "control").to_numpy()
    d = model.predict(perturbation="A+B").mean(0) - adata.X[ctrl].mean(0)
    assert np.corrcoef(d, shift["A"] + shift["B"])[0, 1] > 0.9


def test_linear_gene_mode_predicts_an_unseen_gene_perturbation():
    adata, _ = _planted()
    adata.var_names = ["A", "B", "C", *adata.var_names[3:]]
    train = adata[adata.obs["perturbation"] != "B"].copy()
    model = _fit(train, "linear", n_components=2)
    assert model.linear_embedding_mode_ == "gene"
    pred_c = model.predict(perturbation="C")  # never seen, but a measured gene
    assert pred_c.shape == (int((train.obs["vcell_perturbation"] == "control").sum()), train.n_vars)
    # Ahlmann-Eltze: an unseen gene's embedding is its row of G; prediction = ctrl + b + G W G[C]
    m = model.module
    G, W, b = (m.lin_G.numpy().astype(np.float64), m.lin_W.numpy().astype(np.float64), m.lin_b.numpy())
    ctrl = train.X[(train.obs["vcell_perturbation"] == "control").to_numpy()]
    expected = np.clip(ctrl + b + G @ W @ G[2], 0, None)
    np.testing.assert_allclose(pred_c, expected, atol=1e-5)
    with pytest.raises(KeyError, match="embedding"):
        model.predict(perturbation="NOT_A_GENE")


def test_mean_baseline_predicts_unseen_perturbations():
    adata, _ = _planted()
    model = _fit(adata, "mean")
    np.testing.assert_allclose(model.predict(perturbation="Z"), model.predict(perturbation="A"))


def test_predict_unknown_perturbation_and_gene_mismatch():
    adata, _ = _planted()
    model = _fit(adata, "additive")
    with pytest.raises(KeyError, match="'Z'"):
        model.predict(perturbation="Z")
    other = adata[:, ::-1].copy()
    with pytest.raises(ValueError, match="order"):
        model.predict(other, perturbation="A")
    fewer = adata[:, :10].copy()
    with pytest.raises(ValueError, match="missing"):
        model.predict(fewer, perturbation="A")


def test_bad_method():
    adata, _ = _planted()
    vcell.model.Baseline.setup_anndata(adata, perturbation_key="perturbation", control="control")
    with pytest.raises(ValueError, match="method"):
        vcell.model.Baseline(adata, method="median")


def test_predict_before_train_raises():
    adata, _ = _planted()
    vcell.model.Baseline.setup_anndata(adata, perturbation_key="perturbation", control="control")
    with pytest.raises(RuntimeError, match="train"):
        vcell.model.Baseline(adata).predict(perturbation="A")


@pytest.mark.parametrize("method", ["additive", "linear"])
def test_save_load_round_trip(tmp_path, method):
    adata, _ = _planted()
    model = _fit(adata, method)
    pred = model.predict(perturbation="A+B")
    model.save(tmp_path / "m", overwrite=True)
    loaded = vcell.model.Baseline.load(tmp_path / "m", adata=adata)
    np.testing.assert_allclose(loaded.predict(perturbation="A+B"), pred, atol=1e-6)
    assert loaded.method == method


def test_counts_are_normalised_before_fitting():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3, (80, 25)).astype(np.float32)
    counts[40:, :3] *= 4
    obs = pd.DataFrame({"perturbation": ["control"] * 40 + ["KO"] * 40}, index=[f"c{i}" for i in range(80)])
    adata = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(25)]))
    vcell.model.Baseline.setup_anndata(adata, perturbation_key="perturbation", control="control")
    model = vcell.model.Baseline(adata, method="additive")
    model.train()
    assert model.counts_
    logx = log1p_cp10k(counts)
    np.testing.assert_allclose(model.predict(perturbation="control", space="log1p_cp10k"), logx[:40], rtol=1e-5)
    shift = logx[40:].mean(0) - logx[:40].mean(0)
    np.testing.assert_allclose(
        model.predict(perturbation="KO", space="log1p_cp10k"), np.clip(logx[:40] + shift, 0, None), atol=1e-4
    )


@pytest.mark.parametrize("method", ["mean", "additive", "linear"])
def test_test_cells_of_a_split_are_never_fitted(method):
    """With obs['vcell_split'], a baseline fits the non-test cells only (as every vcell model): same as a subset."""
    adata, _ = _planted()
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str)
    held = ((adata.obs["cell_type"] == "t2") & (adata.obs["perturbation"] == "A")).to_numpy()
    adata.X[held] += 3.0  # test cells unlike anything else: a fit that used them would show it
    vcell.bench.split(adata, kind="unseen_cell_type", held_out="t2", perturbation_key="perturbation", val_frac=0.0)
    test = (adata.obs["vcell_split"] == "test").to_numpy()
    assert test.any()
    full = _fit(adata.copy(), method)
    sub = _fit(adata[~test].copy(), method)
    t2_ctrl = ((adata.obs["cell_type"] == "t2") & (adata.obs["perturbation"] == "control")).to_numpy()
    for pert in ("A", "B"):
        np.testing.assert_allclose(
            full.predict(adata, perturbation=pert, controls=t2_ctrl),
            sub.predict(adata, perturbation=pert, controls=t2_ctrl),
            rtol=1e-5,
            atol=1e-5,
        )
