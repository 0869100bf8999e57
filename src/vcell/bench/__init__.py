"""Benchmarks: OOD splits, leakage guard, runner, stacked models and ensembles, and the cell-eval export."""

from ._export import export_cell_eval
from ._leakage import check_leakage
from ._run import BASELINES, BenchmarkResult, ModelSpec, PredictionRequest, Predictor, run, summarize
from ._split import SPLIT_KINDS, split
from ._stack import Ensemble, Stacked, convex_weights, pearson_delta_weights

__all__ = [
    "SPLIT_KINDS",
    "BASELINES",
    "BenchmarkResult",
    "Ensemble",
    "ModelSpec",
    "PredictionRequest",
    "Predictor",
    "Stacked",
    "check_leakage",
    "convex_weights",
    "pearson_delta_weights",
    "export_cell_eval",
    "run",
    "split",
    "summarize",
]
