from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from vcell.metrics import METRICS, evaluate, fit_pca, pearson_delta, top_de_genes

N_GENES = 40
PERTS = ["X", "g1", "g2+g3"]


def _adata(X, labels=None):
    obs = pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])])
    if labels is not None:
        obs["perturbation"] = pd.Categorical(labels)
    return ad.AnnData(
        np.asarray(X, dtype=np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)])
    )


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 2.0, N_GENES)

    def cells(n, shift):
        return np.clip(base + shift + rng.normal(0, 0.3, (n, N_GENES)), 0, None)

    shifts = {}
    for i, p in enumerate(PERTS):
        s = np.zeros(N_GENES)
        s[5 * i : 5 * i + 5] = [1.5, -0.4, 1.0, 0.8, -0.3]
        shifts[p] = s
    control = _adata(cells(60, 0))
    Xt = np.vstack([cells(30, shifts[p]) for p in PERTS])
    true = _adata(Xt, np.repeat(PERTS, 30))
    return true, control, shifts


def test_evaluate_perfect_prediction(data):
    true, control, _ = data
    df = evaluate(true, true, control)
    assert list(df.columns) == ["perturbation", "metric", "value"]
    assert len(df) == len(PERTS) * len(METRICS)
    assert list(df["perturbation"].unique()) == sorted(PERTS)
    assert list(df["metric"].unique()) == list(METRICS)
    v = df.set_index(["perturbation", "metric"])["value"]
    for p in PERTS:
        assert v[p, "pearson_delta"] == pytest.approx(1.0)
        assert v[p, "pearson_delta_top_de"] == pytest.approx(1.0)
        assert v[p, "mse_top_de"] == pytest.approx(0.0, abs=1e-12)
        assert v[p, "mse_top_de_normalized"] == pytest.approx(0.0, abs=1e-12)
        assert v[p, "mae"] == pytest.approx(0.0, abs=1e-12)
        assert v[p, "l2_top_expressed"] == pytest.approx(0.0, abs=1e-6)
        assert v[p, "direction_accuracy"] == 1.0
        assert v[p, "energy_distance"] == pytest.approx(0.0, abs=1e-6)
        assert v[p, "mmd"] == pytest.approx(0.0, abs=1e-9)
        assert v[p, "de_overlap"] == 1.0
        assert v[p, "pds"] == 1.0


def test_evaluate_control_baseline_and_mean_prediction(data):
    true, control, shifts = data
    # one predicted cell per perturbation: the control mean ("no change") ...
    ctrl_mean = np.asarray(control.X).mean(axis=0)
    pred = _adata(np.tile(ctrl_mean, (3, 1)), PERTS)
    v = evaluate(pred, true, control).set_index(["perturbation", "metric"])["value"]
    for p in PERTS:
        assert np.isnan(v[p, "pearson_delta"])  # constant (zero, up to float32 round-off) predicted change
        assert v[p, "direction_accuracy"] == 0.0
        assert v[p, "mse_top_de_normalized"] == pytest.approx(1.0)
        assert v[p, "energy_distance"] > 0
    # ... and the true means, which is perfect for the mean-based metrics
    means = np.vstack([np.asarray(true.X)[true.obs["perturbation"] == p].mean(axis=0) for p in PERTS])
    v = evaluate(_adata(means, PERTS), true, control).set_index(["perturbation", "metric"])["value"]
    for p in PERTS:
        assert v[p, "pearson_delta"] == pytest.approx(1.0)
        assert v[p, "mse_top_de"] == pytest.approx(0.0, abs=1e-10)
        assert v[p, "pds"] == 1.0
        assert v[p, "de_overlap"] == 0.0  # one cell among tie-free controls: |z| < sqrt(3), no predicted DE genes


def test_evaluate_matches_pure_functions(data):
    true, control, _ = data
    rng = np.random.default_rng(1)
    pred = true.copy()
    pred.X = pred.X + rng.normal(0, 0.5, pred.shape).astype(np.float32).clip(0)
    df = evaluate(
        pred, true, control, metrics=["pearson_delta_top_de", "pearson_delta"], reference="perturbed_centroid"
    )
    Xt, Xp, Xc = np.asarray(true.X), np.asarray(pred.X), np.asarray(control.X)
    lab = true.obs["perturbation"].to_numpy()
    ref = np.vstack([Xt[lab == p].mean(axis=0) for p in PERTS]).mean(axis=0)
    v = df.set_index(["perturbation", "metric"])["value"]
    for p in PERTS:
        top = top_de_genes(Xt[lab == p], Xc, n_top=20)
        assert v[p, "pearson_delta_top_de"] == pytest.approx(pearson_delta(Xp[lab == p], Xt[lab == p], ref, genes=top))
        assert v[p, "pearson_delta"] == pytest.approx(pearson_delta(Xp[lab == p], Xt[lab == p], ref))


