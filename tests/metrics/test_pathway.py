from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from vcell.metrics import PATHWAY_METHODS, pathway_agreement
from vcell.metrics._pathway import _activities, _check_net

GENES = [f"g{i}" for i in range(6)]
#: three sources with two targets each: ULM activities can be worked out by hand
NET3 = pd.DataFrame(
    {"source": ["A", "A", "B", "B", "C", "C"], "target": GENES, "weight": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]}
)


@pytest.fixture(scope="module")
def progeny(shared_data) -> pd.DataFrame:
    return pd.read_csv(shared_data / "prior_knowledge" / "progeny_human_top500.csv")


@pytest.fixture(scope="module")
def collectri(shared_data) -> pd.DataFrame:
    return pd.read_csv(shared_data / "prior_knowledge" / "collectri_human.csv")


@pytest.fixture(scope="module")
def progeny_genes(progeny) -> np.ndarray:
    return np.array(sorted(set(progeny["target"])))


def _footprint_delta(progeny, genes, pathway, seed):
    """Small noise plus a pathway's footprint (weights scaled to max 1) on its targets."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0.0, 0.05, len(genes))
    sub = progeny[progeny["source"] == pathway]
    d[np.searchsorted(genes, sub["target"])] += sub["weight"].to_numpy() / np.abs(sub["weight"]).max()
    return d


def test_ulm_activities_by_hand():
    # y = [1, 1, -1, -1, 0, 0]: against x_A = [1, 1, 0, 0, 0, 0] r = sqrt(3)/2, so t = r sqrt(4 / (1 - r^2)) = 2 sqrt(3);
    # B is the mirror image (-2 sqrt(3)); x_C is orthogonal to y (t = 0)
    y = np.array([[1.0, 1.0, -1.0, -1.0, 0.0, 0.0]])
    acts = _activities(y, _check_net(NET3, np.array(GENES), 2), np.array(GENES), "ulm", 2)
    np.testing.assert_allclose(acts[0], [2 * math.sqrt(3), -2 * math.sqrt(3), 0.0], rtol=1e-9, atol=1e-12)


def test_agreement_by_hand():
    y1 = np.array([1.0, 1.0, -1.0, -1.0, 0.0, 0.0])  # activities (a, -a, 0)
    y2 = np.array([1.0, 1.0, 0.0, 0.0, -1.0, -1.0])  # activities (a, 0, -a): correlation 1/2
    assert pathway_agreement(y2, y1, NET3, genes=GENES, min_targets=2) == pytest.approx(0.5, rel=1e-9)
    assert pathway_agreement(3 * y1, y1, NET3, genes=GENES, min_targets=2) == pytest.approx(1.0)
    assert pathway_agreement(-y1, y1, NET3, genes=GENES, min_targets=2) == pytest.approx(-1.0)


def test_min_targets_drops_small_sources():
    y1 = np.array([1.0, 1.0, -1.0, -1.0, 0.0, 0.0])
    y2 = np.array([1.0, 1.0, 0.0, 0.0, -1.0, -1.0])
    extra = pd.concat([NET3, pd.DataFrame({"source": ["D"], "target": ["g4"], "weight": [-1.0]})])
    with_d = pathway_agreement(y2, y1, extra, genes=GENES, min_targets=1)
    assert with_d != pytest.approx(0.5)  # D (one target) changes the answer when kept ...
    assert pathway_agreement(y2, y1, extra, genes=GENES, min_targets=2) == pytest.approx(0.5)  # ... not when dropped


def test_identical_deltas_give_one(progeny, collectri, progeny_genes, rng):
    d = rng.normal(size=len(progeny_genes))
    assert pathway_agreement(d, d, progeny, genes=progeny_genes) == pytest.approx(1.0)
    genes = np.array(sorted(set(collectri["target"])))[:3000]
    d = rng.normal(size=len(genes))
    assert pathway_agreement(d, d, collectri, genes=genes) == pytest.approx(1.0)


def test_pathway_delta_agrees_with_itself_not_with_shuffled(progeny, progeny_genes):
    d = _footprint_delta(progeny, progeny_genes, "Hypoxia", 0)
    acts = _activities(d[None], _check_net(progeny, progeny_genes, 5), progeny_genes, "ulm", 5)[0]
    assert np.sort(progeny["source"].unique())[np.argmax(acts)] == "Hypoxia"
    assert (
        pathway_agreement(_footprint_delta(progeny, progeny_genes, "Hypoxia", 1), d, progeny, genes=progeny_genes)
        > 0.99
    )
    shuffled = np.random.default_rng(5).permutation(d)
    assert abs(pathway_agreement(shuffled, d, progeny, genes=progeny_genes)) < 0.5
    other = _footprint_delta(progeny, progeny_genes, "TNFa", 1)
    assert pathway_agreement(other, d, progeny, genes=progeny_genes) < 0.5


def test_matrix_input_is_per_row(progeny, progeny_genes):
    rows = [_footprint_delta(progeny, progeny_genes, p, i) for i, p in enumerate(["Hypoxia", "TNFa", "p53"])]
    true = np.vstack(rows)
    pred = np.vstack([rows[0], rows[2], np.zeros(len(progeny_genes))])
    r = pathway_agreement(pred, true, progeny, genes=progeny_genes)
    assert isinstance(r, np.ndarray)
    assert r.shape == (3,)
    assert r[0] == pytest.approx(1.0)
    assert r[1] == pytest.approx(pathway_agreement(rows[2], rows[1], progeny, genes=progeny_genes))
    assert np.isnan(r[2])  # the control baseline's zero change: undefined


def test_constant_delta_is_nan():
    y = np.array([1.0, 1.0, -1.0, -1.0, 0.0, 0.0])
    assert np.isnan(pathway_agreement(np.zeros(6), y, NET3, genes=GENES, min_targets=2))
    assert np.isnan(pathway_agreement(y, np.full(6, 2.0), NET3, genes=GENES, min_targets=2))


def test_matches_decoupler_called_directly(progeny, progeny_genes, rng):
    import decoupler as dc

    P = rng.normal(size=(4, len(progeny_genes)))
    T = P + rng.normal(size=P.shape)
    ours = pathway_agreement(P, T, progeny, genes=progeny_genes)
    data = pd.DataFrame(np.vstack([P, T]), index=[f"s{i}" for i in range(8)], columns=progeny_genes)
    es, _ = dc.mt.ulm(data, progeny[["source", "target", "weight"]], tmin=5)
    expected = [np.corrcoef(es.iloc[i], es.iloc[4 + i])[0, 1] for i in range(4)]
    np.testing.assert_allclose(ours, expected, rtol=1e-10)


def test_mlm_matches_decoupler(progeny, progeny_genes, rng):
    import decoupler as dc

    assert PATHWAY_METHODS == ("ulm", "mlm")
    genes = progeny_genes[::5]  # 1157 of the 5782 targets: all 14 pathways keep >= 5 of them, a smaller regression
    P, T = rng.normal(size=(2, len(genes)))
    ours = pathway_agreement(P, T, progeny, genes=genes, method="mlm")
    data = pd.DataFrame(np.vstack([P, T]), index=["p", "t"], columns=genes)
    es, _ = dc.mt.mlm(data, progeny[["source", "target", "weight"]], tmin=5)
    assert es.shape == (2, 14)
    assert ours == pytest.approx(np.corrcoef(es.loc["p"], es.loc["t"])[0, 1], rel=1e-10)


def test_net_without_weight_is_unweighted():
    y1 = np.array([1.0, 1.0, -1.0, -1.0, 0.0, 0.0])
    y2 = np.array([1.0, 1.0, 0.0, 0.0, -1.0, -1.0])
    net = NET3.drop(columns="weight")
    assert pathway_agreement(y2, y1, net, genes=GENES, min_targets=2) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pred_delta": np.zeros(5)}, "same shape"),
        ({"genes": GENES[:5]}, "genes has 5 names"),
        ({"genes": ["x0", "x1", "x2", "x3", "x4", "x5"]}, "none of the 6 genes"),
        ({"genes": ["g0", "g0", "g2", "g3", "g4", "g5"]}, "duplicated"),
        ({"min_targets": 3}, "only 0 source"),
        ({"min_targets": 0}, "min_targets must be a positive integer"),
        ({"method": "viper"}, "method must be one of"),
        ({"pred_delta": np.array([np.nan, 0, 0, 0, 0, 1.0])}, "finite"),
        ({"net": NET3.rename(columns={"source": "tf"})}, r"lacks column\(s\) \['source'\]"),
        ({"net": pd.concat([NET3, NET3.iloc[:1]])}, "duplicated"),
        ({"net": NET3.iloc[:3]}, "only 1 source"),
        ({"pred_delta": np.zeros((0, 6)), "true_delta": np.zeros((0, 6))}, "no rows"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = {
        "pred_delta": np.array([1.0, 1.0, 0.0, 0.0, -1.0, -1.0]),
        "true_delta": np.array([1.0, 1.0, -1.0, -1.0, 0.0, 0.0]),
        "net": NET3,
        "genes": GENES,
        "min_targets": 2,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pathway_agreement(args.pop("pred_delta"), args.pop("true_delta"), args.pop("net"), **args)


def test_mouse_genes_against_human_net(progeny, shared_data):
    mouse = pd.read_csv(shared_data / "prior_knowledge" / "progeny_mouse_top500.csv")
    genes = np.array(sorted(set(mouse["target"])))[:200]
    genes = np.array([g for g in genes if g.upper() != g])  # keep only genes spelt differently in mouse
    d = np.linspace(-1, 1, len(genes))
    with pytest.raises(ValueError, match="is a target in net"):
        pathway_agreement(d, d, progeny, genes=genes)
