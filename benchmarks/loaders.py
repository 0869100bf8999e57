"""Out-of-core loaders compared on the same sparse counts: vcell's ``CellBatches``, annbatch and scvi-tools.

Data: the negative-binomial count files of ``benchmarks/scale.py`` (CSR float32 h5ad, 2,000 genes, cells in random
order; written by that script's generator when missing), e.g. ``/tmp/vcell_scale/nb1_100000x2000_p100_t3_s0.h5ad``.

Preparation (each in a fresh process, timed, peak RSS measured, cached under ``--cache``):

* ``zarr``: the h5ad converted to anndata's zarr (v3, anndata's default chunks, shards and codec) streamed in
  blocks of 5,000 rows (``anndata.experimental.read_elem_lazy`` on the h5ad's ``X`` + ``AnnData.write_zarr``, which
  appends the dask blocks one by one): the input of the ``vcell/zarr`` rows.
* ``annbatch``: annbatch's preshuffled collection (``annbatch.DatasetCollection(...).add_adatas([h5ad])``: blocks of
  ``shuffle_chunk_size=1000`` consecutive cells dealt to datasets of ``--annbatch-dataset-size``, each permuted in
  memory and written as sharded zarr with ``n_obs_per_chunk=64``), then the map from collection rows to file rows
  (outside the timing).

Rows (each repeated ``--repeats`` times, interleaved: row 1..k, then again; every run a fresh process):

* ``vcell/memory/full``: ``vcell.data.CellBatches`` over a ``RowReader`` of the CSR matrix read into memory,
  ``shuffle="full"`` (one permutation per epoch);
* ``vcell/memory-cast/full``: the same with the CSR's index arrays cast once to one dtype (``indptr`` to int32,
  like ``indices``): with int64 ``indptr`` and int32 ``indices`` (what anndata reads), SciPy's row selection casts
  the whole ``indices`` array on every batch;
* ``vcell/h5ad/block``, ``vcell/h5ad/full``: the same over ``anndata.read_h5ad(path, backed="r").X`` (anndata's
  ``CSRDataset``), with block shuffling (blocks of ``batch_size`` consecutive cells, cells permuted within windows
  of 32 blocks; what ``shuffle="auto"`` picks on disk; since issue 19's loader change each window is read once, its
  blocks' runs of rows in one anndata read of a row mask, and its batches are served from memory) and with full
  shuffling (every batch's rows read from the file);
* ``vcell/zarr/block``, ``vcell/zarr/full``: the same over ``anndata.io.sparse_dataset`` of the converted zarr's ``X``
  (zarr-python's codec pipeline);
* ``vcell/preshuffled/block``: vcell's block shuffling over the annbatch collection's single dataset (only when the
  collection is one dataset): annbatch's preshuffle with vcell's reader;
* ``annbatch``: ``annbatch.Loader(batch_size, chunk_size=--annbatch-chunk-size, preload_nchunks=--annbatch-preload,
  shuffle=True, to="torch", return_index=True, preload_to_gpu=False)`` over the collection, zarrs codec pipeline (as
  annbatch recommends on local disks), ``X`` only (``load_adata`` reads ``X`` as a ``sparse_dataset``); its sparse
  torch CSR batches densified with ``Tensor.to_dense()`` (annbatch's README densifies on the GPU: on a CPU, torch's
  CSR-to-dense conversion is most of the loop);
* ``annbatch/scipy``: the same with ``to=None`` (SciPy CSR batches) densified by SciPy (``toarray()``): the CPU path;
* ``sketch/h5ad/window`` (not a vcell API: the measurement that led to the change above, kept for comparison; one
  anndata slice read per block instead of vcell's one read per window): vcell's block order (blocks of
  ``batch_size`` consecutive cells permuted, windows of 32 blocks), but each window read once as 32 contiguous
  slices of the backed h5ad, permuted in memory and split into batches (what annbatch does with its preloaded
  chunks), instead of reading every batch's 128 scattered rows (anndata reads those row by row);
* ``scvi/h5ad/full``: scvi-tools' ``AnnDataLoader(shuffle=True)`` over an ``AnnDataManager`` with ``X`` registered
  on the backed AnnData.

Every row yields dense float32 torch tensors of (batch_size x genes) (annbatch's sparse CSR tensors are densified
with ``to_dense()`` in the timed loop) for ``--max-batches`` batches or one epoch, whichever is shorter, stopping
early after ``--max-seconds``. ``--threads`` BLAS/OpenMP/numba/torch/zarr threads. Metrics per run: ``cells/s``
(cells yielded / wall time of the loop), ``cells/CPU-s`` (the same per second of process CPU time: less sensitive
to other processes on a shared machine), ``setup s`` (opening the data and building the loader; for the memory row,
reading the matrix), peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` of the process: imports included, ``import RSS``
is the same before the data are opened), and two shuffle measures on the file-row index of every yielded cell:
``|r|``, the absolute correlation of batch number and file row over all yielded cells (0: no drift through the file,
1: sequential), and ``mix``, the mean number of distinct 1,000-row segments of the file per batch divided by its
expectation for a uniformly random batch (1: as mixed as full shuffling; ~0.01: consecutive rows). Every run checks
that the yielded values sum to the row sums of the cells it reports (``sum ok``).

Usage::

    python benchmarks/loaders.py --data /tmp/vcell_scale/nb1_100000x2000_p100_t3_s0.h5ad --repeats 3
    python benchmarks/loaders.py --quick   # 10k cells, 50 batches, 1 repeat

The ``annbatch`` rows need a Python >= 3.12 environment with ``annbatch[zarrs,torch]`` installed (run the script
with that interpreter: children use ``sys.executable``); without it they are rows saying so. Outputs: the table on
stdout, ``<out>/loaders_<tag>.csv`` (every run) and ``<out>/loaders_<tag>.md`` (medians and ranges, preparation,
the command and the machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ROWS = (
    "vcell/memory/full",
    "vcell/memory-cast/full",
    "vcell/h5ad/block",
    "vcell/h5ad/full",
    "vcell/zarr/block",
    "vcell/zarr/full",
    "vcell/preshuffled/block",
    "annbatch",
    "annbatch/scipy",
    "scvi/h5ad/full",
    "sketch/h5ad/window",
)
GB = 1024**3
SEGMENT = 1000  # file rows per segment of the ``mix`` measure


# ---------------------------------------------------------------------------------------------------- child helpers


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _set_threads(threads: int) -> None:
    import torch
    import zarr

    torch.set_num_threads(threads)
    zarr.config.set({"threading.max_workers": threads})


def _paths(spec: dict) -> dict[str, Path]:
    cache, stem = Path(spec["cache"]), Path(spec["path"]).stem
    return {
        "zarr": cache / f"{stem}.zarr",
        "collection": cache / f"{stem}_annbatch_{spec['annbatch_dataset_size']}.zarr",
        "perm": cache / f"{stem}_annbatch_{spec['annbatch_dataset_size']}_rows.npy",
        "rowsums": cache / f"{stem}_rowsums.npy",
    }


def _vcell_batches(X: Any, spec: dict, shuffle: str, index: Any = None):
    """``CellBatches`` over ``X`` yielding ``X`` and ``i`` (the file row of each cell)."""
    import numpy as np

    from vcell.data._loader import CellBatches, RowReader

    n = X.shape[0]
    index = np.arange(n, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    return CellBatches(
        {"X": RowReader(X), "i": index},
        np.arange(n),
        batch_size=spec["batch_size"],
        seed=spec["seed"],
        shuffle=shuffle,
    )


def _open(spec: dict) -> tuple[Any, Any]:
    """The row's loader and a function ``batch -> (dense float32 tensor, row indices)``."""
    import numpy as np

    row, paths = spec["row"], _paths(spec)
    loader_kind, storage, shuffle = ([*row.split("/"), "", ""])[:3]

    def vcell_batch(b):
        return b["X"], b["i"].numpy()

    if loader_kind == "vcell":
        import anndata as ad

        if storage in ("memory", "memory-cast"):
            import h5py

            with h5py.File(spec["path"], "r") as f:
                X = ad.io.read_elem(f["X"])  # the CSR matrix, in memory (anndata: int64 indptr, int32 indices)
            if storage == "memory-cast":  # one index dtype: scipy's row selection then copies no index array
                if X.nnz < np.iinfo(np.int32).max and X.indices.dtype == np.int32:
                    X.indptr = X.indptr.astype(np.int32)
                else:
                    X.indices = X.indices.astype(np.int64)
        elif storage == "h5ad":
            X = ad.read_h5ad(spec["path"], backed="r").X
        elif storage == "zarr":
            import zarr

            X = ad.io.sparse_dataset(zarr.open_group(paths["zarr"], mode="r")["X"])
        elif storage == "preshuffled":
            import zarr

            group = zarr.open_group(paths["collection"], mode="r")
            keys = sorted(k for k in group.keys() if k.startswith("dataset_"))
            if len(keys) != 1:
                msg = f"skipped: the collection has {len(keys)} datasets (vcell reads one matrix)"
                raise _Skip(msg)
            X = ad.io.sparse_dataset(group[keys[0]]["X"])
            return _vcell_batches(X, spec, shuffle, index=np.load(paths["perm"])), vcell_batch
        else:
            msg = f"unknown storage {storage!r} in row {row!r}"
            raise ValueError(msg)
        return _vcell_batches(X, spec, shuffle), vcell_batch
    if loader_kind == "annbatch":
        try:
            import annbatch
        except ImportError as err:
            msg = f"skipped: annbatch not importable in {sys.executable} ({err})"
            raise _Skip(msg) from None
        import anndata as ad
        import torch
        import zarr

        zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
        perm = np.load(paths["perm"])
        loader = annbatch.Loader(
            batch_size=spec["batch_size"],
            chunk_size=spec["annbatch_chunk_size"],
            preload_nchunks=spec["annbatch_preload"],
            shuffle=True,
            rng=np.random.default_rng(spec["seed"]),
            to=None if storage == "scipy" else "torch",
            return_index=True,
            preload_to_gpu=False,
        )
        loader.use_collection(
            annbatch.DatasetCollection(paths["collection"], mode="r"),
            load_adata=lambda g: ad.AnnData(X=ad.io.sparse_dataset(g["X"])),
        )
        if storage == "scipy":  # scipy CSR batches, densified by scipy
            return loader, lambda b: (torch.from_numpy(b["X"].toarray()), perm[b["index"]])
        return loader, lambda b: (b["X"].to_dense(), perm[b["index"]])
    if loader_kind == "sketch":
        import anndata as ad

        X = ad.read_h5ad(spec["path"], backed="r").X
        return _WindowBatches(X, spec["batch_size"], spec["seed"]), vcell_batch
    if loader_kind == "scvi":
        import anndata as ad
        from scvi.data import AnnDataManager
        from scvi.data.fields import LayerField, NumericalObsField
        from scvi.dataloaders import AnnDataLoader

        adata = ad.read_h5ad(spec["path"], backed="r")
        adata.obs["_row"] = np.arange(adata.n_obs)
        manager = AnnDataManager(fields=[LayerField("X", None, is_count_data=False), NumericalObsField("row", "_row")])
        manager.register_fields(adata)
        loader = AnnDataLoader(
            manager, shuffle=True, batch_size=spec["batch_size"], data_and_attributes={"X": np.float32, "row": np.int64}
        )
        return loader, lambda b: (b["X"], b["row"].numpy().ravel())
    msg = f"unknown row {row!r}; expected one of {ROWS}"
    raise ValueError(msg)