def test_evaluate_options(data):
    true, control, _ = data
    sp_true = true.copy()
    sp_true.X = sparse.csr_matrix(sp_true.X)
    pca = fit_pca(np.asarray(control.X), 5, seed=0)
    df = evaluate(sp_true, true, control, metrics=["mse_top_de", "energy_distance"], pca=pca, ceiling=True)
    assert list(df.columns) == ["perturbation", "metric", "value", "ceiling"]
    assert df["ceiling"].notna().all()
    assert (df.loc[df.metric == "energy_distance", "ceiling"] > 0).all()  # halves differ by sampling noise
    # precomputed DE genes are used as given
    de = {p: np.array([0]) for p in PERTS}
    a = evaluate(true, true, control, metrics=["mse_top_de"], de_genes=de, reference=np.zeros(N_GENES))
    assert a["value"].eq(0).all()


def test_evaluate_ceiling_all_metrics(data):
    true, control, _ = data
    df = evaluate(true, true, control, ceiling=True, n_ceiling_splits=1)
    c = df.set_index(["perturbation", "metric"])["ceiling"]
    assert c.notna().all()
    assert ((c.xs("pearson_delta", level="metric") > 0.5) & (c.xs("pearson_delta", level="metric") <= 1)).all()
    assert ((c.xs("pds", level="metric") > 0) & (c.xs("pds", level="metric") <= 1)).all()


def test_evaluate_single_perturbation_pds_nan(data):
    true, control, _ = data
    one = true[true.obs["perturbation"] == "X"].copy()
    df = evaluate(one, one, control, metrics=["pds", "pearson_delta"])
    assert len(df) == 2
    assert np.isnan(df.loc[df.metric == "pds", "value"].item())


def test_evaluate_errors(data):
    true, control, _ = data
    with pytest.raises(ValueError, match="valid names are .*pearson_delta"):
        evaluate(true, true, control, metrics=["pearson", "mmd"])
    pred = true[true.obs["perturbation"] != "g1"].copy()
    with pytest.raises(ValueError, match="'g1'"):
        evaluate(pred, true, control)
    with pytest.raises(KeyError, match="condition"):
        evaluate(true, true, control, perturbation_key="condition")
    with pytest.raises(ValueError, match="var_names"):
        evaluate(true[:, :10].copy(), true, control)
    counts = true.copy()
    counts.X = np.round(counts.X * 30)
    with pytest.raises(ValueError, match="raw counts"):
        evaluate(counts, true, control)
    with pytest.raises(ValueError, match="reference"):
        evaluate(true, true, control, reference="median")


def test_evaluate_mae_is_cell_evals_mean_absolute_error(data):
    true, control, _ = data
    rng = np.random.default_rng(2)
    pred = true.copy()
    pred.X = (pred.X + rng.normal(0.1, 0.4, pred.shape)).astype(np.float32)
    v = evaluate(pred, true, control, metrics=["mae"]).set_index("perturbation")["value"]
    lab = true.obs["perturbation"].to_numpy()
    for p in PERTS:
        pm, tm = np.asarray(pred.X)[lab == p].mean(0), np.asarray(true.X)[lab == p].mean(0)
        assert v[p] == pytest.approx(np.abs(pm - tm).mean(), rel=1e-6)  # sklearn's mean_absolute_error of the means


def test_evaluate_does_not_modify_inputs(data):
    true, control, _ = data
    before_obs, before_X = true.obs.copy(), np.asarray(true.X).copy()
    evaluate(true, true, control, metrics=["de_overlap", "mmd"])
    pd.testing.assert_frame_equal(true.obs, before_obs)
    np.testing.assert_array_equal(np.asarray(true.X), before_X)
    assert "vcell_de" not in true.uns
    assert not control.uns


def test_evaluate_perturbation_with_one_true_cell(data):
    true, control, _ = data
    keep = np.r_[np.flatnonzero(true.obs["perturbation"] != "X"), np.flatnonzero(true.obs["perturbation"] == "X")[:1]]
    small = true[keep].copy()
    df = evaluate(small, small, control, ceiling=True, n_ceiling_splits=1)
    v = df.set_index(["perturbation", "metric"])
    assert np.isnan(v.loc[("X", "de_overlap"), "value"])  # one true cell: no gene passes FDR < 0.05
    assert v.loc[("X", "pearson_delta_top_de"), "value"] == pytest.approx(1.0)  # top genes by |z| of the one cell
    assert v.xs("X", level="perturbation")["ceiling"].isna().all()
    assert v.xs("g1", level="perturbation")["ceiling"].notna().all()


