"""Rows of a model's registered matrix in its expression space (log1p(CP10k)), read through :class:`vcell.data.RowReader`.

What FlowMatching and CellJEPA read per cell: minibatch rows (a :class:`~vcell.data.RowReader` field of
:class:`~vcell.data.CellBatches`) and per-cell outputs over all cells (PCA coordinates, embeddings) computed block by
block, so that no matrix is densified whole, whatever holds it (dense, CSR/CSC, a backed h5ad).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from vcell.data import RowReader
from vcell.data._chunked import log1p_cp10k_rows

#: cells read at once when a per-cell output is computed over many cells
ROW_BLOCK = 4096


def expression_reader(X: Any, *, counts: bool, name: str = "adata.X") -> RowReader:
    """:class:`~vcell.data.RowReader` of the log1p(CP10k) rows of ``X`` (counts), or of its rows (log data).

    Rows equal those of :func:`vcell._utils.expression_for_eval` of the whole matrix, bit for bit; count rows are
    checked (finite, non-negative) as they are read.
    """
    reader = RowReader(X)
    if counts:
        scaled = reader.kind in ("sparse", "backed_csr", "backed_csc")
        # a partial of a function of vcell.data, not a closure: picklable (``strategy="ddp_spawn"`` pickles the
        # loaders), and a process unpickling it imports vcell.data only, not the models (scvi-tools: seconds per process)
        reader.transform = functools.partial(log1p_cp10k_rows, scaled=scaled, name=name)
    return reader


def row_blocks(idx: np.ndarray, block: int = ROW_BLOCK) -> Iterator[np.ndarray]:
    """Consecutive slices of ``block`` cells of ``idx`` (the last one shorter)."""
    idx = np.asarray(idx, dtype=np.int64)
    for start in range(0, len(idx), block):
        yield idx[start : start + block]


def model_reader(model: Any, adata: Any = None) -> RowReader:
    """:func:`expression_reader` of a model's matrix: the registered one (``None``) or that of ``adata``.

    The registered matrix is scvi-tools' registry field ``X`` (``adata.X`` or the layer the model was set up with);
    another AnnData's is read from the same layer.
    """
    from vcell._constants import REGISTRY_KEYS
    from vcell._utils import get_matrix

    layer = model._layer()
    if adata is None:
        X = model.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    else:
        X = get_matrix(adata, layer)
    return expression_reader(X, counts=model.counts_, name=f"adata.layers[{layer!r}]" if layer else "adata.X")


def read_rows(reader: RowReader, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of ``reader``, read ``ROW_BLOCK`` cells at a time (for a subsample that fits in memory)."""
    blocks = [reader(b) for b in row_blocks(idx)]
    if not blocks:
        return reader(np.zeros(0, dtype=np.int64))
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def join_rows(blocks: list[np.ndarray]) -> np.ndarray:
    """Row blocks as one float32 array (the block itself when there is one: no copy)."""
    return (blocks[0] if len(blocks) == 1 else np.concatenate(blocks)).astype(np.float32, copy=False)
