"""The shared minibatch loader: row readers over every storage, passes, shuffling, process shards."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from scipy import sparse

from vcell.data import CellBatches, Pairs, RowReader, take_rows
from vcell.data import _loader as loader


@pytest.fixture
def matrix() -> np.ndarray:
    rng = np.random.default_rng(0)
    X = rng.poisson(0.7, size=(300, 12)).astype(np.float32)
    return X


@pytest.fixture
def backed(matrix: np.ndarray, tmp_path) -> ad.AnnData:
    path = tmp_path / "x.h5ad"
    ad.AnnData(sparse.csr_matrix(matrix)).write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


@pytest.mark.parametrize("kind", ["dense", "csr", "csc", "coo", "tensor", "backed"])
def test_row_reader_every_storage(matrix: np.ndarray, backed: ad.AnnData, kind: str) -> None:
    X = {
        "dense": matrix,
        "csr": sparse.csr_matrix(matrix),
        "csc": sparse.csc_matrix(matrix),
        "coo": sparse.coo_matrix(matrix),
        "tensor": torch.as_tensor(matrix),
        "backed": backed.X,
    }[kind]
    reader = RowReader(X)
    assert reader.backed == (kind == "backed")
    for idx in (np.array([5, 3, 3, 299, 0]), np.arange(40, 80), np.array([250, 7])):  # unsorted, repeats, slices
        out = reader(idx)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, matrix[idx])
    assert reader(np.zeros(0, dtype=np.int64)).shape == (0, 12)


def test_row_reader_transform(matrix: np.ndarray) -> None:
    reader = RowReader(sparse.csr_matrix(matrix), transform=np.log1p)
    np.testing.assert_allclose(reader(np.array([1, 2])), np.log1p(matrix[[1, 2]]), rtol=1e-6)


def test_batches_cover_every_cell_once(matrix: np.ndarray) -> None:
    cells = np.arange(3, 290)
    dl = CellBatches({"X": RowReader(matrix), "i": np.arange(300)}, cells, batch_size=32, seed=0)
    assert len(dl) == -(-len(cells) // 32)
    seen = [b["i"].numpy() for b in dl]
    assert len(seen) == len(dl)
    got = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(got), cells)
    first = np.concatenate([b["i"].numpy() for b in dl])  # the next pass: a new order
    assert not np.array_equal(first, got)
    batch = next(iter(dl))
    np.testing.assert_array_equal(batch["X"].numpy(), matrix[batch["i"].numpy()])


def test_same_seed_same_batches(matrix: np.ndarray) -> None:
    def passes(seed: int) -> list[np.ndarray]:
        dl = CellBatches({"i": np.arange(300)}, np.arange(300), batch_size=50, seed=seed)
        return [np.concatenate([b["i"].numpy() for b in dl]) for _ in range(2)]

    a, b, c = passes(1), passes(1), passes(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


def test_fixed_and_unshuffled_orders() -> None:
    cells = np.arange(10, 60)
    dl = CellBatches({"i": np.arange(100)}, cells, batch_size=16, seed=0, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([b["i"].numpy() for b in dl]), cells)

    def draw(rng: np.random.Generator) -> Pairs:
        return Pairs(cells, rng.choice(5, size=len(cells)), {"t": rng.random(len(cells)).astype(np.float32)})

    fixed = CellBatches({"i": np.arange(100)}, draw, batch_size=16, seed=0, fixed=True, source_fields={"s": "i"})
    one = [torch.cat([b["s"] for b in fixed]), torch.cat([b["t"] for b in fixed])]
    two = [torch.cat([b["s"] for b in fixed]), torch.cat([b["t"] for b in fixed])]
    assert all(torch.equal(x, y) for x, y in zip(one, two, strict=True))
    assert one[0].max() < 5  # sources read at the drawn source cells


def test_pairs_sources_and_extras() -> None:
    targets = np.arange(20, 40)

    def draw(rng: np.random.Generator) -> Pairs:
        return Pairs(targets, targets - 20, {"w": np.arange(20, dtype=np.float32)})

    dl = CellBatches({"i": torch.arange(50)}, draw, batch_size=7, seed=0, source_fields={"src": "i"}, n_items=20)
    assert len(dl) == 3
    for b in dl:
        np.testing.assert_array_equal(b["src"].numpy(), b["i"].numpy() - 20)
        np.testing.assert_array_equal(b["w"].numpy(), b["i"].numpy() - 20)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        CellBatches({"i": np.arange(3)}, np.arange(3), batch_size=0, seed=0)
    with pytest.raises(ValueError, match="shuffle"):
        CellBatches({"i": np.arange(3)}, np.arange(3), batch_size=2, seed=0, shuffle="sometimes")
    with pytest.raises(KeyError, match="nope"):
        CellBatches({"i": np.arange(3)}, np.arange(3), batch_size=2, seed=0, source_fields={"s": "nope"})


def test_backed_reads_blocks(matrix: np.ndarray, backed: ad.AnnData) -> None:
    cells = np.arange(300)
    dl = CellBatches({"X": RowReader(backed.X), "i": np.arange(300)}, cells, batch_size=16, seed=0, block_size=20)
    assert dl.shuffle == "block"  # auto: contiguous reads from disk
    got = []
    for b in dl:
        np.testing.assert_array_equal(b["X"].numpy(), matrix[b["i"].numpy()])
        got.append(b["i"].numpy())
    assert len(got) == len(dl)
    np.testing.assert_array_equal(np.sort(np.concatenate(got)), cells)
    full = CellBatches({"X": RowReader(backed.X)}, cells, batch_size=16, seed=0, shuffle="full")
    assert full.shuffle == "full"


def _per_process(dl: CellBatches, world: int, monkeypatch: pytest.MonkeyPatch) -> list[list[np.ndarray]]:
    out = []
    for rank in range(world):
        monkeypatch.setattr(loader, "_world", lambda rank=rank: (rank, world))
        dl.epoch = 0
        n = len(dl)
        batches = [b["i"].numpy() for b in dl]
        assert len(batches) == n
        out.append(batches)
    return out


@pytest.mark.parametrize("n_cells", [256, 250, 3])
def test_process_shards_rebuild_the_global_batches(n_cells: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """N processes with batch b see, step by step, the items of one process with batch N * b."""
    cells = np.arange(n_cells)
    single = CellBatches({"i": np.arange(n_cells)}, cells, batch_size=64, seed=4)
    reference = [b["i"].numpy() for b in single]
    dl = CellBatches({"i": np.arange(n_cells)}, cells, batch_size=32, seed=4)
    shards = _per_process(dl, 2, monkeypatch)
    assert len(shards[0]) == len(shards[1]) == len(reference)  # equal step counts: no process waits forever
    for step, ref in enumerate(reference):
        union = np.concatenate([shards[0][step], shards[1][step]])
        if len(ref) >= 2:
            np.testing.assert_array_equal(union, ref)
        else:  # fewer items than processes: padded by wrapping around
            assert set(ref) <= set(union)


def test_block_shards_are_disjoint_and_cover(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    n = 1000
    path = tmp_path / "b.h5ad"
    ad.AnnData(sparse.random(n, 4, density=0.5, format="csr", dtype=np.float32, random_state=0)).write_h5ad(path)
    reader = RowReader(ad.read_h5ad(path, backed="r").X)
    dl = CellBatches({"X": reader, "i": np.arange(n)}, np.arange(n), batch_size=16, seed=0, window_blocks=4)
    shards = _per_process(dl, 3, monkeypatch)
    assert len({len(s) for s in shards}) == 1
    cells = [np.concatenate(s) for s in shards]
    assert set(np.concatenate(cells)) == set(range(n))  # every cell in some process
    windows = [set(c) for c in cells]  # whole windows per process: overlaps only from the wrap-around padding
    assert len(windows[0] & windows[1]) + len(windows[1] & windows[2]) < 3 * 64


class _Lazy:
    """A pass of 1,000 items in parts of 1-40 items; ``complete(i)`` writes each part's sources (target + 1000)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, rng: np.random.Generator) -> Pairs:
        sizes = np.random.default_rng(7).integers(1, 41, size=200)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        starts = starts[starts < 1000]
        targets = np.arange(1000)
        sources = np.full(1000, -1)
        self.calls.clear()
        bounds = [*starts, 1000]

        def complete(i: int) -> None:
            self.calls.append(i)
            sources[bounds[i] : bounds[i + 1]] = targets[bounds[i] : bounds[i + 1]] + 1000

        return Pairs(targets, sources, parts=starts, complete=complete)


