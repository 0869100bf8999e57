"""Lightning training plans for vcell's modules."""

from ._plan import TrainingPlan

__all__ = ["TrainingPlan"]
