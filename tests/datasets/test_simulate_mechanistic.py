"""``simulate(interactions=...)``: the random-draw mode unchanged, the mechanistic mode's saturation, AND gates and
cascades, and its ground truth."""

from __future__ import annotations

import hashlib

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from vcell._utils import group_means, log1p_cp10k
from vcell.bench._run import _simulated_epistasis
from vcell.datasets import simulate

#: 16 singles, 48 doubles (30% non-additive: 5 saturation, 5 AND gate, 4 cascade)
MECH = {"n_cells": 2000, "n_genes": 200, "n_perturbations": 16, "n_combos": 48, "interactions": "mechanistic"}


def _digest(adata: ad.AnnData) -> str:
    h = hashlib.sha256()
    for a in (adata.X.data, adata.X.indices, adata.X.indptr):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update("|".join(adata.obs["perturbation"].astype(str)).encode())
    return h.hexdigest()[:16]


def _rows(truth: dict, cell_type: str = "type0") -> dict[str, np.ndarray]:
    """Noise-free log-means of every condition (one cell type, no doses)."""
    labels = list(truth["true_log_mean_labels"])
    suffix = f"|{cell_type}"
    return {lab[: -len(suffix)]: truth["true_log_mean"][i] for i, lab in enumerate(labels) if lab.endswith(suffix)}


def _combos_of(truth: dict, flags: tuple[bool, bool, bool]) -> list[str]:
    """Doubles whose (saturation, AND gate, cascade) flags are exactly ``flags``."""
    f = np.asarray(truth["mechanistic"]["flags"])
    return [c for c, row in zip(truth["combos"], f, strict=True) if tuple(row) == flags]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # digests of the counts and labels before the mechanistic mode existed (numpy 1.26 and 2.x agree)
        ({"n_cells": 300, "n_genes": 30, "n_perturbations": 4, "n_combos": 3, "frac_epistatic": 1 / 3}, "83637bc868a13065"),
        ({"n_cells": 300, "n_genes": 30, "n_perturbations": 4, "n_combos": 3, "doses": [0.5, 1.0], "cell_types": 2}, "62893c359b8e48c4"),
        ({"n_cells": 300, "n_genes": 60, "n_perturbations": 4, "n_combos": 3, "effects": "target_programs"}, "a70a5a85eac349e0"),
    ],
)  # fmt: skip
def test_random_mode_unchanged_bit_for_bit(kwargs, expected):
    seed = {"83637bc868a13065": 11, "62893c359b8e48c4": 12, "a70a5a85eac349e0": 13}[expected]
    assert _digest(simulate(**kwargs, seed=seed)) == expected
    explicit = simulate(**kwargs, interactions="random", seed=seed)
    assert _digest(explicit) == expected
    assert "mechanistic" not in explicit.uns["vcell_simulation"]


def test_mechanistic_counts_and_exact_additivity():
    adata = simulate(**MECH, cell_types=2, seed=0)
    truth = adata.uns["vcell_simulation"]
    kinds = pd.Series(truth["interaction_kind"]).value_counts().to_dict()
    assert kinds == {"additive": 34, "saturation": 5, "and_gate": 5, "cascade": 4}
    assert truth["params"]["interactions"] == "mechanistic"
    flags = np.asarray(truth["mechanistic"]["flags"])
    np.testing.assert_array_equal(truth["epistatic"], flags.any(1))
    assert _simulated_epistasis(adata, list(truth["combos"])).tolist() == list(truth["epistatic"])
    # labels agree with the noise-free non-additivity, in every cell type
    for t in ("type0", "type1"):
        rows = _rows(truth, t)
        for combo, epi in zip(truth["combos"], truth["epistatic"], strict=True):
            a, b = combo.split("+")
            gap = np.abs(rows[combo] - (rows[a] + rows[b] - rows["control"])).max()
            assert (gap > 0.2) if epi else (gap < 1e-10), (combo, t, gap)


