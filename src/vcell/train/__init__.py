"""Lightning training plans for vcell's modules, and the Trainer run they share."""

from ._fit import BestWeights, as_callback, fit
from ._plan import TrainingPlan

__all__ = ["TrainingPlan", "fit", "BestWeights", "as_callback"]
