from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from vcell.bench._leakage import check_leakage
from vcell.bench._split import SPLIT_KINDS, canonical_condition, split

GENES = ["A", "B", "C", "D", "E", "F"]
N_CELLS = 5


def make_adata(labels: list[str], *, extra: dict | None = None) -> ad.AnnData:
    obs = pd.DataFrame({"vcell_perturbation": labels, **(extra or {})})
    obs.index = [f"cell{i}" for i in range(len(obs))]
    return ad.AnnData(np.zeros((len(obs), 2), dtype=np.float32), obs=obs)


def combo_adata(pairs: list[tuple[str, str]] | None = None, *, reverse_some: bool = True) -> ad.AnnData:
    """6 singles, the given pairs (default: all 15), 5 cells each, plus 10 controls; some pairs spelled B+A."""
    pairs = list(itertools.combinations(GENES, 2)) if pairs is None else pairs
    labels = ["control"] * 10
    for g in GENES:
        labels += [g] * N_CELLS
    for i, (a, b) in enumerate(pairs):
        for j in range(N_CELLS):
            # spell some cells "B+A" (raw data are not always sorted)
            labels.append(f"{b}+{a}" if reverse_some and (i + j) % 3 == 0 else f"{a}+{b}")
    return make_adata(labels)


def conds_of(adata: ad.AnnData, name: str) -> set[str]:
    obs = adata.obs
    return {canonical_condition(c) for c in obs.loc[obs["vcell_split"] == name, "vcell_perturbation"]} - {"control"}


def test_canonical_condition():
    assert canonical_condition("B+A") == "A+B"
    assert canonical_condition(" A + B ") == "A+B"
    assert canonical_condition("A+control") == "A"
    assert canonical_condition("ctrl+A", control="ctrl") == "A"
    assert canonical_condition("control") == "control"


# ---------------------------------------------------------------------------------------------------------------------
# GEARS simulation split
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_combo_seen_subgroups_by_construction(seed):
    adata = combo_adata()
    split(adata, kind="combo_seen1", seed=seed)
    info = adata.uns["vcell_split"]
    train_genes = set(info["train_genes"])
    # int(6 * 0.75) = 4 train genes, drawn as GEARS draws them (legacy generator over the sorted genes)
    expected = {GENES[i] for i in np.random.RandomState(seed).choice(6, 4, replace=False)}
    assert train_genes == expected
    ood = set(GENES) - train_genes
    sub = info["subgroups"]
    # all 15 pairs present: 1 pair of the two unseen genes, 2 x 4 pairs with one seen gene, 6 seen-2 pairs of which
    # int(6 * 0.75) = 4 train and 2 test
    assert sub["unseen_single"] == sorted(ood)
    assert sub["combo_seen0"] == ["+".join(sorted(ood))]
    assert len(sub["combo_seen1"]) == 8
    assert len(sub["combo_seen2"]) == 2
    for k in range(3):
        for cond in sub[f"combo_seen{k}"]:
            assert sum(g in train_genes for g in cond.split("+")) == k
    assert set(info["test_conditions"]) == {c for v in sub.values() for c in v}
    assert info["held_out"] == sub["combo_seen1"]
    assert conds_of(adata, "test") == set(info["test_conditions"])
    # training: singles of train genes and 4 seen-2 pairs, minus what went to val; val uses train genes only
    train_and_val = conds_of(adata, "train") | conds_of(adata, "val")
    assert {c for c in train_and_val if "+" not in c} == train_genes
    assert sum("+" in c for c in train_and_val) == 4
    assert all(set(c.split("+")) <= train_genes for c in train_and_val)
    assert set(info["val_subgroups"]["unseen_single"]) <= conds_of(adata, "val")
    # val: the recipe at 0.9 over the 4 train genes leaves int(4 * 0.9) = 3 of them seen, so 1 val single
    assert len(info["val_subgroups"]["unseen_single"]) == 1
    assert (adata.obs.loc[adata.obs["vcell_perturbation"] == "control", "vcell_split"] == "train").all()
    check_leakage(adata)


