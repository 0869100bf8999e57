"""Systema's perturbed-centroid reference of a split, from its training cells only."""

from __future__ import annotations

from typing import Any

import numpy as np

from vcell._constants import CONTROL


def training_perturbed_centroid(
    X: Any,
    cond: np.ndarray,
    dose: np.ndarray,
    is_train: np.ndarray,
    transform: str | None,
) -> np.ndarray | None:
    """Mean over the training perturbations of each one's mean expression (Systema, Viñas Torné et al. 2025).

    The conditions are the perturbed ``(perturbation, dose)`` pairs with training cells (``is_train``: the train and
    val cells every model is fitted on); each condition's mean is read from ``X`` in row blocks (``transform``
    applied to each block, as the metrics' expression) and the centroid is the unweighted mean of those means (each
    condition counts once, whatever its number of cells). No held-out (test) cell enters it. ``None`` when no
    perturbed cell trains.
    """
    from vcell.data import group_means
    from vcell.metrics import perturbed_centroid_reference

    cond = np.asarray(cond).astype(str)
    pert = np.asarray(is_train, dtype=bool) & (cond != CONTROL)
    if not pert.any():
        return None
    labels = np.where(pert, np.char.add(np.char.add(cond, "@"), np.asarray(dose, dtype=float).astype(str)), None)
    means = group_means(X, labels, transform=transform)
    return perturbed_centroid_reference(means.to_numpy())
