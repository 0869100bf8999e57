from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mudata as md
import numpy as np
import pytest


def _protein_round_trip(
    model, mdata: md.MuData, perturbation: str, path: Path, rna: np.ndarray, prot: np.ndarray, *, load_adata
):
    """Save ``model`` (trained with proteins), load it on ``load_adata`` and check it predicts ``rna``/``prot`` again,
    also on a new MuData of the same cells whose proteins are not yet in ``obsm['vcell_protein']``.

    Returns the loaded model and that new MuData (its proteins attached by the last prediction).
    """
    model.save(path, overwrite=True, save_anndata=False)
    loaded = type(model).load(path, adata=load_adata, accelerator="cpu")
    assert loaded.protein_names_ == model.protein_names_
    np.testing.assert_array_equal(loaded.predict(mdata, perturbation=perturbation), rna)
    np.testing.assert_array_equal(loaded.predict(mdata, perturbation=perturbation, modality="prot"), prot)
    fresh = md.MuData({"rna": mdata["rna"].copy(), "prot": mdata["prot"].copy()})
    del fresh["rna"].obsm["vcell_protein"]
    np.testing.assert_array_equal(loaded.predict(fresh, perturbation=perturbation, modality="prot"), prot)
    return loaded, fresh


@pytest.fixture
def protein_round_trip() -> Callable:
    """:func:`_protein_round_trip`: the save/load check every model with proteins shares."""
    return _protein_round_trip
