"""``FlowMatching``: optimal-transport conditional flow matching from control to perturbed cells in a PCA space."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from vcell._constants import CONTROL, DOSE_COL, PERT_COL, REGISTRY_KEYS
from vcell._docs import doc_checkpoint_path, doc_params
from vcell._settings import logger
from vcell._utils import check_obs_keys, resolve_seed
from vcell.data import CellBatches, Lookup, RowReader, fit_pca_streamed
from vcell.data._datamodule import CoupledPairs
from vcell.module import FlowMatchingModule
from vcell.module._causal_vae import EXTRA_NODES_KEY
from vcell.module._flow_matching import (
    DEFAULT_SOLVER,
    DEFAULT_STEPS,
    SOLVERS,
    SOURCE_KEY,
    TARGET_KEY,
    TIME_COVARIATE_KEY,
)

from ._base import Capabilities, PerturbationModel, check_options, sample_obs
from ._encoding import PerturbationInputs, _as_anndata
from ._protein import with_sampled_proteins
from ._rows import join_rows, model_reader, read_rows, row_blocks

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

COUPLINGS = ("ot", "random")
#: the PCA is fitted on at most this many cells (a seeded subsample beyond)
_PCA_MAX_CELLS = 50_000


def _pair_batches(
    tensors: dict[str, torch.Tensor | Lookup],
    groups: list[tuple[np.ndarray, np.ndarray]],
    identity: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    coupling: str,
    coupling_size: int,
    exact_max: int,
    epsilon: float,
    fixed: bool = False,
    shuffle: str | bool = "auto",
) -> CellBatches:
    """Batches of (control, perturbed) pairs in the PCA space: a :class:`vcell.data.CellBatches`.

    ``tensors``: per-cell fields, the coordinates under ``TARGET_KEY`` (read at the sources as ``SOURCE_KEY``);
    ``groups``: ``(targets, controls)`` index arrays per (condition, dose, context[, time]) group; every pass draws
    one control per target (with replacement, from the same context) and couples them (``coupling="ot"``: within
    chunks of at most ``coupling_size`` cells, exactly up to ``exact_max`` cells, by Sinkhorn above), seeded by
    ``(seed, epoch + 1)``; ``identity``: control cells paired with themselves (the zero displacement).
    ``fixed=True`` (validation) draws the same pairs and flow times (``FLOW_TIME_KEY``) every pass.
    """
    identity = np.asarray(identity, dtype=np.int64)
    cells = CoupledPairs(tensors[TARGET_KEY], groups, identity, coupling, coupling_size, exact_max, epsilon, fixed)
    return CellBatches(
        tensors,
        cells,
        batch_size=batch_size,
        seed=seed,
        shuffle=False if fixed else shuffle,
        fixed=fixed,
        epoch_start=1,
        source_fields={SOURCE_KEY: TARGET_KEY},
        n_items=sum(len(t) for t, _ in groups) + len(identity),
    )


class FlowMatching(PerturbationInputs, PerturbationModel):
    """Optimal-transport conditional flow matching: a learned flow carries control cells to perturbed ones.

    Cells are not paired before and after a perturbation; the model learns the map between the control population
    and the perturbed one of the same context (as CellOT and CellFlow do). Cells live in a PCA space fitted on the
    training cells' log1p(CP10k) expression (``n_components``; coordinates divided by one global scale). A vector
    field ``v(z, t | c)`` (an MLP of ``n_layers`` x ``n_hidden`` SiLU units on ``z``, a sinusoidal embedding of the
    flow time ``t`` and the condition ``c``) is trained by conditional flow matching: for every (condition, dose,
    context) group of perturbed training cells, control cells of the same context are drawn with replacement, one
    per perturbed cell, and coupled to them by optimal transport on squared Euclidean cost
    (:func:`vcell.module.ot_pairs`: exact assignment up to ``exact_max`` cells, entropic Sinkhorn above, within
    chunks of at most ``coupling_size`` cells), anew every epoch; ``v`` regresses ``z1 - z0`` at
    ``z_t = (1 - t) z0 + t z1``. ``coupling="random"`` pairs them at random instead (the mini-batch OT ablation).
    Control cells are also trained on as the identity map (condition without perturbation, zero displacement).

    The condition is the perturbation encoder's vector (:class:`vcell.module.PerturbationEncoder` with one-hot,
    embedding-table or gene-graph operators and per-perturbation log-dose sigmoids; a combination is the sum of its
    singles' encodings, so unseen combinations of seen singles can be predicted) plus a learned embedding per
    category of every covariate (cell type, batch), and optionally a numeric time covariate (``time_key``) so that
    time courses interpolate.

    Predictions integrate ``dz/dt = v(z, t | c)`` from each control cell's coordinates (``n_steps`` fixed Euler or
    midpoint steps; by default 5 midpoint steps, within about 2% of a fine integration: see :meth:`predict`) and
    decode. With ``residual=True`` (default) the decoded displacement is added to the cell's own
    log1p(CP10k) expression, so each cell keeps the detail outside the PCA space; ``False`` returns the decoded
    endpoint (the PCA reconstruction). Values are clipped at 0. Only ``space="pca"`` is supported (no VAE latent).

    **RNA + protein** (CITE-seq: a MuData registered with ``setup_anndata(mdata, protein_modality="prot")``). The flow
    lives in one joint PCA space fitted on the features ``[x, w p]`` of the non-test cells with measured proteins: RNA
    ``x`` in log1p(CP10k) and proteins ``p`` in log1p(counts per 1e4 of the cell's protein library), the space both are
    predicted and evaluated in. One space rather than a flow per modality, so that the OT couplings and the vector field
    see both at once and a cell's RNA and protein changes are carried by the same transport (consistent per cell; a
    response seen only in proteins still moves the cell). The block weight ``w`` makes the protein block's total
    variance ``protein_weight`` times the RNA block's: unweighted, a handful of proteins would be lost among thousands
    of genes (or, with noisy proteins, dominate the components). Cells without protein measurement (NaN or all-zero
    rows) get their coordinates from RNA alone, as the posterior mean of the coordinates under the PCA's own Gaussian
    model (scores ``a ~ N(0, diag(lambda))`` with the components' variances, RNA = mean + ``C_rna.T a`` + noise of the
    per-gene residual variance ``s2``): ``a = (C_rna C_rna.T + s2 diag(1/lambda))^-1 C_rna (x - mean)``, i.e. least
    squares on the RNA columns of the components, shrunk towards the mean along the directions RNA barely determines
    (plain least squares amplifies noise there: reconstructing held-out cells' proteins from their RNA on
    ``simulate(protein=True)``, 2,000 genes, 4 or 20 proteins, 2 seeds, ``protein_weight=0.3``, its MSE was worse than
    predicting the proteins' mean in 3 of the 4 settings, the posterior mean's 34-45% lower than the mean's). They train
    (as sources and targets) and predict like the others. Proteins are decoded from the protein block of the endpoint
    (divided by ``w``); with ``residual=True`` the decoded protein change is added to the cell's own proteins (an
    unmeasured cell: to the proteins reconstructed from its coordinates). ``predict(..., modality="prot")`` returns
    them, ``sample`` sets ``obsm['protein']`` and :meth:`get_trajectory` gives paths in the joint space. An RNA-only
    registration is unchanged (same space, same numbers).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (log data or counts), or a MuData whose ``rna`` was registered.
    registry
        Registry of a saved model (used by :meth:`load`).
    n_components
        PCA dimension (capped at the number of genes and cells). 20 beat 50 in energy distance on Kang 2018
        cell-type transfer (2,000 HVGs; 6-7 of 7 held-out types over two seeds, with ``sigma=0.1``); the residual
        add-back keeps each cell's expression outside these components.
    n_hidden, n_layers
        Width and number of hidden layers of the vector field.
    n_condition
        Size of the condition vector (perturbation plus covariates).
    n_freqs
        Frequencies of the flow-time embedding.
    coupling
        ``"ot"`` (mini-batch optimal transport) or ``"random"``.
    coupling_size
        Largest number of cells coupled jointly (bigger groups are split at random).
    exact_max
        Couple exactly (:func:`scipy.optimize.linear_sum_assignment`) up to this many cells, by Sinkhorn above.
    sinkhorn_epsilon
        Entropic regularisation of Sinkhorn, relative to the mean cost.
    sigma
        Noise added to ``z_t`` in training (in units of the standardised PCA space; 0: none); a little noise
        smooths the field between the training paths (better energy distance on Kang transfer than 0).
    identity_pairs
        Train on control cells as the identity map.
    residual
        Add the decoded displacement to each starting cell's own expression (see above).
    time_key
        Optional numeric ``obs`` column (e.g. hours after perturbation): a condition of the flow, so predictions can
        ask for any time (``time=``); perturbed cells are grouped by time for the coupling.
    perturbation_embedding, gene_graph, graph_layers, graph_own_embedding
        Perturbation operators as in :class:`vcell.model.CausalVAE`: ``None`` (one-hot), an embedding table
        (:class:`pandas.DataFrame` indexed by single perturbation, or a key of ``adata.uns``) or a gene graph in
        GEARS' format; both predict perturbations never seen in training (a table row, a graph node).
    protein_weight
        With proteins: total variance of the protein block relative to the RNA block's in the joint PCA (see
        above; ignored without proteins). 0.3 (the protein block is about a quarter of the variance) gave the
        lowest or tied protein error of 0.1, 0.3 and 1 on ``simulate(protein=True)`` (3,000 cells, 2,000 genes, 4 or
        20 proteins with planted protein-only shifts, 2 seeds, in-sample), with an RNA error of the mean change
        within 0.9-1.4x an RNA-only model's; 1 raised it to 1.2-2.2x. All three recovered the planted shifts. See
        ``docs/flow_matching.md``.

    Examples
    --------
    Out of distribution: a double perturbation held out by :func:`vcell.bench.split`, predicted from its singles.

    >>> import vcell
    >>> adata = vcell.datasets.simulate(n_cells=300, n_genes=50, n_perturbations=3, n_combos=2, seed=0)
    >>> vcell.bench.split(adata, kind="combo_half", perturbation_key="perturbation", seed=0)
    >>> held = adata.uns["vcell_split"]["held_out"][0]  # a double whose cells are all test cells
    >>> train = adata[adata.obs["vcell_split"] != "test"].copy()  # (models also skip test cells themselves)
    >>> vcell.model.FlowMatching.setup_anndata(train, perturbation_key="perturbation", control="control")
    >>> model = vcell.model.FlowMatching(train, n_components=10, n_hidden=32)
    >>> model.train(max_epochs=2, seed=0, trainer_kwargs={"enable_progress_bar": False})
    >>> model.predict(perturbation=held).shape  # counterfactuals of the 60 control cells
    (60, 50)
    """

    capabilities = Capabilities(
        learned=True,
        can_sample=True,
        models_proteins=True,
        predict_options=("n_steps", "solver", "time", "residual", "batch_size"),
    )

    def __init__(
        self,
        adata: AnnData | MuData | None = None,
        registry: dict | None = None,
        *,
        n_components: int = 20,
        n_hidden: int = 256,
        n_layers: int = 3,
        n_condition: int = 64,
        n_freqs: int = 16,
        coupling: str = "ot",
        coupling_size: int = 1024,
        exact_max: int = 512,
        sinkhorn_epsilon: float = 0.05,
        sigma: float = 0.1,
        identity_pairs: bool = True,
        residual: bool = True,
        time_key: str | None = None,
        perturbation_embedding: str | pd.DataFrame | None = None,
        gene_graph: str | pd.DataFrame | None = None,
        graph_layers: int = 1,
        graph_own_embedding: bool = True,
        protein_weight: float = 0.3,
    ) -> None:
        adata = _as_anndata(adata)
        super().__init__(adata, registry=registry)
        if coupling not in COUPLINGS:
            msg = f"coupling must be one of {COUPLINGS}, got {coupling!r}"
            raise ValueError(msg)
        for name, value in {
            "n_components": n_components,
            "coupling_size": coupling_size,
            "exact_max": exact_max,
        }.items():
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                msg = f"{name} must be a positive integer, got {value!r}"
                raise ValueError(msg)
        if not (np.isfinite(sinkhorn_epsilon) and sinkhorn_epsilon > 0):
            msg = f"sinkhorn_epsilon must be a finite number > 0, got {sinkhorn_epsilon!r}"
            raise ValueError(msg)
        if isinstance(protein_weight, bool) or not (np.isfinite(protein_weight) and protein_weight > 0):
            msg = f"protein_weight must be a finite number > 0, got {protein_weight!r}"
            raise ValueError(msg)
        self.protein_weight = float(protein_weight)
        if gene_graph is not None and perturbation_embedding is not None:
            msg = "pass either perturbation_embedding or gene_graph, not both"
            raise ValueError(msg)
        if int(graph_layers) < 1:
            msg = f"graph_layers must be a positive integer, got {graph_layers!r}"
            raise ValueError(msg)
        self.coupling, self.coupling_size, self.exact_max = coupling, int(coupling_size), int(exact_max)
        self.sinkhorn_epsilon, self.identity_pairs, self.residual = (
            float(sinkhorn_epsilon),
            bool(identity_pairs),
            bool(residual),
        )
        self.time_key = time_key
        table = self._embedding_table(adata, perturbation_embedding)
        perturbation_embedding = table  # saved with the model
        graph = self._gene_graph(adata, gene_graph)
        gene_graph = graph
        extra = [] if table is None else sorted(set(map(str, table.index)) - set(self.vocab.atoms))
        self.atoms_: list[str] = [*self.vocab.atoms, *extra]
        self._atom_index = {a: i for i, a in enumerate(self.atoms_)}
        features = None if table is None else table.loc[self.atoms_].to_numpy(dtype=np.float32)
        seen = np.array([a in set(self.vocab.atoms) for a in self.atoms_], dtype=bool)
        graph_kwargs = {} if graph is None else self._graph_arrays(graph, graph_layers, graph_own_embedding)
        self.covariate_names_, self._categories = self._covariate_categories()
        times = self._times(adata) if adata is not None and time_key is not None else None
        space = None
        if adata is not None and registry is None:  # a new model (load() restores the space from the weights)
            space = self._fit_space(adata, int(n_components))
            n_components = int(space["components"].shape[0])  # saved so that load() builds buffers of the fitted size
        self.module = FlowMatchingModule(
            self.summary_stats["n_vars"],
            len(self.atoms_),
            int(n_components),
            covariate_sizes=tuple(len(c) for c in self._categories),
            n_condition=n_condition,
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_freqs=n_freqs,
            time_covariate=time_key is not None,
            sigma=sigma,
            perturbation_features=features,
            seen_atoms=seen,
            **graph_kwargs,
            log_dose_init=self._log_dose_init(adata),
            n_proteins=len(self.protein_names_),
        )
        if space is not None:
            self.module.set_space(**space)
        if times is not None:
            with torch.no_grad():
                self.module.time_loc.fill_(float(times.mean()))
                self.module.time_scale.fill_(float(times.std()) if times.std() > 0 else 1.0)
            perturbed = (adata.obs[PERT_COL].astype(str) != CONTROL).to_numpy()
            self.default_time_ = float(np.median(times[perturbed] if perturbed.any() else times))
        kind = "gene graph" if graph is not None else ("embedding table" if table is not None else "one-hot")
        self._model_summary_string = (
            f"FlowMatching: {len(self.atoms_)} perturbations ({self.vocab.n_atoms} seen, {kind}), covariates "
            f"{self.covariate_names_}, PCA space of {n_components} components, coupling={coupling!r}"
            + (f", time covariate {time_key!r}" if time_key is not None else "")
            + (
                f", joint with {len(self.protein_names_)} proteins ({self.protein_modality_!r}, "
                f"protein_weight {self.protein_weight:g})"
                if self.protein_names_
                else ""
            )
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ AnnData -> arrays
    def _times(self, adata: AnnData) -> np.ndarray:
        check_obs_keys(adata, [self.time_key], what="time_key")
        try:
            values = adata.obs[self.time_key].to_numpy(dtype=np.float64, copy=True)
        except (TypeError, ValueError) as err:
            msg = f"time_key {self.time_key!r} must name a numeric obs column: {err}"
            raise ValueError(msg) from err
        if not np.isfinite(values).all():
            msg = f"obs[{self.time_key!r}] (time_key) holds NaN or infinite values"
            raise ValueError(msg)
        return values

    def _fit_space(self, adata: AnnData, n_components: int) -> dict[str, Any]:
        """PCA on the non-test cells' log1p(CP10k) and the global scale of the coordinates (``set_space`` kwargs).

        With proteins: the joint PCA of ``[x, w p]`` on the non-test cells with measured proteins, the block weight
        ``w`` and the RNA-only projection of cells without proteins (see the class docstring).
        """
        from vcell.metrics import pca_project

        idx = self._non_test_cells(adata)
        if self.protein_names_:
            idx = idx[np.isfinite(self._protein_expression(adata, idx)).all(axis=1)]
            if not idx.size:
                msg = (
                    f"FlowMatching: no non-test cell has measured proteins (mdata[{self.protein_modality_!r}] rows "
                    "are NaN or zero): the joint RNA + protein space needs some"
                )
                raise ValueError(msg)
        if len(idx) > _PCA_MAX_CELLS:
            idx = np.sort(np.random.default_rng(resolve_seed(None)).choice(idx, _PCA_MAX_CELLS, replace=False))
        if self.protein_names_:  # the joint space of RNA and proteins: the (at most 50k) cells read in memory
            X = read_rows(model_reader(self), idx)
            return _joint_space(X, self._protein_expression(adata, idx), n_components, self.protein_weight)
        # streamed: the covariance of the cells' log1p(CP10k) rows is summed block by block (no dense matrix)
        X = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        comps, mean = fit_pca_streamed(
            X, n_components, rows=idx, transform="log1p_cp10k" if self.counts_ else None, seed=resolve_seed(None)
        )
        sq, n = 0.0, 0
        for rows in row_blocks(idx):
            z = pca_project(read_rows(model_reader(self), rows), comps, mean)
            sq, n = sq + float((z**2).sum()), n + z.size
        scale = float(np.sqrt(sq / n)) if n else 1.0
        return {"components": comps, "mean": mean, "scale": scale if scale > 0 else 1.0}

    def _encode_query(self, labels: Sequence[str], doses: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """CausalVAE's encoding of labels (dose-scaled multi-hot, extra graph nodes); KeyError naming unknown ones."""
        labels = [str(x) for x in labels]
        if self._graph_nodes is None and len(self.atoms_) == self.vocab.n_atoms:
            self.vocab.check(
                labels, what="FlowMatching (one-hot perturbation encoder; pass perturbation_embedding= or gene_graph=)"
            )
        return super()._encode_query(labels, doses)

    def _coordinates(self, adata: AnnData, idx: np.ndarray, reader: RowReader) -> torch.Tensor:
        """Standardised PCA coordinates (joint with proteins) of cells ``idx``, on the module's device.

        Rows are read (``reader``) and projected ``ROW_BLOCK`` cells at a time: only the coordinates are kept.
        """
        m = self.module
        device = m.pca_components.device
        # written into one array allocated up front: small per-block results kept between the blocks' large
        # temporaries fragment the heap (1M cells x 2,000 genes: +6 GB of resident memory, never given back)
        out = torch.empty((len(idx), m.n_components), device=device)
        start = 0
        for chunk in row_blocks(idx):
            x = torch.as_tensor(reader(chunk), device=device)
            P = self._cell_proteins(adata, chunk)
            with torch.no_grad():
                out[start : start + len(chunk)] = m.encode(x, None if P is None else torch.as_tensor(P, device=device))
            start += len(chunk)
        return out

    def _training_tensors(self, adata: AnnData) -> dict[str, torch.Tensor | Lookup]:
        """Per-cell fields of the training batches (in memory).

        PCA coordinates, encodings (a :class:`~vcell.data.Lookup` of the distinct ones), covariate codes, times.
        """
        idx = np.arange(adata.n_obs)
        device = self.module.pca_components.device
        self.module.to("cpu")  # after training on a GPU the module may still be there
        try:
            z = self._coordinates(adata, idx, model_reader(self))
        finally:
            self.module.to(device)
        labels = adata.obs[PERT_COL].astype(str).to_numpy()
        doses = adata.obs[DOSE_COL].to_numpy(dtype=np.float32) if DOSE_COL in adata.obs else 1.0
        tensors = {
            TARGET_KEY: z,
            REGISTRY_KEYS.PERT_ENCODING_KEY: self._condition_lookup(labels, doses),
            REGISTRY_KEYS.COVARIATES_KEY: self._covariate_lookup(adata),
        }
        if self.time_key is not None:
            tensors[TIME_COVARIATE_KEY] = torch.as_tensor(self._times(adata), dtype=torch.float32)
        return tensors

    def _groups(
        self, adata: AnnData, idx: np.ndarray, controls: np.ndarray
    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """Coupling groups of the perturbed cells in ``idx`` and the control cells of ``idx`` (identity pairs).

        Each group holds the cells of one condition, dose, context (and time) with the ``controls`` of that context.
        """
        labels = adata.obs[PERT_COL].astype(str).to_numpy()
        ctx = self._contexts(adata)
        is_ctrl = labels[idx] == CONTROL
        target = idx[~is_ctrl]
        key = pd.Series(labels[target]) + "\t" + pd.Series(ctx[target])
        if DOSE_COL in adata.obs:
            key = key + "\t" + pd.Series(adata.obs[DOSE_COL].to_numpy()[target]).astype(str)
        if self.time_key is not None:
            key = key + "\t" + pd.Series(self._times(adata)[target]).astype(str)
        groups, lacking = [], set()
        for _, members in pd.Series(np.arange(len(target))).groupby(key.to_numpy(), sort=True):
            cells = target[members.to_numpy()]
            pool = controls[ctx[controls] == ctx[cells[0]]]
            if not pool.size:
                lacking.add(str(ctx[cells[0]]))
                pool = controls
            groups.append((cells, pool))
        if lacking:
            logger.warning(
                "FlowMatching: no control cells in context(s) %s; their cells use all controls", sorted(lacking)
            )
        identity = idx[is_ctrl] if self.identity_pairs else np.zeros(0, dtype=np.int64)
        return groups, identity

    # ------------------------------------------------------------------ training
    @doc_params(doc_checkpoint_path=doc_checkpoint_path)
    def train(
        self,
        max_epochs: int = 150,
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
        """Train the vector field with Lightning (progress bar, validation flow-matching loss, early stopping).

        Validation cells are ``obs['vcell_split'] == 'val'`` when present (then only ``'train'`` cells are trained
        on), else a seeded ``validation_fraction`` of the cells; ``'test'`` cells are never used. Their pairs (with
        training controls) and flow times are drawn once. The first call re-initialises the weights from ``seed``, so
        the same seed gives the same model (on CPU).

        Parameters
        ----------
        max_epochs
            Maximum number of passes over the pairs (every pass draws new controls and couplings).
        lr
            AdamW learning rate.
        batch_size
            Pairs per batch.
        accelerator, devices
            Passed to :class:`lightning.Trainer`.
        early_stopping
            Stop when ``val_loss`` (the flow-matching loss of fixed validation pairs) has not improved for
            ``early_stopping_patience`` epochs and keep the best weights. Off by default: that loss plateaus early
            and is a poor guide to the transported distribution (on Kang transfer, 150 epochs without early stopping
            gave a lower mean energy distance over the 7 held-out types than with it).
        seed
            Random seed of weights, split, couplings and flow times; ``None`` uses ``vcell.settings.seed``.
        trainer_kwargs
            Further :class:`lightning.Trainer` arguments (e.g. ``{"enable_progress_bar": False}``).
        weight_decay
            AdamW weight decay.
        validation_fraction
            Share of cells held out for validation when ``obs['vcell_split']`` has no ``val`` cells.
        early_stopping_patience
            Epochs without improvement before stopping.
        strategy, num_nodes
            Passed to :class:`lightning.Trainer`: ``strategy="ddp", devices=N, num_nodes=M`` trains in ``N * M``
            processes, each taking its own share of every epoch's pairs (:class:`vcell.data.CellBatches`).
        shuffle
            Order of the pairs: ``"full"`` (a new permutation per epoch), ``"block"`` (permuted blocks of pairs with
            consecutive target cells, then pairs within windows) or ``"auto"`` (``"full"``: the pairs are read from
            the cells' PCA coordinates, held in memory even for a backed AnnData). Each chunk's coupling is solved
            when a batch first needs it; an epoch of more than 65,536 pairs is permuted chunk by chunk and then
            within windows of 65,536 pairs (:class:`vcell.data.CellBatches` ``window``), so that a step costs the
            same at any number of cells (smaller epochs: one permutation, as before).
        {doc_checkpoint_path}

        Sets the following fields
        -------------------------
        ``model.history_``
            Per-epoch means of the loss (``train_loss``, ``val_loss``, ``*_flow_mse``): dict of DataFrames.
        ``model.best_epoch_``, ``model.train_indices_``, ``model.validation_indices_``
            The epoch whose weights are kept and the cells trained and validated on.
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
        )
        seed = resolve_seed(seed)
        lightning.seed_everything(seed, verbose=False)
        if not self.is_trained_:
            self.module.reset_parameters()
        adata = self.adata
        train_idx, val_idx = self._split(adata, validation_fraction, seed)
        labels = adata.obs[PERT_COL].astype(str).to_numpy()
        controls = train_idx[labels[train_idx] == CONTROL]
        if not controls.size:
            msg = f"FlowMatching needs control cells (obs[{PERT_COL!r}] == {CONTROL!r}) among the training cells"
            raise ValueError(msg)
        tensors = self._training_tensors(adata)
        opts = {
            "seed": seed,
            "coupling": self.coupling,
            "coupling_size": self.coupling_size,
            "exact_max": self.exact_max,
            "epsilon": self.sinkhorn_epsilon,
        }
        groups = self._groups(adata, train_idx, controls)
        train_dl = _pair_batches(tensors, *groups, batch_size=batch_size, shuffle=shuffle, **opts)
        val_dl = None
        if len(val_idx):
            groups = self._groups(adata, val_idx, controls)
            val_dl = _pair_batches(tensors, *groups, batch_size=max(batch_size, 1024), fixed=True, **opts)
            val_dl = val_dl if len(val_dl) else None
        plan = TrainingPlan(self.module, lr=lr, weight_decay=weight_decay, monitor="val_loss")
        self.best_epoch_ = fit(
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
            trainer_kwargs=trainer_kwargs,
        )
        self.module.eval()
        self.is_trained_ = True
        hist = pd.DataFrame(plan.history).set_index("epoch") if plan.history else pd.DataFrame()
        self.history_ = {col: hist[[col]] for col in hist.columns}
        self.train_indices_, self.validation_indices_ = train_idx, val_idx
        logger.info("FlowMatching trained for %d epochs", len(plan.history))

    # ------------------------------------------------------------------ inference
    def _check_options(self, n_steps: int, solver: str, time: float | None) -> float | None:
        if solver not in SOLVERS:
            msg = f"solver must be one of {SOLVERS}, got {solver!r}"
            raise ValueError(msg)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int | np.integer) or n_steps < 1:
            msg = f"n_steps must be a positive integer, got {n_steps!r}"
            raise ValueError(msg)
        if self.time_key is None:
            if time is not None:
                msg = "time= needs a model created with time_key="
                raise ValueError(msg)
            return None
        time = self.default_time_ if time is None else float(time)
        if not np.isfinite(time):
            msg = f"time must be a finite number, got {time!r}"
            raise ValueError(msg)
        return time

    def _flow_sources(self, adata: AnnData, idx: np.ndarray, batch_size: int) -> list[dict[str, Any]]:
        """What the flow of cells ``idx`` needs whatever the perturbation, per chunk of ``batch_size`` cells.

        ``x`` (log1p expression), ``p`` (proteins; NaN rows: unmeasured; ``None`` for an RNA-only model), ``z0``
        (their coordinates) and ``cov`` (covariate codes), all on the module's device.
        """
        m = self.module.eval()
        device = m.pca_components.device
        reader = model_reader(self, adata)
        out = []
        for chunk in self._chunks(idx, batch_size):
            X = reader(chunk)
            P = self._cell_proteins(adata, chunk)
            x = torch.as_tensor(X, device=device)
            p = None if P is None else torch.as_tensor(P, device=device)
            with torch.no_grad():
                z0 = m.encode(x, p)
            cov = torch.as_tensor(self._covariate_codes(adata, chunk)).to(device)
            out.append({"x": x, "p": p, "z0": z0, "cov": cov})
        return out

    def _condition(
        self, source: dict[str, Any], target: np.ndarray, nodes: np.ndarray, time: float | None
    ) -> torch.Tensor:
        """Condition vectors of the cells of one chunk of :meth:`_flow_sources` under ``target`` (an encoding)."""
        m = self.module
        n = len(source["z0"])
        device = source["z0"].device
        batch = {
            REGISTRY_KEYS.PERT_ENCODING_KEY: torch.as_tensor(np.repeat(target, n, axis=0)),
            REGISTRY_KEYS.COVARIATES_KEY: source["cov"],
        }
        if nodes.size:
            batch[EXTRA_NODES_KEY] = torch.as_tensor(np.tile(nodes, (n, 1)))
        if time is not None:
            batch[TIME_COVARIATE_KEY] = torch.full((n,), float(time))
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            return m.condition(batch)

    def _transport(
        self,
        source: dict[str, Any],
        target: np.ndarray,
        nodes: np.ndarray,
        time: float | None,
        *,
        n_steps: int,
        solver: str,
        path: bool = False,
    ) -> torch.Tensor:
        """Endpoints (all states with ``path``) of the flow of one chunk of :meth:`_flow_sources` under ``target``."""
        c = self._condition(source, target, nodes, time)
        return self.module.transport(source["z0"], c, n_steps=int(n_steps), solver=solver, path=path)

    def _flow(
        self,
        adata: AnnData,
        idx: np.ndarray,
        perturbation: str,
        dose: float,
        time: float | None,
        *,
        n_steps: int,
        solver: str,
        batch_size: int,
        path: bool = False,
    ):
        """Yield ``(x, p, z0, z_end)`` per chunk of cells ``idx``.

        ``p``: the cells' proteins (NaN rows: unmeasured; ``None`` for an RNA-only model); ``z_end``: endpoints, or
        all states with ``path``.
        """
        target, nodes = self._encode_query([str(perturbation)], float(dose))
        for src in self._flow_sources(adata, idx, batch_size):
            z_end = self._transport(src, target, nodes, time, n_steps=n_steps, solver=solver, path=path)
            yield src["x"], src["p"], src["z0"], z_end

    def predict(
        self,
        adata: AnnData | MuData | None = None,
        *,
        perturbation: str,
        controls: Any = None,
        dose: float = 1.0,
        seed: int | None = None,
        n_steps: int = DEFAULT_STEPS,
        solver: str = DEFAULT_SOLVER,
        time: float | None = None,
        residual: bool | None = None,
        batch_size: int = 2048,
        modality: str = "rna",
    ) -> np.ndarray:
        """Counterfactual expression of control cells under ``perturbation``: each cell pushed through the flow.

        Parameters
        ----------
        adata
            Data holding the starting cells (same genes as in training); ``None`` uses the training data.
        perturbation
            Canonical condition, e.g. ``"IFNb"`` or ``"A+B"`` (unseen combinations of seen singles too).
        controls
            Cells to start from: ``None`` (all control cells), a boolean mask, indices or obs names.
        dose
            Dose of every component of ``perturbation``.
        seed
            Unused (the flow is deterministic); accepted for the common interface.
        n_steps
            Fixed steps of the ODE solver. The default, 5 midpoint steps (10 evaluations of the vector field per
            cell; 20 until issue 19), gave predictions within 1.6% (Kang 2018 transfer, 7 cell types) and 1.2% (a
            simulated screen) of 100 midpoint steps (root mean square over cells and genes, relative to the predicted
            change; at most 2.4%), with the same scores; 10 midpoint steps were within 0.6%, at twice the cost
            (``benchmarks/flow_matching_solvers.py``, ``docs/flow_matching.md``).
        solver
            ``"euler"`` or ``"midpoint"``.
        time
            Value of the time covariate (models with ``time_key``); ``None``: the median time of the perturbed
            training cells.
        residual
            Add the decoded displacement to each cell's own expression (``None``: the model's ``residual``).
        batch_size
            Cells per forward pass (rows of cells x perturbations: :func:`vcell.tl.predict_perturbation` integrates
            the flows of as many perturbations of the same cells together as fit).
        modality
            ``"rna"`` (genes, log1p(CP10k)) or, for a model set up with ``protein_modality=``, ``"prot"``: proteins
            in log1p(counts per 1e4 of the protein library), decoded from the same flow (see the class docstring).

        Returns
        -------
        Array of shape ``(n_selected_cells, n_genes)`` (``"prot"``: ``(n_selected_cells, n_proteins)``), float32,
        clipped at 0.
        """
        options = {"n_steps": n_steps, "solver": solver, "time": time, "residual": residual, "batch_size": batch_size}
        return super().predict(
            adata, perturbation=perturbation, controls=controls, dose=dose, seed=seed, modality=modality, **options
        )

    def _predict_cells(
        self,
        adata: AnnData,
        idx: np.ndarray,
        perturbation: str,
        dose: float,
        time: float | None,
        n_steps: int,
        solver: str,
        residual: bool | None,
        batch_size: int,
        *,
        modalities: Sequence[str] = ("rna",),
    ) -> dict[str, np.ndarray]:
        """Predictions of cells ``idx`` per modality in ``modalities`` (one flow for all), float32, clipped at 0."""
        targets = [(str(perturbation), *self._encode_query([str(perturbation)], float(dose)))]
        sources = self._flow_sources(adata, idx, batch_size)
        return next(self._flows(sources, targets, time, n_steps, solver, residual, modalities, batch_size))[1]

    def _flows(
        self,
        sources: list[dict[str, Any]],
        targets: list[tuple[str, np.ndarray, np.ndarray]],
        time: float | None,
        n_steps: int,
        solver: str,
        residual: bool | None,
        modalities: Sequence[str],
        batch_size: int = 2048,
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """``(perturbation, {modality: prediction})`` per target ``(perturbation, encoding, nodes)``, in order.

        The cells (``sources``, :meth:`_flow_sources`) are read and projected once for all targets. The flows of as
        many targets as fit in ``batch_size`` rows (cells x targets; at least one target) are integrated together
        (:meth:`FlowMatchingModule.flow`: stacked rows, each target's condition entering the first layer once); each
        target's prediction is decoded only when it is yielded (one prediction in memory at a time).
        """
        residual = self.residual if residual is None else bool(residual)
        m = self.module
        n_max = max((len(src["z0"]) for src in sources), default=1)
        per_call = max(1, int(batch_size) // max(n_max, 1))
        for start in range(0, len(targets), per_call):
            block = targets[start : start + per_call]
            ends: list[list[torch.Tensor]] = [[] for _ in block]  # per target: endpoints per source chunk
            for src in sources:
                z0 = src["z0"]
                with torch.no_grad():
                    h = torch.cat([m.condition_bias(self._condition(src, t, nodes, time)) for _, t, nodes in block])
                    z1 = m.flow(z0.repeat(len(block), 1), h, n_steps=int(n_steps), solver=solver)
                for j, z in enumerate(z1.split(len(z0))):
                    ends[j].append(z)
            for (name, _, _), z1s in zip(block, ends, strict=True):
                yield name, self._decoded(sources, z1s, residual, modalities)

    def _decoded(
        self, sources: list[dict[str, Any]], ends: list[torch.Tensor], residual: bool, modalities: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """``{modality: prediction}`` of the cells of ``sources`` from their flow endpoints ``ends`` (per chunk)."""
        m = self.module
        out: dict[str, list[np.ndarray]] = {mod: [] for mod in modalities}
        for src, z1 in zip(sources, ends, strict=True):
            x, p, z0 = src["x"], src["p"], src["z0"]
            with torch.no_grad():
                if "rna" in out:
                    pred = m.decode_onto(x, z1 - z0) if residual else m.decode(z1)
                    out["rna"].append(pred.clamp_(min=0).cpu().numpy())
                if "prot" in out:
                    pred = m.decode_protein(z1)
                    if residual:  # measured cells keep their own proteins; the others start from the reconstruction
                        measured = torch.isfinite(p).all(dim=1, keepdim=True)
                        own = torch.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0) + m.decode_protein_delta(z1 - z0)
                        pred = torch.where(measured, own, pred)
                    out["prot"].append(pred.clamp(min=0).cpu().numpy())
        return {mod: join_rows(v) for mod, v in out.items()}

    def _predict(
        self,
        adata: AnnData,
        idx: np.ndarray,
        perturbations: list[str],
        *,
        dose: float,
        seed: int | None,
        modalities: tuple[str, ...],
        n_steps: int = DEFAULT_STEPS,
        solver: str = DEFAULT_SOLVER,
        time: float | None = None,
        residual: bool | None = None,
        batch_size: int = 2048,
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """:meth:`predict` of every perturbation, the cells read and projected once (:meth:`_flows`)."""
        time = self._check_options(n_steps, solver, time)
        targets = [(p, *self._encode_query([p], float(dose))) for p in perturbations]

        def run() -> Iterator[tuple[str, dict[str, np.ndarray]]]:
            sources = self._flow_sources(adata, idx, batch_size)
            yield from self._flows(sources, targets, time, n_steps, solver, residual, modalities, batch_size)

        return run()

    def get_trajectory(
        self,
        adata: AnnData | MuData | None = None,
        *,
        perturbation: str,
        controls: Any = None,
        dose: float = 1.0,
        n_steps: int = DEFAULT_STEPS,
        solver: str = DEFAULT_SOLVER,
        time: float | None = None,
        batch_size: int = 2048,
    ) -> np.ndarray:
        """Paths of control cells through the flow, in the standardised PCA space.

        Parameters
        ----------
        adata, perturbation, controls, dose, n_steps, solver, time, batch_size
            As in :meth:`predict`.

        Returns
        -------
        Array of shape ``(n_steps + 1, n_selected_cells, n_components)``: the states at ``t = 0, 1/n_steps, ..., 1``
        (with proteins: in the joint RNA + protein space).
        """
        self._require_trained()
        time = self._check_options(n_steps, solver, time)
        check_options(batch_size=batch_size)
        adata, idx, perturbation, dose = self._query_inputs(adata, perturbation, controls, dose)
        kw = {"n_steps": n_steps, "solver": solver, "batch_size": batch_size, "path": True}
        paths = [zs.cpu().numpy() for *_, zs in self._flow(adata, idx, perturbation, dose, time, **kw)]
        return np.concatenate(paths, axis=1)

    def sample(
        self,
        adata: AnnData | MuData | None = None,
        *,
        perturbation: str,
        n_cells: int | None = None,
        controls: Any = None,
        dose: float = 1.0,
        seed: int | None = None,
        n_steps: int = DEFAULT_STEPS,
        solver: str = DEFAULT_SOLVER,
        time: float | None = None,
        batch_size: int = 2048,
    ) -> AnnData:
        """Cells of the predicted perturbed population: starting control cells pushed through the flow.

        The randomness is in the starting cells: ``n_cells=None`` pushes each selected control cell once; otherwise
        ``n_cells`` starting cells are drawn from them with replacement (seeded). Values are as in :meth:`predict`.

        Parameters
        ----------
        adata
            Data holding the starting cells; ``None`` uses the training data.
        perturbation
            Canonical condition to sample.
        n_cells
            Number of cells; ``None`` draws one per starting cell.
        controls
            Cells to start from: ``None`` (all control cells), a boolean mask, indices or obs names.
        dose
            Dose of every component of ``perturbation``.
        seed
            Random seed of the draw of starting cells; ``None`` uses ``vcell.settings.seed``.
        n_steps, solver, time, batch_size
            As in :meth:`predict`.

        Returns
        -------
        A new AnnData (``n_cells`` x genes): ``X`` holds log1p(CP10k) (float32, clipped at 0),
        ``obs['perturbation']`` / ``obs['vcell_perturbation']`` the condition, ``obs['vcell_dose']`` the dose and
        ``obs['vcell_source_cell']`` the starting cell. A model with proteins also sets ``obsm['protein']``: a
        DataFrame (cells x the model's proteins) of the same cells' proteins in log1p(counts per 1e4 of the protein
        library), from the same flow.
        """
        import anndata as ad

        self._require_trained()
        time = self._check_options(n_steps, solver, time)
        check_options(n_cells=n_cells, batch_size=batch_size)
        adata, idx, perturbation, dose = self._query_inputs(adata, perturbation, controls, dose)
        rng = np.random.default_rng(resolve_seed(seed))
        if n_cells is not None:
            idx = rng.choice(idx, size=int(n_cells), replace=True)
        modalities = ("rna", "prot") if self.protein_names_ else ("rna",)
        pred = self._predict_cells(
            adata, idx, perturbation, dose, time, n_steps, solver, None, batch_size, modalities=modalities
        )
        obs = sample_obs(str(perturbation), float(dose), adata.obs_names[idx].to_numpy())
        cells = ad.AnnData(X=pred["rna"], obs=obs, var=pd.DataFrame(index=adata.var_names.copy()))
        if self.protein_names_:
            cells = with_sampled_proteins(cells, pred["prot"], self.protein_names_)
        return cells


def _joint_space(X: np.ndarray, P: np.ndarray, n_components: int, protein_weight: float) -> dict[str, Any]:
    """Joint RNA + protein PCA space (``FlowMatchingModule.set_space`` kwargs) of measured cells ``X``, ``P``.

    Features ``[X, w P]`` with ``w`` such that the protein block's total variance is ``protein_weight`` times the
    RNA block's; PCA, global scale of the coordinates; ``rna_projection``: the posterior mean of the coordinates
    given RNA alone under the PCA's Gaussian model (scores ``a ~ N(0, diag(lam))``, RNA ``x = mean + C_R.T a +
    noise`` of the per-gene residual variance ``s2``): ``a = (C_R C_R.T + s2 diag(1 / lam))^-1 C_R (x - mean)``.
    """
    from vcell.metrics import fit_pca, pca_project

    X, P = np.asarray(X, dtype=np.float64), np.asarray(P, dtype=np.float64)
    var_x, var_p = float(X.var(axis=0).sum()), float(P.var(axis=0).sum())
    w = float(np.sqrt(protein_weight * var_x / var_p)) if var_x > 0 and var_p > 0 else 1.0
    F = np.hstack([X, w * P])
    comps, mean = fit_pca(F, n_components)
    a = pca_project(F, comps, mean)
    scale = float(np.sqrt(np.mean(a**2))) if a.size else 1.0
    scale = scale if scale > 0 else 1.0
    G = X.shape[1]
    C_r = np.asarray(comps, dtype=np.float64)[:, :G]
    lam = np.maximum((a**2).mean(axis=0), 1e-12)
    s2 = float(np.mean((X - mean[:G] - a @ C_r) ** 2))
    projection = np.linalg.pinv(C_r @ C_r.T + s2 * np.diag(1.0 / lam)) @ C_r / scale
    return {"components": comps, "mean": mean, "scale": scale, "protein_scale": w, "rna_projection": projection}
