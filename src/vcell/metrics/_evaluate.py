"""AnnData-level evaluation: every per-perturbation metric in one tidy table."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from vcell._constants import COMBO_SEP
from vcell._utils import check_obs_keys, get_matrix, resolve_seed, to_dense

from ._ceiling import split_halves
from ._common import sq_dists, subsample_rows
from ._de import ControlRanks, de_overlap, de_stats, rank_by_abs, significant
from ._delta import (
    direction_accuracy,
    l2_top_expressed,
    mae,
    mse_top_de,
    mse_top_de_normalized,
    pds,
    pearson_delta,
    perturbed_centroid_reference,
)
from ._distribution import DEFAULT_BANDWIDTHS, _median_scale, fit_pca
from ._pathway import pathway_agreement

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

#: names of the metrics :func:`evaluate` reports, in table order
METRICS: tuple[str, ...] = (
    "pearson_delta",
    "pearson_delta_top_de",
    "pearson_delta_pert",
    "pearson_delta_top_de_pert",
    "mse_top_de",
    "mse_top_de_normalized",
    "mae",
    "l2_top_expressed",
    "direction_accuracy",
    "energy_distance",
    "mmd",
    "de_overlap",
    "pds",
)
_TOP_DE_METRICS = {
    "pearson_delta_top_de",
    "pearson_delta_top_de_pert",
    "mse_top_de",
    "mse_top_de_normalized",
    "direction_accuracy",
}
_DIST_METRICS = {"energy_distance", "mmd"}
_MAX_PCA_FIT_CELLS = 20_000
#: how many results of the pred-independent steps (true-cell DE, ceiling) :func:`evaluate` keeps
_MEMO_SIZE = 6
_memo: OrderedDict[tuple[str, str], Any] = OrderedDict()


def _digest(*parts: Any) -> str:
    """Content hash of arrays, strings, numbers and (nested) sequences/mappings of them."""
    h = hashlib.blake2b(digest_size=20)

    def feed(x: Any) -> None:
        if sparse.issparse(x):
            x = sparse.csr_matrix(x)
            h.update(f"csr{x.shape}".encode())
            for part in (x.data, x.indices, x.indptr):
                feed(part)
        elif isinstance(x, _Matrix):  # backed: its values, block by block
            from vcell.data import iter_row_blocks

            h.update(f"rows{x.shape}".encode())
            for _, _, block in iter_row_blocks(x.X):
                feed(block)
        elif isinstance(x, np.ndarray):
            a = np.ascontiguousarray(x)
            h.update(f"a{a.dtype.str}{a.shape}".encode())
            h.update(a.data if a.dtype != object else repr(a.tolist()).encode())
        elif isinstance(x, Mapping):
            h.update(b"m")
            for k, v in x.items():
                feed(str(k))
                feed(v)
        elif isinstance(x, list | tuple) and all(isinstance(v, str) for v in x):
            h.update(f"s{len(x)}".encode())
            h.update("\x00".join(x).encode())
        elif isinstance(x, list | tuple):
            h.update(f"l{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    for part in parts:
        feed(part)
    return h.hexdigest()


def _memoized(kind: str, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, reusing the result of an earlier call with the same content key (small LRU).

    :func:`vcell.bench.run` evaluates every model against the same true and control cells; the steps that do not
    depend on the prediction (DE of the true cells, the split-half ceiling) are deterministic functions of their
    inputs, so they are computed once and reused.
    """
    k = (kind, key)
    if k in _memo:
        _memo.move_to_end(k)
        return _memo[k]
    value = compute()
    _memo[k] = value
    while len(_memo) > _MEMO_SIZE:
        _memo.popitem(last=False)
    return value


def _share_control_ranks(control: AnnData, ranks: ControlRanks) -> None:
    """Have :func:`evaluate` reuse ``ranks``, the caller's index of ``control``'s cells, instead of building its own.

    :func:`vcell.bench.run` indexes the control reference once for the top-DE genes; evaluate looks the index up by
    the content of ``control.X`` (as it reads it), so it finds this one and never holds a second copy.
    """
    _memoized("ctrl_ranks", _digest(_expression(control, "control")), lambda: ranks)


def _check_metrics(metrics: Sequence[str] | str | None) -> list[str]:
    if metrics is None:
        return list(METRICS)
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        msg = f"unknown metric(s) {unknown}; valid names are {list(METRICS)}"
        raise ValueError(msg)
    return [m for m in METRICS if m in set(metrics)]


