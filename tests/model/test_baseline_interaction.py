"""``Baseline(method="interaction")``: shared genetic-interaction coefficients fitted on the training doubles."""

from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import vcell
from vcell.module import BaselineModule, fit_interaction

SINGLES = ["A", "B", "C", "D", "E", "F"]
HELD_OUT = ["A+B", "C+D", "E+F", "A+F"]


def _doubles_data(
    c1: float = 0.8, c3: float = -0.6, seed: int = 0, n: int = 30, n_genes: int = 40, noise: float = 0.05
) -> tuple[ad.AnnData, dict[str, np.ndarray]]:
    """Log-space data (far from 0: no clamping), two cell types; each double's shift is exactly ``c1 (dA + dB) + c3 dA dB``, plus cell noise."""
    rng = np.random.default_rng(seed)
    base = {"t1": rng.uniform(8, 9, n_genes), "t2": rng.uniform(8, 9, n_genes)}
    shift = {a: rng.normal(0, 1.0, n_genes) * (rng.random(n_genes) < 0.5) for a in SINGLES}
    for a, b in itertools.combinations(SINGLES, 2):
        shift[f"{a}+{b}"] = c1 * (shift[a] + shift[b]) + c3 * shift[a] * shift[b]
    rows, obs = [], []
    for ct in ("t1", "t2"):
        for cond in ["control", *shift]:
            eff = shift[cond] if cond != "control" else 0.0
            rows.append(base[ct] + eff + rng.normal(0, noise, (n, n_genes)))
            obs += [(cond, ct)] * n
    X = np.clip(np.concatenate(rows), 0, None).astype(np.float32)
    obs = pd.DataFrame(obs, columns=["perturbation", "cell_type"], index=[f"c{i}" for i in range(len(obs))])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])), shift


def _fit(adata: ad.AnnData, method: str, **kw) -> vcell.model.Baseline:
    vcell.model.Baseline.setup_anndata(
        adata, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
    )
    model = vcell.model.Baseline(adata, method=method, **kw)
    model.train()
    return model


def _delta(model: vcell.model.Baseline, adata: ad.AnnData, perturbation: str) -> np.ndarray:
    ctrl = (adata.obs["vcell_perturbation"] == "control").to_numpy()
    return model.predict(adata, perturbation=perturbation).mean(0) - adata.X[ctrl].mean(0)


def test_interaction_recovers_planted_coefficients_and_beats_additive_on_held_out_doubles():
    adata, shift = _doubles_data()
    train = adata[~adata.obs["perturbation"].isin(HELD_OUT)].copy()
    model = _fit(train, "interaction")
    additive = _fit(train.copy(), "additive")
    coef = model.interaction_coef_
    assert coef["sum"] == pytest.approx(0.8, abs=0.05)
    assert coef["product"] == pytest.approx(-0.6, abs=0.05)
    assert coef["saturation"] == pytest.approx(0.0, abs=0.1)
    assert model.n_interaction_doubles_ == 15 - len(HELD_OUT)
    assert model.interaction_ridge_ < 1  # cross-validation keeps the interaction terms
    err_gi = np.mean([np.sum((_delta(model, train, d) - shift[d]) ** 2) for d in HELD_OUT])
    err_add = np.mean([np.sum((_delta(additive, train, d) - shift[d]) ** 2) for d in HELD_OUT])
    assert err_gi < 0.1 * err_add
    # singles are predicted as by additive
    np.testing.assert_allclose(_delta(model, train, "A"), _delta(additive, train, "A"), atol=1e-5)


def test_interaction_on_additive_doubles_stays_additive():
    """Doubles that are exactly additive: the fitted coefficients stay at (1, 0, 0)."""
    adata, shift = _doubles_data(c1=1.0, c3=0.0)
    train = adata[~adata.obs["perturbation"].isin(HELD_OUT)].copy()
    coef = _fit(train, "interaction").interaction_coef_
    np.testing.assert_allclose([coef["sum"], coef["product"], coef["saturation"]], [1, 0, 0], atol=0.03)


