"""Plots of perturbations: interaction map of doubles, dose-response curves, 2-D map of perturbations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vcell._constants import CONTROL, DOSE_COL, PERT_COL
from vcell._docs import doc_params, doc_show_save
from vcell._utils import check_obs_keys, get_matrix, group_means

from ._utils import BASELINE_COLOR, Plotter

if TYPE_CHECKING:
    from anndata import AnnData

#: colour of the non-additive doubles in :func:`interaction_map`
_NONADDITIVE_COLOR = "tab:red"
_MARKERS = ("o", "D", "s", "^", "v", "P", "X")


def _labels_column(adata: AnnData, key: str) -> np.ndarray:
    check_obs_keys(adata, [key], what="perturbation_key")
    return adata.obs[key].astype(str).to_numpy()


def _condition_means(adata: AnnData, layer: str | None, labels: np.ndarray, wanted: Sequence[str]) -> pd.DataFrame:
    """Mean expression (``layer`` or ``X``) of the cells of each label in ``wanted`` (others left out)."""
    if layer is not None and layer not in adata.layers:
        msg = f"layer {layer!r} is not in adata.layers; available layers: {list(adata.layers.keys())}"
        raise KeyError(msg)
    keep = np.isin(labels, list(wanted))
    X = get_matrix(adata, layer)
    means = group_means(X[keep], labels[keep])
    means.columns = adata.var_names
    return means


def _as_models(pred: pd.DataFrame | Mapping[str, pd.DataFrame] | None, *, what: str) -> dict[str, pd.DataFrame]:
    """``pred`` as ``{model name: table}`` (one table becomes ``{"prediction": table}``)."""
    if pred is None:
        return {}
    if isinstance(pred, pd.DataFrame):
        return {"prediction": pred}
    if isinstance(pred, Mapping) and all(isinstance(v, pd.DataFrame) for v in pred.values()):
        return {str(k): v for k, v in pred.items()}
    msg = f"pred must be a DataFrame ({what}) or a mapping model name -> such DataFrame, got {type(pred).__name__}"
    raise TypeError(msg)


def _aligned(table: pd.DataFrame, rows: Sequence, var_names: pd.Index, *, name: str, what: str) -> np.ndarray:
    """``table`` restricted to ``rows`` (its index) and ``var_names`` (its columns), as float64, with clear errors."""
    missing_cols = var_names.difference(table.columns.astype(str))
    if len(missing_cols):
        msg = f"pred[{name!r}] lacks {len(missing_cols)} gene column(s) of adata (e.g. {list(missing_cols[:5])})"
        raise KeyError(msg)
    missing_rows = [r for r in rows if r not in table.index]
    if missing_rows:
        msg = f"pred[{name!r}] has no row for the {what} {missing_rows[:5]}; its index: {list(table.index[:10])}"
        raise KeyError(msg)
    out = table.set_axis(table.columns.astype(str), axis=1).loc[list(rows), list(var_names)].to_numpy(dtype=float)
    if not np.isfinite(out).all():
        msg = f"pred[{name!r}] holds NaN or inf"
        raise ValueError(msg)
    return out


def _simulation_labels(adata: AnnData) -> dict[str, bool] | None:
    sim = adata.uns.get("vcell_simulation")
    if not isinstance(sim, Mapping) or "combos" not in sim or "epistatic" not in sim:
        return None
    return dict(zip(map(str, sim["combos"]), np.asarray(sim["epistatic"], dtype=bool), strict=True))


@doc_params(doc_show_save=doc_show_save)
def interaction_map(
    adata: AnnData,
    *,
    layer: str | None = None,
    perturbation_key: str = PERT_COL,
    control: str = CONTROL,
    doubles: Sequence[str] | None = None,
    pred: pd.DataFrame | Mapping[str, pd.DataFrame] | None = None,
    labels: Mapping[str, bool] | pd.Series | None = None,
    threshold: float | None = None,
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Observed double perturbations against their additive expectation: which doubles interact, and which a model calls.

    For each double ``A+B`` the additive expectation of its change from control is ``(A - ctrl) + (B - ctrl)`` (group
    means of ``layer``), and its interaction score the L2 norm of ``observed - additive``
    (:func:`vcell.metrics.nonadditivity`). Left panel: every gene of every double, the additive expectation of its
    change (x) against the observed change (y); on the diagonal a double is additive, off it non-additive (red).
    Right panel: the doubles sorted by observed interaction score (bars, red = non-additive) and, for each model in
    ``pred``, its predicted score ``|pred - ctrl - additive|`` (markers): a model that tells interacting doubles
    apart puts its large scores on the red bars; the legend gives its :func:`vcell.metrics.interaction_auprc`.

    Parameters
    ----------
    adata
        Cells with a log expression (``layer`` or ``X``, e.g. log1p(CP10k)) and labels in ``obs[perturbation_key]``
        such as ``'A'``, ``'B'`` and ``'A+B'`` (:func:`vcell.pp.harmonize`).
    layer
        Layer to average; ``None`` uses ``X``.
    perturbation_key
        ``obs`` column of the condition labels.
    control
        Label of the control cells.
    doubles
        Doubles to show; ``None``: every label with two components whose singles have cells too.
    pred
        Predicted mean expression of the doubles in the space of ``layer``: a DataFrame indexed by double, one
        column per gene of ``adata`` (e.g. the mean of :func:`vcell.tl.predict_perturbation`'s cells), or a mapping
        model name -> such DataFrame.
    labels
        Which doubles are truly non-additive (double -> bool). ``None``: the simulation's ground truth
        (``uns['vcell_simulation']`` of :func:`vcell.datasets.simulate`) when present, else an observed score above
        ``threshold``.
    threshold
        Observed score above which a double counts as non-additive when ``labels`` is not known; ``None`` uses the
        median over the doubles shown (:func:`vcell.metrics.interaction_auprc`'s default rule).
    ax
        Two Axes (scatter, scores) to draw into; ``None`` creates a new figure.
    {doc_show_save}

    Returns
    -------
    The figure when ``return_fig`` is true, else ``None``.

    Raises
    ------
    KeyError
        If ``perturbation_key``, ``layer``, a double, one of its singles or the control is missing, or a ``pred``
        table lacks a double or a gene.
    ValueError
        If no double has both singles measured.

    Examples
    --------
    >>> import vcell
    >>> adata = vcell.datasets.simulate(n_cells=600, n_genes=50, n_perturbations=4, n_combos=4, seed=0)
    >>> vcell.pp.harmonize(adata, perturbation_key="perturbation", control="control")
    >>> vcell.pp.log_normalize(adata)
    >>> fig = vcell.pl.interaction_map(adata, layer="log1p_cp10k", return_fig=True)
    >>> [a.get_xlabel() for a in fig.axes]
    ['additive expectation of the change', 'interaction score |observed - additive|']
    """
    from vcell.metrics import interaction_auprc
    from vcell.pp import split_perturbation

    cond = _labels_column(adata, perturbation_key)
    present = set(cond)
    if control not in present:
        msg = f"control label {control!r} not in obs[{perturbation_key!r}]; labels there: {sorted(present)[:10]}"
        raise KeyError(msg)
    if doubles is None:
        doubles = [
            c for c in sorted(present) if len(parts := split_perturbation(c)) == 2 and all(p in present for p in parts)
        ]
        if not doubles:
            msg = f"no double 'A+B' in obs[{perturbation_key!r}] has both singles A and B measured"
            raise ValueError(msg)
    else:
        doubles = [doubles] if isinstance(doubles, str) else list(doubles)
        for d in doubles:
            parts = split_perturbation(d)
            missing = [x for x in [d, *parts] if x not in present]
            if len(parts) != 2 or missing:
                msg = f"double {d!r}: expected 'A+B' with A, B and A+B in obs[{perturbation_key!r}], missing {missing}"
                raise KeyError(msg)
    singles = sorted({p for d in doubles for p in split_perturbation(d)})
    means = _condition_means(adata, layer, cond, [control, *singles, *doubles])
    ctrl = means.loc[control].to_numpy()
    observed = np.stack([means.loc[d].to_numpy() - ctrl for d in doubles])
    additive = np.stack([sum(means.loc[p].to_numpy() - ctrl for p in split_perturbation(d)) for d in doubles])
    score = np.linalg.norm(observed - additive, axis=1)

    truth = labels if labels is not None else _simulation_labels(adata)
    if truth is not None:
        truth = dict(truth)
        unknown = [d for d in doubles if d not in truth]
        if unknown:
            msg = f"labels give no value for the double(s) {unknown[:5]}"
            raise KeyError(msg)
        nonadd = np.array([bool(truth[d]) for d in doubles])
        rule = "true non-additive" if labels is not None else "non-additive (simulation truth)"
    else:
        cut = float(np.median(score)) if threshold is None else float(threshold)
        nonadd = score > cut
        rule = f"score > {cut:.2g}" + (" (median)" if threshold is None else "")

    models = _as_models(pred, what="predicted mean expression per double, genes as columns")
    pred_scores = {}
    # a predicted score within float round-off of 0 is 0: an additive predictor (float32 predictions against float64
    # means) then ties every double and scores the prevalence, instead of an AUPRC of its rounding noise
    tol = 1e-5 * max(float(np.abs(additive).max()), float(np.abs(observed).max()), 1e-12) * np.sqrt(additive.shape[1])
    for name, table in models.items():
        p = _aligned(table, doubles, adata.var_names, name=name, what="double(s)") - ctrl
        s = np.linalg.norm(p - additive, axis=1)
        pred_scores[name] = np.where(s < tol, 0.0, s)

    if ax is None:
        plot = Plotter.grid(2, ncols=2, panel_size=(4.6, max(4.2, 0.11 * len(doubles) + 1.2)))
    else:
        plot = Plotter.grid(2, ncols=2, panel_size=(4.6, 4.6), ax=ax)
    ax_sc, ax_bar = plot.axes

    # left: observed vs additive change, gene by gene
    for flag, color, label, z in ((False, BASELINE_COLOR, "additive", 2), (True, _NONADDITIVE_COLOR, rule, 3)):
        rows = nonadd == flag
        if rows.any():
            ax_sc.scatter(
                additive[rows].ravel(),
                observed[rows].ravel(),
                s=5,
                alpha=0.5,
                color=color,
                edgecolors="none",
                label=f"{label} ({int(rows.sum())} doubles)",
                zorder=z,
            )
    lim = float(np.nanmax(np.abs(np.concatenate([observed.ravel(), additive.ravel()])))) * 1.05 or 1.0
    ax_sc.plot([-lim, lim], [-lim, lim], ls="--", lw=0.8, color="0.3", zorder=1)
    ax_sc.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    ax_sc.set_xlabel("additive expectation of the change")
    ax_sc.set_ylabel("observed change of the double")
    ax_sc.set_title("each point: one gene of one double", fontsize=9)
    ax_sc.legend(fontsize=7, frameon=False, loc="upper left")

    # right: interaction score per double, observed (bars) and predicted (markers)
    order = np.argsort(-score, kind="stable")
    y = np.arange(len(doubles))
    ax_bar.barh(
        y,
        score[order],
        color=[_NONADDITIVE_COLOR if nonadd[i] else BASELINE_COLOR for i in order],
        height=0.7,
        label="observed",
    )
    handles = [
        Line2D([], [], color=_NONADDITIVE_COLOR, lw=6, label=f"observed, {rule}"),
        Line2D([], [], color=BASELINE_COLOR, lw=6, label="observed, additive"),
    ]
    for k, (name, s) in enumerate(pred_scores.items()):
        ax_bar.scatter(s[order], y, marker=_MARKERS[k % len(_MARKERS)], s=22, color=f"C{k}", zorder=3)
        auprc = interaction_auprc(s[:, None], np.zeros((len(s), 1)), labels=nonadd)  # scores = s
        handles.append(
            Line2D(
                [], [], ls="", marker=_MARKERS[k % len(_MARKERS)], color=f"C{k}", label=f"{name} (AUPRC {auprc:.2f})"
            )
        )
    ax_bar.set_yticks(y, labels=[doubles[i] for i in order], fontsize=6 if len(doubles) > 25 else 8)
    ax_bar.invert_yaxis()
    ax_bar.set_xlabel("interaction score |observed - additive|")
    prevalence = f"{int(nonadd.sum())}/{len(doubles)} non-additive"
    ax_bar.set_title(
        prevalence + ("; markers: predicted |pred - additive|" if pred_scores else ""),
        fontsize=9,
    )
    ax_bar.legend(handles=handles, fontsize=7, frameon=True, framealpha=0.85, loc="best")
    ax_bar.spines[["top", "right"]].set_visible(False)
    if ax is None:
        plot.fig.tight_layout()
    return plot.finish(show=show, save=save, return_fig=return_fig)