class _Matrix:
    """A backed matrix (h5ad read with ``backed="r"``, zarr, dask): read in row blocks, never whole."""

    def __init__(self, X: Any):
        self.X = X
        self.shape = tuple(X.shape)


_Expr = np.ndarray | sparse.csr_matrix | _Matrix


def _check_spaces(pred: AnnData, true: AnnData, control: AnnData) -> None:
    """ValueError unless the three ``X`` are log data in one space (:func:`vcell.pp.expression_space` of each).

    Raw counts are refused (evaluate compares log1p expression); so are two spaces that provably differ (known target
    sums more than 1% apart); a log1p space of unknown target sum is compared with any (see docs, "Expression
    spaces").
    """
    from vcell.pp._space import check_same_space, expression_space, prediction_space

    spaces = {"pred": prediction_space(pred), "true": expression_space(true), "control": expression_space(control)}
    for what, space in spaces.items():
        if space.kind == "counts":
            msg = (
                f"{what}.X holds {space} (non-negative integers); evaluate compares log1p expression: normalise it "
                f"(e.g. vcell._utils.log1p_cp10k(X), log1p(CP10k)) in the space of the other matrices "
                f"(true: {spaces['true']}, pred: {spaces['pred']})"
            )
            raise ValueError(msg)
    check_same_space(spaces["pred"], spaces["true"], what_a="pred.X", what_b="true.X", where="evaluate")
    check_same_space(spaces["control"], spaces["true"], what_a="control.X", what_b="true.X", where="evaluate")


def _expression(adata: AnnData, what: str) -> _Expr:
    """``adata.X`` as evaluate reads it: dense float32 (as before), CSR float32, or a backed matrix read in blocks."""
    X = get_matrix(adata)
    if sparse.issparse(X):
        return sparse.csr_matrix(X, dtype=np.float32)
    if isinstance(X, np.ndarray | list | tuple):
        return to_dense(X, dtype=np.float32)
    return _Matrix(X)


def _float32(block: Any) -> Any:
    return block.astype(np.float32, copy=False)


def _group_means(X: _Expr, groups: Sequence[np.ndarray]) -> np.ndarray:
    """Mean (float64) of the rows ``idx`` of ``X`` for each ``idx`` in ``groups``: ``(len(groups), n_genes)``.

    Dense matrices: each group's rows averaged with numpy (as evaluate always did); sparse and backed ones: one
    pass of :func:`vcell.data.group_sums` over the rows in some group, never densifying more than a block.
    """
    if isinstance(X, np.ndarray):
        return np.vstack([X[idx].mean(axis=0, dtype=np.float64) for idx in groups])
    from vcell.data import group_sums

    sizes = np.array([idx.size for idx in groups])
    W = sparse.csr_matrix(
        (np.ones(int(sizes.sum())), np.concatenate(groups), np.concatenate([[0], np.cumsum(sizes)])),
        shape=(len(groups), X.shape[0]),
    )
    sums, _ = group_sums(X.X if isinstance(X, _Matrix) else X, W, transform=_float32)
    return sums / sizes[:, None]


class _Rows:
    """Cells ``idx`` of a matrix (dense, CSR or backed): their mean, a seeded subsample, the cells themselves."""

    def __init__(self, X: _Expr, idx: np.ndarray | None = None, mean: np.ndarray | None = None):
        self.X = X
        self.idx = np.arange(X.shape[0]) if idx is None else np.asarray(idx, dtype=np.int64)
        self._mean = mean

    @property
    def n(self) -> int:
        return int(self.idx.size)

    def mean(self) -> np.ndarray:
        if self._mean is None:
            self._mean = _group_means(self.X, [self.idx])[0]
        return self._mean

    def cells(self, sel: np.ndarray | None = None) -> np.ndarray | sparse.csr_matrix:
        """The cells (those at positions ``sel``), dense for a dense matrix, else CSR."""
        idx = self.idx if sel is None else self.idx[sel]
        if isinstance(self.X, _Matrix):
            from vcell.data import iter_row_blocks

            blocks = [sparse.csr_matrix(b, dtype=np.float32) for *_, b in iter_row_blocks(self.X.X, rows=idx)]
            return sparse.vstack(blocks, format="csr") if blocks else sparse.csr_matrix((0, self.X.shape[1]))
        return self.X[idx]

    def sample(self, max_cells: int | None, rng: np.random.Generator) -> np.ndarray:
        """At most ``max_cells`` cells, dense: the draws of :func:`subsample` on ``cells()``."""
        sel = subsample_rows(self.n, max_cells, rng)
        cells = self.cells(sel)
        return cells.toarray() if sparse.issparse(cells) else cells


