"""Data layer: registry on scvi-tools' AnnDataManager, perturbation vocabulary, control pairing."""

from vcell._constants import CONTROL, DOSE_COL, N_PERT_COL, PERT_COL, REGISTRY_KEYS

from ._datamodule import PairedDataModule, pair_controls
from ._registry import (
    context_labels,
    control_mask,
    registered_conditions,
    setup_perturbation_anndata,
    vcell_state,
)
from ._vocab import PerturbationVocab

__all__ = [
    "PerturbationVocab",
    "PairedDataModule",
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
