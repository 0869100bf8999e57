"""cell-eval export (``vcell.bench.export_cell_eval``, ``bench.run(export_dir=)``) and Systema's centroid in bench.run."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import vcell
from vcell._utils import log1p_cp10k

METRICS = ["pearson_delta", "pearson_delta_pert", "pearson_delta_top_de_pert", "mae"]


@pytest.fixture(scope="module")
def sim():
    return vcell.datasets.simulate(n_cells=1200, n_genes=40, n_perturbations=6, n_combos=6, frac_epistatic=0.5, seed=3)


@pytest.fixture(scope="module")
def exported(sim, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    res = vcell.bench.run(
        sim,
        models=["control", "mean", "additive"],
        splits=["combo_half"],
        seeds=[1],
        metrics=METRICS,
        ceiling=False,
        max_controls=150,
        progress=False,
        export_dir=out,
    )
    return res, pd.read_csv(out / "manifest.csv")


def _split(sim):
    a = sim.copy()
    vcell.pp.harmonize(a, perturbation_key="perturbation", control="control")
    vcell.bench.split(a, kind="combo_half", seed=1)
    return a


def test_run_export_is_cell_eval_input(sim, exported):
    res, manifest = exported
    assert list(manifest["model"]) == ["control", "mean", "additive"]
    assert (manifest["real"] == manifest["real"].iloc[0]).all()  # every model predicted every condition: one real
    real = ad.read_h5ad(manifest["real"].iloc[0])
    a = _split(sim)
    test = a.obs["vcell_split"].to_numpy() == "test"
    cond = a.obs["vcell_perturbation"].astype(str).to_numpy()
    held = sorted(set(res.results["perturbation"]))
    assert real.var_names.equals(sim.var_names)
    labels = real.obs["target_gene"].astype(str).to_numpy()
    assert set(labels) == {"non-targeting", *held}
    # the true cells are the held-out cells' log1p(CP10k), condition by condition
    X_log = log1p_cp10k(sim.X)
    for h in held:
        np.testing.assert_allclose(real.X[labels == h], X_log[test & (cond == h)], rtol=1e-5, atol=1e-6)
    ctrl_real = real.X[labels == "non-targeting"]
    for _, row in manifest.iterrows():
        pred = ad.read_h5ad(row["pred"])
        lp = pred.obs["target_gene"].astype(str).to_numpy()
        assert pred.var_names.equals(real.var_names)
        assert set(lp) == set(labels)  # cell-eval requires the same labels, the control included, in both files
        np.testing.assert_array_equal(pred.X[lp == "non-targeting"], ctrl_real)  # the same controls in both
        assert pred.X.dtype == np.float32
        assert np.isfinite(pred.X).all()
        assert pred.X.min() >= 0
        assert all((lp == h).sum() == 150 for h in held)  # one predicted cell per (capped) control cell
        assert pred.uns["model"] == row["model"]
        assert pred.uns["split"] == "combo_half"
        # the files hold the cells vcell scored: their means give vcell's mae
        mae = res.results.query("model == @row.model and metric == 'mae'").set_index("perturbation")["value"]
        for h in held:
            mine = np.abs(pred.X[lp == h].mean(0, dtype=np.float64) - real.X[labels == h].mean(0, dtype=np.float64))
            assert mine.mean() == pytest.approx(mae[h], rel=1e-5)
    assert "cell-eval run -ap" in manifest["command"].iloc[0]


def test_run_pearson_delta_pert_uses_the_training_centroid(sim, exported):
    """Systema's reference in bench.run: mean over training (train + val) perturbed conditions of their means."""
    res, manifest = exported
    a = _split(sim)
    split = a.obs["vcell_split"].to_numpy()
    cond = a.obs["vcell_perturbation"].astype(str).to_numpy()
    X_log = log1p_cp10k(sim.X).astype(np.float64)
    train_perts = sorted(set(cond[(split != "test") & (cond != "control")]))
    centroid = np.mean([X_log[(split != "test") & (cond == p)].mean(0) for p in train_perts], axis=0)
    real = ad.read_h5ad(manifest["real"].iloc[0])
    labels = real.obs["target_gene"].astype(str).to_numpy()
    held = sorted(set(res.results["perturbation"]))
    checked = 0
    for _, row in manifest.iterrows():
        pred = ad.read_h5ad(row["pred"])
        lp = pred.obs["target_gene"].astype(str).to_numpy()
        got = res.results.query("model == @row.model and metric == 'pearson_delta_pert'").set_index("perturbation")
        for h in held:
            dp = pred.X[lp == h].mean(0, dtype=np.float64) - centroid
            dt = real.X[labels == h].mean(0, dtype=np.float64) - centroid
            assert got.loc[h, "value"] == pytest.approx(np.corrcoef(dp, dt)[0, 1], abs=1e-5)
            checked += 1
    assert checked == 3 * len(held)
    # a held-out condition's own cells would move the centroid: not the reference used
    leaky = np.mean([X_log[cond == p].mean(0) for p in sorted(set(cond) - {"control"})], axis=0)
    assert not np.allclose(leaky, centroid, atol=1e-3)


def _cells(X, labels, var):
    return ad.AnnData(
        X, obs=pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))]), var=var
    )


@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    var = pd.DataFrame(index=[f"g{i}" for i in range(12)])
    true = _cells(sparse.csr_matrix(rng.gamma(2.0, 0.5, (6, 12)).astype(np.float32)), ["A"] * 3 + ["B+C"] * 3, var)
    ctrl = _cells(rng.gamma(2.0, 0.5, (5, 12)).astype(np.float32), ["control"] * 5, var)
    pred = _cells(rng.normal(1.0, 1.0, (8, 12)).astype(np.float32), ["A"] * 4 + ["C+B"] * 3 + ["D"], var)
    return pred, true, ctrl


