from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from vcell.bench._leakage import check_leakage
from vcell.bench._split import split

GENES = ["A", "B", "C", "D", "E", "F"]


def make_adata(labels: list[str], *, extra: dict | None = None) -> ad.AnnData:
    obs = pd.DataFrame({"vcell_perturbation": labels, **(extra or {})})
    obs.index = [f"cell{i}" for i in range(len(obs))]
    return ad.AnnData(np.zeros((len(obs), 2), dtype=np.float32), obs=obs)


def combo_adata() -> ad.AnnData:
    labels = ["control"] * 10
    for g in GENES:
        labels += [g] * 5
    for a, b in itertools.combinations(GENES, 2):
        labels += [f"{a}+{b}"] * 5
    return make_adata(labels)


def set_split(adata: ad.AnnData, mask, value: str) -> None:
    adata.obs.loc[np.asarray(mask), "vcell_split"] = value


def first(mask) -> np.ndarray:
    out = np.zeros(len(mask), dtype=bool)
    out[np.flatnonzero(np.asarray(mask))[0]] = True
    return out


def test_missing_split_raises_keyerror():
    with pytest.raises(KeyError, match=r"run vcell.bench.split"):
        check_leakage(combo_adata())


def test_test_cell_moved_to_train_is_caught():
    adata = combo_adata()
    split(adata, kind="combo_seen1", seed=1)
    check_leakage(adata)
    held = adata.uns["vcell_split"]["held_out"][0]
    set_split(adata, first(adata.obs["vcell_perturbation"] == held), "train")
    with pytest.raises(
        ValueError, match=rf"kind 'combo_seen1'\): 1 train/val cells .*{held.replace('+', '[+]')} \(1 train\)"
    ):
        check_leakage(adata)


def test_other_test_subgroup_in_val_is_caught():
    # held_out is seen1, but a seen0 or unseen-single condition in val also leaks
    adata = combo_adata()
    split(adata, kind="combo_seen1", seed=1)
    unseen = adata.uns["vcell_split"]["subgroups"]["unseen_single"][0]
    set_split(adata, adata.obs["vcell_perturbation"] == unseen, "val")
    with pytest.raises(ValueError, match=rf"5 train/val cells .*'?{unseen} \(5 val\)"):
        check_leakage(adata)


def test_unseen_gene_in_training_is_caught():
    adata = combo_adata()
    split(adata, kind="combo_seen2", seed=1)
    info = adata.uns["vcell_split"]
    ood = sorted(set(GENES) - set(info["train_genes"]))[0]
    # a training cell relabelled to a new condition that uses an unseen gene
    train_ctrl = first((adata.obs["vcell_perturbation"] == "control").to_numpy())
    adata.obs["vcell_perturbation"] = adata.obs["vcell_perturbation"].astype(object)
    adata.obs.loc[train_ctrl, "vcell_perturbation"] = f"{ood}+ZZZ"
    with pytest.raises(ValueError, match="gene outside the train gene set"):
        check_leakage(adata)


def test_reversed_copy_of_held_out_combo_is_caught():
    adata = combo_adata()
    split(adata, kind="combo_half", seed=2)
    held = adata.uns["vcell_split"]["held_out"][0]
    a, b = held.split("+")
    train_ctrl = first((adata.obs["vcell_perturbation"] == "control").to_numpy())
    adata.obs.loc[train_ctrl, "vcell_perturbation"] = f"{b}+{a}"  # spelled the other way round, in train
    with pytest.raises(ValueError, match=rf"{a}[+]{b} \(1 train\)"):
        check_leakage(adata)


def test_combo_with_held_out_single_in_train_is_caught():
    adata = combo_adata()
    split(adata, kind="unseen_perturbation", held_out=["A"], seed=0)
    check_leakage(adata)
    train_ctrl = first((adata.obs["vcell_perturbation"] == "control").to_numpy())
    adata.obs.loc[train_ctrl, "vcell_perturbation"] = "A+NEW"
    with pytest.raises(ValueError, match=r"A\+NEW \(contains a held-out perturbation\) \(1 train\)"):
        check_leakage(adata)


def test_held_out_dose_in_train_is_caught():
    labels, doses = ["control"] * 4, [0.0] * 4
    for d in [1.0, 10.0, 100.0]:
        labels += ["D1"] * 4
        doses += [d] * 4
    adata = make_adata(labels, extra={"vcell_dose": np.asarray(doses, dtype=np.float32)})
    split(adata, kind="unseen_dose", seed=0)
    assert adata.uns["vcell_split"]["held_out"] == ["D1@10"]
    check_leakage(adata)
    # the same drug at another dose in train is fine; the held-out dose is not
    cell = first(((adata.obs["vcell_dose"] == 10.0) & (adata.obs["vcell_split"] == "test")).to_numpy())
    set_split(adata, cell, "val")
    with pytest.raises(ValueError, match=r"D1@10 \(1 val\)"):
        check_leakage(adata)


def test_held_out_cell_type_perturbed_cell_in_train_is_caught():
    labels, types = [], []
    for t in ["T1", "T2"]:
        labels += ["control"] * 4 + ["X"] * 4
        types += [t] * 8
    adata = make_adata(labels, extra={"cell_type": types})
    split(adata, kind="unseen_cell_type", held_out="T1", seed=0)
    check_leakage(adata)
    obs = adata.obs
    set_split(adata, first(((obs["cell_type"] == "T1") & (obs["vcell_perturbation"] == "X")).to_numpy()), "train")
    with pytest.raises(ValueError, match=r"X in T1 \(1 train\)"):
        check_leakage(adata)


def test_random_cells_is_not_flagged_and_bad_values_are():
    adata = combo_adata()
    split(adata, kind="random_cells", seed=0)
    check_leakage(adata)
    adata.obs["vcell_split"] = adata.obs["vcell_split"].astype(str)
    adata.obs.iloc[0, adata.obs.columns.get_loc("vcell_split")] = "holdout"
    with pytest.raises(ValueError, match=r"1 cells outside \['train', 'val', 'test'\]"):
        check_leakage(adata)


def test_message_counts_train_and_val():
    adata = combo_adata()
    split(adata, kind="combo_half", seed=0)
    held = adata.uns["vcell_split"]["held_out"][0]
    idx = np.flatnonzero((adata.obs["vcell_perturbation"] == held).to_numpy())
    mask_train = np.isin(np.arange(adata.n_obs), idx[:2])
    mask_val = np.isin(np.arange(adata.n_obs), idx[2:3])
    set_split(adata, mask_train, "train")
    set_split(adata, mask_val, "val")
    with pytest.raises(ValueError, match=rf"3 train/val cells .*{held.replace('+', '[+]')} \(2 train, 1 val\)"):
        check_leakage(adata)
