"""Uncertainty of sampled predictions: per-gene predictive intervals and their coverage of real cells."""

from __future__ import annotations

from numbers import Real
from typing import TYPE_CHECKING

import numpy as np

from ._common import as_cells

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from scipy import sparse


def _check_level(level: float) -> float:
    if isinstance(level, bool) or not isinstance(level, Real) or not 0.0 < float(level) < 1.0:
        msg = f"level must be a number in (0, 1) (the interval's nominal coverage, e.g. 0.9), got {level!r}"
        raise ValueError(msg)
    return float(level)


def _bound(x: ArrayLike, *, name: str, n_genes: int) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != n_genes:
        msg = f"{name} must be a 1-D vector with one value per gene ({n_genes},), got shape {arr.shape}"
        raise ValueError(msg)
    if np.isnan(arr).any():
        msg = f"{name} holds NaN for {int(np.isnan(arr).sum())} gene(s); expected a bound for every gene"
        raise ValueError(msg)
    return arr


def predictive_interval(samples: ArrayLike | sparse.spmatrix, *, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene equal-tailed predictive interval of sampled cells.

    The bounds are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of every column (gene) of
    ``samples`` (:func:`numpy.quantile`, linear interpolation between order statistics).

    Parameters
    ----------
    samples
        Sampled cells ``(n_samples x n_genes)``, e.g. log1p(CP10k) cells drawn from a generative model for one
        condition; dense or sparse; at least 2 samples (a 1-D vector is read as one cell).
    level
        Nominal coverage of the interval, in ``(0, 1)``.

    Returns
    -------
    ``(lower, upper)``: two float64 vectors of length ``n_genes``.

    Examples
    --------
    >>> import numpy as np
    >>> samples = np.column_stack([np.arange(100.0), np.full(100, 3.0)])  # gene 0: 0..99, gene 1: always 3
    >>> lower, upper = predictive_interval(samples, level=0.9)
    >>> np.round(lower, 6).tolist(), np.round(upper, 6).tolist()
    ([4.95, 3.0], [94.05, 3.0])
    """
    level = _check_level(level)
    S = as_cells(samples, name="samples")
    if S.shape[0] < 2:
        msg = f"samples must hold at least 2 sampled cells (rows) to form an interval, got {S.shape[0]}"
        raise ValueError(msg)
    if np.isnan(S).any():
        msg = "samples hold NaN values; expected finite sampled expression"
        raise ValueError(msg)
    lower, upper = np.quantile(S, [(1.0 - level) / 2.0, (1.0 + level) / 2.0], axis=0)
    return lower, upper


def interval_coverage(
    real: ArrayLike | sparse.spmatrix, lower: ArrayLike, upper: ArrayLike, *, per_gene: bool = False
) -> float | np.ndarray:
    """Share of real cells whose value lies in the predictive interval ``[lower_g, upper_g]``, per gene.

    Both ends are inclusive. A well-calibrated interval of level ``l`` (:func:`predictive_interval` of cells
    sampled for a condition) covers about a share ``l`` of that condition's real cells in every gene; lower
    coverage means an over-confident (too narrow or shifted) prediction, higher an over-dispersed one.

    Parameters
    ----------
    real
        Real cells ``(n_cells x n_genes)`` of the condition, same genes and space as the interval; dense or sparse
        (a 1-D vector is read as one cell).
    lower
        Lower bound per gene, length ``n_genes``.
    upper
        Upper bound per gene, length ``n_genes``; ``upper >= lower``.
    per_gene
        Return the coverage of every gene instead of its mean over genes.

    Returns
    -------
    The mean over genes of the per-gene coverage (a float), or with ``per_gene=True`` the per-gene coverage
    (float64 vector of length ``n_genes``).

    Examples
    --------
    >>> import numpy as np
    >>> real = np.column_stack([np.arange(10.0), np.arange(10.0)])  # 10 cells valued 0..9 in both genes
    >>> interval_coverage(real, [2.0, 0.0], [5.0, 9.0], per_gene=True).tolist()  # 2, 3, 4, 5 and all ten
    [0.4, 1.0]
    >>> interval_coverage(real, [2.0, 0.0], [5.0, 9.0])
    0.7
    """
    R = as_cells(real, name="real")
    n_genes = R.shape[1]
    lo = _bound(lower, name="lower", n_genes=n_genes)
    hi = _bound(upper, name="upper", n_genes=n_genes)
    if np.isnan(R).any():
        msg = "real holds NaN values; expected finite expression"
        raise ValueError(msg)
    inverted = lo > hi
    if inverted.any():
        g = int(np.flatnonzero(inverted)[0])
        msg = (
            f"lower exceeds upper for {int(inverted.sum())} gene(s) (e.g. gene {g}: {lo[g]:.4g} > {hi[g]:.4g}); "
            "pass lower and upper in this order"
        )
        raise ValueError(msg)
    covered = ((R >= lo) & (R <= hi)).mean(axis=0)
    return covered if per_gene else float(covered.mean())
