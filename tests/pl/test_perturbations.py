from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import vcell

GENES = [f"g{i}" for i in range(6)]


def _screen() -> ad.AnnData:
    """Exact group means: control 0; A, B, C, D shift one gene each; A+B additive, C+D with an extra shift."""
    shifts = {
        "control": np.zeros(6),
        "A": np.eye(6)[0],
        "B": np.eye(6)[1],
        "C": np.eye(6)[2],
        "D": np.eye(6)[3],
        "A+B": np.eye(6)[0] + np.eye(6)[1],
        "C+D": np.eye(6)[2] + np.eye(6)[3] + 2 * np.eye(6)[5],
    }
    labels, rows = [], []
    for name, shift in shifts.items():
        for _ in range(10):
            labels.append(name)
            rows.append(shift + 1.0)
    adata = ad.AnnData(np.asarray(rows, dtype=np.float32), obs=pd.DataFrame({"vcell_perturbation": labels}))
    adata.obs_names = [f"c{i}" for i in range(adata.n_obs)]
    adata.var_names = GENES
    return adata


def test_interaction_map_scores_and_highlights_the_nonadditive_double():
    adata = _screen()
    pred = pd.DataFrame([[2, 2, 1, 1, 1, 1], [1, 1, 2, 2, 1, 3]], index=["A+B", "C+D"], columns=GENES, dtype=float)
    fig = vcell.pl.interaction_map(adata, pred={"model": pred}, return_fig=True)
    assert isinstance(fig, Figure)
    ax_sc, ax_bar = fig.axes
    # bars sorted by observed score: C+D (|2 e5| = 2) first, A+B (additive: 0) second
    assert [t.get_text() for t in ax_bar.get_yticklabels()] == ["C+D", "A+B"]
    np.testing.assert_allclose([p.get_width() for p in ax_bar.patches], [2.0, 0.0], atol=1e-6)
    # median rule: C+D is the one above the median and is drawn red, A+B grey
    colors = [p.get_facecolor()[:3] for p in ax_bar.patches]
    assert colors[0] != colors[1]
    # predicted scores (markers) in the same order: C+D 2, A+B 0; the legend gives the AUPRC (1.0)
    offsets = ax_bar.collections[0].get_offsets()
    np.testing.assert_allclose(np.asarray(offsets)[:, 0], [2.0, 0.0], atol=1e-6)
    assert any("AUPRC 1.00" in t.get_text() for t in ax_bar.get_legend().get_texts())
    # scatter: one point per gene and double, additive x vs observed y
    pts = np.concatenate([np.asarray(c.get_offsets()) for c in ax_sc.collections])
    assert pts.shape == (12, 2)
    assert np.isclose(pts[:, 1] - pts[:, 0], 2.0).sum() == 1  # the one gene off the diagonal


def test_interaction_map_uses_given_labels_and_checks_inputs():
    adata = _screen()
    fig = vcell.pl.interaction_map(adata, labels={"A+B": True, "C+D": False}, return_fig=True)
    ax_bar = fig.axes[1]
    assert "1/2 non-additive" in ax_bar.get_title()
    with pytest.raises(KeyError, match="labels give no value"):
        vcell.pl.interaction_map(adata, labels={"A+B": True})
    with pytest.raises(KeyError, match="missing"):
        vcell.pl.interaction_map(adata, doubles=["A+E"])
    with pytest.raises(KeyError, match="no row for the double"):
        vcell.pl.interaction_map(adata, pred=pd.DataFrame(np.zeros((1, 6)), index=["A+B"], columns=GENES))
    with pytest.raises(KeyError, match="perturbation_key"):
        vcell.pl.interaction_map(adata, perturbation_key="nope")
    with pytest.raises(TypeError, match="pred must be"):
        vcell.pl.interaction_map(adata, pred=np.zeros((2, 6)))


def _dose_screen() -> ad.AnnData:
    doses = [0.1, 1.0, 10.0]
    rows, labels, dose = [], [], []
    for _ in range(8):
        rows.append(np.ones(6))
        labels.append("control")
        dose.append(0.0)
        for d, frac in zip(doses, [0.1, 0.5, 1.0], strict=True):
            rows.append(np.ones(6) + frac * np.array([2.0, -1.0, 0, 0, 0, 0]))
            labels.append("drug")
            dose.append(d)
    adata = ad.AnnData(np.asarray(rows, dtype=np.float32), obs=pd.DataFrame({"vcell_perturbation": labels}))
    adata.obs["vcell_dose"] = dose
    adata.obs_names = [f"c{i}" for i in range(adata.n_obs)]
    adata.var_names = GENES
    return adata