def test_saturation_makes_same_program_doubles_sub_additive():
    truth = simulate(**MECH, seed=1).uns["vcell_simulation"]
    mech, perts = truth["mechanistic"], list(truth["perturbations"])
    W = np.asarray(truth["program_loadings"])
    rows = _rows(truth)
    ctrl = rows["control"]
    sat = _combos_of(truth, (True, False, False))
    assert sat
    gate_genes = (np.asarray(mech["gate_loadings"]) != 0).any(0)
    for combo in sat:
        a, b = combo.split("+")
        ia, ib = perts.index(a), perts.index(b)
        act = np.asarray(truth["single_effects"])  # directly or through a regulator
        shared = np.flatnonzero((act[ia] != 0) & (act[ib] != 0))
        assert shared.size  # the double's singles act on a common program
        for k in shared:  # that program's activity: same direction, less than the sum
            both = (
                np.asarray(truth["combo_interaction"])[list(truth["combos"]).index(combo), k] + act[ia, k] + act[ib, k]
            )
            assert np.sign(act[ia, k]) == np.sign(act[ib, k]) == np.sign(both)
            assert abs(act[ia, k]) < abs(both) < abs(act[ia, k]) + abs(act[ib, k]) - 0.1
        # genes loaded on the shared program only move less than the singles' shifts add up to
        only = (W[shared] != 0).any(0) & ((W != 0).sum(0) == 1) & ~gate_genes
        only[[int(p[1:]) for p in perts]] = False  # targets (gene G0012 is column 12): knocked down
        d_a, d_b, d_ab = (np.abs(rows[x] - ctrl)[only] for x in (a, b, combo))
        assert np.all(d_ab < d_a + d_b)
        assert np.mean(d_a + d_b - d_ab) > 0.1
        # genes of the programs the two do not share are additive
        other = ~(W[shared] != 0).any(0) & ~gate_genes
        np.testing.assert_allclose(rows[combo][other], (rows[a] + rows[b] - ctrl)[other], atol=1e-10)


def test_and_gate_genes_respond_only_in_the_double():
    truth = simulate(**MECH, seed=2).uns["vcell_simulation"]
    mech = truth["mechanistic"]
    rows = _rows(truth)
    ctrl = rows["control"]
    gates = _combos_of(truth, (False, True, False))
    assert gates
    loadings, programs = np.asarray(mech["gate_loadings"]), np.asarray(mech["gate_programs"])
    act = np.asarray(truth["single_effects"])
    perts = list(truth["perturbations"])
    for combo in gates:
        a, b = combo.split("+")
        ia, ib = perts.index(a), perts.index(b)
        # a gate whose two inputs come one from each single
        on = [
            j
            for j, (k1, k2) in enumerate(programs)
            if (act[ia, k1] != 0 and act[ib, k2] != 0 and act[ia, k2] == 0 and act[ib, k1] == 0)
            or (act[ib, k1] != 0 and act[ia, k2] != 0 and act[ib, k2] == 0 and act[ia, k1] == 0)
        ]
        assert on, combo
        genes = (loadings[on] != 0).any(0)
        np.testing.assert_allclose(rows[a][genes], ctrl[genes], atol=1e-12)  # silent in each single
        np.testing.assert_allclose(rows[b][genes], ctrl[genes], atol=1e-12)
        assert np.abs(rows[combo][genes] - ctrl[genes]).min() > 0.2  # every gate gene responds in the double


def test_cascade_masks_the_upstream_effect():
    adata = simulate(**MECH, mechanism_mix={"cascade": 1}, frac_epistatic=0.25, seed=3)
    truth, genes = adata.uns["vcell_simulation"], list(adata.var_names)
    mech = truth["mechanistic"]
    assert set(truth["interaction_kind"]) == {"additive", "cascade"}
    rows = _rows(truth)
    ctrl = rows["control"]
    edges = dict(zip(mech["cascade_upstream"], mech["cascade_regulator"], strict=True))
    n_checked = 0
    for combo in truth["combos"]:
        a, b = combo.split("+")
        for up, reg in ((a, b), (b, a)):
            if edges.get(up) != reg:
                continue
            n_checked += 1
            g_up, g_reg = genes.index(up), genes.index(reg)
            # alone, the upstream perturbation moves the regulator gene and its programs' genes
            assert rows[up][g_reg] < ctrl[g_reg] - 0.3
            assert np.abs(rows[up] - ctrl).sum() > 1.0
            # with the regulator knocked out, the double is the regulator's single, plus up's own knock-down
            rest = [g for g in range(len(genes)) if g != g_up]
            np.testing.assert_allclose(rows[combo][rest], rows[reg][rest], atol=1e-12)
            assert rows[combo][g_up] < rows[reg][g_up] - 0.5
    assert n_checked


