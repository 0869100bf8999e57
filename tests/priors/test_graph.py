from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import vcell

GO_GRAPH = "prior_knowledge/go_graph_jaccard_top20_human.csv.gz"
GENE2GO = "prior_knowledge/gene2go_human_orgHsEgDb_3.16.tsv.gz"


@pytest.fixture(scope="module")
def gene2go(shared_data) -> pd.DataFrame:
    return pd.read_csv(shared_data / GENE2GO, sep="\t")


@pytest.fixture(scope="module")
def shipped(shared_data) -> pd.DataFrame:
    return vcell.priors.read_gene_graph(shared_data / GO_GRAPH)


# --- read_gene_graph ---------------------------------------------------------------------------------------------


def test_read_gene_graph_shipped(shipped):
    assert list(shipped.columns) == ["source", "target", "importance"]
    assert len(shipped) == 409_214
    assert shipped["importance"].dtype == np.float64
    assert shipped["importance"].min() > 0.1
    assert shipped.iloc[0].tolist() == ["VMO1", "A1BG", 0.4]
    assert (shipped.groupby("target").size() <= 20).all()


def test_read_gene_graph_filters(tmp_path):
    path = tmp_path / "g.csv.gz"
    pd.DataFrame(
        {
            "source": ["B", "C", "A", "D", "A"],
            "target": ["A", "A", "B", "A", "A"],
            "importance": [0.5, 0.2, 0.5, 0.9, 1],
        }
    ).to_csv(path, index=False)
    full = vcell.priors.read_gene_graph(path)
    assert len(full) == 5  # the self-loop A->A is kept as in the file
    out = vcell.priors.read_gene_graph(path, genes=["A", "B", "C"], min_importance=0.5)
    assert list(zip(out["source"], out["target"], out["importance"], strict=True)) == [
        ("B", "A", 0.5),
        ("A", "B", 0.5),
        ("A", "A", 1.0),
    ]
    # D is not in `genes`: its edge into A goes although A is kept (both ends must be in the node set)
    out = vcell.priors.read_gene_graph(path, genes=["A"])
    assert out["source"].tolist() == ["A"]
    with pytest.raises(TypeError, match="single string"):
        vcell.priors.read_gene_graph(path, genes="A")


def test_read_gene_graph_tsv(tmp_path):
    path = tmp_path / "g.tsv"
    path.write_text("source\ttarget\timportance\textra\nB\tA\t0.3\tx\n")
    out = vcell.priors.read_gene_graph(path)
    assert out.to_dict("list") == {"source": ["B"], "target": ["A"], "importance": [0.3]}


def test_read_gene_graph_errors(tmp_path):
    missing = tmp_path / "nope.csv.gz"
    with pytest.raises(FileNotFoundError, match=r"nope\.csv\.gz.*GEARS' format.*source, target, importance"):
        vcell.priors.read_gene_graph(missing)
    with pytest.raises(FileNotFoundError, match="a folder"):
        vcell.priors.read_gene_graph(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("source,target,weight\nA,B,1\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['importance'\]"):
        vcell.priors.read_gene_graph(bad)


# --- go_graph ------------------------------------------------------------------------------------------------------


def test_go_graph_hand_computed():
    gene2go = {
        "A": ["GO:1", "GO:2", "GO:3"],
        "B": ["GO:1", "GO:2"],  # J(A,B) = 2/3
        "C": ["GO:3", "GO:4"],  # J(A,C) = 1/4, J(B,C) = 0
        "D": ["GO:1", "GO:2", "GO:3"],  # J(A,D) = 1, J(B,D) = 2/3, J(C,D) = 1/4
        "E": ["GO:9"] * 2,  # duplicated annotation counted once; no overlap with anyone
    }
    lazy = {g: iter(ts) for g, ts in gene2go.items()} | {"F": "GO:9"}  # iterators; a single term as a string
    pd.testing.assert_frame_equal(
        vcell.priors.go_graph(lazy, top_k=None),
        vcell.priors.go_graph({**gene2go, "F": ["GO:9"]}, top_k=None),
    )
    out = vcell.priors.go_graph(gene2go, top_k=None, threshold=0.25)  # strictly above 0.25: 1/4 is dropped
    got = {(s, t): w for s, t, w in out.itertuples(index=False)}
    assert got == pytest.approx({("D", "A"): 1.0, ("B", "A"): 2 / 3, ("A", "B"): 2 / 3, ("D", "B"): 2 / 3,
                                 ("A", "D"): 1.0, ("B", "D"): 2 / 3})  # fmt: skip
    assert out["target"].tolist() == ["A", "A", "B", "B", "D", "D"]  # by target, then decreasing importance

    out = vcell.priors.go_graph(gene2go, top_k=1)
    # B's neighbours A and D tie at 2/3: the first source name wins
    assert list(zip(out["source"], out["target"], strict=True)) == [("D", "A"), ("A", "B"), ("A", "C"), ("A", "D")]
    assert out.loc[out["target"] == "C", "importance"].item() == pytest.approx(0.25)

    # genes = node set: annotations of D are dropped before ranking, so B's top neighbour is A
    out = vcell.priors.go_graph(gene2go, genes=["A", "B", "C", "Z"], top_k=1)
    assert set(out["source"]) | set(out["target"]) <= {"A", "B", "C"}
    assert list(zip(out["source"], out["target"], strict=True)) == [("B", "A"), ("A", "B"), ("A", "C")]

    # targets: only those rows, neighbours from the whole node set
    out = vcell.priors.go_graph(gene2go, targets=["C", "unknown"], top_k=5)
    assert out["target"].unique().tolist() == ["C"]
    assert out["source"].tolist() == ["A", "D"]


def test_go_graph_dataframe_equals_mapping(gene2go):
    sub = gene2go[gene2go["symbol"].isin(["STAT1", "STAT2", "STAT3", "JAK2", "IRF1", "IRF7"])]
    mapping = sub.groupby("symbol")["go_id"].apply(list).to_dict()
    a = vcell.priors.go_graph(sub, top_k=3)
    b = vcell.priors.go_graph(mapping, top_k=3)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) > 0


