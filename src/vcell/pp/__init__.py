"""Preprocessing: canonical perturbation labels (:func:`harmonize`) and normalisation."""

from ._harmonize import harmonize
from ._labels import canonical_label, is_combo, n_perturbations, split_perturbation
from ._normalize import log_normalize

__all__ = ["harmonize", "log_normalize", "split_perturbation", "canonical_label", "is_combo", "n_perturbations"]
