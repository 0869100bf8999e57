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


def check_dose(dose: object, *, name: str = "dose") -> float:
    """``dose`` as a float; a :class:`ValueError` naming it unless it is a finite number above 0.

    Doses are positive amounts (a concentration, a multiplicity): 0, negative, NaN and infinite doses have no
    meaning for a perturbed cell, and models that take ``log(dose)`` or divide by it would answer with numbers
    that look right. Every ``dose=`` argument of a prediction goes through here.

    Examples
    --------
    >>> check_dose(10)
    10.0
    >>> check_dose(0.0)
    Traceback (most recent call last):
    ...
    ValueError: dose must be a finite number above 0 (a positive amount such as a concentration), got 0.0
    """
    if isinstance(dose, bool | str | bytes) or np.ndim(dose) != 0:
        msg = f"{name} must be one number above 0, got {dose!r} ({type(dose).__name__})"
        raise ValueError(msg)
    try:
        value = float(dose)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        msg = f"{name} must be a number above 0, got {dose!r} ({type(dose).__name__})"
        raise ValueError(msg) from None
    if not np.isfinite(value) or value <= 0:
        msg = f"{name} must be a finite number above 0 (a positive amount such as a concentration), got {dose!r}"
        raise ValueError(msg)
    return value


def check_positive_int(value: object, *, name: str, minimum: int = 1) -> int:
    """``value`` as an int; a :class:`ValueError` naming ``name`` unless it is an integer ``>= minimum``.

    Booleans and non-integral floats (``2.5``) are refused; ``3.0`` and numpy integers are accepted.
    """
    ok = not isinstance(value, bool | str | bytes) and np.ndim(value) == 0
    if ok:
        try:
            ok = float(value) == int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            ok = False
    if not ok or int(value) < minimum:  # type: ignore[arg-type]
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        msg = f"{name} must be {what}, got {value!r}"
        raise ValueError(msg)
    return int(value)  # type: ignore[arg-type]


def check_number(
    value: object, *, name: str, low: float | None = None, high: float | None = None, closed: str = "both"
) -> float:
    """``value`` as a finite float in ``[low, high]``; a :class:`ValueError` naming ``name`` otherwise.

    ``closed`` says which bounds are allowed: ``"both"``, ``"left"`` (``[low, high)``), ``"right"`` (``(low, high]``)
    or ``"neither"``; a ``None`` bound is open-ended.
    """
    ok = not isinstance(value, bool | str | bytes) and np.ndim(value) == 0
    x = np.nan
    if ok:
        try:
            x = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            ok = False
    ok = ok and bool(np.isfinite(x))
    left, right = closed in ("both", "left"), closed in ("both", "right")
    if ok and low is not None:
        ok = x >= low if left else x > low
    if ok and high is not None:
        ok = x <= high if right else x < high
    if not ok:
        if low is not None and high is not None:
            rng = f" in {'[' if left else '('}{low:g}, {high:g}{']' if right else ')'}"
        elif low is not None:
            rng = f" {'>=' if left else 'above'} {low:g}"
        elif high is not None:
            rng = f" {'<=' if right else 'below'} {high:g}"
        else:
            rng = ""
        msg = f"{name} must be a finite number{rng}, got {value!r}"
        raise ValueError(msg)
    return x


