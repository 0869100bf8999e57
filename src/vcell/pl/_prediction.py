"""Plots of one prediction against the truth: per-gene delta scatter and delta heatmaps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vcell._constants import CONTROL, PERT_COL
from vcell._docs import doc_ax_show_save, doc_params
from vcell._utils import check_obs_keys, expression_for_eval, to_dense
from vcell.pp._space import CP10K, ExpressionSpace, check_same_space, expression_space, prediction_space

from ._utils import Plotter

if TYPE_CHECKING:
    from anndata import AnnData


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of two vectors; NaN when either is constant (no warning)."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denom) if denom > 0 else float("nan")


def _gene_index(var_names: pd.Index, genes: Sequence[str] | None) -> np.ndarray:
    if genes is None:
        return np.arange(len(var_names))
    genes = [genes] if isinstance(genes, str) else list(genes)
    missing = [g for g in genes if g not in var_names]
    if missing:
        msg = f"genes {missing[:10]} are not in adata.var_names"
        raise KeyError(msg)
    return var_names.get_indexer(genes)


def _prediction_deltas(
    adata: AnnData,
    *,
    perturbation: str,
    pred_layer: str,
    perturbation_key: str,
    control: str,
    layer: str | None,
    groupby: str | None,
    group: str | None,
) -> pd.DataFrame:
    """Per-gene true and predicted deltas (vs the control mean) as a DataFrame with columns ``true``, ``pred``."""
    check_obs_keys(adata, [perturbation_key], what="perturbation_key")
    if pred_layer not in adata.layers:
        msg = f"pred_layer {pred_layer!r} is not in adata.layers; available layers: {list(adata.layers.keys())}"
        raise KeyError(msg)
    if (groupby is None) != (group is None):
        msg = "pass both groupby and group (to restrict the plot to one group of cells) or neither"
        raise ValueError(msg)
    keep = np.ones(adata.n_obs, dtype=bool)
    if groupby is not None:
        check_obs_keys(adata, [groupby], what="groupby")
        keep = (adata.obs[groupby] == group).to_numpy()
        if not keep.any():
            msg = f"group {group!r} is not a value of adata.obs[{groupby!r}]"
            raise KeyError(msg)
    labels = adata.obs[perturbation_key].astype(str).to_numpy()
    where = f" within adata.obs[{groupby!r}] == {group!r}" if groupby is not None else ""
    masks = {}
    for name, label in (("perturbation", perturbation), ("control", control)):
        mask = (labels == str(label)) & keep
        if not mask.any():
            msg = f"{name} {label!r} labels no cells in adata.obs[{perturbation_key!r}]{where}"
            raise KeyError(msg)
        masks[name] = mask

    pred_space, truth_space, counts = _spaces(adata, pred_layer, layer, where="the prediction plot")
    pred = to_dense(adata.layers[pred_layer])
    has_pred = ~np.all(np.isnan(pred), axis=1) & keep
    if not has_pred.any():
        msg = f"adata.layers[{pred_layer!r}] holds no prediction (every row is NaN){where}"
        raise ValueError(msg)
    pred_mean = pred[has_pred].mean(axis=0)
    if np.isnan(pred_mean).any():
        msg = f"adata.layers[{pred_layer!r}] has rows that are partly NaN; expected whole-NaN rows for cells without a prediction"
        raise ValueError(msg)

    use = masks["perturbation"] | masks["control"]
    expr = expression_for_eval(adata[use], layer, counts=counts, target_sum=truth_space.target_sum or CP10K)
    sub_labels = labels[use]
    true_mean = expr[sub_labels == str(perturbation)].mean(axis=0)
    ctrl_mean = expr[sub_labels == str(control)].mean(axis=0)
    out = pd.DataFrame(
        {"true": true_mean - ctrl_mean, "pred": pred_mean - ctrl_mean},
        index=pd.Index(adata.var_names, name="gene"),
    )
    out.attrs["space"] = truth_space.label
    out.attrs["pred_space"] = pred_space
    return out


def _spaces(
    adata: AnnData, pred_layer: str, layer: str | None, *, where: str
) -> tuple[ExpressionSpace, ExpressionSpace, bool]:
    """Spaces of the predictions and of the truth they are compared in, and whether ``layer`` holds counts.

    Counts are normalised into the predictions' space (log1p of their target sum; 1e4 when it is unknown); log data
    are compared as they are, after a check that the two spaces do not provably differ
    (:func:`vcell.pp._space.check_same_space`: a ValueError naming both).
    """
    pred_space = prediction_space(adata, pred_layer)
    data_space = expression_space(adata, layer)
    counts = data_space.kind == "counts"
    truth_space = data_space
    if counts:
        truth_space = pred_space if pred_space.known_log1p else ExpressionSpace.log1p_cp10k()
    data = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    what_b = f"the data {data}" + (" (counts, normalised)" if counts else "")
    check_same_space(
        pred_space, truth_space, what_a=f"the predictions adata.layers[{pred_layer!r}]", what_b=what_b, where=where
    )
    return pred_space, truth_space, counts


@doc_params(doc_ax_show_save=doc_ax_show_save)
def prediction_scatter(
    adata: AnnData,
    *,
    perturbation: str,
    pred_layer: str = "vcell_pred",
    perturbation_key: str = PERT_COL,
    control: str = CONTROL,
    layer: str | None = None,
    groupby: str | None = None,
    group: str | None = None,
    genes: Sequence[str] | None = None,
    n_label: int = 10,
    title: str | None = None,
    figsize: tuple[float, float] = (4.5, 4.5),
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Scatter of true vs predicted per-gene change (delta vs the control mean), with Pearson r.

    x: mean of the true ``perturbation`` cells minus mean of the ``control`` cells, in the predictions' expression
    space: log data (``X`` or ``layer``) as they are, counts normalised to the predictions' target sum and
    ``log1p``-transformed (1e4 when that is unknown).
    y: mean of ``adata.layers[pred_layer]`` over the cells that hold a prediction (rows that are not all NaN)
    minus the same control mean. The dashed line is the diagonal (a perfect prediction); the title gives Pearson r
    over the plotted genes (after ``title``, when given); the ``n_label`` genes with the largest absolute true delta
    are labelled; the x label names the space.

    Both sides must be in one expression space (:func:`vcell.pp.expression_space`: the space
    :func:`vcell.tl.predict_perturbation` records for its layers, else inferred from the values, the target sum
    of an unrecorded prediction layer left unknown): predictions in
    log1p(CP10k) against ``normalize_total`` (median) + ``log1p`` data, or log data against counts in the
    prediction layer, are a ValueError naming both spaces. Predict in the data's space (the default of
    :func:`vcell.tl.predict_perturbation`) or pass ``layer=`` naming the counts. A space of unknown target sum
    (genes subset after normalisation) is compared with any: declare it with :func:`vcell.pp.set_expression_space`
    to have it checked.

    Parameters
    ----------
    adata
        Data with true perturbed cells, control cells and a prediction layer.
    perturbation
        Label of the true perturbed cells in ``adata.obs[perturbation_key]``.
    pred_layer
        Layer with predictions (NaN rows for cells without a prediction), e.g. written by
        ``vcell.tl.predict_perturbation``.
    perturbation_key
        Column of ``adata.obs`` with the perturbation labels.
    control
        Label of the control cells.
    layer
        Layer with the observed expression (counts, or log data in the predictions' space); ``None`` reads ``X``.
    groupby
        Optional column of ``adata.obs`` (e.g. cell type) to restrict every set of cells to one group;
        use with ``group``.
    group
        Value of ``adata.obs[groupby]`` to keep, e.g. the held-out cell type.
    genes
        Genes to plot (and to compute r on); ``None`` uses all genes.
    n_label
        Number of genes with the largest absolute true delta to label.
    title
        First title line, e.g. ``"additive on held-out CD4T (IFNb)"``; the second line gives Pearson r.
        ``None``: one line, ``"<perturbation> (<group>): Pearson r = ..."``.
    figsize
        Size of a new figure in inches.
    {doc_ax_show_save}

    Returns
    -------
    The figure when ``return_fig`` is true, else ``None``.

    Examples
    --------
    >>> import numpy as np, anndata as ad
    >>> import vcell
    >>> rng = np.random.default_rng(0)
    >>> adata = ad.AnnData(rng.poisson(30, size=(20, 5)).astype(np.float32))
    >>> adata.obs["vcell_perturbation"] = ["control"] * 10 + ["A"] * 10
    >>> pred = np.full(adata.shape, np.nan, dtype=np.float32)
    >>> pred[:10] = np.log1p(adata.X[10:] / adata.X[10:].sum(1, keepdims=True) * 1e4)
    >>> adata.layers["vcell_pred"] = pred
    >>> fig = vcell.pl.prediction_scatter(adata, perturbation="A", return_fig=True)
    >>> fig.axes[0].get_title().startswith("A")
    True
    """
    deltas = _prediction_deltas(
        adata,
        perturbation=perturbation,
        pred_layer=pred_layer,
        perturbation_key=perturbation_key,
        control=control,
        layer=layer,
        groupby=groupby,
        group=group,
    )
    deltas = deltas.iloc[_gene_index(adata.var_names, genes)]
    r = _pearson(deltas["true"].to_numpy(), deltas["pred"].to_numpy())

    plot = Plotter(ax=ax, figsize=figsize)
    ax = plot.ax
    x, y = deltas["true"].to_numpy(), deltas["pred"].to_numpy()
    ax.scatter(x, y, s=8, alpha=0.6, color="tab:blue", edgecolors="none", rasterized=len(x) > 5000)
    lim_lo = float(min(x.min(), y.min()))
    lim_hi = float(max(x.max(), y.max()))
    pad = 0.05 * (lim_hi - lim_lo) if lim_hi > lim_lo else 1.0
    lims = (lim_lo - pad, lim_hi + pad)
    ax.plot(lims, lims, ls="--", lw=1, color="0.4", zorder=0)
    ax.axhline(0, lw=0.5, color="0.8", zorder=0)
    ax.axvline(0, lw=0.5, color="0.8", zorder=0)
    ax.set_xlim(lims)
    ax.set_ylim(lims)
    if n_label > 0:
        top = np.argsort(-np.abs(x), kind="stable")[:n_label]
        for i in top:
            ax.annotate(
                str(deltas.index[i]),
                (x[i], y[i]),
                xytext=(3, 3),
                textcoords="offset points",
                fontsize=7,
                color="0.15",
            )
    if title is None:
        where = f" ({group})" if group is not None else ""
        ax.set_title(f"{perturbation}{where}: Pearson r = {r:.3f}")
    else:
        ax.set_title(f"{title}\nPearson r = {r:.3f}")
    ax.set_xlabel(f"true Δ vs control ({deltas.attrs['space']})")
    ax.set_ylabel(f"predicted Δ ({pred_layer})")
    return plot.finish(show=show, save=save, return_fig=return_fig)


