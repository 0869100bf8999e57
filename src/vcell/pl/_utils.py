"""Shared handling of ``ax``, ``show``, ``save`` and ``return_fig`` for every :mod:`vcell.pl` function."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

_NON_INTERACTIVE = frozenset({"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"})

#: colour of baseline models in benchmark plots
BASELINE_COLOR = "0.55"


def _non_interactive_backends() -> frozenset[str]:
    try:  # matplotlib >= 3.9
        from matplotlib.backends import BackendFilter, backend_registry

        return frozenset(b.lower() for b in backend_registry.list_builtin(BackendFilter.NON_INTERACTIVE))
    except ImportError:  # pragma: no cover
        return _NON_INTERACTIVE


def is_interactive_backend() -> bool:
    """Whether the current matplotlib backend can display figures (``Agg``, ``pdf``, ... cannot)."""
    return matplotlib.get_backend().lower() not in _non_interactive_backends()


class Plotter:
    """Figure bookkeeping shared by all plots (in the spirit of decoupler's ``Plotter``).

    ``Plotter(ax=ax, figsize=...)`` uses the given axes (and its figure) or makes a new figure with one
    axes; :meth:`finish` saves, shows and returns the figure as the public parameters ask.

    Parameters
    ----------
    ax
        Axes to draw into; ``None`` creates a new figure.
    figsize
        Size of a new figure in inches (ignored when ``ax`` is given).
    """

    def __init__(self, *, ax: Axes | None = None, figsize: tuple[float, float] = (4.5, 4.5)) -> None:
        if ax is None:
            fig, ax = plt.subplots(figsize=figsize)
        elif not isinstance(ax, Axes):
            msg = f"ax must be a matplotlib Axes or None, got {type(ax).__name__}"
            raise TypeError(msg)
        self.ax: Axes = ax
        self.axes: list[Axes] = [ax]
        self.fig: Figure = _root_figure(ax)

    @classmethod
    def grid(
        cls, n: int, *, ncols: int, panel_size: tuple[float, float], ax: Axes | Sequence[Axes] | None = None
    ) -> Plotter:
        """A plotter over ``n`` panels: given axes (one or a sequence of ``n``), or a new grid of ``n`` axes.

        Unused cells of a new grid are removed, so the figure holds exactly ``n`` axes.
        """
        self = cls.__new__(cls)
        if ax is None:
            ncols = max(1, min(ncols, n))
            nrows = int(np.ceil(n / ncols))
            fig, axes = plt.subplots(
                nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False
            )
            flat = list(axes.ravel())
            for extra in flat[n:]:
                fig.delaxes(extra)
            self.axes = flat[:n]
            self.fig = fig
        else:
            given = [ax] if isinstance(ax, Axes) else list(ax)
            if len(given) != n or not all(isinstance(a, Axes) for a in given):
                msg = f"ax must be None or {n} matplotlib Axes (one per panel), got {len(given)} object(s)"
                raise ValueError(msg)
            self.axes = given
            self.fig = _root_figure(given[0])
        self.ax = self.axes[0]
        return self

    def finish(self, *, show: bool | None, save: str | Path | None, return_fig: bool) -> Figure | None:
        """Save (``save`` is a path), show (``show=None``: only in an interactive backend and without ``return_fig``).

        Returns the figure when ``return_fig`` is true, else ``None``.
        """
        if save is not None:
            if not isinstance(save, str | Path):
                msg = f"save must be a file path (str or pathlib.Path) or None, got {type(save).__name__}"
                raise TypeError(msg)
            self.fig.savefig(save, dpi=150, bbox_inches="tight")
        if show is None:
            show = not return_fig and is_interactive_backend()
        if show:
            plt.show()
        return self.fig if return_fig else None


def _root_figure(ax: Axes) -> Figure:
    """The top-level figure of ``ax`` (climbing out of sub-figures), the one that can be saved."""
    fig = ax.figure
    while not isinstance(fig, Figure) and getattr(fig, "figure", None) is not None and fig.figure is not fig:
        fig = fig.figure
    return fig


def check_columns(df, required: Sequence[str], *, what: str) -> None:
    """Raise a :class:`KeyError` naming the columns of ``required`` that ``df`` lacks."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        msg = f"{what} lacks column(s) {missing}; expected {list(required)}, found {list(df.columns)}"
        raise KeyError(msg)
