"""Differential expression for metrics: top-DE genes, FDR-significant genes and their overlap."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import sparse

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

DEMethod = Literal["t-test", "t-test_overestim_var", "wilcoxon"]
_DE_METHODS = ("t-test", "t-test_overestim_var", "wilcoxon")
_REF = "__vcell_reference__"
#: a gene whose variance is at most this in both the group and the control is constant up to round-off
_VAR_EPS = 1e-8


def _gene_var(X: np.ndarray | sparse.csr_matrix) -> np.ndarray:
    if sparse.issparse(X):
        mean = np.asarray(X.mean(axis=0), dtype=np.float64).ravel()
        sq = np.asarray(X.multiply(X).mean(axis=0), dtype=np.float64).ravel()
        return np.maximum(sq - mean**2, 0.0)
    return np.asarray(X, dtype=np.float64).var(axis=0)


def _dense2d(x: ArrayLike | sparse.spmatrix, name: str) -> np.ndarray | sparse.csr_matrix:
    """Cells as float32 (CSR stays sparse); a ValueError naming ``name`` for a wrong shape or NaN/inf values."""
    if sparse.issparse(x):
        arr = sparse.csr_matrix(x, dtype=np.float32)
        values = arr.data
    else:
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim != 2:
            msg = f"{name} must be a 2-D (cells x genes) array, got {arr.ndim} dimensions"
            raise ValueError(msg)
        values = arr
    if not np.isfinite(values).all():
        # a t-test with NaN gives NaN scores, read as "not DE": the gene would silently drop out of the ranking
        msg = f"{name} holds {int((~np.isfinite(values)).sum())} NaN or inf value(s); expected finite expression"
        raise ValueError(msg)
    return arr


def de_stats(
    groups: Mapping[str, ArrayLike | sparse.spmatrix],
    control: ArrayLike | sparse.spmatrix,
    *,
    method: DEMethod = "t-test",
) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    """Score every gene of every group against the control cells with ``scanpy.tl.rank_genes_groups``.

    One call per group, on the group's cells and the control cells (a group's scores do not depend on the other
    groups), so memory holds one group at a time, never all groups stacked. A private AnnData is built from the arrays
    (user data is never touched). Groups with fewer than 2 cells cannot be tested and map to ``None``. Genes constant (variance <= 1e-8) in both the group and the control get score 0 and
    adjusted p-value 1: otherwise float round-off turns a deterministic shift of an unexpressed gene (e.g. an
    additive prediction ``control + shift``) into an enormous t statistic.

    Parameters
    ----------
    groups
        Label -> cells ``(n_cells x n_genes)``, log1p(CP10k).
    control
        Control cells ``(n_cells x n_genes)`` (at least 2).
    method
        ``method`` of :func:`scanpy.tl.rank_genes_groups`; its raw p-values are adjusted by Benjamini-Hochberg
        here, after the constant genes are set to 1.

    Returns
    -------
    Label -> ``(scores, pvals_adj)``, both in gene order, or ``None``.
    """
    if method not in _DE_METHODS:
        msg = f"method must be one of {_DE_METHODS}, got {method!r}"
        raise ValueError(msg)
    ctrl = _dense2d(control, "control")
    if ctrl.shape[0] < 2:
        msg = f"control must hold at least 2 cells for differential expression, got {ctrl.shape[0]}"
        raise ValueError(msg)
    n_genes = ctrl.shape[1]
    out: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    ctrl_const = _gene_var(ctrl) <= _VAR_EPS
    for i, (key, cells) in enumerate(groups.items()):
        arr = _dense2d(cells, f"cells of {key!r}")
        if arr.shape[1] != n_genes:
            msg = f"cells of {key!r} have {arr.shape[1]} genes but control has {n_genes}"
            raise ValueError(msg)
        if arr.shape[0] < 2:
            out[key] = None
            continue
        const = ctrl_const & (_gene_var(arr) <= _VAR_EPS)
        scores, pvals = _rank_vs_control(arr, ctrl, f"g{i}", method)
        del arr
        bad = ~np.isfinite(scores) | ~np.isfinite(pvals) | const
        scores[bad] = 0.0
        pvals[bad] = 1.0
        out[key] = (scores, _benjamini_hochberg(pvals))
    return {k: out[k] for k in groups}


def _rank_vs_control(
    cells: np.ndarray | sparse.csr_matrix, ctrl: np.ndarray | sparse.csr_matrix, label: str, method: DEMethod
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and raw p-values (gene order) of ``cells`` vs ``ctrl`` from one ``scanpy.tl.rank_genes_groups`` call."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    n_genes = ctrl.shape[1]
    both = [cells, ctrl]
    X = sparse.vstack(both, format="csr") if any(sparse.issparse(b) for b in both) else np.vstack(both)
    labels = [label] * cells.shape[0] + [_REF] * ctrl.shape[0]
    obs = pd.DataFrame({"group": pd.Categorical(labels)}, index=pd.RangeIndex(len(labels)).astype(str))
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.RangeIndex(n_genes).astype(str)))
    del X
    adata.uns["log1p"] = {"base": None}
    with warnings.catch_warnings():
        # scanpy's own table building (pandas fragmentation) and 0/0 for genes constant in both groups (handled by
        # the caller)
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        sc.tl.rank_genes_groups(
            adata,
            "group",
            groups=[label],
            reference=_REF,
            method=method,
            n_genes=n_genes,
            use_raw=False,
            corr_method="benjamini-hochberg",
            key_added="vcell_de",
        )
    res = adata.uns["vcell_de"]
    idx = np.asarray(res["names"][label]).astype(np.int64)
    scores = np.zeros(n_genes)
    pvals = np.ones(n_genes)
    scores[idx] = np.asarray(res["scores"][label], dtype=np.float64)
    pvals[idx] = np.asarray(res["pvals"][label], dtype=np.float64)
    return scores, pvals


def _benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (as ``scanpy``'s ``corr_method="benjamini-hochberg"``)."""
    from scipy.stats import false_discovery_control

    return false_discovery_control(p, method="bh")