def test_observed_non_additivity_matches_labels():
    from sklearn.metrics import average_precision_score

    adata = simulate(**{**MECH, "n_cells": 4000}, seed=4)
    truth = adata.uns["vcell_simulation"]
    means = group_means(log1p_cp10k(adata.X), adata.obs["perturbation"].astype(str).to_numpy())
    gap = []
    for combo in truth["combos"]:
        a, b = combo.split("+")
        gap.append(np.linalg.norm(means.loc[combo] - (means.loc[a] + means.loc[b] - means.loc["control"])))
    labels = np.asarray(truth["epistatic"])
    assert average_precision_score(labels, gap) > 0.9
    assert np.median(np.asarray(gap)[labels]) > 1.2 * np.median(np.asarray(gap)[~labels])


def test_mechanistic_reproducible_and_round_trips(tmp_path):
    kwargs = {**MECH, "n_cells": 600, "n_genes": 60, "n_perturbations": 8, "n_combos": 10, "doses": [0.5, 1.0]}
    a, b, c = simulate(**kwargs, seed=5), simulate(**kwargs, seed=5), simulate(**kwargs, seed=6)
    assert (a.X != b.X).nnz == 0
    assert a.obs.equals(b.obs)
    assert (a.X != c.X).nnz > 0
    np.testing.assert_array_equal(
        a.uns["vcell_simulation"]["true_log_mean"], b.uns["vcell_simulation"]["true_log_mean"]
    )
    a.write_h5ad(tmp_path / "mech.h5ad")
    back = ad.read_h5ad(tmp_path / "mech.h5ad").uns["vcell_simulation"]["mechanistic"]
    mech = a.uns["vcell_simulation"]["mechanistic"]
    assert set(back) == set(mech)
    np.testing.assert_array_equal(back["flags"], mech["flags"])
    net = pd.DataFrame(back["network"])
    assert set(net["kind"]) <= {"effect", "loading", "gate_input", "gate", "cascade"}
    assert len(net) == len(mech["network"]["source"])


def test_mechanistic_with_protein_and_cell_types():
    mdata = simulate(**{**MECH, "n_cells": 800, "n_genes": 80, "n_perturbations": 8, "n_combos": 10}, protein=True,
                     cell_types=2, seed=7)  # fmt: skip
    assert mdata["prot"].n_vars == 20
    assert "mechanistic" in mdata.uns["vcell_simulation"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"interactions": "epistatic"}, "interactions must be 'random' or 'mechanistic'"),
        ({"mechanism_mix": {"cascade": 1.0}}, "mechanism_mix applies to interactions='mechanistic' only"),
        ({"interactions": "mechanistic", "mechanism_mix": {"saturate": 1.0}}, "unknown mechanisms \\['saturate'\\]"),
        ({"interactions": "mechanistic", "mechanism_mix": {"cascade": -1.0}}, "mechanism_mix\\['cascade'\\]"),
        ({"interactions": "mechanistic", "mechanism_mix": {"cascade": float("nan")}}, "finite number"),
        ({"interactions": "mechanistic", "mechanism_mix": {"cascade": 0}}, "positive weight"),
        ({"interactions": "mechanistic", "mechanism_mix": [0.5, 0.5]}, "must be a mapping"),
        # one program: every pair shares it, so no double can be additive
        (
            {"interactions": "mechanistic", "n_perturbations": 4, "n_combos": 6, "n_programs": 1, "frac_epistatic": 0},
            "needs 6 'additive' doubles",
        ),
    ],
)
def test_bad_interaction_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate(n_cells=300, n_genes=30, **{"n_perturbations": 4, "n_combos": 3, **kwargs}, seed=0)