def test_interaction_without_training_doubles_warns_and_equals_additive():
    adata, _ = _doubles_data()
    singles = adata[adata.obs["perturbation"].isin(["control", *SINGLES])].copy()
    with pytest.warns(UserWarning, match="falling back to the additive baseline"):
        model = _fit(singles, "interaction")
    assert model.interaction_coef_ == {"sum": 1.0, "product": 0.0, "saturation": 0.0}
    additive = _fit(singles.copy(), "additive")
    np.testing.assert_allclose(
        model.predict(perturbation="A+B"), additive.predict(perturbation="A+B"), rtol=1e-6, atol=1e-6
    )


def test_interaction_bad_inputs_raise():
    adata, _ = _doubles_data(n=5)
    vcell.model.Baseline.setup_anndata(
        adata, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
    )
    with pytest.raises(ValueError, match="interaction_ridge must be a finite number >= 0"):
        vcell.model.Baseline(adata, method="interaction", interaction_ridge=-1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        vcell.model.Baseline(adata, method="interactions")
    # a single never seen as a single: unpredictable, exactly as for additive
    train = adata[~adata.obs["perturbation"].isin(["F", "control"]) | (adata.obs["perturbation"] == "control")].copy()
    model = _fit(train, "interaction")
    with pytest.raises(KeyError, match="interaction baseline needs every component of 'A\\+F' seen as a single"):
        model.predict(perturbation="A+F")
    with pytest.raises(KeyError, match="never seen"):
        model.predict(perturbation="A+Z")
    with pytest.raises(ValueError, match=r"xtx \(n, 3, 3\)"):
        fit_interaction(np.zeros((2, 2, 2)), np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match="at least two training doubles"):
        fit_interaction(np.eye(3)[None], np.zeros((1, 3)), np.zeros(1))
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        fit_interaction(np.eye(3)[None], np.zeros((1, 3)), np.zeros(1), ridge=-0.5)


def test_fixed_ridge_and_the_infinite_ridge_is_additive():
    adata, _ = _doubles_data(n=10)
    train = adata[~adata.obs["perturbation"].isin(HELD_OUT)].copy()
    model = _fit(train, "interaction", interaction_ridge=0.0)
    assert model.interaction_ridge_ == 0.0
    assert model.interaction_cv_ == {}
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4, 30, 3))
    r = X @ np.array([0.3, -0.2, 0.1]) + rng.normal(0, 0.01, (4, 30))
    xtx, xty, yty = np.einsum("ngi,ngj->nij", X, X), np.einsum("ngi,ng->ni", X, r), np.einsum("ng,ng->n", r, r)
    beta, lam, cv = fit_interaction(xtx, xty, yty)
    np.testing.assert_allclose(beta, [0.3, -0.2, 0.1], atol=0.02)
    assert lam < 1
    assert cv[float("inf")] > cv[lam]
    np.testing.assert_array_equal(fit_interaction(xtx, xty, yty, ridge=float("inf"))[0], np.zeros(3))


def test_pair_features_sum_over_pairs_and_saturation_is_same_sign_min():
    m = BaselineModule(3, 3, 1, method="interaction")
    m.atom_shift[0] = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, 0.0], [-1.0, -1.0, 2.0]])
    m.atom_shift[1] = m.atom_shift[0]
    enc = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 2.0, 0.0]])
    s, product, saturation, multi = m.pair_features(enc, torch.tensor([0, 0, -1]))
    a, b, c = m.atom_shift[0]
    torch.testing.assert_close(s[0], a + b)
    torch.testing.assert_close(product[0], a * b)
    torch.testing.assert_close(saturation[0], torch.tensor([1.0, 0.0, 0.0]))  # same sign: min |.|; else 0
    torch.testing.assert_close(product[1], a * b + a * c + b * c)
    torch.testing.assert_close(saturation[1], torch.tensor([1.0 + (-1.0 * 0) + 0.0, 0.0 + (-1.0) + 0.0, 0.0 + 0.5]))
    torch.testing.assert_close(s[2], 2 * b)
    assert multi[:, 0].tolist() == [1.0, 1.0, 0.0]
    m.gi_coef.copy_(torch.tensor([0.5, 0.25, -1.0]))
    torch.testing.assert_close(m.shift(enc, torch.tensor([0, 0, 0]))[2], 2 * b)  # a single: additive
    torch.testing.assert_close(m.shift(enc, torch.tensor([0, 0, 0]))[0], 0.5 * (a + b) + 0.25 * a * b - saturation[0])
