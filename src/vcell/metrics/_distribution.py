"""Distribution metrics between cell sets: PCA space, energy distance, MMD, diversity of samples."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from vcell._utils import resolve_seed, to_dense

from ._common import as_cells, check_same_length, sq_dists, subsample

if TYPE_CHECKING:
    from collections.abc import Callable

    from numpy.typing import ArrayLike

DEFAULT_BANDWIDTHS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)


#: dense inputs up to this many values (cells x genes) are fitted by scikit-learn, as before streaming existed
_SKLEARN_MAX_ELEMENTS = 1 << 24


def fit_pca(
    X: ArrayLike | sparse.spmatrix,
    n_comps: int = 50,
    *,
    rows: ArrayLike | None = None,
    transform: str | Callable | None = None,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit a PCA (e.g. on training cells) to compare predicted and true cells in a fixed low-dim space.

    A dense in-memory ``X`` of at most 2^24 values (the cells used x genes) is fitted by
    :class:`sklearn.decomposition.PCA` (``svd_solver="auto"``, ``random_state=seed``). Anything else (SciPy sparse,
    a backed matrix, a larger dense array) is fitted by :func:`vcell.data.fit_pca_streamed`, block by block, so
    no more than one block of rows is ever dense: the exact covariance solution up to 5,000 genes (equal to
    scikit-learn's exact solvers up to round-off; scikit-learn's own ``"auto"`` picks a randomized solver for wide
    or large data, whose trailing components differ), a seeded randomized one above. Component signs always
    follow scikit-learn's ``svd_flip`` (largest absolute entry of each component positive), so the result is
    deterministic for a given seed whatever the solver.

    Parameters
    ----------
    X
        Cells ``(n_cells x n_genes)``, log1p(CP10k) (or counts with ``transform="log1p_cp10k"``): dense, sparse, or
        backed (``adata.X`` of an h5ad read with ``backed="r"``).
    n_comps
        Number of components, capped at ``min(n_cells, n_genes)``.
    rows
        Cells (integer row indices) to fit on; ``None``: all.
    transform
        Applied to the rows before fitting: ``None``, ``"log1p_cp10k"`` (for counts) or a function of a block of rows
        (see :func:`vcell.data.fit_pca_streamed`).
    seed
        Random seed of the solver; defaults to ``vcell.settings.seed``.

    Returns
    -------
    ``(components, mean)``: ``components`` of shape ``(n_comps, n_genes)`` and the gene means ``(n_genes,)``,
    for :func:`pca_project`.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(100, 10))
    >>> comps, mean = fit_pca(X, 3)
    >>> pca_project(X, comps, mean).shape
    (100, 3)
    """
    from vcell.data._chunked import _flip_signs, _transform, fit_pca_streamed

    if n_comps < 1:
        msg = f"n_comps must be a positive integer, got {n_comps}"
        raise ValueError(msg)
    idx = None if rows is None else np.asarray(rows, dtype=np.int64).ravel()
    in_memory = isinstance(X, np.ndarray | list | tuple | pd.DataFrame)
    shape = np.shape(X) if in_memory else tuple(X.shape)
    n_cells = (shape[0] if len(shape) else 0) if idx is None else idx.size
    if len(shape) != 2 or n_cells < 2:
        msg = f"X must be a 2-D (cells x genes) array with at least 2 cells, got shape {shape}"
        raise ValueError(msg)
    seed = resolve_seed(seed)
    if not in_memory or n_cells * shape[1] > _SKLEARN_MAX_ELEMENTS:
        if in_memory:
            X = np.asarray(X)
        return fit_pca_streamed(X, n_comps, rows=idx, transform=transform, seed=seed)

    from sklearn.decomposition import PCA

    Xd = np.asarray(X)
    if idx is not None:
        Xd = Xd[idx]
    Xd = to_dense(_transform(Xd, transform, 1e4), dtype=np.float64)
    n = int(min(n_comps, *Xd.shape))
    pca = PCA(n_components=n, svd_solver="auto", random_state=seed).fit(Xd)
    return _flip_signs(pca.components_), pca.mean_.astype(np.float64)


