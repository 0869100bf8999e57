"""``CausalVAE``: compositional causal VAE with perturbation operators, doses and counterfactuals."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from vcell._constants import CONTROL, DOSE_COL, PERT_COL, REGISTRY_KEYS
from vcell._docs import doc_checkpoint_path, doc_params
from vcell._settings import logger
from vcell._utils import check_dose, get_matrix, log1p_cp10k, resolve_seed
from vcell.data import CellBatches, Lookup, RowReader, iter_row_blocks, take_rows
from vcell.data._vocab import _components
from vcell.module import CausalVAEModule, gene_programs, regulatory_edges
from vcell.module._causal_vae import (
    EXTRA_NODES_KEY,
    LIKELIHOODS,
    LOG_X_FACTORIAL_KEY,
    PROTEIN_KEY,
    TARGET_ENCODING_KEY,
    TARGET_EXTRA_NODES_KEY,
)
from vcell.train._callbacks import CounterfactualValidation

from ._adapt import AdaptMixin
from ._base import Capabilities, PerturbationModel, check_hyperparameters, check_options, sample_obs
from ._encoding import PerturbationInputs, _as_anndata, _edge_frame, label_codes_of
from ._protein import with_sampled_proteins
from ._rows import join_rows

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

PREDICTION_MODES = ("residual", "decoded")
#: batch keys of the cells themselves (what encoding a cell needs)
_CELL_KEYS = (REGISTRY_KEYS.X_KEY, REGISTRY_KEYS.PERT_ENCODING_KEY, REGISTRY_KEYS.COVARIATES_KEY)


def _log_factorials(values: np.ndarray) -> np.ndarray:
    """``log(x!)`` of every value, in float64: a table lookup for integer counts, ``gammaln`` otherwise."""
    from scipy.special import gammaln

    values = np.asarray(values)
    if values.size and 0 <= values.min() and values.max() <= 1e7:
        k = values.astype(np.int32)
        if np.array_equal(k, values):  # integer counts: one gammaln per distinct value (same float64 numbers)
            return gammaln(np.arange(k.max() + 1, dtype=np.float64) + 1.0)[k]
    return gammaln(values.astype(np.float64) + 1.0)


def _log_factorial_sums(X: Any) -> np.ndarray:
    """Per-cell sum of ``log(x!)`` of a count matrix (zeros add nothing), in float64, in row blocks (any storage)."""
    out = np.zeros(X.shape[0])
    for start, stop, block in iter_row_blocks(X):
        if sparse.issparse(block):
            ptr = block.indptr
            if ptr[-1] > ptr[0]:
                sums = np.add.reduceat(np.r_[_log_factorials(block.data[ptr[0] : ptr[-1]]), 0.0], ptr[:-1] - ptr[0])
                out[start:stop] = sums * (np.diff(ptr) > 0)
        else:
            out[start:stop] = _log_factorials(np.asarray(block)).sum(1)
    return out


class CausalVAE(AdaptMixin, PerturbationInputs, PerturbationModel):
    """Compositional causal VAE: perturbations are operators on a basal latent state, and they add up.

    The latent state of a cell is ``z = z_basal + sum_i s_i(dose_i) delta_i + sum_k e_k(covariate_k)``, plus a
    gated, sparsity-penalised interaction vector for every combination seen in training (so non-additive doubles
    can be represented without hurting additive ones). ``z_basal`` is encoded from the cell's log1p(CP10k)
    expression; adversarial classifiers behind a gradient-reversal layer push it to carry no information on the
    perturbation or the covariates (CPA). ``delta_i`` is a learned vector per single perturbation (one-hot), or a
    learned function of a given embedding (``perturbation_embedding``: gene embeddings, drug fingerprints), which
    also predicts perturbations never seen in training that have an embedding, or the output of a graph neural
    network over a gene graph (``gene_graph``), which predicts any gene of the graph from its neighbours. ``s_i`` is a sigmoid in log-dose
    with learned EC50 and slope per perturbation, so unseen doses interpolate. Counts follow a negative binomial
    with the observed library size (scVI), a zero-inflated one, or a Gaussian on log1p(CP10k).

    Counterfactuals encode the starting (control) cells, replace their perturbation part by the target's, and
    decode. With ``prediction="residual"`` (default) the decoded *change* is added to each cell's own log1p(CP10k)
    expression, which keeps the cell-to-cell variation the latent space does not hold (as the additive baseline
    does); ``"decoded"`` returns the decoded means.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`, or a MuData whose ``rna`` modality was registered.
    registry
        Registry of a saved model (used by :meth:`load`).
    n_latent
        Latent dimension.
    n_hidden
        Width of the hidden layers of encoder and decoder.
    n_layers
        Hidden layers of encoder and decoder.
    dropout
        Dropout rate of the hidden layers.
    likelihood
        ``"nb"`` (default; needs counts), ``"zinb"`` or ``"gaussian"`` (on log1p(CP10k); works on log data).
    variational
        Gaussian posterior with a KL term; ``False`` gives a deterministic autoencoder.
    kl_weight
        Weight of the KL term.
    adversary_weight
        Strength of the adversaries' reversed gradient into the encoder (0 switches the pressure off; the
        adversaries are still trained and report how much ``z_basal`` reveals).
    interactions
        Learn gated pairwise interactions for the combinations seen in training.
    interaction_penalty
        Sparsity penalty on the interaction gates.
    perturbation_embedding
        ``None`` (one-hot: one learned operator per single perturbation), a :class:`pandas.DataFrame` indexed by
        single perturbation (numeric columns), or a key of ``adata.uns`` holding one. It must have a row for every
        perturbation in the training data.
    gene_graph
        ``None``, or a gene graph in GEARS' format (:func:`vcell.priors.read_gene_graph`, :func:`vcell.priors.go_graph`):
        a :class:`pandas.DataFrame` with columns ``source``, ``target`` and optionally ``importance`` (edge weight,
        default 1; the graph is treated as undirected), or a key of ``adata.uns`` holding one (or a dict of its
        columns). Node names are single-perturbation labels (gene names for knock-outs). Each perturbation's
        operator is then computed by a graph neural network (:class:`vcell.module.GeneGraphOperators`): learned node
        embeddings propagated over ``graph_layers`` hops, then an MLP. Any node of the graph can be predicted,
        alone or in combinations (e.g. a seen gene plus an unseen one): an unseen gene's operator comes from the
        embeddings of its neighbours within ``graph_layers`` hops (its own node is left out, the mean dose response
        of the training perturbations is used). Only nodes within ``graph_layers`` hops of a training perturbation
        have an embedding (training cannot reach the others); farther nodes count as zero, so a gene with no such
        neighbour gets a constant operator. A training perturbation that is not a node gets an isolated node of its
        own (a free operator, as with one-hot; logged as a warning); if none is a node, a KeyError is raised.
        Exclusive with ``perturbation_embedding``; saved with the model.
    graph_layers
        Hops of the gene-graph propagation (with ``gene_graph``).
    graph_own_embedding
        With ``gene_graph``: each training perturbation also has a free embedding of its own node (more capacity on
        seen perturbations); ``False``: every perturbation's operator, seen or not, comes from its neighbours only,
        so training fits exactly the rule that unseen genes are predicted with.
    pathways
        ``None`` (an MLP decoder), or gene programs for a pathway-structured decoder
        (:class:`vcell.module.PathwayDecoder`): a network in decoupler's long format (columns ``source`` = program,
        ``target`` = gene, optional ``weight``, default 1), e.g. PROGENy footprints or Hallmark gene sets from
        :func:`vcell.priors.read_network` / :func:`vcell.priors.read_gmt`; or a key of ``adata.uns`` holding one (or
        a dict of its columns); or the path of a file :func:`vcell.priors.read_network` reads. Each program with at
        least ``pathway_min_genes`` of the model's genes gets one latent factor (the first ones, in sorted program
        order; names in ``model.pathway_names_``) that loads only on its genes; the other ``n_latent - n_programs``
        factors reach all genes through an MLP. ``n_latent`` must be at least the number of programs. The program
        loadings are in :meth:`get_pathway_loadings`. Saved with the model (the edges to its genes).
    pathway_min_genes
        Programs with fewer of the model's genes are dropped (with ``pathways``).
    pathway_init
        ``"programs"`` (factor k starts as program k's weights, scaled) or ``"random"`` (random on its genes).
    regulatory_network
        ``None``, or a signed TF->target network in decoupler's format (``source`` = TF, ``target``, ``weight``
        whose sign is activation / repression), e.g. CollecTRI, given like ``pathways``. Edges with TF and target
        among the model's genes are kept (a repeated edge with conflicting signs is dropped, see
        :func:`vcell.module.regulatory_edges`), and training adds a sign-consistency penalty: for each perturbed cell,
        the decoded change ``delta`` from its unperturbed state (log1p(CP10k)) pays
        ``regulatory_weight * sum_edges relu(-sign * delta_tf * delta_target)``, i.e. only TF and target changing
        together against the edge's sign are penalised (the TF's mRNA stands in for its activity; a soft prior).
        Saved with the model (the kept edges).
    regulatory_weight
        Weight of that penalty (with ``regulatory_network``; 0 switches it off). 0.3 was the best of 0.3, 1 and 3
        on Kang 2018 with held-out NK cells (benchmarks/causal_vae_structured.py); 3 made predictions worse.
    prediction
        ``"residual"`` or ``"decoded"`` (see above); :meth:`predict` can override it.
    protein_weight
        Weight of the protein reconstruction term, for a MuData registered with ``protein_modality=``
        (CITE-seq). Such a model encodes RNA and proteins into one latent state and decodes proteins with a second
        head: negative binomial counts with the cell's observed protein library size and one dispersion per protein
        (as RNA; no totalVI background mixture), see :class:`vcell.module.CausalVAEModule`. ``predict(...,
        modality="prot")`` gives protein counterfactuals in log1p(counts per 1e4 of the protein library);
        :func:`vcell.tl.predict_perturbation` writes both modalities. :meth:`sample` stays RNA-only. Ignored
        without proteins.

    Examples
    --------
    Out of distribution: a double perturbation held out by :func:`vcell.bench.split`, predicted from its singles.

    >>> import vcell
    >>> adata = vcell.datasets.simulate(n_cells=300, n_genes=50, n_perturbations=3, n_combos=2, seed=0)
    >>> vcell.bench.split(adata, kind="combo_half", perturbation_key="perturbation", seed=0)
    >>> held = adata.uns["vcell_split"]["held_out"][0]  # a double whose cells are all test cells
    >>> train = adata[adata.obs["vcell_split"] != "test"].copy()  # (models also skip test cells themselves)
    >>> vcell.model.CausalVAE.setup_anndata(train, perturbation_key="perturbation", control="control")
    >>> model = vcell.model.CausalVAE(train, n_latent=8, n_hidden=32)
    >>> model.train(max_epochs=2, seed=0, trainer_kwargs={"enable_progress_bar": False})
    >>> model.predict(perturbation=held).shape  # counterfactuals of the 60 control cells
    (60, 50)

    A pathway-structured decoder (two programs of 10 genes each here; PROGENy or Hallmark on real data) and a
    TF->target penalty:

    >>> import pandas as pd
    >>> genes = list(train.var_names)
    >>> programs = pd.DataFrame({"source": ["P1"] * 10 + ["P2"] * 10, "target": genes[:20]})
    >>> tf_net = pd.DataFrame({"source": genes[0], "target": genes[1:6], "weight": [1, 1, -1, 1, -1]})
    >>> model = vcell.model.CausalVAE(train, n_latent=8, n_hidden=32, pathways=programs, regulatory_network=tf_net)
    >>> model.pathway_names_
    ['P1', 'P2']
    >>> model.get_pathway_loadings().shape
    (50, 2)
    """

    capabilities = Capabilities(
        learned=True, can_sample=True, models_proteins=True, predict_options=("mode", "compose", "batch_size")
    )

    def __init__(
        self,
        adata: AnnData | MuData | None = None,
        registry: dict | None = None,
        *,
        n_latent: int = 32,
        n_hidden: int = 256,
        n_layers: int = 1,
        dropout: float = 0.1,
        likelihood: str = "nb",
        variational: bool = True,
        kl_weight: float = 1.0,
        adversary_weight: float = 1.0,
        interactions: bool = True,
        interaction_penalty: float = 1e-2,
        perturbation_embedding: str | pd.DataFrame | None = None,
        gene_graph: str | pd.DataFrame | None = None,
        graph_layers: int = 1,
        graph_own_embedding: bool = True,
        pathways: str | pd.DataFrame | None = None,
        pathway_min_genes: int = 5,
        pathway_init: str = "programs",
        regulatory_network: str | pd.DataFrame | None = None,
        regulatory_weight: float = 0.3,
        prediction: str = "residual",
        protein_weight: float = 1.0,
    ) -> None:
        check_hyperparameters(
            n_latent=(n_latent, "int>=1"),
            n_hidden=(n_hidden, "int>=1"),
            n_layers=(n_layers, "int>=0"),
            dropout=(dropout, "[0,1)"),
            kl_weight=(kl_weight, ">=0"),
            adversary_weight=(adversary_weight, ">=0"),
            interaction_penalty=(interaction_penalty, ">=0"),
            pathway_min_genes=(pathway_min_genes, "int>=1"),
            protein_weight=(protein_weight, ">=0"),
        )
        adata = _as_anndata(adata)
        super().__init__(adata, registry=registry)
        if likelihood not in LIKELIHOODS:
            msg = f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}"
            raise ValueError(msg)
        if prediction not in PREDICTION_MODES:
            msg = f"prediction must be one of {PREDICTION_MODES}, got {prediction!r}"
            raise ValueError(msg)
        if likelihood in ("nb", "zinb") and not self.counts_:
            msg = (
                f"likelihood={likelihood!r} needs raw counts, but the registered matrix looks log-normalised; "
                "register a counts layer (layer=) or use likelihood='gaussian'"
            )
            raise ValueError(msg)
        self.prediction = prediction
        if gene_graph is not None and perturbation_embedding is not None:
            msg = "pass either perturbation_embedding or gene_graph, not both"
            raise ValueError(msg)
        if int(graph_layers) < 1:
            msg = f"graph_layers must be a positive integer, got {graph_layers!r}"
            raise ValueError(msg)
        table = self._embedding_table(adata, perturbation_embedding)
        perturbation_embedding = table  # saved with the model, so load() needs no adata.uns
        graph = self._gene_graph(adata, gene_graph)
        gene_graph = graph  # saved with the model, as the table
        extra = [] if table is None else sorted(set(map(str, table.index)) - set(self.vocab.atoms))
        self.atoms_: list[str] = [*self.vocab.atoms, *extra]
        self._atom_index = {a: i for i, a in enumerate(self.atoms_)}
        features = None if table is None else table.loc[self.atoms_].to_numpy(dtype=np.float32)
        seen = np.array([a in set(self.vocab.atoms) for a in self.atoms_], dtype=bool)
        graph_kwargs = {} if graph is None else self._graph_arrays(graph, graph_layers, graph_own_embedding)
        pairs = self._pairs() if interactions else np.zeros((0, 2), dtype=np.int64)
        self.pairs_: list[str] = ["+".join((self.atoms_[i], self.atoms_[j])) for i, j in pairs]
        self.covariate_names_, self._categories = self._covariate_categories()
        pathways = self._network(adata, pathways, "pathways")  # saved with the model: the edges to its genes
        regulatory_network = self._network(adata, regulatory_network, "regulatory_network", tf_too=True)
        structure_kwargs = self._structure_arrays(
            pathways, regulatory_network, n_latent=n_latent, min_genes=pathway_min_genes
        )
        protein_kwargs = {"n_proteins": len(self.protein_names_), "protein_weight": protein_weight}
        if self.protein_names_ and likelihood == "gaussian":
            msg = "proteins are modelled with a negative binomial: register RNA counts and use likelihood='nb'/'zinb'"
            raise ValueError(msg)
        self.module = CausalVAEModule(
            self.summary_stats["n_vars"],
            len(self.atoms_),
            n_conditions=len(self._conditions()),
            covariate_sizes=tuple(len(c) for c in self._categories),
            covariate_names=tuple(self.covariate_names_),
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout=dropout,
            likelihood=likelihood,
            counts=self.counts_,
            variational=variational,
            kl_weight=kl_weight,
            perturbation_features=features,
            seen_atoms=seen,
            **graph_kwargs,
            pairs=pairs,
            adversary_weight=adversary_weight,
            interaction_penalty=interaction_penalty,
            log_dose_init=self._log_dose_init(adata),
            pathway_init=pathway_init,
            regulatory_weight=regulatory_weight,
            **structure_kwargs,
            **(protein_kwargs if self.protein_names_ else {}),
        )
        if graph is not None:
            kind = f"gene graph of {len(self._graph_nodes)} nodes, {len(graph)} edges, {graph_layers} layer(s)"
        else:
            kind = "embedding table" if table is not None else "one-hot"
        self._model_summary_string = (
            f"CausalVAE: {len(self.atoms_)} perturbations ({self.vocab.n_atoms} seen, "
            f"{kind}), {len(self.pairs_)} interaction pairs, "
            f"covariates {self.covariate_names_}, n_latent={n_latent}, likelihood={likelihood!r}"
        )
        if pathways is not None:
            self._model_summary_string += f", pathway decoder ({len(self.pathway_names_)} programs)"
        if regulatory_network is not None:
            n_edges = len(structure_kwargs["regulatory"][0])
            self._model_summary_string += f", regulatory penalty ({n_edges} edges, weight {regulatory_weight:g})"
        if self.protein_names_:
            self._model_summary_string += (
                f", {len(self.protein_names_)} proteins ({self.protein_modality_!r}, weight {protein_weight:g})"
            )
        self.init_params_ = self._get_init_params(locals())

    def _cell_keys(self) -> tuple[str, ...]:
        """Batch keys of the cells themselves (what encoding a cell needs): proteins too when registered."""
        return (*_CELL_KEYS, PROTEIN_KEY) if self.protein_names_ else _CELL_KEYS

    def _network(
        self, adata: AnnData | None, spec: str | pd.DataFrame | None, what: str, *, tf_too: bool = False
    ) -> pd.DataFrame | None:
        """The edges of a decoupler-format network (``source``, ``target``, ``weight``) onto the model's genes.

        ``spec``: a DataFrame, a key of ``adata.uns`` (DataFrame or dict of columns) or a file for
        :func:`vcell.priors.read_network`. Kept: edges whose target (``tf_too``: and source) is a model gene.
        """
        if spec is None:
            return None
        if isinstance(spec, str):
            from pathlib import Path

            if adata is not None and spec in adata.uns:
                spec = adata.uns[spec]
            elif Path(spec).is_file():
                from vcell.priors import read_network

                spec = read_network(spec)
            else:
                msg = f"{what} {spec!r} is neither a key of adata.uns nor a file"
                raise KeyError(msg)
        net = _edge_frame(
            spec, what, "weight", accepted="a DataFrame, a key of adata.uns or a file", fmt="decoupler's format"
        )
        if not np.isfinite(net["weight"].to_numpy()).all():
            msg = f"{what} weight values must be finite"
            raise ValueError(msg)
        genes = pd.Index(self._genes())
        keep = genes.get_indexer(net["target"]) >= 0
        if not keep.any():
            msg = (
                f"{what}: none of its {net['target'].nunique()} targets is among the model's {len(genes)} genes "
                f"(targets e.g. {net['target'].unique()[:5].tolist()}, genes e.g. {genes[:5].tolist()}); "
                "name genes as the network does"
            )
            raise ValueError(msg)
        if tf_too:
            keep &= genes.get_indexer(net["source"]) >= 0
            if not keep.any():
                msg = (
                    f"{what}: no edge has its source (TF) among the model's genes as well as its target "
                    f"(sources e.g. {net['source'].unique()[:5].tolist()}); the penalty compares TF and target changes"
                )
                raise ValueError(msg)
        return net[keep].reset_index(drop=True)

    def _structure_arrays(
        self, pathways: pd.DataFrame | None, regulatory: pd.DataFrame | None, *, n_latent: int, min_genes: int
    ) -> dict[str, Any]:
        """The module's ``programs`` (program matrix) and ``regulatory`` (edge indices) arguments.

        Sets ``self.pathway_names_`` (the programs' names, in factor order; empty without pathways).
        """
        genes = self._genes()
        self.pathway_names_: list[str] = []
        out: dict[str, Any] = {}
        if pathways is not None:
            if isinstance(min_genes, bool) or not isinstance(min_genes, int | np.integer) or min_genes < 1:
                msg = f"pathway_min_genes must be a positive integer, got {min_genes!r}"
                raise ValueError(msg)
            try:
                names, programs = gene_programs(
                    pathways["source"], pathways["target"], genes, weight=pathways["weight"], min_genes=int(min_genes)
                )
            except ValueError as err:
                msg = f"pathways: {err}"
                raise ValueError(msg) from err
            if len(names) > int(n_latent):
                msg = (
                    f"pathways give {len(names)} programs (with >= {min_genes} genes each) but n_latent={n_latent}: "
                    f"the pathway decoder needs n_latent >= n_programs={len(names)} (one latent factor per program)"
                )
                raise ValueError(msg)
            self.pathway_names_ = [str(n) for n in names]
            out["programs"] = programs.astype(np.float32)
        if regulatory is not None:
            tf, target, sign = regulatory_edges(regulatory["source"], regulatory["target"], regulatory["weight"], genes)
            if not len(tf):
                msg = "regulatory_network: no usable edge among the model's genes (self-loops and conflicting signs dropped)"
                raise ValueError(msg)
            out["regulatory"] = (tf, target, sign)
        return out

    def _pairs(self) -> np.ndarray:
        out = set()
        for cond in self.vocab.conditions:
            parts = sorted(self._atom_index[a] for a in _components(cond))
            out.update((parts[i], parts[j]) for i in range(len(parts)) for j in range(i + 1, len(parts)))
        return np.array(sorted(out), dtype=np.int64).reshape(-1, 2)

    # ------------------------------------------------------------------ tensors from AnnData
    def _raw(self, adata: AnnData, idx: np.ndarray) -> np.ndarray:
        """Registered matrix rows (counts, or log1p(CP10k) for log data), dense float32."""
        return RowReader(get_matrix(adata, self._layer()))(idx)

    def _own_query(self, adata: AnnData, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_encode_query` of the cells' own perturbations (none: cells without labels count as controls)."""
        canon = self._canonical_obs(adata, required=False)
        if canon is None:
            return np.zeros((len(idx), len(self.atoms_)), dtype=np.float32), np.zeros(0, dtype=np.int64)
        labels = canon[PERT_COL].astype(str).to_numpy()[idx]
        return self._encode_query(labels, canon[DOSE_COL].to_numpy(dtype=np.float32)[idx])

    def _training_tensors(self, adata: AnnData) -> dict[str, Any]:
        """Per-cell fields of the training batches: a few bytes per cell besides the rows read per batch.

        Encodings, condition codes and covariate codes are :class:`vcell.data.Lookup` fields (their distinct rows and
        a one-byte code per cell for up to 128 distinct rows), batched as the dense tensors they stand for.
        """
        X = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)  # rows read per batch: never densified whole
        labels = adata.obs[PERT_COL]
        doses = adata.obs[DOSE_COL].to_numpy(dtype=np.float32) if DOSE_COL in adata.obs else 1.0
        conditions = self._conditions()
        label_codes, label_values = label_codes_of(labels)  # a categorical's codes: no string per cell
        codes = pd.Index(conditions).get_indexer(label_values)[label_codes]
        if codes.size and codes.min() < 0:
            unknown = sorted(set(labels.astype(str).to_numpy()[codes < 0]))[:5]
            msg = f"obs[{PERT_COL!r}] holds conditions that were not registered: {unknown}; run setup_anndata again"
            raise KeyError(msg)
        tensors = {
            REGISTRY_KEYS.X_KEY: RowReader(X),
            REGISTRY_KEYS.PERT_ENCODING_KEY: self._condition_lookup(labels, doses),
            REGISTRY_KEYS.PERT_KEY: Lookup(torch.arange(max(len(conditions), 1)), codes),
            REGISTRY_KEYS.COVARIATES_KEY: self._covariate_lookup(adata),
        }
        del codes
        if self.module.counts and self.module.likelihood != "gaussian":
            tensors[LOG_X_FACTORIAL_KEY] = torch.as_tensor(_log_factorial_sums(X), dtype=torch.float32)
        if self.protein_names_:
            tensors[PROTEIN_KEY] = torch.as_tensor(self._protein_rows(adata))
        return tensors

    def _counterfactual_groups(
        self,
        adata: AnnData,
        tensors: dict[str, Any],
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        seed: int,
        *,
        max_groups: int = 50,
        max_controls: int = 64,
    ) -> CounterfactualValidation | None:
        """The validation groups: training controls with each group's target encoding, and the groups' mean expression.

        At most ``max_groups`` (condition, context) groups, drawn with ``seed``; each context's controls are at most
        ``max_controls`` training controls drawn once and shared by all its groups. ``None`` when no perturbed
        validation cell has training controls in its context.
        """
        cond = adata.obs[PERT_COL].astype(str).to_numpy()
        ctx = self._contexts(adata)
        dose = adata.obs[DOSE_COL].to_numpy(dtype=np.float32) if DOSE_COL in adata.obs else np.ones(adata.n_obs)
        val = val_idx[cond[val_idx] != CONTROL]
        train_ctrl = train_idx[cond[train_idx] == CONTROL]
        keys = pd.Series(cond[val]) + "\t" + pd.Series(ctx[val])
        rng = np.random.default_rng(seed)
        X = RowReader(get_matrix(adata, self._layer()))
        controls: dict[str, np.ndarray] = {}  # context -> its sampled training controls, shared by its groups
        groups: dict[str, list[int]] = {}  # context -> its groups (rows of targets)
        encodings, targets, protein_targets = [], [], []
        uniq = keys.unique()
        for key in rng.permutation(uniq)[:max_groups] if len(uniq) > max_groups else uniq:
            members = val[(keys == key).to_numpy()]
            label, context = key.split("\t")
            if context not in controls:
                ctrl = train_ctrl[ctx[train_ctrl] == context]
                if ctrl.size > max_controls:
                    ctrl = np.sort(rng.choice(ctrl, max_controls, replace=False))
                controls[context] = ctrl
            if not controls[context].size:
                continue
            groups.setdefault(context, []).append(len(targets))
            encodings.append(self._encode([label], float(np.median(dose[members])))[0])
            rows = X(members)
            expr = log1p_cp10k(rows) if self.counts_ else rows
            targets.append(expr.mean(0))
            if self.protein_names_:
                P = self._protein_expression(adata, members)
                P = P[np.isfinite(P).all(1)]
                protein_targets.append(P.mean(0) if len(P) else np.full(P.shape[1], np.nan, dtype=np.float32))
        if not targets:
            return None
        encodings = np.stack(encodings)
        contexts = [
            (
                {k: take_rows(tensors[k], controls[context]) for k in self._cell_keys()},
                torch.as_tensor(encodings[rows]),
                torch.as_tensor(rows, dtype=torch.long),
            )
            for context, rows in groups.items()
        ]
        prot = torch.as_tensor(np.stack(protein_targets)) if protein_targets else None
        return CounterfactualValidation(
            contexts, torch.as_tensor(np.stack(targets)), self.prediction, protein_targets=prot
        )

    # ------------------------------------------------------------------ training
    @doc_params(doc_checkpoint_path=doc_checkpoint_path)
    def train(
        self,
        max_epochs: int = 200,
        lr: float = 1e-3,
        batch_size: int = 128,
        accelerator: str = "auto",
        devices: int | str = "auto",
        early_stopping: bool = True,
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
        """Train with Lightning (progress bar, validation loss, early stopping on the validation ELBO).

        Validation cells are ``obs['vcell_split'] == 'val'`` when present (then only ``'train'`` cells are
        trained on), else a seeded ``validation_fraction`` of the cells; ``'test'`` cells are never used.
        The first call re-initialises the weights from ``seed``, so the same seed gives the same model (on CPU).

        Parameters
        ----------
        max_epochs
            Maximum number of passes over the training cells.
        lr
            AdamW learning rate.
        batch_size
            Cells per batch.
        accelerator, devices
            Passed to :class:`lightning.Trainer` (``"auto"``: a GPU when available).
        early_stopping
            Stop when the monitored validation value has not improved for ``early_stopping_patience`` epochs, and
            keep the weights of its best epoch. The value is ``val_counterfactual_mse`` (see below) when some
            validation cells are perturbed and their context has control cells in training, else ``val_elbo``.
            ``val_counterfactual_mse``: per (condition, context) group of perturbed validation cells, the squared
            error between the mean counterfactual of training controls of that context (at most 64, sampled once per
            context and shared by its groups) and the group's mean log1p(CP10k) expression, averaged over genes and
            groups (at most 50, sampled); for a model with proteins plus the same
            error of the proteins (log1p(counts per 1e4 of the protein library), groups with measured proteins).
        seed
            Random seed of weights, validation split, shuffling and sampling; ``None`` uses ``vcell.settings.seed``.
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
            processes, each reading its own share of every epoch (:class:`vcell.data.CellBatches`).
        shuffle
            Order of the training cells: ``"full"`` (a new permutation per epoch), ``"block"`` (permuted blocks of
            consecutive cells, then cells within windows: contiguous reads from disk) or ``"auto"`` (``"block"`` for
            a backed AnnData, else ``"full"``).
        {doc_checkpoint_path}

        Sets the following fields
        -------------------------
        ``model.history_``
            Per-epoch means of every loss term (``train_*``, ``val_*``): dict of DataFrames indexed by epoch.
        ``model.adversary_accuracy_``
            Accuracy of each adversary on ``z_basal`` of the training and validation cells, beside chance (the
            majority class's share). The adversaries saw the training cells, so this errs on their side.
        """
        import lightning

        from vcell.train import TrainingPlan, as_callback, fit

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
        tensors = self._training_tensors(adata)
        train_dl = CellBatches(tensors, train_idx, batch_size=batch_size, shuffle=shuffle, seed=seed)
        val_dl = CellBatches(tensors, val_idx, batch_size=max(batch_size, 1024), shuffle=False, seed=seed)
        groups = self._counterfactual_groups(adata, tensors, train_idx, val_idx, seed) if len(val_idx) else None
        monitor = "val_counterfactual_mse" if groups else ("val_elbo" if len(val_idx) else "train_elbo")
        plan = TrainingPlan(self.module, lr=lr, weight_decay=weight_decay, monitor=monitor)
        self.best_epoch_ = fit(
            plan,
            train_dl,
            val_dl if len(val_idx) else None,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            checkpoint_path=checkpoint_path,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            callbacks=[as_callback(groups)] if groups else [],
            trainer_kwargs=trainer_kwargs,
        )
        self.module.eval()
        self.is_trained_ = True
        hist = pd.DataFrame(plan.history).set_index("epoch") if plan.history else pd.DataFrame()
        self.history_ = {col: hist[[col]] for col in hist.columns}
        self.train_indices_, self.validation_indices_ = train_idx, val_idx
        self.adversary_accuracy_ = self._adversary_accuracy(tensors, np.union1d(train_idx, val_idx))
        logger.info("CausalVAE trained for %d epochs", len(plan.history))

    @torch.no_grad()
    def _adversary_accuracy(self, tensors: dict[str, Any], idx: np.ndarray, batch_size: int = 2048) -> pd.DataFrame:
        """Accuracy of the trained adversaries on ``z_basal`` (posterior means) of cells ``idx``, and chance.

        ``tensors``: the training tensors (:meth:`_training_tensors`) of the model's data.
        """
        m = self.module.eval()
        device = next(m.parameters()).device
        targets = [take_rows(tensors[REGISTRY_KEYS.PERT_KEY], idx).numpy()]
        targets = targets if m.adversary_names and m.adversary_names[0] == "perturbation" else []
        cov = take_rows(tensors[REGISTRY_KEYS.COVARIATES_KEY], idx).numpy()
        targets += [cov[:, k] for k in range(cov.shape[1])]
        names = (["perturbation"] if targets and len(targets) > len(self.covariate_names_) else []) + list(
            self.covariate_names_
        )
        used = [
            (name, clf, y)
            for name, clf, active, y in zip(names, m.adversaries, m.adversary_active, targets, strict=True)
            if active
        ]
        correct = dict.fromkeys([name for name, _, _ in used], 0)
        start = 0
        for chunk in self._chunks(idx, batch_size):  # one chunk of cells at a time: memory does not grow with cells
            z = m.latent({k: take_rows(tensors[k], chunk).to(device) for k in self._cell_keys()})
            for name, clf, y in used:
                pred = clf(z).argmax(1).cpu().numpy()
                correct[name] += int((pred == y[start : start + len(chunk)]).sum())
            start += len(chunk)
        rows = {}
        for name, _, y in used:
            chance = np.bincount(y).max() / len(y) if len(y) else np.nan
            rows[name] = {"accuracy": correct[name] / len(y) if len(y) else np.nan, "chance": float(chance)}
        return pd.DataFrame.from_dict(rows, orient="index", columns=["accuracy", "chance"])

    # ------------------------------------------------------------------ inference
    def _batch(
        self,
        adata: AnnData,
        idx: np.ndarray,
        target: np.ndarray | None,
        device: torch.device,
        *,
        target_nodes: np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch of cells ``idx`` (own perturbation encoding included), with ``target`` (one row) for every cell.

        ``target_nodes``: graph nodes of ``target``'s columns beyond the module's atoms (:meth:`_encode_query`).
        """
        own, own_nodes = self._own_query(adata, idx)
        batch = {
            REGISTRY_KEYS.X_KEY: torch.as_tensor(self._raw(adata, idx)),
            REGISTRY_KEYS.PERT_ENCODING_KEY: torch.as_tensor(own),
            REGISTRY_KEYS.COVARIATES_KEY: torch.as_tensor(self._covariate_codes(adata, idx)),
        }
        if self.protein_names_:
            batch[PROTEIN_KEY] = torch.as_tensor(self._protein_rows(adata, idx))
        if own_nodes.size:
            batch[EXTRA_NODES_KEY] = torch.as_tensor(np.tile(own_nodes, (len(idx), 1)))
        if target is not None:
            batch[TARGET_ENCODING_KEY] = torch.as_tensor(np.repeat(target, len(idx), axis=0))
            if target_nodes is not None and target_nodes.size:
                batch[TARGET_EXTRA_NODES_KEY] = torch.as_tensor(np.tile(target_nodes, (len(idx), 1)))
        return {k: v.to(device) for k, v in batch.items()}

    def predict(
        self,
        adata: AnnData | MuData | None = None,
        *,
        perturbation: str,
        controls: Any = None,
        dose: float = 1.0,
        seed: int | None = None,
        mode: str | None = None,
        compose: str = "auto",
        batch_size: int = 2048,
        modality: str = "rna",
    ) -> np.ndarray:
        """Counterfactual mean expression of control cells under ``perturbation`` (log1p(CP10k), float32).

        Parameters
        ----------
        adata
            Data holding the starting cells (same genes as in training); ``None`` uses the training data.
        perturbation
            Canonical condition, e.g. ``"IFNb"`` or ``"A+B"``; ``"control"`` removes the cells' perturbation.
        controls
            Cells to start from: ``None`` (all control cells), a boolean mask, indices or obs names.
        dose
            Dose of every component of ``perturbation``.
        seed
            Unused (predictions are deterministic means); accepted for the common interface.
        mode
            ``"residual"`` or ``"decoded"``; ``None`` uses the model's ``prediction``.
        compose
            How a combination is decoded (see :meth:`vcell.module.CausalVAEModule.counterfactual`): ``"latent"``
            (summed operators and learned interaction, decoded at once), ``"shifts"`` (each component decoded on its
            own from the cell's state, changes added in log1p space), or ``"auto"``: ``"latent"`` for combinations
            with training cells (where the decoder and the interaction term were fitted), ``"shifts"`` for
            combinations never seen in training (whose summed latent lies outside the training region).
        batch_size
            Cells per forward pass.
        modality
            ``"rna"`` (genes, log1p(CP10k)) or, for a model with proteins, ``"prot"``: proteins in
            log1p(counts per 1e4 of the cell's protein library), the transform to evaluate protein truth with
            (``vcell._utils.log1p_cp10k`` of the protein counts).

        Returns
        -------
        Array of shape ``(n_selected_cells, n_genes)`` (``"prot"``: ``(n_selected_cells, n_proteins)``).
        """
        options = {"mode": mode, "compose": compose, "batch_size": batch_size}
        return super().predict(
            adata, perturbation=perturbation, controls=controls, dose=dose, seed=seed, modality=modality, **options
        )

    def _predict_targets(
        self, perturbations: list[str], dose: float, mode: str | None, compose: str
    ) -> tuple[str, list[tuple[str, np.ndarray, np.ndarray, str]]]:
        """:meth:`predict`'s checks of its options and perturbations: the mode and ``(p, target, nodes, compose)``."""
        mode = self.prediction if mode is None else mode
        if mode not in PREDICTION_MODES:
            msg = f"mode must be one of {PREDICTION_MODES}, got {mode!r}"
            raise ValueError(msg)
        if compose not in ("auto", "latent", "shifts"):
            msg = f"compose must be 'auto', 'latent' or 'shifts', got {compose!r}"
            raise ValueError(msg)
        seen = set(self._conditions())
        targets = []
        for p in perturbations:
            target, nodes = self._encode_query([p], float(dose))
            how = ("latent" if p in seen else "shifts") if compose == "auto" else compose
            targets.append((p, target, nodes, how))
        return mode, targets

    def _counterfactuals(
        self,
        adata: AnnData,
        idx: np.ndarray,
        targets: list[tuple[str, np.ndarray, np.ndarray, str]],
        mode: str,
        modalities: Sequence[str],
        batch_size: int,
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """Counterfactuals of cells ``idx`` under each target, one target at a time.

        The cells are read and encoded, and their own state decoded, once for all targets
        (:meth:`~vcell.module.CausalVAEModule.counterfactual_state`, ``batch_size`` cells at a time); each target then
        only decodes its own states.
        """
        m = self.module.eval()
        device = next(m.parameters()).device
        chunks = list(self._chunks(idx, batch_size))
        with torch.no_grad():
            states = [
                m.counterfactual_state(self._batch(adata, c, None, device), mode=mode, modalities=tuple(modalities))
                for c in chunks
            ]
        for p, target, nodes, how in targets:
            out: dict[str, list[np.ndarray]] = {mod: [] for mod in modalities}
            with torch.no_grad():
                for chunk, state in zip(chunks, states, strict=True):
                    rows = torch.as_tensor(np.repeat(target, len(chunk), axis=0)).to(device)
                    extra = torch.as_tensor(np.tile(nodes, (len(chunk), 1))).to(device) if nodes.size else None
                    for mod in modalities:
                        pred = m.counterfactual_from_state(state, rows, extra, mode=mode, compose=how, modality=mod)
                        out[mod].append(pred.cpu().numpy())
            yield p, {mod: join_rows(v) for mod, v in out.items()}

    def _predict(
        self,
        adata: AnnData,
        idx: np.ndarray,
        perturbations: list[str],
        *,
        dose: float,
        seed: int | None,
        modalities: tuple[str, ...],
        mode: str | None = None,
        compose: str = "auto",
        batch_size: int = 2048,
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """:meth:`predict` of every perturbation, the cells encoded once (:meth:`_counterfactuals`)."""
        mode, targets = self._predict_targets(perturbations, dose, mode, compose)
        return self._counterfactuals(adata, idx, targets, mode, modalities, batch_size)

    def _latents(
        self, adata: AnnData, idx: np.ndarray, *, perturbation: str | None = None, dose: float = 1.0
    ) -> np.ndarray:
        """Latent states of cells ``idx``: their own (``perturbation=None``) or their counterfactual under it."""
        self._require_trained()
        m = self.module.eval()
        device = next(m.parameters()).device
        target, nodes = (None, None) if perturbation is None else self._encode_query([str(perturbation)], float(dose))
        out = []
        for chunk in self._chunks(np.asarray(idx), 2048):
            batch = self._batch(adata, chunk, target, device, target_nodes=nodes)
            z = m.latent(batch, full=True) if target is None else m.counterfactual_latent(batch)
            out.append(z.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, m.n_latent), dtype=np.float32)

    def _decode_log1p(self, z: np.ndarray, modality: str = "rna") -> np.ndarray:
        """Decoded mean log1p(CP10k) of latent states ``z`` (rows); ``"prot"``: their proteins (per 1e4)."""
        m = self.module.eval()
        device = next(m.parameters()).device
        decode = m.decode_log1p if modality == "rna" else m.protein_mean_log1p
        with torch.no_grad():
            out = [
                decode(torch.as_tensor(z[i : i + 2048], device=device)).cpu().numpy() for i in range(0, len(z), 2048)
            ]
        width = m.n_genes if modality == "rna" else m.n_proteins
        return np.concatenate(out) if out else np.zeros((0, width), dtype=np.float32)

    def sample(
        self,
        adata: AnnData | MuData | None = None,
        *,
        perturbation: str,
        n_cells: int | None = None,
        controls: Any = None,
        dose: float = 1.0,
        seed: int | None = None,
        batch_size: int = 2048,
    ) -> AnnData:
        """Cells drawn from the model's counterfactual distribution (not just its mean).

        Each sampled cell starts from a control cell: its basal state is encoded, the perturbation swapped, and
        counts are drawn from the decoded (zero-inflated) negative binomial with that cell's library size (or
        log1p(CP10k) values from the decoded Gaussian).

        Parameters
        ----------
        adata
            Data holding the starting cells; ``None`` uses the training data.
        perturbation
            Canonical condition to sample.
        n_cells
            Number of cells; ``None`` draws one per starting cell, else starting cells are drawn with replacement.
        controls
            Cells to start from: ``None`` (all control cells), a boolean mask, indices or obs names.
        dose
            Dose of every component of ``perturbation``.
        seed
            Random seed; ``None`` uses ``vcell.settings.seed``.
        batch_size
            Cells per forward pass.

        Returns
        -------
        A new AnnData (``n_cells`` x genes): ``X`` holds log1p(CP10k) of the samples, ``layers['counts']`` the
        sampled counts (count likelihoods only), ``obs['perturbation']`` / ``obs['vcell_perturbation']`` the
        condition, ``obs['vcell_dose']`` the dose and ``obs['vcell_source_cell']`` the starting cell. A model with
        proteins also sets ``obsm['protein']``: a DataFrame (cells x ``protein_names_``) of protein counts drawn
        from the decoded negative binomial with the starting cell's protein library (the mean library of the
        batch's measured cells for a cell without proteins), in log1p(counts per 1e4 of the protein library).
        """
        import anndata as ad

        check_options(n_cells=n_cells, batch_size=batch_size)
        adata, idx, perturbation, dose = self._query_inputs(adata, perturbation, controls, dose)
        rng = np.random.default_rng(resolve_seed(seed))
        if n_cells is not None:
            idx = rng.choice(idx, size=int(n_cells), replace=True)
        target, nodes = self._encode_query([str(perturbation)], float(dose))
        m = self.module.eval()
        device = next(m.parameters()).device
        counts, logs, proteins = [], [], []
        for chunk in self._chunks(idx, batch_size):
            batch = self._batch(adata, chunk, target, device, target_nodes=nodes)
            p = {k: v.cpu().numpy().astype(np.float64) for k, v in m.generative_params(batch).items()}
            if self.protein_names_:
                rate = rng.gamma(p["protein_theta"], p["protein_mu"] / p["protein_theta"])
                proteins.append(log1p_cp10k(rng.poisson(rate).astype(np.float32)))
            if m.likelihood == "gaussian":
                logs.append(np.clip(rng.normal(p["mean"], p["std"]), 0.0, None).astype(np.float32))
                continue
            rate = rng.gamma(p["theta"], p["mu"] / p["theta"])
            x = rng.poisson(rate).astype(np.float32)
            if m.likelihood == "zinb":
                x[rng.random(x.shape) < 1.0 / (1.0 + np.exp(-p["pi_logits"]))] = 0.0
            counts.append(x)
        obs = sample_obs(str(perturbation), dose, adata.obs_names[idx].to_numpy())
        var = pd.DataFrame(index=adata.var_names.copy())
        if counts:
            C = np.concatenate(counts)
            out = ad.AnnData(X=log1p_cp10k(C), obs=obs, var=var)
            out.layers["counts"] = C
        else:
            out = ad.AnnData(X=np.concatenate(logs), obs=obs, var=var)
        if proteins:
            with_sampled_proteins(out, np.concatenate(proteins), self.protein_names_)
        return out

    def get_latent_representation(
        self,
        adata: AnnData | MuData | None = None,
        *,
        indices: Sequence[int] | None = None,
        kind: str = "basal",
        batch_size: int = 2048,
    ) -> np.ndarray:
        """Posterior-mean latent state of cells.

        Parameters
        ----------
        adata
            Data (same genes as in training); ``None`` uses the training data.
        indices
            Cells to embed; ``None`` for all.
        kind
            ``"basal"``: ``z_basal`` (meant to hold no perturbation or covariate information); ``"full"``:
            ``z_basal`` plus the cells' covariate embeddings and their own perturbation operators.
        batch_size
            Cells per forward pass.

        Returns
        -------
        Array of shape ``(n_cells, n_latent)``.
        """
        if kind not in ("basal", "full"):
            msg = f"kind must be 'basal' or 'full', got {kind!r}"
            raise ValueError(msg)
        adata = self._check_adata(adata)
        idx = np.arange(adata.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
        m = self.module.eval()
        device = next(m.parameters()).device
        out = []
        with torch.no_grad():
            for chunk in self._chunks(idx, batch_size):
                z = m.latent(self._batch(adata, chunk, None, device), full=kind == "full")
                out.append(z.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, m.n_latent), dtype=np.float32)

    def get_perturbation_embedding(
        self, perturbations: Sequence[str] | None = None, *, dose: float | None = None
    ) -> pd.DataFrame:
        """Latent operator of single perturbations (rows), ``z0..`` columns.

        Parameters
        ----------
        perturbations
            Single perturbations; ``None``: every one the module holds (the training perturbations, and the extra
            rows of a ``perturbation_embedding``). With a ``gene_graph`` any graph node can be asked for: a gene never
            seen in training gets the operator its predictions use (from its graph neighbours).
        dose
            ``None``: the operators at full effect (``delta_i``); a dose: ``s_i(dose) delta_i`` (genes unseen in
            training: the mean dose response).
        """
        names = list(self.atoms_) if perturbations is None else self._query(perturbations, what="perturbations")
        if dose is not None:
            dose = check_dose(dose)
        combos = [n for n in names if len(_components(n)) != 1]
        if combos:
            msg = f"get_perturbation_embedding takes single perturbations, got {combos[:5]}"
            raise ValueError(msg)
        enc, nodes = self._encode_query(names, 1.0)
        m = self.module
        with torch.no_grad():
            ops = m.operator_vectors().detach()
            if nodes.size:
                ops = torch.cat([ops, m.perturbation.operators.node_vectors(nodes)])
            col = torch.as_tensor(enc.argmax(1), device=ops.device)
            if dose is not None:
                full = torch.full((1, enc.shape[1]), float(dose), device=ops.device)
                s = torch.cat([m.dose_scale(full[:, : m.n_atoms]), m.perturbation.dose.unseen(full[:, m.n_atoms :])], 1)
                ops = ops * s[0, :, None]
            ops = ops[col]
        return pd.DataFrame(
            ops.cpu().numpy(),
            index=pd.Index(names, name="perturbation"),
            columns=[f"z{i}" for i in range(m.n_latent)],
        )

    def get_dose_response(self) -> pd.DataFrame:
        """Learned dose-response of each perturbation: ``ec50`` and ``slope`` of ``sigmoid(slope (log d - log ec50))``."""
        with torch.no_grad():
            log_ec50, slope = self.module.dose_params()
        return pd.DataFrame(
            {"ec50": np.exp(log_ec50.detach().cpu().numpy()), "slope": slope.detach().cpu().numpy()},
            index=pd.Index(self.atoms_, name="perturbation"),
        )

    def get_interaction_strength(self) -> pd.Series:
        """Size of the learned interaction of each combination seen in training (gate times L2 norm; 0 = additive)."""
        inter = self.module.perturbation.interactions
        with torch.no_grad():
            strength = torch.sigmoid(inter.gate) * inter.effect.norm(dim=1)
        return pd.Series(
            strength.detach().cpu().numpy(), index=pd.Index(self.pairs_, name="perturbation"), name="interaction"
        )

    def get_pathway_loadings(self) -> pd.DataFrame:
        """Learned loadings of the pathway decoder's program factors on the genes (0 off each program).

        The decoder output ``h`` of a cell gains ``loading[g, k] * z_k`` per program factor ``k``: gene logits
        (NB/ZINB, before the softmax over genes) or the mean log1p(CP10k) (Gaussian). Needs ``pathways=``.

        Returns
        -------
        DataFrame of genes (rows) x programs (columns, ``model.pathway_names_``).
        """
        if not self.pathway_names_:
            msg = "this CausalVAE has no pathway decoder: create it with pathways="
            raise ValueError(msg)
        with torch.no_grad():
            loadings = self.module.decoder.loadings[: self.module.n_genes].detach().cpu().numpy()
        return pd.DataFrame(
            loadings, index=pd.Index(self._genes(), name="gene"), columns=pd.Index(self.pathway_names_, name="program")
        )