def test_combo_seen_kinds_share_split_and_differ_in_held_out():
    splits = {}
    for k in range(3):
        adata = combo_adata()
        split(adata, kind=f"combo_seen{k}", seed=3)
        splits[k] = adata
        assert adata.uns["vcell_split"]["held_out"] == adata.uns["vcell_split"]["subgroups"][f"combo_seen{k}"]
    assert (splits[0].obs["vcell_split"] == splits[1].obs["vcell_split"]).all()
    assert (splits[0].obs["vcell_split"] == splits[2].obs["vcell_split"]).all()


def test_combo_seen_empty_subgroup_raises():
    # 6 singles and the one pair A+B; seed 0 draws train genes B, C, D, F, so A+B is seen1 and seen0 is empty
    adata = combo_adata([("A", "B")])
    split(adata, kind="combo_seen1", seed=0)
    assert adata.uns["vcell_split"]["held_out"] == ["A+B"]
    with pytest.raises(ValueError, match=r"no test conditions for seed 0.*combo_seen0: 0.*6 single and 1 double"):
        split(adata, kind="combo_seen0", seed=0, overwrite=True)


def test_combo_seen_rejects_triples():
    adata = make_adata(["control", "A", "B", "C", "A+B", "A+B+C"])
    with pytest.raises(ValueError, match="3 or more parts"):
        split(adata, kind="combo_seen2", seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# other kinds
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2, 5])
def test_combo_half_halves_doubles(seed):
    pairs = list(itertools.combinations(GENES, 2))[:10]
    adata = combo_adata(pairs)
    split(adata, kind="combo_half", seed=seed)
    info = adata.uns["vcell_split"]
    doubles = sorted("+".join(p) for p in pairs)
    # drawn as in Ahlmann-Eltze's code: np.random.seed(seed); choice(sorted doubles, n // 2) train
    train = {doubles[i] for i in np.random.RandomState(seed).choice(10, 5, replace=False)}
    assert set(info["held_out"]) == set(doubles) - train
    assert len(info["held_out"]) == 5
    assert conds_of(adata, "test") == set(info["held_out"])
    # all singles train; val = round(0.1 * 5) -> 1 training double
    assert set(GENES) <= conds_of(adata, "train")
    assert len(conds_of(adata, "val")) == 1
    assert conds_of(adata, "val") <= train
    check_leakage(adata)
    split(adata, kind="combo_half", seed=seed, val_frac=0.0, overwrite=True)
    assert (adata.obs["vcell_split"] != "val").all()
    assert conds_of(adata, "train") == set(GENES) | train


def test_combo_half_odd_count_and_too_few():
    adata = combo_adata(list(itertools.combinations(GENES, 2))[:7])
    split(adata, kind="combo_half", seed=0)
    assert len(adata.uns["vcell_split"]["held_out"]) == 4  # 7 // 2 = 3 train, 4 test
    with pytest.raises(ValueError, match="at least 2 combination perturbations; the data have 1"):
        split(combo_adata([("A", "B")]), kind="combo_half", seed=0)


def test_unseen_perturbation_held_out_given():
    adata = combo_adata(list(itertools.combinations(GENES, 2))[:10])
    split(adata, kind="unseen_perturbation", held_out=["A"], seed=0)
    info = adata.uns["vcell_split"]
    assert info["held_out"] == ["A"]
    test = conds_of(adata, "test")
    assert test == {c for c in test if "A" in c.split("+")}
    assert test == {"A", "A+B", "A+C", "A+D", "A+E", "A+F"}
    assert set(info["test_conditions"]) == test
    # val: round(0.1 * 5) -> 1 of the 5 other singles, with the combinations containing it (but not A)
    val_singles = {c for c in conds_of(adata, "val") if "+" not in c}
    assert len(val_singles) == 1
    (v,) = val_singles
    assert all(v in c.split("+") for c in conds_of(adata, "val"))
    assert not any(v in c.split("+") for c in conds_of(adata, "train"))
    check_leakage(adata)


