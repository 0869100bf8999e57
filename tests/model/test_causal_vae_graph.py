"""CausalVAE with a gene graph (``gene_graph=``): zero-shot genes from their graph neighbours."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import vcell
from vcell._settings import logger

FAST = {"n_latent": 8, "n_hidden": 32}
QUIET = {"enable_progress_bar": False}


def _data() -> tuple[ad.AnnData, pd.DataFrame, list[str]]:
    """A target-program simulation, its ground-truth gene graph (genes sharing a program) and its perturbations."""
    adata = vcell.datasets.simulate(
        n_cells=400, n_genes=50, n_perturbations=6, n_combos=0, n_programs=4, effects="target_programs", seed=0
    )
    graph = pd.DataFrame(adata.uns["vcell_simulation"]["gene_graph"])
    return adata, graph, [str(p) for p in adata.uns["vcell_simulation"]["perturbations"]]


@pytest.fixture(scope="module")
def data() -> tuple[ad.AnnData, pd.DataFrame, str, list[str]]:
    """Training cells without the held-out gene (a graph node), the graph, that gene and the training genes."""
    adata, graph, perts = _data()
    held = perts[1]  # G0021: 4 neighbours, all of them perturbed in training
    train = adata[adata.obs["perturbation"].astype(str) != held].copy()
    return train, graph, held, [p for p in perts if p != held]


def _fit(adata: ad.AnnData, *, seed: int = 0, epochs: int = 3, **init) -> vcell.model.CausalVAE:
    vcell.model.CausalVAE.setup_anndata(adata, perturbation_key="perturbation", control="control")
    model = vcell.model.CausalVAE(adata, **{**FAST, **init})
    model.train(max_epochs=epochs, seed=seed, accelerator="cpu", trainer_kwargs=QUIET)
    return model


def _rewired(graph: pd.DataFrame, gene: str) -> pd.DataFrame:
    """``graph`` with ``gene``'s edges replaced by edges to the nodes it was not linked to (nothing else changed)."""
    own = (graph["source"] == gene) | (graph["target"] == gene)
    nodes = sorted(set(graph["source"]) | set(graph["target"]))
    linked = set(graph.loc[own, "source"]) | set(graph.loc[own, "target"])
    others = [n for n in nodes if n not in linked][:4]
    new = pd.DataFrame({"source": [gene] * len(others), "target": others, "importance": 1.0})
    return pd.concat([graph[~own], new, new.rename(columns={"source": "target", "target": "source"})])


def test_unseen_gene_comes_from_its_graph_neighbours(data):
    train, graph, held, seen = data
    model = _fit(train.copy(), gene_graph=graph, seed=3)
    assert model.atoms_ == sorted(seen)
    assert "gene graph of 18 nodes" in model._model_summary_string
    n_ctrl = int((train.obs["perturbation"] == "control").sum())
    pred = model.predict(perturbation=held)
    assert pred.shape == (n_ctrl, train.n_vars)
    assert np.isfinite(pred).all()
    assert not np.allclose(pred, model.predict(perturbation="control"), atol=1e-3)
    # only the requested unseen gene becomes an encoding column (never one per graph node)
    enc, nodes = model._encode_query([held, f"{seen[0]}+{held}"], 1.0)
    assert enc.shape == (2, len(model.atoms_) + 1)
    assert model._graph_nodes[nodes].tolist() == [held]
    # a seen + unseen combination: both operators, decoded as shifts (the combination was never trained)
    combo = model.predict(perturbation=f"{seen[0]}+{held}")
    assert combo.shape == pred.shape
    assert not np.allclose(combo, model.predict(perturbation=seen[0]), atol=1e-3)
    # the operator of the unseen gene, and of the seen ones as before
    emb = model.get_perturbation_embedding([held, seen[0]])
    assert list(emb.index) == [held, seen[0]]
    np.testing.assert_allclose(emb.loc[seen[0]], model.get_perturbation_embedding().loc[seen[0]], atol=1e-6)
    assert np.abs(emb.loc[held]).sum() > 0
    with pytest.raises(ValueError, match="single perturbations"):
        model.get_perturbation_embedding([f"{seen[0]}+{held}"])
    # the same seed and a graph differing only in the unseen gene's edges: another prediction for that gene
    other = _fit(train.copy(), gene_graph=_rewired(graph, held), seed=3)
    other_pred = other.predict(perturbation=held)
    assert np.abs(other_pred - pred).max() > 1e-2
    assert not np.allclose(other.get_perturbation_embedding([held]).to_numpy(), emb.loc[[held]].to_numpy(), atol=1e-3)