class _WindowBatches:
    """vcell's block order, each window of ``window_blocks`` blocks read as contiguous slices (``sketch`` row)."""

    def __init__(self, X: Any, batch_size: int, seed: int, window_blocks: int = 32) -> None:
        self.X, self.batch_size, self.seed, self.window_blocks = X, batch_size, seed, window_blocks

    def __iter__(self):
        import numpy as np
        import torch
        from scipy import sparse

        n, b = self.X.shape[0], self.batch_size
        rng = np.random.default_rng([self.seed, 0])
        starts = np.arange(0, n, b)[rng.permutation(-(-n // b))]
        for w in range(0, len(starts), self.window_blocks):
            window = np.sort(starts[w : w + self.window_blocks])
            block = sparse.vstack([self.X[int(s) : min(int(s) + b, n)] for s in window], format="csr")
            rows = np.concatenate([np.arange(s, min(s + b, n)) for s in window])
            perm = rng.permutation(len(rows))
            for k in range(0, len(perm), b):
                pos = perm[k : k + b]
                yield {"X": torch.from_numpy(block[pos].toarray()), "i": torch.from_numpy(rows[pos])}


class _Skip(Exception):
    """A row that cannot run here (says why)."""


def _mix(batches: list, n: int, batch_size: int) -> float:
    """Mean distinct ``SEGMENT``-row segments per full batch over their expectation for a uniformly random batch."""
    import numpy as np

    full = [b for b in batches if len(b) == batch_size]
    if not full:
        return float("nan")
    seen = np.mean([len(np.unique(b // SEGMENT)) for b in full])
    sizes = np.diff(np.r_[np.arange(0, n, SEGMENT), n])

    def untouched(s: int) -> float:  # P(a random batch of batch_size rows misses a segment of s rows)
        if n - s < batch_size:
            return 0.0
        lg = math.lgamma
        return math.exp(lg(n - s + 1) - lg(n - s - batch_size + 1) - lg(n + 1) + lg(n - batch_size + 1))

    expected = sum(1.0 - untouched(int(s)) for s in sizes)
    return float(seen / expected)


def child_loader(spec: dict, out: dict) -> None:
    """One row: build its loader, iterate it, and fill ``out`` with the timings and shuffle measures."""
    import numpy as np
    import torch

    out["import_rss_gb"] = _peak_gb()
    t0 = time.perf_counter()
    loader, unpack = _open(spec)
    out["setup_s"] = time.perf_counter() - t0
    rowsums = np.load(_paths(spec)["rowsums"])
    n, b = len(rowsums), spec["batch_size"]
    epoch_batches = -(-n // b)
    limit = min(spec["max_batches"] or epoch_batches, epoch_batches)
    idx, total, first_s = [], 0.0, None
    t0, c0 = time.perf_counter(), _cpu_s()
    it = iter(loader)
    for _ in range(limit):
        try:
            batch = next(it)
        except StopIteration:
            break
        x, rows = unpack(batch)
        if first_s is None:
            first_s = time.perf_counter() - t0
            if x.dtype != torch.float32 or x.layout != torch.strided or x.ndim != 2 or x.shape[0] != len(rows):
                msg = f"batch is not a dense float32 (cells x genes) tensor: {x.dtype}, {x.layout}, {tuple(x.shape)}"
                raise TypeError(msg)
        total += float(x.sum())  # touches every value (float32 sum: fast)
        idx.append(np.asarray(rows, dtype=np.int64))
        if time.perf_counter() - t0 > spec["max_seconds"]:
            break
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    cells = int(sum(len(i) for i in idx))
    flat = np.concatenate(idx)
    number = np.repeat(np.arange(len(idx)), [len(i) for i in idx])
    expected = float(rowsums[flat].sum())
    out.update(
        {
            "batch_size": b,
            "batches": len(idx),
            "epoch_batches": epoch_batches,
            "cells_yielded": cells,
            "loop_s": wall,
            "cpu_s": cpu,
            "first_batch_s": first_s,
            "cells_per_s": cells / wall,
            "cells_per_cpu_s": cells / cpu if cpu > 0 else float("nan"),
            "abs_r": float(abs(np.corrcoef(number, flat)[0, 1])) if len(idx) > 1 else float("nan"),
            "mix": _mix(idx, n, b),
            "distinct_frac": float(len(np.unique(flat)) / cells),
            "sum_ok": bool(math.isclose(total, expected, rel_tol=1e-5)),
        }
    )


def child_prep(spec: dict, out: dict) -> None:
    """One preparation step: row sums, the zarr conversion or annbatch's collection (timed without the row map)."""
    import numpy as np

    paths, what = _paths(spec), spec["prep"]
    out["import_rss_gb"] = _peak_gb()
    t0 = time.perf_counter()
    if what == "rowsums":
        import h5py

        from vcell.data._chunked import iter_row_blocks

        with h5py.File(spec["path"], "r") as f:
            X = __import__("anndata").io.sparse_dataset(f["X"])
            sums = np.zeros(X.shape[0])
            for start, stop, block in iter_row_blocks(X):
                sums[start:stop] = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
        np.save(paths["rowsums"], sums)
    elif what == "zarr":
        import anndata as ad
        import h5py

        tmp = paths["zarr"].with_name(paths["zarr"].name + ".partial")
        with h5py.File(spec["path"], "r") as f:
            X = ad.experimental.read_elem_lazy(f["X"], chunks=(5000, f["X"].attrs["shape"][1]))
            adata = ad.AnnData(X=X, obs=ad.io.read_elem(f["obs"]), var=ad.io.read_elem(f["var"]))
            adata.write_zarr(tmp)
        tmp.rename(paths["zarr"])
    elif what == "annbatch":
        try:
            import annbatch
        except ImportError as err:
            msg = f"skipped: annbatch not importable in {sys.executable} ({err})"
            raise _Skip(msg) from None
        import anndata as ad
        import h5py
        import zarr

        zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
        tmp = paths["collection"].with_name(paths["collection"].stem + "_partial.zarr")
        collection = annbatch.DatasetCollection(tmp).add_adatas(
            [spec["path"]], dataset_size=spec["annbatch_dataset_size"], rng=np.random.default_rng(spec["seed"])
        )
        out["prep_s"] = time.perf_counter() - t0
        out["datasets"] = len(collection._dataset_keys)
        names = collection.obs().index
        with h5py.File(spec["path"], "r") as f:
            file_names = ad.io.read_elem(f["obs"]).index
        rows = file_names.get_indexer(names)
        if (rows < 0).any() or len(np.unique(rows)) != len(file_names):
            msg = "the collection's obs names do not map one-to-one to the file's"
            raise RuntimeError(msg)
        np.save(paths["perm"], rows.astype(np.int64))
        tmp.rename(paths["collection"])
    else:
        msg = f"unknown preparation step {what!r}"
        raise ValueError(msg)
    out.setdefault("prep_s", time.perf_counter() - t0)
    target = {"rowsums": paths["rowsums"], "zarr": paths["zarr"], "annbatch": paths["collection"]}[what]
    out["disk_gb"] = _du(target) / GB


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def child_main(spec: dict) -> None:
    """A child process: one row or one preparation step; prints ``RESULT <json>``."""
    out: dict[str, Any] = {"status": "ok"}
    try:
        import logging

        logging.getLogger("scvi").setLevel(logging.ERROR)
        import warnings

        warnings.simplefilter("ignore")
        _set_threads(spec["threads"])
        (child_prep if "prep" in spec else child_loader)(spec, out)
    except _Skip as err:
        out["status"] = str(err)
    except Exception as err:  # noqa: BLE001 (every failure is a row of the table)
        import traceback

        traceback.print_exc()
        out["status"] = f"error: {type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err) else ''}"
    out["peak_rss_gb"] = _peak_gb()
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------------- parent


def run_child(spec: dict, args: argparse.Namespace, label: str) -> dict:
    """Run ``spec`` in a fresh process; its result, or a row saying why there is none."""
    logs = Path(args.cache) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(args.threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    log = logs / f"{label.replace('/', '_')}.log"
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=args.timeout,
            check=False,
        )
        log.write_text(proc.stdout + proc.stderr)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        res = json.loads(lines[-1][7:]) if lines else {"status": f"error: exit {proc.returncode} (see {log})"}
    except subprocess.TimeoutExpired:
        res = {"status": f"killed: timeout {args.timeout:g} s"}
    res["wall_s"] = time.perf_counter() - t0
    return res


def warm(paths: list[Path]) -> None:
    """Read the files once so that every row starts from the page cache (not from the disk)."""
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            with file.open("rb") as fh:
                while fh.read(64 << 20):
                    pass


def base_spec(args: argparse.Namespace, path: Path) -> dict:
    """What every child of ``path`` needs from the command line."""
    return {
        "path": str(path),
        "cache": args.cache,
        "threads": args.threads,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "max_batches": args.max_batches,
        "max_seconds": args.max_seconds,
        "annbatch_chunk_size": args.annbatch_chunk_size,
        "annbatch_preload": args.annbatch_preload,
        "annbatch_dataset_size": args.annbatch_dataset_size,
    }


def prepare(args: argparse.Namespace, path: Path, n_obs: int) -> list[dict]:
    """The row sums, the zarr copy and annbatch's collection of ``path`` (made once, cached with their timings)."""
    spec = base_spec(args, path)
    paths = _paths(spec)
    out = []
    for what, target in (("rowsums", paths["rowsums"]), ("zarr", paths["zarr"]), ("annbatch", paths["collection"])):
        if what == "annbatch" and not _wants_annbatch(args):
            continue
        record = target.with_name(target.name + ".prep.json")
        if target.exists() and record.exists():
            res = {**json.loads(record.read_text()), "cached": True}
        else:
            print(f"[prep] {what:<9} {path.name} ...", end=" ", flush=True)
            res = run_child({**spec, "prep": what}, args, f"prep_{what}_{n_obs}")
            print(res["status"], f"{res.get('prep_s', float('nan')):.1f} s", flush=True)
            if res["status"] == "ok":
                record.write_text(json.dumps(res))
            res["cached"] = False
        out.append({"cells": n_obs, "step": what, **res})
    return out


def _wants_annbatch(args: argparse.Namespace) -> bool:
    return any(r.startswith("annbatch") or r == "vcell/preshuffled/block" for r in args.rows)


def run_all(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Prepare every file, then run the rows, ``--repeats`` times interleaved; returns ``(runs, preparations)``."""
    import h5py

    runs, preps = [], []
    for path in args.data:
        path = Path(path)
        if not path.exists():
            sys.path.insert(0, str(REPO / "benchmarks"))
            import scale

            n_cells = int(path.stem.split("_")[1].split("x")[0])
            print(f"[data] writing {path} ...", flush=True)
            scale.generate(path, n_cells, 2000, 100, 3, 0)
        with h5py.File(path, "r") as f:
            n_obs, n_vars = (int(s) for s in f["X"].attrs["shape"])
            nnz = int(f["X"]["data"].shape[0])
        csr_gb = nnz * 8 / GB
        preps += prepare(args, path, n_obs)
        paths = _paths(base_spec(args, path))
        warm([p for p in (path, paths["zarr"], paths["collection"]) if p.exists()])
        for rep in range(args.repeats):
            for row in args.rows:
                info = {"cells": n_obs, "genes": n_vars, "nnz": nnz, "row": row, "repeat": rep}
                print(f"[run] {n_obs:>8} {row:<24} #{rep + 1} ...", end=" ", flush=True)
                if row.startswith("vcell/memory") and csr_gb > args.memory_budget_gb:
                    res = {"status": f"skipped: CSR in memory {csr_gb:.1f} GB > --memory-budget-gb"}
                else:
                    res = run_child({**base_spec(args, path), "row": row}, args, f"{n_obs}_{row}_{rep}")
                print(res["status"], f"{res.get('cells_per_s', float('nan')):.0f} cells/s", flush=True)
                runs.append({**info, **res})
    return runs, preps


# ---------------------------------------------------------------------------------------------------- report


def _range(values, fmt: str) -> str:
    import numpy as np

    v = np.asarray([x for x in values if x == x], dtype=float)  # NaN != NaN
    if not len(v):
        return ""
    med = fmt.format(np.median(v))
    return med if len(v) == 1 else f"{med} [{fmt.format(v.min())}-{fmt.format(v.max())}]"


def summary(runs: list[dict]):
    """One line per (cells, row): medians and ranges over the repeats that ran."""
    import pandas as pd

    df = pd.DataFrame(runs)
    if df.empty:
        return df
    rows = []
    for (cells, row), g in df.groupby(["cells", "row"], sort=False):
        ok = g[g["status"] == "ok"]
        if ok.empty:  # every repeat says the same (a skip) or the first failure
            rows.append({"cells": cells, "loader": row, "status": g["status"].iloc[0]})
            continue
        first = ok.iloc[0]
        rows.append(
            {
                "cells": cells,
                "loader": row,
                "batches": f"{int(ok['batches'].median())} x {int(first['batch_size'])}"
                + (" (epoch)" if (ok["batches"] == ok["epoch_batches"]).all() else ""),
                "cells/s": _range(ok["cells_per_s"], "{:,.0f}"),
                "cells/CPU-s": _range(ok["cells_per_cpu_s"], "{:,.0f}"),
                "peak RSS GB": _range(ok["peak_rss_gb"], "{:.2f}"),
                "import RSS GB": _range(ok["import_rss_gb"], "{:.2f}"),
                "setup s": _range(ok["setup_s"], "{:.2f}"),
                "drift": f"{ok['abs_r'].median():.3f}",
                "mix": f"{ok['mix'].median():.2f}",
                "sum ok": "yes" if ok["sum_ok"].all() else "NO",
                "status": "ok" if len(ok) == len(g) else f"{len(ok)}/{len(g)} ok",
            }
        )
    cols = ["cells", "loader", "batches", "cells/s", "cells/CPU-s", "peak RSS GB", "import RSS GB", "setup s"]
    cols += ["drift", "mix", "sum ok", "status"]
    return pd.DataFrame(rows).reindex(columns=cols).fillna("")


def prep_table(preps: list[dict]):
    """One line per preparation step."""
    import pandas as pd

    rows = [
        {
            "cells": p["cells"],
            "step": p["step"],
            "status": p["status"],
            "time s": f"{p['prep_s']:.1f}" if "prep_s" in p else "",
            "peak RSS GB": f"{p['peak_rss_gb']:.2f}" if "peak_rss_gb" in p else "",
            "on disk GB": f"{p['disk_gb']:.3f}" if "disk_gb" in p else "",
            "datasets": f"{int(p['datasets'])}" if p.get("datasets", float("nan")) == p.get("datasets") else "",
            "measured": "earlier run (cached)" if p.get("cached") else "this run",
        }
        for p in preps
    ]
    return pd.DataFrame(rows)


def markdown(df) -> str:
    """A pipe table of ``df`` (strings, no tabulate needed)."""
    cols = list(df.columns)
    cells = [[str(v) for v in row] for row in df.itertuples(index=False)]
    width = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(cols)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(cols, width, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in width) + "|",
    ]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, width, strict=True)) + " |" for r in cells]
    return "\n".join(lines)


def machine() -> str:
    """CPU model, cores, memory and Python version."""
    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    return f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GB RAM, Python {sys.version.split()[0]}"


def versions() -> str:
    """Versions of the packages the rows use."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("anndata", "zarr", "zarrs", "h5py", "scipy", "numpy", "torch", "annbatch", "scvi-tools"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} -")
    return ", ".join(out)


def report(runs: list[dict], preps: list[dict], args: argparse.Namespace, total_s: float) -> None:
    """Print the tables; write every run (csv), the preparation (csv), the run's context (json) and the tables (md)."""
    import pandas as pd

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or "_".join(f"{int(r['cells']) // 1000}k" for r in {r["cells"]: r for r in runs}.values())
    pd.DataFrame(runs).to_csv(out / f"loaders_{tag}.csv", index=False)
    pd.DataFrame(preps).to_csv(out / f"loaders_{tag}_prep.csv", index=False)
    meta = {
        "command": " ".join(["python", "benchmarks/loaders.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "versions": versions(),
        "threads": args.threads,
        "repeats": args.repeats,
        "total_min": round(total_s / 60, 1),
        "annbatch": f"chunk_size={args.annbatch_chunk_size}, preload_nchunks={args.annbatch_preload}, "
        f"collection dataset_size={args.annbatch_dataset_size}",
    }
    (out / f"loaders_{tag}.json").write_text(json.dumps(meta, indent=1) + "\n")
    write_markdown(out, tag)


def write_markdown(out: Path, tag: str) -> None:
    """``loaders_<tag>.md`` from ``loaders_<tag>.csv``, ``_prep.csv`` and ``.json`` (also: ``--markdown TAG``)."""
    import pandas as pd

    runs = pd.read_csv(out / f"loaders_{tag}.csv").to_dict("records")
    prep_csv = out / f"loaders_{tag}_prep.csv"
    preps = pd.read_csv(prep_csv).to_dict("records") if prep_csv.stat().st_size > 1 else []
    meta = json.loads((out / f"loaders_{tag}.json").read_text())
    table, prep = markdown(summary(runs)), markdown(prep_table(preps))
    print("\n" + table + "\n\n" + prep)
    md = [
        f"# Out-of-core loaders ({tag})",
        "",
        f"`{meta['command']}`: {meta['date']}, {meta['machine']}, {meta['threads']} threads, {meta['repeats']} "
        f"repeat(s) per row (interleaved, each a fresh process; median [min-max]), total {meta['total_min']} min. "
        f"{meta['versions']}. annbatch: {meta['annbatch']}. Files read once before the rows (warm page cache).",
        "",
        table,
        "",
        "Columns (see the docstring of `benchmarks/loaders.py`): `drift`, the absolute correlation of batch number and "
        "file row over all yielded cells (0: no drift through the file, 1: sequential); `mix`, distinct 1,000-row "
        "file segments per batch over their expectation for a random batch (1: as mixed as full shuffling); `sum ok`, "
        "the yielded values sum to the row sums of the reported cells.",
        "",
        "## Preparation",
        "",
        prep,
        "",
    ]
    (out / f"loaders_{tag}.md").write_text("\n".join(md), encoding="utf-8")
    print(f"\nwrote {out / f'loaders_{tag}.md'} (and .csv, _prep.csv, .json)")


def main() -> None:
    """Command line (see the module docstring)."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])

    def names(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    parser.add_argument("--data", type=names, default=["/tmp/vcell_scale/nb1_100000x2000_p100_t3_s0.h5ad"])
    parser.add_argument("--rows", type=names, default=list(ROWS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--max-batches", type=int, default=2000, help="batches per run (0 or more than an epoch: one epoch)"
    )
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop a run's loop after this long")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--annbatch-chunk-size", type=int, default=32)
    parser.add_argument("--annbatch-preload", type=int, default=256)
    parser.add_argument("--annbatch-dataset-size", default="512MB", help="annbatch's dataset_size (rows or bytes)")
    parser.add_argument("--memory-budget-gb", type=float, default=3.0, help="skip the memory row above this CSR size")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    parser.add_argument("--cache", default="/tmp/loaders_cache")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "loaders"))
    parser.add_argument("--tag", default="", help="output file suffix (default: the sizes)")
    parser.add_argument("--quick", action="store_true", help="10k cells, 50 batches, 1 repeat")
    parser.add_argument("--markdown", metavar="TAG", help="only rewrite <out>/loaders_TAG.md from its csv and json")
    args = parser.parse_args()
    if args.markdown:
        write_markdown(Path(args.out), args.markdown)
        return
    bad = sorted(set(args.rows) - set(ROWS))
    if bad:
        parser.error(f"unknown --rows {bad}; expected some of {list(ROWS)}")
    if args.quick:
        args.data = ["/tmp/vcell_scale/nb1_10000x2000_p100_t3_s0.h5ad"]
        args.max_batches, args.repeats, args.tag = 50, 1, args.tag or "quick"
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs, preps = run_all(args)
    report(runs, preps, args, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
