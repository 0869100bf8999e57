"""Interaction metric: does a model flag the non-additive (epistatic) double perturbations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


def _rows(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        msg = f"{name} must be a 2-D (n_combos x n_genes) array of means or deltas, got shape {arr.shape}"
        raise ValueError(msg)
    if not np.isfinite(arr).all():
        # a NaN non-additivity is never above a threshold: that double was silently labelled additive
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        msg = f"{name} holds NaN or inf in {bad.size} combination(s) (rows {bad[:5].tolist()}); expected finite values"
        raise ValueError(msg)
    return arr


def nonadditivity(double: ArrayLike, additive: ArrayLike) -> np.ndarray:
    """L2 norm per combination of ``double - additive``: how far each double is from the additive expectation.

    Parameters
    ----------
    double
        ``(n_combos x n_genes)`` means (or deltas) of the doubles.
    additive
        The additive expectation in the same space and row order (e.g. ``control + delta_A + delta_B``).

    Returns
    -------
    ``(n_combos,)`` non-negative norms.

    Raises
    ------
    ValueError
        If the shapes differ or an input holds NaN or inf.

    Examples
    --------
    >>> nonadditivity([[3.0, 4.0]], [[0.0, 0.0]])
    array([5.])
    """
    d, a = _rows(double, "double"), _rows(additive, "additive")
    if d.shape != a.shape:
        msg = f"double and additive must have the same shape, got {d.shape} and {a.shape}"
        raise ValueError(msg)
    return np.linalg.norm(d - a, axis=1)


def interaction_auprc(
    pred_double: ArrayLike,
    additive: ArrayLike,
    true_double: ArrayLike | None = None,
    *,
    threshold: float | None = None,
    labels: ArrayLike | None = None,
) -> float:
    """Area under the precision-recall curve for finding the non-additive doubles (Ahlmann-Eltze 2025).

    The model's score of combination ``i`` is its predicted non-additivity ``|pred_i - additive_i|_2``. The label is
    whether the true non-additivity ``|true_i - additive_i|_2`` exceeds ``threshold``. The default threshold is the
    **median** true non-additivity over the combinations given (strictly above = non-additive), so half are
    positive and a model that predicts "no interaction" (all scores equal) scores 0.5, the prevalence. That
    default is relative; for an absolute call (e.g. non-additivity beyond the split-half noise of the true cells,
    which gives Norman's ~1/3 prevalence) pass ``threshold`` or boolean ``labels`` directly. Average precision is
    computed with :func:`sklearn.metrics.average_precision_score` (tied scores form one threshold).

    Parameters
    ----------
    pred_double
        Predicted means (or deltas) of the doubles, ``(n_combos x n_genes)``.
    additive
        Additive expectation in the same space and row order.
    true_double
        True means (or deltas); not needed when ``labels`` is given.
    threshold
        Non-additivity above which a double counts as interacting; ``None`` uses the median.
    labels
        Boolean ``(n_combos,)`` ground truth (overrides ``true_double`` and ``threshold``).

    Returns
    -------
    Average precision in ``[0, 1]``; ``NaN`` when no combination is labelled non-additive.

    Raises
    ------
    ValueError
        If the shapes differ, an input holds NaN or inf (naming it), or ``labels`` is not boolean.

    Examples
    --------
    >>> import numpy as np
    >>> add = np.zeros((4, 2))
    >>> true = np.array([[0.0, 0.1], [2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    >>> interaction_auprc(true, add, true)
    1.0
    """
    from sklearn.metrics import average_precision_score

    additive = _rows(additive, "additive")
    scores = nonadditivity(_rows(pred_double, "pred_double"), additive)
    if labels is not None:
        y = np.asarray(labels)
        if y.dtype != bool:
            msg = f"labels must be a boolean array, got dtype {y.dtype}"
            raise ValueError(msg)
        y = y.ravel()
    else:
        if true_double is None:
            msg = "pass true_double (with an optional threshold) or boolean labels"
            raise ValueError(msg)
        truth = nonadditivity(_rows(true_double, "true_double"), additive)
        thr = float(np.median(truth)) if threshold is None else float(threshold)
        y = truth > thr
    if y.shape[0] != scores.shape[0]:
        msg = f"labels have {y.shape[0]} entries but there are {scores.shape[0]} combinations"
        raise ValueError(msg)
    if not y.any():
        return float("nan")
    return float(average_precision_score(y.astype(int), scores))
