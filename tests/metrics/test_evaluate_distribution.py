"""``evaluate``'s energy distance and MMD equal the standalone metrics on the projected cells (shared distances)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from vcell.metrics import energy_distance, evaluate, fit_pca, mmd, pca_project


@pytest.mark.parametrize("max_cells", [None, 25])
def test_evaluate_distribution_metrics_match_standalone(max_cells: int | None) -> None:
    rng = np.random.default_rng(3)
    var = pd.DataFrame(index=[f"g{i}" for i in range(12)])
    ctrl = ad.AnnData(rng.gamma(2.0, 0.5, (60, 12)).astype(np.float32), var=var)
    labels = ["A"] * 40 + ["B"] * 30
    obs = pd.DataFrame({"perturbation": labels}, index=[f"t{i}" for i in range(70)])
    true = ad.AnnData(rng.gamma(2.0, 0.6, (70, 12)).astype(np.float32), obs=obs, var=var)
    obs_p = pd.DataFrame({"perturbation": ["A"] * 50 + ["B"] * 45}, index=[f"p{i}" for i in range(95)])
    pred = ad.AnnData(rng.gamma(2.0, 0.55, (95, 12)).astype(np.float32), obs=obs_p, var=var)
    pca = fit_pca(ctrl.X, 5, seed=0)
    df = evaluate(pred, true, ctrl, metrics=["energy_distance", "mmd"], pca=pca, max_cells=max_cells, seed=7)
    got = df.set_index(["perturbation", "metric"])["value"]
    for p in ("A", "B"):
        P = pca_project(pred.X[(obs_p["perturbation"] == p).to_numpy()], *pca)
        T = pca_project(true.X[(obs["perturbation"] == p).to_numpy()], *pca)
        assert got[p, "energy_distance"] == pytest.approx(energy_distance(P, T, max_cells=max_cells, seed=7), rel=1e-9)
        assert got[p, "mmd"] == pytest.approx(mmd(P, T, max_cells=max_cells, seed=7), rel=1e-9)
