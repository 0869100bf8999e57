"""``vcell.tl.predict_perturbation``: counterfactual predictions of control cells into AnnData."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vcell._constants import PERT_COL
from vcell._settings import logger
from vcell._utils import (
    check_dose,
    check_obs_keys,
    check_unique_obs_names,
    check_writable,
    mudata_no_pull,
    resolve_seed,
)
from vcell.pp._space import record_space, rescale_log1p

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

    from vcell.model import PerturbationModel


def _layer_key(key_added: str, perturbation: str, n: int) -> str:
    return key_added if n == 1 else f"{key_added}_{perturbation}"


def perturbation_list(
    perturbations: str | Sequence[str], verb: str, model: PerturbationModel | None = None
) -> list[str]:
    """``perturbations`` as a non-empty list without duplicates (``verb``: what is done with them, for the error).

    With ``model``: in canonical form (``model._query``: ``"B+A"`` is ``"A+B"``, a label :func:`vcell.pp.harmonize`
    rejects is a ValueError), so that two spellings of one condition are duplicates too.
    """
    raw = [perturbations] if isinstance(perturbations, str) else [str(p) for p in perturbations]
    if not raw:
        msg = f"perturbations is empty: name at least one condition to {verb}"
        raise ValueError(msg)
    perts = raw if model is None else model._query(raw, what="perturbations")
    if len(set(perts)) != len(perts):
        seen: dict[str, list[str]] = {}
        for r, p in zip(raw, perts, strict=True):
            seen.setdefault(p, []).append(r)
        dup = {p: r for p, r in seen.items() if len(r) > 1}
        msg = f"perturbations contains duplicates (canonical label: spellings given): {dup}"
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


def _obs_of_predictions(adata: AnnData, idx: np.ndarray, perts: list[str], key_added: str) -> pd.DataFrame:
    """``obs`` of the predicted cells (``return_adata=True``): one block of rows per perturbation."""
    obs_src = adata.obs.iloc[idx]
    obs = pd.concat([obs_src.assign(perturbation=p) for p in perts], axis=0)
    obs["vcell_source_cell"] = np.tile(adata.obs_names[idx].to_numpy(), len(perts))
    obs[PERT_COL] = obs["perturbation"]
    obs.index = [f"{key_added}-{p}-{c}" for p in perts for c in adata.obs_names[idx]]
    for col in ("perturbation", PERT_COL):
        obs[col] = pd.Categorical(obs[col], categories=perts)
    return obs


class _Rows:
    """Predictions of ``return_adata=True``: one float32 matrix per modality, allocated once, filled block by block.

    RNA is converted into the space asked for (``factor``, :func:`vcell.pp._space.rescale_log1p`) in place.
    """

    def __init__(self, n_cells: int, n_perts: int, widths: dict[str, int], factor: float | None = None) -> None:
        self.n = n_cells
        self.factor = factor
        self.X = {mod: np.empty((n_cells * n_perts, width), dtype=np.float32) for mod, width in widths.items()}

    def add(self, k: int, p: str, preds: dict[str, np.ndarray]) -> None:
        for mod, X in self.X.items():
            part = X[k * self.n : (k + 1) * self.n]
            part[:] = preds[mod]
            if mod == "rna":
                rescale_log1p(part, self.factor, out=part)


class _Layers:
    """Predictions of ``return_adata=False``: one layer per perturbation (and modality), adata-shaped, NaN rows.

    Each block goes straight into its layer; the layers are kept here and written into the AnnData(s) only by
    :meth:`write`, after every perturbation was predicted (an error leaves the data unchanged).
    """

    def __init__(
        self,
        targets: dict[str, tuple[tuple[int, int], np.ndarray, np.ndarray | None]],
        n_perts: int,
        factor: float | None = None,
    ):
        self.targets = targets  # modality -> (layer shape, rows, order of the predictions' rows or None)
        self.n_perts = n_perts
        self.factor = factor  # RNA: into the space asked for (rescale_log1p)
        self.layers: dict[str, dict[str, np.ndarray]] = {mod: {} for mod in targets}

    def add(self, k: int, p: str, preds: dict[str, np.ndarray], key_added: str) -> None:
        for mod, (shape, rows, order) in self.targets.items():
            full = np.full(shape, np.nan, dtype=np.float32)
            pred = rescale_log1p(preds[mod], self.factor) if mod == "rna" else preds[mod]
            full[rows] = pred if order is None else pred[order]
            self.layers[mod][_layer_key(key_added, p, self.n_perts)] = full


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
    predict_kwargs: dict[str, Any] | None = None,
    space: Any = None,
    overwrite: bool = False,
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
        Condition(s) to predict, labels such as ``"IFNb"`` or ``"A+B"``, read as :func:`vcell.pp.harmonize` reads
        them (``"B+A"`` is ``"A+B"``; outputs are named by the canonical label).
    controls
        Cells to start from: ``None`` (all control cells), a boolean mask, integer indices or obs names.
    cell_type
        Restrict the starting cells to this value of ``obs[cell_type_key]``.
    cell_type_key
        ``obs`` column read when ``cell_type`` is given.
    dose
        Dose of the perturbation(s): a finite number above 0.
    key_added
        Layer/uns key (and obs-name prefix) of the output.
    return_adata
        Return a new AnnData of predicted cells instead of writing layers into ``adata``.
    seed
        Random seed for stochastic models (defaults to ``vcell.settings.seed``).
    predict_kwargs
        Further options of the model's ``predict``, e.g. ``{"n_steps": 10, "solver": "euler"}`` for
        :class:`~vcell.model.FlowMatching` or ``{"mode": "decoded"}`` for :class:`~vcell.model.CausalVAE`; a
        ValueError names an unknown key and the accepted ones.
    space
        Expression space of the predicted RNA (:meth:`vcell.model.PerturbationModel.predict`'s ``space``):
        ``None`` (the model's :attr:`~vcell.model.PerturbationModel.output_space`: for a model set up with
        ``layer="counts"`` beside ``normalize_total`` + ``log1p`` data in ``X``, the space of ``X``, so that
        the predictions compare with it), ``"log1p_cp10k"``, ``"median"``, ``"model"``, a target sum or a
        :class:`vcell.pp.ExpressionSpace`. Recorded with the output (``uns["vcell_spaces"]``). Proteins are
        always log1p(counts per 1e4 of the protein library).
    overwrite
        Replace fields of ``adata`` (below) that exist already; without it an existing one is a ValueError naming it
        (before anything is predicted). The layer the model reads (its registered ``layer``) is never replaced.

    Returns
    -------
    With ``return_adata=True``: a new AnnData (n_selected_cells x n_perturbations rows, adata's genes) whose
    ``X`` holds the predictions in ``space`` (recorded in ``uns["vcell_spaces"]["X"]``), ``obs['perturbation']`` the predicted condition,
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
        ``{"params": ..., "model": ..., "layers": [...], "space": ..., "vcell_version": ...}``: ``model`` is the
        model's class name (``"Baseline"``), ``params["seed"]`` the seed used (``vcell.settings.seed`` when
        ``seed=None``), ``space`` the predictions' expression space (:meth:`vcell.pp.ExpressionSpace.to_dict`).
    ``adata.uns["vcell_spaces"][layer]``
        The expression space of each layer written (:func:`vcell.pp.expression_space` reads it; the other entries
        of this mapping are kept).

    Each of these fields that exists already is replaced only with ``overwrite=True``.

    For a MuData these fields go into ``mdata['rna']``; with a protein model also:

    ``mdata[<protein modality>].layers[key_added]`` (or ``f"{key_added}_{perturbation}"``)
        float32, the protein modality's shape (its cell order): predicted proteins in log1p(counts per 1e4 of
        the cell's protein library) on the rows of the selected control cells, NaN elsewhere.
    ``mdata[<protein modality>].uns[key_added]``
        The same parameters, with that modality's ``layers``; ``mdata['rna'].uns[key_added]['protein_layers']``
        names them too.

    Notes
    -----
    Layout and memory. All perturbations are predicted in one pass of the model (``model.predict_many``): the
    starting cells are read and encoded once, then each perturbation's prediction (``n_selected_cells x n_genes``)
    is computed and copied straight into the output before the next one, so the extra memory at any time is one
    perturbation's prediction plus the model's working memory for its batch of cells, not the whole output again.

    * ``return_adata=False``: one layer per perturbation, the user-visible contract above (adata's shape, NaN outside
      the starting cells): ``n_perturbations x n_obs x n_genes x 4`` bytes in all. Each layer is allocated once and
      filled from the prediction; the layers are put into ``adata`` when every perturbation is predicted (an error
      leaves ``adata`` unchanged).
    * ``return_adata=True``: only the predicted rows, ``n_perturbations x n_selected_cells x n_genes x 4`` bytes:
      ``X`` is allocated once and filled block by block (no concatenation, no copy). Prefer it for many
      perturbations, or for a few starting cells in a large AnnData, where the layers are mostly NaN.

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
    import anndata as ad

    from vcell import __version__

    perts = perturbation_list(perturbations, "predict", model)
    dose = check_dose(dose)
    if not isinstance(key_added, str) or not key_added:
        msg = f"key_added must be a non-empty string, got {key_added!r}"
        raise ValueError(msg)
    mdata, prot, prot_rows = None, None, None
    if hasattr(adata, "mod"):
        mdata = adata
        adata, prot, prot_rows = _modalities(mdata, model)
    idx = starting_cells(adata, model, controls, cell_type, cell_type_key)
    if return_adata:  # the predicted cells are named after their starting cells
        check_unique_obs_names(
            adata, adata.obs_names[idx], what="naming the predicted cells after their starting cells"
        )
    else:
        layer_keys = [_layer_key(key_added, p, len(perts)) for p in perts]
        what = "predict_perturbation"
        check_writable(
            adata,
            layers=layer_keys,
            obs=[f"{key_added}_source"],
            uns=[key_added],
            overwrite=overwrite,
            protected_layers=[model._layer()],
            what=what,
        )
        if prot is not None:
            from vcell.model._protein import registered_protein

            prot_layer = registered_protein(model.registry_).get("layer")
            check_writable(
                prot, layers=layer_keys, uns=[key_added], overwrite=overwrite, protected_layers=[prot_layer], what=what
            )
    seed = resolve_seed(seed)  # recorded as used, never a placeholder
    kwargs = model._check_predict_kwargs(predict_kwargs)
    modalities = ("rna",) if prot is None else ("rna", "prot")
    target, factor = model._space_request(space, modalities)  # converted below, into the output's own arrays
    # checks every perturbation and option now; predictions come one perturbation at a time, as they are consumed
    stream = model._predict_many(adata, perts, controls=idx, dose=dose, seed=seed, modalities=modalities, **kwargs)
    params = {
        "perturbations": perts,
        "n_cells": int(idx.size),
        "cell_type": cell_type if cell_type is not None else "",
        "dose": float(dose),
        "seed": seed,
    }
    if kwargs:  # None values (a model's own default) are left out: h5ad cannot store them
        params["predict_kwargs"] = {k: v for k, v in kwargs.items() if v is not None}
    info = {"params": params, "model": type(model).__name__, "space": target.to_dict(), "vcell_version": __version__}

    if return_adata:
        widths = {"rna": adata.n_vars, **({"prot": prot.n_vars} if prot is not None else {})}
        rows = _Rows(idx.size, len(perts), widths, factor)
        for k, (p, preds) in enumerate(stream):
            rows.add(k, p, preds)
            del preds
        obs = _obs_of_predictions(adata, idx, perts, key_added)
        out = ad.AnnData(X=rows.X["rna"], obs=obs, var=adata.var.copy())
        out.uns[key_added] = info
        record_space(out, None, target)
        if mdata is None:
            return out
        import mudata

        mods = {"rna": out}
        if prot is not None:
            mods[model.protein_modality_] = ad.AnnData(X=rows.X["prot"], obs=obs.copy(), var=prot.var.copy())
            mods[model.protein_modality_].uns[key_added] = {k: v for k, v in info.items() if k != "space"}
        with mudata_no_pull():
            return mudata.MuData(mods)

    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[idx] = True
    targets = {"rna": (adata.shape, idx, None)}
    if prot is not None:  # rows of the protein modality holding the starting cells, in its own order
        prot_sel = np.flatnonzero(mask[prot_rows])
        order = np.argsort(idx)  # predictions are in idx order; rows ascend in the protein modality's order
        pos = np.searchsorted(idx[order], prot_rows[prot_sel])
        targets["prot"] = (prot.shape, prot_sel, order[pos])
    _note_layer_size(adata, idx.size, len(perts))
    layers = _Layers(targets, len(perts), factor)
    for k, (p, preds) in enumerate(stream):
        layers.add(k, p, preds, key_added)
        del preds
    adata.layers.update(layers.layers["rna"])
    for layer in layers.layers["rna"]:
        record_space(adata, layer, target)
    info["layers"] = list(layers.layers["rna"])
    adata.obs[f"{key_added}_source"] = mask
    if prot is not None:
        prot.layers.update(layers.layers["prot"])
        info["protein_layers"] = list(layers.layers["prot"])
        prot.uns[key_added] = {**{k: v for k, v in info.items() if k != "space"}, "layers": info["protein_layers"]}
    adata.uns[key_added] = info
    return None


def _note_layer_size(adata: AnnData, n_cells: int, n_perts: int) -> None:
    """Log when the layers (adata-shaped, one per perturbation) are much larger than ``return_adata=True``'s rows."""
    layers = 4 * adata.n_obs * adata.n_vars * n_perts
    if n_perts > 1 and layers >= 2**30 and adata.n_obs >= 4 * n_cells:
        logger.info(
            "predict_perturbation writes %d layers of %d x %d float32 (%.1f GiB, NaN outside the %d starting cells); "
            "return_adata=True holds only the predicted rows (%.1f GiB)",
            n_perts,
            adata.n_obs,
            adata.n_vars,
            layers / 2**30,
            n_cells,
            4 * n_cells * adata.n_vars * n_perts / 2**30,
        )


__all__ = ["predict_perturbation"]
