"""Benchmarks: OOD splits, the leakage guard, and the runner over models x splits x seeds."""

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
    "run",
    "split",
    "summarize",
]