def rank_by_abs(scores: np.ndarray) -> np.ndarray:
    """Gene indices ordered by decreasing ``|score|`` (ties by gene order)."""
    return np.argsort(-np.abs(scores), kind="stable")


def top_de_genes(
    true_cells: ArrayLike | sparse.spmatrix,
    control_cells: ArrayLike | sparse.spmatrix,
    *,
    n_top: int | None = 20,
    method: DEMethod = "t-test",
) -> np.ndarray:
    """Top differentially expressed genes of ``true_cells`` vs ``control_cells``, ranked by ``|score|``.

    Runs :func:`scanpy.tl.rank_genes_groups` on a private AnnData built from the two arrays.

    Parameters
    ----------
    true_cells
        Perturbed cells ``(n_cells x n_genes)``, log1p(CP10k); at least 2.
    control_cells
        Control cells, same genes; at least 2.
    n_top
        Number of genes to return; ``None`` returns the full ranking.
    method
        Test of :func:`scanpy.tl.rank_genes_groups`.

    Returns
    -------
    Integer gene indices, most differential first.

    Raises
    ------
    ValueError
        If either set holds NaN or inf, has fewer than 2 cells, or the gene counts differ.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ctrl = rng.normal(size=(50, 5))
    >>> pert = rng.normal(size=(50, 5)) + np.array([0, 0, 3, 0, -1])
    >>> top_de_genes(pert, ctrl, n_top=2)
    array([2, 4])
    """
    true_cells, control_cells = _dense2d(true_cells, "true_cells"), _dense2d(control_cells, "control_cells")
    stats = de_stats({"x": true_cells}, control_cells, method=method)["x"]
    if stats is None:
        msg = "true_cells must hold at least 2 cells for differential expression"
        raise ValueError(msg)
    order = rank_by_abs(stats[0])
    return order if n_top is None else order[:n_top]