def test_labels_outside_the_graph_and_bad_arguments(data):
    train, graph, held, seen = data
    model = _fit(train.copy(), gene_graph=graph, epochs=1)
    with pytest.raises(KeyError, match="NOT_A_GENE.*not nodes of the gene_graph"):
        model.predict(perturbation="NOT_A_GENE")
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        model.predict(perturbation=f"{held}+NOT_A_GENE")
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        model.get_perturbation_embedding(["NOT_A_GENE"])
    adata, table = model.adata, pd.DataFrame(np.ones((len(seen), 2)), index=seen)
    with pytest.raises(ValueError, match="either perturbation_embedding or gene_graph"):
        vcell.model.CausalVAE(adata, perturbation_embedding=table, gene_graph=graph)
    with pytest.raises(KeyError, match="missing_key"):
        vcell.model.CausalVAE(adata, gene_graph="missing_key")
    with pytest.raises(KeyError, match="source"):
        vcell.model.CausalVAE(adata, gene_graph=graph.rename(columns={"source": "from"}))
    with pytest.raises(ValueError, match="importance"):
        vcell.model.CausalVAE(adata, gene_graph=graph.assign(importance=-1.0))
    with pytest.raises(ValueError, match="graph_layers"):
        vcell.model.CausalVAE(adata, gene_graph=graph, graph_layers=0)
    renamed = graph.assign(source="x" + graph["source"], target="x" + graph["target"])
    with pytest.raises(KeyError, match="none of the training perturbations is a node"):
        vcell.model.CausalVAE(adata, gene_graph=renamed)


def test_training_gene_missing_from_the_graph_gets_a_free_operator(data, caplog):
    train, graph, held, seen = data
    absent = seen[-1]
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="vcell")
    try:
        model = _fit(
            train.copy(), gene_graph=graph[(graph["source"] != absent) & (graph["target"] != absent)], epochs=1
        )
    finally:
        logger.removeHandler(caplog.handler)
    assert absent in caplog.text
    assert "not graph nodes" in caplog.text
    assert np.isfinite(model.predict(perturbation=absent)).all()
    assert np.isfinite(model.predict(perturbation=held)).all()
    with pytest.raises(KeyError, match=absent):  # no longer a node: not predictable unless trained on
        model.get_perturbation_embedding([f"{absent}_other"])


def test_same_seed_same_results_and_save_load_without_uns(data, tmp_path):
    train, graph, held, _ = data
    train = train.copy()
    train.uns["go"] = graph
    m1 = _fit(train.copy(), gene_graph="go", seed=7, epochs=2)
    m2 = _fit(train.copy(), gene_graph=graph, seed=7, epochs=2)
    m3 = _fit(train.copy(), gene_graph=graph, seed=8, epochs=2)
    p1 = m1.predict(perturbation=held)
    np.testing.assert_array_equal(p1, m2.predict(perturbation=held))
    assert not np.allclose(p1, m3.predict(perturbation=held))
    m1.save(tmp_path / "graph_cvae", overwrite=True, save_anndata=False)
    adata = m1.adata.copy()
    del adata.uns["go"]
    loaded = vcell.model.CausalVAE.load(tmp_path / "graph_cvae", adata=adata, accelerator="cpu")
    np.testing.assert_array_equal(p1, loaded.predict(perturbation=held))
    pd.testing.assert_frame_equal(m1.get_perturbation_embedding([held]), loaded.get_perturbation_embedding([held]))


def test_tl_predict_perturbation_and_bench_unseen_split(data):
    train, graph, held, _ = data
    model = _fit(train.copy(), gene_graph=graph, epochs=1)
    out = vcell.tl.predict_perturbation(model.adata, model, perturbations=held, return_adata=True)
    np.testing.assert_allclose(out.X, model.predict(perturbation=held))
    adata, graph, _ = _data()
    spec = {"max_epochs": 2, "accelerator": "cpu", "trainer_kwargs": QUIET}
    res = vcell.bench.run(
        adata,
        models=[
            "mean",
            vcell.bench.ModelSpec("CausalVAE (graph)", vcell.model.CausalVAE, {**FAST, "gene_graph": graph}, spec),
            vcell.bench.ModelSpec("CausalVAE (one-hot)", vcell.model.CausalVAE, FAST, spec),
        ],
        splits=["unseen_perturbation"],
        seeds=[0],
        metrics=["pearson_delta"],
        progress=False,
        on_error="skip",
    )
    rows = res.results[res.results["metric"] == "pearson_delta"]
    graph_rows = rows[rows["model"] == "CausalVAE (graph)"]
    assert len(graph_rows) >= 1
    assert np.isfinite(graph_rows["value"]).all()
    assert (graph_rows["error"] == "").all()
    assert set(graph_rows["perturbation"]) == set(rows.loc[rows["model"] == "mean", "perturbation"])
    assert (res.results.loc[res.results["model"] == "CausalVAE (one-hot)", "error"] != "").all()


def test_neighbours_only_operators(data, tmp_path):
    train, graph, held, seen = data
    model = _fit(train.copy(), gene_graph=graph, graph_own_embedding=False, seed=3, epochs=2)
    ops = model.module.perturbation.operators
    assert not ops.own_embedding
    # a training gene's operator is the neighbours-only rule, the same one an unseen gene gets
    emb = model.get_perturbation_embedding()
    with torch.no_grad():
        idx = model._graph_nodes.get_indexer(emb.index)
        rule = ops.mlp(ops._unseen_states(idx)).numpy()
    np.testing.assert_allclose(emb.to_numpy(), rule, atol=1e-5)
    pred = model.predict(perturbation=held)
    model.save(tmp_path / "nbr", overwrite=True, save_anndata=False)
    loaded = vcell.model.CausalVAE.load(tmp_path / "nbr", adata=model.adata.copy(), accelerator="cpu")
    assert not loaded.module.perturbation.operators.own_embedding
    np.testing.assert_array_equal(pred, loaded.predict(perturbation=held))
