from __future__ import annotations

import anndata as ad
import mudata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import vcell
from vcell._utils import group_means, log1p_cp10k, mudata_no_pull
from vcell.datasets import simulate

SMALL = {"n_cells": 600, "n_genes": 40, "n_perturbations": 4, "n_combos": 3}


def _truth_row(truth: dict, label: str) -> np.ndarray:
    return truth["true_log_mean"][list(truth["true_log_mean_labels"]).index(label)]


def test_shapes_and_labels():
    adata = simulate(**SMALL, frac_epistatic=1 / 3, seed=1)
    assert adata.shape == (600, 40)
    assert sparse.isspmatrix_csr(adata.X) or isinstance(adata.X, sparse.csr_array)
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.data, np.round(adata.X.data))
    assert adata.X.data.min() >= 0
    assert list(adata.var_names[:2]) == ["G0000", "G0001"]
    assert set(adata.obs.columns) >= {"perturbation", "cell_type", "dose"}

    truth = adata.uns["vcell_simulation"]
    perts, combos = list(truth["perturbations"]), list(truth["combos"])
    assert len(perts) == 4
    assert set(perts) <= set(adata.var_names)
    assert len(combos) == 3
    for combo in combos:
        a, b = combo.split("+")
        assert a < b
        assert {a, b} <= set(perts)
    assert set(adata.obs["perturbation"]) == {"control", *perts, *combos}
    counts = adata.obs["perturbation"].value_counts()
    assert counts["control"] == 120  # 20% controls
    assert counts.drop("control").max() - counts.drop("control").min() <= 1  # even spread
    assert (adata.obs.loc[adata.obs["perturbation"] == "control", "dose"] == 0).all()
    assert (adata.obs.loc[adata.obs["perturbation"] != "control", "dose"] == 1).all()
    assert list(adata.obs["cell_type"].cat.categories) == ["type0"]
    assert truth["epistatic"].dtype == bool
    assert truth["epistatic"].sum() == 1  # round(3 / 3)
    assert truth["program_loadings"].shape == (10, 40)
    assert truth["single_effects"].shape == (4, 10)
    assert truth["combo_interaction"].shape == (3, 10)
    np.testing.assert_array_equal(truth["combo_interaction"][~truth["epistatic"]], 0)
    assert truth["true_log_mean"].shape == (8, 40)
    assert list(truth["true_log_mean_labels"])[:2] == ["control|type0", f"{perts[0]}|type0"]


def test_true_log_mean_is_additive_exactly_for_additive_combos():
    adata = simulate(**SMALL, frac_epistatic=1 / 3, cell_types=2, seed=2)
    truth = adata.uns["vcell_simulation"]
    for combo, epi in zip(truth["combos"], truth["epistatic"], strict=True):
        a, b = combo.split("+")
        for t in ("type0", "type1"):
            ctrl = _truth_row(truth, f"control|{t}")
            additive = ctrl + (_truth_row(truth, f"{a}|{t}") - ctrl) + (_truth_row(truth, f"{b}|{t}") - ctrl)
            gap = np.abs(_truth_row(truth, f"{combo}|{t}") - additive).max()
            assert (gap > 0.1) if epi else (gap < 1e-10)
    # a perturbation knocks its own target down
    p = truth["perturbations"][0]
    g = list(adata.var_names).index(p)
    assert _truth_row(truth, f"{p}|type0")[g] < _truth_row(truth, "control|type0")[g] - 0.5


def test_empirical_means_follow_true_log_mean():
    adata = simulate(**SMALL, seed=3)
    truth = adata.uns["vcell_simulation"]
    means = group_means(log1p_cp10k(adata.X), adata.obs["perturbation"].astype(str).to_numpy())
    labels = [lab.split("|")[0] for lab in truth["true_log_mean_labels"]]
    expected = np.log1p(np.exp(truth["true_log_mean"]))
    r = np.corrcoef(means.loc[labels].to_numpy().ravel(), expected.ravel())[0, 1]
    assert r > 0.95


def test_reproducible_by_seed(monkeypatch):
    a = simulate(**SMALL, seed=7)
    b = simulate(**SMALL, seed=7)
    c = simulate(**SMALL, seed=8)
    assert (a.X != b.X).nnz == 0
    assert a.obs.equals(b.obs)
    assert (a.X != c.X).nnz > 0
    monkeypatch.setattr(vcell.settings, "seed", 7)
    d = simulate(**SMALL)
    assert (a.X != d.X).nnz == 0
    assert d.uns["vcell_simulation"]["params"]["seed"] == 7


