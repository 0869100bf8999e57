"""Differential expression for metrics: cell-eval's Wilcoxon rank-sum test, FDR-significant genes and their overlap.

The test is the one cell-eval (through pdex) runs, written here for vcell's data layout: each group of cells
against the control cells, gene by gene, a two-sided Mann-Whitney U (Wilcoxon rank-sum) test with the normal
approximation, tie correction and continuity correction (``scipy.stats.mannwhitneyu(x, y, method="asymptotic")``),
p-values adjusted by Benjamini-Hochberg over all genes of the group (``scipy.stats.false_discovery_control``).

The control cells are indexed once (:class:`ControlRanks`: their non-zero values sorted per gene, the count of zeros
and the tie term per gene), so a group's test costs a binary search of each of its values, not a re-ranking of the
union: a group of ``m`` cells against ``n`` controls takes ``O(m log n)`` per gene, and no cell set is densified
beyond one block of a group's cells.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from scipy import sparse

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

#: most values of a group's cells made dense at once (cells x genes of one block)
_GROUP_BLOCK_ELEMENTS = 1 << 20


class DEStats(NamedTuple):
    """One group's differential expression against the control cells, every array in gene order."""

    #: signed z of the rank-sum statistic, ``(U1 - n1 n2 / 2) / sd`` (tie-corrected, no continuity correction):
    #: positive where the group is higher; its absolute value orders genes as the p-value does
    scores: np.ndarray
    #: two-sided p-values (normal approximation with tie and continuity correction, as cell-eval)
    pvals: np.ndarray
    #: Benjamini-Hochberg adjusted p-values over all genes
    pvals_adj: np.ndarray
    #: ``log2(expm1(mean_group) / expm1(mean_control))`` of the log1p means (pdex's pseudobulk fold change with
    #: ``epsilon = 0``: ``+-inf`` where one side is 0, 0 where both are)
    log2fc: np.ndarray