class _LazyCells(Mapping):
    """Label -> the cells of a :class:`_Rows`, read when asked: a test over groups holds one group's cells at a time."""

    def __init__(self, rows: Mapping[str, _Rows]):
        self._rows = rows

    def __getitem__(self, key: str) -> np.ndarray | sparse.csr_matrix:
        return self._rows[key].cells()

    def __iter__(self):
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def _check_genes(true: AnnData, other: AnnData, what: str) -> None:
    if other.n_vars != true.n_vars or not other.var_names.equals(true.var_names):
        msg = (
            f"{what}.var_names must equal true.var_names (same genes, same order); got {other.n_vars} genes vs "
            f"{true.n_vars}, e.g. {list(other.var_names[:3])} vs {list(true.var_names[:3])}"
        )
        raise ValueError(msg)


def _canonical(labels: pd.Series, where: str) -> np.ndarray:
    """Labels read as :func:`vcell.pp.harmonize` reads them (``"B+A"`` is ``"A+B"``; ``"A+B+"`` a ValueError)."""
    from vcell.pp._labels import canonical_labels

    codes, uniques = pd.factorize(labels.astype(str))
    return np.asarray(canonical_labels(list(uniques), where=where), dtype=object)[codes].astype(str)


def _targets(labels: Sequence[str], var_names: pd.Index) -> list[np.ndarray]:
    return [var_names.get_indexer([g for g in str(lab).split(COMBO_SEP) if g]) for lab in labels]


class _Context:
    """What every perturbation's metrics share: control mean, references, expressed genes, PCA, seed."""

    def __init__(self, names, ctrl_mean, ref, expressed, n_top_expressed, pca, max_cells, seed, ref_pert=None):
        self.names = names
        self.ctrl_mean = ctrl_mean
        self.ref = ref
        self.ref_pert = ref_pert
        self.expressed = expressed
        self.n_top_expressed = n_top_expressed
        self.pca = pca
        self.max_cells = max_cells
        self.seed = seed

    def project(self, X: np.ndarray) -> np.ndarray:
        comps, mean = self.pca
        return (np.asarray(X, dtype=np.float64) - mean) @ comps.T

    def one(
        self,
        pred_cells: _Rows,
        true_cells: _Rows,
        top: np.ndarray,
        pred_rank: np.ndarray | None,
        sig: np.ndarray | None,
    ) -> dict[str, float]:
        """Per-perturbation metrics (all but ``pds``) of predicted vs true cells."""
        pm, tm = pred_cells.mean(), true_cells.mean()
        out: dict[str, float] = {}
        for name in self.names:
            if name == "pearson_delta":
                out[name] = pearson_delta(pm, tm, self.ref)
            elif name == "pearson_delta_top_de":
                out[name] = pearson_delta(pm, tm, self.ref, genes=top)
            elif name == "pearson_delta_pert":
                out[name] = pearson_delta(pm, tm, self.ref_pert)
            elif name == "pearson_delta_top_de_pert":
                out[name] = pearson_delta(pm, tm, self.ref_pert, genes=top)
            elif name == "mse_top_de":
                out[name] = mse_top_de(pm, tm, genes=top)
            elif name == "mse_top_de_normalized":
                out[name] = mse_top_de_normalized(pm, tm, self.ctrl_mean, genes=top)
            elif name == "mae":
                out[name] = mae(pm, tm)
            elif name == "l2_top_expressed":
                out[name] = l2_top_expressed(pm, tm, expressed_mean=self.expressed, n_top=self.n_top_expressed)
            elif name == "direction_accuracy":
                out[name] = direction_accuracy(pm, tm, self.ctrl_mean, genes=top)
            elif name == "de_overlap":
                out[name] = de_overlap(pred_rank, sig) if sig is not None else float("nan")
        if self.names_dist:
            out.update(self.distribution(pred_cells, true_cells))
        return out

    def distribution(self, pred_cells: _Rows, true_cells: _Rows) -> dict[str, float]:
        """:func:`energy_distance` and :func:`mmd` of the projected cells, sharing one distance computation.

        The same values as calling both functions on the projected cells with ``max_cells`` and ``seed``: the cells
        are subsampled with the same draws (before projecting and before densifying: only the ``max_cells`` drawn
        cells are ever dense), centred on the pooled mean, and the three squared-distance matrices are computed once
        for both metrics.
        """
        rng = np.random.default_rng(resolve_seed(self.seed))
        P = self.project(pred_cells.sample(self.max_cells, rng))
        T = self.project(true_cells.sample(self.max_cells, rng))
        centre = np.vstack([P, T]).mean(axis=0)
        P, T = P - centre, T - centre
        dxy, dxx, dyy = sq_dists(P, T), sq_dists(P, P), sq_dists(T, T)
        out: dict[str, float] = {}
        if "mmd" in self.names:
            scale = _median_scale(dxx, dyy, dxy)
            vals = []
            for b in DEFAULT_BANDWIDTHS:
                g = -1.0 / (b * scale)
                vals.append(np.exp(g * dxx).mean() + np.exp(g * dyy).mean() - 2.0 * np.exp(g * dxy).mean())
            out["mmd"] = float(max(np.mean(vals), 0.0))
        if "energy_distance" in self.names:
            dxy, dxx, dyy = np.sqrt(dxy, out=dxy), np.sqrt(dxx, out=dxx), np.sqrt(dyy, out=dyy)
            out["energy_distance"] = float(max(2.0 * dxy.mean() - dxx.mean() - dyy.mean(), 0.0))
        return out

    @property
    def names_dist(self) -> bool:
        return bool(_DIST_METRICS & set(self.names))