def test_uns_round_trip_h5ad(tmp_path):
    adata = simulate(**SMALL, doses=[0.1, 1.0, 10.0], cell_types=2, seed=4)
    adata.write_h5ad(tmp_path / "sim.h5ad")
    back = ad.read_h5ad(tmp_path / "sim.h5ad")
    t0, t1 = adata.uns["vcell_simulation"], back.uns["vcell_simulation"]
    assert set(t0) == set(t1)
    for key, value in t0.items():
        if isinstance(value, dict):
            assert set(value) == set(t1[key])
            for k2, v2 in value.items():
                if isinstance(v2, str | int | float | bool):
                    assert t1[key][k2] == v2
                else:
                    np.testing.assert_array_equal(np.asarray(t1[key][k2]), np.asarray(v2))
        else:
            np.testing.assert_array_equal(np.asarray(t1[key]), np.asarray(value))
    assert (back.X != adata.X).nnz == 0


def test_cell_types():
    adata = simulate(**SMALL, cell_types=["B", "T", "NK"], seed=5)
    assert list(adata.obs["cell_type"].cat.categories) == ["B", "T", "NK"]
    # every condition has every cell type, spread evenly
    tab = adata.obs.groupby(["perturbation", "cell_type"], observed=False).size().unstack()
    assert (tab.max(axis=1) - tab.min(axis=1)).max() <= 1
    truth = adata.uns["vcell_simulation"]
    by_type = truth["single_effects_by_type"]
    assert by_type.shape == (3, 4, 10)
    np.testing.assert_allclose(by_type[0], truth["single_effects"])  # type 0 is the reference
    assert not np.allclose(by_type[1], by_type[0])  # other types respond differently
    assert truth["baseline_log_mean"].shape == (3, 40)
    assert "control|NK" in list(truth["true_log_mean_labels"])


def test_dose_response_monotonic():
    doses = [0.01, 0.1, 1.0, 10.0, 100.0]
    adata = simulate(n_cells=3000, n_genes=60, n_perturbations=3, n_combos=1, doses=doses, frac_epistatic=0.0, seed=6)
    truth = adata.uns["vcell_simulation"]
    dr = truth["dose_response"]
    np.testing.assert_array_equal(dr["doses"], doses)
    assert dr["ec50"].shape == dr["hill"].shape == (3,)
    assert np.all((dr["ec50"] >= 0.01) & (dr["ec50"] <= 100))
    obs = adata.obs
    assert set(obs.loc[obs["perturbation"] == "control", "dose"]) == {0.0}
    assert set(obs.loc[obs["perturbation"] == truth["combos"][0], "dose"]) == {1.0}
    for p in truth["perturbations"]:
        assert set(obs.loc[obs["perturbation"] == p, "dose"]) == set(doses)

    X = log1p_cp10k(adata.X)
    lab = obs["perturbation"].astype(str).to_numpy()
    dose = obs["dose"].to_numpy()
    ctrl_true = _truth_row(truth, "control@0|type0")
    ctrl_emp = X[lab == "control"].mean(axis=0)
    for p in truth["perturbations"]:
        deltas = np.array([_truth_row(truth, f"{p}@{d:g}|type0") - ctrl_true for d in doses])
        size = np.linalg.norm(deltas, axis=1)
        assert np.all(np.diff(size) > 0)  # true response grows with dose
        direction = deltas[-1] / size[-1]
        proj = np.array([(X[(lab == p) & (dose == d)].mean(axis=0) - ctrl_emp) @ direction for d in doses])
        assert proj[-1] > proj[0] + 1.0  # observed response grows from lowest to highest dose
        assert np.all(np.diff(proj) > -0.5)  # and never drops by more than noise


def test_protein_mudata(tmp_path):
    mdata = simulate(**SMALL, protein=True, seed=8)
    assert isinstance(mdata, mudata.MuData)
    assert set(mdata.mod) == {"rna", "prot"}
    rna, prot = mdata["rna"], mdata["prot"]
    assert rna.shape == (600, 40)
    assert prot.shape == (600, 20)
    assert list(rna.obs_names) == list(prot.obs_names) == list(mdata.obs_names)
    assert list(mdata.obs["perturbation"]) == list(rna.obs["perturbation"])
    assert list(mdata.obs["cell_type"]) == list(rna.obs["cell_type"])
    np.testing.assert_array_equal(mdata.obs["dose"], rna.obs["dose"])
    np.testing.assert_array_equal(prot.X.data, np.round(prot.X.data))
    ptruth = prot.uns["vcell_simulation"]
    assert ptruth["true_log_mean"].shape == (8, 20)
    assert ptruth["program_loadings"].shape == (10, 20)
    # proteins respond to the perturbations through the shared programs
    lm = ptruth["true_log_mean"]
    assert np.abs(lm[1:] - lm[0]).max() > 0.3
    with mudata_no_pull():
        mdata.write_h5mu(tmp_path / "sim.h5mu")
        back = mudata.read_h5mu(tmp_path / "sim.h5mu")
    assert back["prot"].shape == (600, 20)
    assert "vcell_simulation" in back.uns


