"""Small shared helpers: input validation, matrices, seeds. No heavy imports."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from ._settings import settings

if TYPE_CHECKING:
    from anndata import AnnData


def resolve_seed(seed: int | None) -> int:
    """Return ``seed``, or ``vcell.settings.seed`` when it is ``None``."""
    return int(settings.seed if seed is None else seed)


def check_obs_keys(adata: AnnData, keys: Iterable[str | None], *, what: str = "obs key") -> None:
    """Raise a :class:`KeyError` naming any key in ``keys`` that is not a column of ``adata.obs``."""
    for key in keys:
        if key is not None and key not in adata.obs.columns:
            cols = ", ".join(map(repr, list(adata.obs.columns)[:20]))
            msg = f"{what} {key!r} is not in adata.obs; available columns: {cols}"
            raise KeyError(msg)


def get_matrix(adata: AnnData, layer: str | None = None) -> np.ndarray | sparse.spmatrix:
    """Return ``adata.X`` or ``adata.layers[layer]``, with a clear error for a missing layer."""
    if layer is None:
        if adata.X is None:
            msg = "adata.X is None; pass layer= naming a layer that holds the expression matrix"
            raise ValueError(msg)
        return adata.X
    if layer not in adata.layers:
        msg = f"layer {layer!r} is not in adata.layers; available layers: {list(adata.layers.keys())}"
        raise KeyError(msg)
    return adata.layers[layer]


def to_dense(X: np.ndarray | sparse.spmatrix, dtype: type = np.float32) -> np.ndarray:
    """Dense ``numpy`` copy (or view) of a dense or sparse matrix."""
    if sparse.issparse(X):
        return np.asarray(X.toarray(), dtype=dtype)
    return np.asarray(X, dtype=dtype)


def check_finite_nonnegative(X: np.ndarray | sparse.spmatrix, *, name: str = "X") -> None:
    """Raise a :class:`ValueError` if ``X`` holds NaN/inf or negative values (counts were expected).

    Every value is checked, in row blocks (:func:`vcell.data.check_finite_nonnegative`); ``X`` may be backed.
    """
    from vcell.data._chunked import check_finite_nonnegative as _check

    _check(X, name=name)


def is_count_matrix(X: np.ndarray | sparse.spmatrix) -> bool:
    """Whether ``X`` looks like raw counts: non-negative integers, the largest above 20 (every value is read).

    See :func:`vcell.data.is_count_matrix`; ``X`` may be backed.
    """
    from vcell.data._chunked import is_count_matrix as _is_counts

    return _is_counts(X)


def log1p_cp10k(X: np.ndarray | sparse.spmatrix, *, target_sum: float = 1e4) -> np.ndarray:
    """``log1p`` of counts normalised to ``target_sum`` per cell, as a dense float32 array.

    This is the space in which vcell compares predictions (BENCHMARK.md: log1p(CP10k)).
    """
    if sparse.issparse(X):
        X = sparse.csr_matrix(X, dtype=np.float64)
        totals = np.asarray(X.sum(axis=1)).ravel()
        totals[totals == 0] = 1.0
        X = sparse.diags(target_sum / totals) @ X
        return np.log1p(X.toarray()).astype(np.float32)
    X = np.asarray(X, dtype=np.float64)
    totals = X.sum(axis=1, keepdims=True)
    totals[totals == 0] = 1.0
    return np.log1p(X / totals * target_sum).astype(np.float32)


def expression_for_eval(adata: AnnData, layer: str | None = None, *, counts: bool | None = None) -> np.ndarray:
    """Dense log1p(CP10k) expression of ``adata`` (normalising counts; passing log data through).

    Parameters
    ----------
    adata
        The data.
    layer
        Layer to read; ``None`` reads ``X``.
    counts
        Whether the matrix holds raw counts. ``None`` guesses with :func:`is_count_matrix`.
    """
    X = get_matrix(adata, layer)
    if counts is None:
        counts = is_count_matrix(X)
    if counts:
        check_finite_nonnegative(X, name=f"adata.layers[{layer!r}]" if layer else "adata.X")
        return log1p_cp10k(X)
    return to_dense(X)


def group_means(
    X: np.ndarray | sparse.spmatrix, labels: Sequence | pd.Series | np.ndarray, *, skipna: bool = False
) -> pd.DataFrame:
    """Mean of the rows of ``X`` per label: a DataFrame indexed by label (one column per feature).

    ``skipna=True`` (dense ``X``): NaN entries are left out of their column's mean (NaN where a label has none).
    """
    labels = pd.Series(np.asarray(labels)).astype("category")
    codes = labels.cat.codes.to_numpy()
    ind = sparse.csr_matrix(
        (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(labels.cat.categories), len(codes))
    )
    index = pd.Index(labels.cat.categories, name="label")
    if skipna and not sparse.issparse(X):
        X = np.asarray(X)
        finite = ~np.isnan(X)
        sums, counts = ind @ np.where(finite, X, 0.0), ind @ finite.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return pd.DataFrame(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), index=index)
    counts = np.asarray(ind.sum(axis=1)).ravel()
    sums = ind @ X
    sums = sums.toarray() if sparse.issparse(sums) else np.asarray(sums)
    return pd.DataFrame(sums / counts[:, None], index=index)


def check_var_names_match(reference: Sequence[str], adata: AnnData, *, what: str = "the model") -> None:
    """Raise a :class:`ValueError` if ``adata.var_names`` differ from ``reference`` (genes or order)."""
    ref = pd.Index(reference)
    if len(ref) == adata.n_vars and ref.equals(adata.var_names):
        return
    missing = ref.difference(adata.var_names)
    extra = adata.var_names.difference(ref)
    msg = (
        f"adata.var_names differ from the genes {what} was set up with: {len(ref)} expected, {adata.n_vars} given, "
        f"{len(missing)} missing (e.g. {list(missing[:5])}), {len(extra)} unexpected (e.g. {list(extra[:5])})"
    )
    if not len(missing) and not len(extra):
        msg = f"adata.var_names hold the genes {what} was set up with but in a different order; use adata[:, genes]"
    raise ValueError(msg)


def mudata_no_pull() -> AbstractContextManager[None]:
    """Context in which a new MuData keeps ``mdata.obs`` as given (no columns pulled from its modalities).

    mudata < 0.4 needs ``mudata.set_options(pull_on_update=False)`` (its default warned and pulled); mudata >= 0.4
    has ``mudata.settings.override`` and no longer pulls by default.
    """
    import mudata

    if hasattr(mudata, "set_options"):
        return mudata.set_options(pull_on_update=False)
    return mudata.settings.override(pull_on_update=False)
