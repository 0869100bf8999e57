"""Statistics over all cells, read in row blocks: no matrix is ever densified whole.

Every statistic vcell needs over all cells (library sizes, input checks, group means of log1p(CP10k), per-gene
mean and variance) is computed here from :func:`iter_row_blocks`, which reads ``adata.X`` (or a layer) block by
block whatever holds it: a dense array, a SciPy CSR/CSC matrix, or a backed h5ad (``anndata.read_h5ad(path,
backed="r")``: anndata's ``CSRDataset``/``CSCDataset`` or an h5py dataset), read through anndata's own slicing.
A block has at most ``chunk_elements`` values (rows x genes; default ``vcell.settings.chunk_elements``), so the
memory a statistic needs is bounded by that budget plus its output, not by the number of cells.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from vcell._settings import logger, settings

Block = np.ndarray | sparse.csr_matrix
#: what is applied to each block of rows: nothing, log1p(CP10k) of counts, or a function of a block
Transform = Literal["log1p_cp10k"] | Callable[[Block], Block] | None

#: largest value of log-normalised expression: log1p of 1e6 counts per cell is 13.8 and log2(CPM + 1) at most 19.9, so a
#: non-integer matrix with larger values is neither counts nor log data (:func:`check_expression` refuses it)
LOG_MAX_THRESHOLD = 30.0


def _chunk_rows(n_vars: int, chunk_elements: int | None) -> int:
    budget = int(settings.chunk_elements if chunk_elements is None else chunk_elements)
    if budget < 1:
        msg = f"chunk_elements must be a positive number of values, got {budget}"
        raise ValueError(msg)
    return max(1, budget // max(int(n_vars), 1))


def _source_kind(X: Any) -> str:
    if isinstance(X, np.ndarray):
        return "dense"
    if sparse.issparse(X):
        return "sparse"
    from anndata.abc import CSCDataset, CSRDataset

    if isinstance(X, CSRDataset):
        return "backed_csr"
    if isinstance(X, CSCDataset):
        return "backed_csc"
    if hasattr(X, "shape") and hasattr(X, "__getitem__"):
        return "array_like"  # h5py/zarr datasets (a backed dense X), dask arrays, ...
    msg = f"cannot read rows of a {type(X).__name__}: expected a numpy array, a SciPy sparse matrix or a backed matrix"
    raise TypeError(msg)


def _as_block(part: Any) -> Block:
    """A dense ndarray or a ``csr_matrix`` of what slicing a matrix returned."""
    if hasattr(part, "compute"):  # dask
        part = part.compute()
    if sparse.issparse(part):
        return part if isinstance(part, sparse.csr_matrix) else sparse.csr_matrix(part)
    return np.asarray(part)


def _read_rows(X: Any, kind: str, rows: np.ndarray | slice, n_obs: int, chunk_elements: int | None) -> Block:
    """Rows ``rows`` (a slice, integer indices in any order, or a boolean mask of the rows) of ``X`` as one block.

    A mask of a backed CSR matrix is one read through anndata, which reads each run of consecutive rows of the mask
    as one contiguous slice (and pays its per-call overhead once).
    """
    if kind == "backed_csc":  # rows are the minor axis: read column blocks (CSC's major axis), keep these rows
        n_cols = X.shape[1]
        step = max(1, _chunk_rows(n_obs, chunk_elements))
        parts = [sparse.csc_matrix(X[:, c : min(c + step, n_cols)])[rows] for c in range(0, max(n_cols, 1), step)]
        return sparse.csr_matrix(sparse.hstack(parts, format="csr"))
    if isinstance(rows, slice) and kind == "sparse" and X.format == "csr":  # views of X's arrays: no copy
        lo, hi = X.indptr[rows.start], X.indptr[rows.stop]
        indptr = X.indptr[rows.start : rows.stop + 1] - lo
        return sparse.csr_matrix((X.data[lo:hi], X.indices[lo:hi], indptr), shape=(len(indptr) - 1, X.shape[1]))
    if isinstance(rows, slice) or kind in ("dense", "sparse"):
        return _as_block(X[rows])
    if rows.dtype == bool:
        if kind == "backed_csr":
            return _as_block(X[rows])
        rows = np.flatnonzero(rows)
    uniq, inverse = np.unique(rows, return_inverse=True)  # backed stores read increasing indices
    block = _as_block(X[uniq])
    return block if len(uniq) == len(rows) and np.array_equal(uniq, rows) else block[inverse]


def iter_row_blocks(
    X: Any, *, rows: Sequence[int] | np.ndarray | None = None, chunk_elements: int | None = None
) -> Iterator[tuple[int, int, Block]]:
    """Blocks of rows of a matrix, each at most ``chunk_elements`` values (rows x columns).

    Parameters
    ----------
    X
        Cells x genes: a dense array, a SciPy sparse matrix (any format), or a backed matrix (``adata.X`` of
        ``anndata.read_h5ad(path, backed="r")``: anndata's ``CSRDataset``/``CSCDataset`` or an h5py dataset; zarr
        and dask arrays are read the same way).
    rows
        Integer indices of the rows to read, in that order; ``None`` reads all rows.
    chunk_elements
        Most values in a block (rows x genes); ``None`` uses ``vcell.settings.chunk_elements``.

    Yields
    ------
    ``(start, stop, block)``: the block holds rows ``start:stop`` of ``X`` (of ``rows`` when given), as a dense
    array of ``X``'s dtype for dense input and a ``csr_matrix`` for sparse input. A backed CSC matrix is read by
    column blocks for every row block (correct and bounded in memory, but it reads the file once per block:
    store large matrices as CSR).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import sparse
    >>> X = sparse.csr_matrix(np.arange(12.0).reshape(4, 3))
    >>> [(start, stop, block.shape) for start, stop, block in iter_row_blocks(X, chunk_elements=6)]
    [(0, 2, (2, 3)), (2, 4, (2, 3))]
    """
    kind = _source_kind(X)
    if kind == "sparse" and X.format not in ("csr", "csc"):
        X = sparse.csr_matrix(X)
    elif kind == "dense" and isinstance(X, np.matrix):
        X = np.asarray(X)
    n_obs, n_vars = X.shape
    idx = None if rows is None else np.asarray(rows, dtype=np.int64).ravel()
    if idx is not None and idx.size and (idx.min() < -n_obs or idx.max() >= n_obs):
        msg = f"rows out of range for a matrix of {n_obs} rows"
        raise IndexError(msg)
    if idx is not None:
        idx = np.where(idx < 0, idx + n_obs, idx)
    n = n_obs if idx is None else idx.size
    step = _chunk_rows(n_vars, chunk_elements)
    if kind == "backed_csc" and n > step:
        logger.debug("backed CSC matrix: read once per block of %d rows (CSR is read once in all)", step)
    for start in range(0, n, step):
        stop = min(start + step, n)
        sel = slice(start, stop) if idx is None else idx[start:stop]
        block = _read_rows(X, kind, sel, n_obs, chunk_elements)
        if sparse.issparse(block) and block.format != "csr":
            block = sparse.csr_matrix(block)
        yield start, stop, block


def _values(block: Block) -> np.ndarray:
    return block.data if sparse.issparse(block) else block.ravel()


def log1p_cp10k_block(block: Block, *, target_sum: float = 1e4) -> Block:
    """``log1p`` of the rows of a block normalised to ``target_sum`` each: float32, sparse for sparse input.

    Row for row the values of :func:`vcell._utils.log1p_cp10k` (same operations in float64, then float32).

    Parameters
    ----------
    block
        Rows of counts (dense or CSR), whole rows: the library size is the row's sum.
    target_sum
        Total each row is scaled to.

    Examples
    --------
    >>> import numpy as np
    >>> log1p_cp10k_block(np.array([[1.0, 3.0], [0.0, 0.0]]), target_sum=4.0).tolist()
    [[0.6931471824645996, 1.3862943649291992], [0.0, 0.0]]
    """
    if sparse.issparse(block):
        B = sparse.csr_matrix(block)
        totals = np.asarray(B.sum(axis=1, dtype=np.float64)).ravel()
        totals[totals == 0] = 1.0
        data = B.data.astype(np.float64) * np.repeat(target_sum / totals, np.diff(B.indptr))
        np.log1p(data, out=data)
        return sparse.csr_matrix((data.astype(np.float32), B.indices, B.indptr), shape=B.shape)
    B = np.asarray(block, dtype=np.float64)
    totals = B.sum(axis=1, keepdims=True)
    totals[totals == 0] = 1.0
    return np.log1p(B / totals * target_sum).astype(np.float32)


def log1p_cp10k_rows(rows: np.ndarray, *, scaled: bool, name: str) -> np.ndarray:
    """log1p(CP10k) of dense count rows, float32, with the arithmetic of :func:`vcell._utils.log1p_cp10k`.

    The rows are checked first (finite, non-negative; ``name`` names the matrix in the error). ``scaled``: each value
    times ``1e4 / total`` (that function's sparse path) rather than ``value / total * 1e4`` (its dense path), so that
    rows read from a sparse (or dense) matrix get the same bits as the whole-matrix transform. The row transform of a
    model's :class:`~vcell.data.RowReader` (``vcell.model._rows.expression_reader``): it lives here so that a process
    started by ``strategy="ddp_spawn"`` imports only :mod:`vcell.data` when it unpickles a loader.

    Examples
    --------
    >>> import numpy as np
    >>> out = log1p_cp10k_rows(np.array([[1.0, 3.0]]), scaled=True, name="X")
    >>> out.dtype, [round(float(v), 4) for v in out[0]]
    (dtype('float32'), [7.8244, 8.9228])
    """
    check_finite_nonnegative(rows, name=name)
    B = np.asarray(rows, dtype=np.float64)
    totals = B.sum(axis=1, keepdims=True)
    totals[totals == 0] = 1.0
    B = B * (1e4 / totals) if scaled else B / totals * 1e4
    return np.log1p(B).astype(np.float32)


def _transform(block: Block, transform: Transform, target_sum: float) -> Block:
    if transform is None:
        return block
    if isinstance(transform, str) and transform == "log1p_cp10k":
        return log1p_cp10k_block(block, target_sum=target_sum)
    if callable(transform):
        return transform(block)
    msg = f"transform must be None, 'log1p_cp10k' or a function of a block, got {transform!r}"
    raise ValueError(msg)


def library_sizes(
    X: Any, *, rows: Sequence[int] | np.ndarray | None = None, chunk_elements: int | None = None
) -> np.ndarray:
    """Sum of each row (a cell's library size), float64, read in row blocks.

    Parameters
    ----------
    X
        Cells x genes (see :func:`iter_row_blocks`).
    rows
        Rows to read (in that order); ``None``: all.
    chunk_elements
        Most values read at once; ``None`` uses ``vcell.settings.chunk_elements``.

    Examples
    --------
    >>> import numpy as np
    >>> library_sizes(np.array([[1, 2], [3, 4], [0, 0]]), chunk_elements=2).tolist()
    [3.0, 7.0, 0.0]
    """
    n = X.shape[0] if rows is None else len(rows)
    out = np.zeros(n, dtype=np.float64)
    for start, stop, block in iter_row_blocks(X, rows=rows, chunk_elements=chunk_elements):
        out[start:stop] = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
    return out


def _first_bad_row(block: Block, bad: Callable[[np.ndarray], np.ndarray]) -> int:
    """Index (in ``block``) of the first row holding a value for which ``bad`` is true."""
    if sparse.issparse(block):
        pos = int(np.flatnonzero(bad(block.data))[0])
        return int(np.searchsorted(block.indptr, pos, side="right") - 1)
    return int(np.flatnonzero(bad(np.asarray(block)).any(axis=1))[0])


def _where(start: int, block: Block, bad: Callable[[np.ndarray], np.ndarray], rows: Any, row_names: Any) -> str:
    """`` (e.g. in cell 'c3', row 3)``: where the first bad value of ``block`` (rows ``start:``) is."""
    k = start + _first_bad_row(block, bad)
    row = int(rows[k]) if rows is not None else k
    name = f"cell {str(row_names[row])!r}, " if row_names is not None else ""
    return f" (e.g. in {name}row {row})"


def _not_finite(v: np.ndarray) -> np.ndarray:
    return ~np.isfinite(v)


def _negative(v: np.ndarray) -> np.ndarray:
    return v < 0


def check_finite_nonnegative(
    X: Any,
    *,
    name: str = "X",
    rows: Sequence[int] | np.ndarray | None = None,
    row_names: Sequence[str] | None = None,
    chunk_elements: int | None = None,
) -> None:
    """Raise a :class:`ValueError` if ``X`` holds NaN/inf or negative values (counts were expected).

    Every value (of ``rows``) is checked, block by block; NaN/inf is reported before negative values, with the first
    row holding one.

    Parameters
    ----------
    X
        Cells x genes (see :func:`iter_row_blocks`).
    name
        How the error message names ``X``.
    rows
        Rows to check (e.g. the cells a prediction starts from); ``None``: all.
    row_names
        Names of ``X``'s rows (``adata.obs_names``), to name the cell in the message.
    chunk_elements
        Most values read at once; ``None`` uses ``vcell.settings.chunk_elements``.

    Examples
    --------
    >>> import numpy as np
    >>> check_finite_nonnegative(np.array([[0.0, 2.0]]))
    >>> check_finite_nonnegative(np.array([[0.0, -2.0]]), name="adata.X")
    Traceback (most recent call last):
    ...
    ValueError: adata.X contains negative values (min -2, e.g. in row 0); expected non-negative counts
    """
    lowest, where = np.inf, ""
    idx = None if rows is None else np.asarray(rows, dtype=np.int64)
    for start, _, block in iter_row_blocks(X, rows=idx, chunk_elements=chunk_elements):
        vals = _values(block)
        if not vals.size:
            continue
        if not np.all(np.isfinite(vals)):
            at = _where(start, block, _not_finite, idx, row_names)
            msg = f"{name} contains NaN or infinite values{at}; expected finite non-negative counts"
            raise ValueError(msg)
        low = float(vals.min())
        if low < lowest:
            lowest = low
            if low < 0:
                where = _where(start, block, _negative, idx, row_names)[2:-1]
    if lowest < 0:
        msg = f"{name} contains negative values (min {lowest:.3g}, {where}); expected non-negative counts"
        raise ValueError(msg)


def is_count_matrix(X: Any, *, chunk_elements: int | None = None) -> bool:
    """Whether ``X`` holds raw counts: every value a non-negative integer.

    Every value is read, block by block (it stops at the first value that is not a non-negative integer). Whatever
    the largest count: a low-depth screen (no count above 20) is counts too. Log-normalised data are essentially
    never all-integer (``log1p`` of a non-zero count is irrational), so the only integer matrix this misreads is one
    of log data that are all 0. A matrix without stored values (sparse, all zero) counts as counts.

    Parameters
    ----------
    X
        Cells x genes (see :func:`iter_row_blocks`).
    chunk_elements
        Most values read at once; ``None`` uses ``vcell.settings.chunk_elements``.

    Examples
    --------
    >>> import numpy as np
    >>> is_count_matrix(np.array([[0, 3], [2, 1]])), is_count_matrix(np.array([[0.0, 0.7], [2.3, 1.0]]))
    (True, False)
    """
    for _, _, block in iter_row_blocks(X, chunk_elements=chunk_elements):
        vals = _values(block)
        if not vals.size:
            continue
        if not np.all(vals >= 0):  # NaN fails too
            return False
        if not np.issubdtype(vals.dtype, np.integer) and not np.all(np.abs(vals - np.round(vals)) < 1e-6):
            return False
    return True


def check_expression(X: Any, *, name: str = "X", chunk_elements: int | None = None) -> bool:
    """Check the registered matrix in one pass over ``X``: counts (``True``) or log-normalised data (``False``).

    The rule:

    * NaN, infinite or negative values: a :class:`ValueError` (:func:`check_finite_nonnegative`);
    * every value a non-negative integer: raw counts (:func:`is_count_matrix`), whatever the largest value;
    * else log-normalised expression (``log1p`` of normalised counts: scanpy's ``normalize_total`` + ``log1p``), whose
      values stay below ``LOG_MAX_THRESHOLD`` (30); a non-integer matrix with larger values is neither (normalised
      but not log-transformed, or non-integer counts such as ambient-corrected ones): a :class:`ValueError` naming
      the largest value. Register the raw counts (``layer=``), or log-transform the matrix (``sc.pp.log1p``), or
      round non-integer counts.

    Parameters
    ----------
    X
        Cells x genes (see :func:`iter_row_blocks`).
    name
        How the error message names ``X``.
    chunk_elements
        Most values read at once; ``None`` uses ``vcell.settings.chunk_elements``.

    Returns
    -------
    Whether ``X`` holds counts.

    Examples
    --------
    >>> import numpy as np
    >>> check_expression(np.array([[0, 3], [2, 1]])), check_expression(np.array([[0.0, 0.7], [2.3, 1.0]]))
    (True, False)
    """
    lowest, largest, integer = np.inf, -np.inf, True
    for start, _, block in iter_row_blocks(X, chunk_elements=chunk_elements):
        vals = _values(block)
        if not vals.size:
            continue
        if not np.all(np.isfinite(vals)):
            at = _where(start, block, _not_finite, None, None)
            msg = f"{name} contains NaN or infinite values{at}; expected finite non-negative counts or log data"
            raise ValueError(msg)
        lowest, largest = min(lowest, float(vals.min())), max(largest, float(vals.max()))
        if integer and not np.issubdtype(vals.dtype, np.integer):
            integer = bool(np.all(np.abs(vals - np.round(vals)) < 1e-6))
    if lowest < 0:
        msg = f"{name} contains negative values (min {lowest:.3g}); expected non-negative counts or log data"
        raise ValueError(msg)
    if not integer and largest > LOG_MAX_THRESHOLD:
        msg = (
            f"{name} holds non-integer values up to {largest:.4g}: neither raw counts (non-negative integers) nor "
            f"log-normalised expression (log1p values stay below {LOG_MAX_THRESHOLD:g}). Register the raw counts "
            "(layer=...), log-transform normalised data (scanpy.pp.log1p), or round non-integer counts"
        )
        raise ValueError(msg)
    return integer


def _design(labels: Any) -> tuple[sparse.csc_matrix, pd.Index]:
    """Indicator matrix (groups x cells, CSC) of the labels, and the groups (sorted); missing labels: no group."""
    cat = pd.Series(np.asarray(labels)).astype("category")
    codes = cat.cat.codes.to_numpy()
    keep = np.flatnonzero(codes >= 0)
    ind = sparse.csc_matrix(
        (np.ones(keep.size), (codes[keep], keep)), shape=(len(cat.cat.categories), len(codes)), dtype=np.float64
    )
    return ind, pd.Index(cat.cat.categories, name="label")


def group_sums(
    X: Any,
    weights: sparse.spmatrix | np.ndarray,
    *,
    transform: Transform = None,
    target_sum: float = 1e4,
    skipna: bool = False,
    chunk_elements: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``weights @ T(X)``, float64, read in row blocks; ``T`` is ``transform`` applied to each row.

    Parameters
    ----------
    X
        Cells x genes (see :func:`iter_row_blocks`).
    weights
        Groups x cells: each row a group's weight per cell (0: the cell is not in the group).
    transform
        ``None`` (the values of ``X``), ``"log1p_cp10k"`` (log1p of each row scaled to ``target_sum``) or a function
        of a block (dense or CSR rows) returning a block.
    target_sum
        Row total of ``"log1p_cp10k"``.
    skipna
        Leave NaN values out of the sums (and of the counts).
    chunk_elements
        Most values read at once; ``None`` uses ``vcell.settings.chunk_elements``.

    Returns
    -------
    ``(sums, counts)``, both groups x genes: the weighted sums, and the number of cells with a non-zero weight in
    each group whose value was used (all of the group's cells unless ``skipna`` left NaN out; without ``skipna`` a
    read-only broadcast of the group sizes).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[1.0, 2.0], [3.0, np.nan], [5.0, 6.0]])
    >>> sums, counts = group_sums(X, np.array([[1.0, 1.0, 0.0], [0.0, 0.5, 2.0]]), skipna=True)
    >>> sums.tolist(), counts.tolist()
    ([[4.0, 2.0], [11.5, 12.0]], [[2.0, 1.0], [2.0, 1.0]])
    """
    W = sparse.csc_matrix(weights, dtype=np.float64)
    if W.shape[1] != X.shape[0]:
        msg = f"weights have {W.shape[1]} columns, X has {X.shape[0]} rows"
        raise ValueError(msg)
    member = W.copy()
    member.data = (member.data != 0).astype(np.float64)
    n_groups, n_vars = W.shape[0], X.shape[1]
    sums = np.zeros((n_groups, n_vars), dtype=np.float64)
    counts = np.broadcast_to(np.asarray(member.sum(axis=1), dtype=np.float64).reshape(-1, 1), (n_groups, n_vars))
    if skipna:  # per gene: NaN values are taken off below
        counts = counts.copy()
    used = np.flatnonzero(np.diff(W.indptr) > 0)  # cells in some group
    if used.size == 0:
        return sums, counts
    if used.size > X.shape[0] // 2:  # read contiguous blocks (cheapest for backed data), skipping no cell
        used = None
    for start, stop, block in iter_row_blocks(X, rows=used, chunk_elements=chunk_elements):
        cells = slice(start, stop) if used is None else used[start:stop]
        E = _transform(block, transform, target_sum)
        Wb = W[:, cells]
        if skipna:
            if sparse.issparse(E):
                bad = E.copy()
                bad.data = (~np.isfinite(E.data)).astype(np.float64)
                E = E.copy()
                E.data = np.where(np.isfinite(E.data), E.data, 0.0)
                counts -= np.asarray((member[:, cells] @ bad).toarray())
            else:
                finite = np.isfinite(E)
                counts -= member[:, cells] @ (~finite).astype(np.float64)
                E = np.where(finite, E, 0.0)
        part = Wb @ E
        sums += part.toarray() if sparse.issparse(part) else np.asarray(part)
    return sums, counts


def group_means(
    X: Any,
    labels: Sequence | pd.Series | np.ndarray,
    *,
    transform: Transform = None,
    target_sum: float = 1e4,
    skipna: bool = False,
    chunk_elements: int | None = None,
) -> pd.DataFrame:
    """Mean of the (transformed) rows of ``X`` per label, read in row blocks.

    Equal to :func:`vcell._utils.group_means` of the whole matrix (of ``vcell._utils.log1p_cp10k(X)`` with
    ``transform="log1p_cp10k"``) up to the order of float64 summation.

    Parameters
    ----------
    X
        Cells x genes (see :func:`iter_row_blocks`).
    labels
        Label per cell; a missing label (``None``/NaN) leaves the cell out.
    transform
        ``None`` (the values of ``X``), ``"log1p_cp10k"`` or a function of a block returning a block.
    target_sum
        Row total of ``"log1p_cp10k"``.
    skipna
        Leave NaN values out of their column's mean (NaN where a label has none).
    chunk_elements
        Most values read at once; ``None`` uses ``vcell.settings.chunk_elements``.

    Returns
    -------
    DataFrame indexed by label (sorted), one column per gene.

    Examples
    --------
    >>> import numpy as np
    >>> group_means(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), ["b", "a", "b"], chunk_elements=2)
           0    1
    label
    a      3.0  4.0
    b      3.0  4.0
    """
    ind, index = _design(labels)
    if ind.shape[1] != X.shape[0]:
        msg = f"labels have {ind.shape[1]} entries, X has {X.shape[0]} rows"
        raise ValueError(msg)
    sums, counts = group_sums(
        X, ind, transform=transform, target_sum=target_sum, skipna=skipna, chunk_elements=chunk_elements
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan) if skipna else sums / counts
    return pd.DataFrame(means, index=index)


def gene_mean_var(
    X: Any,
    *,
    transform: Transform = None,
    target_sum: float = 1e4,
    ddof: int = 0,
    rows: Sequence[int] | np.ndarray | None = None,
    chunk_elements: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of every gene (column) over cells, float64, merged block by block (Chan et al.).

    Parameters
    ----------
    X
        Cells x genes (see :func:`iter_row_blocks`).
    transform
        ``None`` (the values of ``X``), ``"log1p_cp10k"`` or a function of a block returning a block.
    target_sum
        Row total of ``"log1p_cp10k"``.
    ddof
        Delta degrees of freedom of the variance (``numpy.var``'s).
    rows
        Cells to use; ``None``: all.
    chunk_elements
        Most values read at once; ``None`` uses ``vcell.settings.chunk_elements``.

    Examples
    --------
    >>> import numpy as np
    >>> mean, var = gene_mean_var(np.array([[1.0, 0.0], [3.0, 0.0], [5.0, 6.0]]), chunk_elements=2)
    >>> mean.tolist(), var.tolist()
    ([3.0, 2.0], [2.6666666666666665, 8.0])
    """
    n_vars = X.shape[1]
    n, mean, m2 = 0, np.zeros(n_vars), np.zeros(n_vars)
    for _, _, block in iter_row_blocks(X, rows=rows, chunk_elements=chunk_elements):
        E = _transform(block, transform, target_sum)
        nb = E.shape[0]
        if sparse.issparse(E):
            E = sparse.csr_matrix(E, dtype=np.float64)
            mb = np.asarray(E.sum(axis=0)).ravel() / nb
            nnz = np.bincount(E.indices, minlength=n_vars)  # stored values; the others are zeros
            m2b = np.bincount(E.indices, weights=(E.data - mb[E.indices]) ** 2, minlength=n_vars)
            m2b += (nb - nnz) * mb**2
        else:
            E = np.asarray(E, dtype=np.float64)
            mb = E.mean(axis=0)
            m2b = ((E - mb) ** 2).sum(axis=0)
        total = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta**2 * (n * nb / total)
        n = total
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.maximum(m2, 0.0) / (n - ddof) if n - ddof > 0 else np.full(n_vars, np.nan)
    return mean, var


#: most genes for which :func:`fit_pca_streamed` accumulates the exact gene x gene covariance (more: randomized)
PCA_COVARIANCE_MAX_GENES = 5000
#: share of stored values of a sparse block up to which its Gram matrix is a sparse product (above: dense BLAS)
_SPARSE_GRAM_DENSITY = 0.03


def _float64(E: Block) -> Block:
    return sparse.csr_matrix(E, dtype=np.float64) if sparse.issparse(E) else np.asarray(E, dtype=np.float64)


def _flip_signs(components: np.ndarray) -> np.ndarray:
    """Components with the largest absolute entry of each row made positive (scikit-learn's ``svd_flip``).

    The sign convention of :func:`fit_pca_streamed` and :func:`vcell.metrics.fit_pca` (scikit-learn >= 1.5's
    ``svd_flip(u_based_decision=False)``): the same subspace gives the same components whatever solver found it.

    >>> import numpy as np
    >>> _flip_signs(np.array([[0.6, -0.8], [0.8, 0.6]])).tolist()
    [[-0.6, 0.8], [0.8, 0.6]]
    """
    C = np.asarray(components, dtype=np.float64)
    if C.size == 0:
        return C.copy()
    signs = np.sign(C[np.arange(C.shape[0]), np.argmax(np.abs(C), axis=1)])
    signs[signs == 0] = 1.0
    return C * signs[:, None]


def _pca_passes(X: Any, rows: np.ndarray | None, transform: Any, target_sum: float, chunk_elements: int | None):
    """Blocks of ``T(X)`` (rows ``rows``) as float64, dense or CSR: one pass over the matrix per call."""
    for _, _, block in iter_row_blocks(X, rows=rows, chunk_elements=chunk_elements):
        yield _float64(_transform(block, transform, target_sum))


def _gram(X, rows, transform, target_sum, chunk_elements) -> tuple[np.ndarray, np.ndarray, int]:
    """``(T(X)^T T(X), column sums, n_rows)`` in float64, one block at a time."""
    n_vars = X.shape[1]
    G, s, n = np.zeros((n_vars, n_vars)), np.zeros(n_vars), 0
    for E in _pca_passes(X, rows, transform, target_sum, chunk_elements):
        n += E.shape[0]
        if sparse.issparse(E):
            s += np.asarray(E.sum(axis=0)).ravel()
            if E.nnz <= _SPARSE_GRAM_DENSITY * E.shape[0] * n_vars:
                G += (E.T @ E).toarray()
            else:  # one block dense: BLAS (syrk) beats the sparse product with its near-dense output
                D = E.toarray()
                G += D.T @ D
        else:
            s += E.sum(axis=0)
            G += E.T @ E
    return G, s, n


def _cov_times(X, Q, rows, transform, target_sum, chunk_elements) -> tuple[np.ndarray, np.ndarray, int]:
    """``(T(X)^T T(X) Q, column sums, n_rows)`` in float64, one block at a time (``Q``: genes x k)."""
    Z, s, n = np.zeros_like(Q), np.zeros(X.shape[1]), 0
    for E in _pca_passes(X, rows, transform, target_sum, chunk_elements):
        n += E.shape[0]
        s += np.asarray(E.sum(axis=0)).ravel()
        Z += np.asarray(E.T @ np.asarray(E @ Q))
    return Z, s, n


def fit_pca_streamed(
    X: Any,
    n_comps: int,
    *,
    rows: Sequence[int] | np.ndarray | None = None,
    transform: Transform = None,
    target_sum: float = 1e4,
    method: Literal["auto", "covariance", "randomized"] = "auto",
    n_iter: int = 8,
    seed: int | None = None,
    chunk_elements: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the (transformed) rows of a matrix, read in row blocks: no more than one block is ever dense.

    ``"covariance"`` accumulates ``T(X)^T T(X)`` and the column sums over blocks (float64, ``n_genes^2`` values),
    centres it into the covariance matrix and takes its top eigenvectors: exact, the same computation as
    scikit-learn's ``PCA(svd_solver="covariance_eigh")`` and equal to its other exact solvers up to round-off.
    ``"randomized"`` runs subspace iteration on the covariance operator (a seeded Gaussian start of
    ``n_comps + max(10, n_comps)`` columns, ``n_iter`` streamed passes, each ``T(X)^T (T(X) Q)`` centred on the fly,
    then Rayleigh-Ritz): memory ``n_genes x (2 n_comps + 10)``, ``n_iter + 1`` reads of the matrix. ``"auto"`` is
    ``"covariance"`` up to :data:`PCA_COVARIANCE_MAX_GENES` genes and ``"randomized"`` above.

    Parameters
    ----------
    X
        Cells x genes (see :func:`iter_row_blocks`): dense, SciPy sparse, or a backed matrix.
    n_comps
        Number of components, capped at ``min(n_cells, n_genes)``.
    rows
        Cells to use (integer indices); ``None``: all.
    transform
        Applied to each block before it is used: ``None`` (the values of ``X``), ``"log1p_cp10k"``
        (:func:`log1p_cp10k_block`, for counts) or a function of a block (dense or CSR rows) returning a block.
    target_sum
        Row total of ``"log1p_cp10k"``.
    method
        ``"auto"``, ``"covariance"`` or ``"randomized"`` (see above).
    n_iter
        Passes of subspace iteration of ``"randomized"``.
    seed
        Seed of the randomized start; defaults to ``vcell.settings.seed`` (``"covariance"`` draws nothing).
    chunk_elements
        Most values read at once; ``None`` uses ``vcell.settings.chunk_elements``.

    Returns
    -------
    ``(components, mean)``: ``(n_comps, n_genes)`` orthonormal rows by decreasing variance, the largest absolute
    entry of each positive (scikit-learn's ``svd_flip``), and the gene means ``(n_genes,)``, both float64 (for
    :func:`vcell.metrics.pca_project`).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import sparse
    >>> X = sparse.csr_matrix(np.random.default_rng(0).poisson(1.0, size=(200, 12)).astype(np.float32))
    >>> comps, mean = fit_pca_streamed(X, 3, transform="log1p_cp10k", chunk_elements=240)
    >>> comps.shape, mean.shape, bool(np.allclose(comps @ comps.T, np.eye(3)))
    ((3, 12), (12,), True)
    """
    from vcell._utils import resolve_seed

    n_obs, n_vars = X.shape
    idx = None if rows is None else np.asarray(rows, dtype=np.int64).ravel()
    n = n_obs if idx is None else idx.size
    if n < 2 or n_vars < 1:
        msg = f"a PCA needs at least 2 cells and 1 gene, got {n} cells and {n_vars} genes"
        raise ValueError(msg)
    if int(n_comps) < 1:
        msg = f"n_comps must be a positive integer, got {n_comps}"
        raise ValueError(msg)
    if method not in ("auto", "covariance", "randomized"):
        msg = f"method must be 'auto', 'covariance' or 'randomized', got {method!r}"
        raise ValueError(msg)
    k = int(min(n_comps, n, n_vars))
    if method == "auto":
        method = "covariance" if n_vars <= PCA_COVARIANCE_MAX_GENES else "randomized"
    args = (idx, transform, target_sum, chunk_elements)
    if method == "covariance":
        G, s, n = _gram(X, *args)
        mean = s / n
        G -= n * np.outer(mean, mean)
        G /= n - 1
        if n_vars <= 2000:
            _, vecs = np.linalg.eigh(G)
            comps = vecs[:, ::-1][:, :k].T
        else:
            from scipy.linalg import eigh

            _, vecs = eigh(G, subset_by_index=[n_vars - k, n_vars - 1])
            comps = vecs[:, ::-1].T
        return _flip_signs(comps), mean
    if n_iter < 0:
        msg = f"n_iter must be a non-negative integer, got {n_iter}"
        raise ValueError(msg)
    rng = np.random.default_rng(resolve_seed(seed))
    width = min(n_vars, k + max(10, k))
    Q, _ = np.linalg.qr(rng.standard_normal((n_vars, width)))
    for i in range(n_iter + 1):
        Z, s, n = _cov_times(X, Q, *args)
        mean = s / n
        Z -= n * np.outer(mean, mean @ Q)  # centred: (X - 1 mean^T)^T (X - 1 mean^T) Q
        if i < n_iter:
            Q, _ = np.linalg.qr(Z)
    M = Q.T @ Z
    vals, vecs = np.linalg.eigh((M + M.T) / 2.0)
    comps = (Q @ vecs[:, ::-1][:, :k]).T
    return _flip_signs(comps), mean
