"""Registration of perturbation screens in scvi-tools' :class:`~scvi.data.AnnDataManager`.

Every vcell model's ``setup_anndata`` goes through :func:`setup_perturbation_anndata`, so all models read
the same fields under the same keys (``vcell._constants.REGISTRY_KEYS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from vcell._constants import CONTROL, DOSE_COL, PERT_COL, REGISTRY_KEYS
from vcell._utils import check_no_missing, check_obs_keys, check_shape, check_unique_var_names, get_matrix

from ._chunked import check_expression

if TYPE_CHECKING:
    from anndata import AnnData
    from scvi.data import AnnDataManager

#: key of the registry entry holding vcell's own setup facts
VCELL_STATE_KEY = "vcell_setup"


def context_labels(obs: pd.DataFrame, context_keys: Sequence[str]) -> np.ndarray:
    """Joint label of the context columns per cell (``"CD4T|batch1"``); ``"all"`` when there are none.

    Parameters
    ----------
    obs
        Cell annotations.
    context_keys
        Columns that define a context (covariates, batch).
    """
    if not context_keys:
        return np.full(len(obs), "all", dtype=object)
    sizes = [len(obs[k].cat.categories) + 1 for k in context_keys if isinstance(obs[k].dtype, pd.CategoricalDtype)]
    if len(sizes) == len(context_keys) and np.prod(np.asarray(sizes, dtype=float)) < 2**62:
        return _categorical_context_labels(obs, context_keys)
    return _joined_labels(obs, context_keys)


def _joined_labels(obs: pd.DataFrame, context_keys: Sequence[str]) -> np.ndarray:
    """Each cell's ``astype(str)`` labels of the context columns, joined by ``"|"``."""
    # a missing value reads "nan" on every pandas (pandas 3's astype(str) keeps it missing, pandas 2 writes "nan")
    cols = [obs[k].astype(str).to_numpy(dtype=object, na_value="nan") for k in context_keys]
    out = cols[0].astype(object)
    for c in cols[1:]:
        out = out + "|" + c
    return out


def _categorical_context_labels(obs: pd.DataFrame, context_keys: Sequence[str]) -> np.ndarray:
    """:func:`_joined_labels` of categorical columns, each distinct label built once and shared by its cells.

    The same values, without a new string object per cell and column (85 MB per million cells and column): the label
    of each combination of categories present is built by :func:`_joined_labels` from the first cell holding it.
    """
    joint = np.zeros(len(obs), dtype=np.int64)
    for k in context_keys:
        codes = obs[k].cat.codes.to_numpy().astype(np.int64) + 1  # a missing value (-1) is a combination of its own
        joint = joint * (len(obs[k].cat.categories) + 1) + codes
    _, first, inverse = np.unique(joint, return_index=True, return_inverse=True)
    return _joined_labels(obs.iloc[first], context_keys)[inverse.reshape(-1)]


def setup_perturbation_anndata(
    cls: Any,
    adata: AnnData,
    *,
    setup_method_args: dict,
    perturbation_key: str,
    control: str | Sequence[str],
    dose_key: str | None = None,
    covariate_keys: Sequence[str] = (),
    layer: str | None = None,
    batch_key: str | None = None,
    sep: str = "+",
    **kwargs: Any,
) -> None:
    """Harmonise labels and register a perturbation screen for the model class ``cls``.

    Parameters are those of :meth:`vcell.model.PerturbationModel.setup_anndata`, plus ``cls`` (the model
    class whose manager store receives the registration) and ``setup_method_args`` (from scvi-tools'
    ``_get_setup_method_args``).

    Sets the following fields
    -------------------------
    ``adata.obs['vcell_perturbation']``, ``['vcell_n_perturbations']``, ``['vcell_dose']``
        Canonical labels from :func:`vcell.pp.harmonize` (plus ``adata.uns['vcell_harmonize']``).
    ``adata.obs['_scvi_*']``, ``adata.uns['_scvi_uuid']``, ``adata.uns['_scvi_manager_uuid']``
        scvi-tools' registry bookkeeping; its vcell state (:func:`vcell_state`) records the expression spaces
        (:func:`registered_spaces`).
    """
    from scvi.data import AnnDataManager
    from scvi.data.fields import CategoricalJointObsField, CategoricalObsField, LayerField, NumericalObsField

    from vcell.pp._harmonize import _harmonize

    covariate_keys = [covariate_keys] if isinstance(covariate_keys, str) else list(covariate_keys or ())
    check_shape(adata, what="setup_anndata")
    check_unique_var_names(adata)
    check_obs_keys(adata, [perturbation_key], what="perturbation_key")
    check_obs_keys(adata, [dose_key], what="dose_key")
    check_obs_keys(adata, covariate_keys, what="covariate key")
    check_obs_keys(adata, [batch_key], what="batch_key")
    check_no_missing(adata, covariate_keys, what="covariate key")
    check_no_missing(adata, [batch_key], what="batch_key")
    # one pass over the matrix in row blocks, wherever it is held (memory, backed h5ad): nothing is densified
    counts = check_expression(get_matrix(adata, layer), name=f"adata.layers[{layer!r}]" if layer else "adata.X")

    if adata.is_view:
        adata._init_as_actual(adata.copy())
    # reported (INFO) only when it changes the canonical columns: data harmonised before is not reported twice
    _harmonize(
        adata, perturbation_key=perturbation_key, control=control, sep=sep, dose_key=dose_key, log_report="changed"
    )

    fields = [
        LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
        CategoricalObsField(REGISTRY_KEYS.PERT_KEY, PERT_COL),
        NumericalObsField(REGISTRY_KEYS.DOSE_KEY, DOSE_COL),
        CategoricalJointObsField(REGISTRY_KEYS.COVARIATES_KEY, covariate_keys),
        CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
    ]
    manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
    manager.register_fields(adata, **kwargs)
    manager.registry[VCELL_STATE_KEY] = {
        "counts": bool(counts),
        "context_keys": [*covariate_keys, *([batch_key] if batch_key else [])],
        **registered_spaces(adata, layer, counts=bool(counts), source_registry=kwargs.get("source_registry")),
    }
    cls.register_manager(manager)


