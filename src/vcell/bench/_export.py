"""Predictions and true cells written in cell-eval's input format (Arc Institute's Virtual Cell Challenge evaluator).

cell-eval (``cell-eval run -ap pred.h5ad -ar real.h5ad``) compares two h5ad files: the predicted cells and the real
ones, with the same genes in the same order, a perturbation column (``target_gene`` by default) whose labels are the
same set in both files, and the control cells (``non-targeting`` by default) in both, since it computes each file's
differential expression against that file's own controls. Expression is log1p-normalised (non-negative, below 15;
a matrix without fractional values is taken for counts and normalised again).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from vcell._settings import logger

if TYPE_CHECKING:
    from anndata import AnnData

#: cell-eval's CLI defaults (``cell-eval run --pert-col``, ``--control-pert``)
CELL_EVAL_PERT_COL = "target_gene"
CELL_EVAL_CONTROL = "non-targeting"
#: cell-eval refuses log-normalised data with values at or above this (``guess_is_lognorm``'s ``max_threshold``)
_CELL_EVAL_MAX = 15.0
#: and reads a matrix without a fractional part above this as counts
_CELL_EVAL_FRACTION = 1e-3


def _safe_name(name: str) -> str:
    """``name`` with every run of characters other than letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "_"


def _is_sparse_source(X: Any) -> bool:
    from vcell.data._chunked import _source_kind

    return _source_kind(X) in ("sparse", "backed_csr", "backed_csc")


class _Stats:
    """What was written: cells, negative values clipped to 0, largest value, whether any value has a fraction."""

    def __init__(self) -> None:
        self.n_cells = 0
        self.n_clipped = 0
        self.max_value = 0.0
        self.has_fraction = False


def _clean_block(block: Any, *, what: str, clip_negative: bool, stats: _Stats) -> Any:
    """A block (dense float32 or CSR float32) checked and, with ``clip_negative``, clipped at 0."""
    block = sparse.csr_matrix(block, dtype=np.float32) if sparse.issparse(block) else np.asarray(block, np.float32)
    values = block.data if sparse.issparse(block) else block
    if not np.isfinite(values).all():
        msg = f"{what} holds NaN or infinite values; cell-eval needs finite log1p expression"
        raise ValueError(msg)
    neg = values < 0
    n_neg = int(neg.sum())
    if n_neg:
        if not clip_negative:
            msg = (
                f"{what} holds {n_neg} negative values (min {float(values.min()):.3g}); cell-eval refuses negative "
                "expression: pass clip_negative=True to write them as 0"
            )
            raise ValueError(msg)
        values = np.where(neg, np.float32(0.0), values)
        if sparse.issparse(block):
            block = sparse.csr_matrix((values, block.indices, block.indptr), shape=block.shape)
        else:
            block = values
        stats.n_clipped += n_neg
    if values.size:
        stats.max_value = max(stats.max_value, float(values.max()))
        if not stats.has_fraction:
            stats.has_fraction = bool((np.modf(values)[0] > _CELL_EVAL_FRACTION).any())
    stats.n_cells += block.shape[0]
    return block


