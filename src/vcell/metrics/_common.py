"""Private helpers shared by the metric modules: cell/mean coercion, subsampling, pairwise distances."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


def as_mean(x: ArrayLike | sparse.spmatrix, *, name: str = "x") -> np.ndarray:
    """Mean expression vector (float64) of a 2-D (cells x genes) array, or a 1-D mean vector unchanged."""
    if sparse.issparse(x):
        if x.shape[0] == 0:
            msg = f"{name} has no cells (0 rows); expected a (cells x genes) matrix or a mean vector"
            raise ValueError(msg)
        return np.asarray(x.mean(axis=0), dtype=np.float64).ravel()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        return arr
    if arr.ndim == 2:
        if arr.shape[0] == 0:
            msg = f"{name} has no cells (0 rows); expected a (cells x genes) matrix or a mean vector"
            raise ValueError(msg)
        return arr.mean(axis=0)
    msg = f"{name} must be a 1-D mean vector or a 2-D (cells x genes) array, got {arr.ndim} dimensions"
    raise ValueError(msg)


def as_cells(x: ArrayLike | sparse.spmatrix, *, name: str = "x") -> np.ndarray:
    """Dense 2-D float64 array of cells; a 1-D vector is read as one cell."""
    arr = x.toarray() if sparse.issparse(x) else np.asarray(x)
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        msg = f"{name} must be a 2-D (cells x features) array, got {arr.ndim} dimensions"
        raise ValueError(msg)
    if arr.shape[0] == 0:
        msg = f"{name} has no cells (0 rows)"
        raise ValueError(msg)
    return arr


def check_same_length(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    """Raise a :class:`ValueError` if two vectors (or matrices' last axis) differ in length."""
    if a.shape[-1] != b.shape[-1]:
        msg = f"{names[0]} has {a.shape[-1]} genes/features but {names[1]} has {b.shape[-1]}; they must match"
        raise ValueError(msg)


def select(v: np.ndarray, genes: ArrayLike | None) -> np.ndarray:
    """``v[..., genes]`` for an index or boolean array; all of ``v`` when ``genes`` is ``None``."""
    if genes is None:
        return v
    idx = np.asarray(genes)
    if idx.dtype == bool:
        if idx.shape[0] != v.shape[-1]:
            msg = f"boolean genes mask has length {idx.shape[0]}, expected {v.shape[-1]}"
            raise ValueError(msg)
        return v[..., idx]
    idx = idx.astype(np.int64, copy=False).ravel()
    if idx.size and (idx.min() < -v.shape[-1] or idx.max() >= v.shape[-1]):
        msg = f"genes holds indices outside [0, {v.shape[-1]}); got min {idx.min()}, max {idx.max()}"
        raise ValueError(msg)
    return v[..., idx]


def subsample_rows(n: int, max_cells: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted positions of at most ``max_cells`` of ``n`` rows, drawn without replacement; ``None``: all rows.

    No draw is made when all rows are kept, so ``rng`` advances exactly as :func:`subsample` advances it.
    """
    if max_cells is None or n <= max_cells:
        return None
    if max_cells < 1:
        msg = f"max_cells must be a positive integer or None, got {max_cells}"
        raise ValueError(msg)
    return np.sort(rng.choice(n, size=max_cells, replace=False))


def subsample(X: np.ndarray, max_cells: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``max_cells`` rows of ``X``, drawn without replacement (all rows, in order, when fewer)."""
    idx = subsample_rows(X.shape[0], max_cells, rng)
    return X if idx is None else X[idx]


def sq_dists(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between the rows of ``X`` and ``Y`` (float64, clipped at 0).

    Uses the Gram identity ``|x|^2 + |y|^2 - 2 x.y`` (one BLAS call); callers centre the data first to limit
    cancellation. The identity's round-off is about ``eps * (|x|^2 + |y|^2)``: a value below ``8 * (n_features + 2)``
    times that is read as 0, so identical cells are exactly 0 apart (not ``1e-7`` apart after a square root, which
    made the median heuristic of :func:`mmd` and the coverage of :func:`diversity` depend on round-off).
    """
    xx = np.einsum("ij,ij->i", X, X)
    yy = np.einsum("ij,ij->i", Y, Y)
    norms = xx[:, None] + yy[None, :]
    # in place (one n x m buffer besides norms): norms + (-2 x.y) and c * norms are norms - 2 x.y and c * norms exactly
    D = X @ Y.T
    D *= -2.0
    D += norms
    norms *= 8.0 * (X.shape[1] + 2) * np.finfo(np.float64).eps
    D[D <= norms] = 0.0
    del norms
    np.maximum(D, 0.0, out=D)
    if X is Y:
        np.fill_diagonal(D, 0.0)
    return D
