"""The simulator's ground truth is recovered by the additive baseline exactly where it should be (issue 3)."""

from __future__ import annotations

import numpy as np

import vcell
from vcell._utils import log1p_cp10k


def _additive_errors(frac_epistatic: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sim = vcell.datasets.simulate(
        n_cells=4200, n_genes=150, n_perturbations=6, n_combos=8, frac_epistatic=frac_epistatic, seed=11
    )
    truth = sim.uns["vcell_simulation"]
    combos = [str(c) for c in truth["combos"]]
    train = sim[~sim.obs["perturbation"].isin(combos).to_numpy()].copy()
    vcell.model.Baseline.setup_anndata(train, perturbation_key="perturbation", control="control")
    model = vcell.model.Baseline(train, method="additive")
    model.train()
    logx = log1p_cp10k(sim.X)
    labels = sim.obs["perturbation"].astype(str).to_numpy()
    errors, noise = [], []
    rng = np.random.default_rng(0)
    for c in combos:
        true = logx[labels == c]
        pred = model.predict(train, perturbation=c, space="log1p_cp10k")
        errors.append(np.linalg.norm(pred.mean(0) - true.mean(0)))
        half = rng.permutation(len(true))
        noise.append(np.linalg.norm(true[half[::2]].mean(0) - true[half[1::2]].mean(0)) / 2)
    return np.array(errors), np.array(noise), np.asarray(truth["epistatic"], dtype=bool)


def test_additive_baseline_recovers_purely_additive_combos():
    err, noise, epistatic = _additive_errors(0.0)
    assert not epistatic.any()
    # L2 error of the additive prediction is at the level of the sampling noise of the combo's own cells
    assert np.mean(err / noise) < 3.0  # measured 1.97 (seed 11); epistatic combos: 14.8


def test_additive_baseline_fails_on_epistatic_combos():
    err_add, noise_add, _ = _additive_errors(0.0)
    err_epi, noise_epi, epistatic = _additive_errors(1.0)
    assert epistatic.all()
    assert np.median(err_epi / noise_epi) > 3 * np.median(err_add / noise_add)