def test_dose_response_score_is_the_fraction_of_the_top_dose_response():
    adata = _dose_screen()
    grid = np.array([0.1, 0.3, 1.0, 3.0, 10.0])
    pred = pd.DataFrame(1.0 + np.outer(grid / 10, [2.0, -1.0, 0, 0, 0, 0]), index=grid, columns=GENES)
    fig = vcell.pl.dose_response(adata, "drug", n_top=2, pred={"m": pred}, return_fig=True)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    observed = ax.containers[0].lines[0]
    np.testing.assert_allclose(observed.get_xdata(), [0.1, 1.0, 10.0])
    np.testing.assert_allclose(observed.get_ydata(), [0.1, 0.5, 1.0], atol=1e-6)
    curve = next(line for line in ax.get_lines() if line.get_label() == "m")
    np.testing.assert_allclose(curve.get_ydata(), grid / 10, atol=1e-6)


def test_dose_response_per_gene_panels_and_errors():
    adata = _dose_screen()
    fig = vcell.pl.dose_response(adata, "drug", genes=["g0", "g1"], return_fig=True)
    assert [a.get_title() for a in fig.axes] == ["g0", "g1"]
    np.testing.assert_allclose(fig.axes[1].containers[0].lines[0].get_ydata(), [0.9, 0.5, 0.0], atol=1e-6)
    with pytest.raises(KeyError, match="not in adata.var_names"):
        vcell.pl.dose_response(adata, "drug", genes="zz")
    with pytest.raises(KeyError, match="perturbation 'other'"):
        vcell.pl.dose_response(adata, "other")
    with pytest.raises(KeyError, match="dose_key"):
        vcell.pl.dose_response(adata, "drug", dose_key="nope")
    bad = adata.copy()
    bad.obs.loc[bad.obs["vcell_perturbation"] == "drug", "vcell_dose"] = 0.0
    with pytest.raises(ValueError, match="above 0"):
        vcell.pl.dose_response(bad, "drug")


