"""Metrics of perturbation-response predictions (definitions in the benchmark protocol).

Pure functions take numpy arrays of log1p(CP10k) expression (cells x genes, or mean vectors) and return floats or
arrays; :func:`evaluate` runs them all on AnnData objects and returns a tidy table.
"""

from ._ceiling import ceiling
from ._de import de_genes_fdr, de_overlap, top_de_genes
from ._delta import (
    direction_accuracy,
    l2_top_expressed,
    mae,
    mse_top_de,
    mse_top_de_normalized,
    pds,
    pearson_delta,
    perturbed_centroid_reference,
)
from ._distribution import diversity, energy_distance, fit_pca, mmd, pca_project
from ._evaluate import METRICS, evaluate
from ._interaction import interaction_auprc, nonadditivity
from ._pathway import PATHWAY_METHODS, pathway_agreement
from ._uncertainty import interval_coverage, predictive_interval

__all__ = [
    "METRICS",
    "PATHWAY_METHODS",
    "ceiling",
    "de_genes_fdr",
    "de_overlap",
    "direction_accuracy",
    "diversity",
    "energy_distance",
    "evaluate",
    "fit_pca",
    "interaction_auprc",
    "interval_coverage",
    "l2_top_expressed",
    "mae",
    "mmd",
    "mse_top_de",
    "mse_top_de_normalized",
    "nonadditivity",
    "pathway_agreement",
    "pca_project",
    "pds",
    "pearson_delta",
    "perturbed_centroid_reference",
    "predictive_interval",
    "top_de_genes",
]
