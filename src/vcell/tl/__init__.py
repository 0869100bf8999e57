"""Tools: counterfactual prediction of perturbation responses."""

from ._predict import predict_perturbation

__all__ = ["predict_perturbation"]
