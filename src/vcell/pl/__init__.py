"""Plots (scanpy style): every function takes ``ax=None, show=None, save=None, return_fig=False``.

``save`` is a file path (saved at 150 dpi with a tight bounding box); ``show=None`` shows the figure only
in an interactive matplotlib backend and when ``return_fig`` is false; ``return_fig=True`` returns the
:class:`~matplotlib.figure.Figure`, otherwise the function returns ``None``.
"""

from __future__ import annotations

from ._benchmark import benchmark, benchmark_splits
from ._perturbations import dose_response, interaction_map, perturbation_embedding
from ._prediction import delta_heatmap, prediction_scatter
from ._uncertainty import uncertainty

__all__ = [
    "benchmark",
    "benchmark_splits",
    "delta_heatmap",
    "dose_response",
    "interaction_map",
    "perturbation_embedding",
    "prediction_scatter",
    "uncertainty",
]
