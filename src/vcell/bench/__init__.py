"""Benchmarks: OOD splits, the leakage guard, the runner over models x splits x seeds, and the cell-eval export."""

from ._export import export_cell_eval
from ._leakage import check_leakage
from ._run import BASELINES, BenchmarkResult, ModelSpec, PredictionRequest, Predictor, run, summarize
from ._split import SPLIT_KINDS, split

__all__ = [
    "SPLIT_KINDS",
    "BASELINES",
    "BenchmarkResult",
    "ModelSpec",
    "PredictionRequest",
    "Predictor",
    "check_leakage",
    "export_cell_eval",
    "run",
    "split",
    "summarize",
]
