"""``vcell.bench.run``: models x splits x seeds on the same splits and metrics, as a tidy table."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from scipy import sparse

from vcell._constants import BASELINE_METHODS, CONTROL, DOSE_COL, PERT_COL
from vcell._settings import logger, settings
from vcell._utils import check_finite_nonnegative, check_obs_keys, get_matrix, is_count_matrix, mudata_no_pull

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

#: the baselines shown in every report (any name of ``vcell.module.BASELINE_METHODS`` is accepted as a model)
BASELINES = ("control", "mean", "additive", "linear")


@dataclass
class PredictionRequest:
    """One held-out condition a model must predict in :func:`run`.

    Attributes
    ----------
    condition
        Label of the held-out condition in the results (``"A+B"``, or ``"D@10"`` for a dose).
    perturbation
        Canonical perturbation to predict (``"A+B"``, ``"D"``).
    dose
        Dose to predict.
    controls
        Integer positions, in the training AnnData, of the control cells to start from (their counterfactuals
        are the prediction; they share the contexts of the held-out cells).
    """

    condition: str
    perturbation: str
    dose: float
    controls: np.ndarray


@runtime_checkable
class Predictor(Protocol):
    """Anything :func:`run` can benchmark: vcell models (through :class:`ModelSpec`) and peer adapters.

    ``fit_predict`` gets only the training cells (``train``: train+val cells of the split, labels in
    ``obs['vcell_perturbation']``, split in ``obs['vcell_split']``; no held-out cell) and returns, per request
    condition, a ``(len(request.controls), n_genes)`` array of log1p(CP10k) predictions, or a string saying why
    that condition cannot be predicted. It may set ``last_resources`` (``fit_s``, ``predict_s``, ``peak_mem_mb``),
    and ``expression_space`` (a :class:`vcell.pp.ExpressionSpace` or its dict) when its predictions are in a known
    space: :func:`vcell.metrics.evaluate` then refuses them, naming both spaces, if that space provably differs from
    the truth's (log1p(CP10k) of counts, or the screen's log data as they are).

    When :func:`run` benchmarks RNA + protein (a MuData with ``protein_modality``), a predictor whose
    ``models_proteins`` attribute is true gets ``train`` as a MuData (``rna`` and the protein modality, same cells)
    and may return, per condition, a mapping ``{"rna": array, "prot": (n_controls, n_proteins) array}`` (proteins in
    log1p(counts per 1e4 of the protein library)); other predictors get ``train['rna']`` and are scored on RNA.
    """

    name: str

    def fit_predict(
        self,
        train: AnnData,
        requests: list[PredictionRequest],
        *,
        seed: int,
        covariate_keys: Sequence[str],
        layer: str | None,
    ) -> dict[str, np.ndarray | str]:
        """Train on ``train`` and predict every request."""
        ...


@dataclass
class ModelSpec:
    """How ``bench.run`` builds and trains one vcell model on a training AnnData.

    Parameters
    ----------
    name
        Label in the results.
    model_cls
        A vcell model class (``setup_anndata`` / ``__init__`` / ``train`` / ``predict``).
    init_kwargs, train_kwargs
        Keyword arguments of ``model_cls(adata, **init_kwargs)`` and ``model.train(**train_kwargs)``.
    output
        ``"predict"``: each control cell's counterfactual from ``model.predict`` (point predictions);
        ``"sample"``: cells drawn by ``model.sample`` (one per control cell, seeded; generative models such as
        :class:`~vcell.model.ResidualDiffusion`), so distribution metrics see the model's spread.
    sample_kwargs
        Further arguments of ``model.sample`` (e.g. ``{"n_steps": 20}``) with ``output="sample"``.
    """

    name: str
    model_cls: Any
    init_kwargs: dict = field(default_factory=dict)
    train_kwargs: dict = field(default_factory=dict)
    output: str = "predict"
    sample_kwargs: dict = field(default_factory=dict)
    last_resources: dict = field(default_factory=dict, repr=False)
    #: vcell models take RNA + protein MuData (:func:`run` with ``protein_modality``) when their class can
    models_proteins: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        if self.output not in ("predict", "sample"):
            msg = f"ModelSpec output must be 'predict' or 'sample', got {self.output!r}"
            raise ValueError(msg)

    def fit_predict(
        self,
        train: AnnData,
        requests: list[PredictionRequest],
        *,
        seed: int,
        covariate_keys: Sequence[str],
        layer: str | None,
    ) -> dict[str, np.ndarray | str]:
        """Set up, train and predict with the vcell model (see :class:`Predictor`).

        ``train`` may be a MuData (``rna`` and one protein modality): the model is registered with
        ``protein_modality`` and each condition's prediction is ``{"rna": ..., "prot": ...}``.

        The model is set up on a shallow copy of ``train`` (its own ``obs``, ``var`` and ``uns``, where
        ``setup_anndata`` writes its registry; the expression matrices shared, as vcell models never write them), so
        ``train`` is left as it was and no expression matrix is copied.
        """
        t0 = time.perf_counter()
        protein = {}
        if hasattr(train, "mod"):
            protein = {"protein_modality": next(m for m in train.mod if m != "rna")}
            with mudata_no_pull():
                tr = train.copy()
        else:
            tr = _shallow_copy(train)
        self.model_cls.setup_anndata(
            tr,
            perturbation_key=PERT_COL,
            control=CONTROL,
            covariate_keys=list(covariate_keys),
            layer=layer,
            **protein,
        )
        model = self.model_cls(tr, **self.init_kwargs)
        train_kwargs = dict(self.train_kwargs)
        train_kwargs.setdefault("seed", seed)  # every vcell model's train takes a seed (PerturbationModel.train)
        model.train(**train_kwargs)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out: dict[str, np.ndarray | str] = {}
        # every condition's RNA prediction goes into its rows of one float32 block as it comes (run scores the block
        # without stacking a copy), so the arrays a model returns are dropped one by one, never all held at once
        block = _PredictionBlock(requests, (tr.mod["rna"] if protein else tr).n_vars)
        if self.output == "predict":  # requests sharing controls and dose: one batched predict_many
            out.update(_predict_grouped(model, tr, requests, seed=seed, protein=bool(protein), block=block))
        for req in requests:
            if req.condition in out:
                continue
            try:
                if self.output == "sample":
                    cells = model.sample(
                        tr,
                        perturbation=req.perturbation,
                        controls=req.controls,
                        dose=req.dose,
                        seed=seed,
                        space="model",  # the space the truth is scored in (log1p(CP10k) of counts)
                        **self.sample_kwargs,
                    )
                    rna = block.put(req.condition, np.asarray(cells.X))
                    out[req.condition] = {"rna": rna, "prot": cells.obsm["protein"].to_numpy()} if protein else rna
                else:
                    kw = {"perturbation": req.perturbation, "controls": req.controls, "dose": req.dose, "seed": seed}
                    kw["space"] = "model"  # unconverted: the space the truth is scored in (log1p(CP10k) of counts)
                    rna = block.put(req.condition, model.predict(tr, **kw))
                    out[req.condition] = (
                        {"rna": rna, "prot": model.predict(tr, **kw, modality="prot")} if protein else rna
                    )
            except (KeyError, ValueError) as err:
                out[req.condition] = str(err)
        self.last_resources = {"fit_s": fit_s, "predict_s": time.perf_counter() - t0}
        return out


class _PredictionBlock:
    """One float32 ``(total controls, n_genes)`` matrix holding the RNA predictions of a model, requests in order.

    :meth:`put` copies a condition's prediction into its rows and returns them (a view), so the model's own array is
    dropped at once; :func:`_stack_predictions` then uses the block as it is when every request was predicted. A
    prediction of another shape is returned as it is (:func:`run` reports the shape).
    """

    def __init__(self, requests: list[PredictionRequest], n_genes: int):
        sizes = [np.asarray(r.controls).size for r in requests]
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        bounds = zip(requests, offsets[:-1], offsets[1:], strict=True)
        self.rows = {r.condition: slice(int(a), int(b)) for r, a, b in bounds}
        self.X = np.empty((int(offsets[-1]), n_genes), dtype=np.float32)

    def put(self, condition: str, pred: Any) -> Any:
        """``pred`` copied into the rows of ``condition`` (cast to float32 as :func:`_checked` casts), or as it is."""
        rows = self.X[self.rows[condition]]
        if not isinstance(pred, np.ndarray) or pred.shape != rows.shape:
            return pred
        rows[...] = pred
        return rows


def _predict_grouped(
    model: Any,
    adata: AnnData,
    requests: list[PredictionRequest],
    *,
    seed: int,
    protein: bool,
    block: _PredictionBlock | None = None,
) -> dict[str, Any]:
    """Predictions of the requests that share their control cells and dose with another, by ``model.predict_many``.

    The controls are read and encoded once per group (the same numbers as one ``predict`` per request). A group whose
    batched call raises is left out, so that the caller predicts its requests one by one and reports each error.
    With ``block``, each RNA prediction is copied into its rows there as it comes (:meth:`_PredictionBlock.put`).
    """
    groups: dict[tuple, list[PredictionRequest]] = {}
    for req in requests:
        key = (np.asarray(req.controls, dtype=np.int64).tobytes(), float(req.dose))
        groups.setdefault(key, []).append(req)
    out: dict[str, Any] = {}
    for reqs in groups.values():
        if len(reqs) < 2:
            continue
        perts = [r.perturbation for r in reqs]
        kw = {"controls": reqs[0].controls, "dose": reqs[0].dose, "seed": seed}
        modalities = ("rna", "prot") if protein else ("rna",)
        preds = []
        try:  # both modalities from one pass: the controls are read and encoded once
            for req, (_, x) in zip(reqs, model._predict_many(adata, perts, modalities=modalities, **kw), strict=True):
                if block is not None:
                    x = {**x, "rna": block.put(req.condition, x["rna"])}
                preds.append(x)
        except (KeyError, ValueError):
            continue
        for req, pred in zip(reqs, preds, strict=True):
            out[req.condition] = pred if protein else pred["rna"]
    return out


@dataclass
class BenchmarkResult:
    """Output of :func:`vcell.bench.run`.

    Attributes
    ----------
    results
        Tidy table: ``model, split, seed, perturbation, metric, value, ceiling``.
    summary
        Per model, split and metric: mean over perturbations per seed, then ``mean``, ``ci_low``, ``ci_high``
        (95% t-interval over seeds; equal to the mean with one seed), ``n_seeds`` and ``ceiling``.
    timings
        ``model, split, seed, total_s`` plus what the predictor reports (``fit_s``, ``predict_s``, ``peak_mem_mb``).
    """

    results: pd.DataFrame
    summary: pd.DataFrame
    timings: pd.DataFrame

    def to_csv(self, out_dir: str | Path) -> list[Path]:
        """Write ``results.csv``, ``summary.csv`` and ``timings.csv`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "results.csv", out / "summary.csv", out / "timings.csv"]
        for df, p in zip((self.results, self.summary, self.timings), paths, strict=True):
            df.to_csv(p, index=False)
        return paths


def _class_models_proteins(spec: Predictor) -> bool:
    """Whether the vcell model class of a :class:`ModelSpec` models proteins (``True`` for other predictors)."""
    cls = getattr(spec, "model_cls", None)
    return cls is None or cls.capabilities.models_proteins


def _resolve_models(models: Sequence[str | Predictor] | Mapping[str, Any]) -> list[Predictor]:
    from vcell import model as vmodel
    from vcell.model._base import model_classes

    if isinstance(models, Mapping):
        items = [ModelSpec(name, *(spec if isinstance(spec, tuple) else (spec,))) for name, spec in models.items()]
        return items
    specs = []
    for m in models:
        if not isinstance(m, str) and isinstance(m, Predictor):
            specs.append(m)
        elif isinstance(m, str) and m in BASELINE_METHODS:  # the four shown in reports, and "interaction"
            specs.append(ModelSpec(m, vmodel.Baseline, {"method": m}))
        elif isinstance(m, str) and m in model_classes():
            specs.append(ModelSpec(m, model_classes()[m]))
        else:
            msg = (
                f"unknown model {m!r}: use one of the baselines {BASELINE_METHODS}, a vcell.model class name, "
                "a ModelSpec or a Predictor"
            )
            raise ValueError(msg)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        msg = f"model names must be unique, got {names}"
        raise ValueError(msg)
    if not specs:
        msg = "models is empty: give at least one baseline name, ModelSpec or Predictor"
        raise ValueError(msg)
    return specs


def _resolve_splits(splits: Sequence[str | Mapping[str, Any]]) -> list[tuple[str, str, dict]]:
    out = []
    for s in splits:
        if isinstance(s, str):
            out.append((s, s, {}))
        else:
            opts = dict(s)
            kind = opts.pop("kind")
            name = opts.pop("name", kind if not opts else f"{kind}:" + ",".join(f"{v}" for v in opts.values()))
            out.append((name, kind, opts))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        msg = f"split names must be unique, got {names}; give each a 'name'"
        raise ValueError(msg)
    return out


def _parse_condition(cond: str) -> tuple[str, float | None]:
    if "@" in cond:
        pert, dose = cond.rsplit("@", 1)
        return pert, float(dose)
    return cond, None


def _sub_adata(X: np.ndarray | sparse.spmatrix, label: str, var_names: pd.Index) -> AnnData:
    import anndata as ad

    obs = pd.DataFrame(
        {"perturbation": pd.Categorical([label] * X.shape[0])}, index=[f"c{i}" for i in range(X.shape[0])]
    )
    X = sparse.csr_matrix(X, dtype=np.float32) if sparse.issparse(X) else np.asarray(X, dtype=np.float32)
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=var_names))


def _shallow_copy(adata: AnnData) -> AnnData:
    """A new AnnData with its own ``obs``, ``var``, ``uns`` and mappings, sharing ``adata``'s matrices.

    What :func:`run` and the models it trains write (split and harmonised ``obs`` columns, ``uns`` entries, the
    scvi-tools registry, new ``obsm`` keys) goes to the copy; ``X``, the layers and the ``obsm``/``varm``/``obsp``
    arrays are shared, never copied (a backed ``X`` stays backed). Nothing in vcell writes into them in place.
    A view is copied whole (its matrices are subsets).
    """
    import anndata as ad

    if adata.is_view:
        return adata.copy()
    raw = None
    if adata.raw is not None:
        raw = {"X": adata.raw.X, "var": adata.raw.var.copy(), "varm": dict(adata.raw.varm)}
    return ad.AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        uns=deepcopy(dict(adata.uns)),
        obsm=dict(adata.obsm),
        varm=dict(adata.varm),
        layers={k: v for k, v in adata.layers.items() if k is not None},  # anndata 0.13 lists X as layers[None]
        obsp=dict(adata.obsp),
        varp=dict(adata.varp),
        raw=raw,
    )


def _expression_rows(X: Any, rows: np.ndarray, transform: str | None) -> np.ndarray | sparse.csr_matrix:
    """log1p(CP10k) expression (``transform``, or the values when ``None``) of rows ``rows`` of ``X``, float32.

    Read in row blocks. Dense for a dense ``X`` (the values of :func:`vcell._utils.expression_for_eval`); for a sparse
    or backed ``X``, CSR, densified only when the cells fit in one block (``vcell.settings.chunk_elements`` values),
    where dense DE and distances are faster than sparse ones.
    """
    from vcell.data import iter_row_blocks, log1p_cp10k_block

    rows = np.asarray(rows, dtype=np.int64)
    bound = _row_nnz_bound(X, rows)
    if bound is not None and rows.size * X.shape[1] > settings.chunk_elements:
        return _gather_csr(X, rows, transform, bound)
    parts = []
    for _, _, block in iter_row_blocks(X, rows=rows):
        E = log1p_cp10k_block(block) if transform == "log1p_cp10k" else block
        parts.append(sparse.csr_matrix(E, dtype=np.float32) if sparse.issparse(E) else np.asarray(E, np.float32))
    if not parts:
        return np.zeros((0, X.shape[1]), dtype=np.float32)
    if not any(sparse.issparse(b) for b in parts):
        return np.vstack(parts)
    out = sparse.vstack([sparse.csr_matrix(b) for b in parts], format="csr")
    return out.toarray() if out.shape[0] * out.shape[1] <= settings.chunk_elements else out


def _row_nnz_bound(X: Any, rows: np.ndarray) -> int | None:
    """Stored values in rows ``rows`` of a CSR matrix (in memory or backed), read from its ``indptr``; else ``None``."""
    from vcell.data._chunked import _source_kind

    kind = _source_kind(X)
    if kind == "sparse" and X.format == "csr":
        indptr = X.indptr
    elif kind == "backed_csr":
        indptr = X.group["indptr"][...]
    else:
        return None
    return int((indptr[rows + 1] - indptr[rows]).sum())


def _gather_csr(X: Any, rows: np.ndarray, transform: str | None, bound: int) -> sparse.csr_matrix:
    """:func:`_expression_rows` of a CSR ``X`` into arrays allocated once (``bound`` values): no stacked copy."""
    from vcell.data import iter_row_blocks, log1p_cp10k_block

    data = np.empty(bound, dtype=np.float32)
    indices = np.empty(bound, dtype=np.int32 if X.shape[1] < 2**31 else np.int64)
    indptr = np.zeros(rows.size + 1, dtype=np.int64)
    at = 0
    for start, stop, block in iter_row_blocks(X, rows=rows):
        E = sparse.csr_matrix(log1p_cp10k_block(block) if transform == "log1p_cp10k" else block)
        data[at : at + E.nnz] = E.data
        indices[at : at + E.nnz] = E.indices
        indptr[start + 1 : stop + 1] = at + E.indptr[1:]
        at += E.nnz
    return sparse.csr_matrix((data[:at], indices[:at], indptr), shape=(rows.size, X.shape[1]))


def _mean_rows(X: np.ndarray | sparse.spmatrix) -> np.ndarray:
    """Mean of the rows of a dense (numpy's float32 mean, as before) or sparse matrix (float64, then float32)."""
    if sparse.issparse(X):
        return np.asarray(X.mean(axis=0, dtype=np.float64)).ravel().astype(np.float32)
    return X.mean(0)


def run(
    adata: AnnData | MuData,
    *,
    models: Sequence[str | Predictor] | Mapping[str, Any] = BASELINES,
    splits: Sequence[str | Mapping[str, Any]],
    seeds: Sequence[int] = (1, 2, 3),
    metrics: Sequence[str] | None = None,
    perturbation_key: str = "perturbation",
    control: str | Sequence[str] = CONTROL,
    covariate_keys: Sequence[str] = (),
    layer: str | None = None,
    n_pcs: int = 50,
    ceiling: bool = True,
    max_cells: int = 2000,
    max_controls: int | None = 2000,
    max_eval_cells: int | None = 20_000,
    progress: bool | None = None,
    on_error: str = "raise",
    pathway_nets: Mapping[str, pd.DataFrame] | None = None,
    protein_modality: str | None = None,
    protein_layer: str | None = None,
    export_dir: str | Path | None = None,
) -> BenchmarkResult:
    """Benchmark models on out-of-distribution splits, beside the baselines, with BENCHMARK.md's metrics.

    For every split and seed: :func:`vcell.bench.split` marks train/val/test cells and
    :func:`vcell.bench.check_leakage` verifies that nothing held out reaches training; every model is set
    up and trained on the train+val cells (a copy; ``adata`` is not changed), then predicts each held-out
    condition as the counterfactual of the training control cells of the held-out cells' contexts, and
    :func:`vcell.metrics.evaluate` scores it against the true held-out cells. Distribution metrics use one
    PCA (``n_pcs``) fitted on the training cells of that split, shared by all models; DE genes are computed
    once per condition and shared too.

    The screen is never densified whole, and may be backed (``anndata.read_h5ad(path, backed="r")``): the training
    PCA (:func:`vcell.metrics.fit_pca`, streamed for sparse and backed matrices; fitted on a seeded subsample of
    100,000 training cells when there are more) and the additive expectations'
    group means are read from the stored matrix in row blocks, log1p(CP10k) applied block by block (counts are
    recognised once, on the whole matrix); truth and control cells are read by row index and stay sparse unless
    they fit in one block (``vcell.settings.chunk_elements`` values). The models get an AnnData of the training
    cells (their rows of the stored matrix, as stored).

    With proteins (a MuData and ``protein_modality``), every vcell model is trained on RNA + protein and every
    metric is also computed on the proteins (log1p(counts per 1e4 of the protein library) of the cells with
    proteins measured; PCA of the training cells' proteins; top-DE proteins ``min(20, n_proteins // 2)``);
    rows carry ``modality`` ``"rna"`` or ``"prot"``. Predictors without proteins (peer adapters) are scored on RNA.

    Parameters
    ----------
    adata
        The screen: counts or log-normalised expression; labels in ``obs[perturbation_key]``. Or a MuData: its
        ``rna`` modality is the screen (keys refer to ``mdata['rna'].obs``).
    models
        Baseline names (``"control"``, ``"mean"``, ``"additive"``, ``"linear"``), vcell model class names
        with default arguments, :class:`ModelSpec` objects, any :class:`Predictor` (e.g. a peer adapter from
        ``benchmarks/peers``), or a mapping ``name -> (cls, init_kwargs, train_kwargs)``.
    splits
        Split kinds (``"combo_seen1"``), or dicts ``{"kind": ..., "name": ..., **kind_options}``.
    seeds
        Split (and model) seeds.
    metrics
        Subset of :data:`vcell.metrics.METRICS`; ``None`` = all.
    perturbation_key, control
        Label column and control label(s), passed to :func:`vcell.pp.harmonize`.
    covariate_keys
        Context columns (e.g. ``["cell_type"]``): controls are matched to held-out cells by them.
    layer
        Expression layer (``None`` = ``X``).
    n_pcs
        PCA dimensions of the distribution metrics.
    ceiling
        Also compute each metric's split-half ceiling on the true cells.
    max_cells
        Cells per condition used by O(n^2) distribution metrics (seeded subsample).
    max_controls
        Most control cells a prediction starts from, per held-out condition: when a condition's training controls
        (those of its contexts) are more, a seeded subsample of ``max_controls`` of them (``None``: all). The
        control reference of the metrics (control mean, DE) still uses all of them. Bounds each prediction's size
        (``max_controls`` x genes) whatever the number of cells.
    max_eval_cells
        Most cells the metrics read per held-out condition, and most cells of the control reference (all held-out
        conditions' controls together): a seeded subsample when there are more (``None``: all). Bounds the memory
        of the truth and reference (held sparse for sparse data) whatever the number of cells; with the default,
        means and DE of groups above 20,000 cells are estimated from 20,000 of them.
    progress
        Progress bar over the grid (default ``vcell.settings.progress_bar``).
    on_error
        ``"raise"``, or ``"skip"`` to record a model that cannot predict a condition (e.g. ``linear`` without an
        embedding for an unseen perturbation) as NaN rows with ``error`` set, and go on.
    pathway_nets
        ``name -> decoupler-format network``: also score ``pathway_agreement_<name>`` (see
        :func:`vcell.metrics.evaluate`; no ceiling for these).
    protein_modality, protein_layer
        With a MuData: the modality (and its layer, ``None``: ``X``) of protein counts to benchmark beside RNA;
        the cells must be the ``rna`` modality's. Cells without protein measurement (NaN or zero-total rows) are
        left out of the protein truth.
    export_dir
        Also write each model's RNA predictions, per split and seed, in cell-eval's input format (see
        :func:`vcell.bench.export_cell_eval`): ``<export_dir>/<split>/seed<seed>/real.h5ad`` (the control reference
        and the true held-out cells the metrics read) and ``pred_<model>.h5ad`` (the same controls and the model's
        predicted cells, negative values written as 0), with one row per file pair (and its ``cell-eval run``
        command) in ``<export_dir>/manifest.csv``. ``None`` writes nothing.

    The ``_pert`` metrics (``pearson_delta_pert``, ``pearson_delta_top_de_pert``) take as reference Systema's perturbed
    centroid of the split's training cells: the mean over the perturbed conditions with train or val cells of each
    condition's mean expression (no held-out cell enters it; NaN when no perturbed cell trains).

    Returns
    -------
    A :class:`BenchmarkResult` with ``results`` (tidy; ``modality`` says which modality a row scores),
    ``summary`` (per modality too) and ``timings``.

    Examples
    --------
    >>> import vcell
    >>> adata = vcell.datasets.kang2018()
    >>> res = vcell.bench.run(
    ...     adata,
    ...     models=["control", "additive"],
    ...     splits=[{"kind": "unseen_cell_type", "held_out": "B"}],
    ...     seeds=[0],
    ...     perturbation_key="perturbation",
    ...     covariate_keys=["cell_type"],
    ...     metrics=["pearson_delta"],
    ... )
    >>> sorted(res.results["model"].unique())
    ['additive', 'control']
    """
    from tqdm.auto import tqdm

    from vcell import metrics as vmetrics
    from vcell.pp._harmonize import _harmonize

    from . import check_leakage, split
    from ._centroid import training_perturbed_centroid
    from ._export import RunExport

    if on_error not in ("raise", "skip"):
        msg = f"on_error must be 'raise' or 'skip', got {on_error!r}"
        raise ValueError(msg)
    for name, cap in (("max_controls", max_controls), ("max_eval_cells", max_eval_cells)):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1):
            msg = f"{name} must be a positive integer or None, got {cap!r}"
            raise ValueError(msg)
    specs = _resolve_models(models)
    split_list = _resolve_splits(splits)
    if not seeds:
        msg = "seeds is empty"
        raise ValueError(msg)
    proteins = None  # counts (RNA cell order), names
    if hasattr(adata, "mod"):
        from vcell.model._protein import protein_info

        if protein_modality is not None:
            counts, pinfo = protein_info(adata, protein_modality, protein_layer)
            proteins = (counts, pinfo["names"])
        elif "rna" not in adata.mod:
            msg = f"MuData has no 'rna' modality; modalities: {list(adata.mod)}"
            raise KeyError(msg)
        adata = adata.mod["rna"]
    elif protein_modality is not None:
        msg = "protein_modality needs a MuData (with an 'rna' and a protein modality), got an AnnData"
        raise ValueError(msg)
    check_obs_keys(adata, [perturbation_key, *covariate_keys], what="obs key")
    # obs, var and uns of our own (harmonize and split write there); the expression matrix is shared, not copied
    base = _shallow_copy(adata)
    if proteins is not None:
        base.obsm[_PROTEIN_BENCH_KEY] = proteins[0]
    # reported only when it changes the labels (data harmonised by the user is not reported again)
    _harmonize(base, perturbation_key=perturbation_key, control=control, log_report="changed")
    context_keys = list(covariate_keys)
    from vcell.data import context_labels
    from vcell.data._chunked import _source_kind
    from vcell.data._disk import backed_row_subset
    from vcell.metrics._de import ControlRanks
    from vcell.metrics._evaluate import _share_control_ranks

    # expression of the metrics: log1p(CP10k) of counts, else the values; decided once on the whole matrix, then
    # every statistic and cell set is read from it in row blocks (sparse and backed matrices are never densified)
    X_src = get_matrix(base, layer)
    transform = None
    if is_count_matrix(X_src):
        check_finite_nonnegative(X_src, name=f"adata.layers[{layer!r}]" if layer else "adata.X")
        transform = "log1p_cp10k"

    rows: list[pd.DataFrame] = []
    timings: list[dict] = []
    show = settings.progress_bar if progress is None else progress
    grid = [(s, seed) for s in split_list for seed in seeds]
    # a backed X (h5ad/zarr on disk) stays on disk: each split's training cells go to a temporary h5ad (in TMPDIR)
    on_disk = layer is None and _source_kind(X_src) not in ("dense", "sparse")
    tmp = tempfile.TemporaryDirectory(prefix="vcell_bench_") if on_disk else None
    bar = tqdm(total=len(grid) * len(specs), disable=not show, desc="vcell benchmark")
    for (split_name, kind, opts), seed in grid:
        a = _shallow_copy(base)  # split writes obs/uns only
        # into bench's own copy: a split the user made (e.g. to look at it) is replaced there, never in ``adata``
        split(a, kind=kind, seed=seed, overwrite=True, **opts)
        check_leakage(a)
        info = a.uns["vcell_split"]
        # conditions to predict: the held-out ones, or (random_cells: every condition trains) those with test cells
        held_out = [str(h) for h in (list(info["held_out"]) or list(info.get("test_conditions", [])))]
        is_train = a.obs["vcell_split"].isin(["train", "val"]).to_numpy()
        train_positions = np.flatnonzero(is_train)
        # the models' own AnnData of the training cells: the Predictor contract gives them only these cells, and
        # setup_anndata writes its registry into obs/uns, which a view cannot take. Its X is the training rows of
        # the screen as stored (sparse stays sparse; a backed X is written to a temporary h5ad in row blocks and
        # opened backed, as a copy of a backed slice would load it whole); nothing below reads it
        if on_disk:
            train = backed_row_subset(a, train_positions, Path(tmp.name) / f"train_{len(timings)}.h5ad")
        else:
            train = a[is_train].copy()
        train.uns.pop("vcell_simulation", None)  # ground truth (held-out outcomes included) never reaches a model
        # one PCA of the training cells (a seeded subsample above _PCA_MAX_CELLS), streamed from the stored matrix
        # (log1p(CP10k) applied block by block)
        pca_rows = _capped(train_positions, _PCA_MAX_CELLS, seed, 0, tag=17)
        pca = vmetrics.fit_pca(
            X_src,
            n_comps=min(n_pcs, pca_rows.size, a.n_vars),
            rows=pca_rows,
            transform=transform,
            seed=seed,
        )
        ctx_all = context_labels(a.obs, context_keys)
        cond = a.obs[PERT_COL].astype(str).to_numpy()
        dose = a.obs[DOSE_COL].to_numpy(dtype=float)
        test = (a.obs["vcell_split"] == "test").to_numpy()
        train_ctrl = is_train & (cond == CONTROL)
        # truth and source controls per held-out condition (shared by all models)
        cases = {}
        for h in held_out:
            pert, hdose = _parse_condition(h)
            sel = test & (cond == pert) & (np.isclose(dose, hdose) if hdose is not None else True)
            if "cell_type" in info:
                key = info.get("cell_type_key", "cell_type")
                sel &= (a.obs[key].astype(str) == str(info["cell_type"])).to_numpy()
            if not sel.any():
                logger.info("split %s seed %s: no test cells for %r, skipped", split_name, seed, h)
                continue
            src = train_ctrl & np.isin(ctx_all, np.unique(ctx_all[sel]))
            if not src.any():
                src = train_ctrl
            cases[h] = {
                "sel": sel,
                "rows": _capped(np.flatnonzero(sel), max_eval_cells, seed, len(cases), tag=11),
                "ctrl_mask": src,
                "dose": float(np.median(dose[sel])),
                "pert": pert,
            }
        if not cases:
            msg = f"split {split_name!r} (seed {seed}) has no held-out condition with test cells"
            raise ValueError(msg)
        ctrl_union = np.zeros(a.n_obs, dtype=bool)
        for c in cases.values():
            ctrl_union |= c["ctrl_mask"]
        ref_rows = _capped(np.flatnonzero(ctrl_union), max_eval_cells, seed, 0, tag=13)
        ctrl_ad = _sub_adata(_expression_rows(X_src, ref_rows, transform), CONTROL, a.var_names)
        # the truth of every held-out condition in one matrix (read once, never copied per condition)
        true_ad = _truth(X_src, cases, transform, a.var_names)
        ranks = ControlRanks(ctrl_ad.X)  # the control reference indexed once for every condition's DE test
        _share_control_ranks(ctrl_ad, ranks)  # and for evaluate's (it would index the same cells again)
        de_genes = {h: vmetrics.top_de_genes(_true_rows(true_ad, c), ranks, n_top=20) for h, c in cases.items()}
        centroid = None  # Systema's reference, from the training cells (one more pass over them: only when scored)
        if metrics is None or {"pearson_delta_pert", "pearson_delta_top_de_pert"} & set(metrics):
            centroid = training_perturbed_centroid(X_src, cond, dose, is_train, transform)
            centroid = np.full(a.n_vars, np.nan) if centroid is None else centroid
        export = None if export_dir is None else RunExport(export_dir, split_name, seed, ctrl_ad, true_ad)
        additive = _additive_expectations(cases, X_src, cond, is_train, transform)
        sim_labels = _simulated_epistasis(a, list(additive))
        requests = [
            PredictionRequest(
                h, c["pert"], c["dose"], _capped(np.flatnonzero(c["ctrl_mask"][train_positions]), max_controls, seed, i)
            )
            for i, (h, c) in enumerate(cases.items())
        ]
        prot = None if proteins is None else _protein_cases(a, is_train, cases, ctrl_union, proteins[1], n_pcs, seed)
        for spec in specs:
            bar.set_postfix_str(f"{split_name} seed={seed} {spec.name}")
            t0 = time.perf_counter()
            with_proteins = (
                prot is not None and getattr(spec, "models_proteins", False) and _class_models_proteins(spec)
            )
            fit_data = _with_protein_modality(train, protein_modality, proteins[1]) if with_proteins else train
            # a fresh MuData needs no copy, a ModelSpec sets up its own shallow copy; any other predictor (e.g. a
            # peer adapter) gets a full copy, as it may write into the matrices
            if not (with_proteins or isinstance(spec, ModelSpec)):  # a backed X is read-only: shared, not copied
                fit_data = _shallow_copy(fit_data) if on_disk else fit_data.copy()
            out = spec.fit_predict(fit_data, requests, seed=seed, covariate_keys=context_keys, layer=layer)
            total_s = time.perf_counter() - t0
            preds, errors, prot_preds = {}, {}, []
            for req in requests:
                X = out.get(req.condition, f"{spec.name} returned no prediction for {req.condition!r}")
                if isinstance(X, Mapping):
                    if with_proteins and "prot" in X:
                        P = _checked(X["prot"], (req.controls.size, len(proteins[1])), spec.name, req.condition)
                        P = P[np.isfinite(P).all(1)]  # a baseline has no proteins to shift for unmeasured controls
                        if len(P):
                            prot_preds.append(_sub_adata(P, req.condition, prot["var_names"]))
                    X = X.get("rna", f"{spec.name} returned no RNA prediction for {req.condition!r}")
                if isinstance(X, str):
                    if on_error == "raise":
                        msg = f"{spec.name} cannot predict {req.condition!r} (split {split_name!r}, seed {seed}): {X}"
                        raise ValueError(msg)
                    errors[req.condition] = X
                    continue
                try:  # NaN would stop evaluate (or hide in a mean): the model's error for this condition
                    X = _checked(X, (req.controls.size, a.n_vars), spec.name, req.condition, finite=True)
                except ValueError as err:
                    if on_error == "raise":
                        raise
                    errors[req.condition] = str(err)
                    continue
                preds[req.condition] = X
                out[req.condition] = None  # the checked copy (or the same array) is what is kept
            # nothing but preds may hold the predictions (a loop variable would keep this model's whole block alive
            # through the next model's training and prediction)
            X = P = None
            del out
            res = dict(getattr(spec, "last_resources", {}) or {})
            timings.append({"model": spec.name, "split": split_name, "seed": seed, "total_s": total_s, **res})
            if preds:
                pred_ad = _stack_predictions(preds, a.var_names)
                del preds
                if getattr(spec, "expression_space", None) is not None:  # checked against the truth by evaluate
                    from vcell.pp._space import ExpressionSpace, record_space

                    record_space(pred_ad, None, ExpressionSpace.from_dict(spec.expression_space))
                if len(additive) >= 2 and (metrics is None or "interaction_auprc" in metrics):
                    rows.append(
                        _interaction_row(spec.name, split_name, seed, pred_ad, cases, additive, true_ad, sim_labels)
                    )
                ok = [h for h in cases if h not in errors]
                true_ok = true_ad if len(ok) == len(cases) else true_ad[true_ad.obs["perturbation"].isin(ok)].copy()
                df = vmetrics.evaluate(
                    pred_ad,
                    true_ok,
                    ctrl_ad,
                    perturbation_key="perturbation",
                    metrics=None if metrics is None else [m for m in metrics if m != "interaction_auprc"],
                    pca=pca,
                    de_genes={h: de_genes[h] for h in ok},
                    perturbed_centroid=centroid,
                    max_cells=max_cells,
                    seed=seed,
                    ceiling=ceiling,
                    pathway_nets=pathway_nets,
                )
                df.insert(0, "modality", "rna")
                df.insert(0, "seed", seed)
                df.insert(0, "split", split_name)
                df.insert(0, "model", spec.name)
                rows.append(df)
                if export is not None:
                    export.add(spec.name, pred_ad)
                del pred_ad
            if prot_preds:
                pred_p = _concat(prot_preds)
                ok = set(pred_p.obs["perturbation"].astype(str))
                true_p = prot["true"][prot["true"].obs["perturbation"].isin(ok)].copy()
                df = vmetrics.evaluate(
                    pred_p,
                    true_p,
                    prot["ctrl"],
                    perturbation_key="perturbation",
                    metrics=None if metrics is None else [m for m in metrics if m != "interaction_auprc"],
                    n_top_de=prot["n_top"],
                    pca=prot["pca"],
                    de_genes={h: prot["de"][h] for h in ok if h in prot["de"]},
                    perturbed_centroid=prot["centroid"],
                    max_cells=max_cells,
                    seed=seed,
                    ceiling=ceiling,
                )
                for col, value in (("modality", "prot"), ("seed", seed), ("split", split_name), ("model", spec.name)):
                    df.insert(0, col, value)
                rows.append(df)
            for h, err in errors.items():
                rows.append(
                    pd.DataFrame(
                        {
                            "model": [spec.name],
                            "split": [split_name],
                            "seed": [seed],
                            "perturbation": [h],
                            "metric": ["error"],
                            "value": [np.nan],
                            "error": [err],
                        }
                    )
                )
            bar.update(1)
        if on_disk:  # this split's training file is done with
            train.file.close()
            Path(train.filename).unlink(missing_ok=True)
    bar.close()
    if tmp is not None:
        tmp.cleanup()
    results = pd.concat(rows, ignore_index=True)
    results["modality"] = results["modality"].fillna("rna") if "modality" in results else "rna"
    if "error" not in results:
        results["error"] = ""
    results["error"] = results["error"].fillna("")
    if "ceiling" not in results:
        results["ceiling"] = np.nan
    return BenchmarkResult(results=results, summary=summarize(results), timings=pd.DataFrame(timings))


#: most training cells the metrics' PCA is fitted on (a seeded subsample above): its cost grows with cells x genes^2
_PCA_MAX_CELLS = 100_000

#: ``obsm`` key of the protein counts inside :func:`run` (its own copy of the screen)
_PROTEIN_BENCH_KEY = "vcell_bench_protein"


def _capped(idx: np.ndarray, max_controls: int | None, seed: int, i: int, *, tag: int = 7) -> np.ndarray:
    """``idx``, or (more than ``max_controls`` of them) a sorted seeded subsample of ``max_controls`` (case ``i``).

    ``tag`` names the use (7: prediction sources, 11: truth, 13: control reference, 17: PCA cells), so each draws its
    own stream.
    """
    if max_controls is None or idx.size <= max_controls:
        return idx
    rng = np.random.default_rng([int(seed), int(i), int(tag)])
    return np.sort(rng.choice(idx, max_controls, replace=False))


def _truth(X: Any, cases: dict, transform: str | None, var_names: pd.Index) -> AnnData:
    """The true cells of every case (their ``rows``, in case order) as one AnnData; sets each case's ``slice``."""
    import anndata as ad

    start, labels = 0, []
    for h, c in cases.items():
        c["slice"] = slice(start, start + c["rows"].size)
        start += c["rows"].size
        labels.append(np.full(c["rows"].size, h, dtype=object))
    E = _expression_rows(X, np.concatenate([c["rows"] for c in cases.values()]), transform)
    E = sparse.csr_matrix(E, dtype=np.float32) if sparse.issparse(E) else np.asarray(E, dtype=np.float32)
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(np.concatenate(labels))},
        index=[f"t{i}" for i in range(start)],
    )
    return ad.AnnData(X=E, obs=obs, var=pd.DataFrame(index=var_names))


def _true_rows(true: AnnData, case: dict) -> np.ndarray | sparse.csr_matrix:
    """The true cells of one case: a row slice of :func:`_truth`'s matrix (a view when dense)."""
    return true.X[case["slice"]]


def _stack_predictions(preds: dict[str, np.ndarray], var_names: pd.Index) -> AnnData:
    """One AnnData of the predictions (labels in ``obs['perturbation']``), as :func:`_concat` of them builds it.

    When the arrays are the consecutive rows of one block (:class:`_PredictionBlock`), that block is the matrix, not
    copied; otherwise they are copied into one preallocated float32 matrix and dropped from ``preds`` one by one.
    """
    import anndata as ad

    n = [len(X) for X in preds.values()]
    X = _rows_of_one_block(list(preds.values()))
    copy = X is None
    if copy:
        X = np.empty((sum(n), len(var_names)), dtype=np.float32)
    labels, names, start = [], [], 0
    for k, h in enumerate(list(preds)):
        m = len(preds[h])
        if copy:
            X[start : start + m] = preds[h]
        del preds[h]
        labels += [h] * m
        names += [f"c{i}-{k}" for i in range(m)]
        start += m
    obs = pd.DataFrame({"perturbation": pd.Categorical(labels)}, index=names)
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=var_names))


def _rows_of_one_block(arrays: list[np.ndarray]) -> np.ndarray | None:
    """``arrays`` as one view, when they are consecutive rows of one float32 matrix from its first row; else ``None``.

    That is a model's :class:`_PredictionBlock` when it predicted every request (or all but the last ones).
    """
    base = arrays[0].base if arrays else None
    if not isinstance(base, np.ndarray) or base.ndim != 2 or base.dtype != np.float32 or not base.flags.c_contiguous:
        return None
    at = 0
    for a in arrays:
        if a.base is not base or a.dtype != base.dtype or a.ndim != 2 or a.shape[1] != base.shape[1]:
            return None
        if a.ctypes.data != base.ctypes.data + at * base.strides[0] or not a.flags.c_contiguous:
            return None
        at += a.shape[0]
    return base[:at]


def _checked(X: Any, shape: tuple[int, int], name: str, condition: str, *, finite: bool = False) -> np.ndarray:
    """``X`` as float32, or a ValueError naming the model and condition.

    Raised when the shape is not ``shape`` (one row per requested control cell) or, with ``finite``, when ``X`` holds
    NaN or infinite values.
    """
    X = np.asarray(X, dtype=np.float32)
    if X.shape != shape:
        msg = (
            f"{name} returned shape {X.shape} for {condition!r}; expected {shape} (one row per requested control cell)"
        )
        raise ValueError(msg)
    bad = ~np.isfinite(X).all(axis=1) if finite else np.zeros(len(X), dtype=bool)
    if bad.any():  # scored, a NaN would stop evaluate (or hide in a mean): it is this model's error for this condition
        msg = f"{name} returned NaN or infinite values for {condition!r} in {int(bad.sum())} of {len(X)} cells"
        raise ValueError(msg)
    return X


def _protein_cases(
    a: AnnData, is_train: np.ndarray, cases: dict, ctrl_union: np.ndarray, names: list[str], n_pcs: int, seed: int
) -> dict[str, Any] | None:
    """Protein truth, controls, training PCA and top-DE proteins of a split's held-out conditions.

    ``cases[h]['sel']`` marks each condition's held-out cells; only cells with proteins measured count. ``None``
    when no held-out or control cell has proteins.
    """
    from vcell import metrics as vmetrics
    from vcell.model._protein import protein_log1p

    from ._centroid import training_perturbed_centroid

    E = protein_log1p(a.obsm[_PROTEIN_BENCH_KEY])
    measured = np.isfinite(E).all(axis=1)
    var_names = pd.Index(names)
    ctrl = ctrl_union & measured
    truth = {h: E[c["sel"] & measured] for h, c in cases.items() if (c["sel"] & measured).any()}
    if not truth or not ctrl.any() or not (is_train & measured).any():
        return None
    train_E = E[is_train & measured]
    n_top = max(1, min(20, len(names) // 2))
    cond, dose = a.obs[PERT_COL].astype(str).to_numpy(), a.obs[DOSE_COL].to_numpy(dtype=float)
    centroid = training_perturbed_centroid(E, cond, dose, is_train & measured, None)
    return {
        "var_names": var_names,
        "true": _concat([_sub_adata(X, h, var_names) for h, X in truth.items()]),
        "ctrl": _sub_adata(E[ctrl], CONTROL, var_names),
        "pca": vmetrics.fit_pca(train_E, n_comps=min(n_pcs, *train_E.shape), seed=seed),
        "de": {h: vmetrics.top_de_genes(X, E[ctrl], n_top=n_top) for h, X in truth.items()},
        "n_top": n_top,
        "centroid": np.full(len(names), np.nan) if centroid is None else centroid,
    }


def _with_protein_modality(train: AnnData, modality: str, names: list[str]) -> MuData:
    """The training cells as a MuData: ``rna`` (without the bench's protein copy) and the protein counts."""
    import anndata as ad
    import mudata as md

    rna = _shallow_copy(train)
    counts = rna.obsm.pop(_PROTEIN_BENCH_KEY)
    prot = ad.AnnData(X=np.asarray(counts, dtype=np.float32), obs=pd.DataFrame(index=rna.obs_names.copy()))
    prot.var_names = pd.Index(names)
    with mudata_no_pull():
        return md.MuData({"rna": rna, modality: prot})


def _additive_expectations(
    cases: dict, X: Any, cond: np.ndarray, is_train: np.ndarray, transform: str | None
) -> dict[str, np.ndarray]:
    """Additive expectation (control mean + sum of training single shifts) of held-out doubles whose singles trained.

    The means of the training control cells and of the needed singles are read from ``X`` in row blocks
    (``transform`` applied to each): only those cells' rows, nothing densified whole.
    """
    from vcell.data import group_means

    doubles = {h: h.split("+") for h in cases if "@" not in h and len(h.split("+")) == 2}
    needed = {p for parts in doubles.values() for p in parts}
    if not doubles or not needed & set(cond[is_train]):
        return {}
    keep = is_train & np.isin(cond, [*needed, CONTROL])
    means = group_means(X, np.where(keep, cond, None), transform=transform)
    if CONTROL not in means.index:
        return {}
    ctrl = means.loc[CONTROL].to_numpy()
    return {
        h: ctrl + sum(means.loc[p].to_numpy() - ctrl for p in parts)
        for h, parts in doubles.items()
        if all(p in means.index for p in parts)
    }


def _simulated_epistasis(adata: AnnData, doubles: list[str]) -> np.ndarray | None:
    """Ground-truth non-additivity labels of ``doubles`` from :func:`vcell.datasets.simulate`, if present."""
    sim = adata.uns.get("vcell_simulation")
    if sim is None or "combos" not in sim or "epistatic" not in sim:
        return None
    truth = dict(zip(map(str, sim["combos"]), np.asarray(sim["epistatic"], dtype=bool), strict=True))
    if not all(h in truth for h in doubles):
        return None
    return np.array([truth[h] for h in doubles])


def _interaction_row(
    model: str, split: str, seed: int, pred: AnnData, cases: dict, additive: dict, true: AnnData, labels
) -> pd.DataFrame:
    """``interaction_auprc`` over the held-out doubles (simulation ground truth when known, else median rule)."""
    from vcell import metrics as vmetrics

    names = [h for h in additive if h in set(pred.obs["perturbation"].astype(str))]
    if labels is not None:
        labels = labels[[list(additive).index(h) for h in names]]
    X = np.asarray(pred.X)
    pred_means = np.stack([X[(pred.obs["perturbation"] == h).to_numpy()].mean(0) for h in names])
    true_means = np.stack([_mean_rows(_true_rows(true, cases[h])) for h in names])
    add = np.stack([additive[h] for h in names])
    value = vmetrics.interaction_auprc(pred_means, add, None if labels is not None else true_means, labels=labels)
    return pd.DataFrame(
        {
            "model": [model],
            "split": [split],
            "seed": [seed],
            "perturbation": ["all doubles"],
            "metric": ["interaction_auprc"],
            "value": [value],
            "ceiling": [np.nan],
        }
    )


def _concat(parts: list[AnnData]) -> AnnData:
    import anndata as ad

    out = ad.concat(parts, axis=0, index_unique="-")
    out.obs["perturbation"] = out.obs["perturbation"].astype("category")
    return out


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean over perturbations per seed, then mean and 95% t-interval over seeds, with the ceiling beside it.

    Parameters
    ----------
    results
        Tidy table from :func:`run` (``model, split, seed, perturbation, metric, value[, ceiling]``).

    Returns
    -------
    One row per model, split (modality, when ``results`` has that column) and metric: ``mean``, ``ci_low``,
    ``ci_high``, ``n_seeds``, ``ceiling``.

    Examples
    --------
    >>> import pandas as pd
    >>> res = pd.DataFrame(
    ...     {
    ...         "model": "m",
    ...         "split": "s",
    ...         "seed": [1, 2, 3],
    ...         "perturbation": "A",
    ...         "metric": "x",
    ...         "value": [1.0, 2.0, 3.0],
    ...     }
    ... )
    >>> row = summarize(res).iloc[0]
    >>> float(row["mean"]), int(row["n_seeds"]), round(float(row["ci_high"]), 3)
    (2.0, 3, 4.484)
    """
    from scipy import stats

    res = results[results["metric"] != "error"]
    if "ceiling" not in res:
        res = res.assign(ceiling=np.nan)
    keys = ["model", "split", *(["modality"] if "modality" in res else []), "metric"]
    per_seed = res.groupby([*keys, "seed"], sort=False)[["value", "ceiling"]].mean().reset_index()

    def _agg(g: pd.DataFrame) -> pd.Series:
        v = g["value"].dropna().to_numpy()
        n = v.size
        mean = float(v.mean()) if n else np.nan
        half = float(stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        return pd.Series(
            {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n_seeds": n, "ceiling": g["ceiling"].mean()}
        )

    return per_seed.groupby(keys, sort=False)[["value", "ceiling"]].apply(_agg).reset_index()