def test_go_graph_matches_shipped_file(gene2go, shipped):
    """The shipped graph = Jaccard over all (symbol, GO id) pairs, > 0.1, no self, top 20 per target, 4 decimals.

    Only the order among equal importances at the 20th place differs (the file breaks ties arbitrarily; go_graph by
    source name), and rounding of exact halves (3 of 409k edges, R vs numpy rounding).
    """
    rng = np.random.default_rng(0)
    targets = rng.choice(np.sort(gene2go["symbol"].unique()), 60, replace=False).tolist() + ["STAT1", "CTNNB1"]
    ours = vcell.priors.go_graph(gene2go, targets=targets, chunk_size=25)
    ref = shipped[shipped["target"].isin(targets)]
    # CTNNB1 (221 GO terms) has no partner above 0.1 and no row in either
    assert "CTNNB1" not in set(ours["target"])
    assert "CTNNB1" not in set(ref["target"])
    assert set(ours["target"]) == set(ref["target"])
    n_ties = 0
    for target, mine in ours.groupby("target"):
        theirs = ref[ref["target"] == target]
        assert len(mine) == len(theirs), target
        kth = theirs["importance"].min()
        assert mine["importance"].round(4).min() == pytest.approx(kth, abs=1e-4)
        above_mine = set(mine.loc[mine["importance"].round(4) > kth + 1e-4, "source"])
        above_theirs = set(theirs.loc[theirs["importance"] > kth + 1e-4, "source"])
        assert above_mine == above_theirs, target
        n_ties += set(mine["source"]) != set(theirs["source"])
        common = mine.merge(theirs, on=["source", "target"], suffixes=("_mine", "_ref"))
        np.testing.assert_allclose(common["importance_mine"], common["importance_ref"], atol=5.1e-5)
    assert n_ties < len(targets)  # most targets match exactly

    # restricted the same way: shipped edges within a gene set are also edges of go_graph(genes=that set)
    genes = set(ref["target"]) | set(ref["source"])
    mine = vcell.priors.go_graph(gene2go, genes=genes)
    assert set(mine["source"]) | set(mine["target"]) <= genes
    kth_mine = mine.groupby("target")["importance"].min()
    inside = shipped[shipped["source"].isin(genes) & shipped["target"].isin(genes)]
    merged = inside.merge(mine, on=["source", "target"], how="left", suffixes=("", "_mine"))
    lost = merged[merged["importance_mine"].isna()]
    # an edge is only lost to a tie at the node-set graph's 20th place
    np.testing.assert_allclose(lost["importance"], kth_mine.reindex(lost["target"]).round(4), atol=1e-4)
    assert len(lost) < 0.05 * len(inside)


def test_go_graph_from_path(shared_data):
    out = vcell.priors.go_graph(shared_data / GENE2GO, genes=["STAT1", "STAT2", "STAT3", "IRF1"], top_k=None)
    assert set(out["target"]) <= {"STAT1", "STAT2", "STAT3", "IRF1"}
    assert ("STAT2", "STAT1") in set(zip(out["source"], out["target"], strict=True))
    assert (out["importance"] > 0.1).all()


def test_go_graph_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gene2go\.tsv\.gz.*GO annotations"):
        vcell.priors.go_graph(tmp_path / "gene2go.tsv.gz")
    with pytest.raises(ValueError, match=r"one of \['go_id'"):
        vcell.priors.go_graph(pd.DataFrame({"symbol": ["A"], "annotation": ["GO:1"]}))
    with pytest.raises(ValueError, match=r"one of \['symbol'"):
        vcell.priors.go_graph(pd.DataFrame({"entrez": [1], "go_id": ["GO:1"]}))
    with pytest.raises(ValueError, match="threshold"):
        vcell.priors.go_graph({"A": ["GO:1"]}, threshold=1.0)
    with pytest.raises(ValueError, match="top_k"):
        vcell.priors.go_graph({"A": ["GO:1"]}, top_k=0)
    empty = vcell.priors.go_graph({"A": ["GO:1"], "B": ["GO:2"]})
    assert list(empty.columns) == ["source", "target", "importance"]
    assert len(empty) == 0
