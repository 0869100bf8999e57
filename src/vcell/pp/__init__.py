"""Preprocessing: canonical perturbation labels (:func:`harmonize`), normalisation and expression spaces."""

from ._harmonize import harmonize
from ._labels import canonical_label, is_combo, n_perturbations, split_perturbation
from ._normalize import log_normalize
from ._space import ExpressionSpace, expression_space, set_expression_space

__all__ = [
    "harmonize",
    "log_normalize",
    "split_perturbation",
    "canonical_label",
    "is_combo",
    "n_perturbations",
    "ExpressionSpace",
    "expression_space",
    "set_expression_space",
]