def pca_project(X: ArrayLike | sparse.spmatrix, components: ArrayLike, mean: ArrayLike) -> np.ndarray:
    """Coordinates of cells in a PCA space from :func:`fit_pca`: ``(X - mean) @ components.T``.

    Parameters
    ----------
    X
        Cells ``(n_cells x n_genes)`` (dense or sparse) or one cell ``(n_genes,)``.
    components
        ``(n_comps, n_genes)``.
    mean
        ``(n_genes,)``.

    Returns
    -------
    ``(n_cells, n_comps)`` float64 array.

    Examples
    --------
    >>> import numpy as np
    >>> pca_project(np.array([[1.0, 2.0]]), np.array([[1.0, 0.0]]), np.array([1.0, 1.0]))
    array([[0.]])
    """
    C = np.asarray(components, dtype=np.float64)
    m = np.asarray(mean, dtype=np.float64).ravel()
    if C.ndim != 2 or C.shape[1] != m.shape[0]:
        msg = f"components must be (n_comps x n_genes) matching mean ({m.shape[0]} genes), got {C.shape}"
        raise ValueError(msg)
    if sparse.issparse(X):
        if X.shape[1] != m.shape[0]:
            msg = f"X has {X.shape[1]} genes but the PCA was fit on {m.shape[0]}"
            raise ValueError(msg)
        return np.asarray(X @ C.T) - (m @ C.T)[None, :]
    Xd = np.asarray(X, dtype=np.float64)
    if Xd.ndim == 1:
        Xd = Xd[None, :]
    if Xd.shape[1] != m.shape[0]:
        msg = f"X has {Xd.shape[1]} genes but the PCA was fit on {m.shape[0]}"
        raise ValueError(msg)
    return (Xd - m) @ C.T


def _prepare(X, Y, max_cells, seed) -> tuple[np.ndarray, np.ndarray]:
    Xc, Yc = as_cells(X, name="X"), as_cells(Y, name="Y")
    check_same_length(Xc, Yc, ("X", "Y"))
    rng = np.random.default_rng(resolve_seed(seed))
    Xc, Yc = subsample(Xc, max_cells, rng), subsample(Yc, max_cells, rng)
    centre = np.vstack([Xc, Yc]).mean(axis=0)
    return Xc - centre, Yc - centre


def energy_distance(
    X: ArrayLike | sparse.spmatrix,
    Y: ArrayLike | sparse.spmatrix,
    *,
    squared: bool = False,
    max_cells: int | None = 2000,
    seed: int | None = None,
) -> float:
    """Energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` between two cell sets.

    Expectations are plain means over all pairs, including each cell with itself (the V-statistic, always
    ``>= 0``), exactly as ``pertpy.tools.Distance("edistance")``, which in pertpy 1.0 uses Euclidean (not squared)
    distances; ``squared=False`` therefore matches pertpy's value. ``squared=True`` uses squared Euclidean distances,
    which reduces to ``2 |mean(X) - mean(Y)|^2`` (a mean-shift measure, blind to spread).

    Parameters
    ----------
    X
        Cells ``(n_cells x n_features)``, usually in a fixed PCA space (:func:`fit_pca`, :func:`pca_project`).
    Y
        Cells with the same features.
    squared
        Use squared Euclidean distances.
    max_cells
        Each set is subsampled (without replacement, seeded) to at most this many cells; ``None`` keeps all.
    seed
        Seed of the subsampling; defaults to ``vcell.settings.seed``.

    Returns
    -------
    The energy distance (0 for identical sets; ``2 d`` for two point masses ``d`` apart); ``NaN`` when a (subsampled)
    cell holds NaN or inf.

    Examples
    --------
    >>> import numpy as np
    >>> energy_distance(np.zeros((3, 2)), np.array([[3.0, 4.0]] * 2))
    10.0
    """
    Xc, Yc = _prepare(X, Y, max_cells, seed)
    dxy, dxx, dyy = sq_dists(Xc, Yc), sq_dists(Xc, Xc), sq_dists(Yc, Yc)
    if not squared:
        for D in (dxy, dxx, dyy):
            np.sqrt(D, out=D)
    value = 2.0 * dxy.mean() - dxx.mean() - dyy.mean()
    return float(value) if np.isnan(value) else float(max(value, 0.0))