def test_export_cell_eval_function(small, tmp_path):
    pred, true, ctrl = small
    n_neg = int((pred.X[:7] < 0).sum())
    assert n_neg > 0
    table = vcell.bench.export_cell_eval(
        {"m 1": pred, "m2": pred}, true, control=ctrl, out_dir=tmp_path, pert_col="perturbation", control_pert="ctrl"
    )
    assert list(table["model"]) == ["m 1", "m2"]
    assert table["pred"].iloc[0].endswith("pred_m_1.h5ad")
    assert (table["n_clipped"] == n_neg).all()  # D (no true cells) is left out, and its values with it
    real = ad.read_h5ad(table["real"].iloc[0])
    assert sparse.issparse(real.X)  # sparse input stays sparse
    assert real.obs["perturbation"].astype(str).tolist() == ["ctrl"] * 5 + ["A"] * 3 + ["B+C"] * 3
    np.testing.assert_array_equal(real.X[5:].toarray(), true.X.toarray())
    p = ad.read_h5ad(table["pred"].iloc[0])
    assert p.obs["perturbation"].astype(str).tolist() == ["ctrl"] * 5 + ["A"] * 4 + ["B+C"] * 3  # "C+B" is "B+C"
    np.testing.assert_array_equal(p.X[:5], ctrl.X)
    np.testing.assert_array_equal(p.X[5:], np.clip(pred.X[:7], 0, None))
    assert table[["n_pred_cells", "n_real_cells", "n_control_cells"]].iloc[0].tolist() == [7, 6, 5]


def test_export_cell_eval_refuses_bad_input(small, tmp_path):
    pred, true, ctrl = small
    with pytest.raises(ValueError, match="negative"):
        vcell.bench.export_cell_eval(pred, true, control=ctrl, out_dir=tmp_path, clip_negative=False)
    assert not (tmp_path / "pred_pred.h5ad").exists()  # no half-written file is left
    with pytest.raises(ValueError, match=r"\['B\+C'\] .* no predicted cells"):
        vcell.bench.export_cell_eval(pred[pred.obs["perturbation"] == "A"], true, control=ctrl, out_dir=tmp_path)
    with pytest.raises(ValueError, match="control_pert 'A'"):
        vcell.bench.export_cell_eval(pred, true, control=ctrl, out_dir=tmp_path, control_pert="A")
    counts = true.copy()
    counts.X = sparse.csr_matrix(np.ones(true.shape, dtype=np.float32))
    with pytest.raises(ValueError, match="raw counts"):
        vcell.bench.export_cell_eval(pred, counts, control=ctrl, out_dir=tmp_path)
    other = pred.copy()
    other.var_names = [f"h{i}" for i in range(12)]
    with pytest.raises(ValueError, match="var_names"):
        vcell.bench.export_cell_eval(other, true, control=ctrl, out_dir=tmp_path)
    with pytest.raises(KeyError, match="condition"):
        vcell.bench.export_cell_eval(pred, true, control=ctrl, out_dir=tmp_path, perturbation_key="condition")


@pytest.mark.slow  # cell-eval's DE compiles with numba on first use (about 100 s on 2 loaded cores)
def test_cell_eval_scores_the_export_as_vcell_does(tmp_path):
    """cell-eval itself on exported files: its mae, pearson_delta, PDS and overlap_at_N equal vcell's."""
    pytest.importorskip("cell_eval")
    from cell_eval import MetricsEvaluator

    rng = np.random.default_rng(5)
    n_genes = 60
    var = pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    dens = rng.uniform(0.2, 0.9, n_genes)

    def cells(n, shift):
        X = rng.gamma(2.0, 0.6, (n, n_genes)) * (rng.random((n, n_genes)) < dens) + shift
        return np.clip(X, 0, None).astype(np.float32) + np.float32(0.01)  # fractional: log1p-like for cell-eval

    perts = ["P1", "P2", "P3", "P4"]
    shifts = {p: np.where(rng.random(n_genes) < 0.2, rng.normal(0, 1.0, n_genes), 0.0) for p in perts}
    ctrl = _cells(cells(200, 0), ["control"] * 200, var)
    true = _cells(np.vstack([cells(40, shifts[p]) for p in perts]), np.repeat(perts, 40), var)
    pred = _cells(np.vstack([cells(60, 0.7 * shifts[p]) for p in perts]), np.repeat(perts, 60), var)
    table = vcell.bench.export_cell_eval(pred, true, control=ctrl, out_dir=tmp_path)
    ev = MetricsEvaluator(
        adata_pred=table["pred"].iloc[0],
        adata_real=table["real"].iloc[0],
        control_pert="non-targeting",
        pert_col="target_gene",
        num_threads=1,
        outdir=str(tmp_path / "ce"),
    )
    res, _ = ev.compute(profile="full", write_csv=False)
    ce = res.to_pandas().set_index("perturbation")
    mine = vcell.metrics.evaluate(pred, true, ctrl, metrics=["mae", "pearson_delta", "pds", "de_overlap"])
    mine = mine.pivot(index="perturbation", columns="metric", values="value")
    np.testing.assert_allclose(ce.loc[perts, "mae"], mine.loc[perts, "mae"], atol=1e-6)
    np.testing.assert_allclose(ce.loc[perts, "pearson_delta"], mine.loc[perts, "pearson_delta"], atol=1e-6)
    np.testing.assert_allclose(ce.loc[perts, "discrimination_score_l1"], mine.loc[perts, "pds"])
    np.testing.assert_allclose(ce.loc[perts, "overlap_at_N"], mine.loc[perts, "de_overlap"].fillna(0.0), atol=1e-12)
