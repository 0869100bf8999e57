from __future__ import annotations

import socket

import numpy as np
import pandas as pd
import pytest

import vcell
from vcell.priors import _networks

PK = "prior_knowledge"


def test_collectri(shared_data):
    net = vcell.priors.read_network(shared_data / PK / "collectri_human.csv")
    assert list(net.columns) == ["source", "target", "weight"]
    assert len(net) == 43_178
    assert net["weight"].dtype == np.float64
    assert set(net["weight"].unique()) == {1.0, -1.0}
    assert net.iloc[0].tolist() == ["MYC", "TERT", 1.0]
    assert not net.duplicated(["source", "target"]).any()


def test_dorothea_renames_and_levels(shared_data):
    path = shared_data / PK / "dorothea_human_ABC.csv"
    net = vcell.priors.read_network(path)
    assert list(net.columns) == ["source", "target", "weight", "confidence"]  # tf -> source, mor -> weight
    assert len(net) == 13_223
    assert net.iloc[0].tolist() == ["AHR", "CYP1A1", 1.0, "C"]
    ab = vcell.priors.read_network(path, levels=["A", "B"])
    assert len(ab) == 5434 + 974
    assert set(ab["confidence"]) == {"A", "B"}
    with pytest.raises(ValueError, match=r"\['confidence'\]"):
        vcell.priors.read_network(shared_data / PK / "collectri_human.csv", levels=["A"])


def test_progeny_top_and_min_weight(shared_data):
    path = shared_data / PK / "progeny_human_top500.csv"
    net = vcell.priors.read_network(path)
    assert list(net.columns) == ["source", "target", "weight", "padj"]
    assert net.groupby("source").size().eq(500).all()
    assert net["source"].nunique() == 14
    top = vcell.priors.read_network(path, top=100)
    assert top.groupby("source").size().eq(100).all()
    # top by padj (the most significant genes per pathway), in file order
    andro = net[net["source"] == "Androgen"]
    expected = andro.sort_values(["padj", "target"], kind="stable").head(100)
    assert set(top.loc[top["source"] == "Androgen", "target"]) == set(expected["target"])
    strong = vcell.priors.read_network(path, min_weight=5.0)
    assert (strong["weight"].abs() >= 5.0).all()
    assert 0 < len(strong) < len(net)
    mouse = vcell.priors.read_network(shared_data / PK / "progeny_mouse_top500.csv")
    assert mouse.iloc[0]["target"] == "Tmprss2"


def test_p_value_and_top_by_weight(tmp_path):
    path = tmp_path / "net.tsv.gz"
    pd.DataFrame(
        {"pathway": ["P", "P", "P", "Q"], "genesymbol": ["a", "b", "c", "a"], "weight": [1, -3, 2, 1], "p_value": 0.01}
    ).to_csv(path, sep="\t", index=False)
    net = vcell.priors.read_network(path)
    assert list(net.columns) == ["source", "target", "weight", "padj"]  # decoupler 1.x's p_value -> padj
    unweighted = tmp_path / "net.csv"
    pd.DataFrame({"source": ["P", "P", "P", "P", "Q"], "target": ["a", "b", "c", "a", "z"]}).to_csv(
        unweighted, index=False
    )
    net = vcell.priors.read_network(unweighted)
    assert net["weight"].tolist() == [1.0] * 4  # weight 1 added, duplicate (P, a) dropped
    signed = tmp_path / "signed.csv"
    signed.write_text("source,target,weight\nP,a,1\nP,b,-3\nP,c,2\nQ,a,0.5\n")
    top = vcell.priors.read_network(signed, top=2)
    assert list(zip(top["source"], top["target"], strict=True)) == [("P", "b"), ("P", "c"), ("Q", "a")]


def test_gmt(shared_data):
    path = shared_data / PK / "msigdb_hallmark_human.gmt"
    net = vcell.priors.read_gmt(path)
    assert list(net.columns) == ["source", "target", "weight"]
    assert net["source"].nunique() == 50
    assert net["source"].iloc[0] == "HALLMARK_TNFA_SIGNALING_VIA_NFKB"
    assert net["target"].iloc[:3].tolist() == ["JUNB", "CXCL2", "ATF3"]
    assert (net["weight"] == 1.0).all()
    assert not net["target"].str.startswith("http").any()  # the description column is not a gene
    with path.open() as fh:
        first = fh.readline().rstrip("\n").split("\t")
    assert (net["source"] == first[0]).sum() == len(set(first[2:]))
    pd.testing.assert_frame_equal(vcell.priors.read_network(path), net)  # .gmt dispatch


def test_gmt_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sets\.gmt.*GMT gene-set file"):
        vcell.priors.read_gmt(tmp_path / "sets.gmt")
    bad = tmp_path / "bad.gmt"
    bad.write_text("SET_A\tdesc\tG1\n\nSET_B G1 G2\n")
    with pytest.raises(ValueError, match="line 3"):
        vcell.priors.read_gmt(bad)
    dup = tmp_path / "dup.gmt"
    dup.write_text("S\td\tG1\tG1\tG2\t\n")
    assert vcell.priors.read_gmt(dup)["target"].tolist() == ["G1", "G2"]


def test_network_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"net\.csv.*decoupler's format.*'collectri'"):
        vcell.priors.read_network(tmp_path / "net.csv")
    with pytest.raises(FileNotFoundError, match="'collectri'"):
        vcell.priors.read_network("kollectri")
    bad = tmp_path / "bad.csv"
    bad.write_text("regulator,gene,weight\nA,B,1\n")
    with pytest.raises(ValueError, match=r"\['source', 'target'\]"):
        vcell.priors.read_network(bad)


@pytest.mark.parametrize("name", ["collectri", "dorothea", "progeny", "hallmark", "CollecTRI"])
def test_resource_names_call_decoupler(monkeypatch, name):
    dc = pytest.importorskip("decoupler")
    calls = []

    def fake(organism="human", **kwargs):
        calls.append((name.lower(), organism, kwargs))
        return pd.DataFrame({"source": ["T", "T"], "target": ["g1", "g2"], "weight": [1.0, -1.0]})

    monkeypatch.setattr(dc.op, name.lower(), fake)
    net = vcell.priors.read_network(name, organism="mouse", min_weight=0.5)
    assert calls == [(name.lower(), "mouse", {})]
    assert net["target"].tolist() == ["g1", "g2"]


def test_resource_dorothea_filters_after_fetch(monkeypatch):
    dc = pytest.importorskip("decoupler")
    fake = pd.DataFrame(
        {"source": ["T", "T", "U"], "target": ["a", "b", "a"], "weight": [1.0, -0.5, 1], "confidence": list("ACB")}
    )
    monkeypatch.setattr(dc.op, "dorothea", lambda organism="human": fake)
    net = vcell.priors.read_network("dorothea", levels=["A", "B"])
    assert net["confidence"].tolist() == ["A", "B"]


def test_missing_decoupler_gives_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_decoupler(name, *args, **kwargs):
        if name == "decoupler" or name.startswith("decoupler."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_decoupler)
    with pytest.raises(ImportError, match=r'pip install "vcell\[decoupler\]"'):
        _networks._fetch("collectri", "human")


@pytest.mark.internet
def test_collectri_online():  # pragma: no cover - needs network access
    pytest.importorskip("decoupler")
    try:
        socket.getaddrinfo("zenodo.org", 443)
    except OSError:
        pytest.skip("no network access (zenodo.org does not resolve)")
    net = vcell.priors.read_network("collectri")
    assert {"source", "target", "weight"} <= set(net.columns)
    assert len(net) > 10_000