def _eager(rng: np.random.Generator) -> Pairs:
    return Pairs(np.arange(1000), np.arange(1000) + 1000)


def test_lazy_parts_are_completed_once_before_their_items_are_read() -> None:
    fields = {"i": np.arange(2000)}
    lazy = _Lazy()
    # a pass within the window: the same batches as the pass completed up front
    dl = CellBatches(fields, lazy, batch_size=64, seed=3, source_fields={"s": "i"}, n_items=1000)
    ref = CellBatches(fields, _eager, batch_size=64, seed=3, source_fields={"s": "i"}, n_items=1000)
    got, want = list(dl), list(ref)
    assert len(got) == len(want) == len(dl)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a["i"].numpy(), b["i"].numpy())
        np.testing.assert_array_equal(a["s"].numpy(), b["s"].numpy())  # never -1: completed before being read
    assert sorted(lazy.calls) == list(range(len(set(lazy.calls))))
    assert len(lazy.calls) == len(set(lazy.calls))  # once per part per pass
    with pytest.raises(ValueError, match="together"):
        Pairs(np.arange(3), parts=np.array([0]))
    with pytest.raises(ValueError, match="increasing"):
        Pairs(np.arange(3), parts=np.array([0, 2, 1]), complete=lambda i: None)


@pytest.mark.parametrize("world", [1, 2])
def test_a_long_lazy_pass_is_read_window_by_window(world: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts permuted, windows of 200 items (224: whole global batches): the first batch completes only its window."""
    lazy = _Lazy()
    dl = CellBatches({"i": np.arange(2000)}, lazy, batch_size=16, seed=1, source_fields={"s": "i"}, window=200)
    dl._n = 1000
    step = 16 * world
    window = -(-200 // step) * step
    shards, early = [], []
    for rank in range(world):
        monkeypatch.setattr(loader, "_world", lambda rank=rank: (rank, world))
        dl.epoch = 0
        batches = []
        for b in dl:
            np.testing.assert_array_equal(b["s"].numpy(), b["i"].numpy() + 1000)  # completed before being read
            batches.append(b["i"].numpy())
            if len(batches) == 1:
                early.append(set(lazy.calls))
        assert len(batches) == len(dl)
        shards.append(batches)
    items = np.concatenate([np.concatenate(s) for s in shards])
    np.testing.assert_array_equal(np.sort(items), np.arange(1000))  # every item once over the processes
    pairs = lazy(np.random.default_rng(0))
    first_window = np.concatenate([np.concatenate([s[k] for s in shards]) for k in range(window // step)])
    assert len(first_window) == window
    in_window = set(pairs.part_of(first_window).tolist())
    assert len(in_window) < len(pairs.parts) / 3
    assert all(done <= in_window for done in early)  # the first batch needed only parts of the first window


def test_take_rows() -> None:
    t = torch.arange(10.0)
    np.testing.assert_array_equal(take_rows(t, np.array([3, 1])).numpy(), [3.0, 1.0])
    np.testing.assert_array_equal(take_rows(np.arange(5), np.array([4])).numpy(), [4])


def test_row_reader_gives_a_csr_one_index_type_without_copying_values():
    """anndata's CSR (int64 indptr, int32 indices) is read through one index type: same rows, values shared."""
    from vcell.data import RowReader

    X = sparse.random(300, 40, density=0.3, format="csr", dtype=np.float32, random_state=0)
    X.indptr = X.indptr.astype(np.int64)
    assert X.indices.dtype == np.int32
    reader = RowReader(X)
    assert reader.X.indptr.dtype == reader.X.indices.dtype == np.int32
    assert reader.X.data is X.data
    assert reader.X.indices is X.indices
    assert X.indptr.dtype == np.int64  # the user's matrix is left as it was
    idx = np.random.default_rng(1).integers(0, 300, 64)
    np.testing.assert_array_equal(reader(idx), X[idx].toarray())


def test_lookup_rows_are_the_table_rows_of_the_codes() -> None:
    table = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    codes = np.array([2, 0, 0, 1, 2])
    field = loader.Lookup(table, codes)
    assert len(field) == 5
    np.testing.assert_array_equal(take_rows(field, np.array([4, 1, 3])).numpy(), [[4, 5], [0, 1], [2, 3]])
    dl = CellBatches({"v": field, "i": np.arange(5)}, np.arange(5), batch_size=2, seed=0)
    for b in dl:
        np.testing.assert_array_equal(b["v"].numpy(), table[codes[b["i"].numpy()]].numpy())
    with pytest.raises(ValueError, match="row numbers"):
        loader.Lookup(table, np.array([0, 3]))


@pytest.mark.parametrize(("rows", "dtype"), [(3, np.int8), (128, np.int8), (129, np.int16), (40_000, np.int32)])
def test_lookup_codes_take_the_narrowest_type(rows, dtype) -> None:
    """One byte per cell up to 128 distinct rows (int64 codes were 8); batches read int64 table rows as before."""
    table = torch.arange(rows)
    codes = np.array([rows - 1, 0, rows // 2], dtype=np.int64)
    field = loader.Lookup(table, codes)
    assert field.codes.dtype == dtype
    out = take_rows(field, np.array([2, 0]))
    assert out.dtype == torch.long
    np.testing.assert_array_equal(out.numpy(), [rows // 2, rows - 1])


def _pairs_with_gaps(rng: np.random.Generator) -> Pairs:
    """Targets: every cell but a gap of 120 rows and every 7th cell; sources: random cells anywhere."""
    keep = np.setdiff1d(np.arange(1000), np.r_[np.arange(400, 520), np.arange(0, 1000, 7)])
    return Pairs(keep, rng.choice(1000, size=len(keep)), {"e": np.arange(len(keep))})


@pytest.mark.parametrize("storage", ["csr", "csc", "dense"])
@pytest.mark.parametrize("world", [1, 2])
def test_block_windows_read_once_give_the_batches_of_memory(
    storage: str, world: int, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """Backed block-shuffled batches (each window read once) hold the cells, sources and values of memory."""
    n = 1000
    X = sparse.random(n, 6, density=0.4, format="csr", dtype=np.float32, random_state=1)
    path = tmp_path / "w.h5ad"
    stored = {"csr": X, "csc": sparse.csc_matrix(X), "dense": X.toarray()}[storage]
    ad.AnnData(stored).write_h5ad(path)
    on_disk = ad.read_h5ad(path, backed="r").X

    def batches(M, rank: int) -> list[dict]:
        monkeypatch.setattr(loader, "_world", lambda: (rank, world))
        fields = {"X": RowReader(M, transform=np.log1p), "i": np.arange(n)}
        opts = {"batch_size": 16, "seed": 5, "window_blocks": 4, "shuffle": "block", "source_fields": {"s": "X"}}
        return list(CellBatches(fields, _pairs_with_gaps, n_items=1, **opts))

    reads = []
    window_rows = RowReader._read_runs
    monkeypatch.setattr(RowReader, "_read_runs", lambda self, uniq: reads.append(uniq.size) or window_rows(self, uniq))
    monkeypatch.setattr(RowReader, "_read_backed", lambda self, idx: pytest.fail("a batch read from disk"))
    for rank in range(world):
        want, got = batches(X, rank), batches(on_disk, rank)
        assert len(got) == len(want) > 0
        for a, b in zip(got, want, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-6)
    assert len(reads) == -(-len(got) // 4) * world  # one read per window per process
    assert max(reads) <= 2 * 4 * 16  # a window's targets and sources: bounded by the window, not the data


def test_window_runs_read_only_what_they_need(matrix: np.ndarray, backed: ad.AnnData) -> None:
    reader = RowReader(backed.X)
    idx = np.r_[np.arange(10, 40), [299, 150, 12, 10], np.arange(200, 280, 9)]  # a run, scattered rows, repeats
    window = reader.window(idx)
    assert window.reader.X.shape[0] < 60  # 30 rows of the run and the 13 scattered ones: not their span
    np.testing.assert_array_equal(window(idx[::-1]), matrix[idx[::-1]])
    with pytest.raises(KeyError, match="window"):
        window(np.array([0]))


@pytest.mark.parametrize("storage", ["csr", "dense"])
def test_a_backed_reader_pickles_by_its_file(storage: str, tmp_path) -> None:
    """``ddp_spawn`` pickles the loaders: a backed reader reopens its HDF5 matrix and reads the same rows."""
    import pickle

    X = sparse.random(50, 6, density=0.4, format="csr", dtype=np.float32, random_state=2)
    path = tmp_path / "p.h5ad"
    ad.AnnData(X if storage == "csr" else X.toarray()).write_h5ad(path)
    reader = RowReader(ad.read_h5ad(path, backed="r").X, transform=np.log1p)
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.kind == reader.kind
    assert copy.backed
    idx = np.array([49, 3, 3, 10])
    np.testing.assert_array_equal(copy(idx), reader(idx))
    np.testing.assert_allclose(copy(idx), np.log1p(X[idx].toarray()), rtol=1e-6)
