"""``vcell.tl.predict_perturbation``: counterfactual predictions of control cells into AnnData."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vcell._constants import PERT_COL
from vcell._utils import check_obs_keys, mudata_no_pull, resolve_seed

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

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


def _modalities(mdata: MuData, model: PerturbationModel) -> tuple[AnnData, AnnData | None, np.ndarray | None]:
    """The RNA modality, the protein modality of a protein model (else ``None``) and its rows in RNA order."""
    if "rna" not in mdata.mod:
        msg = f"MuData has no 'rna' modality; modalities: {list(mdata.mod)}"
        raise KeyError(msg)
    rna = mdata.mod["rna"]
    prot_mod = getattr(model, "protein_modality_", None) if getattr(model, "protein_names_", None) else None
    if prot_mod is None:
        return rna, None, None
    if prot_mod not in mdata.mod:
        msg = f"the model predicts proteins of modality {prot_mod!r}, which the MuData lacks; modalities: {list(mdata.mod)}"
        raise KeyError(msg)
    model._check_adata(mdata)  # copies the protein counts into rna.obsm when they are not there yet
    prot = mdata.mod[prot_mod]
    rows = rna.obs_names.get_indexer(prot.obs_names)
    if (rows < 0).any() or len(rows) != rna.n_obs:
        msg = f"cells differ between modalities 'rna' ({rna.n_obs} cells) and {prot_mod!r} ({prot.n_obs} cells)"
        raise ValueError(msg)
    return rna, prot, rows


def _predicted_cells(
    adata: AnnData, idx: np.ndarray, perts: list[str], preds: dict[str, np.ndarray], var: pd.DataFrame, key_added: str
) -> AnnData:
    """AnnData of predicted cells (``return_adata=True``), one block of rows per perturbation."""
    import anndata as ad

    obs_src = adata.obs.iloc[idx]
    obs = pd.concat([obs_src.assign(perturbation=p) for p in perts], axis=0)
    obs["vcell_source_cell"] = np.tile(adata.obs_names[idx].to_numpy(), len(perts))
    obs[PERT_COL] = obs["perturbation"]
    obs.index = [f"{key_added}-{p}-{c}" for p in perts for c in adata.obs_names[idx]]
    for col in ("perturbation", PERT_COL):
        obs[col] = pd.Categorical(obs[col], categories=perts)
    return ad.AnnData(X=np.concatenate([preds[p] for p in perts], axis=0).astype(np.float32), obs=obs, var=var)


def _write_layers(
    adata: AnnData, rows: np.ndarray, perts: list[str], preds: dict[str, np.ndarray], key_added: str
) -> list[str]:
    """Write each prediction into ``adata.layers`` (rows ``rows``, NaN elsewhere); the layer keys."""
    layers = []
    for p in perts:
        full = np.full(adata.shape, np.nan, dtype=np.float32)
        full[rows] = preds[p]
        key = _layer_key(key_added, p, len(perts))
        adata.layers[key] = full
        layers.append(key)
    return layers


def predict_perturbation(
    adata: AnnData | MuData,
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
        Data with the control cells and the genes the model was trained on. Control cells are those with
        ``obs['vcell_perturbation'] == 'control'`` (:func:`vcell.pp.harmonize`) or, on data never harmonised, those
        with the model's control label(s) in the ``perturbation_key`` column it was set up with (canonical labels
        are then computed on the fly, not written into ``adata``); or pass ``controls=``; or a MuData whose ``rna`` modality is such data. With a model that
        registered proteins (``CausalVAE.setup_anndata(mdata, protein_modality=...)``) the proteins are predicted
        too, into the protein modality.
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
    and ``uns[key_added]`` the parameters. For a MuData: a MuData with modality ``rna`` (that AnnData) and,
    for a protein model, the protein modality (same ``obs``, the model's proteins, log1p(counts per 1e4 of the
    protein library)). Otherwise ``None`` and ``adata`` is updated.

    Sets the following fields (``return_adata=False``)
    --------------------------------------------------
    ``adata.layers[key_added]`` (one perturbation) or ``adata.layers[f"{key_added}_{perturbation}"]`` (several)
        float32, adata's shape and gene order: the prediction on the rows of the selected control cells,
        NaN on every other row.
    ``adata.obs[f"{key_added}_source"]``
        bool, which cells hold a prediction.
    ``adata.uns[key_added]``
        ``{"params": ..., "model": ..., "layers": [...], "vcell_version": ...}``: ``model`` is the model's class name
        (``"Baseline"``), ``params["seed"]`` the seed used (``vcell.settings.seed`` when ``seed=None``).

    For a MuData these fields go into ``mdata['rna']``; with a protein model also:

    ``mdata[<protein modality>].layers[key_added]`` (or ``f"{key_added}_{perturbation}"``)
        float32, the protein modality's shape (its cell order): predicted proteins in log1p(counts per 1e4 of
        the cell's protein library) on the rows of the selected control cells, NaN elsewhere.
    ``mdata[<protein modality>].uns[key_added]``
        The same parameters, with that modality's ``layers``; ``mdata['rna'].uns[key_added]['protein_layers']``
        names them too.

    Examples
    --------
    Out of distribution: the model is trained without the IFN-beta-stimulated CD4 T cells, then predicts them from
    the CD4T control cells of ``adata`` (never harmonised: the model's ``perturbation_key`` finds the controls).

    >>> import vcell
    >>> adata = vcell.datasets.kang2018()
    >>> vcell.bench.split(adata, kind="unseen_cell_type", held_out="CD4T", perturbation_key="perturbation")
    >>> train = adata[adata.obs["vcell_split"] != "test"].copy()
    >>> vcell.model.Baseline.setup_anndata(
    ...     train, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
    ... )
    >>> model = vcell.model.Baseline(train, method="additive")
    >>> model.train()
    >>> vcell.tl.predict_perturbation(adata, model, perturbations="IFNb", cell_type="CD4T")
    >>> adata.layers["vcell_pred"].shape
    (1975, 6998)
    >>> int(adata.obs["vcell_pred_source"].sum())  # the CD4T control cells
    278
    """
    from vcell import __version__

    perts = perturbation_list(perturbations, "predict")
    mdata, prot, prot_rows = None, None, None
    if hasattr(adata, "mod"):
        mdata = adata
        adata, prot, prot_rows = _modalities(mdata, model)
    idx = starting_cells(adata, model, controls, cell_type, cell_type_key)
    seed = resolve_seed(seed)  # recorded as used, never a placeholder
    preds = {p: model.predict(adata, perturbation=p, controls=idx, dose=dose, seed=seed) for p in perts}
    prot_preds = {}
    if prot is not None:
        prot_preds = {
            p: model.predict(adata, perturbation=p, controls=idx, dose=dose, seed=seed, modality="prot") for p in perts
        }
    params = {
        "perturbations": perts,
        "n_cells": int(idx.size),
        "cell_type": cell_type if cell_type is not None else "",
        "dose": float(dose),
        "seed": seed,
    }
    info = {"params": params, "model": type(model).__name__, "vcell_version": __version__}

    if return_adata:
        out = _predicted_cells(adata, idx, perts, preds, adata.var.copy(), key_added)
        out.uns[key_added] = info
        if mdata is None:
            return out
        import mudata

        mods = {"rna": out}
        if prot is not None:
            mods[model.protein_modality_] = _predicted_cells(adata, idx, perts, prot_preds, prot.var.copy(), key_added)
            mods[model.protein_modality_].uns[key_added] = dict(info)
        with mudata_no_pull():
            return mudata.MuData(mods)

    info["layers"] = _write_layers(adata, idx, perts, preds, key_added)
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[idx] = True
    adata.obs[f"{key_added}_source"] = mask
    if prot is not None:  # rows of the protein modality holding the starting cells, in its own order
        rows = np.flatnonzero(mask[prot_rows])
        order = np.argsort(idx)  # predictions are in idx order; rows ascend in the protein modality's order
        pos = np.searchsorted(idx[order], prot_rows[rows])
        prot_layers = _write_layers(prot, rows, perts, {p: v[order][pos] for p, v in prot_preds.items()}, key_added)
        info["protein_layers"] = prot_layers
        prot.uns[key_added] = {**info, "layers": prot_layers}
    adata.uns[key_added] = info
    return None


__all__ = ["predict_perturbation"]
