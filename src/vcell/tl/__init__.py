"""Tools: counterfactual prediction of perturbation responses, and sampling from generative models."""

from ._predict import predict_perturbation
from ._sample import sample_perturbation

__all__ = ["predict_perturbation", "sample_perturbation"]
