"""``vcell.tl.sample_perturbation``: cells drawn from a generative model, with per-gene predictive intervals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vcell._constants import PERT_COL
from vcell._utils import check_dose, check_number, check_positive_int, mudata_no_pull, resolve_seed
from vcell.pp._space import record_space

from ._predict import perturbation_list, starting_cells

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

    from vcell.model import PerturbationModel


def _add_intervals(out: AnnData, perts: list[str], level: float, key_added: str) -> None:
    """Per-feature mean and predictive interval of each perturbation's sampled cells, into ``varm`` and ``layers``."""
    from vcell.metrics import predictive_interval

    X = np.asarray(out.X, dtype=np.float32)
    out.X = X
    stats = {"mean": {}, "lower": {}, "upper": {}}
    rows = {p: np.flatnonzero(out.obs["perturbation"].to_numpy() == p) for p in perts}
    for p in perts:
        stats["mean"][p] = X[rows[p]].mean(0)
        stats["lower"][p], stats["upper"][p] = predictive_interval(X[rows[p]], level=level)
    for name, cols in stats.items():
        out.varm[f"{key_added}_{name}"] = pd.DataFrame(cols, index=out.var_names)
    for name in ("lower", "upper"):
        layer = np.zeros(out.shape, dtype=np.float32)
        for p in perts:
            layer[rows[p]] = stats[name][p]
        out.layers[f"{key_added}_{name}"] = layer