def test_pathway_nets_add_pathway_agreement(shared_data):
    # no importorskip("decoupler"): pathway_agreement is vcell's own (test_pathway checks it against decoupler), and
    # importing decoupler here only cost this test its import time
    net = pd.read_csv(shared_data / "prior_knowledge" / "progeny_human_top500.csv")
    genes = net["target"].drop_duplicates().to_numpy()[:600]
    rng = np.random.default_rng(0)
    var = pd.DataFrame(index=genes)
    ctrl = ad.AnnData(rng.gamma(2.0, 0.5, (30, genes.size)).astype(np.float32), var=var)
    shift = np.where(np.isin(genes, net.loc[net["source"] == "Hypoxia", "target"]), 1.0, 0.0)
    X = np.vstack([ctrl.X[:15] + shift, ctrl.X[15:] - shift]).astype(np.float32)
    true = ad.AnnData(X, obs=pd.DataFrame({"perturbation": ["A"] * 15 + ["B"] * 15}), var=var)
    df = evaluate(true, true, ctrl, metrics=["pearson_delta"], pathway_nets={"progeny": net}, ceiling=True)
    pa = df[df["metric"] == "pathway_agreement_progeny"]
    assert pa["perturbation"].tolist() == ["A", "B"]
    np.testing.assert_allclose(pa["value"], 1.0)
    assert pa["ceiling"].isna().all()
    flipped = true.copy()
    flipped.obs["perturbation"] = ["B"] * 15 + ["A"] * 15
    df2 = evaluate(flipped, true, ctrl, metrics=["pearson_delta"], pathway_nets={"progeny": net})
    assert (df2.loc[df2["metric"] == "pathway_agreement_progeny", "value"] < 0).all()


def test_perturbed_centroid_metrics_equal_numpy(data):
    """pearson_delta_pert(_top_de): Pearson r of the changes from Systema's centroid, as numpy computes it."""
    true, control, _ = data
    rng = np.random.default_rng(2)
    pred = true.copy()
    pred.X = np.clip(pred.X + rng.normal(0, 0.5, pred.shape), 0, None).astype(np.float32)
    # a centroid of "training" perturbations: the unweighted mean of their mean profiles
    train_means = rng.uniform(0.5, 2.5, (4, N_GENES))
    centroid = train_means.mean(axis=0)
    df = evaluate(
        pred, true, control, metrics=["pearson_delta_pert", "pearson_delta_top_de_pert"], perturbed_centroid=centroid
    )
    v = df.set_index(["perturbation", "metric"])["value"]
    Xt, Xp, Xc = np.asarray(true.X, np.float64), np.asarray(pred.X, np.float64), np.asarray(control.X)
    lab = true.obs["perturbation"].to_numpy()
    for p in PERTS:
        dp, dt = Xp[lab == p].mean(axis=0) - centroid, Xt[lab == p].mean(axis=0) - centroid
        top = top_de_genes(Xt[lab == p], Xc, n_top=20)  # DE vs control, as pearson_delta_top_de
        assert v[p, "pearson_delta_pert"] == pytest.approx(np.corrcoef(dp, dt)[0, 1], abs=1e-9)
        assert v[p, "pearson_delta_top_de_pert"] == pytest.approx(np.corrcoef(dp[top], dt[top])[0, 1], abs=1e-9)
    # the control reference gives other numbers: the reference is not ignored
    ctrl = evaluate(pred, true, control, metrics=["pearson_delta"]).set_index("perturbation")["value"]
    assert not np.allclose(ctrl.to_numpy(), v.xs("pearson_delta_pert", level="metric").to_numpy())
    # without a centroid: that of the perturbations in true; reference="perturbed_centroid" takes the given one
    own = evaluate(pred, true, control, metrics=["pearson_delta_pert"]).set_index("perturbation")["value"]
    ref = np.vstack([Xt[lab == p].mean(axis=0) for p in PERTS]).mean(axis=0)
    assert own["g1"] == pytest.approx(pearson_delta(Xp[lab == "g1"], Xt[lab == "g1"], ref))
    same = evaluate(
        pred, true, control, metrics=["pearson_delta"], reference="perturbed_centroid", perturbed_centroid=centroid
    )
    np.testing.assert_allclose(same["value"], v.xs("pearson_delta_pert", level="metric").to_numpy())
    with pytest.raises(ValueError, match="perturbed_centroid has 3 entries"):
        evaluate(pred, true, control, metrics=["pearson_delta_pert"], perturbed_centroid=np.zeros(3))