def check_shape(adata: AnnData, *, what: str) -> None:
    """Raise a :class:`ValueError` if ``adata`` has no cell or no gene (``what``: the function, for the message)."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        msg = (
            f"{what} got an AnnData with {adata.n_obs} cells and {adata.n_vars} genes; expected at least one cell and "
            "one gene (check the subsetting that made it)"
        )
        raise ValueError(msg)


def _duplicates(index: pd.Index, n: int = 5) -> str:
    """The values that ``index`` holds more than once, quoted, at most ``n`` of them."""
    dup = pd.unique(index[index.duplicated()].astype(str))
    more = f", ... ({len(dup)} in all)" if len(dup) > n else ""
    return ", ".join(map(repr, dup[:n])) + more


def check_unique_var_names(adata: AnnData) -> None:
    """Raise a :class:`ValueError` naming duplicated ``var_names`` (genes are matched by name)."""
    if not adata.var_names.is_unique:
        msg = (
            f"adata.var_names are not unique: {_duplicates(adata.var_names)} appear more than once; genes are matched "
            "by name, so make them unique (adata.var_names_make_unique()) or drop the duplicates"
        )
        raise ValueError(msg)


def check_unique_obs_names(adata: AnnData, names: Sequence[str] | None = None, *, what: str) -> None:
    """Raise a :class:`ValueError` naming ``obs_names`` that appear twice (among ``names`` when given).

    ``what`` says why the names must be unique (``"controls= given as obs names"``).
    """
    if adata.obs_names.is_unique:
        return
    dup = adata.obs_names[adata.obs_names.duplicated(keep=False)]
    if names is not None:
        dup = dup[dup.isin(pd.Index(np.asarray(names).astype(str)))]
        if not len(dup):
            return
    msg = (
        f"adata.obs_names are not unique ({_duplicates(dup)} appear more than once), so {what} is ambiguous; make them "
        "unique (adata.obs_names_make_unique()) or select cells by a boolean mask or integer indices"
    )
    raise ValueError(msg)


def check_no_missing(adata: AnnData, keys: Iterable[str | None], *, what: str) -> None:
    """Raise a :class:`ValueError` naming an ``obs`` column of ``keys`` with missing values (NaN, None) and their count."""
    for key in keys:
        if key is None:
            continue
        n = int(adata.obs[key].isna().sum())
        if n:
            msg = (
                f"{what} obs[{key!r}] has {n} cells with a missing value (NaN or None); every cell needs a category: "
                "give them a category of their own (e.g. 'unknown') or subset adata first"
            )
            raise ValueError(msg)


def check_writable(
    adata: AnnData,
    *,
    layers: Iterable[str] = (),
    obs: Iterable[str] = (),
    obsm: Iterable[str] = (),
    uns: Iterable[str] = (),
    overwrite: bool = False,
    protected_layers: Iterable[str | None] = (),
    what: str,
) -> None:
    """Refuse to overwrite what ``adata`` holds: a :class:`ValueError` naming each existing key ``what`` would write.

    Every vcell function that writes into the caller's AnnData (``key_added``) calls this before computing anything:
    an existing ``layers``/``obs``/``obsm``/``uns`` key is replaced only with ``overwrite=True``. A layer of
    ``protected_layers`` (the expression matrix a model was set up with) is never replaced, even then.
    """
    layers = list(layers)
    protected = sorted({str(k) for k in protected_layers if k is not None} & set(layers))
    if protected:
        msg = (
            f"{what} would write layer(s) {protected}, the expression matrix the model reads (its registered layer); "
            "this is never overwritten, even with overwrite=True: choose another key_added"
        )
        raise ValueError(msg)
    if overwrite:
        return
    taken = [f"layers[{k!r}]" for k in layers if k in adata.layers]
    taken += [f"obs[{k!r}]" for k in obs if k in adata.obs.columns]
    taken += [f"obsm[{k!r}]" for k in obsm if k in adata.obsm]
    taken += [f"uns[{k!r}]" for k in uns if k in adata.uns]
    if taken:
        msg = (
            f"{what} would overwrite adata.{', adata.'.join(taken)}, which already exist; pass overwrite=True to "
            "replace them, or choose another key_added"
        )
        raise ValueError(msg)


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


def in_memory(X: object) -> np.ndarray | sparse.spmatrix:
    """``X`` in memory: itself when a numpy array or SciPy sparse matrix, else read block by block (CSR if sparse).

    For a backed matrix (``read_h5ad(..., backed="r")``) given to a function whose output is a whole matrix anyway.
    """
    if isinstance(X, np.ndarray) or sparse.issparse(X):
        return X
    from vcell.data._chunked import iter_row_blocks

    blocks = [b for _, _, b in iter_row_blocks(X)]
    if not blocks:
        return np.zeros(X.shape, dtype=getattr(X, "dtype", np.float32))
    if sparse.issparse(blocks[0]):
        return sparse.vstack(blocks, format="csr")
    return np.vstack(blocks)


def to_dense(X: np.ndarray | sparse.spmatrix, dtype: type = np.float32) -> np.ndarray:
    """Dense ``numpy`` copy (or view) of a dense or sparse matrix (a backed one is read first)."""
    X = in_memory(X)
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
    """Whether ``X`` holds raw counts: every value a non-negative integer (every value is read).

    See :func:`vcell.data.is_count_matrix`; ``X`` may be backed.
    """
    from vcell.data._chunked import is_count_matrix as _is_counts

    return _is_counts(X)


def log1p_cp10k(X: np.ndarray | sparse.spmatrix, *, target_sum: float = 1e4) -> np.ndarray:
    """``log1p`` of counts normalised to ``target_sum`` per cell, as a dense float32 array.

    This is the space in which vcell compares predictions (BENCHMARK.md: log1p(CP10k)). A backed matrix is read first.
    """
    X = in_memory(X)
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


def expression_for_eval(
    adata: AnnData, layer: str | None = None, *, counts: bool | None = None, target_sum: float = 1e4
) -> np.ndarray:
    """Dense log1p(CP10k) expression of ``adata`` (normalising counts; passing log data through).

    Parameters
    ----------
    adata
        The data.
    layer
        Layer to read; ``None`` reads ``X``.
    counts
        Whether the matrix holds raw counts. ``None`` guesses with :func:`is_count_matrix`.
    target_sum
        Total each cell of counts is normalised to before ``log1p`` (1e4: log1p(CP10k)).
    """
    X = get_matrix(adata, layer)
    if counts is None:
        counts = is_count_matrix(X)
    if counts:
        check_finite_nonnegative(X, name=f"adata.layers[{layer!r}]" if layer else "adata.X")
        return log1p_cp10k(X, target_sum=target_sum)
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
    if len(ref) == adata.n_vars and ref.equals(adata.var_names) and adata.var_names.is_unique:
        return
    if adata.n_vars == 0:
        msg = f"adata has 0 genes; expected the {len(ref)} genes {what} was set up with"
        raise ValueError(msg)
    check_unique_var_names(adata)
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