def _median_scale(dxx: np.ndarray, dyy: np.ndarray, dxy: np.ndarray) -> float:
    """Median of the pooled distances (``dxx``'s and ``dyy``'s above the diagonal, all of ``dxy``); see :func:`mmd`."""
    pooled = _pooled(dxx, dyy, dxy)
    scale = float(np.median(pooled, overwrite_input=True)) if pooled.size else 0.0
    if scale <= 0:
        pooled = _pooled(dxx, dyy, dxy)  # in its order again (the median reordered it): the same mean
        pos = pooled[pooled > 0]
        scale = float(pos.mean()) if pos.size else 1.0
    return scale


def _pooled(dxx: np.ndarray, dyy: np.ndarray, dxy: np.ndarray) -> np.ndarray:
    """``dxx`` and ``dyy`` above the diagonal (row by row), then ``dxy``: one array, without index arrays."""
    nx, ny = dxx.shape[0], dyy.shape[0]
    out = np.empty(nx * (nx - 1) // 2 + ny * (ny - 1) // 2 + dxy.size, dtype=np.result_type(dxx, dyy, dxy))
    at = 0
    for D in (dxx, dyy):
        for i in range(D.shape[0] - 1):
            out[at : at + D.shape[0] - i - 1] = D[i, i + 1 :]
            at += D.shape[0] - i - 1
    out[at:] = dxy.ravel()
    return out


def mmd(
    X: ArrayLike | sparse.spmatrix,
    Y: ArrayLike | sparse.spmatrix,
    *,
    bandwidths: tuple[float, ...] = DEFAULT_BANDWIDTHS,
    max_cells: int | None = 2000,
    seed: int | None = None,
) -> float:
    """Squared maximum mean discrepancy with RBF kernels, averaged over bandwidths (median heuristic).

    ``s`` is the median of the **squared** Euclidean distances between distinct cells of the pooled sample
    (``X`` and ``Y`` together, after subsampling); for each multiplier ``b`` the kernel is
    ``k_b(x, y) = exp(-|x - y|^2 / (b * s))``, and the biased (V-statistic) estimate
    ``mean K_XX + mean K_YY - 2 mean K_XY`` (``>= 0``) is averaged over ``bandwidths``. When ``s`` is 0 (most
    cells identical) the mean positive squared distance is used, else 1.

    Parameters
    ----------
    X
        Cells ``(n_cells x n_features)``, usually PCA coordinates.
    Y
        Cells with the same features.
    bandwidths
        Multipliers of the median heuristic.
    max_cells
        Subsample each set to at most this many cells (seeded); ``None`` keeps all.
    seed
        Seed of the subsampling; defaults to ``vcell.settings.seed``.

    Returns
    -------
    MMD^2 (0 for identical sets, at most 2); ``NaN`` when a (subsampled) cell holds NaN or inf.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(50, 2))
    >>> mmd(X, X)
    0.0
    """
    if len(bandwidths) == 0 or any(b <= 0 for b in bandwidths):
        msg = f"bandwidths must be a non-empty sequence of positive multipliers, got {bandwidths}"
        raise ValueError(msg)
    Xc, Yc = _prepare(X, Y, max_cells, seed)
    dxy, dxx, dyy = sq_dists(Xc, Yc), sq_dists(Xc, Xc), sq_dists(Yc, Yc)
    scale = _median_scale(dxx, dyy, dxy)
    # distances relative to the median first: -1 / (b * scale) overflows to -inf for a subnormal scale, and -inf * 0
    # is NaN (cells 1e-155 apart gave NaN, not the MMD of the same cells scaled up)
    for D in (dxx, dyy, dxy):  # in place, and one buffer for the kernels: no further n x n arrays
        D /= scale
    flat = np.empty(max(dxx.size, dyy.size, dxy.size), dtype=np.result_type(dxx, dyy, dxy))
    vals = []
    for b in bandwidths:
        means = []
        for D in (dxx, dyy, dxy):
            buf = flat[: D.size].reshape(D.shape)
            np.divide(D, -b, out=buf)  # (-r) / b: the same value as -r / b
            means.append(np.exp(buf, out=buf).mean())
        vals.append(means[0] + means[1] - 2.0 * means[2])
    value = np.mean(vals)
    return float(value) if np.isnan(value) else float(max(value, 0.0))


def diversity(
    sampled: ArrayLike | sparse.spmatrix,
    real: ArrayLike | sparse.spmatrix,
    *,
    pca: tuple[np.ndarray, np.ndarray] | None = None,
    max_cells: int | None = 2000,
    seed: int | None = None,
) -> dict[str, float]:
    """Diversity of generated cells against real cells of the same condition.

    - ``variance_ratio``: mean over features with ``var(real) > 0`` of ``var(sampled) / var(real)`` (``ddof=1``),
      computed on the input features (genes). 1 = same spread; below 1 = mode collapse.
    - ``coverage``: share of real cells whose nearest sampled cell is closer than the median real-real
      nearest-neighbour distance (Euclidean; in the ``pca`` space when given, else on the input features).

    Parameters
    ----------
    sampled
        Generated cells ``(n_cells x n_genes)``; at least 2.
    real
        Real cells, same genes; at least 2.
    pca
        Optional ``(components, mean)`` from :func:`fit_pca` for the coverage.
    max_cells
        Subsample each set to at most this many cells (seeded) for the coverage; ``None`` keeps all.
    seed
        Seed of the subsampling; defaults to ``vcell.settings.seed``.

    Returns
    -------
    ``{"variance_ratio": ..., "coverage": ...}``; both ``NaN`` when ``sampled`` or ``real`` holds NaN or inf.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(40, 3))
    >>> diversity(X, X)
    {'variance_ratio': 1.0, 'coverage': 1.0}
    """
    S, R = as_cells(sampled, name="sampled"), as_cells(real, name="real")
    check_same_length(S, R, ("sampled", "real"))
    if S.shape[0] < 2 or R.shape[0] < 2:
        msg = f"sampled and real need at least 2 cells each, got {S.shape[0]} and {R.shape[0]}"
        raise ValueError(msg)
    if not (np.isfinite(S).all() and np.isfinite(R).all()):  # NaN genes dropped from the ratio, cells never covered
        return {"variance_ratio": float("nan"), "coverage": float("nan")}
    vr, vs = R.var(axis=0, ddof=1), S.var(axis=0, ddof=1)
    keep = vr > 0
    ratio = float(np.mean(vs[keep] / vr[keep])) if keep.any() else float("nan")

    rng = np.random.default_rng(resolve_seed(seed))
    S, R = subsample(S, max_cells, rng), subsample(R, max_cells, rng)
    if pca is not None:
        S, R = pca_project(S, *pca), pca_project(R, *pca)
    centre = R.mean(axis=0)
    S, R = S - centre, R - centre
    drr = sq_dists(R, R)
    np.fill_diagonal(drr, np.inf)
    radius = np.median(np.sqrt(drr.min(axis=1)))
    d_rs = np.sqrt(sq_dists(R, S).min(axis=1))
    coverage = float(np.mean(d_rs < radius)) if radius > 0 else float(np.mean(d_rs <= 0))
    return {"variance_ratio": ratio, "coverage": coverage}