def test_perturbation_embedding_from_a_table_and_from_mean_responses():
    emb = pd.DataFrame([[0, 1, 0], [0, 1.1, 0], [3, 0, 1], [3, 0.1, 1.2]], index=["A", "B", "C", "D"], dtype=float)
    fig = vcell.pl.perturbation_embedding(emb, color={"A": "x", "B": "x", "C": "y", "D": "y"}, return_fig=True)
    ax = fig.axes[0]
    coords = np.concatenate([np.asarray(c.get_offsets()) for c in ax.collections])
    assert coords.shape == (4, 2)
    # A and B (and C and D) are neighbours on the map, the two groups far apart
    groups = [np.asarray(c.get_offsets()) for c in ax.collections]
    within = max(np.linalg.norm(g[0] - g[1]) for g in groups)
    between = np.linalg.norm(groups[0].mean(0) - groups[1].mean(0))
    assert between > 5 * within
    assert sorted(t.get_text() for t in ax.texts) == ["A", "B", "C", "D"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["x", "y"]

    adata = _screen()
    fig = vcell.pl.perturbation_embedding(adata, labels=["C+D"], return_fig=True)
    ax = fig.axes[0]
    assert len(ax.collections[0].get_offsets()) == 6  # every perturbation, not the control
    assert [t.get_text() for t in ax.texts] == ["C+D"]


def test_perturbation_embedding_errors():
    emb = pd.DataFrame(np.eye(3), index=["A", "B", "C"])
    with pytest.raises(ValueError, match="method"):
        vcell.pl.perturbation_embedding(emb, method="tsne")
    with pytest.raises(ValueError, match="at least 3"):
        vcell.pl.perturbation_embedding(emb.iloc[:2])
    with pytest.raises(KeyError, match="color has no value"):
        vcell.pl.perturbation_embedding(emb, color={"A": 1.0})
    with pytest.raises(KeyError, match="not on the map"):
        vcell.pl.perturbation_embedding(emb, labels=["Z"])


def test_benchmark_splits_means_and_intervals_per_split():
    rows = []
    for model, split, seed in [(m, s, k) for m in ["mean", "VAE"] for s in ["B", "NK"] for k in [0, 1, 2]]:
        value = {"mean": 0.5, "VAE": 0.7}[model] + (0.1 if split == "NK" else 0.0) + 0.01 * seed
        rows.append({"model": model, "split": split, "seed": seed, "metric": "pearson_delta", "value": value})
        rows.append({"model": model, "split": split, "seed": seed, "metric": "error", "value": np.nan})
    res = pd.DataFrame(rows).assign(ceiling=lambda d: np.where(d["split"] == "B", 0.9, 0.8))
    fig = vcell.pl.benchmark_splits(res, return_fig=True)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["B", "NK"]
    mean_c, vae_c = ax.containers  # baseline first
    np.testing.assert_allclose(mean_c.lines[0].get_ydata(), [0.51, 0.61], atol=1e-9)
    np.testing.assert_allclose(vae_c.lines[0].get_ydata(), [0.71, 0.81], atol=1e-9)
    assert mean_c.lines[0].get_xdata()[0] < vae_c.lines[0].get_xdata()[0] < 1  # dodged within the split
    dashes = [c for c in ax.collections if c.get_linestyle()[0][1] is not None]  # the ceilings (dashed)
    ceilings = sorted(round(float(seg[0][1]), 6) for c in dashes for seg in c.get_segments())
    assert ceilings == [0.8, 0.9]
    with pytest.raises(KeyError, match="models"):
        vcell.pl.benchmark_splits(res, models=["nope"])
    with pytest.raises(KeyError, match="metrics"):
        vcell.pl.benchmark_splits(res, metrics="mmd")
    with pytest.raises(KeyError, match="split"):
        vcell.pl.benchmark_splits(res.drop(columns="split"))


def test_interaction_map_additive_prediction_ties_at_the_prevalence():
    adata = _screen()
    add = pd.DataFrame([[2, 2, 1, 1, 1, 1], [1, 1, 2, 2, 1, 1]], index=["A+B", "C+D"], columns=GENES, dtype=float)
    noisy = add + np.array([[1e-7], [3e-7]]).astype(np.float32)  # float32 round-off of an additive predictor
    fig = vcell.pl.interaction_map(adata, pred={"additive": noisy}, return_fig=True)
    ax_bar = fig.axes[1]
    np.testing.assert_array_equal(np.asarray(ax_bar.collections[0].get_offsets())[:, 0], [0.0, 0.0])
    assert any("AUPRC 0.50" in t.get_text() for t in ax_bar.get_legend().get_texts())


@pytest.mark.slow  # UMAP's numba compilation takes ~20 s in a fresh process
def test_perturbation_embedding_umap_is_seeded():
    rng = np.random.default_rng(0)
    emb = pd.DataFrame(rng.normal(size=(12, 5)), index=[f"p{i}" for i in range(12)])
    a = vcell.pl.perturbation_embedding(emb, method="umap", seed=1, labels=False, return_fig=True)
    b = vcell.pl.perturbation_embedding(emb, method="umap", seed=1, labels=False, return_fig=True)
    np.testing.assert_allclose(a.axes[0].collections[0].get_offsets(), b.axes[0].collections[0].get_offsets())
    assert a.axes[0].get_xlabel() == "UMAP1"


def test_perturbation_embedding_umap_passes_the_seed(monkeypatch: pytest.MonkeyPatch):
    import scanpy as sc

    seen = {}

    def neighbors(adata, **kwargs):
        seen["neighbors"] = kwargs["random_state"]

    def umap(adata, **kwargs):
        seen["umap"] = kwargs["random_state"]
        adata.obsm["X_umap"] = np.asarray(adata.X)[:, :2]

    monkeypatch.setattr(sc.pp, "neighbors", neighbors)
    monkeypatch.setattr(sc.tl, "umap", umap)
    monkeypatch.setattr(vcell.settings, "seed", 7)
    emb = pd.DataFrame(np.arange(15.0).reshape(5, 3), index=list("ABCDE"))
    fig = vcell.pl.perturbation_embedding(emb, method="umap", return_fig=True)
    assert seen == {"neighbors": 7, "umap": 7}
    np.testing.assert_allclose(fig.axes[0].collections[0].get_offsets(), emb.to_numpy()[:, :2])
