"""Cells marked ``obs['vcell_split'] == 'test'`` are never trained or validated on, with or without ``val`` cells."""

from __future__ import annotations

import numpy as np
import pytest

import vcell

QUIET = {"enable_progress_bar": False}


def _sim(with_val: bool):
    adata = vcell.datasets.simulate(n_cells=240, n_genes=30, n_perturbations=3, n_combos=1, cell_types=2, seed=0)
    split = np.array(["train"] * adata.n_obs, dtype=object)
    split[np.random.default_rng(0).permutation(adata.n_obs)[:60]] = "test"
    if with_val:
        split[np.flatnonzero(split == "train")[:30]] = "val"
    adata.obs["vcell_split"] = split
    return adata, np.flatnonzero(split == "test")


def _fit(cls, adata, train=None, **init):
    cls.setup_anndata(adata, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"])
    model = cls(adata, **init)
    model.train(max_epochs=1, seed=0, accelerator="cpu", trainer_kwargs=QUIET, **(train or {}))
    return model


#: (class, init kwargs, extra train kwargs): tiny models, one epoch; the split wiring does not depend on their size
MODELS = {
    "CausalVAE": (vcell.model.CausalVAE, {"n_latent": 4, "n_hidden": 16}, {}),
    "FlowMatching": (vcell.model.FlowMatching, {"n_components": 5, "n_hidden": 16}, {}),
    # CellJEPA.train pretrains first, 100 epochs by default: one is enough here
    "CellJEPA": (
        vcell.model.CellJEPA,
        {"n_latent": 8, "n_modules": 3, "n_hidden": 16, "n_layers": 1, "n_heads": 2},
        {"pretrain_epochs": 1},
    ),
}


@pytest.mark.parametrize("with_val", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_test_cells_are_neither_trained_nor_validated_on(name: str, with_val: bool):
    adata, test = _sim(with_val)
    cls, init, train = MODELS[name]
    model = _fit(cls, adata, train, **init)
    used = np.concatenate([model.train_indices_, model.validation_indices_])
    assert not np.isin(test, used).any()
    if hasattr(model, "pretrain_indices_"):  # CellJEPA's encoder pretraining
        assert not np.isin(test, model.pretrain_indices_).any()
    # every non-test cell is used (a seeded share of them for validation when there are no 'val' cells)
    assert len(np.unique(used)) == adata.n_obs - len(test) == len(used)
    if with_val:
        np.testing.assert_array_equal(model.validation_indices_, np.flatnonzero(adata.obs["vcell_split"] == "val"))
    else:
        assert len(model.validation_indices_) == round(0.1 * (adata.n_obs - len(test)))


def test_all_test_cells_is_a_clear_error():
    adata, _ = _sim(False)
    adata.obs["vcell_split"] = "test"
    cls, init, _ = MODELS["CausalVAE"]
    cls.setup_anndata(adata, perturbation_key="perturbation", control="control")
    model = cls(adata, **init)
    with pytest.raises(ValueError, match="no cells to train on"):
        model.train(max_epochs=1, seed=0, accelerator="cpu", trainer_kwargs=QUIET)