def _write_h5ad(
    path: Path,
    parts: list[tuple[str, Any, np.ndarray | None]],
    var_names: pd.Index,
    *,
    pert_col: str,
    cell_prefix: str,
    uns: Mapping[str, Any],
    clip_negative: bool,
    what: str,
) -> _Stats:
    """Write the rows of several matrices, each labelled, as one h5ad, block by block.

    ``parts`` holds ``(label, X, rows)``: rows ``rows`` of ``X`` (all rows for ``None``; dense, sparse or backed) are
    written in that order with ``obs[pert_col] = label``. ``X`` of the file is CSR when any part is sparse, else
    dense float32; no part is read whole (:func:`vcell.data.iter_row_blocks`). A file left half-written by an error is
    removed.
    """
    import h5py
    from anndata.io import sparse_dataset, write_elem

    from vcell.data import iter_row_blocks

    sizes = [X.shape[0] if rows is None else len(rows) for _, X, rows in parts]
    n = int(sum(sizes))
    labels = np.concatenate([np.full(k, lab, dtype=object) for (lab, _, _), k in zip(parts, sizes, strict=True)])
    cats = list(dict.fromkeys(lab for lab, _, _ in parts))
    obs = pd.DataFrame(
        {pert_col: pd.Categorical(labels, categories=cats)},
        index=pd.Index([f"{cell_prefix}{i}" for i in range(n)], name=None),
    )
    as_sparse = any(_is_sparse_source(X) for _, X, _ in parts)
    stats = _Stats()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(path, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            write_elem(f, "obs", obs)
            write_elem(f, "var", pd.DataFrame(index=pd.Index(np.asarray(var_names).astype(str), name=None)))
            for key in ("obsm", "varm", "obsp", "varp", "layers"):
                write_elem(f, key, {})
            write_elem(f, "uns", dict(uns))
            dense = None
            csr = None
            at = 0
            for lab, X, rows in parts:
                for _, _, block in iter_row_blocks(X, rows=rows):
                    block = _clean_block(block, what=f"{what} ({lab!r})", clip_negative=clip_negative, stats=stats)
                    if as_sparse:
                        block = sparse.csr_matrix(block)
                        block.indptr = block.indptr.astype(np.int64)  # appended rows can pass int32's range
                        if csr is None:
                            write_elem(f, "X", block, dataset_kwargs={"chunks": (1 << 18,)})
                            csr = sparse_dataset(f["X"])
                        else:
                            csr.append(block)
                    else:
                        if dense is None:
                            dense = f.create_dataset("X", shape=(n, len(var_names)), dtype=np.float32)
                            dense.attrs["encoding-type"] = "array"
                            dense.attrs["encoding-version"] = "0.2.0"
                        dense[at : at + block.shape[0]] = block
                    at += block.shape[0]
            if dense is None and csr is None:
                write_elem(f, "X", sparse.csr_matrix((0, len(var_names)), dtype=np.float32))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if stats.max_value >= _CELL_EVAL_MAX:
        logger.warning(
            "%s: largest value %.3g; cell-eval refuses log1p data at or above %g", path, stats.max_value, _CELL_EVAL_MAX
        )
    if n and not stats.has_fraction:
        logger.warning("%s: no value has a fractional part; cell-eval will read it as counts and normalise it", path)
    return stats


def _group_rows(labels: np.ndarray, perts: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    for p in perts:
        yield p, np.flatnonzero(labels == p)


class _Writer:
    """The real file (controls + true cells) and the predicted files (controls + predicted cells) of one setting."""

    def __init__(
        self,
        out_dir: Path,
        control_X: Any,
        true_X: Any,
        true_labels: np.ndarray,
        var_names: pd.Index,
        *,
        pert_col: str,
        control_pert: str,
        clip_negative: bool,
        uns: Mapping[str, Any],
    ):
        self.out_dir = Path(out_dir)
        self.control_X = control_X
        self.true_X = true_X
        self.true_labels = np.asarray(true_labels).astype(str)
        self.var_names = var_names
        self.pert_col = pert_col
        self.control_pert = control_pert
        self.clip_negative = clip_negative
        self.uns = dict(uns)
        self.perts = sorted(set(self.true_labels))
        if control_pert in self.perts:
            msg = (
                f"control_pert {control_pert!r} is also the label of perturbed cells; choose another control_pert "
                "(cell-eval's --control-pert)"
            )
            raise ValueError(msg)
        self.real: dict[tuple[str, ...], tuple[Path, _Stats]] = {}
        self.files: set[str] = set()

    def _real_file(self, perts: list[str], suffix: str) -> tuple[Path, _Stats]:
        key = tuple(perts)
        if key not in self.real:
            path = self.out_dir / f"real{suffix}.h5ad"
            parts = [(self.control_pert, self.control_X, None)]
            parts += [(p, self.true_X, idx) for p, idx in _group_rows(self.true_labels, perts)]
            stats = _write_h5ad(
                path,
                parts,
                self.var_names,
                pert_col=self.pert_col,
                cell_prefix="real_",
                uns={**self.uns, "vcell_export": "real"},
                clip_negative=False,
                what=f"true cells of {path.name}",
            )
            self.real[key] = (path, stats)
        return self.real[key]

    def add(self, name: str, pred_X: Any, pred_labels: np.ndarray) -> dict[str, Any]:
        """Write the predicted file of model ``name`` (and the real file it pairs with); its manifest row."""
        safe = _safe_name(name)
        if safe in self.files:
            msg = f"two models write to pred_{safe}.h5ad in {self.out_dir}; give them names that differ in letters"
            raise ValueError(msg)
        self.files.add(safe)
        labels = np.asarray(pred_labels).astype(str)
        perts = [p for p in self.perts if p in set(labels)]
        extra = sorted(str(x) for x in set(labels) - set(self.perts))
        if extra:
            logger.info("%s: predicted conditions without true cells left out of the export: %s", name, extra)
        if not perts:
            msg = f"{name}: no predicted perturbation has true cells; nothing to export"
            raise ValueError(msg)
        real, real_stats = self._real_file(perts, "" if perts == self.perts else f"_{safe}")
        path = self.out_dir / f"pred_{safe}.h5ad"
        parts = [(self.control_pert, self.control_X, None)]
        parts += [(p, pred_X, idx) for p, idx in _group_rows(labels, perts)]
        stats = _write_h5ad(
            path,
            parts,
            self.var_names,
            pert_col=self.pert_col,
            cell_prefix="pred_",
            uns={**self.uns, "vcell_export": "pred", "model": str(name)},
            clip_negative=self.clip_negative,
            what=f"predictions of {name}",
        )
        n_ctrl = int(self.control_X.shape[0])
        return {
            "model": str(name),
            "pred": str(path),
            "real": str(real),
            "n_perturbations": len(perts),
            "n_control_cells": n_ctrl,
            "n_pred_cells": stats.n_cells - n_ctrl,
            "n_real_cells": real_stats.n_cells - n_ctrl,
            "n_clipped": stats.n_clipped,
            "max_value": max(stats.max_value, real_stats.max_value),
            "pert_col": self.pert_col,
            "control_pert": self.control_pert,
            "command": (
                f"cell-eval run -ap {path} -ar {real} --pert-col {self.pert_col} "
                f"--control-pert {self.control_pert} -o {self.out_dir / ('cell_eval_' + safe)}"
            ),
        }


def export_cell_eval(
    pred: AnnData | Mapping[str, AnnData],
    true: AnnData,
    *,
    control: AnnData,
    out_dir: str | Path,
    perturbation_key: str = "perturbation",
    pert_col: str = CELL_EVAL_PERT_COL,
    control_pert: str = CELL_EVAL_CONTROL,
    clip_negative: bool = True,
) -> pd.DataFrame:
    """Write predicted and true cells as the two h5ad files ``cell-eval run`` scores.

    Takes what :func:`vcell.metrics.evaluate` takes (predicted cells, true held-out cells and control cells, all in
    log1p(CP10k)) and writes, into ``out_dir``:

    - ``real.h5ad``: the control cells, labelled ``control_pert``, then the true cells of each perturbation;
    - ``pred_<model>.h5ad`` per model: the same control cells, then the predicted cells of each perturbation.

    Both hold the same genes in the same order, ``obs[pert_col]`` with the same set of labels (cell-eval requires
    it; predicted conditions without true cells are left out) and float32 expression (dense, or CSR when an input is
    sparse or backed), written block by block: no input is read or densified whole. Score them with the command in
    the returned table, e.g. ``cell-eval run -ap out/pred_model.h5ad -ar out/real.h5ad`` (the default column and
    control label are cell-eval's defaults), or with ``cell_eval.MetricsEvaluator`` on the two paths. cell-eval
    computes each file's differential expression against that file's controls, so with the same controls in both, its
    ``pearson_delta``, ``mae`` and ``discrimination_score_l1`` equal vcell's ``pearson_delta``, ``mae`` and ``pds``
    (up to float32 round-off and clipping, see ``clip_negative``), and ``overlap_at_N`` equals ``de_overlap``
    (``docs/metrics.md``). :func:`vcell.bench.run` writes these files for every model, split and seed with
    ``export_dir=``.

    Parameters
    ----------
    pred
        Predicted cells (``obs[perturbation_key]`` labels them), or a mapping ``model name -> predicted cells`` (one
        ``pred_<name>.h5ad`` each; a single AnnData is written as ``pred_pred.h5ad``). Each model must predict every
        perturbation of ``true``.
    true
        True held-out cells, labelled the same way; same genes in the same order.
    control
        Control cells, same genes (at least 2): written, as ``control_pert``, into every file.
    out_dir
        Folder of the files (created; files of the same names are replaced).
    perturbation_key
        ``obs`` column with the labels in ``pred`` and ``true`` (read as :func:`vcell.metrics.evaluate` reads them:
        ``"B+A"`` is ``"A+B"``).
    pert_col, control_pert
        Name of the perturbation column in the files and label of the control cells (cell-eval's ``--pert-col`` and
        ``--control-pert``; the defaults are cell-eval's, so no flag is needed). ``control_pert`` must not be the label
        of a perturbation.
    clip_negative
        Write negative predicted values (a model's log-expression can fall below 0) as 0, as cell-eval refuses
        negative expression; the count is in ``n_clipped``. ``False`` raises a ValueError instead. True and control
        cells are never clipped: a negative value there is a ValueError.

    Returns
    -------
    One row per model: ``model``, ``pred`` and ``real`` (the paths), ``n_perturbations``, ``n_control_cells``,
    ``n_pred_cells``, ``n_real_cells``, ``n_clipped``, ``max_value`` (cell-eval refuses values of 15 and above),
    ``pert_col``, ``control_pert`` and the ``command`` that scores the pair.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd, tempfile
    >>> rng = np.random.default_rng(0)
    >>> var = pd.DataFrame(index=[f"g{i}" for i in range(5)])
    >>> cells = lambda n, labels: ad.AnnData(
    ...     rng.gamma(2.0, 0.5, (n, 5)).astype(np.float32), obs=pd.DataFrame({"perturbation": labels}), var=var
    ... )
    >>> true, pred = cells(4, ["A", "A", "B", "B"]), cells(4, ["A", "A", "B", "B"])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     table = export_cell_eval({"mine": pred}, true, control=cells(3, ["control"] * 3), out_dir=d)
    ...     real = ad.read_h5ad(table.loc[0, "real"])
    >>> real.obs["target_gene"].tolist()
    ['non-targeting', 'non-targeting', 'non-targeting', 'A', 'A', 'B', 'B']
    """
    from vcell._utils import check_obs_keys, get_matrix, is_count_matrix
    from vcell.metrics._evaluate import _canonical, _check_genes

    preds = dict(pred) if isinstance(pred, Mapping) else {"pred": pred}
    if not preds:
        msg = "pred is an empty mapping: give at least one model's predicted cells"
        raise ValueError(msg)
    check_obs_keys(true, [perturbation_key], what="perturbation_key")
    for name, p in preds.items():
        check_obs_keys(p, [perturbation_key], what="perturbation_key")
        _check_genes(true, p, f"pred[{name!r}]")
    _check_genes(true, control, "control")
    if control.n_obs < 2:
        msg = f"control must hold at least 2 cells, got {control.n_obs}"
        raise ValueError(msg)
    for adata, what in ((true, "true"), (control, "control"), *((p, f"pred[{n!r}]") for n, p in preds.items())):
        if is_count_matrix(get_matrix(adata)):  # read in row blocks
            msg = (
                f"{what}.X looks like raw counts (non-negative integers); cell-eval's files hold log1p(CP10k) "
                "expression, e.g. vcell._utils.log1p_cp10k(X)"
            )
            raise ValueError(msg)
    labels_t = _canonical(true.obs[perturbation_key], f"true.obs[{perturbation_key!r}]")
    writer = _Writer(
        Path(out_dir),
        get_matrix(control),
        get_matrix(true),
        labels_t,
        true.var_names,
        pert_col=pert_col,
        control_pert=control_pert,
        clip_negative=clip_negative,
        uns={},
    )
    rows = []
    for name, p in preds.items():
        labels_p = _canonical(p.obs[perturbation_key], f"pred[{name!r}].obs[{perturbation_key!r}]")
        missing = sorted(str(x) for x in set(writer.perts) - set(labels_p))
        if missing:
            msg = (
                f"perturbation(s) {missing} of true.obs[{perturbation_key!r}] have no predicted cells in pred[{name!r}]"
            )
            raise ValueError(msg)
        rows.append(writer.add(name, get_matrix(p), labels_p))
    return pd.DataFrame(rows)


class RunExport:
    """:func:`vcell.bench.run`'s ``export_dir``: each model's predictions of one split and seed, for cell-eval.

    Files go to ``<export_dir>/<split>/seed<seed>/`` (``real.h5ad``, ``pred_<model>.h5ad``; a model that could not
    predict every held-out condition gets its own ``real_<model>.h5ad`` of the conditions it predicted), and one row
    per file pair to ``<export_dir>/manifest.csv`` (rewritten after each model, so it lists what a stopped run wrote).
    """

    def __init__(self, export_dir: str | Path, split: str, seed: int, control: AnnData, true: AnnData):
        self.root = Path(export_dir)
        self.split = split
        self.seed = int(seed)
        self.writer = _Writer(
            self.root / _safe_name(split) / f"seed{self.seed}",
            control.X,
            true.X,
            true.obs["perturbation"].astype(str).to_numpy(),
            true.var_names,
            pert_col=CELL_EVAL_PERT_COL,
            control_pert=CELL_EVAL_CONTROL,
            clip_negative=True,
            uns={"split": str(split), "seed": self.seed},
        )

    def add(self, model: str, pred: AnnData) -> None:
        """Write ``model``'s predictions (labels in ``obs['perturbation']``) and update the manifest."""
        row = self.writer.add(model, pred.X, pred.obs["perturbation"].astype(str).to_numpy())
        manifest = self.root / "manifest.csv"
        old = pd.read_csv(manifest) if manifest.exists() else pd.DataFrame()
        new = pd.DataFrame([{"split": self.split, "seed": self.seed, **row}])
        if len(old):
            keep = ~((old["split"].astype(str) == self.split) & (old["seed"] == self.seed) & (old["model"] == model))
            new = pd.concat([old[keep], new], ignore_index=True)
        new.to_csv(manifest, index=False)
