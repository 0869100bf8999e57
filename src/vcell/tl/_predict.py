"""``vcell.tl.predict_perturbation``: counterfactual predictions of control cells into AnnData."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vcell._constants import PERT_COL
from vcell._utils import check_obs_keys

if TYPE_CHECKING:
    from anndata import AnnData

    from vcell.model import PerturbationModel


def _layer_key(key_added: str, perturbation: str, n: int) -> str:
    return key_added if n == 1 else f"{key_added}_{perturbation}"


def perturbation_list(perturbations: str | Sequence[str], verb: str) -> list[str]:
    """``perturbations`` as a non-empty list without duplicates (``verb``: what is done with them, for the error)."""
    perts = [perturbations] if isinstance(perturbations, str) else [str(p) for p in perturbations]
    if not perts:
        msg = f"perturbations is empty: name at least one condition to {verb}"
        raise ValueError(msg)
    if len(set(perts)) != len(perts):
        msg = f"perturbations contains duplicates: {perts}"
        raise ValueError(msg)
    return perts


def starting_cells(
    adata: AnnData, model: PerturbationModel, controls: Any, cell_type: str | None, cell_type_key: str
) -> np.ndarray:
    """Indices of the control cells a prediction starts from: ``controls`` (see the model), of ``cell_type``."""
    idx = model._control_indices(model._check_adata(adata), controls)
    if cell_type is None:
        return idx
    check_obs_keys(adata, [cell_type_key], what="cell_type_key")
    types = adata.obs[cell_type_key].astype(str).to_numpy()
    if cell_type not in set(types):
        msg = f"cell_type {cell_type!r} not in adata.obs[{cell_type_key!r}]; values: {sorted(set(types))[:20]}"
        raise KeyError(msg)
    idx = idx[types[idx] == cell_type]
    if idx.size == 0:
        msg = f"no control cells of cell_type {cell_type!r} to start from"
        raise ValueError(msg)
    return idx


def predict_perturbation(
    adata: AnnData,
    model: PerturbationModel,
    *,
    perturbations: str | Sequence[str],
    controls: Any = None,
    cell_type: str | None = None,
    cell_type_key: str = "cell_type",
    dose: float = 1.0,
    key_added: str = "vcell_pred",
    return_adata: bool = False,
    seed: int | None = None,
) -> AnnData | None:
    """Predict how control cells respond to perturbations (their counterfactuals).

    Parameters
    ----------
    adata
        Data with the control cells (``obs['vcell_perturbation'] == 'control'``, or ``controls=``) and the
        genes the model was trained on.
    model
        A trained vcell model (e.g. :class:`vcell.model.Baseline`).
    perturbations
        Condition(s) to predict, canonical labels such as ``"IFNb"`` or ``"A+B"``.
    controls
        Cells to start from: ``None`` (all control cells), a boolean mask, integer indices or obs names.
    cell_type
        Restrict the starting cells to this value of ``obs[cell_type_key]``.
    cell_type_key
        ``obs`` column read when ``cell_type`` is given.
    dose
        Dose of the perturbation(s).
    key_added
        Layer/uns key (and obs-name prefix) of the output.
    return_adata
        Return a new AnnData of predicted cells instead of writing layers into ``adata``.
    seed
        Random seed for stochastic models (defaults to ``vcell.settings.seed``).

    Returns
    -------
    With ``return_adata=True``: a new AnnData (n_selected_cells x n_perturbations rows, adata's genes) whose
    ``X`` holds log1p(CP10k) predictions, ``obs['perturbation']`` the predicted condition,
    ``obs['vcell_source_cell']`` the control cell it started from (plus that cell's other ``obs`` columns),
    and ``uns[key_added]`` the parameters. Otherwise ``None`` and ``adata`` is updated.

    Sets the following fields (``return_adata=False``)
    --------------------------------------------------
    ``adata.layers[key_added]`` (one perturbation) or ``adata.layers[f"{key_added}_{perturbation}"]`` (several)
        float32, adata's shape and gene order: the prediction on the rows of the selected control cells,
        NaN on every other row.
    ``adata.obs[f"{key_added}_source"]``
        bool, which cells hold a prediction.
    ``adata.uns[key_added]``
        ``{"params": ..., "model": ..., "layers": [...], "vcell_version": ...}``.

    Examples
    --------
    >>> import vcell
    >>> adata = vcell.datasets.kang2018()
    >>> vcell.model.Baseline.setup_anndata(adata, perturbation_key="perturbation", control="control")
    >>> model = vcell.model.Baseline(adata, method="mean")
    >>> model.train()
    >>> vcell.tl.predict_perturbation(adata, model, perturbations="IFNb")
    >>> adata.layers["vcell_pred"].shape
    (1975, 6998)
    """
    import anndata as ad

    from vcell import __version__

    perts = perturbation_list(perturbations, "predict")
    idx = starting_cells(adata, model, controls, cell_type, cell_type_key)
    preds = {p: model.predict(adata, perturbation=p, controls=idx, dose=dose, seed=seed) for p in perts}
    params = {
        "perturbations": perts,
        "n_cells": int(idx.size),
        "cell_type": cell_type if cell_type is not None else "",
        "dose": float(dose),
        "seed": -1 if seed is None else int(seed),
    }
    info = {"params": params, "model": repr(type(model).__name__), "vcell_version": __version__}

    if return_adata:
        obs_src = adata.obs.iloc[idx]
        obs = pd.concat([obs_src.assign(perturbation=p) for p in perts], axis=0)
        obs["vcell_source_cell"] = np.tile(adata.obs_names[idx].to_numpy(), len(perts))
        obs[PERT_COL] = obs["perturbation"]
        obs.index = [f"{key_added}-{p}-{c}" for p in perts for c in adata.obs_names[idx]]
        for col in ("perturbation", PERT_COL):
            obs[col] = pd.Categorical(obs[col], categories=perts)
        out = ad.AnnData(
            X=np.concatenate([preds[p] for p in perts], axis=0).astype(np.float32),
            obs=obs,
            var=adata.var.copy(),
        )
        out.uns[key_added] = info
        return out

    layers = []
    for p in perts:
        full = np.full(adata.shape, np.nan, dtype=np.float32)
        full[idx] = preds[p]
        key = _layer_key(key_added, p, len(perts))
        adata.layers[key] = full
        layers.append(key)
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[idx] = True
    adata.obs[f"{key_added}_source"] = mask
    info["layers"] = layers
    adata.uns[key_added] = info
    return None


__all__ = ["predict_perturbation"]
