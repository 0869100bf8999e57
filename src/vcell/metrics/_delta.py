"""Metrics on mean expression changes: Pearson delta, MSE, MAE, L2, direction, perturbation discrimination."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse
from scipy.spatial.distance import cdist

from ._common import as_mean, check_same_length, select

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


def perturbed_centroid_reference(means: ArrayLike) -> np.ndarray:
    """Systema's reference: the mean of all perturbed centroids.

    Parameters
    ----------
    means
        Mean expression of each perturbation, shape ``(n_perturbations, n_genes)``.

    Returns
    -------
    The average centroid, shape ``(n_genes,)``, to pass as ``ref`` to :func:`pearson_delta` and friends.

    Examples
    --------
    >>> import numpy as np
    >>> perturbed_centroid_reference(np.array([[0.0, 2.0], [2.0, 4.0]]))
    array([1., 3.])
    """
    arr = np.asarray(means, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        msg = f"means must be a non-empty (n_perturbations x n_genes) array, got shape {arr.shape}"
        raise ValueError(msg)
    return arr.mean(axis=0)


#: changes smaller than this (times ``max(1, max|ref|)``) are float round-off, e.g. a float32 control baseline
_RTOL = 1e-6


def _deltas(pred, true, ref, genes) -> tuple[np.ndarray, np.ndarray, float]:
    p, t, r = as_mean(pred, name="pred"), as_mean(true, name="true"), as_mean(ref, name="ref")
    check_same_length(p, t, ("pred", "true"))
    check_same_length(r, t, ("ref", "true"))
    tol = _RTOL * max(1.0, float(np.abs(r).max(initial=0.0)))
    return select(p - r, genes), select(t - r, genes), tol


def pearson_delta(
    pred: ArrayLike | sparse.spmatrix,
    true: ArrayLike | sparse.spmatrix,
    ref: ArrayLike | sparse.spmatrix,
    *,
    genes: ArrayLike | None = None,
) -> float:
    """Pearson correlation between predicted and true expression changes.

    ``r(pred_mean - ref, true_mean - ref)`` over all genes or over ``genes`` (e.g. the top-20 DE genes).

    Parameters
    ----------
    pred
        Predicted cells ``(cells x genes)`` (their mean is taken) or a predicted mean vector.
    true
        True cells or true mean vector.
    ref
        Reference: control cells/mean, or :func:`perturbed_centroid_reference` (Systema).
    genes
        Integer indices or a boolean mask of the genes to use; ``None`` uses all genes.

    Returns
    -------
    The correlation, or ``NaN`` where it is undefined: fewer than 2 genes, or a constant delta such as the
    ``control`` baseline's all-zero change (spread ``<= 1e-6 * max(1, max|ref|)``, so float32 round-off of a
    control-mean prediction also counts as constant). NaN or inf in ``pred``, ``true`` or ``ref`` on the genes used
    also gives ``NaN``.

    Examples
    --------
    >>> import numpy as np
    >>> ref = np.zeros(3)
    >>> pearson_delta(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0]), ref)
    1.0
    """
    dp, dt, tol = _deltas(pred, true, ref, genes)
    if dp.size < 2 or np.ptp(dp) <= tol or np.ptp(dt) <= tol:
        return float("nan")
    dp = dp - dp.mean()
    dt = dt - dt.mean()
    denom = np.sqrt(np.dot(dp, dp) * np.dot(dt, dt))
    if not np.isfinite(denom) or denom <= 0:
        return float("nan")
    return float(np.clip(np.dot(dp, dt) / denom, -1.0, 1.0))


def _mean_difference(
    pred: ArrayLike | sparse.spmatrix, true: ArrayLike | sparse.spmatrix, genes: ArrayLike | None
) -> np.ndarray:
    """``(pred_mean - true_mean)[genes]``, one NaN when no gene is selected (the errors of :func:`mse_top_de`/:func:`mae`)."""
    p, t = as_mean(pred, name="pred"), as_mean(true, name="true")
    check_same_length(p, t, ("pred", "true"))
    diff = select(p - t, genes)
    return diff if diff.size else np.array([np.nan])


def mse_top_de(
    pred: ArrayLike | sparse.spmatrix,
    true: ArrayLike | sparse.spmatrix,
    *,
    genes: ArrayLike | None = None,
) -> float:
    """Mean squared error between predicted and true mean expression over ``genes``.

    Parameters
    ----------
    pred
        Predicted cells or mean vector.
    true
        True cells or mean vector.
    genes
        Gene indices or mask, typically the top-20 DE genes (:func:`top_de_genes`); ``None`` uses all genes.

    Returns
    -------
    ``mean((pred_mean - true_mean)[genes] ** 2)``; NaN (or inf) when ``pred`` or ``true`` holds NaN or inf on the
    genes used. See :func:`mse_top_de_normalized` for the version relative to the ``control`` baseline.

    Examples
    --------
    >>> import numpy as np
    >>> mse_top_de(np.array([1.0, 2.0, 0.0]), np.array([1.0, 0.0, 0.0]), genes=[0, 1])
    2.0
    """
    return float(np.mean(_mean_difference(pred, true, genes) ** 2))


def mae(
    pred: ArrayLike | sparse.spmatrix,
    true: ArrayLike | sparse.spmatrix,
    *,
    genes: ArrayLike | None = None,
) -> float:
    """Mean absolute error between predicted and true mean expression, over all genes by default.

    cell-eval's ``mae``: ``mean(|pred_mean - true_mean|)`` of the perturbation's mean expression (not of the change
    from control; the two are equal when both share the control mean).

    Parameters
    ----------
    pred
        Predicted cells or mean vector.
    true
        True cells or mean vector.
    genes
        Gene indices or mask; ``None`` uses all genes.

    Returns
    -------
    ``mean(|pred_mean - true_mean|[genes])``; NaN (or inf) when ``pred`` or ``true`` holds NaN or inf on the genes
    used, NaN when no gene is selected.

    Examples
    --------
    >>> import numpy as np
    >>> mae(np.array([1.0, 2.0, 0.0]), np.array([1.0, 0.0, 1.0]))
    1.0
    """
    return float(np.mean(np.abs(_mean_difference(pred, true, genes))))


def mse_top_de_normalized(
    pred: ArrayLike | sparse.spmatrix,
    true: ArrayLike | sparse.spmatrix,
    ctrl: ArrayLike | sparse.spmatrix,
    *,
    genes: ArrayLike | None = None,
) -> float:
    """:func:`mse_top_de` of ``pred`` divided by that of the ``control`` baseline (predicting ``ctrl``).

    Values below 1 beat "no change"; 0 is perfect.

    Parameters
    ----------
    pred
        Predicted cells or mean vector.
    true
        True cells or mean vector.
    ctrl
        Control cells or control mean (the ``control`` baseline's prediction).
    genes
        Gene indices or mask; ``None`` uses all genes.

    Returns
    -------
    ``mse(pred, true) / mse(ctrl, true)``; ``NaN`` when the control baseline's MSE is 0 or not finite (NaN or inf
    in the inputs).

    Examples
    --------
    >>> import numpy as np
    >>> mse_top_de_normalized(np.array([1.0, 1.0]), np.array([2.0, 2.0]), np.zeros(2))
    0.25
    """
    num = mse_top_de(pred, true, genes=genes)
    den = mse_top_de(ctrl, true, genes=genes)
    if not (den > 0 and np.isfinite(den)):  # an infinite control error made any prediction look perfect (0)
        return float("nan")
    return num / den


def l2_top_expressed(
    pred: ArrayLike | sparse.spmatrix,
    true: ArrayLike | sparse.spmatrix,
    *,
    expressed_mean: ArrayLike,
    n_top: int = 1000,
) -> float:
    """L2 (Euclidean) distance between predicted and true means over the most expressed genes (Ahlmann-Eltze 2025).

    Parameters
    ----------
    pred
        Predicted cells or mean vector.
    true
        True cells or mean vector.
    expressed_mean
        Per-gene expression used to rank genes, e.g. the control mean; the ``n_top`` largest are used
        (ties broken by gene order).
    n_top
        Number of genes (all genes when there are fewer).

    Returns
    -------
    ``sqrt(sum((pred_mean - true_mean)[top] ** 2))``; NaN (or inf) when ``pred`` or ``true`` holds NaN or inf on
    the top genes.

    Raises
    ------
    ValueError
        If the lengths differ, ``n_top < 1``, or ``expressed_mean`` holds NaN or inf (the ranking would be
        arbitrary).

    Examples
    --------
    >>> import numpy as np
    >>> l2_top_expressed(np.array([3.0, 0.0, 9.0]), np.array([0.0, 4.0, 9.0]), expressed_mean=[5, 4, 1], n_top=2)
    5.0
    """
    p, t = as_mean(pred, name="pred"), as_mean(true, name="true")
    e = np.asarray(expressed_mean, dtype=np.float64).ravel()
    check_same_length(p, t, ("pred", "true"))
    check_same_length(e, t, ("expressed_mean", "true"))
    if not np.isfinite(e).all():
        msg = (
            f"expressed_mean holds {int((~np.isfinite(e)).sum())} NaN or inf value(s); expected a finite expression "
            "per gene to rank the genes by"
        )
        raise ValueError(msg)
    if n_top < 1:
        msg = f"n_top must be a positive integer, got {n_top}"
        raise ValueError(msg)
    top = np.argsort(-e, kind="stable")[:n_top]
    return float(np.linalg.norm((p - t)[top]))


def direction_accuracy(
    pred: ArrayLike | sparse.spmatrix,
    true: ArrayLike | sparse.spmatrix,
    ref: ArrayLike | sparse.spmatrix,
    *,
    genes: ArrayLike | None = None,
) -> float:
    """Share of genes whose predicted change (``pred_mean - ref``) has the sign of the true change.

    Genes with no true change are left out; a predicted change of 0 counts as wrong. "0" means at most
    ``1e-6 * max(1, max|ref|)`` in absolute value (float round-off, e.g. of a float32 control-mean prediction).

    Parameters
    ----------
    pred
        Predicted cells or mean vector.
    true
        True cells or mean vector.
    ref
        Reference cells or mean (usually the control mean).
    genes
        Gene indices or mask, typically the top-20 DE genes; ``None`` uses all genes.

    Returns
    -------
    A share in ``[0, 1]``; ``NaN`` when no selected gene changes, or when ``pred``, ``true`` or ``ref`` holds NaN or
    inf (on the selected genes; anywhere in ``ref``, which sets the tolerance).

    Examples
    --------
    >>> import numpy as np
    >>> direction_accuracy(np.array([1.0, -1.0, 1.0, 0.0]), np.array([2.0, 1.0, 3.0, -1.0]), np.zeros(4))
    0.5
    """
    dp, dt, tol = _deltas(pred, true, ref, genes)
    if not (np.isfinite(tol) and np.isfinite(dp).all() and np.isfinite(dt).all()):
        return float("nan")  # a NaN change is neither right nor wrong: it was counted as wrong, or left out
    keep = np.abs(dt) > tol
    if not keep.any():
        return float("nan")
    sp = np.where(np.abs(dp) > tol, np.sign(dp), 0.0)
    return float(np.mean(sp[keep] == np.sign(dt[keep])))


def pds(
    pred_deltas: ArrayLike,
    true_deltas: ArrayLike,
    *,
    target_gene_idx: ArrayLike | Sequence[int | Sequence[int]] | None = None,
) -> np.ndarray:
    """Perturbation discrimination score (cell-eval): does the prediction of perturbation ``i`` pick out ``i``.

    For each perturbation ``i`` the L1 distances ``d_ij = |pred_delta_i - true_delta_j|_1`` to all true deltas are
    computed (leaving out the target gene column(s) of perturbation ``i``, the same columns for every ``j``).
    ``rank_i`` is the number of other perturbations ``j != i`` strictly closer than the true one, plus half the
    number at exactly the same distance (ties). The score is ``1 - rank_i / N`` with ``N`` perturbations, so a
    perfect prediction scores 1, the worst ``1/N``, and a random one about ``0.5 + 1/(2N)``. Since ``ref`` cancels
    in the L1 distance, means may be passed instead of deltas (with the same reference on both sides).

    Parameters
    ----------
    pred_deltas
        Predicted changes, ``(n_perturbations x n_genes)``, row ``i`` = perturbation ``i``.
    true_deltas
        True changes, same shape and row order.
    target_gene_idx
        Per perturbation, the gene column to exclude (``-1`` for none), or a sequence of index lists (e.g. both
        targets of a combination). ``None`` excludes nothing.

    Returns
    -------
    Scores, shape ``(n_perturbations,)``; ``NaN`` for a perturbation whose distances involve NaN or inf (row ``i``
    of ``pred_deltas``, or any row of ``true_deltas``: then every score).

    Examples
    --------
    >>> import numpy as np
    >>> true = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> pds(true, true)
    array([1., 1., 1.])
    """
    P = np.asarray(pred_deltas, dtype=np.float64)
    T = np.asarray(true_deltas, dtype=np.float64)
    if P.ndim != 2 or P.shape != T.shape:
        msg = f"pred_deltas and true_deltas must be 2-D with the same shape, got {P.shape} and {T.shape}"
        raise ValueError(msg)
    n = P.shape[0]
    if n == 0:
        return np.zeros(0)
    D = cdist(P, T, metric="cityblock")
    if target_gene_idx is not None:
        if len(target_gene_idx) != n:
            msg = f"target_gene_idx has {len(target_gene_idx)} entries, expected one per perturbation ({n})"
            raise ValueError(msg)
        for i, tg in enumerate(target_gene_idx):
            cols = np.atleast_1d(np.asarray(tg, dtype=np.int64))
            cols = np.unique(cols[cols >= 0])
            if cols.size == 0:
                continue
            if cols.max() >= P.shape[1]:
                msg = f"target_gene_idx[{i}] = {cols.max()} is out of range for {P.shape[1]} genes"
                raise ValueError(msg)
            with np.errstate(invalid="ignore"):  # inf - inf: NaN, reported below
                D[i] -= np.abs(P[i, cols][None, :] - T[:, cols]).sum(axis=1)
    own = np.diag(D)[:, None]
    # tolerance against round-off from the column subtraction
    tol = 1e-9 * np.maximum(1.0, np.abs(own))
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, reported below
        closer = (D < own - tol).sum(axis=1)
        ties = (np.abs(D - own) <= tol).sum(axis=1) - 1  # minus the perturbation itself
    rank = closer + 0.5 * ties
    scores = 1.0 - rank / n
    scores[~np.isfinite(D).all(axis=1)] = np.nan  # a NaN distance is neither closer nor farther: no rank
    return scores
