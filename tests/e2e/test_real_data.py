"""End-to-end on the real data in ../shared/data (issue: foundation)."""

from __future__ import annotations

import anndata as ad
import numpy as np

import vcell


def test_kang_cd4t_additive_beats_control(kang_path):
    adata = ad.read_h5ad(kang_path)
    vcell.pp.harmonize(adata, perturbation_key="perturbation", control="control")
    vcell.bench.split(adata, kind="unseen_cell_type", held_out="CD4T", seed=0)
    vcell.bench.check_leakage(adata)
    train = adata[adata.obs["vcell_split"] != "test"].copy()
    test = adata[adata.obs["vcell_split"] == "test"]
    assert (test.obs["cell_type"] == "CD4T").all()
    assert (test.obs["perturbation"] == "IFNb").all()

    true = vcell._utils.expression_for_eval(test)
    cd4_ctrl = ((train.obs["cell_type"] == "CD4T") & (train.obs["perturbation"] == "control")).to_numpy()
    ctrl = vcell._utils.expression_for_eval(train[cd4_ctrl])
    de = vcell.metrics.top_de_genes(true, ctrl, n_top=20)
    scores = {}
    for method in ("control", "additive"):
        t = train.copy()
        vcell.model.Baseline.setup_anndata(
            t, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
        )
        model = vcell.model.Baseline(t, method=method)
        model.train()
        pred = model.predict(t, perturbation="IFNb", controls=cd4_ctrl, space="log1p_cp10k")  # the truth's space
        assert pred.shape == (cd4_ctrl.sum(), adata.n_vars)
        scores[method] = (
            vcell.metrics.pearson_delta(pred, true, ctrl.mean(0)),
            vcell.metrics.mse_top_de(pred, true, genes=de),
        )
    # control predicts no change: its delta correlation is undefined (NaN), additive's is high
    assert np.isnan(scores["control"][0])
    assert scores["additive"][0] > 0.6
    assert scores["additive"][1] < 0.25 * scores["control"][1]


def test_papalexi_unseen_ko_runs_and_mean_beats_control_on_mse(papalexi_path):
    adata = ad.read_h5ad(papalexi_path)
    res = vcell.bench.run(
        adata,
        models=["control", "mean", "additive"],
        splits=[{"kind": "unseen_perturbation", "held_out": ["IFNGR1", "IFNGR2", "JAK2", "STAT1"], "name": "ko"}],
        seeds=[1],
        metrics=["pearson_delta", "mse_top_de"],
        progress=False,
        on_error="skip",
    )
    r = res.results
    # additive cannot predict a single it never saw: recorded as errors, not silently dropped
    add_err = r[(r["model"] == "additive") & (r["metric"] == "error")]
    assert set(add_err["perturbation"]) == {"IFNGR1", "IFNGR2", "JAK2", "STAT1"}
    s = res.summary.set_index(["model", "metric"])["mean"]
    assert s[("mean", "mse_top_de")] < s[("control", "mse_top_de")]
    assert s[("mean", "pearson_delta")] > 0.3