def _ordered(values: np.ndarray) -> np.ndarray:
    """float32 values as int64 codes in the same order (IEEE bits, sign-flipped): exact, monotone keys."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.int64)
    return np.where(bits >= 1 << 31, (1 << 32) - 1 - bits, bits + (1 << 31))


def _ties(counts: np.ndarray) -> np.ndarray:
    """``t^3 - t`` of tie-group sizes (float64: exact below 2^53)."""
    t = np.asarray(counts, dtype=np.float64)
    return t * t * t - t


def _check_finite(values: np.ndarray, name: str) -> None:
    if not np.isfinite(values).all():
        # a NaN has no rank: the gene would silently drop out of (or top) the ranking
        msg = f"{name} holds {int((~np.isfinite(values)).sum())} NaN or inf value(s); expected finite expression"
        raise ValueError(msg)


def _cells(x: ArrayLike | sparse.spmatrix, name: str) -> np.ndarray | sparse.csr_matrix:
    """Cells as float32 (CSR stays sparse); a ValueError naming ``name`` for a wrong shape or NaN/inf values."""
    if sparse.issparse(x):
        arr = sparse.csr_matrix(x, dtype=np.float32)
        _check_finite(arr.data, name)
        return arr
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        msg = f"{name} must be a 2-D (cells x genes) array, got {arr.ndim} dimensions"
        raise ValueError(msg)
    _check_finite(arr, name)
    return arr


class ControlRanks:
    """Control cells indexed for rank-sum tests: per gene, the sorted non-zero values and the count of zeros.

    Built once (read in row blocks: a dense, sparse or backed matrix is never densified whole) and shared by every
    group tested against the same controls. Memory: one int64 key per non-zero control value.

    Parameters
    ----------
    control
        Control cells ``(n_cells x n_genes)``, log1p(CP10k): dense, sparse or backed; at least 2 cells.

    Raises
    ------
    ValueError
        If ``control`` is not 2-D, has fewer than 2 cells, or holds NaN or inf.
    """

    def __init__(self, control: Any):
        from vcell.data import iter_row_blocks

        shape = getattr(control, "shape", None)
        if shape is None or len(shape) != 2:
            control = np.asarray(control, dtype=np.float32)
            if control.ndim != 2:
                msg = f"control must be a 2-D (cells x genes) array, got {control.ndim} dimensions"
                raise ValueError(msg)
            shape = control.shape
        n, n_genes = int(shape[0]), int(shape[1])
        if n < 2:
            msg = f"control must hold at least 2 cells for differential expression, got {n}"
            raise ValueError(msg)
        keys, sums = [], np.zeros(n_genes)
        for _, _, block in iter_row_blocks(control):
            if sparse.issparse(block):
                coo = block.tocoo()
                cols, vals = coo.col, coo.data.astype(np.float32)
            else:
                vals = np.asarray(block, dtype=np.float32)
                if vals.ndim != 2:
                    msg = f"control must be a 2-D (cells x genes) array, got {vals.ndim} dimensions"
                    raise ValueError(msg)
                _, cols = np.nonzero(vals)
                vals = vals[vals != 0]
            _check_finite(vals, "control")
            nz = vals != 0  # explicit zeros of a sparse matrix are zeros
            cols, vals = cols[nz].astype(np.int64), vals[nz]
            sums += np.bincount(cols, weights=vals, minlength=n_genes)
            keys.append((cols << 32) | _ordered(vals))
        self.keys = np.sort(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
        self.starts = np.searchsorted(self.keys, np.arange(n_genes + 1, dtype=np.int64) << 32)
        self.n_zero = n - np.diff(self.starts)
        bounds = np.flatnonzero(np.r_[True, self.keys[1:] != self.keys[:-1], True]) if self.keys.size else np.zeros(1)
        runs = np.diff(bounds)
        self.tie_term = np.bincount(
            self.keys[bounds[:-1].astype(np.int64)] >> 32, weights=_ties(runs), minlength=n_genes
        ) + _ties(self.n_zero)
        self.n, self.n_genes = n, n_genes
        self.mean = sums / n

    def test(self, cells: ArrayLike | sparse.spmatrix, name: str = "cells") -> DEStats:
        """Rank-sum test of ``cells`` (at least 1) against the controls, every gene (see :class:`DEStats`)."""
        from scipy.special import ndtr
        from scipy.stats import false_discovery_control

        X = _cells(cells, name)
        m = X.shape[0]
        if X.shape[1] != self.n_genes:
            msg = f"{name} have {X.shape[1]} genes but control has {self.n_genes}"
            raise ValueError(msg)
        if m < 1:
            msg = f"{name} must hold at least 1 cell for differential expression, got 0"
            raise ValueError(msg)
        u1 = np.empty(self.n_genes)
        tie = np.empty(self.n_genes)
        if sparse.issparse(X):  # a float64 sum (scipy sums float32 data in float32)
            sums = np.bincount(X.indices, weights=X.data.astype(np.float64), minlength=self.n_genes)
        else:
            sums = X.sum(axis=0, dtype=np.float64)
        step = max(1, _GROUP_BLOCK_ELEMENTS // m)
        for j0 in range(0, self.n_genes, step):
            j1 = min(j0 + step, self.n_genes)
            u1[j0:j1], tie[j0:j1] = self._block(X[:, j0:j1], j0, m)
        n = m + self.n
        mu = m * self.n / 2.0
        var = m * self.n / 12.0 * ((n + 1.0) - tie / (n * (n - 1.0)))
        ok = var > 0  # var 0: every value tied, no evidence of a difference
        sd = np.sqrt(np.where(ok, var, 1.0))
        scores = np.where(ok, (u1 - mu) / sd, 0.0)
        z = (np.maximum(u1, m * self.n - u1) - mu - 0.5) / sd
        pvals = np.where(ok, np.clip(2.0 * ndtr(-z), 0.0, 1.0), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lfc = np.log2(np.expm1(sums / m) / np.expm1(self.mean))
        lfc[np.isnan(lfc)] = 0.0
        return DEStats(scores, pvals, false_discovery_control(pvals, method="bh"), lfc)

    def _block(self, block: np.ndarray | sparse.csr_matrix, j0: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        """U1 and the tie term of the union, for the genes ``j0 : j0 + block.shape[1]``."""
        b = block.shape[1]
        V = np.sort(block.toarray() if sparse.issparse(block) else block, axis=0).T + np.float32(0)  # -0.0 -> 0.0
        genes = np.repeat(np.arange(j0, j0 + b, dtype=np.int64), m)
        flat = V.ravel()
        key = (genes << 32) | _ordered(flat)
        start, zeros = self.starts[genes], self.n_zero[genes]
        below = np.searchsorted(self.keys, key, side="left") - start + zeros * (flat > 0)
        equal = np.searchsorted(self.keys, key, side="right") - start + zeros * (flat >= 0) - below
        u1 = (below + 0.5 * equal).reshape(b, m).sum(axis=1)
        # union ties: each run of equal values in the group adds f(t_ctrl + t_group) - f(t_ctrl), f(t) = t^3 - t,
        # spread evenly over the run's members
        first = np.ones((b, m), dtype=bool)
        first[:, 1:] = V[:, 1:] != V[:, :-1]
        run = np.cumsum(first.ravel()) - 1
        size = np.bincount(run)[run]
        extra = ((_ties(equal + size) - _ties(equal)) / size).reshape(b, m).sum(axis=1)
        return u1, self.tie_term[j0 : j0 + b] + extra


def de_stats(
    groups: Mapping[str, ArrayLike | sparse.spmatrix],
    control: ArrayLike | sparse.spmatrix | ControlRanks,
) -> dict[str, DEStats]:
    """Test every gene of every group against the control cells (cell-eval's Wilcoxon rank-sum test).

    One group at a time against controls indexed once (:class:`ControlRanks`), so memory holds one group, never all
    groups stacked, and never a dense copy of the controls.

    Parameters
    ----------
    groups
        Label -> cells ``(n_cells x n_genes)``, log1p(CP10k); at least 1 cell each.
    control
        Control cells ``(n_cells x n_genes)`` (at least 2; dense, sparse or backed), or their :class:`ControlRanks`.

    Returns
    -------
    Label -> :class:`DEStats`.

    Raises
    ------
    ValueError
        If a set holds NaN or inf, a group is empty, the controls are fewer than 2, or the gene counts differ.
    """
    ranks = control if isinstance(control, ControlRanks) else ControlRanks(control)
    return {key: ranks.test(cells, f"cells of {key!r}") for key, cells in groups.items()}


def rank_by_abs(scores: np.ndarray) -> np.ndarray:
    """Gene indices ordered by decreasing ``|score|`` (ties by gene order)."""
    return np.argsort(-np.abs(scores), kind="stable")


def _one(cells: ArrayLike | sparse.spmatrix, control: Any, name: str) -> DEStats:
    ranks = control if isinstance(control, ControlRanks) else ControlRanks(_cells(control, "control_cells"))
    return ranks.test(cells, name)


def top_de_genes(
    true_cells: ArrayLike | sparse.spmatrix,
    control_cells: ArrayLike | sparse.spmatrix | ControlRanks,
    *,
    n_top: int | None = 20,
) -> np.ndarray:
    """Top differentially expressed genes of ``true_cells`` vs ``control_cells``: largest ``|z|`` of the rank-sum test.

    The test is cell-eval's (two-sided Wilcoxon rank-sum with tie correction, see :class:`DEStats`); ``|z|`` orders
    genes as the p-value does, without the ties of p-values that underflow to 0. Genes are ranked whether or not
    they pass an FDR threshold, so there are always ``n_top`` of them (the genes of the top-DE metrics).

    Parameters
    ----------
    true_cells
        Perturbed cells ``(n_cells x n_genes)``, log1p(CP10k); at least 1.
    control_cells
        Control cells, same genes; at least 2. Or their :class:`ControlRanks`, to index them once for many tests.
    n_top
        Number of genes to return; ``None`` returns the full ranking.

    Returns
    -------
    Integer gene indices, most differential first (ties by gene order).

    Raises
    ------
    ValueError
        If either set holds NaN or inf, ``true_cells`` is empty, the controls are fewer than 2, or the gene counts
        differ.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ctrl = rng.normal(size=(50, 5))
    >>> pert = rng.normal(size=(50, 5)) + np.array([0, 0, 3, 0, -1])
    >>> top_de_genes(pert, ctrl, n_top=2)
    array([2, 4])
    """
    order = rank_by_abs(_one(true_cells, control_cells, "true_cells").scores)
    return order if n_top is None else order[:n_top]


def de_genes_fdr(
    true_cells: ArrayLike | sparse.spmatrix,
    control_cells: ArrayLike | sparse.spmatrix,
    *,
    fdr: float = 0.05,
) -> np.ndarray:
    """Genes differentially expressed at Benjamini-Hochberg FDR < ``fdr``, ranked by ``|log2 fold change|``.

    cell-eval's DE gene list: the rank-sum test of :class:`DEStats`, genes with adjusted p-value below ``fdr``,
    ordered by the absolute pseudobulk log2 fold change (largest first, compared in float32 as cell-eval stores
    it; ties by ``|z|``, then gene order).

    Parameters
    ----------
    true_cells
        Perturbed cells ``(n_cells x n_genes)``; at least 1.
    control_cells
        Control cells; at least 2.
    fdr
        Threshold on the adjusted p-value.

    Returns
    -------
    Integer gene indices (possibly empty), most differential first.

    Raises
    ------
    ValueError
        If either set holds NaN or inf, ``true_cells`` is empty, the controls are fewer than 2, the gene counts
        differ, or ``fdr`` is not in ``(0, 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ctrl = rng.normal(2, 0.3, size=(50, 5))
    >>> pert = rng.normal(2, 0.3, size=(50, 5)) + np.array([0, 0, 1, 0, 0])
    >>> de_genes_fdr(pert, ctrl)
    array([2])
    """
    _check_fdr(fdr)
    return significant(_one(true_cells, control_cells, "true_cells"), fdr)


def _check_fdr(fdr: float) -> None:
    if not 0 < fdr <= 1:
        msg = f"fdr must be in (0, 1], got {fdr}"
        raise ValueError(msg)


def significant(stats: DEStats, fdr: float) -> np.ndarray:
    """Genes with adjusted p-value < ``fdr`` from :func:`de_stats` output, by decreasing ``|log2 fold change|``.

    ``|log2 fold change|`` is compared in float32, as cell-eval stores it; ties (notably the ``inf`` of genes with a
    zero mean on one side) go to the larger ``|z|``, then to gene order. cell-eval leaves the order of ties to its
    data-frame library (not gene order once the table is large), so no rule reproduces it everywhere.
    """
    _check_fdr(fdr)
    sig = np.flatnonzero(stats.pvals_adj < fdr)
    key = np.abs(stats.log2fc[sig]).astype(np.float32)
    return sig[np.lexsort((-np.abs(stats.scores[sig]), -key))]  # stable: last ties by gene order


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
    """Overlap of the top-``k`` predicted DE genes with the top-``k`` true DE genes, divided by ``k``.

    cell-eval's ``overlap_at_N`` (``k=None``) and ``overlap_at_<k>``: both lists are the genes at FDR < 0.05
    (:func:`de_genes_fdr`, of the predicted and of the true cells vs control), ranked by ``|log2 fold change|``;
    ``k`` is capped at the number of true DE genes. A prediction without significant genes scores 0.

    Parameters
    ----------
    pred_de
        Predicted DE gene indices, ranked (:func:`de_genes_fdr` of the predicted cells vs control).
    true_de
        True DE gene indices, ranked.
    k
        Number of genes compared, at most ``len(true_de)``; ``None`` uses ``len(true_de)``.

    Returns
    -------
    ``|pred_de[:k] & true_de[:k]| / k``; ``NaN`` when there are no true DE genes (cell-eval reports 0 there).

    Raises
    ------
    ValueError
        If ``pred_de`` or ``true_de`` holds something other than integers (NaN, inf, ``2.5``), or ``k < 0``.

    Examples
    --------
    >>> de_overlap([3, 1, 2, 0], [1, 2])
    0.5
    >>> de_overlap([], [1, 2])
    0.0
    """
    p, t = _indices(pred_de, "pred_de"), _indices(true_de, "true_de")
    if k is not None and int(k) < 0:
        msg = f"k must be non-negative, got {k}"
        raise ValueError(msg)
    k = t.size if k is None else min(int(k), t.size)
    if k == 0:
        return float("nan")
    return float(np.intersect1d(p[:k], t[:k]).size / k)
