from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import vcell


@pytest.fixture(scope="module")
def go(shared_data) -> pd.DataFrame:
    return vcell.priors.read_gene_graph(shared_data / "prior_knowledge/go_graph_jaccard_top20_human.csv.gz")


def _two_cliques() -> pd.DataFrame:
    """Two 5-cliques {a0..a4}, {b0..b4} joined by one weak edge a0-b0, plus an isolated self-loop node z."""
    edges = []
    for p in "ab":
        edges += [(f"{p}{i}", f"{p}{j}", 1.0) for i in range(5) for j in range(5) if i != j]
    edges += [("a0", "b0", 0.1), ("z", "z", 1.0)]
    return pd.DataFrame(edges, columns=["source", "target", "importance"])


def _cos(emb: pd.DataFrame) -> pd.DataFrame:
    X = emb.to_numpy(dtype=float)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return pd.DataFrame(X @ X.T, index=emb.index, columns=emb.index)


@pytest.mark.parametrize("method", ["propagation", "spectral"])
def test_small_graph_structure(method):
    emb = vcell.priors.graph_embedding(_two_cliques(), n_components=4, method=method, seed=0)
    assert emb.shape == (11, 4)
    assert emb.dtypes.eq(np.float32).all()
    assert emb.index.tolist() == sorted(emb.index)
    cos = _cos(emb)
    within = np.mean([cos.loc[f"a{i}", f"a{j}"] for i in range(1, 5) for j in range(1, 5) if i != j])
    across = np.mean([cos.loc[f"a{i}", f"b{j}"] for i in range(1, 5) for j in range(1, 5)])
    assert within > 0.9
    assert within - across > 0.5
    if method == "propagation":
        np.testing.assert_allclose(np.linalg.norm(emb.drop(index="z"), axis=1), 1.0, rtol=1e-5)
        assert (emb.loc["z"] == 0).all()  # only a self-loop: no neighbours, zero row


def test_propagation_rows_come_from_neighbours():
    # two genes with the same neighbours get the same row even though their own random codes differ
    graph = pd.DataFrame({"source": ["x", "y", "x", "y", "m"], "target": ["m", "m", "n", "n", "n"], "importance": 1})
    emb = vcell.priors.graph_embedding(graph, n_components=8, n_steps=1, seed=3)
    np.testing.assert_allclose(emb.loc["x"], emb.loc["y"], rtol=1e-6)
    assert not np.allclose(emb.loc["x"], emb.loc["m"])


def test_go_graph_neighbours_closer_than_random(go):
    emb = vcell.priors.graph_embedding(go, seed=0)
    assert emb.shape == (len(set(go["source"]) | set(go["target"])), 32)
    cos = emb.to_numpy(dtype=float)
    idx = pd.Series(np.arange(len(emb)), index=emb.index)
    s, t = idx[go["source"]].to_numpy(), idx[go["target"]].to_numpy()
    edge = np.einsum("ij,ij->i", cos[s], cos[t])
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(emb), 50_000), rng.integers(0, len(emb), 50_000)
    rand = np.einsum("ij,ij->i", cos[a], cos[b])
    print(f"median cosine: graph edges {np.median(edge):.2f}, random pairs {np.median(rand):.2f}")
    assert np.median(edge) > 0.5
    assert abs(np.median(rand)) < 0.1
    # a gene's rows: IFNGR1 is nearer IFNGR2 (GO neighbours) than MYC
    c = _cos(emb.loc[["IFNGR1", "IFNGR2", "MYC"]])
    assert c.loc["IFNGR1", "IFNGR2"] > c.loc["IFNGR1", "MYC"] + 0.3


def test_deterministic_given_seed_and_nodes(go):
    sub = go[go["target"].str.startswith(("STAT", "IRF", "JAK"))]
    a = vcell.priors.graph_embedding(sub, n_components=8, seed=1)
    b = vcell.priors.graph_embedding(sub, n_components=8, seed=1)
    c = vcell.priors.graph_embedding(sub, n_components=8, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a, c)
    # default seed = vcell.settings.seed
    d = vcell.priors.graph_embedding(sub, n_components=8, seed=vcell.settings.seed)
    pd.testing.assert_frame_equal(vcell.priors.graph_embedding(sub, n_components=8), d)
    # `nodes` picks rows of the whole-graph embedding, in the order given
    rows = vcell.priors.graph_embedding(sub, n_components=8, seed=1, nodes=["STAT2", "STAT1"])
    pd.testing.assert_frame_equal(rows, a.loc[["STAT2", "STAT1"]])


def test_spectral_deterministic_and_sign_fixed(go):
    sub = go[go["target"].str.startswith(("STAT", "IRF", "JAK", "IL", "CD"))]
    a = vcell.priors.graph_embedding(sub, n_components=6, method="spectral", seed=0)
    b = vcell.priors.graph_embedding(sub, n_components=6, method="spectral", seed=5)
    np.testing.assert_allclose(a, b, atol=1e-5)  # seed only moves the solver's start vector
    X = a.to_numpy()
    assert (X[np.abs(X).argmax(axis=0), np.arange(6)] > 0).all()
    np.testing.assert_allclose(X.mean(axis=0), 0, atol=1e-5)


def test_unknown_nodes():
    graph = _two_cliques()
    with pytest.raises(KeyError, match=r"'NEWGENE'.*missing='zero'"):
        vcell.priors.graph_embedding(graph, nodes=["a1", "NEWGENE"], n_components=2)
    emb = vcell.priors.graph_embedding(graph, nodes=["a1", "NEWGENE"], n_components=2, missing="zero", seed=0)
    assert emb.index.tolist() == ["a1", "NEWGENE"]
    assert (emb.loc["NEWGENE"] == 0).all()
    assert (emb.loc["a1"] != 0).any()
    with pytest.raises(TypeError, match="single string"):
        vcell.priors.graph_embedding(graph, nodes="a1")


def test_weights_and_errors():
    graph = pd.DataFrame({"source": ["A", "B", "C"], "target": ["B", "C", "A"], "weight": [1.0, -2.0, 0.5]})
    emb = vcell.priors.graph_embedding(graph, n_components=3, seed=0)  # falls back to `weight` (absolute values)
    assert emb.shape == (3, 3)
    with pytest.raises(ValueError, match=r"\['score'\]"):
        vcell.priors.graph_embedding(graph, weight_key="score")
    with pytest.raises(ValueError, match=r"\['target'\]"):
        vcell.priors.graph_embedding(graph.drop(columns="target"))
    with pytest.raises(ValueError, match="n_components"):
        vcell.priors.graph_embedding(graph, method="spectral", n_components=2)
    with pytest.raises(ValueError, match="method"):
        vcell.priors.graph_embedding(graph, method="umap")
    with pytest.raises(ValueError, match="missing"):
        vcell.priors.graph_embedding(graph, missing="nan")
    with pytest.raises(ValueError, match="n_steps"):
        vcell.priors.graph_embedding(graph, n_steps=0)
