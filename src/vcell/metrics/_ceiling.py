"""Split-half ceiling: the value a metric takes between two random halves of the true cells."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from vcell._utils import resolve_seed

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


def split_halves(n_cells: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random split of ``range(n_cells)`` into halves of sizes ``n // 2`` and ``n - n // 2`` (sorted indices)."""
    perm = rng.permutation(n_cells)
    h = n_cells // 2
    return np.sort(perm[:h]), np.sort(perm[h:])


def ceiling(
    metric: Callable[..., float],
    true_cells: ArrayLike | sparse.spmatrix,
    *args: Any,
    n_splits: int = 5,
    seed: int | None = None,
    **kwargs: Any,
) -> float:
    """Split-half ceiling of a metric: ``metric(half1, half2, *args, **kwargs)`` on random halves of the true cells.

    It tells what the data allow: a perfect model cannot be expected to agree with the truth better than two
    halves of the same cells agree with each other (up to the halved sample size).

    Parameters
    ----------
    metric
        A metric ``metric(pred, true, *args, **kwargs) -> float``, e.g. :func:`pearson_delta`.
    true_cells
        True cells ``(n_cells x n_features)``; at least 2.
    *args
        Further positional arguments of ``metric`` (e.g. ``ref``).
    n_splits
        Number of random splits averaged.
    seed
        Seed of the splits; defaults to ``vcell.settings.seed``.
    **kwargs
        Keyword arguments of ``metric`` (e.g. ``genes=``).

    Returns
    -------
    Mean of the metric over splits (ignoring NaN); ``NaN`` with fewer than 2 cells or all splits undefined.

    Examples
    --------
    >>> import numpy as np
    >>> from vcell.metrics import mse_top_de
    >>> ceiling(mse_top_de, np.ones((10, 3)))
    0.0
    """
    if n_splits < 1:
        msg = f"n_splits must be a positive integer, got {n_splits}"
        raise ValueError(msg)
    X = true_cells if sparse.issparse(true_cells) else np.asarray(true_cells)
    if X.ndim != 2:
        msg = f"true_cells must be a 2-D (cells x features) array, got {X.ndim} dimensions"
        raise ValueError(msg)
    if X.shape[0] < 2:
        return float("nan")
    if sparse.issparse(X):
        X = sparse.csr_matrix(X)
    rng = np.random.default_rng(resolve_seed(seed))
    vals = []
    for _ in range(n_splits):
        a, b = split_halves(X.shape[0], rng)
        vals.append(float(metric(X[a], X[b], *args, **kwargs)))
    arr = np.asarray(vals)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