def _deltas_from_adata(
    adata: AnnData,
    *,
    perturbation: str,
    pred_layers: Sequence[str],
    perturbation_key: str,
    control: str,
    layer: str | None,
    groupby: str | None,
    group: str | None,
) -> pd.DataFrame:
    """Rows ``"true: <perturbation>[ (<group>)]"`` and one per prediction layer, columns = genes (deltas vs control)."""
    rows = {}
    spaces = {}
    for i, pred_layer in enumerate(pred_layers):
        d = _prediction_deltas(
            adata,
            perturbation=perturbation,
            pred_layer=pred_layer,
            perturbation_key=perturbation_key,
            control=control,
            layer=layer,
            groupby=groupby,
            group=group,
        )
        spaces[pred_layer] = d.attrs["pred_space"]
        first = pred_layers[0]
        check_same_space(
            spaces[first],
            spaces[pred_layer],
            what_a=f"adata.layers[{first!r}]",
            what_b=f"adata.layers[{pred_layer!r}]",
            where="delta_heatmap",
        )
        if i == 0:
            where = f" ({group})" if group is not None else ""
            rows[f"true: {perturbation}{where}"] = d["true"]
        rows[pred_layer] = d["pred"]
    return pd.DataFrame(rows).T


@doc_params(doc_ax_show_save=doc_ax_show_save)
def delta_heatmap(
    deltas: AnnData | pd.DataFrame,
    *,
    perturbation: str | None = None,
    pred_layer: str | Sequence[str] = "vcell_pred",
    perturbation_key: str = PERT_COL,
    control: str = CONTROL,
    layer: str | None = None,
    groupby: str | None = None,
    group: str | None = None,
    genes: Sequence[str] | None = None,
    n_genes: int = 30,
    rank_by: str | None = None,
    cmap: str = "RdBu_r",
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Heatmap of delta vectors (rows: the truth, then each prediction) over genes.

    Two inputs:

    - an AnnData, as for :func:`prediction_scatter`: the first row is the true change of ``perturbation`` (mean of
      its cells minus the mean of the ``control`` cells, in the predictions' expression space, checked as there;
      the prediction layers must share one space too); then one row per layer of ``pred_layer`` (mean over the
      cells holding a prediction minus the same control mean), labelled by the layer name;
    - a DataFrame of delta vectors computed elsewhere: one per row (index = row labels such as
      ``"true: IFNb|CD4T"``, ``"additive"``, ``"control"``), one column per gene.

    The colour scale is symmetric around 0 (``-max|delta|`` to ``+max|delta|``). Without ``genes``, the
    ``n_genes`` genes with the largest absolute delta in row ``rank_by`` are shown, ordered by that delta.

    Parameters
    ----------
    deltas
        An AnnData with true perturbed cells, control cells and prediction layer(s); or a DataFrame with one delta
        vector per row (index = row labels) and one column per gene.
    perturbation
        AnnData only (required there): label of the true perturbed cells in ``adata.obs[perturbation_key]``.
    pred_layer
        AnnData only: layer, or list of layers (e.g. one per model), with predictions (NaN rows for cells without a
        prediction), as written by ``vcell.tl.predict_perturbation``.
    perturbation_key
        AnnData only: column of ``adata.obs`` with the perturbation labels.
    control
        AnnData only: label of the control cells.
    layer
        AnnData only: layer with the observed expression (counts, or log data in the predictions' space); ``None``
        reads ``X``.
    groupby
        AnnData only: optional column of ``adata.obs`` (e.g. cell type) to restrict every set of cells to one
        group; use with ``group``.
    group
        AnnData only: value of ``adata.obs[groupby]`` to keep, e.g. the held-out cell type.
    genes
        Genes (columns) to show, in this order; ``None`` selects ``n_genes`` by ``rank_by``.
    n_genes
        Number of genes to show when ``genes`` is ``None``.
    rank_by
        Row label that selects and orders the genes; ``None`` uses the first row (the truth, for an AnnData).
    cmap
        Diverging colour map.
    figsize
        Size of a new figure in inches; ``None`` scales with the number of rows and genes.
    {doc_ax_show_save}

    Returns
    -------
    The figure when ``return_fig`` is true, else ``None``.

    Examples
    --------
    From a DataFrame of deltas:

    >>> import pandas as pd
    >>> import vcell
    >>> deltas = pd.DataFrame(
    ...     {"ISG15": [2.0, 1.5, 0.0], "IFIT1": [1.0, 0.8, 0.0], "CD3E": [-0.5, 0.1, 0.0]},
    ...     index=["true: IFNb|CD4T", "additive", "control"],
    ... )
    >>> fig = vcell.pl.delta_heatmap(deltas, return_fig=True)
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['ISG15', 'IFIT1', 'CD3E']

    From an AnnData with a prediction layer (as :func:`prediction_scatter` reads it):

    >>> import numpy as np, anndata as ad
    >>> rng = np.random.default_rng(0)
    >>> adata = ad.AnnData(rng.poisson(30, size=(20, 5)).astype(np.float32))
    >>> adata.obs["vcell_perturbation"] = ["control"] * 10 + ["A"] * 10
    >>> pred = np.full(adata.shape, np.nan, dtype=np.float32)
    >>> pred[:10] = np.log1p(adata.X[10:] / adata.X[10:].sum(1, keepdims=True) * 1e4)
    >>> adata.layers["vcell_pred"] = pred
    >>> fig = vcell.pl.delta_heatmap(adata, perturbation="A", return_fig=True)
    >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
    ['true: A', 'vcell_pred']
    """
    from anndata import AnnData

    if isinstance(deltas, AnnData):
        if perturbation is None:
            msg = "perturbation is required with an AnnData: the label of the true perturbed cells to compare with"
            raise ValueError(msg)
        layers = [pred_layer] if isinstance(pred_layer, str) else list(pred_layer)
        if not layers:
            msg = "pred_layer is empty; expected a layer name or a list of layer names"
            raise ValueError(msg)
        deltas = _deltas_from_adata(
            deltas,
            perturbation=perturbation,
            pred_layers=layers,
            perturbation_key=perturbation_key,
            control=control,
            layer=layer,
            groupby=groupby,
            group=group,
        )
    elif not isinstance(deltas, pd.DataFrame):
        msg = (
            "deltas must be an AnnData (with a prediction layer) or a pandas DataFrame (rows = delta vectors, "
            f"columns = genes), got {type(deltas).__name__}"
        )
        raise TypeError(msg)
    elif perturbation is not None:
        msg = (
            f"perturbation={perturbation!r} applies to an AnnData; with a DataFrame of deltas the rows are "
            "already the delta vectors (leave perturbation out)"
        )
        raise ValueError(msg)
    if deltas.shape[0] == 0 or deltas.shape[1] == 0:
        msg = f"deltas is empty (shape {deltas.shape}); expected at least one row and one gene column"
        raise ValueError(msg)
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else list(genes)
        missing = [g for g in genes if g not in deltas.columns]
        if missing:
            msg = f"genes {missing[:10]} are not columns of deltas"
            raise KeyError(msg)
        shown = deltas.loc[:, genes]
    else:
        if n_genes < 1:
            msg = f"n_genes must be a positive integer, got {n_genes}"
            raise ValueError(msg)
        if rank_by is None:
            ref = deltas.iloc[0]
        elif rank_by in deltas.index:
            ref = deltas.loc[rank_by]
            if isinstance(ref, pd.DataFrame):
                ref = ref.iloc[0]
        else:
            msg = f"rank_by {rank_by!r} is not a row of deltas; rows: {list(deltas.index)}"
            raise KeyError(msg)
        ref = ref.astype(float)
        top = ref.abs().fillna(-1).sort_values(ascending=False, kind="stable").index[:n_genes]
        order = ref.loc[top].sort_values(ascending=False, kind="stable").index
        shown = deltas.loc[:, order]

    values = shown.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    vmax = float(np.abs(finite).max()) if finite.size else 0.0
    vmax = vmax if vmax > 0 else 1.0
    n_rows, n_cols = values.shape
    if figsize is None:
        figsize = (min(2.5 + 0.28 * n_cols, 24.0), 1.2 + 0.4 * n_rows)
    plot = Plotter(ax=ax, figsize=figsize)
    ax = plot.ax
    im = ax.imshow(values, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(n_cols), labels=[str(c) for c in shown.columns], rotation=90, fontsize=8)
    ax.set_yticks(np.arange(n_rows), labels=[str(i) for i in shown.index], fontsize=9)
    ax.tick_params(length=0)
    cbar = plot.fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label("Δ expression")
    return plot.finish(show=show, save=save, return_fig=return_fig)