def test_unseen_perturbation_default_and_errors():
    adata = combo_adata(list(itertools.combinations(GENES, 2))[:10])
    split(adata, kind="unseen_perturbation", seed=4)
    assert len(adata.uns["vcell_split"]["held_out"]) == 1  # round(0.2 * 6)
    assert adata.uns["vcell_split"]["params"] == {"test_frac": 0.2, "val_frac": 0.1}
    with pytest.raises(ValueError, match=r"held_out \['Z'\] are not single perturbations"):
        split(adata, kind="unseen_perturbation", held_out=["Z"], overwrite=True)
    with pytest.raises(ValueError, match="all 6 single perturbations"):
        split(adata, kind="unseen_perturbation", held_out=GENES, overwrite=True)


def cell_type_adata() -> ad.AnnData:
    labels, types = [], []
    for t in ["T1", "T2", "T3"]:
        for cond, n in [("control", 6), ("X", 5), ("Y", 4)]:
            labels += [cond] * n
            types += [t] * n
    labels += ["X"] * 3  # a type with perturbed cells but no controls
    types += ["T4"] * 3
    return make_adata(labels, extra={"cell_type": types})


def test_unseen_cell_type_keeps_controls_in_train():
    adata = cell_type_adata()
    split(adata, kind="unseen_cell_type", held_out="T1", seed=0)
    obs = adata.obs
    info = adata.uns["vcell_split"]
    t1 = obs["cell_type"] == "T1"
    ctrl = obs["vcell_perturbation"] == "control"
    assert (obs.loc[t1 & ~ctrl, "vcell_split"] == "test").all()
    assert (obs.loc[t1 & ctrl, "vcell_split"] == "train").all()
    assert (obs.loc[~t1, "vcell_split"] != "test").all()
    assert info["cell_type"] == "T1"
    assert info["cell_type_key"] == "cell_type"
    assert info["held_out"] == ["X", "Y"]
    # val: round(0.1 * 21) = 2 perturbed cells of other types
    assert (obs["vcell_split"] == "val").sum() == 2
    assert not (obs.loc[obs["vcell_split"] == "val", "vcell_perturbation"] == "control").any()
    check_leakage(adata)


def test_unseen_cell_type_default_choice_and_errors():
    chosen = set()
    for seed in range(12):
        adata = cell_type_adata()
        split(adata, kind="unseen_cell_type", seed=seed)
        chosen.add(adata.uns["vcell_split"]["cell_type"])
    assert chosen == {"T1", "T2", "T3"}  # never T4, which has no controls
    adata = cell_type_adata()
    with pytest.raises(ValueError, match=r"'T9' is not in adata.obs\['cell_type'\]; valid types: \['T1', 'T2'"):
        split(adata, kind="unseen_cell_type", held_out="T9")
    with pytest.raises(ValueError, match="'T4' has no control"):
        split(adata, kind="unseen_cell_type", held_out="T4")
    with pytest.raises(KeyError, match="cell_type_key 'celltype'"):
        split(adata, kind="unseen_cell_type", cell_type_key="celltype")


def dose_adata(dtype=np.float64) -> ad.AnnData:
    labels, doses = ["control"] * 5, [0.0] * 5
    for drug, levels in [("D1", [0.1, 1.0, 10.0, 100.0]), ("D2", [1.0, 10.0, 100.0]), ("D3", [10.0, 100.0])]:
        for d in levels:
            labels += [drug] * 4
            doses += [d] * 4
    return make_adata(labels, extra={"vcell_dose": np.asarray(doses, dtype=dtype)})


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_unseen_dose_holds_one_interior_level_per_drug(dtype):
    adata = dose_adata(dtype)
    split(adata, kind="unseen_dose", seed=0)
    held = adata.uns["vcell_split"]["held_out"]
    drugs = [h.split("@")[0] for h in held]
    assert drugs == ["D1", "D2"]  # D3 has only 2 levels
    assert held[1] == "D2@10"  # the only interior level of D2
    assert held[0] in {"D1@1", "D1@10"}
    test = adata.obs[adata.obs["vcell_split"] == "test"]
    assert len(test) == 8
    assert {f"{p}@{d:g}" for p, d in zip(test["vcell_perturbation"], test["vcell_dose"], strict=True)} == set(held)
    check_leakage(adata)


