"""AnnData-aware models on scvi-tools' BaseModelClass."""

from ._base import PerturbationModel
from ._baseline import Baseline

__all__ = ["PerturbationModel", "Baseline"]