def _evaluate_modalities(
    pred: AnnData | MuData,
    true: AnnData | MuData,
    control: AnnData | MuData,
    *,
    pca: Any,
    de_genes: Any,
    pathway_nets: Mapping[str, pd.DataFrame] | None,
    n_top_de: int,
    perturbed_centroid: Any = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """:func:`evaluate` of each modality the three MuData share, with a ``modality`` column."""
    if not all(hasattr(x, "mod") for x in (pred, true, control)):
        msg = "pred, true and control must all be MuData, or all AnnData"
        raise ValueError(msg)
    if pca is not None or de_genes is not None or perturbed_centroid is not None:
        msg = (
            "pca=, de_genes= and perturbed_centroid= refer to one feature space: evaluate MuData modalities one by "
            "one to pass them"
        )
        raise ValueError(msg)
    shared = [m for m in true.mod if m in pred.mod and m in control.mod]
    if not shared:
        msg = f"no modality is in pred, true and control (pred {list(pred.mod)}, true {list(true.mod)}, control {list(control.mod)})"
        raise KeyError(msg)
    parts = []
    for mod in shared:
        n_top = max(1, min(n_top_de, true.mod[mod].n_vars // 2))
        nets = pathway_nets if mod == "rna" else None
        df = evaluate(pred.mod[mod], true.mod[mod], control.mod[mod], n_top_de=n_top, pathway_nets=nets, **kwargs)
        df.insert(0, "modality", mod)
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def evaluate(
    pred: AnnData | MuData,
    true: AnnData | MuData,
    control: AnnData | MuData,
    *,
    perturbation_key: str = "perturbation",
    metrics: Sequence[str] | None = None,
    n_top_de: int = 20,
    n_top_expressed: int = 1000,
    de_genes: Mapping[str, np.ndarray] | None = None,
    fdr: float = 0.05,
    pca: tuple[np.ndarray, np.ndarray] | None = None,
    n_comps: int = 50,
    reference: Literal["control", "perturbed_centroid"] | np.ndarray = "control",
    perturbed_centroid: np.ndarray | None = None,
    max_cells: int | None = 2000,
    seed: int | None = None,
    ceiling: bool = False,
    n_ceiling_splits: int = 3,
    pathway_nets: Mapping[str, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """Evaluate predicted cells against true cells, perturbation by perturbation.

    For each perturbation in ``true.obs[perturbation_key]`` (sorted), the predicted cells with the same label are
    compared with the true ones:

    - ``pearson_delta`` / ``pearson_delta_top_de``: :func:`pearson_delta` over all genes / the top-``n_top_de``
      DE genes, with deltas relative to ``reference``;
    - ``pearson_delta_pert`` / ``pearson_delta_top_de_pert``: the same with deltas relative to Systema's perturbed
      centroid (``perturbed_centroid``; Viñas Torné et al. 2025), on the same top DE genes (DE vs control);
    - ``mse_top_de`` / ``mse_top_de_normalized``: :func:`mse_top_de` over the top DE genes, and divided by the MSE
      of predicting the control mean (:func:`mse_top_de_normalized`);
    - ``mae``: :func:`mae`, the mean over all genes of ``|pred_mean - true_mean|`` (cell-eval's ``mae``);
    - ``l2_top_expressed``: :func:`l2_top_expressed` over the ``n_top_expressed`` genes highest in the control
      mean;
    - ``direction_accuracy``: :func:`direction_accuracy` of changes vs the control mean over the top DE genes;
    - ``energy_distance``, ``mmd``: :func:`energy_distance` (Euclidean) and :func:`mmd` between predicted and
      true cells in the PCA space ``pca``, each set subsampled to ``max_cells``;
    - ``de_overlap``: :func:`de_overlap` (cell-eval's ``overlap_at_N``) of the predicted DE genes (predicted vs
      control cells, FDR < ``fdr``, by ``|log2 fold change|``; none, and so 0, for a prediction without signal)
      with the true DE genes found the same way (``NaN`` when there are none, where cell-eval reports 0);
    - ``pds``: :func:`pds` across all evaluated perturbations (needs at least 2, else ``NaN``), leaving out
      target genes: each ``"+"``-separated part of a label found in ``var_names``;
    - ``pathway_agreement_<name>`` for each network of ``pathway_nets``: :func:`pathway_agreement` (ULM
      activities of the predicted vs the true mean change from the control mean, correlated across sources).

    The three ``X`` must be log1p expression in one space (:func:`vcell.pp.expression_space`: the space recorded in
    ``uns["vcell_spaces"]["X"]``, as :func:`vcell.tl.predict_perturbation` records it, else inferred; for ``pred``
    without a record, the target sum is not inferred, as predicted rows need not sum to it): raw counts,
    or two log1p spaces of known target sums more than 1% apart (log1p(CP10k) predictions against scanpy's
    ``normalize_total`` median), are a ValueError naming both spaces. A space of unknown target sum is not
    provably different and is compared (declare it with :func:`vcell.pp.set_expression_space` to have it checked).

    DE is cell-eval's test (:func:`~vcell.metrics._de.de_stats`: two-sided Wilcoxon rank-sum of each gene with tie
    correction, Benjamini-Hochberg over genes), run once per perturbation of true vs control cells and reused by all
    metrics: the top-``n_top_de`` DE genes are those with the largest ``|z|`` (:func:`top_de_genes`); ``de_genes``
    supplies precomputed top-DE indices (e.g. shared across models) for the top-DE metrics.

    ``X`` may be dense, sparse or backed (an h5ad read with ``backed="r"``); a sparse or backed matrix is never
    densified whole: means are summed in row blocks (:func:`vcell.data.group_sums`), DE reads each group's cells as
    they are stored (sparse stays sparse), and only the at most ``max_cells`` cells per set drawn for the
    distribution metrics are dense. Dense input gives the same numbers as before; sparse input the same up to
    float round-off.

    MuData (e.g. RNA + protein, as :func:`vcell.tl.predict_perturbation` and
    :func:`vcell.tl.sample_perturbation` write them) are evaluated modality by modality: every modality that
    ``pred``, ``true`` and ``control`` all hold (labels in each modality's own ``obs``; proteins in
    log1p(counts per 1e4 of the protein library)), top-DE features ``min(n_top_de, n_features // 2)``, rows with a
    ``modality`` column; ``pathway_nets`` apply to ``rna`` only.

    Parameters
    ----------
    pred
        Predicted cells; ``X`` holds log1p expression (dense or sparse; log1p(CP10k) in benchmarks),
        ``obs[perturbation_key]`` labels them. One cell per perturbation (a mean prediction) is allowed. Or a MuData
        (see above).
    true
        True held-out cells, same genes in the same order, labelled the same way, in the space of ``pred``.
    control
        Control cells, same genes (the ``control`` baseline, the DE reference and the top-expressed ranking), in
        the same space.
    perturbation_key
        ``obs`` column with the perturbation labels in ``pred`` and ``true``, read as :func:`vcell.pp.harmonize` reads
        them (``"B+A"`` and ``"A+B"`` are one condition; a label it rejects, such as ``"A+B+"``, is a ValueError).
    metrics
        Subset of :data:`METRICS`; ``None`` computes all.
    n_top_de
        Number of top DE genes for the top-DE metrics.
    n_top_expressed
        Number of genes for ``l2_top_expressed``.
    de_genes
        Optional perturbation -> top-DE gene indices; missing perturbations are computed.
    fdr
        Adjusted p-value threshold of the true DE genes for ``de_overlap``.
    pca
        ``(components, mean)`` from :func:`fit_pca`, fitted on training cells. ``None`` fits an ``n_comps`` PCA on
        the control and true cells of this call (at most 20,000, seeded), which lets the held-out cells shape the
        space: pass a training-set PCA in benchmarks.
    n_comps
        Number of components when ``pca`` is ``None``.
    reference
        Reference of ``pearson_delta`` and ``pearson_delta_top_de``: ``"control"`` (control mean),
        ``"perturbed_centroid"`` (the reference of the ``_pert`` metrics, below) or a ``(n_genes,)`` vector.
    perturbed_centroid
        Reference of ``pearson_delta_pert`` and ``pearson_delta_top_de_pert``, ``(n_genes,)``: Systema's perturbed
        centroid, the mean over perturbations of each perturbation's mean expression
        (:func:`perturbed_centroid_reference`), computed from the training perturbations as
        :func:`vcell.bench.run` does. ``None`` uses the centroid of the perturbations in ``true`` (held-out cells
        shape the reference, and with one perturbation every true delta is 0 and the metrics ``NaN``): pass the
        training centroid in benchmarks. A NaN in it gives NaN.
    max_cells
        Subsampling cap of each cell set in the O(n^2) metrics (and the most cells of a set made dense at once);
        ``None`` uses every cell.
    seed
        Seed of subsampling, PCA and ceiling splits; defaults to ``vcell.settings.seed``.
    ceiling
        Add a ``ceiling`` column: each metric between two random halves of the true cells (half 1 in the role of
        the prediction; top-DE genes from all true cells; ``de_overlap`` from half 1's ranking vs half 2's
        significant genes; ``pds`` across the half means), averaged over ``n_ceiling_splits`` splits.
    n_ceiling_splits
        Number of random splits for the ceiling.
    pathway_nets
        ``name -> network`` in decoupler format (``source``, ``target``, ``weight``; e.g. PROGENy pathways or
        CollecTRI TFs from :func:`vcell.priors.read_network`): adds the metric ``pathway_agreement_<name>`` for each
        (needs decoupler). Computed whenever given, whatever ``metrics`` says; their ``ceiling`` is NaN.

    Returns
    -------
    Tidy DataFrame with columns ``perturbation``, ``metric``, ``value`` (and ``ceiling``), one row per
    perturbation and metric.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> var = pd.DataFrame(index=[f"g{i}" for i in range(30)])
    >>> ctrl = ad.AnnData(rng.gamma(2.0, 0.5, (40, 30)).astype(np.float32), var=var)
    >>> X = rng.gamma(2.0, 0.5, (40, 30)).astype(np.float32)
    >>> true = ad.AnnData(X, obs=pd.DataFrame({"perturbation": ["A"] * 20 + ["B"] * 20}), var=var)
    >>> df = evaluate(true, true, ctrl, metrics=["pearson_delta", "pds"])
    >>> df["value"].tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    if any(hasattr(x, "mod") for x in (pred, true, control)):
        return _evaluate_modalities(
            pred,
            true,
            control,
            perturbation_key=perturbation_key,
            metrics=metrics,
            n_top_de=n_top_de,
            n_top_expressed=n_top_expressed,
            fdr=fdr,
            n_comps=n_comps,
            reference=reference,
            max_cells=max_cells,
            seed=seed,
            ceiling=ceiling,
            n_ceiling_splits=n_ceiling_splits,
            pathway_nets=pathway_nets,
            pca=pca,
            de_genes=de_genes,
            perturbed_centroid=perturbed_centroid,
        )
    names = _check_metrics(metrics)
    check_obs_keys(pred, [perturbation_key], what="perturbation_key")
    check_obs_keys(true, [perturbation_key], what="perturbation_key")
    _check_genes(true, pred, "pred")
    _check_genes(true, control, "control")
    if control.n_obs < 2:
        msg = f"control must hold at least 2 cells, got {control.n_obs}"
        raise ValueError(msg)
    if n_top_de < 1 or n_top_expressed < 1:
        msg = f"n_top_de and n_top_expressed must be positive, got {n_top_de} and {n_top_expressed}"
        raise ValueError(msg)
    seed = resolve_seed(seed)

    labels_t = _canonical(true.obs[perturbation_key], f"true.obs[{perturbation_key!r}]")
    labels_p = _canonical(pred.obs[perturbation_key], f"pred.obs[{perturbation_key!r}]")
    perts = sorted(set(labels_t))
    if not perts:
        msg = "true has no cells to evaluate"
        raise ValueError(msg)
    missing = [p for p in perts if p not in set(labels_p)]
    if missing:
        msg = f"perturbation(s) {missing} of true.obs[{perturbation_key!r}] have no predicted cells in pred"
        raise ValueError(msg)

    _check_spaces(pred, true, control)
    Xt, Xp, Xc = _expression(true, "true"), _expression(pred, "pred"), _expression(control, "control")
    idx_t = {p: np.flatnonzero(labels_t == p) for p in perts}
    idx_p = {p: np.flatnonzero(labels_p == p) for p in perts}
    ctrl_mean = Xc.mean(axis=0, dtype=np.float64) if isinstance(Xc, np.ndarray) else _Rows(Xc).mean()
    true_means = _group_means(Xt, [idx_t[p] for p in perts])
    pred_means = _group_means(Xp, [idx_p[p] for p in perts])
    rows_t = {p: _Rows(Xt, idx_t[p], true_means[i]) for i, p in enumerate(perts)}
    rows_p = {p: _Rows(Xp, idx_p[p], pred_means[i]) for i, p in enumerate(perts)}

    if perturbed_centroid is None:  # Systema's centroid of the perturbations in true (held-out cells)
        ref_pert = perturbed_centroid_reference(true_means)
    else:
        ref_pert = np.asarray(perturbed_centroid, dtype=np.float64).ravel()
        if ref_pert.shape[0] != true.n_vars:
            msg = f"perturbed_centroid has {ref_pert.shape[0]} entries, expected one per gene ({true.n_vars})"
            raise ValueError(msg)
    if isinstance(reference, str):
        if reference == "control":
            ref = ctrl_mean
        elif reference == "perturbed_centroid":
            ref = ref_pert
        else:
            msg = f"reference must be 'control', 'perturbed_centroid' or a vector, got {reference!r}"
            raise ValueError(msg)
    else:
        ref = np.asarray(reference, dtype=np.float64).ravel()
        if ref.shape[0] != true.n_vars:
            msg = f"reference vector has {ref.shape[0]} entries, expected one per gene ({true.n_vars})"
            raise ValueError(msg)

    # DE genes of true vs control, once per perturbation
    de_genes = dict(de_genes or {})
    need_true_de = "de_overlap" in names or (_TOP_DE_METRICS & set(names) and any(p not in de_genes for p in perts))
    # DE ranks the control cells once per content (read in row blocks; sparse stays sparse)
    ctrl_key = _digest(Xc) if need_true_de or ceiling or "de_overlap" in names else ""

    def ctrl_ranks() -> ControlRanks:
        return _memoized("ctrl_ranks", ctrl_key, lambda: ControlRanks(Xc.X if isinstance(Xc, _Matrix) else Xc))

    true_key = _digest(Xt, ctrl_key, [idx_t[p] for p in perts], perts, "wilcoxon") if need_true_de or ceiling else ""
    true_stats = (
        _memoized("true_de", true_key, lambda: de_stats(_LazyCells({p: rows_t[p] for p in perts}), ctrl_ranks()))
        if need_true_de
        else {}
    )
    top = {}
    for p in perts:
        if p in de_genes:
            top[p] = np.asarray(de_genes[p], dtype=np.int64)
        else:
            top[p] = rank_by_abs(true_stats[p].scores)[:n_top_de] if true_stats else None
    sig = {p: significant(s, fdr) for p, s in true_stats.items()}
    pred_rank: dict[str, np.ndarray | None] = dict.fromkeys(perts)
    if "de_overlap" in names:
        pred_stats = de_stats(_LazyCells({p: rows_p[p] for p in perts}), ctrl_ranks())
        pred_rank = {p: significant(s, fdr) for p, s in pred_stats.items()}

    if _DIST_METRICS & set(names) and pca is None:
        pca = fit_pca(_pca_fit_cells(Xc, Xt, seed), n_comps, seed=seed)
    if pca is not None:
        comps, mean = (np.asarray(a, dtype=np.float64) for a in pca)
        if comps.ndim != 2 or comps.shape[1] != true.n_vars or mean.shape != (true.n_vars,):
            msg = f"pca must be (components (n_comps x {true.n_vars}), mean ({true.n_vars},)), got {comps.shape}"
            raise ValueError(msg)
        pca = (comps, mean)
    ctx = _Context(names, ctrl_mean, ref, ctrl_mean, n_top_expressed, pca, max_cells, seed, ref_pert=ref_pert)

    values: dict[str, dict[str, float]] = {}
    for p in perts:
        values[p] = ctx.one(rows_p[p], rows_t[p], top[p], pred_rank[p], sig.get(p))
    if "pds" in names:
        scores = _pds(pred_means, true_means, perts, true.var_names)
        for p, s in zip(perts, scores, strict=True):
            values[p]["pds"] = s

    pathway_names = []
    for net_name, net in (pathway_nets or {}).items():
        metric = f"pathway_agreement_{net_name}"
        scores = pathway_agreement(pred_means - ctrl_mean, true_means - ctrl_mean, net, genes=true.var_names)
        for p, s in zip(perts, np.atleast_1d(scores), strict=True):
            values[p][metric] = float(s)
        pathway_names.append(metric)

    rows = [(p, m, values[p][m]) for p in perts for m in [*names, *pathway_names]]
    df = pd.DataFrame(rows, columns=["perturbation", "metric", "value"])
    if ceiling:
        ceil_key = _digest(
            true_key,
            names,
            ctrl_mean,
            ref,
            ref_pert,
            n_top_expressed,
            pca,
            max_cells,
            top,
            list(true.var_names),
            fdr,
            n_ceiling_splits,
            seed,
        )
        ceil = _memoized(
            "ceiling",
            ceil_key,
            lambda: _ceiling_values(
                ctx, Xt, ctrl_ranks, idx_t, perts, top, true.var_names, fdr, n_ceiling_splits, seed
            ),
        )
        df["ceiling"] = [ceil[p].get(m, np.nan) for p, m in zip(df["perturbation"], df["metric"], strict=True)]
    return df


def _pca_fit_cells(Xc: _Expr, Xt: _Expr, seed: int) -> np.ndarray | sparse.csr_matrix:
    """Control and true cells (at most ``_MAX_PCA_FIT_CELLS``, seeded) for a PCA: dense if both are, else CSR."""
    n_c, n_t = Xc.shape[0], Xt.shape[0]
    sel = np.arange(n_c + n_t)
    if sel.size > _MAX_PCA_FIT_CELLS:
        rng = np.random.default_rng([seed, 2])
        sel = np.sort(rng.choice(sel.size, _MAX_PCA_FIT_CELLS, replace=False))
    parts = [_Rows(Xc, sel[sel < n_c]).cells(), _Rows(Xt, sel[sel >= n_c] - n_c).cells()]
    if all(isinstance(x, np.ndarray) for x in parts):
        return np.vstack(parts)
    return sparse.vstack([sparse.csr_matrix(x) for x in parts], format="csr")


def _pds(pred_means: np.ndarray, true_means: np.ndarray, perts: list[str], var_names: pd.Index) -> np.ndarray:
    if len(perts) < 2:
        return np.full(len(perts), np.nan)
    return pds(pred_means, true_means, target_gene_idx=_targets(perts, var_names))


def _ceiling_values(ctx, Xt, ctrl_ranks, idx_t, perts, top, var_names, fdr, n_splits, seed):
    """Split-half values of every metric per perturbation, averaged over splits (NaN where undefined)."""
    if n_splits < 1:
        msg = f"n_ceiling_splits must be a positive integer, got {n_splits}"
        raise ValueError(msg)
    rng = np.random.default_rng([seed, 1])
    acc: dict[str, dict[str, list[float]]] = {p: {m: [] for m in ctx.names} for p in perts}
    usable = [p for p in perts if idx_t[p].size >= 2]
    for _ in range(n_splits):
        halves = {p: split_halves(idx_t[p].size, rng) for p in usable}
        cells = {p: (_Rows(Xt, idx_t[p][a]), _Rows(Xt, idx_t[p][b])) for p, (a, b) in halves.items()}
        h1_stats, h2_stats = {}, {}
        if "de_overlap" in ctx.names and usable:
            groups = {f"{p}\x001": c[0] for p, c in cells.items()} | {f"{p}\x002": c[1] for p, c in cells.items()}
            stats = de_stats(_LazyCells(groups), ctrl_ranks())
            h1_stats = {p: stats[f"{p}\x001"] for p in usable}
            h2_stats = {p: stats[f"{p}\x002"] for p in usable}
        for p in usable:
            c1, c2 = cells[p]
            rank = significant(h1_stats[p], fdr) if h1_stats else None
            sig = significant(h2_stats[p], fdr) if h2_stats else None
            for m, v in ctx.one(c1, c2, top[p], rank, sig).items():
                acc[p][m].append(v)
        if "pds" in ctx.names and len(usable) >= 2:
            m1 = np.vstack([cells[p][0].mean() for p in usable])
            m2 = np.vstack([cells[p][1].mean() for p in usable])
            for p, s in zip(usable, _pds(m1, m2, usable, var_names), strict=True):
                acc[p]["pds"].append(s)
    out: dict[str, dict[str, float]] = {}
    for p in perts:
        out[p] = {}
        for m, vals in acc[p].items():
            arr = np.asarray(vals, dtype=np.float64)
            out[p][m] = float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
    return out
