"""Row subsets of a backed AnnData written to disk block by block, opened backed again."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from ._chunked import _source_kind, iter_row_blocks

if TYPE_CHECKING:
    from anndata import AnnData


def backed_row_subset(adata: AnnData, rows: np.ndarray, path: str | Path) -> AnnData:
    """The rows ``rows`` of ``adata`` as a new backed AnnData whose ``X`` lives in the h5ad file ``path``.

    The slice of a backed AnnData that anndata's ``copy()`` makes is loaded whole into memory; this writes the
    selected rows of ``X`` to ``path`` in row blocks (:func:`iter_row_blocks`: at most
    ``vcell.settings.chunk_elements`` values at once; CSR stays CSR, CSC is written as CSR, dense stays dense),
    opens the file with ``anndata.read_h5ad(path, backed="r")`` and gives the result copies of the selected rows of
    ``obs``, ``obsm`` and the layers (in memory, as in any backed AnnData), of ``var``, ``varm`` and of ``uns``.
    The file holds only ``X`` and the names of cells and genes; the caller owns it (delete it when done, after
    closing the returned AnnData with ``.file.close()``).

    Parameters
    ----------
    adata
        An AnnData (backed or not; ``obsp``/``varp`` and ``raw`` are not carried over).
    rows
        Integer positions of the rows to keep, in that order.
    path
        The h5ad file to write (replaced if it exists).

    Returns
    -------
    The backed AnnData of those rows.

    Examples
    --------
    >>> import anndata as ad, numpy as np, tempfile, os
    >>> from scipy import sparse
    >>> a = ad.AnnData(sparse.random(6, 3, density=0.5, format="csr", dtype=np.float32, random_state=0))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     sub = backed_row_subset(a, np.array([4, 1]), os.path.join(d, "sub.h5ad"))
    ...     same = np.array_equal(sub.X[:].toarray(), a.X[[4, 1]].toarray())
    ...     sub.file.close()
    >>> sub.obs_names.tolist(), same
    (['4', '1'], True)
    """
    import anndata as ad
    import h5py
    from anndata.io import sparse_dataset, write_elem

    rows = np.asarray(rows, dtype=np.int64).ravel()
    X_src = adata.X
    kind = _source_kind(X_src)
    is_sparse = kind in ("sparse", "backed_csr", "backed_csc")
    obs_names = adata.obs_names[rows]
    path = Path(path)
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", pd.DataFrame(index=pd.Index(obs_names.astype(str), name=None)))
        write_elem(f, "var", pd.DataFrame(index=pd.Index(adata.var_names.astype(str), name=None)))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
        if is_sparse:
            X = None
            for _, _, block in iter_row_blocks(X_src, rows=rows):
                csr = sparse.csr_matrix(block)
                csr.indptr = csr.indptr.astype(np.int64)  # appended rows can pass int32's range
                if X is None:
                    write_elem(f, "X", csr, dataset_kwargs={"chunks": (1 << 18,)})
                    X = sparse_dataset(f["X"])
                else:
                    X.append(csr)
            if X is None:  # no rows
                write_elem(f, "X", sparse.csr_matrix((0, adata.n_vars), dtype=np.float32))
        else:
            dtype = np.dtype(getattr(X_src, "dtype", np.float32))
            dset = f.create_dataset("X", shape=(rows.size, adata.n_vars), dtype=dtype)
            dset.attrs["encoding-type"] = "array"
            dset.attrs["encoding-version"] = "0.2.0"
            for start, stop, block in iter_row_blocks(X_src, rows=rows):
                dset[start:stop] = np.asarray(block, dtype=dtype)
    out = ad.read_h5ad(path, backed="r")
    out.obs = adata.obs.iloc[rows].copy()
    out.var = adata.var.copy()
    out.uns = deepcopy(dict(adata.uns))
    for key, value in adata.obsm.items():
        out.obsm[key] = _take(value, rows)
    for key, value in adata.varm.items():
        out.varm[key] = value.copy() if hasattr(value, "copy") else value
    for key, value in adata.layers.items():
        if key is not None:  # anndata 0.13 lists X as layers[None]
            out.layers[key] = _take(value, rows)
    return out


def _take(value: Any, rows: np.ndarray) -> Any:
    if isinstance(value, pd.DataFrame):
        return value.iloc[rows].copy()
    if sparse.issparse(value):
        return sparse.csr_matrix(value)[rows]
    return np.asarray(value)[rows]