def test_unseen_dose_requested_level_and_errors():
    adata = dose_adata()
    split(adata, kind="unseen_dose", held_out_dose=100.0, seed=0)
    assert adata.uns["vcell_split"]["held_out"] == ["D1@100", "D2@100"]
    with pytest.raises(ValueError, match="held_out_dose=3.0 is not a dose level"):
        split(adata, kind="unseen_dose", held_out_dose=3.0, overwrite=True)
    few = make_adata(["control", "X", "X", "Y"], extra={"vcell_dose": [0.0, 1.0, 2.0, 1.0]})
    with pytest.raises(ValueError, match=">= 3 dose levels.*X: 2, Y: 1"):
        split(few, kind="unseen_dose")
    bad = make_adata(["control", "X"], extra={"vcell_dose": ["0", "high"]})
    with pytest.raises(ValueError, match="must be numeric"):
        split(bad, kind="unseen_dose")


def test_random_cells_counts():
    adata = combo_adata()
    split(adata, kind="random_cells", seed=0)
    obs = adata.obs
    n_pert = int((obs["vcell_perturbation"] != "control").sum())  # 21 conditions x 5 = 105
    assert (obs["vcell_split"] == "test").sum() == round(0.2 * n_pert)
    assert (obs["vcell_split"] == "val").sum() == round(0.1 * (n_pert - round(0.2 * n_pert)))
    assert (obs.loc[obs["vcell_perturbation"] == "control", "vcell_split"] == "train").all()
    assert adata.uns["vcell_split"]["held_out"] == []
    check_leakage(adata)


# ---------------------------------------------------------------------------------------------------------------------
# shared behaviour
# ---------------------------------------------------------------------------------------------------------------------
KIND_CASES = [
    ("combo_seen0", combo_adata, {}),
    ("combo_seen1", combo_adata, {}),
    ("combo_seen2", combo_adata, {}),
    ("combo_half", combo_adata, {}),
    ("unseen_perturbation", combo_adata, {}),
    ("unseen_cell_type", cell_type_adata, {}),
    ("unseen_dose", dose_adata, {}),
    ("random_cells", combo_adata, {}),
]


def test_every_kind_has_a_case():
    assert sorted(k for k, _, _ in KIND_CASES) == sorted(SPLIT_KINDS)


@pytest.mark.parametrize(("kind", "make", "opts"), KIND_CASES)
def test_deterministic_and_seed_dependent(kind, make, opts):
    a, b = make(), make()
    split(a, kind=kind, seed=7, **opts)
    split(b, kind=kind, seed=7, **opts)
    assert a.obs["vcell_split"].equals(b.obs["vcell_split"])
    assert a.uns["vcell_split"]["held_out"] == b.uns["vcell_split"]["held_out"]
    assert list(a.obs["vcell_split"].cat.categories) == ["train", "val", "test"]
    others = []
    for seed in range(5):
        c = make()
        split(c, kind=kind, seed=seed, **opts)
        others.append(tuple(c.obs["vcell_split"]))
    assert len(set(others)) > 1


@pytest.mark.parametrize(("kind", "make", "opts"), KIND_CASES)
def test_copy_leaves_input_unchanged(kind, make, opts):
    adata = make()
    before_obs = adata.obs.copy()
    out = split(adata, kind=kind, seed=1, copy=True, **opts)
    assert out is not adata
    assert "vcell_split" in out.obs
    assert "vcell_split" in out.uns
    assert adata.obs.equals(before_obs)
    assert "vcell_split" not in adata.uns
    assert split(adata, kind=kind, seed=1, key_added="my_split", **opts) is None
    assert "my_split" in adata.obs
    check_leakage(adata, key="my_split")