#: keys of the vcell state that describe expression spaces (:func:`registered_spaces`)
SPACE_STATE_KEYS = ("space", "output_space", "median_library_size")


def registered_spaces(
    adata: AnnData, layer: str | None, *, counts: bool, source_registry: dict | None = None
) -> dict[str, Any]:
    """The expression spaces ``setup_anndata`` records in the vcell state of the registry.

    * ``space``: the registered matrix's space (:class:`vcell.pp.ExpressionSpace` as a dict): its record in
      ``adata.uns["vcell_spaces"]`` if any, else raw counts when every value is a non-negative integer, else the
      log1p space inferred from its values (:func:`vcell.pp.expression_space`). A record that contradicts the values
      (counts recorded for non-integer values, log1p for integers) is a ValueError.
    * ``median_library_size``: for counts, the median of the cells' non-zero library sizes (the target sum of
      scanpy's ``normalize_total``); else ``None``.
    * ``output_space``: the default space of predictions. Log data: their own space (the model predicts in it).
      Counts: the space of ``adata.X`` when ``X`` is not the registered matrix and holds log1p data of a known target
      sum (the scanpy setup: ``layer="counts"``, ``X`` from ``normalize_total`` and ``log1p``), so that predictions
      compare with ``X``; else log1p of the median library size (what ``normalize_total`` would give).

    With ``source_registry`` (a saved model being loaded) that holds these keys, they are taken from it: a model
    keeps the spaces of the data it was trained on.
    """
    from vcell.pp._space import ExpressionSpace, expression_space, infer_space, recorded_space

    source = (source_registry or {}).get(VCELL_STATE_KEY, {})
    if "space" in source:
        return {k: source.get(k) for k in SPACE_STATE_KEYS}
    X = get_matrix(adata, layer)
    where = f"adata.layers[{layer!r}]" if layer else "adata.X"
    space = recorded_space(adata, layer)
    if space is None:
        space = infer_space(X, counts=counts)
    elif (space.kind == "counts") != counts and space.kind != "unknown":
        held = "raw counts (every value a non-negative integer)" if counts else "non-integer values"
        msg = (
            f"{where} is recorded as {space} (adata.uns['vcell_spaces']) but holds {held}; fix the record with "
            "vcell.pp.set_expression_space(adata, layer=..., kind=..., overwrite=True) or register the right matrix"
        )
        raise ValueError(msg)
    median = None
    output = space
    if space.kind == "counts":
        from ._chunked import library_sizes

        sizes = library_sizes(X)
        sizes = sizes[sizes > 0]
        median = float(np.median(sizes)) if sizes.size else None
        x_space = expression_space(adata, None) if layer is not None and adata.X is not None else None
        if x_space is not None and x_space.known_log1p:
            t = float(x_space.target_sum)  # type: ignore[arg-type]
            near = median is not None and abs(t - median) <= 1e-3 * median
            output = ExpressionSpace("log1p", t, basis="median" if near else x_space.basis)
        elif median is not None:
            output = ExpressionSpace("log1p", median, basis="median")
        else:  # no cell has counts: nothing to take a median of
            output = ExpressionSpace.log1p_cp10k()
    return {"space": space.to_dict(), "output_space": output.to_dict(), "median_library_size": median}


def registered_conditions(manager: AnnDataManager) -> list[str]:
    """Canonical condition labels registered in ``manager`` (controls included).

    Parameters
    ----------
    manager
        scvi-tools' manager of a set-up AnnData.
    """
    state = manager.get_state_registry(REGISTRY_KEYS.PERT_KEY)
    return [str(c) for c in state.categorical_mapping]


def vcell_state(registry: dict) -> dict:
    """Return vcell's own setup facts stored in a registry (``counts``, ``context_keys``, the spaces).

    The spaces (``space``, ``output_space``, ``median_library_size``: :func:`registered_spaces`) are missing from
    registries saved before vcell recorded them.

    Parameters
    ----------
    registry
        A model's ``registry_`` (or an AnnDataManager's ``registry``).
    """
    return registry.get(VCELL_STATE_KEY, {"counts": True, "context_keys": []})


def control_mask(adata: AnnData) -> np.ndarray:
    """Boolean mask of control cells (needs :func:`vcell.pp.harmonize` to have run).

    Parameters
    ----------
    adata
        Harmonised data.
    """
    check_obs_keys(adata, [PERT_COL], what="canonical perturbation column (run vcell.pp.harmonize first)")
    return (adata.obs[PERT_COL].astype(str) == CONTROL).to_numpy()
