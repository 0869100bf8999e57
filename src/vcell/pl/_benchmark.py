"""Benchmark report figure: one panel per metric, models x seeds, with baselines and the split-half ceiling."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vcell._docs import doc_params, doc_show_save

from ._utils import BASELINE_COLOR, Plotter, check_columns

#: metric names (prefixes) for which a lower value is better
_LOWER_IS_BETTER = re.compile(r"^(energy_distance|edistance|mmd|mse|rmse|mae|l1|l2|wasserstein)|_(distance|error)")


def lower_is_better(metric: str) -> bool:
    """Whether a lower value of ``metric`` is better (distances and errors: ``energy_distance``, ``mmd``, ``mse*``, ``l2*``)."""
    return bool(_LOWER_IS_BETTER.search(str(metric).lower()))


def better(metric: str) -> str:
    """``"lower"`` or ``"higher"``: which values of ``metric`` are better (see :func:`lower_is_better`)."""
    return "lower" if lower_is_better(metric) else "higher"


#: why a metric of :func:`vcell.metrics.evaluate` can be NaN for every model (see its definitions there)
UNDEFINED_REASON = {
    "pds": "needs >= 2 held-out perturbations per split (it ranks each prediction among the other held-out ones)",
    "de_overlap": "needs true DE genes (FDR < 0.05 vs control), and the held-out cells have none",
}


def undefined_note(metric: str, results: pd.DataFrame | None = None) -> str:
    """Why ``metric`` has no finite value in ``results`` (a tidy table as from ``vcell.bench.run``), in one line.

    For ``pds`` it adds how many perturbations the splits hold out (the most in one split).
    """
    reason = UNDEFINED_REASON.get(metric)
    if reason is None:
        return "NaN for every model here"
    if metric == "pds" and results is not None and "perturbation" in results.columns:
        rows = results[results["metric"].astype(str) == metric]
        keys = ["split"] if "split" in rows.columns else []
        n = int(rows.groupby(keys)["perturbation"].nunique().max()) if keys else rows["perturbation"].nunique()
        reason += f"; here: {n}"
    return reason


def short_split_labels(splits: Sequence[str]) -> dict[str, str]:
    """``split -> label`` without the split kind all share (``"unseen_cell_type:CD4T"`` -> ``"CD4T"``)."""
    splits = [str(s) for s in splits]
    kinds = {s.split(":", 1)[0] for s in splits}
    if len(splits) > 1 and len(kinds) == 1 and all(":" in s for s in splits):
        return {s: s.split(":", 1)[1] for s in splits}
    return {s: s for s in splits}


def describe_splits(splits: Sequence[str], max_shown: int | None = None) -> str:
    """``"unseen_cell_type: B, CD4T, NK"`` (the shared kind once), the first ``max_shown`` and how many in all."""
    splits = [str(s) for s in splits]
    labels = short_split_labels(splits)
    names = [labels[s] for s in splits]
    if max_shown is not None and len(names) > max_shown:
        names = [*names[:max_shown], f"… ({len(splits)} splits)"]
    kind = f"{splits[0].split(':', 1)[0]}: " if labels[splits[0]] != splits[0] else ""
    return kind + ", ".join(names)


def _mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the t-interval over ``values`` (half-width 0 for one value)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    n = values.size
    if n < 2:
        return mean, 0.0
    sem = float(values.std(ddof=1)) / np.sqrt(n)
    return mean, float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * sem


def _point_means(df: pd.DataFrame, by: str) -> pd.DataFrame:
    """One value per model, metric and point, the point (column ``point``) being a seed or a split.

    ``by="seed"``: mean over the perturbations and splits of a seed; ``by="split"``: mean over perturbations per
    seed, then over seeds.
    """
    keys = ["metric", "model"]
    per_seed = df.groupby([*keys, "split", "seed"] if by == "split" else [*keys, "seed"], observed=True, sort=False)
    out = per_seed["value"].mean().reset_index()
    if by == "split":
        out = out.groupby([*keys, "split"], observed=True, sort=False)["value"].mean().reset_index()
    return out.rename(columns={by: "point"})


@doc_params(doc_show_save=doc_show_save)
def benchmark(
    results: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    split: str | Sequence[str] | None = None,
    by: Literal["seed", "split"] = "seed",
    baselines: Sequence[str] = ("control", "mean", "additive", "linear"),
    ncols: int = 3,
    panel_size: tuple[float, float] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Benchmark report: one panel per metric, every model with its per-seed (or per-split) results and mean ± 95% CI.

    For each metric and model, each point is one seed (the mean over that seed's perturbations and splits) or, with
    ``by="split"``, one split (the mean over its perturbations and seeds; points coloured by split, with a legend),
    so the spread between e.g. held-out cell types stays visible; the black bar is the mean over the points with a
    95% t-interval (the mean alone for a single point). Baselines are grey, other models coloured. When ``results``
    has a ``ceiling`` column, its mean per metric is drawn as a red dashed line (the split-half ceiling: the metric
    between two random halves of the true held-out cells, what the data allow). Each panel title says whether lower
    or higher is better. A model without a finite value in a panel gets "n/a" at its place; a panel without any
    finite value says why (e.g. ``pds`` needs at least 2 held-out perturbations per split).

    Parameters
    ----------
    results
        Tidy table as from ``vcell.bench.run``: columns ``model``, ``metric``, ``value``, and usually ``split``,
        ``seed``, ``perturbation`` (without ``seed``, all rows count as one seed); optional ``ceiling``. Rows of the
        metric ``"error"`` (models that could not predict a condition) are left out.
    metrics
        Metrics to plot, in this order; ``None`` plots every metric in ``results`` (in order of appearance).
    split
        Keep only rows whose ``split`` is this value (or one of these values); ``None`` pools all splits
        (e.g. one split per held-out cell type), and the figure title lists them.
    by
        What one point is: ``"seed"`` (mean over the perturbations and pooled splits of one seed) or ``"split"``
        (mean over the perturbations and seeds of one split; needs a ``split`` column).
    baselines
        Model names drawn as baselines (grey, first on the x axis, in this order when present).
    ncols
        Number of panels per row.
    panel_size
        Width and height of one panel in inches; ``None`` scales the width with the number of models.
    ax
        Axes to draw into: one Axes for a single metric, or a sequence of one Axes per metric;
        ``None`` creates a new figure.
    {doc_show_save}

    Returns
    -------
    The figure when ``return_fig`` is true, else ``None``.

    Examples
    --------
    >>> import pandas as pd
    >>> import vcell
    >>> results = pd.DataFrame(
    ...     {
    ...         "model": ["control", "control", "CausalVAE", "CausalVAE"] * 2,
    ...         "split": "unseen_cell_type",
    ...         "seed": [0, 1, 0, 1] * 2,
    ...         "perturbation": "IFNb",
    ...         "metric": ["pearson_delta"] * 4 + ["energy_distance"] * 4,
    ...         "value": [0.0, 0.0, 0.8, 0.85, 5.9, 5.8, 2.5, 2.7],
    ...     }
    ... )
    >>> fig = vcell.pl.benchmark(results, return_fig=True)
    >>> [a.get_title().splitlines()[0] for a in fig.axes]
    ['pearson_delta', 'energy_distance']
    """
    if not isinstance(results, pd.DataFrame):
        msg = f"results must be a pandas DataFrame (the tidy table of vcell.bench.run), got {type(results).__name__}"
        raise TypeError(msg)
    if by not in ("seed", "split"):
        msg = f"by must be 'seed' or 'split', got {by!r}"
        raise ValueError(msg)
    check_columns(results, ["model", "metric", "value"], what="results")
    if by == "split":
        check_columns(results, ["split"], what="results (by='split' was given)")
    df = results.copy()
    if "seed" not in df.columns:
        df["seed"] = 0
    df["model"] = df["model"].astype(str)
    df["metric"] = df["metric"].astype(str)
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df = df[df["metric"] != "error"]

    if split is not None:
        check_columns(df, ["split"], what="results (split= was given)")
        wanted = [split] if isinstance(split, str) else list(split)
        present = set(df["split"].astype(str))
        missing = [s for s in wanted if str(s) not in present]
        if missing:
            msg = f"split {missing} not in results['split']; available: {sorted(present)}"
            raise KeyError(msg)
        df = df[df["split"].astype(str).isin([str(s) for s in wanted])]
    if "split" in df.columns:
        df["split"] = df["split"].astype(str)

    available = list(pd.unique(df["metric"]))
    if metrics is None:
        metrics = available
    else:
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        missing = [m for m in metrics if m not in available]
        if missing:
            msg = f"metrics {missing} not in results['metric']; available: {available}"
            raise KeyError(msg)
    if not metrics:
        msg = "results hold no rows to plot"
        raise ValueError(msg)

    models_in = list(pd.unique(df["model"]))
    base = [b for b in baselines if b in models_in]
    others = [m for m in models_in if m not in base]
    order = base + others
    colors = dict.fromkeys(base, BASELINE_COLOR)
    palette = [f"C{i}" for i in range(10)]
    colors.update({m: palette[i % len(palette)] for i, m in enumerate(others)})
    splits = list(pd.unique(df["split"])) if "split" in df.columns else []
    labels = short_split_labels(splits)
    split_colors = {s: plt.get_cmap("tab10" if len(splits) <= 10 else "tab20")(i % 20) for i, s in enumerate(splits)}

    if panel_size is None:
        panel_size = (max(3.2, 1.4 + 0.5 * len(order)), 3.6)
    plot = Plotter.grid(len(metrics), ncols=ncols, panel_size=panel_size, ax=ax)

    points = _point_means(df.dropna(subset=["value"]), by)
    ceilings = {}
    if "ceiling" in df.columns:
        ceil = pd.to_numeric(df["ceiling"], errors="coerce")
        ceilings = ceil.groupby(df["metric"], sort=False).mean().dropna().to_dict()

    jitter = np.random.default_rng(0)
    n_na = 0
    for ax_i, metric in zip(plot.axes, metrics, strict=True):
        sub = points[points["metric"] == metric]
        for x, model in enumerate(order):
            rows = sub[sub["model"] == model]
            vals = rows["value"].to_numpy(dtype=float)
            if vals.size == 0:
                if len(sub) and ((df["metric"] == metric) & (df["model"] == model)).any():
                    n_na += 1
                    ax_i.text(
                        x,
                        0.02,
                        "n/a",
                        transform=ax_i.get_xaxis_transform(),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color="0.4",
                    )
                continue
            xs = x + jitter.uniform(-0.12, 0.12, size=vals.size) if vals.size > 1 else np.full(1, float(x))
            if by == "split":
                point_colors = [split_colors[s] for s in rows["point"]]
            else:
                point_colors = colors[model]
            ax_i.scatter(xs, vals, s=18, color=point_colors, alpha=0.75, edgecolors="none", zorder=2)
            mean, half = _mean_ci(vals)
            ax_i.errorbar(
                x,
                mean,
                yerr=half if half > 0 else None,
                fmt="_",
                markersize=16,
                markeredgewidth=2,
                color="black",
                ecolor="black",
                elinewidth=1.2,
                capsize=4,
                zorder=3,
            )
        if sub.empty:
            ax_i.text(
                0.5,
                0.5,
                f"not defined for {'these splits' if len(splits) > 1 else 'this split'}:\n"
                + textwrap.fill(undefined_note(metric, df).replace(">=", "≥"), 32, break_on_hyphens=False),
                transform=ax_i.transAxes,
                ha="center",
                va="center",
                fontsize=8,
                color="0.3",
                wrap=True,
            )
            ax_i.set_yticks([])
        if metric in ceilings:
            ax_i.axhline(ceilings[metric], ls="--", lw=1.2, color="tab:red", zorder=1)
            ax_i.annotate(
                "ceiling",
                xy=(1.0, ceilings[metric]),
                xycoords=("axes fraction", "data"),
                xytext=(-2, 2),
                textcoords="offset points",
                ha="right",
                va="bottom",
                fontsize=7,
                color="tab:red",
            )
        arrow = "↓" if lower_is_better(metric) else "↑"
        ax_i.set_title(f"{metric}\n{arrow} {better(metric)} is better", fontsize=10)
        ax_i.set_xticks(np.arange(len(order)), labels=order, rotation=45, ha="right", fontsize=8)
        for label, model in zip(ax_i.get_xticklabels(), order, strict=True):
            label.set_color("0.35" if model in base else "black")
        ax_i.set_xlim(-0.6, len(order) - 0.4)
        ax_i.grid(axis="y", lw=0.4, color="0.9", zorder=0)
        ax_i.set_axisbelow(True)
        ax_i.spines[["top", "right"]].set_visible(False)

    handles = []
    if by == "split":
        handles = [
            Line2D([], [], ls="", marker="o", markersize=5, color=split_colors[s], label=labels[s]) for s in splits
        ]
        legend = {"handles": handles, "title": "split", "fontsize": 7, "title_fontsize": 7, "frameon": False}
        if ax is not None:
            plot.axes[-1].legend(loc="best", **legend)
    if ax is None:
        n = points["point"].nunique()
        unit = "split" if by == "split" else "seed"
        plural = "s" if n != 1 else ""
        title = f"mean ± 95% CI over {n} {unit}{plural}; points = {unit}s; grey = baselines"
        if ceilings:
            title += "; red dashed = split-half ceiling (true cells vs themselves)"
        if n_na:
            title += "\nn/a = undefined for that model (e.g. a correlation with a predicted change of zero)"
        if splits:
            title = f"split: {describe_splits(splits, max_shown=8)}\n{title}"
        plot.fig.suptitle(title, fontsize=9)
        if handles:
            ncols = min(len(handles), 8)
            rows = int(np.ceil(len(handles) / ncols))
            bottom = (0.25 + 0.2 * rows) / plot.fig.get_figheight()
            plot.fig.tight_layout(rect=(0, bottom, 1, 1))
            plot.fig.legend(loc="lower center", ncols=ncols, bbox_to_anchor=(0.5, 0.0), **legend)
        else:
            plot.fig.tight_layout()
    return plot.finish(show=show, save=save, return_fig=return_fig)


