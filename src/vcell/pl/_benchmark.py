"""Benchmark report figure: one panel per metric, models x seeds, with baselines and the split-half ceiling."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vcell._docs import doc_params, doc_show_save

from ._utils import BASELINE_COLOR, Plotter, check_columns

#: metric names (prefixes) for which a lower value is better
_LOWER_IS_BETTER = re.compile(r"^(energy_distance|edistance|mmd|mse|rmse|mae|l1|l2|wasserstein)|_(distance|error)")


def lower_is_better(metric: str) -> bool:
    """Whether a lower value of ``metric`` is better (distances and errors: ``energy_distance``, ``mmd``, ``mse*``, ``l2*``)."""
    return bool(_LOWER_IS_BETTER.search(str(metric).lower()))


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


def _seed_means(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over perturbations (and any other rows) per model, metric and seed."""
    return df.groupby(["metric", "model", "seed"], observed=True, sort=False)["value"].mean().reset_index()


@doc_params(doc_show_save=doc_show_save)
def benchmark(
    results: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    split: str | Sequence[str] | None = None,
    baselines: Sequence[str] = ("control", "mean", "additive", "linear"),
    ncols: int = 3,
    panel_size: tuple[float, float] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Benchmark report: one panel per metric, every model with its per-seed results and mean ± 95% CI.

    For each metric and model, each point is one seed (the mean over that seed's perturbations); the black
    bar is the mean over seeds with a 95% t-interval (the mean alone for a single seed). Baselines are grey,
    other models coloured. When ``results`` has a ``ceiling`` column, its mean per metric is drawn as a dashed
    line (the split-half ceiling: what the data allow). Each panel title says whether lower or higher is better.

    Parameters
    ----------
    results
        Tidy table as from ``vcell.bench.run``: columns ``model``, ``metric``, ``value``, and usually ``split``,
        ``seed``, ``perturbation`` (without ``seed``, all rows count as one seed); optional ``ceiling``.
    metrics
        Metrics to plot, in this order; ``None`` plots every metric in ``results`` (in order of appearance).
    split
        Keep only rows whose ``split`` is this value (or one of these values); ``None`` pools all splits
        (e.g. one split per held-out cell type), and the figure title lists them.
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
    check_columns(results, ["model", "metric", "value"], what="results")
    df = results.copy()
    if "seed" not in df.columns:
        df["seed"] = 0
    df["model"] = df["model"].astype(str)
    df["metric"] = df["metric"].astype(str)
    df["value"] = pd.to_numeric(df["value"], errors="coerce")

    if split is not None:
        check_columns(df, ["split"], what="results (split= was given)")
        wanted = [split] if isinstance(split, str) else list(split)
        present = set(df["split"].astype(str))
        missing = [s for s in wanted if str(s) not in present]
        if missing:
            msg = f"split {missing} not in results['split']; available: {sorted(present)}"
            raise KeyError(msg)
        df = df[df["split"].astype(str).isin([str(s) for s in wanted])]

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

    if panel_size is None:
        panel_size = (max(3.2, 1.4 + 0.5 * len(order)), 3.6)
    plot = Plotter.grid(len(metrics), ncols=ncols, panel_size=panel_size, ax=ax)

    per_seed = _seed_means(df.dropna(subset=["value"]))
    ceilings = {}
    if "ceiling" in df.columns:
        ceil = pd.to_numeric(df["ceiling"], errors="coerce")
        ceilings = ceil.groupby(df["metric"], sort=False).mean().dropna().to_dict()

    jitter = np.random.default_rng(0)
    for ax_i, metric in zip(plot.axes, metrics, strict=True):
        sub = per_seed[per_seed["metric"] == metric]
        for x, model in enumerate(order):
            vals = sub.loc[sub["model"] == model, "value"].to_numpy(dtype=float)
            if vals.size == 0:
                continue
            xs = x + jitter.uniform(-0.12, 0.12, size=vals.size) if vals.size > 1 else np.full(1, float(x))
            ax_i.scatter(xs, vals, s=18, color=colors[model], alpha=0.75, edgecolors="none", zorder=2)
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
        note = "↓ lower is better" if lower_is_better(metric) else "↑ higher is better"
        ax_i.set_title(f"{metric}\n{note}", fontsize=10)
        ax_i.set_xticks(np.arange(len(order)), labels=order, rotation=45, ha="right", fontsize=8)
        for label, model in zip(ax_i.get_xticklabels(), order, strict=True):
            label.set_color("0.35" if model in base else "black")
        ax_i.set_xlim(-0.6, len(order) - 0.4)
        ax_i.grid(axis="y", lw=0.4, color="0.9", zorder=0)
        ax_i.set_axisbelow(True)
        ax_i.spines[["top", "right"]].set_visible(False)

    if ax is None:
        seeds = per_seed["seed"].nunique()
        title = f"mean ± 95% CI over {seeds} seed{'s' if seeds != 1 else ''}; points = seeds; grey = baselines"
        if "split" in df.columns:
            splits = [str(s) for s in pd.unique(df["split"])]
            shown = ", ".join(splits[:4]) + (f", … ({len(splits)} splits)" if len(splits) > 4 else "")
            title = f"split: {shown}\n{title}"
        plot.fig.suptitle(title, fontsize=9)
        plot.fig.tight_layout()
    return plot.finish(show=show, save=save, return_fig=return_fig)
