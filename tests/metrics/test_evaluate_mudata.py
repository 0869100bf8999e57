"""metrics.evaluate on MuData: one block of rows per modality, equal to evaluating each modality alone."""

from __future__ import annotations

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest

import vcell
from vcell._utils import mudata_no_pull

METRICS = ["pearson_delta", "mse_top_de", "energy_distance"]


def _mod(rng, n: int, n_vars: int, prefix: str, labels: list[str], shift: float = 0.0) -> ad.AnnData:
    X = rng.gamma(2.0, 0.5, (n, n_vars)).astype(np.float32)
    X[:, :3] += shift
    var = pd.DataFrame(index=[f"{prefix}{i}" for i in range(n_vars)])
    obs = pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(X, obs=obs, var=var)


def _mudata(seed: int, labels: list[str], shift: float) -> md.MuData:
    rng = np.random.default_rng(seed)
    n = len(labels)
    with mudata_no_pull():
        return md.MuData({"rna": _mod(rng, n, 30, "g", labels, shift), "prot": _mod(rng, n, 8, "p", labels, shift)})


def test_evaluate_mudata_matches_per_modality():
    labels = ["A"] * 30 + ["B"] * 30
    true, pred = _mudata(0, labels, 1.0), _mudata(1, labels, 0.8)
    ctrl = _mudata(2, ["control"] * 40, 0.0)
    df = vcell.metrics.evaluate(pred, true, ctrl, metrics=METRICS, seed=0, n_comps=5)
    assert list(df["modality"].unique()) == ["rna", "prot"]
    for mod, n_top in (("rna", 15), ("prot", 4)):  # top-DE features: min(20, n_features // 2)
        alone = vcell.metrics.evaluate(
            pred[mod], true[mod], ctrl[mod], metrics=METRICS, seed=0, n_comps=5, n_top_de=n_top
        )
        got = df[df["modality"] == mod].drop(columns="modality").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, alone)
    assert (df.loc[df["metric"] == "pearson_delta", "value"] > 0.5).all()


def test_evaluate_mudata_errors():
    labels = ["A"] * 20
    true, pred = _mudata(0, labels, 1.0), _mudata(1, labels, 1.0)
    ctrl = _mudata(2, ["control"] * 20, 0.0)
    with pytest.raises(ValueError, match="all be MuData"):
        vcell.metrics.evaluate(pred, true["rna"], ctrl, metrics=METRICS)
    with pytest.raises(ValueError, match="one feature space"):
        vcell.metrics.evaluate(pred, true, ctrl, metrics=METRICS, de_genes={"A": np.arange(3)})
    with mudata_no_pull():
        other = md.MuData({"atac": true["rna"].copy()})
    with pytest.raises(KeyError, match="no modality is in pred, true and control"):
        vcell.metrics.evaluate(pred, other, ctrl, metrics=METRICS)
