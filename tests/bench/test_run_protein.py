"""bench.run on RNA + protein: metrics per modality, checked by hand for the additive baseline."""

from __future__ import annotations

import mudata as md
import numpy as np
import pytest

import vcell
from vcell._utils import log1p_cp10k, mudata_no_pull, to_dense
from vcell.bench import ModelSpec

METRICS = ["pearson_delta", "mse_top_de", "energy_distance"]


@pytest.fixture(scope="module")
def cite():
    mdata = vcell.datasets.simulate(
        n_cells=900, n_genes=40, n_perturbations=4, n_combos=4, protein=True, n_proteins=8, seed=2
    )
    P = to_dense(mdata["prot"].X).astype(np.float32)
    P[::7] = np.nan  # some cells without proteins
    mdata["prot"].X = P
    return mdata


class RnaOnlyPeer:
    """A predictor without proteins (like a peer adapter): it must get the RNA AnnData and be scored on RNA."""

    name = "peer"
    models_proteins = False

    def __init__(self) -> None:
        self.seen_types: list[str] = []

    def fit_predict(self, train, requests, *, seed, covariate_keys, layer):
        self.seen_types.append(type(train).__name__)
        E = log1p_cp10k(to_dense(train.X))
        return {r.condition: E[r.controls] for r in requests}


def test_protein_metrics_per_modality(cite):
    peer = RnaOnlyPeer()
    res = vcell.bench.run(
        cite,
        models=["control", "additive", peer],
        splits=["combo_half"],
        seeds=[0],
        metrics=METRICS,
        protein_modality="prot",
        progress=False,
    )
    r = res.results
    assert set(r["modality"]) == {"rna", "prot"}
    assert set(r.loc[r["modality"] == "prot", "model"]) == {"control", "additive"}
    assert peer.seen_types == ["AnnData"]
    prot = r[(r["modality"] == "prot") & (r["model"] == "additive") & (r["metric"] == "pearson_delta")]
    # by hand: the same split, the additive baseline on the training cells, protein truth of measured held-out cells
    a = cite["rna"].copy()
    vcell.pp.harmonize(a, perturbation_key="perturbation", control="control")
    vcell.bench.split(a, kind="combo_half", seed=0)
    split = a.obs["vcell_split"].astype(str).to_numpy()
    labels = a.obs["vcell_perturbation"].astype(str).to_numpy()
    P = to_dense(cite["prot"].X)
    measured = np.isfinite(P).all(1)
    E = np.full(P.shape, np.nan, dtype=np.float32)
    E[measured] = log1p_cp10k(P[measured])
    train = split != "test"
    ctrl = train & (labels == "control")
    # the additive prediction of a double: control proteins + the two singles' mean shifts (measured cells)
    means = {p: E[train & measured & (labels == p)].mean(0) for p in set(labels[train])}
    assert len(prot) == len(set(labels[split == "test"]) - {"control"})
    for _, row in prot.iterrows():
        h = row["perturbation"]
        shift = sum(means[p] - means["control"] for p in h.split("+"))
        pred = np.maximum(E[ctrl & measured] + shift, 0).mean(0)
        true = E[(split == "test") & (labels == h) & measured].mean(0)
        ref = E[ctrl & measured].mean(0)
        assert row["value"] == pytest.approx(np.corrcoef(pred - ref, true - ref)[0, 1], abs=1e-4)
    s = res.summary.set_index(["model", "modality", "metric"])
    assert (
        s.loc[("additive", "prot", "energy_distance"), "mean"] < s.loc[("control", "prot", "energy_distance"), "mean"]
    )
    assert np.isnan(s.loc[("control", "prot", "pearson_delta"), "mean"])  # no change: undefined correlation


def test_vcell_model_gets_the_mudata_and_errors(cite):
    spec = ModelSpec(
        "CausalVAE",
        vcell.model.CausalVAE,
        {"n_latent": 4, "n_hidden": 16},
        {"max_epochs": 2, "trainer_kwargs": {"enable_progress_bar": False}},
    )
    res = vcell.bench.run(
        cite, models=[spec], splits=["combo_half"], seeds=[0], metrics=METRICS, protein_modality="prot", progress=False
    )
    prot = res.results[res.results["modality"] == "prot"]
    assert set(prot["metric"]) == set(METRICS)
    assert np.isfinite(prot.loc[prot["metric"] == "energy_distance", "value"]).all()
    with pytest.raises(ValueError, match="needs a MuData"):
        vcell.bench.run(cite["rna"], models=["control"], splits=["combo_half"], seeds=[0], protein_modality="prot")
    with pytest.raises(KeyError, match="'adt'"):
        vcell.bench.run(cite, models=["control"], splits=["combo_half"], seeds=[0], protein_modality="adt")
    with mudata_no_pull():
        no_rna = md.MuData({"gex": cite["rna"].copy()})
    with pytest.raises(KeyError, match="no 'rna' modality"):
        vcell.bench.run(no_rna, models=["control"], splits=["combo_half"], seeds=[0])