def de_genes_fdr(
    true_cells: ArrayLike | sparse.spmatrix,
    control_cells: ArrayLike | sparse.spmatrix,
    *,
    fdr: float = 0.05,
    method: DEMethod = "t-test",
) -> np.ndarray:
    """Genes differentially expressed at Benjamini-Hochberg FDR < ``fdr``, ranked by ``|score|``.

    Parameters
    ----------
    true_cells
        Perturbed cells ``(n_cells x n_genes)``; at least 2.
    control_cells
        Control cells; at least 2.
    fdr
        Threshold on the adjusted p-value.
    method
        Test of :func:`scanpy.tl.rank_genes_groups`.

    Returns
    -------
    Integer gene indices (possibly empty), most differential first.

    Raises
    ------
    ValueError
        If either set holds NaN or inf, has fewer than 2 cells, or the gene counts differ.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ctrl = rng.normal(size=(50, 5))
    >>> pert = rng.normal(size=(50, 5)) + np.array([0, 0, 3, 0, 0])
    >>> de_genes_fdr(pert, ctrl)
    array([2])
    """
    true_cells, control_cells = _dense2d(true_cells, "true_cells"), _dense2d(control_cells, "control_cells")
    stats = de_stats({"x": true_cells}, control_cells, method=method)["x"]
    if stats is None:
        msg = "true_cells must hold at least 2 cells for differential expression"
        raise ValueError(msg)
    return significant(stats, fdr)


def significant(stats: tuple[np.ndarray, np.ndarray], fdr: float) -> np.ndarray:
    """Genes with adjusted p-value < ``fdr`` from :func:`de_stats` output, ranked by ``|score|``."""
    if not 0 < fdr <= 1:
        msg = f"fdr must be in (0, 1], got {fdr}"
        raise ValueError(msg)
    scores, pvals = stats
    order = rank_by_abs(scores)
    return order[pvals[order] < fdr]


def _indices(x: ArrayLike, name: str) -> np.ndarray:
    """Gene indices as int64; a ValueError naming ``name`` for values that are not integers (no silent truncation)."""
    arr = np.asarray(x).ravel()
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        try:
            num = arr.astype(np.float64)
        except (TypeError, ValueError):
            num = None
        if num is None or not (np.isfinite(num).all() and (num == np.round(num)).all()):
            msg = f"{name} must hold integer gene indices, got e.g. {arr[:5].tolist()}"
            raise ValueError(msg)
        arr = num
    return arr.astype(np.int64)


def de_overlap(pred_de: ArrayLike, true_de: ArrayLike, *, k: int | None = None) -> float:
    """Overlap of the top-``k`` predicted DE genes with the true DE genes, divided by ``k``.

    ``k`` defaults to the number of true DE genes (those at FDR < 0.05, :func:`de_genes_fdr`), as in cell-eval's
    DE overlap.

    Parameters
    ----------
    pred_de
        Gene indices ranked by predicted differential expression (e.g. :func:`top_de_genes` of the predicted cells
        vs control with ``n_top=None``).
    true_de
        True DE gene indices (ranked when ``k`` is smaller than their number).
    k
        Number of genes compared; ``None`` uses ``len(true_de)``.

    Returns
    -------
    ``|pred_de[:k] & true_de[:k]| / k``; ``NaN`` when ``k`` is 0 (no true DE genes).

    Raises
    ------
    ValueError
        If ``pred_de`` or ``true_de`` holds something other than integers (NaN, inf, ``2.5``), or ``k < 0``.

    Examples
    --------
    >>> de_overlap([3, 1, 2, 0], [1, 2])
    0.5
    """
    p, t = _indices(pred_de, "pred_de"), _indices(true_de, "true_de")
    k = t.size if k is None else int(k)
    if k < 0:
        msg = f"k must be non-negative, got {k}"
        raise ValueError(msg)
    if k == 0:
        return float("nan")
    return float(np.intersect1d(p[:k], t[:k]).size / k)