def _additive_errors(adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per combo: L2 error of the additive prediction, split-half noise of the combo's cells, epistatic flag."""
    X = log1p_cp10k(adata.X)
    lab = adata.obs["perturbation"].astype(str).to_numpy()
    means = group_means(X, lab)
    ctrl = means.loc["control"].to_numpy()
    truth = adata.uns["vcell_simulation"]
    rng = np.random.default_rng(0)
    errors, noise = [], []
    for combo in truth["combos"]:
        a, b = combo.split("+")
        additive = ctrl + (means.loc[a].to_numpy() - ctrl) + (means.loc[b].to_numpy() - ctrl)
        errors.append(np.linalg.norm(additive - means.loc[combo].to_numpy()))
        idx = rng.permutation(np.flatnonzero(lab == combo))
        half = idx.size // 2
        noise.append(np.linalg.norm(X[idx[:half]].mean(axis=0) - X[idx[half : 2 * half]].mean(axis=0)))
    return np.array(errors), np.array(noise), np.asarray(truth["epistatic"])


def test_ground_truth_additive_vs_epistatic():
    """Additive combos are predicted by the singles up to sampling noise; epistatic ones are not."""
    kw = {"n_cells": 4000, "n_genes": 200, "n_perturbations": 6, "n_combos": 10, "seed": 11}  # 200 cells/condition
    err_add, noise_add, epi = _additive_errors(simulate(**kw, frac_epistatic=0.0))
    assert not epi.any()
    ratio = err_add / noise_add
    assert ratio.mean() < 1.3  # pure noise gives ~0.9 (ctrl + A + B - combo vs two half-groups)
    assert ratio.max() < 2.5

    err_epi, noise_epi, epi = _additive_errors(simulate(**kw, frac_epistatic=1.0))
    assert epi.all()
    assert err_epi.mean() > 3 * err_add.mean()
    assert np.median(err_epi / noise_epi) > 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_perturbations": 3, "n_combos": 4}, r"n_combos \(4\) exceeds the 3 pairs"),
        ({"n_genes": 5, "n_perturbations": 6, "n_combos": 0}, r"n_perturbations \(6\) must be <= n_genes \(5\)"),
        ({"frac_epistatic": 1.5}, r"frac_epistatic must be in \[0, 1\]"),
        ({"doses": [0.0, 1.0]}, "doses must be a non-empty sequence of positive"),
        ({"doses": [1.0, 1.0]}, "doses must be distinct"),
        ({"cell_types": 0}, "cell_types must be an integer >= 1"),
        ({"cell_types": "type0"}, "cell_types must be a number of cell types or a sequence"),
        ({"n_cells": 5}, "n_cells=5 is too small"),
        ({"n_programs": 0}, "n_programs must be an integer >= 1"),
        ({"effects": "graph"}, "effects must be 'random' or 'target_programs'"),
        ({"effects": "target_programs", "n_programs": 1, "n_perturbations": 10}, "needs 10 genes loaded"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate(**{**SMALL, **kwargs})


def test_controls_only():
    adata = simulate(n_cells=50, n_genes=10, n_perturbations=0, n_combos=0, seed=0)
    assert set(adata.obs["perturbation"]) == {"control"}
    assert adata.uns["vcell_simulation"]["true_log_mean"].shape == (1, 10)


def test_target_program_effects_follow_the_gene_graph():
    adata = simulate(n_cells=400, n_genes=100, n_perturbations=12, n_combos=0, effects="target_programs", seed=3)
    truth = adata.uns["vcell_simulation"]
    W, E = truth["program_loadings"], truth["single_effects"]
    genes = list(adata.var_names)
    targets = [genes.index(p) for p in truth["perturbations"]]
    # each single acts on exactly the programs loading its target, in one direction per program
    np.testing.assert_array_equal(E != 0, (W[:, targets] != 0).T)
    for k in range(W.shape[0]):
        signs = np.sign(E[:, k][E[:, k] != 0])
        assert signs.size == 0 or np.all(signs == signs[0])
    assert np.all((np.abs(E) >= 0.5) | (E == 0))
    assert np.all(np.abs(E) <= 1.0)
    # the graph: Jaccard of program sets, symmetric, only between genes sharing a program
    graph = pd.DataFrame(truth["gene_graph"])
    assert list(graph.columns) == ["source", "target", "importance"]
    member = W != 0
    row = graph.iloc[0]
    a, b = genes.index(row["source"]), genes.index(row["target"])
    inter, union = (member[:, a] & member[:, b]).sum(), (member[:, a] | member[:, b]).sum()
    assert row["importance"] == pytest.approx(inter / union)
    pairs = set(zip(graph["source"], graph["target"], strict=True))
    assert all((t, s) in pairs for s, t in pairs)
    assert len(pairs) == int(((member.T.astype(int) @ member.astype(int)) > 0).sum() - (member.any(0)).sum())
    # default effects are unchanged and carry no graph
    assert "gene_graph" not in simulate(**SMALL, seed=0).uns["vcell_simulation"]
