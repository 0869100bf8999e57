"""Data layer: registry on scvi-tools' AnnDataManager, perturbation vocabulary, control pairing, chunked statistics."""

from vcell._constants import CONTROL, DOSE_COL, N_PERT_COL, PERT_COL, REGISTRY_KEYS

from ._chunked import (
    check_expression,
    check_finite_nonnegative,
    fit_pca_streamed,
    gene_mean_var,
    group_means,
    group_sums,
    is_count_matrix,
    iter_row_blocks,
    library_sizes,
    log1p_cp10k_block,
)
from ._datamodule import pair_controls
from ._loader import CellBatches, Lookup, Pairs, RowReader, take_rows
from ._registry import (
    context_labels,
    control_mask,
    registered_conditions,
    setup_perturbation_anndata,
    vcell_state,
)
from ._vocab import PerturbationVocab

__all__ = [
    "CellBatches",
    "Lookup",
    "Pairs",
    "RowReader",
    "take_rows",
    "iter_row_blocks",
    "library_sizes",
    "check_finite_nonnegative",
    "is_count_matrix",
    "check_expression",
    "log1p_cp10k_block",
    "group_sums",
    "group_means",
    "gene_mean_var",
    "fit_pca_streamed",
    "PerturbationVocab",
    "pair_controls",
    "context_labels",
    "control_mask",
    "registered_conditions",
    "setup_perturbation_anndata",
    "vcell_state",
    "REGISTRY_KEYS",
    "CONTROL",
    "PERT_COL",
    "DOSE_COL",
    "N_PERT_COL",
]
