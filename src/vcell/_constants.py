"""Names shared across vcell: canonical ``obs`` columns and data-registry keys."""

from __future__ import annotations

from typing import Final

#: canonical label of control cells after :func:`vcell.pp.harmonize`
CONTROL: Final = "control"
#: separator of combination perturbations in canonical labels (``"A+B"``, sorted)
COMBO_SEP: Final = "+"

#: ``obs`` columns written by :func:`vcell.pp.harmonize`
PERT_COL: Final = "vcell_perturbation"
N_PERT_COL: Final = "vcell_n_perturbations"
DOSE_COL: Final = "vcell_dose"


class _REGISTRY_KEYS:
    """Keys of the tensors a data loader yields (and ``module`` consumes)."""

    X_KEY: Final = "X"
    PERT_KEY: Final = "perturbation"  # integer code of the canonical condition label
    DOSE_KEY: Final = "dose"
    COVARIATES_KEY: Final = "covariates"  # categorical covariates (cell type, ...), one column each
    BATCH_KEY: Final = "batch"
    PERT_ENCODING_KEY: Final = "perturbation_encoding"  # dose-scaled multi-hot over single perturbations
    CONTROL_X_KEY: Final = "control_X"  # paired control cell of the same covariates
    SIZE_FACTOR_KEY: Final = "size_factor"


REGISTRY_KEYS = _REGISTRY_KEYS()

#: every ``vcell.model.Baseline`` method (``vcell.bench.BASELINES``: the four shown in every report)
BASELINE_METHODS = ("control", "mean", "additive", "linear", "interaction")