_BASELINE_SHADES = ("0.15", "0.4", "0.6", "0.75")


@doc_params(doc_show_save=doc_show_save)
def benchmark_splits(
    results: pd.DataFrame,
    *,
    metrics: str | Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    baselines: Sequence[str] = ("control", "mean", "additive", "linear"),
    ncols: int = 1,
    panel_size: tuple[float, float] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Per-split benchmark view: for each metric, every model on every split, with a 95% interval over seeds.

    Where :func:`benchmark` pools the splits, this keeps them apart: the x axis holds the splits (e.g. one per
    held-out cell type), each model is a marker beside the others (baselines in grey shades and square markers),
    at its mean over seeds (each seed the mean over the split's perturbations) with a 95% t-interval over the seeds
    (none with one seed). The split-half ceiling of each split (the metric between two halves of its true cells),
    when ``results`` has it, is a red dash. Models whose intervals do not overlap differ on that split.

    Parameters
    ----------
    results
        Tidy table of ``vcell.bench.run`` (``.results``): columns ``model``, ``split``, ``metric``, ``value``, and
        usually ``seed`` (without it all rows count as one seed), optional ``ceiling``. Rows of the metric
        ``"error"`` are left out.
    metrics
        Metric(s) to plot, one panel each; ``None``: every metric in ``results``.
    models
        Models to show, in this order; ``None``: the baselines present, then the other models.
    baselines
        Model names drawn as baselines (grey).
    ncols
        Panels per row.
    panel_size
        Width and height of a panel in inches; ``None`` scales the width with the number of splits.
    ax
        Axes to draw into: one per metric; ``None`` creates a new figure.
    {doc_show_save}

    Returns
    -------
    The figure when ``return_fig`` is true, else ``None``.

    Raises
    ------
    KeyError
        If a required column, a metric or a model is missing.

    Examples
    --------
    >>> import pandas as pd
    >>> import vcell
    >>> results = pd.DataFrame(
    ...     {
    ...         "model": ["mean", "mean", "CausalVAE", "CausalVAE"] * 2,
    ...         "split": ["B"] * 4 + ["NK"] * 4,
    ...         "seed": [0, 1, 0, 1] * 2,
    ...         "perturbation": "IFNb",
    ...         "metric": "pearson_delta",
    ...         "value": [0.7, 0.72, 0.8, 0.84, 0.6, 0.62, 0.5, 0.58],
    ...     }
    ... )
    >>> fig = vcell.pl.benchmark_splits(results, return_fig=True)
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['B', 'NK']
    """
    if not isinstance(results, pd.DataFrame):
        msg = f"results must be a pandas DataFrame (the tidy table of vcell.bench.run), got {type(results).__name__}"
        raise TypeError(msg)
    check_columns(results, ["model", "split", "metric", "value"], what="results")
    df = results.copy()
    if "seed" not in df.columns:
        df["seed"] = 0
    for col in ("model", "split", "metric"):
        df[col] = df[col].astype(str)
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df = df[df["metric"] != "error"]
    available = list(pd.unique(df["metric"]))
    metrics = available if metrics is None else [metrics] if isinstance(metrics, str) else list(metrics)
    missing = [m for m in metrics if m not in available]
    if missing:
        msg = f"metrics {missing} not in results['metric']; available: {available}"
        raise KeyError(msg)
    if not metrics:
        msg = "results hold no rows to plot"
        raise ValueError(msg)
    present = list(pd.unique(df["model"]))
    if models is None:
        base = [b for b in baselines if b in present]
        models = base + [m for m in present if m not in base]
    else:
        models = list(models)
        missing = [m for m in models if m not in present]
        if missing:
            msg = f"models {missing} not in results['model']; available: {present}"
            raise KeyError(msg)
    splits = list(pd.unique(df["split"]))
    labels = short_split_labels(splits)
    style = {}
    n_base = 0
    n_other = 0
    for m in models:
        if m in baselines:
            style[m] = (_BASELINE_SHADES[n_base % len(_BASELINE_SHADES)], "s")
            n_base += 1
        else:
            style[m] = (f"C{n_other % 10}", "o")
            n_other += 1

    if panel_size is None:
        panel_size = (max(4.0, 1.2 + 0.35 * len(splits) * max(1, len(models) / 3)), 3.2)
    plot = Plotter.grid(len(metrics), ncols=ncols, panel_size=panel_size, ax=ax)
    width = 0.8 / max(len(models), 1)
    offsets = {m: (i - (len(models) - 1) / 2) * width for i, m in enumerate(models)}
    for ax_i, metric in zip(plot.axes, metrics, strict=True):
        sub = df[(df["metric"] == metric) & df["model"].isin(models)]
        per_seed = sub.groupby(["model", "split", "seed"], sort=False)["value"].mean().dropna().reset_index()
        cells = {key: g["value"].to_numpy(dtype=float) for key, g in per_seed.groupby(["model", "split"], sort=False)}
        for m in models:
            color, marker = style[m]
            xs, means, halves = [], [], []
            for x, s in enumerate(splits):
                if (m, s) not in cells:
                    continue
                vals = cells[(m, s)]
                mean, half = _mean_ci(vals)
                xs.append(x + offsets[m])
                means.append(mean)
                halves.append(half)
            if xs:
                ax_i.errorbar(
                    np.asarray(xs, dtype=float),
                    np.asarray(means, dtype=float),
                    yerr=np.asarray(halves, dtype=float) if any(h > 0 for h in halves) else None,
                    fmt=marker,
                    ms=5,
                    color=color,
                    ecolor=color,
                    elinewidth=1.0,
                    capsize=2,
                    label=m,
                    zorder=3,
                )
        if "ceiling" in sub.columns:
            ceil = pd.to_numeric(sub["ceiling"], errors="coerce").groupby(sub["split"]).mean().dropna()
            for x, s in enumerate(splits):
                if s in ceil.index:
                    ax_i.hlines(ceil[s], x - 0.45, x + 0.45, colors="tab:red", linestyles="--", lw=1.2, zorder=2)
        arrow = "↓" if lower_is_better(metric) else "↑"
        ax_i.set_title(f"{metric} ({arrow} {better(metric)} is better)", fontsize=10)
        ax_i.set_xticks(np.arange(len(splits)), labels=[labels[s] for s in splits], rotation=30, ha="right", fontsize=8)
        ax_i.set_xlim(-0.6, len(splits) - 0.4)
        ax_i.grid(axis="y", lw=0.4, color="0.9", zorder=0)
        ax_i.set_axisbelow(True)
        ax_i.spines[["top", "right"]].set_visible(False)
    handles = [Line2D([], [], ls="", marker=style[m][1], color=style[m][0], label=m) for m in models]
    if "ceiling" in df.columns and df["ceiling"].notna().any():
        handles.append(Line2D([], [], ls="--", color="tab:red", label="split-half ceiling"))
    plot.axes[0].legend(handles=handles, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if ax is None:
        n_seeds = df["seed"].nunique()
        plot.fig.suptitle(
            f"per split: mean over {n_seeds} seed{'s' if n_seeds != 1 else ''}"
            + (" ± 95% t-interval" if n_seeds > 1 else "")
            + (f"; split kind {splits[0].split(':', 1)[0]}" if labels[splits[0]] != splits[0] else ""),
            fontsize=9,
        )
        plot.fig.tight_layout()
    return plot.finish(show=show, save=save, return_fig=return_fig)
