"""``vcell.pp.log_normalize``: log1p(CP10k) expression layer."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from vcell._utils import (
    check_finite_nonnegative,
    check_number,
    check_writable,
    get_matrix,
    in_memory,
    is_count_matrix,
    log1p_cp10k,
)

from ._space import ExpressionSpace, record_space

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("vcell")


def _log1p_cp10k_sparse(X: sparse.spmatrix, target_sum: float) -> sparse.csr_matrix:
    """Sparse (CSR, float32) twin of :func:`vcell._utils.log1p_cp10k`: zeros stay zeros under log1p."""
    X = sparse.csr_matrix(X, dtype=np.float64, copy=True)
    totals = np.asarray(X.sum(axis=1)).ravel()
    totals[totals == 0] = 1.0
    X.data *= np.repeat(target_sum / totals, np.diff(X.indptr))
    np.log1p(X.data, out=X.data)
    return X.astype(np.float32)


def log_normalize(
    adata: AnnData,
    *,
    layer: str | None = None,
    key_added: str = "log1p_cp10k",
    target_sum: float = 1e4,
    copy: bool = False,
    overwrite: bool = False,
) -> AnnData | None:
    """Store ``log1p`` of counts normalised to ``target_sum`` per cell (log1p(CP10k)) in a layer.

    This is the expression space in which vcell compares predictions (see BENCHMARK.md). ``X`` (or ``layer``)
    is left as it is. Dense input gives a dense float32 layer (via :func:`vcell._utils.log1p_cp10k`);
    sparse input gives a sparse CSR float32 layer with the same values. Cells with no counts stay zero.

    Parameters
    ----------
    adata
        Annotated data matrix with raw counts.
    layer
        Layer holding the counts; ``None`` uses ``X``.
    key_added
        Name of the layer to write.
    target_sum
        Total counts per cell after normalisation.
    copy
        Return a copy instead of writing into ``adata``.
    overwrite
        Replace ``adata.layers[key_added]`` if it exists; without it an existing layer is a ValueError naming it.
        ``key_added`` equal to ``layer`` (the counts read) is always a ValueError.

    Returns
    -------
    The copy with the new layer if ``copy=True``, else ``None``.

    Sets the following fields:

    ``adata.layers[key_added]`` : float32, dense or CSR like the input
        log1p(CP10k) expression.
    ``adata.uns["vcell_spaces"][key_added]``
        Its expression space (log1p of ``target_sum``; :func:`vcell.pp.expression_space`), which stays known after
        the genes are subset (their rows then no longer sum to ``target_sum``).

    Raises
    ------
    KeyError
        If ``layer`` is not in ``adata.layers``.
    ValueError
        If the counts hold NaN, infinite or negative values, ``target_sum`` is not positive, or
        ``adata.layers[key_added]`` exists (without ``overwrite=True``) or is the layer of counts read.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> adata = ad.AnnData(np.array([[25.0, 75.0], [0.0, 0.0]], dtype=np.float32))
    >>> log_normalize(adata)
    >>> np.round(adata.layers["log1p_cp10k"].astype(float), 3).tolist()
    [[7.824, 8.923], [0.0, 0.0]]
    """
    check_number(target_sum, name="target_sum", low=0.0, closed="neither")
    check_writable(adata, layers=[key_added], overwrite=overwrite, protected_layers=[layer], what="log_normalize")
    if copy:
        adata = adata.copy()
    elif adata.is_view:
        adata._init_as_actual(adata.copy())
    X = in_memory(get_matrix(adata, layer))  # a backed matrix is read (the layer written is in memory anyway)
    name = f"adata.layers[{layer!r}]" if layer else "adata.X"
    check_finite_nonnegative(X, name=name)
    if not is_count_matrix(X):
        logger.warning("%s does not hold raw counts (non-integer values); normalising it anyway", name)
    if sparse.issparse(X):
        out = _log1p_cp10k_sparse(X, target_sum)
    else:
        out = log1p_cp10k(X, target_sum=target_sum)
    adata.layers[key_added] = out
    record_space(adata, key_added, ExpressionSpace("log1p", target_sum))
    return adata if copy else None
