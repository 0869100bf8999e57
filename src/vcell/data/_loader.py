"""The one minibatch loader every vcell model trains through: rows of a registered matrix, in memory or on disk.

:class:`RowReader` reads dense float32 rows of the registered matrix (scvi-tools' registry field ``X``) whatever
holds it: a dense array, a SciPy CSR/CSC matrix, or a backed h5ad (anndata's ``CSRDataset`` or an h5py dataset,
read through anndata's own slicing). :class:`CellBatches` turns per-cell fields (such readers, or in-memory
per-cell arrays: encodings, covariate codes, PCA coordinates) into a sized iterable of batches (dicts of tensors)
for :class:`vcell.train.TrainingPlan`, optionally pairing every cell with a source cell (a matched control), and
shards the batches over the processes of a ``torch.distributed`` run (Lightning DDP) so that every process reads
only its own rows.

Shuffling: ``"full"`` draws one permutation of the cells per pass (the right choice when rows are in memory:
random rows cost nothing); ``"block"`` permutes blocks of ``block_size`` consecutive cells and then the cells
within windows of ``window_blocks`` blocks, so that a backed matrix is read in contiguous slices (random single
rows of a backed CSR h5ad cost about 70 us each, 20x a contiguous slice); ``"auto"`` picks ``"block"`` when a field
is read from disk. The same seed gives the same batches for the same storage; a backed copy of the data is
shuffled differently from the in-memory one (the same cells every pass, in another order).

Under ``"block"`` shuffling, every backed field is read once per window (:meth:`RowReader.window`): the window's
target rows (and its source rows, for a field also read at the sources) in contiguous runs, one slice per run,
held in memory as stored (CSR) while the window's batches are served from them. A batch of 128 cells drawn from 32
blocks would otherwise be 32 scattered reads, and anndata reads integer-indexed rows of a backed matrix one at a
time. The batches are those of the same order read batch by batch (the same cells, values and sources); memory
holds one window per process, whatever the number of cells.

A pass may be completed lazily (:class:`Pairs` ``parts``/``complete``: e.g. FlowMatching's optimal-transport
couplings, solved chunk by chunk as batches reach them). ``"full"`` shuffling of such a pass longer than ``window``
items permutes its parts and then the items within windows of ``window`` items, so that every batch costs the same
whatever the number of cells (a pass coupled whole would put all of it before the first batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import sparse

from ._chunked import _read_rows, _source_kind

Shuffle = Literal["auto", "full", "block"] | bool
#: a contiguous run of rows read for a window breaks where the next row read is more than this many rows away
_MAX_GAP = 64


@dataclass
class Pairs:
    """The cells of one pass of :class:`CellBatches`.

    ``targets``: one cell per item; ``sources``: optionally a paired cell per item (e.g. a matched control);
    ``extras``: per-item arrays, yielded as tensors under their keys.

    ``parts`` and ``complete`` (optional, together) make a pass whose items are finished lazily: ``parts`` holds the
    start offsets of consecutive parts of the items (``parts[0] == 0``; the last part runs to the end) and
    ``complete(i)`` finishes part ``i`` in place (e.g. solves the optimal-transport coupling of its sources). It is
    called once per part per pass, just before the first batch that holds one of its items, so a pass costs only
    its draws up front and the work of each part as it is reached. ``complete`` must give the same result whatever
    the order in which parts are completed (draw any randomness up front).
    """

    targets: np.ndarray
    sources: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    parts: np.ndarray | None = None
    complete: Callable[[int], None] | None = None

    def __post_init__(self) -> None:
        if (self.parts is None) != (self.complete is None):
            msg = "Pairs: parts and complete go together (pass both or neither)"
            raise ValueError(msg)
        if self.parts is not None:
            self.parts = np.asarray(self.parts, dtype=np.int64)
            if len(self.targets) and (
                not len(self.parts)
                or self.parts[0] != 0
                or (np.diff(self.parts) <= 0).any()
                or self.parts[-1] >= len(self.targets)
            ):
                msg = "Pairs: parts must be increasing start offsets of the items, the first one 0"
                raise ValueError(msg)

    def __len__(self) -> int:
        return len(self.targets)

    def part_of(self, pos: np.ndarray) -> np.ndarray:
        """Part of each item position ``pos`` (requires ``parts``)."""
        return np.searchsorted(self.parts, pos, side="right") - 1


def _one_index_dtype(X: sparse.csr_matrix) -> sparse.csr_matrix:
    """``X``, or a CSR sharing its values and column indices with ``indptr`` cast to the indices' type.

    anndata reads a CSR with int64 ``indptr`` and int32 ``indices``; with mixed index types SciPy copies the whole
    ``indices`` array on every row selection (measured: about 10x slower batches, ``benchmarks/loaders.py``). Only
    ``indptr`` (one value per row) is copied, and only when the stored values fit the indices' type.
    """
    if X.indptr.dtype == X.indices.dtype or X.nnz >= np.iinfo(X.indices.dtype).max:
        return X
    out = sparse.csr_matrix(X.shape, dtype=X.dtype)  # empty; then the shared arrays and the cast indptr
    out.data, out.indices, out.indptr = X.data, X.indices, X.indptr.astype(X.indices.dtype)
    return out


class RowReader:
    """Dense float32 rows of a cells x genes matrix, read on demand (nothing is densified whole).

    Parameters
    ----------
    X
        A dense array, a SciPy sparse matrix, a torch tensor, or a backed matrix (``adata.X`` of
        ``anndata.read_h5ad(path, backed="r")``); a COO/other SciPy format is converted to CSR once, a CSC matrix
        in memory to CSR once (a sparse copy: CSC rows cost a scan of every column).
    transform
        Applied to every block of rows read (dense float32 ``(n, genes)`` -> same shape), e.g. log1p(CP10k).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import sparse
    >>> reader = RowReader(sparse.csr_matrix(np.arange(6.0).reshape(3, 2)))
    >>> reader(np.array([2, 0])).tolist()
    [[4.0, 5.0], [0.0, 1.0]]
    """

    def __init__(self, X: Any, *, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        import torch

        self.transform = transform
        if isinstance(X, torch.Tensor):
            self.kind, self.X = "tensor", X
        else:
            kind = _source_kind(X)
            if kind == "sparse" and X.format != "csr":
                X = sparse.csr_matrix(X)
            if kind == "sparse":
                X = _one_index_dtype(X)
            elif kind == "dense" and isinstance(X, np.matrix):
                X = np.asarray(X)
            self.kind, self.X = kind, X
        self.shape = tuple(int(s) for s in self.X.shape)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (``strategy="ddp_spawn"`` pickles the loaders): a matrix of an HDF5 file by its file and path."""
        state = dict(self.__dict__)
        if self.backed:
            import h5py

            node = getattr(self.X, "group", self.X)  # anndata's sparse datasets: their group; else an h5py dataset
            if not isinstance(node, h5py.Group | h5py.Dataset):
                msg = (
                    f"cannot pickle a reader of a backed {type(self.X).__name__} outside an HDF5 file; "
                    'train with strategy="ddp" (processes started as scripts) instead of "ddp_spawn"'
                )
                raise TypeError(msg)
            state["X"] = ("h5", node.file.filename, node.name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["X"], tuple):  # reopened read-only in this process
            import h5py
            from anndata.io import sparse_dataset

            _, filename, name = state["X"]
            node = h5py.File(filename, "r")[name]
            state["X"] = sparse_dataset(node) if isinstance(node, h5py.Group) else node
        self.__dict__.update(state)

    @property
    def backed(self) -> bool:
        """Whether rows are read from disk (then contiguous reads are much faster than random ones)."""
        return self.kind not in ("dense", "sparse", "tensor")

    def __len__(self) -> int:
        return self.shape[0]

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (integer indices, any order, repeats allowed) as a dense float32 array."""
        import torch

        idx = np.asarray(idx, dtype=np.int64)
        if self.kind == "tensor":
            out = self.X.index_select(0, torch.as_tensor(idx, device=self.X.device)).cpu().numpy()
        elif self.kind == "dense":
            out = self.X[idx]
        elif self.kind == "sparse":
            out = self.X[idx].toarray()
        else:
            out = self._read_backed(idx)
        out = np.asarray(out, dtype=np.float32)
        return out if self.transform is None else np.asarray(self.transform(out), dtype=np.float32)

    def window(self, idx: np.ndarray) -> _WindowRows:
        """The rows ``idx`` (any order, repeats allowed) read once and held in memory, as a reader of those rows.

        The distinct rows are read in contiguous runs (a run breaks where the next row is more than ``_MAX_GAP``
        rows away): the runs of rows dense in their span (at least a quarter of it) whole, in one read of a backed
        CSR matrix (a boolean mask of the rows: anndata reads each run as one contiguous slice, and its per-call
        overhead is paid once), one slice per run of other storages; the other rows in one sorted read. Values stay as stored (CSR for a sparse matrix), so the window costs its
        stored size (at most 4x its rows' values); rows are densified and transformed when read from it.
        """
        uniq = np.unique(np.asarray(idx, dtype=np.int64))
        if not self.backed:
            return _WindowRows(uniq, uniq, self)  # rows in memory already: read them as they are
        block, rows = self._read_runs(uniq)
        reader = RowReader.__new__(RowReader)  # an in-memory reader of the block (no conversion: it is read as-is)
        reader.transform, reader.X, reader.shape = self.transform, block, (block.shape[0], self.shape[1])
        reader.kind = "sparse" if sparse.issparse(block) else "dense"
        return _WindowRows(uniq, rows, reader)

    def _read_runs(self, uniq: np.ndarray) -> tuple[Any, np.ndarray]:
        """Rows ``uniq`` (sorted, distinct) of the backed matrix as one block, and the block row of each."""
        if not uniq.size or self.kind == "backed_csc":  # CSC: one pass over the column blocks for all the rows
            block = _read_rows(self.X, self.kind, uniq, self.shape[0], None)
            return _one_index_dtype(block) if sparse.issparse(block) else np.asarray(block), np.arange(uniq.size)
        breaks = np.flatnonzero(np.diff(uniq) > _MAX_GAP) + 1
        starts, stops = np.r_[0, breaks], np.r_[breaks, uniq.size]
        lo, hi = uniq[starts], uniq[stops - 1] + 1
        dense = hi - lo <= 4 * (stops - starts)  # runs read whole, as contiguous slices
        parts, rows, offset = [], np.empty(uniq.size, dtype=np.int64), 0
        if dense.any():
            # the dense runs (sorted, disjoint: runs are more than _MAX_GAP rows apart), each read whole
            for a, b, first, last in zip(starts[dense], stops[dense], lo[dense], hi[dense], strict=True):
                rows[a:b] = offset + uniq[a:b] - first
                offset += int(last - first)
            if self.kind == "backed_csr":  # one read (anndata reads each run of the mask as a slice)
                mask = np.zeros(self.shape[0], dtype=bool)
                for first, last in zip(lo[dense], hi[dense], strict=True):
                    mask[first:last] = True
                parts.append(_read_rows(self.X, self.kind, mask, self.shape[0], None))
            else:  # h5py/zarr/dask arrays: one slice per run
                parts.extend(
                    _read_rows(self.X, self.kind, slice(int(a), int(b)), self.shape[0], None)
                    for a, b in zip(lo[dense], hi[dense], strict=True)
                )
        if not dense.all():  # the other rows: one sorted read
            at = np.concatenate([np.arange(a, b) for a, b in zip(starts[~dense], stops[~dense], strict=True)])
            parts.append(_read_rows(self.X, self.kind, uniq[at], self.shape[0], None))
            rows[at] = offset + np.arange(at.size)
        if len(parts) == 1:
            block = parts[0]
        elif sparse.issparse(parts[0]):
            block = sparse.vstack(parts, format="csr")
        else:
            block = np.concatenate([np.asarray(p) for p in parts])
        return (_one_index_dtype(sparse.csr_matrix(block)) if sparse.issparse(block) else np.asarray(block)), rows

    def _read_backed(self, idx: np.ndarray) -> np.ndarray:
        """Rows of a backed matrix: one contiguous slice when the rows are dense in their span, else sorted reads."""
        if not idx.size:
            return np.zeros((0, self.shape[1]), dtype=np.float32)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        uniq = np.unique(idx)
        if hi - lo <= 4 * len(uniq) and self.kind != "backed_csc":  # a slice: one read (anndata's fast path)
            block = _read_rows(self.X, self.kind, slice(lo, hi), self.shape[0], None)
            rows = idx - lo
        else:
            block = _read_rows(self.X, self.kind, uniq, self.shape[0], None)
            rows = np.searchsorted(uniq, idx)
        block = block[rows]
        return block.toarray() if sparse.issparse(block) else np.asarray(block)


class _WindowRows:
    """Rows of a :class:`RowReader` held in memory (:meth:`RowReader.window`): row ``cells[j]`` is ``reader(rows[j])``."""

    def __init__(self, cells: np.ndarray, rows: np.ndarray, reader: RowReader) -> None:
        self.cells, self.rows, self.reader = cells, rows, reader

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        j = np.searchsorted(self.cells, idx)
        if idx.size and (j.max() >= self.cells.size or not np.array_equal(self.cells[j], idx)):
            msg = "rows requested outside the window read (a loader bug: every batch must be read from its window)"
            raise KeyError(msg)
        return self.reader(self.rows[j])


@dataclass
class Lookup:
    """A per-cell field of :class:`CellBatches` held as its distinct rows: cell ``i``'s value is ``table[codes[i]]``.

    For values that many cells share (e.g. a perturbation's encoding): the memory of the distinct rows and one code
    per cell instead of cells x width (1M cells x 2,000 perturbations in float32 would be 8 GB). The codes are held
    in the narrowest signed integer type that numbers the table's rows (one byte per cell up to 128 rows).

    Examples
    --------
    >>> import numpy as np
    >>> take_rows(Lookup(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([1, 1, 0])), np.array([2, 0])).tolist()
    [[0.0, 1.0], [1.0, 0.0]]
    """

    table: Any
    codes: np.ndarray

    def __post_init__(self) -> None:
        codes = np.asarray(self.codes)
        if codes.ndim != 1 or (codes.size and not 0 <= codes.min() <= codes.max() < len(self.table)):
            msg = f"codes must be a 1-D array of row numbers of the table (0..{len(self.table) - 1})"
            raise ValueError(msg)
        self.codes = codes.astype(index_dtype(len(self.table)), copy=False)

    def __len__(self) -> int:
        return len(self.codes)


def index_dtype(n: int) -> type[np.signedinteger]:
    """The narrowest signed integer type holding ``0..n - 1`` (int8 up to n = 128, ..., int64).

    Examples
    --------
    >>> index_dtype(100), index_dtype(1_000_000)
    (<class 'numpy.int8'>, <class 'numpy.int32'>)
    """
    for dtype in (np.int8, np.int16, np.int32):
        if n - 1 <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def take_rows(value: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of a per-cell field of :class:`CellBatches` as a tensor.

    The field: a :class:`RowReader`, a :class:`Lookup`, a tensor or an array.
    """
    import torch

    if isinstance(value, Lookup):
        return take_rows(value.table, value.codes[np.asarray(idx, dtype=np.int64)].astype(np.int64))
    if isinstance(value, (RowReader, _WindowRows)):
        return torch.from_numpy(value(idx))
    if isinstance(value, torch.Tensor):
        return value.index_select(0, torch.as_tensor(idx, device=value.device))  # several times faster than [idx]
    return torch.as_tensor(np.asarray(value)[idx])


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of the running ``torch.distributed`` group, ``(0, 1)`` without one."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class CellBatches:
    """Sized iterable of minibatches (dicts of tensors) for :class:`vcell.train.TrainingPlan`.

    Every pass is a new epoch: ``cells`` (a fixed array of cell indices, or a function ``rng -> Pairs`` drawing
    the pass's pairs, e.g. each perturbed cell with a random control of its context) is drawn from a generator
    seeded by ``(seed, epoch_start + epoch)`` and shuffled with the same generator. Each batch holds every entry
    of ``fields`` at the batch's target cells, every entry of ``source_fields`` (batch key -> field name) at its
    source cells, and the pass's ``extras``.

    Under ``torch.distributed`` (Lightning DDP), every process takes its own share of each pass, with as many
    batches as the others: with ``"full"`` shuffling (and fixed orders), step ``k`` of process ``r`` is the ``r``-th
    slice of the ``k``-th global batch of ``batch_size * world_size`` items (so ``N`` processes with ``batch_size``
    see the items of one process with ``N * batch_size``; the last global batch is split evenly, padded by
    wrapping around only when it has fewer items than processes); with ``"block"`` shuffling, the windows are dealt
    round-robin (the pass padded by wrapping around to whole windows), so each process reads its own contiguous
    slices.

    Parameters
    ----------
    fields
        Batch key -> per-cell values: a :class:`RowReader` (rows of a matrix), a :class:`Lookup` (distinct rows and
        a code per cell), a torch tensor or a numpy array (first axis = cells).
    cells
        Cell indices of every pass, or a function of a :class:`numpy.random.Generator` returning the pass's
        :class:`Pairs`.
    batch_size
        Items per batch (per process).
    seed
        Random seed of the passes.
    shuffle
        ``False`` (fixed order: validation), ``"full"``, ``"block"`` or ``"auto"`` (``True`` is ``"auto"``): see
        :mod:`vcell.data._loader`.
    fixed
        Draw the same pass every time (generator seeded by ``(seed, 0)``; validation pairs).
    epoch_start
        Offset of the epoch in the generator's seed.
    source_fields
        Batch key -> name of the entry of ``fields`` read at the source cells.
    block_size, window_blocks
        Block shuffling: consecutive cells per block (default ``batch_size``), blocks per shuffled window.
    n_items
        Items per pass when ``cells`` is a function (else one pass is drawn to count them).
    window
        ``"full"`` shuffling of a pass with lazily completed parts (:class:`Pairs` ``parts``) longer than this many
        items: its parts are permuted, the items taken in that order are cut into windows of ``window`` items
        (rounded up to whole batches of all processes) and permuted within each window; so the first batches need
        only the parts of the first window, and every batch costs the same whatever the size of the pass. A
        shorter pass is permuted whole (as without parts).
    """

    def __init__(
        self,
        fields: Mapping[str, Any],
        cells: np.ndarray | Callable[[np.random.Generator], Pairs],
        *,
        batch_size: int,
        seed: int,
        shuffle: Shuffle = "auto",
        fixed: bool = False,
        epoch_start: int = 0,
        source_fields: Mapping[str, str] | None = None,
        block_size: int | None = None,
        window_blocks: int = 32,
        n_items: int | None = None,
        window: int = 65536,
    ) -> None:
        if int(batch_size) < 1:
            msg = f"batch_size must be a positive integer, got {batch_size}"
            raise ValueError(msg)
        self.fields, self.cells = dict(fields), cells
        self.source_fields = dict(source_fields or {})
        missing = sorted(set(self.source_fields.values()) - set(self.fields))
        if missing:
            msg = f"source_fields name fields that are not in fields: {missing}; fields: {sorted(self.fields)}"
            raise KeyError(msg)
        self.batch_size, self.seed, self.fixed = int(batch_size), int(seed), bool(fixed)
        self.epoch_start, self.epoch = int(epoch_start), 0
        if shuffle is True:
            shuffle = "auto"
        if shuffle not in (False, "auto", "full", "block"):
            msg = f"shuffle must be False, True, 'auto', 'full' or 'block', got {shuffle!r}"
            raise ValueError(msg)
        if shuffle == "auto":
            backed = any(isinstance(v, RowReader) and v.backed for v in self.fields.values())
            shuffle = "block" if backed else "full"
        self.shuffle = shuffle
        self.block_size = int(block_size or self.batch_size)
        self.window_blocks = max(1, int(window_blocks))
        self.window = max(1, int(window))
        self._n = len(cells) if not callable(cells) else n_items

    # ------------------------------------------------------------------ passes
    def _pass(self) -> tuple[Pairs, np.random.Generator]:
        key = 0 if self.fixed else self.epoch_start + self.epoch
        if not self.fixed and self.shuffle is not False:
            self.epoch += 1
        rng = np.random.default_rng([self.seed, key])
        pairs = self.cells(rng) if callable(self.cells) else Pairs(np.asarray(self.cells, dtype=np.int64))
        self._n = len(pairs)
        return pairs, rng

    def _order(self, pairs: Pairs, rng: np.random.Generator) -> list[list[np.ndarray]]:
        """Positions (into the pass) of this process's batches, grouped by window (block shuffling; else one each)."""
        n, b = len(pairs), self.batch_size
        rank, world = _world()
        if self.shuffle is False or self.fixed:
            order = np.arange(n)
        elif self.shuffle == "full" and pairs.parts is not None and n > self.window:
            order = self._window_order(pairs, rng, world)
        elif self.shuffle == "full":
            order = rng.permutation(n)
        else:
            return self._block_order(pairs, rng, rank, world)
        if world > 1 and n:  # global batches of b * world items, one slice per process
            out = []
            for start in range(0, n, b * world):
                part = order[start : start + b * world]
                if len(part) < world:  # pad the last one by wrapping: every process gets a step
                    part = np.resize(np.concatenate([part, order]), world)
                out.append([np.array_split(part, world)[rank]])
            return out
        return [[order[s : s + b]] for s in range(0, n, b)]

    def _window_order(self, pairs: Pairs, rng: np.random.Generator, world: int) -> np.ndarray:
        """Parts permuted, then items permuted within windows of ``window`` items (whole global batches)."""
        n, step = len(pairs), self.batch_size * world
        starts = pairs.parts
        sizes = np.diff(np.append(starts, n))
        perm = rng.permutation(len(starts))
        # the items of the parts in the order perm, without a Python loop over parts
        offsets = np.repeat(starts[perm] - np.concatenate([[0], np.cumsum(sizes[perm])[:-1]]), sizes[perm])
        seq = np.arange(n) + offsets
        window = -(-self.window // step) * step
        for s in range(0, n, window):
            seq[s : s + window] = seq[s : s + window][rng.permutation(len(seq[s : s + window]))]
        return seq

    def _block_order(self, pairs: Pairs, rng: np.random.Generator, rank: int, world: int) -> list[list[np.ndarray]]:
        """Blocks of consecutive target cells, permuted; cells permuted within windows; windows dealt to processes."""
        n, b = len(pairs), self.batch_size
        by_cell = np.argsort(pairs.targets, kind="stable")  # positions in file order
        n_blocks = -(-n // self.block_size)
        blocks = [by_cell[i * self.block_size : (i + 1) * self.block_size] for i in rng.permutation(n_blocks)]
        order = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
        window = self.window_blocks * self.block_size
        window = -(-window // b) * b  # whole batches per window
        n_windows = -(-n // window) if n else 0
        if world > 1 and n:
            n_windows = -(-n_windows // world) * world
            order = np.resize(order, n_windows * window)  # equal windows, whole batches: equal batch counts
        out = []
        for w in range(rank, n_windows, world):
            part = order[w * window : (w + 1) * window]
            part = part[rng.permutation(len(part))] if len(part) else part
            out.append([part[s : s + b] for s in range(0, len(part), b)])
        return out

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Draw the next pass as epoch ``epoch``.

        :func:`vcell.train.fit` calls it before every training epoch with the trainer's epoch, so a resumed run
        continues the same sequence of passes.
        """
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        if self._n is None:  # a drawn pass: its length is known once drawn (drawn again when iterated)
            saved = self.epoch
            self._pass()
            self.epoch = saved
        n, b = self._n, self.batch_size
        rank, world = _world()
        if world == 1:
            return -(-n // b)
        if self.shuffle == "block" and not self.fixed:
            window = -(-(self.window_blocks * self.block_size) // b) * b
            n_windows = -(-n // window)
            return -(-n_windows // world) * (window // b)
        return -(-n // (b * world))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch

        pairs, rng = self._pass()
        done = None if pairs.parts is None else np.zeros(len(pairs.parts), dtype=bool)

        def complete(pos: np.ndarray) -> None:  # finish the parts these items read (lazily completed pairs)
            if done is not None:
                need = np.unique(pairs.part_of(pos))
                for i in need[~done[need]]:
                    pairs.complete(int(i))
                done[need] = True

        backed = [k for k, v in self.fields.items() if isinstance(v, RowReader) and v.backed]
        for window in self._order(pairs, rng):
            fields = self.fields
            if backed and self.shuffle == "block":  # read the window's rows of every backed field once, then batches
                pos = np.concatenate(window)
                complete(pos)
                fields = dict(self.fields)
                for k in backed:
                    rows = [pairs.targets[pos]]
                    if k in self.source_fields.values():
                        rows.append(pairs.sources[pos])
                    fields[k] = self.fields[k].window(np.concatenate(rows))
            for pos in window:
                complete(pos)
                tgt = pairs.targets[pos]
                batch = {k: take_rows(v, tgt) for k, v in fields.items()}
                if self.source_fields:
                    src = pairs.sources[pos]
                    batch.update({k: take_rows(fields[name], src) for k, name in self.source_fields.items()})
                batch.update({k: torch.as_tensor(v[pos]) for k, v in pairs.extras.items()})
                yield batch