def sample_perturbation(
    adata: AnnData | MuData,
    model: PerturbationModel,
    *,
    perturbations: str | Sequence[str],
    n_samples: int | None = None,
    controls: Any = None,
    cell_type: str | None = None,
    cell_type_key: str = "cell_type",
    dose: float = 1.0,
    level: float = 0.9,
    key_added: str = "vcell_sample",
    seed: int | None = None,
    space: Any = None,
    **sample_kwargs: Any,
) -> AnnData:
    """Draw cells from a generative model's predicted distribution, with per-gene predictive intervals.

    Each perturbation is sampled by ``model.sample`` (:meth:`vcell.model.ResidualDiffusion.sample`,
    :meth:`vcell.model.CausalVAE.sample`) from the selected control cells; the equal-tailed ``level`` interval of
    each gene over a perturbation's sampled cells (:func:`vcell.metrics.predictive_interval`) is its predictive
    interval: where a new cell of that condition should fall with probability ``level``.

    Parameters
    ----------
    adata
        Data with the starting control cells (``obs['vcell_perturbation'] == 'control'``, or ``controls=``) and the
        model's genes, or a MuData whose ``rna`` modality is such data (and, for a model with proteins, whose
        protein modality holds their proteins). It is not modified (a MuData of a protein model gets
        ``mdata['rna'].obsm['vcell_protein']``, the protein copy the model reads, when absent).
    model
        A trained vcell model that can sample (``model.capabilities.can_sample``; else a ValueError names those that
        can).
    perturbations
        Condition(s) to sample, canonical labels such as ``"IFNb"`` or ``"A+B"``.
    n_samples
        Cells per perturbation; ``None``: one per starting cell.
    controls
        Cells to start from: ``None`` (all control cells), a boolean mask, integer indices or obs names.
    cell_type
        Restrict the starting cells to this value of ``obs[cell_type_key]``.
    cell_type_key
        ``obs`` column read when ``cell_type`` is given.
    dose
        Dose of the perturbation(s).
    level
        Probability mass of the predictive intervals, in ``(0, 1)``.
    key_added
        Prefix of the keys written into the returned AnnData.
    seed
        Random seed (perturbation ``i`` uses ``seed + i``); ``None`` uses ``vcell.settings.seed``.
    space
        Expression space of the sampled RNA (as ``space`` of :func:`vcell.tl.predict_perturbation`): ``None`` (the
        model's :attr:`~vcell.model.PerturbationModel.output_space`), ``"log1p_cp10k"``, ``"median"``, ``"model"``,
        a target sum or a :class:`vcell.pp.ExpressionSpace`. The intervals are computed in it.
    **sample_kwargs
        Further arguments of ``model.sample`` (e.g. ``n_steps`` of ResidualDiffusion).

    Returns
    -------
    A new AnnData of ``n_samples x n_perturbations`` sampled cells and adata's genes. For a model with proteins
    (``setup_anndata(mdata, protein_modality=...)``) whose ``sample`` draws them: a MuData with that AnnData as
    ``rna`` and the sampled proteins (log1p(counts per 1e4 of the protein library), same cells) as the model's
    protein modality, which gets the same ``obs``, ``varm``, ``layers`` and ``uns`` fields over proteins.

    Sets the following fields (of the returned AnnData)
    ---------------------------------------------------
    ``X``
        The sampled cells (float32) in ``space``.
    ``uns["vcell_spaces"]``
        The expression space of ``X`` and of the interval layers (:func:`vcell.pp.expression_space` reads it).
    ``obs['perturbation']``, ``obs['vcell_perturbation']``, ``obs['vcell_dose']``, ``obs['vcell_source_cell']``
        Condition (categorical, in the order of ``perturbations``), dose and starting control cell of each cell.
    ``varm[f"{key_added}_mean"]``, ``varm[f"{key_added}_lower"]``, ``varm[f"{key_added}_upper"]``
        DataFrames genes x perturbations: mean of the sampled cells and the bounds of the predictive interval.
    ``layers[f"{key_added}_lower"]``, ``layers[f"{key_added}_upper"]``
        Per cell, the interval bounds of its condition (float32), to compare cells with their intervals.
    ``uns[key_added]``
        ``{"params": {...}, "model": ..., "vcell_version": ...}``: ``model`` is the model's class name,
        ``params["seed"]`` the seed used (``vcell.settings.seed`` when ``seed=None``) and ``params["n_samples"]`` the
        cells drawn per perturbation.

    Examples
    --------
    Out of distribution: a double perturbation held out by :func:`vcell.bench.split`, sampled from its singles.

    >>> import vcell
    >>> adata = vcell.datasets.simulate(n_cells=300, n_genes=50, n_perturbations=3, n_combos=2, seed=0)
    >>> vcell.bench.split(adata, kind="combo_half", perturbation_key="perturbation", seed=0)
    >>> held = adata.uns["vcell_split"]["held_out"][0]  # a double whose cells are all test cells
    >>> train = adata[adata.obs["vcell_split"] != "test"].copy()
    >>> vcell.model.ResidualDiffusion.setup_anndata(train, perturbation_key="perturbation", control="control")
    >>> model = vcell.model.ResidualDiffusion(train, mean_model="additive", n_components=5, n_hidden=32)
    >>> model.train(max_epochs=2, seed=0, trainer_kwargs={"enable_progress_bar": False})
    >>> sampled = vcell.tl.sample_perturbation(train, model, perturbations=held, n_samples=100, seed=0)
    >>> sampled.varm["vcell_sample_upper"].shape
    (50, 1)
    """
    import anndata as ad

    from vcell import __version__

    model._require_capability("can_sample", "sample cells")
    model._require_trained()
    perts = perturbation_list(perturbations, "sample", model)
    dose = check_dose(dose)
    level = check_number(level, name="level", low=0.0, high=1.0, closed="neither")
    if n_samples is not None:
        n_samples = check_positive_int(n_samples, name="n_samples (at least 2, for the intervals)", minimum=2)
    if hasattr(adata, "mod"):  # a MuData: its rna modality, the model's proteins attached (not otherwise changed)
        adata = model._check_adata(adata)
    idx = starting_cells(adata, model, controls, cell_type, cell_type_key)
    seed = resolve_seed(seed)
    target, _ = model._space_request(space)  # an impossible space is an error before anything is sampled
    parts, proteins = [], []
    for i, p in enumerate(perts):
        s = model.sample(
            adata,
            perturbation=p,
            n_cells=n_samples,
            controls=idx,
            dose=dose,
            seed=seed + i,
            space=target,
            **sample_kwargs,
        )
        s.obs_names = [f"{key_added}-{p}-{j}" for j in range(s.n_obs)]
        if "protein" in s.obsm:
            proteins.append(s.obsm.pop("protein"))
        parts.append(s)
    out = ad.concat(parts, axis=0, merge="same")
    out.var = adata.var.copy()
    for col in ("perturbation", PERT_COL):
        out.obs[col] = pd.Categorical(out.obs[col].astype(str), categories=perts)
    _add_intervals(out, perts, level, key_added)
    prot = None
    if proteins and len(proteins) == len(parts):
        P = np.concatenate([np.asarray(df, dtype=np.float32) for df in proteins])
        prot = ad.AnnData(X=P, obs=out.obs.copy(), var=pd.DataFrame(index=pd.Index(list(proteins[0].columns))))
        _add_intervals(prot, perts, level, key_added)
    params = {
        "perturbations": perts,
        "n_samples": int(parts[0].n_obs),  # as drawn: one per starting cell when n_samples is None
        "n_starting_cells": int(idx.size),
        "cell_type": cell_type if cell_type is not None else "",
        "dose": float(dose),
        "level": float(level),
        "seed": int(seed),
        **{k: v for k, v in sample_kwargs.items() if isinstance(v, int | float | str | bool)},
    }
    out.uns[key_added] = {"params": params, "model": type(model).__name__, "vcell_version": __version__}
    for layer in (None, f"{key_added}_lower", f"{key_added}_upper"):
        record_space(out, layer, target)
    if prot is None:
        return out
    import mudata as md

    prot.uns[key_added] = dict(out.uns[key_added])
    with mudata_no_pull():
        return md.MuData({"rna": out, str(model.protein_modality_): prot})


__all__ = ["sample_perturbation"]