def _response_score(delta: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Projection of each row of ``delta`` on ``direction``, in units of ``direction`` (0 = control, 1 = it)."""
    return delta @ direction / float(direction @ direction)


@doc_params(doc_show_save=doc_show_save)
def dose_response(
    adata: AnnData,
    perturbation: str,
    *,
    genes: str | Sequence[str] | None = None,
    layer: str | None = None,
    perturbation_key: str = PERT_COL,
    dose_key: str = DOSE_COL,
    control: str = CONTROL,
    pred: pd.DataFrame | Mapping[str, pd.DataFrame] | None = None,
    n_top: int = 20,
    ncols: int = 4,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Response to one perturbation against its dose (log axis): observed means per dose and predicted curves.

    With ``genes``, one panel per gene: its mean expression per dose (points, ± s.e.m. over the cells) and the
    control mean (dashed). Without, one panel of a **response score**: the change from the control mean projected
    on the observed change at the highest dose over the ``n_top`` genes that change most there, in units of that
    change (0 = no response, 1 = the response at the highest dose). Predicted means per dose (``pred``) are drawn
    as lines, one per model, in the same units.

    Parameters
    ----------
    adata
        Cells with a log expression (``layer`` or ``X``), condition labels in ``obs[perturbation_key]`` and doses in
        ``obs[dose_key]`` (:func:`vcell.pp.harmonize` writes ``vcell_dose``).
    perturbation
        The perturbation (e.g. a compound) whose cells are shown.
    genes
        Gene(s) to show (``var_names``); ``None`` shows the response score.
    layer
        Layer to average; ``None`` uses ``X``.
    perturbation_key
        ``obs`` column of the condition labels.
    dose_key
        ``obs`` column of the doses (numbers above 0).
    control
        Label of the control cells (the reference at dose 0, drawn as a dashed line).
    pred
        Predicted mean expression per dose in the space of ``layer``: a DataFrame indexed by dose, one column per
        gene of ``adata`` (e.g. the means of :func:`vcell.tl.predict_perturbation` at each ``dose=``), or a mapping
        model name -> such DataFrame. Its doses need not be the observed ones (a finer grid draws a smoother curve).
    n_top
        Number of genes that define the response score.
    ncols
        Panels per row (with ``genes``).
    ax
        Axes to draw into: one per gene (one for the score); ``None`` creates a new figure.
    {doc_show_save}

    Returns
    -------
    The figure when ``return_fig`` is true, else ``None``.

    Raises
    ------
    KeyError
        If a key, the perturbation, the control or a gene is missing, or a ``pred`` table lacks a gene.
    ValueError
        If the perturbation's doses are not all above 0.

    Examples
    --------
    >>> import vcell
    >>> adata = vcell.datasets.simulate(
    ...     n_cells=800, n_genes=50, n_perturbations=2, n_combos=0, doses=[0.1, 1, 10], seed=0
    ... )
    >>> vcell.pp.harmonize(adata, perturbation_key="perturbation", control="control", dose_key="dose")
    >>> vcell.pp.log_normalize(adata)
    >>> pert = [p for p in adata.obs["vcell_perturbation"].unique() if p != "control"][0]
    >>> fig = vcell.pl.dose_response(adata, pert, layer="log1p_cp10k", return_fig=True)
    >>> fig.axes[0].get_xscale()
    'log'
    """
    cond = _labels_column(adata, perturbation_key)
    check_obs_keys(adata, [dose_key], what="dose_key")
    for label, what in ((perturbation, "perturbation"), (control, "control")):
        if label not in set(cond):
            msg = f"{what} {label!r} not in obs[{perturbation_key!r}]; labels there: {sorted(set(cond))[:10]}"
            raise KeyError(msg)
    is_p = cond == perturbation
    dose = pd.to_numeric(adata.obs[dose_key], errors="coerce").to_numpy(dtype=float)
    if not (np.isfinite(dose[is_p]) & (dose[is_p] > 0)).all():
        msg = f"obs[{dose_key!r}] of the {perturbation!r} cells must be numbers above 0 (log dose axis)"
        raise ValueError(msg)
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else list(genes)
        missing = [g for g in genes if g not in adata.var_names]
        if missing:
            msg = f"genes {missing} not in adata.var_names"
            raise KeyError(msg)
    if layer is not None and layer not in adata.layers:
        msg = f"layer {layer!r} is not in adata.layers; available layers: {list(adata.layers.keys())}"
        raise KeyError(msg)

    X = get_matrix(adata, layer)
    ctrl = np.asarray(X[cond == control].mean(0), dtype=float).ravel()
    doses = np.unique(dose[is_p])
    rows = np.flatnonzero(is_p)
    Xp = X[rows]
    Xp = np.asarray(Xp.toarray() if hasattr(Xp, "toarray") else Xp, dtype=float)  # one perturbation's cells
    cell_dose = dose[rows]
    top = doses.max()
    direction = np.zeros_like(ctrl)
    if genes is None:
        delta_top = Xp[cell_dose == top].mean(0) - ctrl
        de = np.argsort(-np.abs(delta_top), kind="stable")[:n_top]
        direction[de] = delta_top[de]
        values = _response_score(Xp - ctrl, direction)[:, None]
        panels = [f"response score ({n_top} top genes)"]
        baseline = np.zeros(1)
    else:
        idx = adata.var_names.get_indexer(genes)
        values = Xp[:, idx]
        panels = genes
        baseline = ctrl[idx]

    models = _as_models(pred, what="predicted mean expression per dose, genes as columns")
    curves = {}
    for name, table in models.items():
        grid = np.sort(pd.to_numeric(pd.Index(table.index), errors="coerce").to_numpy(dtype=float))
        arr = _aligned(
            table.set_axis(pd.to_numeric(table.index), axis=0), grid, adata.var_names, name=name, what="dose"
        )
        curves[name] = (grid, _response_score(arr - ctrl, direction)[:, None] if genes is None else arr[:, idx])

    plot = Plotter.grid(len(panels), ncols=ncols, panel_size=(3.4, 3.0), ax=ax)
    for j, (ax_j, title) in enumerate(zip(plot.axes, panels, strict=True)):
        mean = np.array([values[cell_dose == d, j].mean() for d in doses])
        n = np.array([(cell_dose == d).sum() for d in doses])
        sem = np.array([values[cell_dose == d, j].std(ddof=1) if k > 1 else 0.0 for d, k in zip(doses, n, strict=True)])
        ax_j.errorbar(doses, mean, yerr=sem / np.sqrt(n), fmt="o", color="black", ms=4, capsize=2, label="observed")
        ax_j.axhline(baseline[j], ls="--", lw=0.9, color=BASELINE_COLOR, label="control")
        for k, (name, (grid, curve)) in enumerate(curves.items()):
            ax_j.plot(grid, curve[:, j], color=f"C{k}", lw=1.5, label=name)
        ax_j.set_xscale("log")
        ax_j.set_xlabel(f"dose ({dose_key})")
        ax_j.set_ylabel("response (0 = control, 1 = top dose)" if genes is None else "mean expression")
        ax_j.set_title(title, fontsize=10)
        ax_j.spines[["top", "right"]].set_visible(False)
    plot.axes[0].legend(fontsize=7, frameon=False)
    if ax is None:
        plot.fig.suptitle(f"{perturbation}: mean ± s.e.m. per dose", fontsize=10)
        plot.fig.tight_layout()
    return plot.finish(show=show, save=save, return_fig=return_fig)


@doc_params(doc_show_save=doc_show_save)
def perturbation_embedding(
    data: pd.DataFrame | AnnData,
    *,
    layer: str | None = None,
    perturbation_key: str = PERT_COL,
    control: str = CONTROL,
    method: Literal["pca", "umap"] = "pca",
    color: pd.Series | Mapping[str, object] | None = None,
    labels: bool | Sequence[str] = True,
    seed: int | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Map of perturbations in 2-D: one point per perturbation, from a learned embedding or from mean responses.

    Perturbations close on the map have similar representations: the model's (a learned perturbation embedding,
    e.g. :meth:`vcell.model.CausalVAE.get_perturbation_embedding`) or the data's (with an AnnData, each
    perturbation's mean change from the control mean). The table is reduced to 2 dimensions by PCA (scikit-learn)
    or UMAP (scanpy, on a neighbour graph of the perturbations).

    Parameters
    ----------
    data
        A DataFrame of perturbations (rows) x features, or an AnnData whose perturbations' mean responses are
        mapped.
    layer
        With an AnnData: layer to average (log expression); ``None`` uses ``X``.
    perturbation_key
        With an AnnData: ``obs`` column of the condition labels.
    control
        With an AnnData: label of the control cells (the reference, left out of the map).
    method
        ``"pca"`` or ``"umap"``.
    color
        Value per perturbation (e.g. a compound's pathway, or a number): categories get a colour and a legend,
        numbers a colour bar. ``None`` draws every point alike.
    labels
        Write perturbation names beside the points: ``True`` (all), ``False`` (none) or the names to write.
    seed
        Seed of UMAP (PCA is deterministic); ``None`` uses ``vcell.settings.seed``.
    ax
        Axes to draw into; ``None`` creates a new figure.
    {doc_show_save}

    Returns
    -------
    The figure when ``return_fig`` is true, else ``None``.

    Raises
    ------
    KeyError
        If a key or the control is missing, or ``color`` lacks a perturbation.
    ValueError
        If fewer than 3 perturbations are given, or ``method`` is unknown.

    Examples
    --------
    >>> import pandas as pd
    >>> import vcell
    >>> emb = pd.DataFrame([[0, 1, 0], [0, 1.1, 0], [3, 0, 1], [3, 0.1, 1.2]], index=["A", "B", "C", "D"])
    >>> fig = vcell.pl.perturbation_embedding(emb, return_fig=True)
    >>> len(fig.axes[0].collections[0].get_offsets())
    4
    """
    if method not in ("pca", "umap"):
        msg = f"method must be 'pca' or 'umap', got {method!r}"
        raise ValueError(msg)
    if isinstance(data, pd.DataFrame):
        table = data.apply(pd.to_numeric, errors="coerce")
        if not np.isfinite(table.to_numpy(dtype=float)).all():
            msg = "the embedding table holds NaN, inf or values that are not numbers"
            raise ValueError(msg)
        source = "embedding"
    else:
        cond = _labels_column(data, perturbation_key)
        if control not in set(cond):
            msg = f"control label {control!r} not in obs[{perturbation_key!r}]; labels there: {sorted(set(cond))[:10]}"
            raise KeyError(msg)
        means = _condition_means(data, layer, cond, sorted(set(cond)))
        table = means.drop(index=control) - means.loc[control]
        source = "mean change from control"
    table.index = table.index.astype(str)
    if len(table) < 3:
        msg = f"a map needs at least 3 perturbations, got {len(table)}"
        raise ValueError(msg)
    values = table.to_numpy(dtype=float)

    if method == "pca":
        from sklearn.decomposition import PCA

        if values.shape[1] <= 2:
            coords = np.column_stack([values, np.zeros((len(values), 2 - values.shape[1]))])
            axis_labels = [f"{source} {c}" for c in [*map(str, table.columns), ""][:2]]
        else:
            pca = PCA(n_components=2).fit(values)
            coords = pca.transform(values)
            axis_labels = [f"PC{i + 1} ({100 * r:.0f}%)" for i, r in enumerate(pca.explained_variance_ratio_)]
    else:
        import anndata as ad
        import scanpy as sc

        from vcell._utils import resolve_seed

        seed = resolve_seed(seed)
        tmp = ad.AnnData(values.astype(np.float32))
        sc.pp.neighbors(tmp, n_neighbors=max(2, min(15, len(values) - 1)), use_rep="X", random_state=seed)
        sc.tl.umap(tmp, random_state=seed)
        coords = tmp.obsm["X_umap"]
        axis_labels = ["UMAP1", "UMAP2"]

    plot = Plotter(ax=ax, figsize=(5.5, 4.8))
    ax_ = plot.ax
    if color is None:
        ax_.scatter(coords[:, 0], coords[:, 1], s=30, color="C0", edgecolors="white", linewidths=0.5)
    else:
        col = pd.Series(color) if not isinstance(color, pd.Series) else color
        col.index = col.index.astype(str)
        missing = table.index.difference(col.index)
        if len(missing):
            msg = f"color has no value for the perturbation(s) {list(missing[:5])}"
            raise KeyError(msg)
        col = col.loc[table.index]
        if pd.api.types.is_numeric_dtype(col):
            sc_ = ax_.scatter(coords[:, 0], coords[:, 1], c=col.to_numpy(dtype=float), s=30, cmap="viridis")
            plot.fig.colorbar(sc_, ax=ax_, label=col.name)
        else:
            cats = list(pd.unique(col.astype(str)))
            cmap = "tab10" if len(cats) <= 10 else "tab20"
            import matplotlib.pyplot as plt

            for i, cat in enumerate(cats):
                rows = (col.astype(str) == cat).to_numpy()
                ax_.scatter(
                    coords[rows, 0], coords[rows, 1], s=30, color=plt.get_cmap(cmap)(i % 20), label=cat, zorder=2
                )
            ax_.legend(fontsize=7, frameon=False, title=col.name, title_fontsize=7, loc="best")
    shown = list(table.index) if labels is True else [] if labels is False else [str(x) for x in labels]
    unknown = [s for s in shown if s not in table.index]
    if unknown:
        msg = f"labels names perturbation(s) not on the map: {unknown[:5]}"
        raise KeyError(msg)
    pos = {name: i for i, name in enumerate(table.index)}
    for name in shown:
        ax_.annotate(name, coords[pos[name]], xytext=(3, 3), textcoords="offset points", fontsize=7)
    ax_.set_xlabel(axis_labels[0])
    ax_.set_ylabel(axis_labels[1])
    ax_.set_title(f"{len(table)} perturbations, {method.upper()} of the {source}", fontsize=10)
    ax_.spines[["top", "right"]].set_visible(False)
    return plot.finish(show=show, save=save, return_fig=return_fig)
