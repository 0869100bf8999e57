"""``CellJEPA``: joint-embedding predictive pretraining over gene modules, then latent perturbation transitions."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from vcell._constants import CONTROL, DOSE_COL, PERT_COL, REGISTRY_KEYS
from vcell._docs import doc_checkpoint_path, doc_params
from vcell._settings import logger
from vcell._utils import check_dose, resolve_seed
from vcell.data import CellBatches, Lookup, RowReader, control_mask
from vcell.data._datamodule import PooledPairs
from vcell.data._loader import index_dtype
from vcell.module import CellJEPAModule, JEPAModule, LatentTransitionModule, cosine_error, retrieval_ranks
from vcell.module._causal_vae import EXTRA_NODES_KEY
from vcell.module._jepa import ENCODERS, MASK_KEY, OBJECTIVES, PROTEIN_LOG_KEY, SOURCE_Z_KEY, TARGET_Z_KEY

from ._base import Capabilities, PerturbationModel, check_hyperparameters, check_options
from ._encoding import PerturbationInputs, _as_anndata
from ._rows import join_rows, model_reader, read_rows, row_blocks

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

POLICIES = ("random", "coexpression")
#: cells used to cluster genes by co-expression (a seeded subsample beyond)
_COEXPRESSION_MAX_CELLS = 20_000
#: rows of random numbers drawn at a time for the validation masks
_MASK_ROWS = 65_536


def _cell_batches(
    fields: dict[str, Any],
    idx: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    fixed: bool = False,
    pairs: list[tuple[np.ndarray, np.ndarray]] | None = None,
    shuffle: str | bool = "auto",
) -> CellBatches:
    """Batches over cells ``idx`` of ``fields`` (``fixed=True``: the same order every pass): a :class:`CellBatches`.

    With ``pairs`` (``(targets, pool)`` per context), each pass draws for every target cell one source cell of its
    pool (with replacement, seeded by ``(seed, epoch + 1)``) and yields the source's embedding (``SOURCE_Z_KEY``, read
    from the field ``TARGET_Z_KEY``) with the target's fields; ``idx`` are then identity pairs (controls paired with
    themselves).
    """
    idx = np.asarray(idx, dtype=np.int64)
    shuffle = False if fixed else shuffle
    opts = {"batch_size": batch_size, "seed": seed, "shuffle": shuffle, "fixed": fixed, "epoch_start": 1}
    if pairs is None:
        return CellBatches(fields, idx, **opts)

    n_items = len(idx) + sum(len(t) for t, _ in pairs)
    return CellBatches(
        fields, PooledPairs(idx, pairs), source_fields={SOURCE_Z_KEY: TARGET_Z_KEY}, n_items=n_items, **opts
    )


def _validation_masks(jepa: JEPAModule, n_obs: int, val_idx: np.ndarray, seed: int, proteins: bool) -> Lookup:
    """The fixed token masks of the validation cells ``val_idx``, as a :class:`vcell.data.Lookup` by cell.

    Each cell's mask hides ``round(mask_ratio * n_modules)`` module tokens (at least 1, at most all but 1), drawn from
    one ``torch.rand(n_obs, n_modules)`` seeded by ``seed`` (then ``torch.rand(n_obs, 1)`` for the protein token),
    drawn in row blocks: the same numbers as one draw of every cell (torch's CPU generator fills them in order), with
    only the validation cells' masks kept (the others' cells hold code 0 and are never read).
    """
    gen = torch.Generator().manual_seed(seed)
    k = min(max(round(jepa.mask_ratio * jepa.n_modules), 1), jepa.n_modules - 1)
    cells = np.sort(np.asarray(val_idx, dtype=np.int64))  # the rows of the masks, in cell order

    def kept(width: int) -> list[torch.Tensor]:  # the next torch.rand(n_obs, width), block by block, cells' rows
        out = []
        for start in range(0, n_obs, _MASK_ROWS):
            stop = min(start + _MASK_ROWS, n_obs)
            rows = cells[np.searchsorted(cells, start) : np.searchsorted(cells, stop)] - start
            out.append(torch.rand(stop - start, width, generator=gen)[torch.as_tensor(rows)])
        return out

    masks = torch.cat([draw.argsort(dim=1) < k for draw in kept(jepa.n_modules)])
    if proteins:
        masks = torch.cat([masks, torch.cat(kept(1)) < jepa.mask_ratio], dim=1)
    codes = np.zeros(n_obs, dtype=index_dtype(max(len(cells), 1)))
    codes[cells] = np.arange(len(cells))
    return Lookup(masks, codes)


def _history(plan: Any) -> dict[str, pd.DataFrame]:
    hist = pd.DataFrame(plan.history).set_index("epoch") if plan.history else pd.DataFrame()
    return {col: hist[[col]] for col in hist.columns}


class CellJEPA(PerturbationInputs, PerturbationModel):
    """Joint-embedding predictive pretraining over gene-module tokens, then a perturbation transition in its latent.

    **Tokens** are gene modules, chosen by ``modules``: ``"random"`` (genes split at random into ``n_modules`` equal
    groups, seeded), ``"coexpression"`` (k-means with ``n_modules`` clusters on the rows of the gene-gene
    correlation matrix of the training cells' log1p(CP10k)), a pathway resource (a decoupler-format DataFrame with
    ``source`` = module and ``target`` = gene, or a ``.gmt``/csv file read by :func:`vcell.priors.read_network`:
    modules with at least ``min_genes`` model genes are kept, at most the ``n_modules`` largest; genes in no kept
    module form one more module ``"rest"``) or a dict ``{module: genes}`` used as given. Pathway modules may share
    genes. The resolved modules are kept in :attr:`gene_modules_`.

    **Pretraining** (:meth:`pretrain`, :class:`vcell.module.JEPAModule`): on all non-test cells (perturbed or not), a
    share ``mask_ratio`` of each cell's modules is masked; a context encoder (``encoder="transformer"``, or a DeepSets
    ``"mlp"``) sees the other modules, with every gene of a masked module hidden; a predictor predicts the masked
    modules' embeddings from an EMA target encoder that sees the whole cell (``ema=False``: the context encoder
    under stop-gradient). ``objective="reconstruction"`` (the control arm) decodes the masked genes' log1p values
    instead. ``anti_collapse`` adds VICReg variance and covariance terms on the cell embeddings (the mean of the
    encoder's output tokens, ``n_latent`` dimensions). The per-epoch embedding std and effective rank are logged
    (:attr:`history_`), so a collapse shows.

    **Transition** (:meth:`train`, :class:`vcell.module.LatentTransitionModule`): with the encoder frozen, every
    perturbed training cell is paired with a random control cell of its context (anew each epoch; controls are also
    paired with themselves) and ``z_pert = z_ctrl + g(c, cov) - g(0, cov)`` is fitted by MSE in embedding space; ``c``
    is the perturbation encoder's vector (one-hot, embedding table or gene graph; a combination sums its singles),
    ``cov`` learned covariate embeddings. A decoder (MLP or linear) maps embeddings to log1p(CP10k) and is fitted on
    all training cells. A prediction for a control cell ``x`` with embedding ``z`` is
    ``x + decode(z + delta) - decode(z)`` (``residual=True``, as CausalVAE's default, keeping each cell's own
    detail) or ``decode(z + delta)``, clipped at 0.

    **RNA + protein** (a MuData registered with ``setup_anndata(mdata, protein_modality="prot")``, CITE-seq): the
    proteins, as log1p(counts per 1e4 of the cell's protein library) standardised per protein, form one more token of
    the encoder beside the gene modules (a learned linear map of all proteins plus a token id). Pretraining masks it
    like a module (with probability ``mask_ratio``, independently of the modules) and predicts its target embedding,
    so the encoder learns to predict protein from RNA and RNA from protein; the cell embedding, the mean of the
    visible output tokens, the protein token's included, is a joint latent, and the transition works in it unchanged.
    One token for all proteins (rather than one per protein) because panels are small (tens to a few hundred
    antibodies) and correlated: a single token keeps the sequence short and its masking comparable to a gene
    module's. (Averaging only the gene-module tokens, so that cells with and without proteins average the same number
    of tokens, kept less of a protein-only planted shift in simulations (0.62 vs 0.69 of the true shift, 3 seeds)
    with the same RNA accuracy, also when most perturbed cells lacked proteins.) A second decoder head (same shape
    as the gene decoder) maps embeddings to protein log1p values, fitted beside the gene decoder by MSE on the
    measured cells. ``predict(..., modality="prot")`` gives ``p + decodeP(z + delta) - decodeP(z)`` for a cell with
    proteins ``p`` (``residual=True``, as for RNA) and ``decodeP(z + delta)`` for a cell without, or with
    ``residual=False``, clipped at 0. Cells without protein measurement (NaN rows, or rows summing to 0) train the
    RNA part as usual: their protein token is hidden from both encoders (the predictor gets the mask token there),
    it is never a target, and they are left out of the protein decoder's loss; their embedding is that of the
    modules alone, as when pretraining masks the protein token. The model reads the proteins of every cell it
    embeds, so pass the MuData (or its ``rna`` with ``obsm['vcell_protein']``) to :meth:`predict`,
    :meth:`get_latent_representation`, etc. RNA-only models are unchanged (no protein parameters, same random
    draws, same numbers).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (counts or log data), or a MuData whose ``rna`` was registered
        (with ``protein_modality=``: RNA + protein, see above).
    registry
        Registry of a saved model (used by :meth:`load`).
    n_latent
        Token and cell-embedding dimension.
    modules
        ``"random"``, ``"coexpression"``, a pathway DataFrame or file path, or a dict ``{module: genes}``.
    n_modules
        Number of modules (``"random"``, ``"coexpression"``), or the most pathway modules kept.
    min_genes
        Pathway modules need at least this many model genes.
    encoder
        ``"transformer"`` or ``"mlp"``.
    n_layers, n_heads
        Encoder depth and attention heads.
    objective
        ``"jepa"`` or ``"reconstruction"``.
    ema, ema_momentum
        EMA target encoder and its momentum (updated after every optimizer step).
    anti_collapse, variance_weight, covariance_weight
        VICReg variance/covariance terms on the cell embeddings and their weights.
    mask_ratio
        Share of modules masked per cell.
    n_hidden
        Width of the transition MLP and of the decoder.
    decoder
        ``"mlp"`` or ``"linear"``.
    residual
        Predict ``x + decode(z + delta) - decode(z)`` (default) rather than ``decode(z + delta)``.
    perturbation_embedding, gene_graph, graph_layers, graph_own_embedding
        Perturbation operators as in :class:`vcell.model.CausalVAE` (``None``: one-hot).
    seed
        Seed of the ``"random"`` and ``"coexpression"`` modules; ``None`` uses ``vcell.settings.seed``.

    Examples
    --------
    Out of distribution: a double perturbation held out by :func:`vcell.bench.split`, predicted from its singles.

    >>> import vcell
    >>> adata = vcell.datasets.simulate(n_cells=200, n_genes=40, n_perturbations=3, n_combos=2, seed=0)
    >>> vcell.bench.split(adata, kind="combo_half", perturbation_key="perturbation", seed=0)
    >>> held = adata.uns["vcell_split"]["held_out"][0]  # a double whose cells are all test cells
    >>> train = adata[adata.obs["vcell_split"] != "test"].copy()  # (models also skip test cells themselves)
    >>> vcell.model.CellJEPA.setup_anndata(train, perturbation_key="perturbation", control="control")
    >>> model = vcell.model.CellJEPA(train, n_latent=16, n_modules=4, modules="random")
    >>> model.train(max_epochs=2, pretrain_epochs=2, seed=0, trainer_kwargs={"enable_progress_bar": False})
    >>> model.predict(perturbation=held).shape  # counterfactuals of the 40 control cells
    (40, 40)
    >>> model.get_latent_representation(adata).shape  # every cell, held-out ones too
    (200, 16)
    """

    capabilities = Capabilities(
        learned=True, can_sample=False, models_proteins=True, predict_options=("residual", "batch_size")
    )

    def __init__(
        self,
        adata: AnnData | MuData | None = None,
        registry: dict | None = None,
        *,
        n_latent: int = 64,
        modules: str | PathLike | pd.DataFrame | Mapping[str, Sequence[str]] = "coexpression",
        n_modules: int = 32,
        min_genes: int = 5,
        encoder: str = "transformer",
        n_layers: int = 2,
        n_heads: int = 4,
        objective: str = "jepa",
        ema: bool = True,
        ema_momentum: float = 0.996,
        anti_collapse: bool = True,
        variance_weight: float = 1.0,
        covariance_weight: float = 0.04,
        mask_ratio: float = 0.5,
        n_hidden: int = 128,
        decoder: str = "mlp",
        residual: bool = True,
        perturbation_embedding: str | pd.DataFrame | None = None,
        gene_graph: str | pd.DataFrame | None = None,
        graph_layers: int = 1,
        graph_own_embedding: bool = True,
        seed: int | None = None,
    ) -> None:
        check_hyperparameters(
            n_layers=(n_layers, "int>=1"),
            n_heads=(n_heads, "int>=1"),
            n_hidden=(n_hidden, "int>=1"),
            variance_weight=(variance_weight, ">=0"),
            covariance_weight=(covariance_weight, ">=0"),
            graph_layers=(graph_layers, "int>=1"),
        )
        adata = _as_anndata(adata)
        super().__init__(adata, registry=registry)
        if encoder not in ENCODERS:
            msg = f"encoder must be one of {ENCODERS}, got {encoder!r}"
            raise ValueError(msg)
        if objective not in OBJECTIVES:
            msg = f"objective must be one of {OBJECTIVES}, got {objective!r}"
            raise ValueError(msg)
        for name, value in {"n_latent": n_latent, "n_modules": n_modules, "min_genes": min_genes}.items():
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                msg = f"{name} must be a positive integer, got {value!r}"
                raise ValueError(msg)
        if gene_graph is not None and perturbation_embedding is not None:
            msg = "pass either perturbation_embedding or gene_graph, not both"
            raise ValueError(msg)
        self.residual = bool(residual)
        genes = self._genes()
        policy = modules if isinstance(modules, str) and modules in POLICIES else type(modules).__name__
        scale, protein_scale, n_proteins = None, None, len(self.protein_names_)
        if adata is not None and registry is None:  # a new model; load() restores modules and scales
            fit_cells = self._non_test_cells(adata)
            reader, module_seed = model_reader(self), resolve_seed(seed)

            def coexpressed() -> np.ndarray:
                return read_rows(reader, _coexpression_cells(fit_cells, module_seed))

            modules = self._resolve_modules(coexpressed, genes, modules, int(n_modules), int(min_genes), module_seed)
            scale = _mean_std(reader, fit_cells)
            if n_proteins:
                P = self._protein_expression(adata, fit_cells)
                P = P[np.isfinite(P).all(axis=1)]
                protein_scale = (P.mean(0), P.std(0)) if len(P) else (np.zeros(n_proteins), np.ones(n_proteins))
        elif not isinstance(modules, Mapping):
            msg = "a model without data needs modules= as a dict {module: genes}"
            raise ValueError(msg)
        modules = {str(k): [str(g) for g in v] for k, v in modules.items()}  # saved: load() rebuilds the same
        self.gene_modules_: dict[str, list[str]] = modules
        pos = {g: i for i, g in enumerate(genes)}
        table = self._embedding_table(adata, perturbation_embedding)
        perturbation_embedding = table
        graph = self._gene_graph(adata, gene_graph)
        gene_graph = graph
        extra = [] if table is None else sorted(set(map(str, table.index)) - set(self.vocab.atoms))
        self.atoms_: list[str] = [*self.vocab.atoms, *extra]
        self._atom_index = {a: i for i, a in enumerate(self.atoms_)}
        features = None if table is None else table.loc[self.atoms_].to_numpy(dtype=np.float32)
        seen = np.array([a in set(self.vocab.atoms) for a in self.atoms_], dtype=bool)
        graph_kwargs = {} if graph is None else self._graph_arrays(graph, int(graph_layers), graph_own_embedding)
        self.covariate_names_, self._categories = self._covariate_categories()
        jepa = JEPAModule(
            len(genes),
            [[pos[g] for g in v if g in pos] for v in modules.values()],
            n_latent=int(n_latent),
            encoder=encoder,
            n_layers=int(n_layers),
            n_heads=int(n_heads),
            objective=objective,
            ema=bool(ema),
            ema_momentum=float(ema_momentum),
            anti_collapse=bool(anti_collapse),
            variance_weight=float(variance_weight),
            covariance_weight=float(covariance_weight),
            mask_ratio=float(mask_ratio),
            n_proteins=n_proteins,
        )
        transition = LatentTransitionModule(
            int(n_latent),
            len(genes),
            len(self.atoms_),
            covariate_sizes=tuple(len(c) for c in self._categories),
            n_hidden=int(n_hidden),
            decoder=decoder,
            perturbation_features=features,
            seen_atoms=seen,
            **graph_kwargs,
            log_dose_init=self._log_dose_init(adata),
            n_proteins=n_proteins,
        )
        self.module = CellJEPAModule(jepa, transition)
        if scale is not None:
            jepa.set_scale(*scale)
        if protein_scale is not None:
            jepa.set_protein_scale(*protein_scale)
        self.is_pretrained_ = False
        self._model_summary_string = (
            f"CellJEPA: {len(modules)} gene-module tokens ({policy}), {encoder} encoder, objective={objective!r}, "
            f"ema={bool(ema)}, anti_collapse={bool(anti_collapse)}, n_latent={n_latent}; "
            f"{len(self.atoms_)} perturbations, covariates {self.covariate_names_}"
            + (f"; {n_proteins} proteins ({self.protein_modality_!r}) as one more token" if n_proteins else "")
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ gene modules
    def _resolve_modules(
        self,
        expression: Callable[[], np.ndarray],
        genes: list[str],
        spec: Any,
        n_modules: int,
        min_genes: int,
        seed: int,
    ) -> dict[str, list[str]]:
        """``{module: genes}`` of the masking policy ``spec`` (see the class docstring), genes in model order.

        ``expression()``: the cells (x genes, log1p) that ``"coexpression"`` clusters genes on (read only for it).
        """
        n_genes = len(genes)
        if isinstance(spec, str) and spec in POLICIES:
            if n_modules < 2 or n_modules > n_genes:
                msg = f"n_modules must be between 2 and the number of genes ({n_genes}), got {n_modules}"
                raise ValueError(msg)
            if spec == "random":
                labels = np.empty(n_genes, dtype=np.int64)
                for k, part in enumerate(np.array_split(np.random.default_rng(seed).permutation(n_genes), n_modules)):
                    labels[part] = k
            else:
                labels = _coexpression_labels(expression(), n_modules, seed)
            out = {f"{spec}_{k:03d}": [genes[i] for i in np.flatnonzero(labels == k)] for k in range(n_modules)}
            return {k: v for k, v in out.items() if v}
        if isinstance(spec, Mapping):
            known = set(genes)
            out = {str(k): [g for g in dict.fromkeys(map(str, v)) if g in known] for k, v in spec.items()}
            out = {k: v for k, v in out.items() if v}
            if len(out) < 2:
                msg = f"modules dict needs at least 2 modules holding model genes, got {len(out)}"
                raise ValueError(msg)
            return out
        if isinstance(spec, str | PathLike):
            from vcell.priors import read_network

            table, what = read_network(spec), f"pathway file {str(spec)!r}"
        elif isinstance(spec, pd.DataFrame):
            table, what = spec, "pathway table"
            missing = [c for c in ("source", "target") if c not in table.columns]
            if missing:
                msg = f"modules DataFrame lacks the column(s) {missing}; expected decoupler format (source, target)"
                raise ValueError(msg)
        else:
            msg = f"modules must be one of {POLICIES}, a DataFrame, a file path or a dict, got {type(spec).__name__}"
            raise ValueError(msg)
        order = pd.Index(genes)
        sets = {}
        for name, targets in table.groupby(table["source"].astype(str), sort=True)["target"]:
            idx = np.unique(order.get_indexer(targets.astype(str).to_numpy()))
            idx = idx[idx >= 0]
            if len(idx) >= min_genes:
                sets[str(name)] = idx
        if not sets:
            msg = f"no module of the {what} has at least min_genes={min_genes} of the model's genes"
            raise ValueError(msg)
        kept = sorted(sets, key=lambda k: (-len(sets[k]), k))[:n_modules]
        if len(kept) < len(sets):
            logger.info("CellJEPA: kept the %d largest of %d pathway modules (n_modules)", len(kept), len(sets))
        out = {k: [genes[i] for i in sets[k]] for k in sorted(kept)}
        covered = np.zeros(n_genes, dtype=bool)
        for k in kept:
            covered[sets[k]] = True
        if not covered.all():
            out["rest"] = [genes[i] for i in np.flatnonzero(~covered)]
        if len(out) < 2:
            msg = f"the {what} gives a single module over the model's genes; at least 2 are needed"
            raise ValueError(msg)
        return out

    # ------------------------------------------------------------------ data helpers
    def _device(self) -> torch.device:
        return self.module.jepa.gene_mean.device

    def _embed_cells(
        self, adata: AnnData, idx: np.ndarray, batch_size: int = 4096, *, reader: RowReader | None = None
    ) -> np.ndarray:
        """Embeddings (float32) of cells ``idx``, read and embedded ``batch_size`` cells at a time.

        Rows are read by ``reader`` (by default from ``adata``'s matrix); only the embeddings are kept.
        """
        reader = model_reader(self, adata) if reader is None else reader
        # written into one array allocated up front: no list of parts and concatenated copy (2x the embeddings)
        out = np.empty((len(idx), self.module.jepa.n_latent), dtype=np.float32)
        start = 0
        for chunk in row_blocks(idx, batch_size):
            out[start : start + len(chunk)] = self._embed(
                reader(chunk), batch_size, proteins=self._cell_proteins(adata, chunk)
            )
            start += len(chunk)
        return out

    def _embed(self, X: np.ndarray, batch_size: int = 4096, *, proteins: np.ndarray | None = None) -> np.ndarray:
        jepa = self.module.jepa.eval()
        dev = self._device()
        out = []
        for i in range(0, len(X), batch_size):
            p = None if proteins is None else torch.as_tensor(proteins[i : i + batch_size], device=dev)
            out.append(jepa.embed(torch.as_tensor(X[i : i + batch_size], device=dev), p).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, jepa.n_latent), dtype=np.float32)

    def _encode_query(self, labels: Sequence[str], doses: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        labels = [str(x) for x in labels]
        if self._graph_nodes is None and len(self.atoms_) == self.vocab.n_atoms:
            self.vocab.check(
                labels, what="CellJEPA (one-hot perturbation encoder; pass perturbation_embedding= or gene_graph=)"
            )
        return super()._encode_query(labels, doses)

    def _require_pretrained(self) -> None:
        if not self.is_pretrained_:
            msg = "the encoder is not pretrained: call model.pretrain() or model.train() first"
            raise RuntimeError(msg)

    # ------------------------------------------------------------------ training
    @doc_params(doc_checkpoint_path=doc_checkpoint_path)
    def pretrain(
        self,
        max_epochs: int = 100,
        lr: float = 1e-3,
        batch_size: int = 256,
        accelerator: str = "auto",
        devices: int | str = "auto",
        early_stopping: bool = False,
        seed: int | None = None,
        trainer_kwargs: dict | None = None,
        *,
        weight_decay: float = 1e-6,
        validation_fraction: float = 0.1,
        early_stopping_patience: int = 20,
        strategy: str | Any = "auto",
        num_nodes: int = 1,
        shuffle: str = "auto",
        checkpoint_path: str | None = None,
    ) -> None:
        """Pretrain the encoder on all non-test cells (perturbed or not) by masked module-embedding prediction.

        Validation cells are ``obs['vcell_split'] == 'val'`` when present, else a seeded ``validation_fraction`` of
        the non-test cells; their module masks are drawn once. The first call re-initialises the weights from
        ``seed``, so the same seed gives the same encoder (on CPU).

        Parameters
        ----------
        max_epochs
            Passes over the cells.
        lr, weight_decay
            AdamW learning rate and weight decay.
        batch_size
            Cells per batch (the VICReg terms and diagnostics are per batch).
        accelerator, devices
            Passed to :class:`lightning.Trainer`.
        early_stopping
            Stop when ``val_loss`` has not improved for ``early_stopping_patience`` epochs and keep the best weights
            (off by default: with a moving EMA target the loss is not a stable guide).
        seed
            Random seed of weights, split and masks; ``None`` uses ``vcell.settings.seed``.
        trainer_kwargs
            Further :class:`lightning.Trainer` arguments.
        validation_fraction
            Share of cells held out for validation without ``val`` cells in ``obs['vcell_split']``.
        early_stopping_patience
            Epochs without improvement before stopping.
        strategy, num_nodes
            Passed to :class:`lightning.Trainer`: ``strategy="ddp", devices=N, num_nodes=M`` trains in ``N * M``
            processes, each reading its own share of every epoch (:class:`vcell.data.CellBatches`).
        shuffle
            Order of the training cells: ``"full"`` (a new permutation per epoch), ``"block"`` (permuted blocks of
            consecutive cells, then cells within windows: contiguous reads from disk) or ``"auto"`` (``"block"`` for
            a backed AnnData, else ``"full"``).
        {doc_checkpoint_path}

        Sets the following fields
        -------------------------
        ``model.pretrain_history_``, ``model.history_``
            Per-epoch means (dict of DataFrames): ``train_loss``, ``train_jepa`` (or ``train_reconstruction``),
            ``train_variance``, ``train_covariance``, ``train_embedding_std``, ``train_effective_rank`` and the
            ``val_*`` counterparts.
        ``model.is_pretrained_``, ``model.pretrain_indices_``
            Whether pretraining ran and the cells it used.
        """
        import lightning

        from vcell.train import TrainingPlan, as_callback, fit
        from vcell.train._callbacks import TargetEMA

        self._check_train(
            max_epochs=max_epochs,
            lr=lr,
            batch_size=batch_size,
            weight_decay=weight_decay,
            validation_fraction=validation_fraction,
            early_stopping_patience=early_stopping_patience,
            num_nodes=num_nodes,
        )
        seed = resolve_seed(seed)
        lightning.seed_everything(seed, verbose=False)
        jepa = self.module.jepa
        if not self.is_pretrained_:
            jepa.reset_parameters()
        adata = self.adata
        train_idx, val_idx = self._split(adata, validation_fraction, seed)
        if len(train_idx) < 2:
            msg = f"pretraining needs at least 2 training cells, got {len(train_idx)}"
            raise ValueError(msg)
        cells = {REGISTRY_KEYS.X_KEY: model_reader(self)}  # rows read per batch: never densified whole
        if self.protein_names_:
            cells[PROTEIN_LOG_KEY] = torch.as_tensor(self._cell_proteins(adata))
        train_dl = _cell_batches(cells, train_idx, batch_size=batch_size, seed=seed, shuffle=shuffle)
        val_dl = None
        if len(val_idx) >= 2:
            tensors = {
                **cells,
                MASK_KEY: _validation_masks(jepa, adata.n_obs, val_idx, seed, bool(self.protein_names_)),
            }
            val_dl = _cell_batches(tensors, val_idx, batch_size=max(batch_size, 1024), seed=seed, fixed=True)
        plan = TrainingPlan(jepa, lr=lr, weight_decay=weight_decay, monitor="val_loss")
        fit(
            plan,
            train_dl,
            val_dl,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            checkpoint_path=checkpoint_path,
            early_stopping=early_stopping and val_dl is not None,
            early_stopping_patience=early_stopping_patience,
            callbacks=[as_callback(TargetEMA())],
            trainer_kwargs=trainer_kwargs,
        )
        jepa.eval()
        self.is_pretrained_ = True
        self.pretrain_history_ = _history(plan)
        self.history_ = dict(self.pretrain_history_)
        self.pretrain_indices_ = train_idx
        logger.info("CellJEPA pretrained for %d epochs", len(plan.history))

    @doc_params(doc_checkpoint_path=doc_checkpoint_path)
    def train(
        self,
        max_epochs: int = 100,
        lr: float = 1e-3,
        batch_size: int = 256,
        accelerator: str = "auto",
        devices: int | str = "auto",
        early_stopping: bool = True,
        seed: int | None = None,
        trainer_kwargs: dict | None = None,
        *,
        pretrain_epochs: int = 100,
        weight_decay: float = 1e-6,
        validation_fraction: float = 0.1,
        early_stopping_patience: int = 20,
        strategy: str | Any = "auto",
        num_nodes: int = 1,
        shuffle: str = "auto",
        checkpoint_path: str | None = None,
    ) -> None:
        """Fit the transition and the decoder on the frozen embeddings (pretraining first if it has not run).

        Parameters
        ----------
        max_epochs
            Passes over the (control, perturbed) pairs; each pass draws new controls.
        lr, weight_decay
            AdamW learning rate and weight decay.
        batch_size
            Pairs per batch.
        accelerator, devices
            Passed to :class:`lightning.Trainer`.
        early_stopping
            Stop when the validation loss (fixed pairs of validation cells) has not improved for
            ``early_stopping_patience`` epochs and keep the best weights.
        seed
            Random seed of weights, split and pairs; ``None`` uses ``vcell.settings.seed``.
        trainer_kwargs
            Further :class:`lightning.Trainer` arguments (also used by the pretraining it runs).
        pretrain_epochs
            Epochs of :meth:`pretrain` when it has not run yet.
        validation_fraction
            Share of cells held out without ``val`` cells in ``obs['vcell_split']``.
        early_stopping_patience
            Epochs without improvement before stopping.
        strategy, num_nodes
            Passed to :class:`lightning.Trainer` (also by the pretraining it runs): ``strategy="ddp", devices=N,
            num_nodes=M`` trains in ``N * M`` processes, each reading its own share of every epoch
            (:class:`vcell.data.CellBatches`).
        shuffle
            Order of the training pairs (and of the pretraining's cells): ``"full"`` (a new permutation per epoch),
            ``"block"`` (permuted blocks of pairs with consecutive target cells, then pairs within windows:
            contiguous reads from disk) or ``"auto"`` (``"block"`` for a backed AnnData, else ``"full"``).
        {doc_checkpoint_path}

        Sets the following fields
        -------------------------
        ``model.history_``
            The pretraining values (see :meth:`pretrain`) plus ``transition_train_loss``, ``train_transition_mse``,
            ``train_decoder_mse`` (with proteins ``train_protein_decoder_mse``) and their ``val`` counterparts.
        ``model.is_trained_``, ``model.best_epoch_``, ``model.train_indices_``, ``model.validation_indices_``
            Training state and the cells used.
        """
        import lightning

        from vcell.train import TrainingPlan, fit

        self._check_train(
            max_epochs=max_epochs,
            lr=lr,
            batch_size=batch_size,
            weight_decay=weight_decay,
            validation_fraction=validation_fraction,
            early_stopping_patience=early_stopping_patience,
            num_nodes=num_nodes,
            pretrain_epochs=None if self.is_pretrained_ else pretrain_epochs,
        )
        seed = resolve_seed(seed)
        if not self.is_pretrained_:
            self.pretrain(
                max_epochs=pretrain_epochs,
                lr=lr,
                batch_size=batch_size,
                accelerator=accelerator,
                devices=devices,
                seed=seed,
                trainer_kwargs=trainer_kwargs,
                weight_decay=weight_decay,
                validation_fraction=validation_fraction,
                strategy=strategy,
                num_nodes=num_nodes,
                checkpoint_path=None if checkpoint_path is None else f"{checkpoint_path}/pretrain",
                shuffle=shuffle,
            )
        lightning.seed_everything(seed, verbose=False)
        trans = self.module.transition
        if not self.is_trained_:
            trans.reset_parameters()
            with torch.no_grad():  # the decoder starts at the mean expression
                trans.decoder[-1].bias.copy_(self.module.jepa.gene_mean)
                if self.protein_names_:
                    trans.protein_decoder[-1].bias.copy_(self.module.jepa.protein_mean)
        adata = self.adata
        train_idx, val_idx = self._split(adata, validation_fraction, seed)
        is_control = control_mask(adata)  # one byte per cell (no label string per cell kept while training)
        controls = train_idx[is_control[train_idx]]
        if not controls.size:
            msg = f"CellJEPA needs control cells (obs[{PERT_COL!r}] == {CONTROL!r}) among the training cells"
            raise ValueError(msg)
        device = self._device()
        reader = model_reader(self)  # rows read per batch (the decoder's targets) and per block (embeddings)
        all_idx = np.arange(adata.n_obs)
        self.module.to("cpu")
        try:
            z = torch.as_tensor(self._embed_cells(adata, all_idx, reader=reader))
        finally:
            self.module.to(device)
        P = self._cell_proteins(adata)
        doses = adata.obs[DOSE_COL].to_numpy(dtype=np.float32) if DOSE_COL in adata.obs else 1.0
        tensors = {
            TARGET_Z_KEY: z,
            REGISTRY_KEYS.X_KEY: reader,
            REGISTRY_KEYS.PERT_ENCODING_KEY: self._condition_lookup(adata.obs[PERT_COL], doses),
            REGISTRY_KEYS.COVARIATES_KEY: self._covariate_lookup(adata),
        }
        if P is not None:
            tensors[PROTEIN_LOG_KEY] = torch.as_tensor(P)
        # each cell's context as a code of its sorted label (the order of np.unique of the labels)
        names, ctx = np.unique(self._contexts(adata), return_inverse=True)
        ctx = ctx.reshape(-1).astype(index_dtype(max(len(names), 1)))

        def pairs(idx: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
            target = idx[~is_control[idx]]
            out, lacking = [], set()
            for c in np.unique(ctx[target]):
                pool = controls[ctx[controls] == c]
                if not pool.size:
                    lacking.add(str(names[c]))
                    pool = controls
                out.append((target[ctx[target] == c], pool))
            if lacking:
                logger.warning("CellJEPA: no control cells in context(s) %s; they use all controls", sorted(lacking))
            return idx[is_control[idx]], out

        t_ident, t_pairs = pairs(train_idx)
        train_dl = _cell_batches(tensors, t_ident, batch_size=batch_size, seed=seed, pairs=t_pairs, shuffle=shuffle)
        val_dl = None
        if len(val_idx):
            v_ident, v_pairs = pairs(val_idx)
            bs = max(batch_size, 1024)
            val_dl = _cell_batches(tensors, v_ident, batch_size=bs, seed=seed, fixed=True, pairs=v_pairs)
        plan = TrainingPlan(trans, lr=lr, weight_decay=weight_decay, monitor="val_loss")
        self.best_epoch_ = fit(
            plan,
            train_dl,
            val_dl,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            checkpoint_path=None if checkpoint_path is None else f"{checkpoint_path}/transition",
            early_stopping=early_stopping and val_dl is not None,
            early_stopping_patience=early_stopping_patience,
            trainer_kwargs=trainer_kwargs,
        )
        self.module.eval()
        self.is_trained_ = True
        hist = _history(plan)
        renamed = {f"transition_{k}" if k in ("train_loss", "val_loss") else k: v for k, v in hist.items()}
        self.history_ = {**getattr(self, "pretrain_history_", {}), **renamed}
        self.train_indices_, self.validation_indices_ = train_idx, val_idx
        logger.info("CellJEPA transition trained for %d epochs", len(plan.history))

    # ------------------------------------------------------------------ inference
    def get_latent_representation(
        self, adata: AnnData | MuData | None = None, *, indices: Sequence[int] | None = None, batch_size: int = 4096
    ) -> np.ndarray:
        """Cell embeddings (context encoder, every module visible).

        Parameters
        ----------
        adata
            Data with the model's genes (and, for a protein model, proteins: a MuData); ``None`` uses the training
            data.
        indices
            Cells to embed; ``None``: all.
        batch_size
            Cells per forward pass.

        Returns
        -------
        Array ``(n_cells, n_latent)``, float32.
        """
        self._require_pretrained()
        adata = self._check_adata(adata)
        idx = np.arange(adata.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
        return self._embed_cells(adata, idx, batch_size).astype(np.float32)

    def _jepa_sources(
        self, adata: AnnData, idx: np.ndarray, batch_size: int, reader: RowReader | None = None
    ) -> dict[str, Any]:
        """What shifting cells ``idx`` needs, whatever the perturbation.

        Expression ``X`` (read by ``reader``, by default from ``adata``'s matrix), proteins ``P`` (``None``
        without), embeddings ``z`` (on the model's device) and covariate codes ``cov``.
        """
        reader = model_reader(self, adata) if reader is None else reader
        X, P = reader(idx), self._cell_proteins(adata, idx)
        z = torch.as_tensor(self._embed(X, batch_size, proteins=P), device=self._device())
        return {"X": X, "P": P, "z": z, "cov": self._covariate_codes(adata, idx)}

    def _shift(self, src: dict[str, Any], target: np.ndarray, nodes: np.ndarray) -> torch.Tensor:
        """Shifted embeddings ``z + delta`` of the cells of ``src`` (:meth:`_jepa_sources`) under ``target``."""
        n, dev = len(src["z"]), self._device()
        batch = {
            REGISTRY_KEYS.PERT_ENCODING_KEY: torch.as_tensor(np.repeat(target, n, axis=0)),
            REGISTRY_KEYS.COVARIATES_KEY: torch.as_tensor(src["cov"]),
        }
        if nodes.size:
            batch[EXTRA_NODES_KEY] = torch.as_tensor(np.tile(nodes, (n, 1)))
        with torch.no_grad():
            return src["z"] + self.module.transition.eval().delta({k: v.to(dev) for k, v in batch.items()})

    def predict_embedding(
        self,
        adata: AnnData | MuData | None = None,
        *,
        perturbation: str,
        controls: Any = None,
        dose: float = 1.0,
        batch_size: int = 4096,
    ) -> np.ndarray:
        """Predicted embeddings ``z_ctrl + delta`` of control cells under ``perturbation``.

        Parameters
        ----------
        adata, perturbation, controls, dose, batch_size
            As in :meth:`predict`.

        Returns
        -------
        Array ``(n_selected_cells, n_latent)``, float32.
        """
        check_options(batch_size=batch_size)
        adata, idx, perturbation, dose = self._query_inputs(adata, perturbation, controls, dose)
        target, nodes = self._encode_query([str(perturbation)], float(dose))
        reader = model_reader(self, adata)  # rows read and embedded per chunk: only embeddings are kept
        parts = [
            self._shift(self._jepa_sources(adata, chunk, batch_size, reader), target, nodes).cpu().numpy()
            for chunk in self._chunks(idx, batch_size)
        ]
        return join_rows(parts) if parts else np.zeros((0, self.module.jepa.n_latent), dtype=np.float32)

    def predict(
        self,
        adata: AnnData | MuData | None = None,
        *,
        perturbation: str,
        controls: Any = None,
        dose: float = 1.0,
        seed: int | None = None,
        residual: bool | None = None,
        batch_size: int = 4096,
        modality: str = "rna",
    ) -> np.ndarray:
        """Counterfactual expression of control cells: ``x + decode(z + delta) - decode(z)``, clipped at 0.

        Parameters
        ----------
        adata
            Data holding the control cells (same genes as in training); ``None`` uses the training data.
        perturbation
            Canonical condition, e.g. ``"IFNb"`` or ``"A+B"`` (unseen combinations of seen singles too).
        controls
            Cells to start from: ``None`` (all control cells), a boolean mask, indices or obs names.
        dose
            Dose of every component of ``perturbation``.
        seed
            Unused (predictions are deterministic); accepted for the common interface.
        residual
            Add the decoded change to each cell's own expression (``None``: the model's ``residual``); ``False``
            returns ``decode(z + delta)``.
        batch_size
            Cells per forward pass.
        modality
            ``"rna"`` (genes, log1p(CP10k)) or, for a model set up with ``protein_modality=``, ``"prot"``: proteins in
            log1p(counts per 1e4 of the cell's protein library), the transform to evaluate protein truth with
            (``vcell._utils.log1p_cp10k`` of the protein counts). With ``residual`` the decoded change is added to
            the cell's own proteins; a cell without measured proteins gets ``decodeP(z + delta)``.
        space
            Expression space of the returned RNA (:meth:`vcell.model.PerturbationModel.predict`): ``None`` (the model's
            ``output_space``), ``"log1p_cp10k"``, ``"median"``, ``"model"``, a target sum or an ``ExpressionSpace``.

        Returns
        -------
        Array ``(n_selected_cells, n_genes)``, float32, in ``space`` (the model computes in log1p(CP10k))
        (``"prot"``: ``(n_selected_cells, n_proteins)``).
        """
        options = {"residual": residual, "batch_size": batch_size}
        return super().predict(
            adata, perturbation=perturbation, controls=controls, dose=dose, seed=seed, modality=modality, **options
        )

    def _predictions(
        self,
        adata: AnnData,
        idx: np.ndarray,
        targets: list[tuple[str, np.ndarray, np.ndarray]],
        modalities: Sequence[str],
        residual: bool | None,
        batch_size: int,
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """``(perturbation, {modality: prediction})`` per target, in order.

        Per chunk of ``batch_size`` cells, the cells are read and embedded, and (residual) their own embedding
        decoded, once for all targets; each target then shifts the embeddings and decodes them.
        """
        residual = self.residual if residual is None else bool(residual)
        trans = self.module.transition
        sources, own = [], []
        reader = model_reader(self, adata)
        for chunk in self._chunks(idx, batch_size):
            src = self._jepa_sources(adata, chunk, batch_size, reader)
            base = {}
            with torch.no_grad():
                if residual and "rna" in modalities:  # x + decode(z + delta) - decode(z)
                    base["rna"] = (torch.as_tensor(src["X"], device=src["z"].device), trans.decode(src["z"]))
                if residual and "prot" in modalities:  # own proteins where measured, the decoded ones elsewhere
                    dec, p = trans.decode_protein(src["z"]), torch.as_tensor(src["P"], device=src["z"].device)
                    measured = torch.isfinite(p).all(dim=1, keepdim=True)
                    base["prot"] = (torch.where(measured, torch.nan_to_num(p, nan=0.0), dec), dec)
            sources.append(src)
            own.append(base)
        for name, target, nodes in targets:
            out: dict[str, list[np.ndarray]] = {mod: [] for mod in modalities}
            for src, base in zip(sources, own, strict=True):
                zs = self._shift(src, target, nodes)
                with torch.no_grad():
                    for mod in modalities:
                        dec = trans.decode(zs) if mod == "rna" else trans.decode_protein(zs)
                        pred = base[mod][0] + dec - base[mod][1] if residual else dec
                        out[mod].append(pred.clamp(min=0).cpu().numpy())
            yield name, {mod: join_rows(v) for mod, v in out.items()}

    def _predict(
        self,
        adata: AnnData,
        idx: np.ndarray,
        perturbations: list[str],
        *,
        dose: float,
        seed: int | None,
        modalities: tuple[str, ...],
        residual: bool | None = None,
        batch_size: int = 4096,
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """:meth:`predict` of every perturbation, the cells read and embedded once (:meth:`_predictions`)."""
        targets = [(p, *self._encode_query([p], float(dose))) for p in perturbations]
        return self._predictions(adata, idx, targets, modalities, residual, batch_size)

    def embedding_retrieval(
        self,
        adata: AnnData | MuData | None = None,
        *,
        perturbations: Sequence[str] | None = None,
        controls: Any = None,
        dose: float = 1.0,
    ) -> pd.DataFrame:
        """Retrieval of each perturbation by its predicted mean embedding, and the cosine error of that embedding.

        Shifts are taken from the mean embedding of the control cells: the predicted shift of perturbation ``p`` is
        the mean of :meth:`predict_embedding` over the controls minus their mean embedding; its true shift the mean
        embedding of the cells labelled ``p`` minus the same control mean. Each predicted shift is compared by cosine
        similarity with the true shifts of all the listed perturbations.

        Parameters
        ----------
        adata
            Data with control cells and perturbed cells; ``None`` uses the training data.
        perturbations
            Perturbations to compare (each needs cells in ``adata``); ``None``: every non-control condition of
            ``adata``.
        controls
            Control cells (as in :meth:`predict`).
        dose
            Dose of the predictions.

        Returns
        -------
        DataFrame indexed by perturbation: ``n_cells``, ``rank`` (1 = the true perturbation is the nearest),
        ``top1``, ``nearest`` (the perturbation whose true shift is nearest) and ``cosine_error``
        (``1 - cos(predicted shift, true shift)``).
        """
        self._require_trained()
        adata = self._check_adata(adata)
        labels = self._canonical_obs(adata)[PERT_COL].astype(str).to_numpy()
        present = sorted(set(labels) - {CONTROL})
        perts = present if perturbations is None else self._query(perturbations, what="perturbations")
        check_dose(dose)
        missing = [p for p in perts if p not in present]
        if missing:
            msg = f"perturbation(s) {missing[:10]} have no cells in adata (obs[{PERT_COL!r}]); present: {present[:10]}"
            raise KeyError(msg)
        if not perts:
            msg = "adata has no perturbed cells to compare"
            raise ValueError(msg)
        idx = self._control_indices(adata, controls)
        z_all = self.get_latent_representation(adata)
        base = z_all[idx].mean(0)
        pred = np.stack([self.predict_embedding(adata, perturbation=p, controls=idx, dose=dose).mean(0) for p in perts])
        true = np.stack([z_all[labels == p].mean(0) for p in perts])
        pred, true = pred - base, true - base
        ranks = retrieval_ranks(pred, true)
        unit = true / np.maximum(np.linalg.norm(true, axis=1, keepdims=True), 1e-12)
        nearest = np.asarray(perts)[np.argmax(pred @ unit.T, axis=1)]
        return pd.DataFrame(
            {
                "n_cells": [int((labels == p).sum()) for p in perts],
                "rank": ranks,
                "top1": ranks == 1,
                "nearest": nearest,
                "cosine_error": cosine_error(pred, true),
            },
            index=pd.Index(perts, name="perturbation"),
        )


def _coexpression_cells(cells: np.ndarray, seed: int) -> np.ndarray:
    """The cells :func:`_coexpression_labels` uses: all of ``cells``, or a seeded subsample of at most its maximum."""
    if len(cells) > _COEXPRESSION_MAX_CELLS:
        return cells[np.random.default_rng(seed).choice(len(cells), _COEXPRESSION_MAX_CELLS, replace=False)]
    return cells


def _mean_std(reader: RowReader, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and std (float32) of rows ``idx`` of ``reader``, read ``ROW_BLOCK`` cells at a time (two passes).

    The same bits as ``X.mean(0), X.std(0)`` of the whole float32 matrix ``X = reader(idx)``: numpy adds the rows of
    a float32 array in order into a float32 sum along axis 0 and divides by the count in float64, as done here.
    """
    n_vars, n = reader.shape[1], np.intp(len(idx))

    def total(values: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        acc = None
        for chunk in row_blocks(idx):
            block = values(reader(chunk))
            acc = np.add.reduce(block if acc is None else np.concatenate([acc[None], block]), axis=0)
        acc = np.zeros(n_vars, dtype=np.float32) if acc is None else acc
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.true_divide(acc, n, out=acc, casting="unsafe")

    mean = total(lambda block: block)
    var = total(lambda block: np.square(block - mean))
    return mean, np.sqrt(var)


def _coexpression_labels(X: np.ndarray, n_modules: int, seed: int) -> np.ndarray:
    """k-means cluster of each gene on the rows of the gene-gene correlation matrix of ``X`` (cells x genes)."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    if len(X) > _COEXPRESSION_MAX_CELLS:  # (CellJEPA reads only these cells: _coexpression_cells)
        X = X[_coexpression_cells(np.arange(len(X)), seed)]
    Xc = np.asarray(X, dtype=np.float64) - X.mean(0)
    sd = Xc.std(0)
    Zs = Xc / np.where(sd > 0, sd, 1.0)
    corr = Zs.T @ Zs / max(len(Zs), 1)
    with warnings.catch_warnings():  # fewer distinct rows than clusters (e.g. constant genes): empty modules dropped
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        return KMeans(n_clusters=n_modules, n_init=4, random_state=seed).fit_predict(corr)