@pytest.mark.parametrize(("kind", "make", "opts"), KIND_CASES)
def test_uns_round_trips_through_h5ad(kind, make, opts, tmp_path):
    adata = make()
    split(adata, kind=kind, seed=2, **opts)
    path = tmp_path / "split.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert back.obs["vcell_split"].equals(adata.obs["vcell_split"])
    assert list(back.uns["vcell_split"]["held_out"]) == adata.uns["vcell_split"]["held_out"]
    assert back.uns["vcell_split"]["kind"] == kind
    check_leakage(back)


def test_reversed_combo_spelling_is_the_same_condition():
    adata = combo_adata()
    raw = adata.obs["vcell_perturbation"]
    assert (raw == "B+A").any()
    assert (raw == "A+B").any()
    for kind in ["combo_seen1", "combo_half", "unseen_perturbation"]:
        split(adata, kind=kind, seed=1, overwrite=True)
        canon = raw.map(canonical_condition)
        per_condition = adata.obs.groupby(canon, observed=True)["vcell_split"].nunique()
        assert (per_condition == 1).all(), kind
        assert not any(c.startswith(("B+A", "C+A")) for c in adata.uns["vcell_split"]["test_conditions"])


def test_input_errors():
    adata = combo_adata()
    with pytest.raises(ValueError, match=r"unknown split kind 'combo'.*combo_seen0"):
        split(adata, kind="combo")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['test_frac'\] for split kind 'combo_half'"):
        split(adata, kind="combo_half", test_frac=0.5)
    with pytest.raises(KeyError, match="vcell.pp.harmonize"):
        split(adata, kind="combo_half", perturbation_key="condition")
    with pytest.raises(ValueError, match="only control cells"):
        split(make_adata(["control"] * 3), kind="random_cells")
    with pytest.raises(ValueError, match="test_frac must be in"):
        split(adata, kind="random_cells", test_frac=1.5)
    missing = make_adata(["control", "A", None])
    with pytest.raises(ValueError, match="1 missing labels"):
        split(missing, kind="random_cells")


def test_custom_labels_and_control():
    adata = make_adata(["ctrl", "ctrl", "A+ctrl", "B+ctrl", "A+B", "B+C", "C+ctrl"] * 3)
    adata.obs["condition"] = adata.obs.pop("vcell_perturbation")
    split(adata, kind="combo_half", perturbation_key="condition", control="ctrl", seed=0)
    assert (adata.obs.loc[adata.obs["condition"] == "ctrl", "vcell_split"] == "train").all()
    assert len(adata.uns["vcell_split"]["held_out"]) == 1
    check_leakage(adata, perturbation_key="condition")


def test_kang_unseen_cell_type(kang_path):
    adata = ad.read_h5ad(kang_path)
    adata.obs["vcell_perturbation"] = adata.obs["perturbation"].astype(str)
    split(adata, kind="unseen_cell_type", held_out="CD4T", seed=0)
    obs = adata.obs
    cd4 = obs["cell_type"] == "CD4T"
    stim = obs["vcell_perturbation"] == "IFNb"
    assert (obs["vcell_split"] == "test").sum() == 356
    assert (obs.loc[cd4 & stim, "vcell_split"] == "test").all()
    assert (obs.loc[cd4 & ~stim, "vcell_split"] == "train").all()  # 278 CD4T controls are training source cells
    assert (obs.loc[~stim, "vcell_split"] == "train").all()
    assert (obs["vcell_split"] == "val").sum() == round(0.1 * (1039 - 356))
    assert adata.uns["vcell_split"]["held_out"] == ["IFNb"]
    check_leakage(adata)


def test_one_report_line_per_call(capsys):
    import logging
    import sys

    import scanpy  # noqa: F401  (scanpy and scvi-tools configure logging of their own on import)
    import scvi  # noqa: F401

    root_handler = logging.StreamHandler(sys.stderr)  # as logging.basicConfig in a notebook
    logging.getLogger().addHandler(root_handler)
    try:
        adata = combo_adata()
        capsys.readouterr()
        for seed in (1, 1, 2):
            split(adata, kind="combo_half", seed=seed, overwrite=True)
            assert capsys.readouterr().err.count("split 'combo_half'") == 1
    finally:
        logging.getLogger().removeHandler(root_handler)
