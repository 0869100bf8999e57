"""Predictive intervals of sampled cells per gene, against the real cells of the condition."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vcell._docs import doc_ax_show_save, doc_params
from vcell._utils import check_obs_keys, expression_for_eval, resolve_seed
from vcell.metrics._common import as_cells
from vcell.metrics._uncertainty import interval_coverage
from vcell.pp._space import CP10K, ExpressionSpace, check_same_space, expression_space, recorded_space

from ._utils import Plotter

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from scipy import sparse

_INTERVAL_COLOR = "tab:blue"
_INSIDE_COLOR = "0.35"
_OUTSIDE_COLOR = "tab:red"


def _interval_frames(sampled: AnnData, key: str) -> dict[str, pd.DataFrame]:
    """``varm[f"{key}_lower"]``, ``..._upper`` and ``..._mean`` of ``sampled`` as DataFrames (genes x perturbations)."""
    if not isinstance(sampled, AnnData):
        msg = f"sampled must be an AnnData of cells from vcell.tl.sample_perturbation, got {type(sampled).__name__}"
        raise TypeError(msg)
    frames = {}
    for part in ("lower", "upper", "mean"):
        name = f"{key}_{part}"
        if name not in sampled.varm:
            msg = (
                f"sampled.varm[{name!r}] is missing; it is written by vcell.tl.sample_perturbation "
                f"(with key_added={key!r}); found varm keys {list(sampled.varm.keys())}"
            )
            raise KeyError(msg)
        frame = sampled.varm[name]
        if not isinstance(frame, pd.DataFrame):
            msg = (
                f"sampled.varm[{name!r}] must be a DataFrame with one column per perturbation (as written by "
                f"vcell.tl.sample_perturbation), got {type(frame).__name__}"
            )
            raise ValueError(msg)
        frames[part] = frame
    return frames


def _pick_perturbation(columns: pd.Index, perturbation: str | None, key: str) -> str:
    available = [str(c) for c in columns]
    if perturbation is None:
        if len(available) != 1:
            msg = (
                f"sampled holds intervals for {len(available)} perturbations {available[:20]}; "
                "pass perturbation= to choose one"
            )
            raise ValueError(msg)
        return available[0]
    if str(perturbation) not in available:
        msg = f"perturbation {perturbation!r} is not in sampled.varm[{key + '_lower'!r}]; available: {available[:20]}"
        raise KeyError(msg)
    return str(perturbation)


def _real_values(
    real: AnnData | ArrayLike | sparse.spmatrix,
    *,
    sampled: AnnData,
    idx: np.ndarray,
    genes: list[str],
    perturbation: str,
    perturbation_key: str | None,
    layer: str | None,
    space: ExpressionSpace,
) -> np.ndarray:
    """Real cells' expression (cells x shown genes) in the sampled cells' ``space``.

    An AnnData's counts are normalised to ``space``'s target sum (1e4 when unknown) and ``log1p``-transformed; its
    log data are used as they are, after a check that their space does not provably differ from ``space``.
    """
    if isinstance(real, AnnData):
        real_space = expression_space(real, layer)
        counts = real_space.kind == "counts"
        target = float(space.target_sum) if counts and space.known_log1p else CP10K  # type: ignore[arg-type]
        data = f"real.layers[{layer!r}]" if layer is not None else "real.X"
        check_same_space(
            space,
            ExpressionSpace("log1p", target) if counts else real_space,
            what_a="the sampled cells",
            what_b=f"the real cells {data}" + (" (counts, normalised)" if counts else ""),
            where="vcell.pl.uncertainty",
        )
        if perturbation_key is not None:
            check_obs_keys(real, [perturbation_key], what="perturbation_key")
            keep = (real.obs[perturbation_key].astype(str) == perturbation).to_numpy()
            if not keep.any():
                msg = f"perturbation {perturbation!r} labels no cells in real.obs[{perturbation_key!r}]"
                raise KeyError(msg)
            real = real[keep]
        missing = [g for g in genes if g not in real.var_names]
        if missing:
            msg = f"genes {missing[:10]} are not in real.var_names (the real cells must hold the sampled genes)"
            raise KeyError(msg)
        expr = expression_for_eval(real, layer, counts=counts, target_sum=target)  # all genes, then select
        return expr[:, real.var_names.get_indexer(genes)].astype(np.float64)
    if perturbation_key is not None or layer is not None:
        msg = "perturbation_key and layer apply to an AnnData real; for an array, pass the condition's cells directly"
        raise ValueError(msg)
    values = as_cells(real, name="real")
    if values.shape[1] != sampled.n_vars:
        msg = (
            f"real has {values.shape[1]} genes (columns) but sampled has {sampled.n_vars}; an array real must hold "
            "the sampled genes in sampled.var_names order"
        )
        raise ValueError(msg)
    return values[:, idx]


@doc_params(doc_ax_show_save=doc_ax_show_save)
def uncertainty(
    sampled: AnnData,
    real: AnnData | ArrayLike | sparse.spmatrix | None = None,
    *,
    perturbation: str | None = None,
    genes: Sequence[str] | None = None,
    n_genes: int = 12,
    key: str = "vcell_sample",
    perturbation_key: str | None = None,
    layer: str | None = None,
    seed: int | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Per-gene predictive interval of sampled cells, with the predicted mean and the real cells of the condition.

    For one perturbation, each gene on the x axis shows the predictive interval of the sampled cells
    (``sampled.varm[f"{key}_lower"]`` to ``..._upper``) as a vertical bar and the predicted mean
    (``..._mean``) as a marker. With ``real`` given, the real cells of that condition are drawn as jittered
    points (grey inside the interval, red outside); the number above each gene is the share of real cells inside
    its interval and the title gives the mean over the shown genes (:func:`vcell.metrics.interval_coverage`).
    A calibrated ``90%`` interval covers about 0.9 of the real cells.

    Parameters
    ----------
    sampled
        Sampled cells as returned by ``vcell.tl.sample_perturbation``: ``varm[f"{key}_lower"]``,
        ``varm[f"{key}_upper"]`` and ``varm[f"{key}_mean"]`` are DataFrames indexed like ``var_names`` with one
        column per perturbation (in the space recorded in ``uns["vcell_spaces"]["X"]``; unknown when not), and
        ``uns[key]["params"]["level"]`` is the interval's level.
    real
        Real cells of the condition, in the sampled cells' space: an AnnData (counts are normalised to the sampled
        cells' target sum and ``log1p``-transformed, log data pass through after a check that their space does not
        provably differ, :func:`vcell.pp.expression_space`: a ValueError names both; its genes are matched by name)
        or a ``(cells x n_vars)`` array in ``sampled.var_names`` order (taken to be in that space). ``None`` draws
        the intervals only.
    perturbation
        Column of the interval DataFrames to plot; ``None`` is allowed when they hold exactly one.
    genes
        Genes to show, in this order; ``None`` shows the ``n_genes`` genes with the widest intervals (widest first).
    n_genes
        Number of genes to show when ``genes`` is ``None``.
    key
        Key under which ``vcell.tl.sample_perturbation`` wrote the intervals (its ``key_added``).
    perturbation_key
        Column of ``real.obs`` with perturbation labels; when given, only the real cells labelled
        ``perturbation`` are used. ``None``: all cells of ``real`` belong to the condition.
    layer
        Layer of ``real`` (an AnnData) to read; ``None`` reads ``X``.
    seed
        Seed of the horizontal jitter of the real cells; defaults to ``vcell.settings.seed``.
    figsize
        Size of a new figure in inches; ``None`` scales the width with the number of genes.
    {doc_ax_show_save}

    Returns
    -------
    The figure when ``return_fig`` is true, else ``None``.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> import vcell
    >>> rng = np.random.default_rng(0)
    >>> genes = ["g0", "g1", "g2"]
    >>> sampled = ad.AnnData(rng.normal(2.0, [0.2, 0.5, 1.0], size=(200, 3)), var=pd.DataFrame(index=genes))
    >>> sampled.obs["perturbation"] = pd.Categorical(["A"] * 200)
    >>> lower, upper = vcell.metrics.predictive_interval(sampled.X, level=0.9)
    >>> for part, values in [("lower", lower), ("upper", upper), ("mean", sampled.X.mean(0))]:
    ...     sampled.varm[f"vcell_sample_{part}"] = pd.DataFrame({"A": values}, index=genes)
    >>> sampled.uns["vcell_sample"] = {"params": {"level": 0.9}}
    >>> real = rng.normal(2.0, [0.2, 0.5, 1.0], size=(100, 3))
    >>> fig = vcell.pl.uncertainty(sampled, real, return_fig=True)
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]  # widest interval first
    ['g2', 'g1', 'g0']
    """
    frames = _interval_frames(sampled, key)
    pert = _pick_perturbation(frames["lower"].columns, perturbation, key)
    # anndata keeps a varm DataFrame indexed like var_names; columns may be non-string labels
    lower, upper, mean = (
        frames[part].loc[:, [c for c in frames[part].columns if str(c) == pert][0]].to_numpy(dtype=np.float64)
        for part in ("lower", "upper", "mean")
    )

    if genes is not None:
        genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        missing = [g for g in genes if g not in sampled.var_names]
        if missing:
            msg = f"genes {missing[:10]} are not in sampled.var_names"
            raise KeyError(msg)
        idx = sampled.var_names.get_indexer(genes)
    else:
        if isinstance(n_genes, bool) or int(n_genes) != n_genes or n_genes < 1:
            msg = f"n_genes must be a positive integer, got {n_genes!r}"
            raise ValueError(msg)
        width = np.where(np.isfinite(upper - lower), upper - lower, -np.inf)
        idx = np.argsort(-width, kind="stable")[: int(n_genes)]
        genes = [str(g) for g in sampled.var_names[idx]]
    lower, upper, mean = lower[idx], upper[idx], mean[idx]

    entry = sampled.uns.get(key)
    params = entry.get("params") if isinstance(entry, dict) else None
    level = params.get("level") if isinstance(params, dict) else None
    what = f"{float(level):.0%} predictive interval" if level is not None else "predictive interval"

    # the intervals' space: recorded with the samples (vcell.tl.sample_perturbation); X itself is not read
    space = recorded_space(sampled) or ExpressionSpace("unknown")
    values = None
    if real is not None:
        values = _real_values(
            real,
            sampled=sampled,
            idx=idx,
            genes=genes,
            perturbation=pert,
            perturbation_key=perturbation_key,
            layer=layer,
            space=space,
        )
    elif perturbation_key is not None or layer is not None:
        msg = "perturbation_key and layer select real cells; pass real= as well"
        raise ValueError(msg)

    n = len(genes)
    if figsize is None:
        figsize = (min(2.0 + 0.45 * n, 24.0), 4.0)
    plot = Plotter(ax=ax, figsize=figsize)
    ax = plot.ax
    x = np.arange(n)
    title = f"{pert}: {what}"
    if values is not None:
        per_gene = interval_coverage(values, lower, upper, per_gene=True)
        inside = (values >= lower) & (values <= upper)
        rng = np.random.default_rng(resolve_seed(seed))
        jitter = rng.uniform(-0.25, 0.25, size=values.shape)
        xs = x[None, :] + jitter
        many = values.size > 5000
        ax.scatter(xs[inside], values[inside], s=4, alpha=0.35, color=_INSIDE_COLOR, edgecolors="none", rasterized=many)
        ax.scatter(
            xs[~inside], values[~inside], s=4, alpha=0.6, color=_OUTSIDE_COLOR, edgecolors="none", rasterized=many
        )
        for xi, cov in zip(x, per_gene, strict=True):
            ax.annotate(
                f"{cov:.2f}",
                (xi, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                color="0.25",
            )
        title += f"; coverage of {values.shape[0]} real cells = {float(per_gene.mean()):.2f}"
    ax.vlines(x, lower, upper, colors=_INTERVAL_COLOR, linewidth=6, alpha=0.45, zorder=2)
    ax.scatter(x, mean, marker="D", s=22, color=_INTERVAL_COLOR, edgecolors="white", linewidths=0.6, zorder=3)

    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=_INTERVAL_COLOR, alpha=0.45, linewidth=6, label=what),
        Line2D([], [], color=_INTERVAL_COLOR, marker="D", linestyle="none", markeredgecolor="white", label="mean"),
    ]
    if values is not None:
        handles += [
            Line2D([], [], color=_INSIDE_COLOR, marker="o", markersize=3, linestyle="none", label="real: inside"),
            Line2D([], [], color=_OUTSIDE_COLOR, marker="o", markersize=3, linestyle="none", label="real: outside"),
        ]
    ax.legend(handles=handles, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xticks(x, labels=genes, rotation=90, fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel("expression" if space.kind == "unknown" else f"expression ({space.label})")
    ax.set_title(title, fontsize=9, pad=14 if values is not None else 6)
    return plot.finish(show=show, save=save, return_fig=return_fig)
