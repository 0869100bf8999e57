"""``ResidualDiffusion``: a conditional-mean predictor plus a diffusion model of the residuals around it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from vcell._constants import CONTROL, DOSE_COL, PERT_COL, REGISTRY_KEYS
from vcell._docs import doc_checkpoint_path, doc_params
from vcell._settings import logger, settings
from vcell._utils import get_matrix, group_means, resolve_seed
from vcell.data import iter_row_blocks, log1p_cp10k_block
from vcell.module import BASELINE_METHODS
from vcell.module._residual_diffusion import CONDITION_KEY, RESIDUAL_KEY, ResidualDiffusionModule

from ._base import Capabilities, PerturbationModel, check_hyperparameters, check_options, sample_obs
from ._protein import record_protein, registered_protein, with_sampled_proteins

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData

SPACES = ("pca", "vae")
TAILS = ("empirical", "gaussian", "none")
#: training cells whose out-of-space residuals are kept for ``tail="empirical"``
_N_TAIL = 4000
_MEAN_DIR = "mean_model"
#: fewest cells per context from which ``sample(match_mean=True)`` estimates its per-gene shift
_N_CALIBRATION = 256
#: fewest rows of a block of the streamed residual passes (a Gram update with fewer rows is memory-bound)
_MIN_BLOCK_ROWS = 256
#: fewest control cells per call of the mean model's ``predict`` when a condition's mean is taken in chunks
_MIN_PREDICT_ROWS = 2048


class ResidualDiffusion(PerturbationModel):
    """Conditional mean ``mu(c)`` from any vcell model, plus a conditional diffusion model of ``x - mu(c)``.

    Stage 1 is a mean predictor (default :class:`~vcell.model.CausalVAE`, or a baseline) trained inside or passed in
    trained. For a condition ``c`` (perturbation, dose, context) its conditional mean ``mu(c)`` is the mean of its
    counterfactual predictions of the context's control cells (for controls, their mean). Stage 2 learns the
    distribution of the residuals ``x - mu(c)`` of the training cells (centred per condition, so it learns their
    shape and ``mu(c)`` stays the mean of the samples) with a denoising diffusion model
    (:class:`vcell.module.ResidualDiffusionModule`: cosine schedule, v-prediction, DDIM sampler, optional
    classifier-free guidance) in a low-dimensional space:

    * ``space="pca"``: the top ``n_components`` principal components of the training residuals (standardised;
      from their second moments, read in row blocks: the expression matrix may be sparse or backed);
    * ``space="vae"`` (mean model a CausalVAE): its latent space; a cell's residual is its latent state minus the
      condition's mean counterfactual latent ``z(c)``, mapped back to genes as ``decode(z(c) + r) - decode(z(c))``.

    The diffusion model is conditioned on the condition's mean ``mu(c)`` projected on the principal components of
    the training conditions' means (``n_condition_components``), so any condition the mean model predicts (unseen
    perturbation, unseen cell type) gets a residual distribution; optionally also on a control cell's own residual
    coordinates (``condition_on_control``: training pairs each cell with a random control of its context). What the
    low-dimensional space misses is added back per gene (``tail``): a residual of a random training cell (of the
    same context when there are some) outside the space (``"empirical"``), Gaussian noise of that part's per-gene variance (``"gaussian"``), or nothing.
    A sampled cell is ``max(0, mu(c) + residual)`` in log1p(CP10k).

    :meth:`predict` is the mean model's prediction (deterministic); :meth:`sample` draws cells.

    **RNA + protein** (a MuData registered with ``setup_anndata(mdata, protein_modality="prot")``): both modalities
    are predicted and sampled jointly. The mean model is registered on the same data, proteins included, and must
    predict them (``predict(modality="prot")``, e.g. a CausalVAE on RNA counts; else ValueError at init). ``mu(c)``
    gains a protein part, the mean of the mean model's protein counterfactuals of the context's controls (always
    from ``predict``: a CausalVAE's residual-mode protein counterfactuals keep each control cell's measured
    proteins; for ``control``, the measured controls' mean), in log1p(counts per 1e4 of the protein library). A
    cell's residual is the joint vector ``[x_rna - mu_rna(c), w (x_prot - mu_prot(c))]`` (centred per condition),
    and everything above (residual space, condition vector, tails, ``match_mean``, clipping at 0) works on that
    vector, so sampled cells carry correlated RNA and protein noise. ``w`` (``protein_weight``) balances the two
    blocks; by default it is chosen as in multiple factor analysis, the ratio of the leading singular values of
    the centred RNA and protein residuals, so that the main axis of protein variation weighs as much as the main
    axis of RNA variation: with a per-feature weight of 1, the few proteins would barely enter the top principal
    components of thousands of genes, with equal total variance they would crowd out RNA. With ``space="pca"`` the
    principal components are those of the joint residuals; with ``space="vae"`` the residual is the CausalVAE's
    joint latent state (its encoder reads RNA and proteins) and is decoded to both modalities
    (``decode_prot(z(c) + r) - decode_prot(z(c))`` for proteins). Cells without protein measurement (NaN or
    zero-total rows) train the mean model but not the residual model (space, diffusion model, tails): their
    joint residual is not observed, and imputing it (e.g. with 0, the condition's mean) would shrink the protein
    spread; any control cell still starts samples, and ``condition_on_control`` gives an unmeasured control a
    zero protein residual. :meth:`sample` then also returns the sampled proteins in ``obsm['protein']``.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Registry of a saved model (used by :meth:`load`).
    mean_model
        A vcell model (trained or not) registered on the same genes, the name of a baseline
        (``"mean"``, ``"additive"``, ``"linear"``, ``"control"``) or of a vcell model class (``"CausalVAE"``), built on
        ``adata`` with ``mean_model_kwargs`` (a CausalVAE on log-normalised data defaults to
        ``likelihood="gaussian"``). Saved with the model (:meth:`save`).
    mean_model_kwargs
        Keyword arguments of the mean model's constructor (when built from a name).
    mean_from
        How ``mu(c)`` is read from the mean model: ``"predict"``, the mean of its counterfactual predictions of the
        context's controls; ``"sample"``, the mean of cells it samples from them (a Monte Carlo estimate of
        ``E[log1p(CP10k)]`` under its decoded distribution, ``max(1000, 2 n_controls)`` cells, seeded); ``"auto"``:
        for a mean model with a ``sample`` method, whichever of the two is closer (mean squared error) to the means of
        the perturbed training conditions (``model.mean_source_mse_``; the choice in ``model.mean_from_``), else
        ``"predict"``. A CausalVAE's ``predict`` adds decoded changes of log-means to each control cell's log1p
        expression; on Kang 2018 that mean was as far off as the additive baseline's while its samples matched the
        held-out cells, and on simulated data either one can be closer.
    space
        ``"pca"`` or ``"vae"`` (see above).
    n_components
        Dimension of the residual space with ``space="pca"`` (capped by cells and genes).
    n_condition_components
        Dimension of the condition vector.
    condition_on_control
        Condition the residual also on a control cell (see above).
    tail
        ``"empirical"``, ``"gaussian"`` or ``"none"`` (see above).
    n_hidden, n_layers, dropout
        Width, residual blocks and dropout of the denoiser.
    p_uncond
        Share of training cells whose condition is dropped (classifier-free guidance; 0 disables it).
    protein_weight
        With proteins: weight ``w`` of the protein block in the joint residual (see above); ``None`` (default)
        chooses it when training (``model.protein_weight_``). Unused without proteins.

    Examples
    --------
    Out of distribution: a double perturbation held out by :func:`vcell.bench.split`, sampled from its singles.

    >>> import vcell
    >>> adata = vcell.datasets.simulate(n_cells=300, n_genes=50, n_perturbations=3, n_combos=2, seed=0)
    >>> vcell.bench.split(adata, kind="combo_half", perturbation_key="perturbation", seed=0)
    >>> held = adata.uns["vcell_split"]["held_out"][0]  # a double whose cells are all test cells
    >>> train = adata[adata.obs["vcell_split"] != "test"].copy()  # (models also skip test cells themselves)
    >>> vcell.model.ResidualDiffusion.setup_anndata(train, perturbation_key="perturbation", control="control")
    >>> model = vcell.model.ResidualDiffusion(train, mean_model="additive", n_components=5, n_hidden=32)
    >>> model.train(max_epochs=2, seed=0, trainer_kwargs={"enable_progress_bar": False})
    >>> model.sample(perturbation=held, n_cells=10, seed=0).shape
    (10, 50)
    """

    capabilities = Capabilities(learned=True, can_sample=True, models_proteins=True)

    def __init__(
        self,
        adata: AnnData | MuData | None = None,
        registry: dict | None = None,
        *,
        mean_model: str | PerturbationModel = "CausalVAE",
        mean_model_kwargs: dict | None = None,
        mean_from: str = "auto",
        space: str = "pca",
        n_components: int = 30,
        n_condition_components: int = 16,
        condition_on_control: bool = False,
        tail: str = "empirical",
        n_hidden: int = 256,
        n_layers: int = 3,
        dropout: float = 0.0,
        p_uncond: float = 0.1,
        protein_weight: float | None = None,
    ) -> None:
        check_hyperparameters(
            n_hidden=(n_hidden, "int>=1"),
            n_layers=(n_layers, "int>=0"),
            dropout=(dropout, "[0,1)"),
            p_uncond=(p_uncond, "[0,1]"),
        )
        super().__init__(adata, registry=registry)
        if protein_weight is not None and not float(protein_weight) > 0:
            msg = f"protein_weight must be positive (or None: chosen when training), got {protein_weight!r}"
            raise ValueError(msg)
        self.protein_weight = None if protein_weight is None else float(protein_weight)
        rna = adata.mod["rna"] if adata is not None and hasattr(adata, "mod") else adata
        if space not in SPACES:
            msg = f"space must be one of {SPACES}, got {space!r}"
            raise ValueError(msg)
        if mean_from not in ("auto", "predict", "sample"):
            msg = f"mean_from must be 'auto', 'predict' or 'sample', got {mean_from!r}"
            raise ValueError(msg)
        if tail not in TAILS:
            msg = f"tail must be one of {TAILS}, got {tail!r}"
            raise ValueError(msg)
        if int(n_components) < 1 or int(n_condition_components) < 1:
            msg = f"n_components and n_condition_components must be positive, got {n_components}, {n_condition_components}"
            raise ValueError(msg)
        self.space, self.tail, self.condition_on_control = space, tail, bool(condition_on_control)
        self.mean_model: PerturbationModel | None = None
        if isinstance(mean_model, PerturbationModel):
            mean_cls = _vcell_class(type(mean_model))  # what load() rebuilds (a subclass loads as its vcell class)
            name = mean_model.method if mean_cls.__name__ == "Baseline" else mean_cls.__name__
            self._check_mean_proteins(mean_cls, name)
            if adata is not None:
                self._check_mean_genes(mean_model)
            self.mean_model = mean_model
        else:
            name = str(mean_model)
            mean_cls, kwargs = self._mean_class(name, mean_model_kwargs)
            self._check_mean_proteins(mean_cls, name)
            if adata is not None and registry is None:  # load() restores the saved mean model instead
                mean_cls.setup_anndata(rna, **self.registry_["setup_args"])
                if self.protein_names_:  # the same protein registration (counts already in rna.obsm)
                    manager = mean_cls._get_most_recent_anndata_manager(rna, required=True)
                    record_protein(manager.registry, registered_protein(self.registry_))
                self.mean_model = mean_cls(rna, **kwargs)
        if space == "vae" and mean_cls.__name__ != "CausalVAE":
            msg = f"space='vae' needs a CausalVAE mean model (its latent space), got {name!r}"
            raise ValueError(msg)
        self.mean_model_name_ = name
        can_sample = mean_cls.capabilities.can_sample
        if mean_from == "auto" and not can_sample:
            mean_from = "predict"
        if mean_from == "sample" and not can_sample:
            msg = (
                f"mean_from='sample' needs a mean model with a sample method (capabilities.can_sample), got {name!r}; "
                f"models that can sample: {self._models_that('can_sample')}"
            )
            raise ValueError(msg)
        self.mean_from_ = mean_from
        n_dims = int(n_components)
        if space == "vae":
            n_dims = int(self.mean_model.module.n_latent) if self.mean_model is not None else int(n_components)
        elif adata is not None:
            n_dims = int(min(n_dims, rna.n_obs, rna.n_vars + len(self.protein_names_)))
        self.n_dims_ = n_dims
        self.n_condition = int(n_condition_components)
        n_cond = self.n_condition + (n_dims if self.condition_on_control else 0)
        self.module = ResidualDiffusionModule(
            n_dims, n_cond, n_hidden=n_hidden, n_layers=n_layers, dropout=dropout, p_uncond=p_uncond
        )
        self._model_summary_string = (
            f"ResidualDiffusion: mean model {name}, {space} space of {n_dims} dims, tail={tail!r}, "
            f"condition_on_control={self.condition_on_control}"
        )
        if self.protein_names_:
            self._model_summary_string += f", RNA + {len(self.protein_names_)} proteins ({self.protein_modality_!r})"
        self.init_params_ = self._get_init_params(locals())
        self.init_params_["non_kwargs"]["mean_model"] = name  # the model itself is saved beside (save())
        if space == "vae":  # load() rebuilds the module before the mean model is back: keep its size
            self.init_params_["non_kwargs"]["n_components"] = n_dims

    # ------------------------------------------------------------------ mean model
    def _mean_class(self, name: str, kwargs: dict | None) -> tuple[type, dict]:
        from vcell import model as vmodel

        kwargs = dict(kwargs or {})
        if name in BASELINE_METHODS:
            return vmodel.Baseline, {"method": name, **kwargs}
        cls = getattr(vmodel, name, None)
        if not (isinstance(cls, type) and issubclass(cls, PerturbationModel)) or cls in (
            PerturbationModel,
            type(self),
            vmodel.Baseline,
        ):
            msg = (
                f"unknown mean_model {name!r}: give a vcell model, a baseline name {BASELINE_METHODS} "
                "or a vcell.model class name such as 'CausalVAE'"
            )
            raise ValueError(msg)
        if name == "CausalVAE" and not self.counts_:
            kwargs.setdefault("likelihood", "gaussian")
        return cls, kwargs

    def _check_mean_genes(self, model: PerturbationModel) -> None:
        """ValueError unless ``model`` has the model's genes (and proteins)."""
        genes = getattr(model, "var_names_", None)
        if genes is not None and list(genes) != list(self.var_names_):
            msg = "mean_model was set up on other genes (or another gene order) than adata"
            raise ValueError(msg)
        if self.protein_names_ and list(getattr(model, "protein_names_", [])) != self.protein_names_:
            msg = (
                f"mean_model was set up without the proteins of adata ({self.protein_names_[:5]} ...): register it "
                f"with setup_anndata(mdata, protein_modality={self.protein_modality_!r}) on the same MuData"
            )
            raise ValueError(msg)

    def _check_mean_proteins(self, mean_cls: type, name: str) -> None:
        """ValueError when the model has proteins and the mean model (class ``mean_cls``) cannot predict them."""
        if not self.protein_names_:
            return
        if not mean_cls.capabilities.models_proteins:
            msg = (
                f"mean_model {name!r} cannot predict proteins (no predict(modality='prot')), but the data were "
                f"registered with protein_modality={self.protein_modality_!r}: use a mean model that models proteins "
                "(e.g. 'CausalVAE' on RNA counts), or register the data without proteins"
            )
            raise ValueError(msg)
        if name == "CausalVAE" and not self.counts_:
            msg = (
                "with proteins the CausalVAE mean model needs RNA counts (it models proteins with a negative "
                "binomial): register a counts layer, or use another mean model that predicts proteins"
            )
            raise ValueError(msg)

    def _require_trained(self) -> None:
        super()._require_trained()
        if self.mean_model is None:
            msg = "the ResidualDiffusion model has no mean model: call model.train() before predicting or sampling"
            raise RuntimeError(msg)

    def _condition_mean(
        self, adata: AnnData, perturbation: str, dose: float, controls: np.ndarray, source: str | None = None
    ) -> np.ndarray:
        """``mu(c)`` from ``controls`` (see ``mean_from``; the controls' mean for ``control``), log1p(CP10k)."""
        if perturbation == CONTROL:
            return self._cells_mean(adata, controls)
        if (source or self.mean_from_) == "sample":
            n = max(1000, 2 * len(controls))
            cells = self.mean_model.sample(
                adata, perturbation=perturbation, n_cells=n, controls=controls, dose=dose, seed=0
            )
            return np.asarray(cells.X, dtype=np.float64).mean(0)
        return self._predicted_mean(adata, perturbation, dose, controls)

    def _predicted_mean(
        self, adata: AnnData, perturbation: str, dose: float, controls: np.ndarray, modality: str = "rna"
    ) -> np.ndarray | None:
        """Mean of the mean model's counterfactuals of ``controls`` (float64; ``None`` when no row is finite).

        ``"prot"``: rows with NaN (cells the mean model predicts no proteins for) are left out. The controls are
        predicted in chunks of ``max(2048, chunk_elements / genes)`` cells, so memory holds one chunk's predictions.
        """
        kw = {"modality": "prot"} if modality == "prot" else {}  # RNA: the call of RNA-only mean models too
        controls = np.asarray(controls)
        step = max(_MIN_PREDICT_ROWS, settings.chunk_elements // max(len(self.var_names_), 1))
        total, n = None, 0
        for start in range(0, len(controls), step):
            part = controls[start : start + step]
            pred = self.mean_model.predict(adata, perturbation=perturbation, controls=part, dose=dose, **kw)
            pred = np.asarray(pred, dtype=np.float64)
            if modality == "prot":
                pred = pred[np.isfinite(pred).all(1)]
            if len(controls) <= step:  # one call: numpy's mean of it
                return pred.mean(0) if len(pred) else None
            total = pred.sum(0) if total is None else total + pred.sum(0)
            n += len(pred)
        return total / n if n else None

    def _predicted_means(
        self, adata: AnnData, perturbations: list[str], dose: float, controls: np.ndarray
    ) -> list[np.ndarray]:
        """:meth:`_predicted_mean` (RNA) of several perturbations from the same ``controls``, in their order.

        The same numbers as one :meth:`_predicted_mean` call per perturbation, but the mean model reads (and encodes)
        each chunk of controls once for all of them (its ``predict_many``): training needs a mean per condition and
        context, and reading the context's controls once per condition made this cost conditions x controls reads.
        """
        controls = np.asarray(controls)
        step = max(_MIN_PREDICT_ROWS, settings.chunk_elements // max(len(self.var_names_), 1))
        totals: list[np.ndarray | None] = [None] * len(perturbations)
        for start in range(0, len(controls), step):
            part = controls[start : start + step]
            stream = self.mean_model.predict_many(adata, perturbations=perturbations, controls=part, dose=dose)
            for i, (_, pred) in enumerate(stream):
                pred = np.asarray(pred, dtype=np.float64)
                if len(controls) <= step:  # one chunk: numpy's mean of it, as _predicted_mean
                    totals[i] = pred.mean(0)
                else:
                    totals[i] = pred.sum(0) if totals[i] is None else totals[i] + pred.sum(0)
        if len(controls) <= step:
            return totals
        return [t / len(controls) for t in totals]

    def _condition_protein_mean(
        self, adata: AnnData, perturbation: str, dose: float, controls: np.ndarray
    ) -> np.ndarray:
        """Protein part of ``mu(c)``: mean protein counterfactual of ``controls`` (log1p(counts per 1e4)).

        Always from the mean model's ``predict(modality="prot")`` (rows it leaves NaN are skipped); for ``control``,
        the mean of the measured controls (the mean model's prediction when none is measured).
        """
        if perturbation == CONTROL:
            P = self._protein_expression(adata, controls).astype(np.float64)
            seen = np.isfinite(P).all(1)
            if seen.any():
                return P[seen].mean(0)
        mean = self._predicted_mean(adata, perturbation, dose, controls, "prot")
        if mean is None:
            msg = f"the mean model predicts no finite protein values for {perturbation!r} from these controls"
            raise ValueError(msg)
        return mean

    def _choose_mean_source(
        self,
        adata: AnnData,
        targets: np.ndarray,
        groups: dict,
        ctrl_of: dict,
        all_controls: np.ndarray,
        means: list[np.ndarray],
    ) -> str:
        """``mean_from="auto"``: the source whose ``mu(c)`` is closer to the training conditions' means (``targets``).

        ``means`` (computed with ``"predict"``) is replaced in place when ``"sample"`` wins; both errors go to
        ``mean_source_mse_``.
        """
        errors = {"predict": [], "sample": []}
        sampled = []
        for g, (p, d, k) in enumerate(groups):
            controls = ctrl_of[k] if len(ctrl_of[k]) else all_controls
            if p == CONTROL:  # the controls' mean whatever the source
                sampled.append(means[g])
                continue
            sampled.append(self._condition_mean(adata, p, d, controls, "sample"))
            errors["predict"].append(np.mean((means[g] - targets[g]) ** 2))
            errors["sample"].append(np.mean((sampled[g] - targets[g]) ** 2))
        self.mean_source_mse_ = {k: float(np.mean(v)) if v else float("nan") for k, v in errors.items()}
        if errors["sample"] and self.mean_source_mse_["sample"] < self.mean_source_mse_["predict"]:
            means[:] = sampled
            return "sample"
        return "predict"

    def _condition_latent(self, adata: AnnData, perturbation: str, dose: float, controls: np.ndarray) -> np.ndarray:
        """``z(c)``: mean counterfactual latent state of ``controls`` (``space="vae"``)."""
        pert = None if perturbation == CONTROL else perturbation
        return self.mean_model._latents(adata, controls, perturbation=pert, dose=dose).mean(0)

    # ------------------------------------------------------------------ spaces
    def _project_condition(self, means: np.ndarray) -> np.ndarray:
        return ((means - self.cond_mean_) @ self.cond_components_.T / self.cond_scale_).astype(np.float32)

    def _to_genes(self, coords: np.ndarray, z_ref: np.ndarray | None) -> np.ndarray:
        """Gene-space residuals of standardised coordinates (``z_ref``: each row's condition latent, ``vae``).

        With proteins: the joint residuals ``[genes, w * proteins]``.
        """
        y = coords * self.coord_scale_
        if self.space == "pca":
            return y @ self.pca_components_ + self.pca_mean_
        z, z0 = (z_ref + y).astype(np.float32), z_ref.astype(np.float32)
        genes = self.mean_model._decode_log1p(z) - self.mean_model._decode_log1p(z0)
        if not self.protein_names_:
            return genes
        decode = self.mean_model._decode_log1p
        prot = decode(z, "prot").astype(np.float64) - decode(z0, "prot").astype(np.float64)
        return np.concatenate([genes, self.protein_weight_ * prot], axis=1)

    def _unscale(self, Y: np.ndarray) -> np.ndarray:
        """Joint residuals ``[genes, w * proteins]`` back in the proteins' own units (itself without proteins)."""
        if not self.protein_names_:
            return Y
        Y = np.array(Y, dtype=np.float64)
        Y[:, len(self.var_names_) :] /= self.protein_weight_
        return Y

    def _tail(self, ctx: np.ndarray, rng: np.random.Generator) -> np.ndarray | float:
        """Out-of-space residuals of cells of contexts ``ctx`` (see ``tail`` in the class docstring).

        ``"empirical"``: kept training residuals of the same context where there are some, else of any context.
        """
        n = len(ctx)
        if self.tail == "gaussian":
            return rng.normal(size=(n, len(self.tail_std_))) * self.tail_std_
        if self.tail == "none":
            return 0.0
        rows = rng.integers(len(self.tail_), size=n)
        for k in np.unique(ctx):
            own = np.flatnonzero(self.tail_context_ == k)
            if len(own):
                cells = np.flatnonzero(ctx == k)
                rows[cells] = own[rng.integers(len(own), size=len(cells))]
        return self.tail_[rows].astype(np.float64)

    # ------------------------------------------------------------------ streamed reads
    def _matrix(self, adata: AnnData) -> Any:
        """The registered expression matrix of ``adata`` (the registry's field for the training data), as stored."""
        if adata is self.adata:
            return self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        return get_matrix(adata, self._layer())

    def _dense_log1p(self, block: np.ndarray | sparse.csr_matrix) -> np.ndarray:
        """Rows read from the registered matrix as dense float64 log1p(CP10k): :meth:`_expression`'s values."""
        if self.counts_:
            block = log1p_cp10k_block(block)  # float32, as _expression's
        if sparse.issparse(block):
            return block.astype(np.float32).astype(np.float64).toarray()
        return np.asarray(block, dtype=np.float32).astype(np.float64)

    def _expression_blocks(self, adata: AnnData, rows: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """log1p(CP10k) expression of cells ``rows`` in row blocks: ``(start, stop, E)``, ``E`` of ``rows[start:stop]``.

        ``E`` is dense float64 with the values of :meth:`_expression`. A block has a quarter of
        ``vcell.settings.chunk_elements`` values (at least 256 rows: the Gram updates stay compute-bound), so the
        float64 arrays computed from it stay small. Increasing ``rows`` that cover over half of the matrix are read
        in contiguous blocks of all rows (the fast path of a backed matrix), the others dropped.
        """
        X = self._matrix(adata)
        n_obs, n_vars = X.shape
        rows = np.asarray(rows, dtype=np.int64)
        chunk = max(_MIN_BLOCK_ROWS, settings.chunk_elements // 4 // max(n_vars, 1)) * max(n_vars, 1)
        if rows.size > n_obs // 2 and np.all(np.diff(rows) > 0):
            pos = np.full(n_obs, -1, dtype=np.int64)
            pos[rows] = np.arange(rows.size)
            for lo, hi, block in iter_row_blocks(X, chunk_elements=chunk):
                keep = np.flatnonzero(pos[lo:hi] >= 0)
                if keep.size:
                    block = block if keep.size == hi - lo else block[keep]
                    yield int(pos[lo + keep[0]]), int(pos[lo + keep[-1]]) + 1, self._dense_log1p(block)
            return
        for start, stop, block in iter_row_blocks(X, rows=rows, chunk_elements=chunk):
            yield start, stop, self._dense_log1p(block)

    def _cells_mean(self, adata: AnnData, cells: np.ndarray) -> np.ndarray:
        """Mean log1p(CP10k) expression of ``cells`` (float64), read in row blocks."""
        total = np.zeros(adata.n_vars)
        for _, _, E in self._expression_blocks(adata, cells):
            total += E.sum(0)
        return total / max(len(cells), 1)

    def _residual_blocks(
        self, adata: AnnData, cells: np.ndarray, centre: np.ndarray, group_of: np.ndarray
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Gene residuals ``E - centre[group]`` of ``cells`` in row blocks (float64): ``(start, stop, R)``."""
        for start, stop, E in self._expression_blocks(adata, cells):
            E -= centre[group_of[start:stop]]
            yield start, stop, E

    # ------------------------------------------------------------------ training
    @doc_params(doc_checkpoint_path=doc_checkpoint_path)
    def train(
        self,
        max_epochs: int = 300,
        lr: float = 1e-3,
        batch_size: int = 256,
        accelerator: str = "auto",
        devices: int | str = "auto",
        early_stopping: bool = True,
        seed: int | None = None,
        trainer_kwargs: dict | None = None,
        *,
        weight_decay: float = 0.0,
        validation_fraction: float = 0.1,
        early_stopping_patience: int = 30,
        mean_train_kwargs: dict | None = None,
        strategy: str | Any = "auto",
        num_nodes: int = 1,
        shuffle: str = "auto",
        checkpoint_path: str | None = None,
    ) -> None:
        """Train the mean model (unless it is trained already), then the residual diffusion model.

        Cells with ``obs['vcell_split'] == 'test'`` are never used. The diffusion model holds out a seeded
        ``validation_fraction`` of the cells for its validation loss (computed with fixed noise, so epochs compare).
        Every statistic over the training cells (condition means, the residual space and its coordinates, tails) is
        computed from the registered matrix in row blocks (dense, sparse or backed: never densified whole); memory
        holds a block, a genes x genes matrix (``space="pca"``) and the cells' low-dimensional coordinates.

        Parameters
        ----------
        max_epochs, lr, batch_size
            Of the diffusion model (AdamW).
        accelerator, devices
            Passed to :class:`lightning.Trainer`.
        early_stopping
            Stop the diffusion model when its validation loss has not improved for ``early_stopping_patience``
            epochs and keep its best weights.
        seed
            Random seed (mean model too, unless ``mean_train_kwargs`` has one); ``None`` uses ``vcell.settings.seed``.
        trainer_kwargs
            Further :class:`lightning.Trainer` arguments of the diffusion model.
        weight_decay
            AdamW weight decay.
        validation_fraction
            Share of cells held out for the diffusion model's validation loss.
        early_stopping_patience
            Epochs without improvement before stopping.
        mean_train_kwargs
            Arguments of the mean model's ``train`` (when it is not trained yet), e.g. its own ``strategy``.
        strategy, num_nodes
            Passed to :class:`lightning.Trainer` (diffusion model): ``strategy="ddp", devices=N, num_nodes=M``
            trains in ``N * M`` processes, each reading its own share of every epoch (:class:`vcell.data.CellBatches`).
        shuffle
            Order of the training cells: ``"full"`` (a new permutation per epoch), ``"block"`` (permuted blocks of
            consecutive cells, then cells within windows: contiguous reads from disk) or ``"auto"`` (``"block"`` for
            a backed AnnData, else ``"full"``). The diffusion model trains on the cells' coordinates, which are in
            memory: ``"auto"`` is ``"full"``.
        {doc_checkpoint_path}

        Sets the following fields
        -------------------------
        ``model.history_``
            Per-epoch ``train_loss`` / ``val_loss`` of the diffusion model: dict of DataFrames indexed by epoch.
        ``model.residual_variance_explained_``
            Share of the training residuals' variance inside the low-dimensional space (joint residuals
            ``[genes, w * proteins]`` with proteins).
        ``model.protein_weight_``, ``model.n_protein_cells_``
            With proteins: the weight ``w`` of the protein block and the number of training cells with measured
            proteins (those the residual model fits).
        """
        import lightning

        from vcell.data import CellBatches, Lookup
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
        adata = self.adata
        if not self.mean_model.is_trained_:
            self.mean_model.train(**{"seed": seed, **(mean_train_kwargs or {})})
        lightning.seed_everything(seed, verbose=False)
        if not self.is_trained_:
            self.module.reset_parameters()
        rng = np.random.default_rng(seed)
        cells = self._non_test_cells(adata)
        pert = adata.obs[PERT_COL].astype(str).to_numpy()[cells]
        dose = adata.obs[DOSE_COL].to_numpy(dtype=np.float64)[cells]
        ctx = self._contexts(adata)[cells]
        is_ctrl = pert == CONTROL
        if not is_ctrl.any():
            msg = f"no control cells in the training data (obs[{PERT_COL!r}] == {CONTROL!r})"
            raise ValueError(msg)
        groups = pd.DataFrame({"p": pert, "d": dose, "k": ctx}).groupby(["p", "d", "k"], sort=True).indices
        group_of = np.zeros(len(cells), dtype=np.int64)
        for g, rows in enumerate(groups.values()):
            group_of[rows] = g
        ctrl_of = {k: cells[is_ctrl & (ctx == k)] for k in np.unique(ctx)}
        fit_rows, P = np.arange(len(cells)), None
        if self.protein_names_:  # the residual model fits the cells with measured proteins
            P = self._protein_expression(adata, cells).astype(np.float64)
            fit_rows = np.flatnonzero(np.isfinite(P).all(1))
            self._check_protein_cells(fit_rows, is_ctrl)
        targets, fit_means, ctrl_means = self._group_expression(
            adata, cells, group_of, len(groups), fit_rows, ctx, is_ctrl
        )
        means, pmeans, latents = [], [], []
        source = "predict" if self.mean_from_ == "auto" else self.mean_from_
        predicted: dict[tuple, np.ndarray] = {}
        if source == "predict":  # the conditions of one context and dose from one read of its controls
            batches: dict[tuple, list[str]] = {}
            for p, d, k in groups:
                if p != CONTROL:
                    batches.setdefault((k, d), []).append(p)
            for (k, d), perts in batches.items():
                controls = ctrl_of[k] if len(ctrl_of[k]) else cells[is_ctrl]
                for p, mean in zip(perts, self._predicted_means(adata, perts, d, controls), strict=True):
                    predicted[p, d, k] = mean
        for p, d, k in groups:
            controls = ctrl_of[k] if len(ctrl_of[k]) else cells[is_ctrl]
            if p == CONTROL:
                means.append(ctrl_means[k])
            else:
                means.append(
                    predicted[p, d, k] if source == "predict" else self._condition_mean(adata, p, d, controls, source)
                )
            if self.protein_names_:
                pmeans.append(self._condition_protein_mean(adata, p, d, controls))
            if self.space == "vae":
                latents.append(self._condition_latent(adata, p, d, controls))
        if self.mean_from_ == "auto":
            self.mean_from_ = self._choose_mean_source(adata, targets, groups, ctrl_of, cells[is_ctrl], means)
        M = np.stack(means)
        Z = np.stack(latents) if latents else None
        # residuals centred per condition: E - M[c] - mean over c's cells of (E - M[c]), i.e. E - (c's mean of E).
        # The diffusion model learns shapes, not the mean model's in-sample errors (which it would carry over to
        # unseen conditions, and which tails of other conditions would add back).
        present, centre, Rp = np.arange(len(M)), targets, None  # conditions of the cells the residual model fits
        if self.protein_names_:  # joint residuals [genes, w * proteins] of the cells with measured proteins
            present, group_fit = np.unique(group_of[fit_rows], return_inverse=True)
            Mp = np.stack(pmeans)
            Rp = P[fit_rows] - Mp[group_of[fit_rows]]
            Rp -= group_means(Rp, group_fit).to_numpy()[group_fit]
            cells, ctx, is_ctrl, group_of = cells[fit_rows], ctx[fit_rows], is_ctrl[fit_rows], group_fit
            centre, Z = fit_means[present], None if Z is None else Z[present]
            self.n_protein_cells_ = len(fit_rows)

        def blocks() -> Iterator[tuple[int, int, np.ndarray]]:  # one pass over the residuals per call
            return self._residual_blocks(adata, cells, centre, group_of)

        gram = None
        if self.space == "pca" or (Rp is not None and self.protein_weight is None):
            gram = _residual_gram(blocks(), len(self.var_names_), Rp, cross=self.space == "pca")
        if Rp is not None:
            self.protein_weight_ = self.protein_weight or _block_weight_gram(gram, Rp)
            M = np.concatenate([M, self.protein_weight_ * Mp], axis=1)
        if self.space == "pca":
            # the PCA solver once drew a seed here: the draw is kept so a seed gives the same pairs, tails and split
            rng.integers(2**31)
            self._fit_pca(gram, Rp)
        del gram
        Y = None
        if self.space == "vae":  # latent states around the condition's mean counterfactual latent, centred
            Y = self.mean_model._latents(adata, cells) - Z[group_of]
            Y -= group_means(Y, group_of).to_numpy()[group_of]
            self.coord_scale_ = np.maximum(Y.std(0), 1e-6)
            Y = Y / self.coord_scale_
        partner = None
        if self.condition_on_control:
            partner = np.zeros(len(cells), dtype=np.int64)
            for k in np.unique(ctx):  # a random control of the same context (any control if it has none)
                rows, pool = np.flatnonzero(ctx == k), np.flatnonzero(is_ctrl & (ctx == k))
                pool = pool if len(pool) else np.flatnonzero(is_ctrl)
                partner[rows] = rng.choice(pool, size=len(rows))
        keep = np.sort(rng.choice(len(cells), size=min(_N_TAIL, len(cells)), replace=False))
        coords = self._fit_residuals(blocks(), Rp, group_of, Z, Y, keep)
        self.tail_context_ = ctx[keep].astype(str)
        self._fit_conditions(M)
        cond = self._project_condition(M)[present]  # one row per condition group
        if partner is not None:
            cond = torch.as_tensor(np.concatenate([cond[group_of], coords[partner]], axis=1))
        else:  # the group's row for every cell: its distinct rows and a code per cell
            cond = Lookup(torch.as_tensor(cond), group_of)
        # per-cell setup arrays not needed while training (a few hundred bytes per cell at most)
        del pert, dose, ctx, is_ctrl, partner, ctrl_of, groups, fit_rows

        tensors = {RESIDUAL_KEY: torch.as_tensor(coords, dtype=torch.float32), CONDITION_KEY: cond}
        order = rng.permutation(len(cells))
        n_val = int(round(validation_fraction * len(cells))) if len(cells) >= 20 else 0
        train_idx, val_idx = np.sort(order[n_val:]), np.sort(order[:n_val])
        train_dl = CellBatches(tensors, train_idx, batch_size=batch_size, shuffle=shuffle, seed=seed)
        val_dl = CellBatches(tensors, val_idx, batch_size=max(batch_size, 2048), shuffle=False, seed=seed)
        plan = TrainingPlan(
            self.module, lr=lr, weight_decay=weight_decay, monitor="val_loss" if n_val else "train_loss"
        )
        self.best_epoch_ = fit(
            plan,
            train_dl,
            val_dl if n_val else None,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            checkpoint_path=checkpoint_path,
            early_stopping=early_stopping and n_val > 0,
            early_stopping_patience=early_stopping_patience,
            trainer_kwargs=trainer_kwargs,
        )
        self.module.eval()
        self.is_trained_ = True
        hist = pd.DataFrame(plan.history).set_index("epoch") if plan.history else pd.DataFrame()
        self.history_ = {col: hist[[col]] for col in hist.columns}
        logger.info("ResidualDiffusion: diffusion model trained for %d epochs", len(plan.history))

    def _check_protein_cells(self, fit_rows: np.ndarray, is_ctrl: np.ndarray) -> None:
        """ValueError when too few training cells have measured proteins for the joint residual model."""
        if len(fit_rows) < 2:
            msg = (
                f"only {len(fit_rows)} training cell(s) have measured proteins (mdata[{self.protein_modality_!r}] "
                "rows without NaN and with a positive total): the joint residual model needs at least 2"
            )
            raise ValueError(msg)
        if self.condition_on_control and not is_ctrl[fit_rows].any():
            msg = "condition_on_control=True needs control cells with measured proteins among the training cells"
            raise ValueError(msg)

    def _group_expression(
        self,
        adata: AnnData,
        cells: np.ndarray,
        group_of: np.ndarray,
        n_groups: int,
        fit_rows: np.ndarray,
        ctx: np.ndarray,
        is_ctrl: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, dict]:
        """Mean expression of the training cells, in one pass over their rows.

        Returns ``(targets, fit_means, ctrl_means)``: per condition group the mean of its cells and of its cells
        ``fit_rows`` (0 where it has none), and per context the mean of its control cells (of all controls for a
        context without any).
        """
        n = len(cells)
        contexts = np.unique(ctx)
        fit_all = len(fit_rows) == n
        ctrl = np.flatnonzero(is_ctrl)
        ctrl_ctx = pd.Index(contexts).get_indexer(ctx[ctrl])
        rows = [group_of]
        cols = [np.arange(n)]
        offset = n_groups
        if not fit_all:
            rows.append(offset + group_of[fit_rows])
            cols.append(fit_rows)
            offset += n_groups
        rows += [offset + ctrl_ctx, np.full(len(ctrl), offset + len(contexts))]
        cols += [ctrl, ctrl]
        r, c = np.concatenate(rows), np.concatenate(cols)
        W = sparse.csc_matrix((np.ones(len(r)), (r, c)), shape=(offset + len(contexts) + 1, n))
        sums = np.zeros((W.shape[0], adata.n_vars))
        for start, stop, E in self._expression_blocks(adata, cells):
            sums += W[:, start:stop] @ E
        means = sums / np.maximum(np.asarray(W.sum(axis=1)), 1.0)
        targets = means[:n_groups]
        fit_means = targets if fit_all else means[n_groups : 2 * n_groups]
        ctrl_counts = np.bincount(ctrl_ctx, minlength=len(contexts))
        ctrl_means = {
            k: means[offset + i] if ctrl_counts[i] else means[offset + len(contexts)] for i, k in enumerate(contexts)
        }
        return targets, fit_means, ctrl_means

    def _fit_pca(self, gram: dict[str, np.ndarray], Rp: np.ndarray | None) -> None:
        """Principal components of the (joint) residuals from their streamed second moments.

        The solver of scikit-learn's ``PCA(svd_solver="covariance_eigh")``: eigenvectors of the covariance matrix,
        each signed so that its largest entry (in absolute value) is positive (``svd_flip``); rows beyond
        ``min(cells, features)`` (fewer than ``n_components``) are zero. Exact where scikit-learn's ``"auto"`` solver
        picked a randomized SVD (more than 1,000 features, or fewer than 10 cells per feature).
        """
        G, sums, n = gram["gram"], gram["sums"], gram["n"]
        if n < 2:
            msg = f"the residual space needs at least 2 training cells, got {n}"
            raise ValueError(msg)
        if Rp is not None:  # joint [genes, w * proteins]: scale the protein rows and columns of the moments
            w, g = self.protein_weight_, G.shape[0]
            joint = np.empty((g + Rp.shape[1],) * 2)
            joint[:g, :g] = G
            joint[:g, g:] = w * gram["cross"]
            joint[g:, :g] = joint[:g, g:].T
            joint[g:, g:] = w * w * (Rp.T @ Rp)
            G, sums = joint, np.concatenate([sums, w * Rp.sum(0)])
        n_features = G.shape[0]
        mean = sums / n
        C = G  # the moments are not needed after this: centred and scaled in place
        for i in range(0, n_features, 256):  # C = (G - n mean mean^T) / (n - 1), in place by row blocks
            C[i : i + 256] -= n * mean[i : i + 256, None] * mean[None, :]
        C /= n - 1
        k = int(min(self.n_dims_, n, n_features))
        comps = np.zeros((self.n_dims_, n_features))
        comps[:k] = _top_eigenvectors(C, k)
        self.pca_components_, self.pca_mean_ = comps, mean

    def _fit_residuals(
        self,
        blocks: Iterator[tuple[int, int, np.ndarray]],
        Rp: np.ndarray | None,
        group_of: np.ndarray,
        Z: np.ndarray | None,
        coords: np.ndarray | None,
        keep: np.ndarray,
    ) -> np.ndarray:
        """Standardised coordinates of the training cells (float32), from one pass over their residuals.

        ``coords`` are given for ``space="vae"`` (float64); with ``space="pca"`` they are the projections on
        ``pca_components_`` (``coord_scale_`` is set here). Also sets the tails (residuals outside the space):
        ``tail_`` (those of the cells ``keep``), ``tail_std_`` and ``residual_variance_explained_``.
        """
        pca = self.space == "pca"
        n_features = len(self.var_names_) + (0 if Rp is None else Rp.shape[1])
        Y = np.zeros((len(group_of), self.n_dims_)) if pca else None
        tail = np.zeros((len(keep), n_features), dtype=np.float32)
        r_moments, t_moments = _Moments(n_features), _Moments(n_features)
        for start, stop, R in blocks:
            if Rp is not None:
                R = np.concatenate([R, self.protein_weight_ * Rp[start:stop]], axis=1)
            r_moments.add(R)
            if pca:
                R -= self.pca_mean_
                Y[start:stop] = R @ self.pca_components_.T
                R -= Y[start:stop] @ self.pca_components_  # R - (mean + projection): the tail
            else:
                R -= self._to_genes(coords[start:stop], Z[group_of[start:stop]])
            t_moments.add(R)
            lo, hi = np.searchsorted(keep, [start, stop])
            tail[lo:hi] = R[keep[lo:hi] - start]
        if pca:
            self.coord_scale_ = np.maximum(Y.std(0), 1e-6)
            Y /= self.coord_scale_  # in place: the same values as Y / scale, without a second float64 copy
            coords = Y
        self.tail_ = tail
        self.tail_std_ = np.sqrt(t_moments.var()).astype(np.float32)
        self.residual_variance_explained_ = float(1.0 - t_moments.var().sum() / max(r_moments.var().sum(), 1e-12))
        return coords.astype(np.float32)

    def _fit_conditions(self, M: np.ndarray) -> None:
        """Principal components of the training conditions' means: the condition vector's axes."""
        n = self.n_condition
        self.cond_mean_ = M.mean(0)
        comps = np.zeros((n, M.shape[1]))
        if len(M) > 1:
            _, s, vt = np.linalg.svd(M - self.cond_mean_, full_matrices=False)
            k = min(n, int((s > 1e-8 * max(s[0], 1e-12)).sum()))
            comps[:k] = vt[:k]
        self.cond_components_ = comps
        proj = (M - self.cond_mean_) @ comps.T
        self.cond_scale_ = float(max(proj[:, 0].std(), 1e-6)) if len(M) > 1 else 1.0

    # ------------------------------------------------------------------ inference
    def predict(
        self,
        adata: AnnData | MuData | None = None,
        *,
        perturbation: str,
        controls: Any = None,
        dose: float = 1.0,
        seed: int | None = None,
        modality: str = "rna",
    ) -> np.ndarray:
        """The mean model's counterfactual prediction of control cells (deterministic; float32, in ``space``).

        Parameters
        ----------
        adata
            Data holding the starting cells; ``None`` uses the training data.
        perturbation
            Canonical condition, e.g. ``"IFNb"`` or ``"A+B"``.
        controls
            Cells to start from: ``None`` (all control cells), a boolean mask, indices or obs names.
        dose
            Dose of the perturbation.
        seed
            Passed to the mean model.
        modality
            ``"rna"`` (genes) or, for a model with proteins, ``"prot"``: the mean model's protein counterfactuals in
            log1p(counts per 1e4 of the protein library).
        space
            Expression space of the returned RNA (:meth:`vcell.model.PerturbationModel.predict`): ``None`` (the model's
            ``output_space``), ``"log1p_cp10k"``, ``"median"``, ``"model"``, a target sum or an ``ExpressionSpace``.

        Returns
        -------
        Array of shape ``(n_selected_cells, n_genes)`` (``"prot"``: ``(n_selected_cells, n_proteins)``).
        """
        return super().predict(
            adata, perturbation=perturbation, controls=controls, dose=dose, seed=seed, modality=modality
        )

    def _predict(
        self,
        adata: AnnData,
        idx: np.ndarray,
        perturbations: list[str],
        *,
        dose: float,
        seed: int | None,
        modalities: tuple[str, ...],
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """:meth:`predict` of every perturbation: the mean model's batched predictions."""
        return self.mean_model._predict_many(
            adata, perturbations, controls=idx, dose=dose, seed=seed, modalities=modalities
        )

    def sample(
        self,
        adata: AnnData | MuData | None = None,
        *,
        perturbation: str,
        n_cells: int | None = None,
        controls: Any = None,
        dose: float = 1.0,
        seed: int | None = None,
        n_steps: int = 50,
        eta: float = 0.0,
        guidance_scale: float = 0.0,
        match_mean: bool = True,
        batch_size: int = 4096,
    ) -> AnnData:
        """Cells drawn from the model: ``max(0, mu(c) + residual)`` for the context of each starting control cell.

        Parameters
        ----------
        adata
            Data holding the starting cells; ``None`` uses the training data.
        perturbation
            Canonical condition to sample (``"control"`` samples the controls' distribution).
        n_cells
            Number of cells; ``None`` draws one per starting cell, else starting cells are drawn with replacement.
        controls
            Cells to start from: ``None`` (all control cells), a boolean mask, indices or obs names. Their context
            (covariates) sets ``mu(c)``, the mean counterfactual of the selected controls of that context.
        dose
            Dose of every component of ``perturbation``.
        seed
            Random seed; ``None`` uses ``vcell.settings.seed``.
        n_steps
            DDIM steps (fewer: faster, coarser).
        eta
            DDIM stochasticity (0 deterministic given the starting noise).
        guidance_scale
            Classifier-free guidance weight (0: none).
        match_mean
            Shift each gene's values of a context before clipping at 0 so that the samples' mean is ``mu(c)``
            (bisection per gene, on the context's samples, or on at least 256 extra draws when there are fewer).
            Clipping alone raises the mean of lowly expressed genes: on Kang 2018 with B cells held out it moved the
            mean of the samples by 3.5 units in a 50-PC space (energy distance 1.52 without, 0.8 with the shift).
        batch_size
            Cells per denoising pass.
        space
            Expression space of the sampled RNA (as in :meth:`predict`); the samples are drawn in log1p(CP10k) (the
            registered space for log data) and converted, recorded in ``uns["vcell_spaces"]``.

        Returns
        -------
        A new AnnData (``n_cells`` x genes): ``X`` holds the samples (float32) in ``space``, ``obs['perturbation']`` /
        ``obs['vcell_perturbation']`` the condition, ``obs['vcell_dose']`` the dose and ``obs['vcell_source_cell']`` the
        starting cell. A model with proteins also sets ``obsm['protein']``: a DataFrame (cells x
        ``protein_names_``) of the proteins sampled jointly with the genes, ``max(0, mu_prot(c) + residual)`` in
        log1p(counts per 1e4 of the protein library) (``match_mean`` applies to them too).
        """
        import anndata as ad

        self._require_trained()
        check_options(n_steps=n_steps, n_cells=n_cells, match_mean=match_mean, batch_size=batch_size)
        adata, pool, perturbation, dose = self._query_inputs(adata, perturbation, controls, dose)
        seed = resolve_seed(seed)
        rng = np.random.default_rng(seed)
        idx = pool
        if n_cells is not None:
            idx = rng.choice(pool, size=int(n_cells), replace=True)
        perturbation = str(perturbation)
        ctx_all = self._contexts(adata)
        ctx = ctx_all[idx]
        contexts = sorted(set(ctx))
        means = {k: self._condition_mean(adata, perturbation, dose, pool[ctx_all[pool] == k]) for k in contexts}
        cond_means = {k: means[k] for k in contexts}  # what the condition vector is computed from
        if self.protein_names_:  # joint [genes, proteins]; the condition vector sees [genes, w * proteins]
            for k in contexts:
                pmean = self._condition_protein_mean(adata, perturbation, dose, pool[ctx_all[pool] == k])
                cond_means[k] = np.concatenate([means[k], self.protein_weight_ * pmean])
                means[k] = np.concatenate([means[k], pmean])
        M = np.stack([means[k] for k in ctx])
        z_ref = None
        if self.space == "vae":
            lat = {k: self._condition_latent(adata, perturbation, dose, pool[ctx_all[pool] == k]) for k in contexts}
            z_ref = np.stack([lat[k] for k in ctx])
        cond = self._project_condition(np.stack([cond_means[k] for k in contexts]))[[contexts.index(k) for k in ctx]]
        if self.condition_on_control:
            cond = np.concatenate([cond, self._control_coords(adata, idx)], axis=1)
        gen = torch.Generator(device=next(self.module.parameters()).device).manual_seed(seed)
        draw = {"n_steps": n_steps, "eta": eta, "guidance_scale": guidance_scale, "batch_size": batch_size}
        Y = M + self._unscale(self._draw(cond, z_ref, ctx, gen, rng, **draw))
        if match_mean:
            for k in contexts:
                rows = np.flatnonzero(ctx == k)
                pool = Y[rows]
                if len(rows) < _N_CALIBRATION:  # too few cells to estimate the shift: draw more of this context
                    sel = np.repeat(rows[:1], _N_CALIBRATION - len(rows))
                    z_sel = None if z_ref is None else z_ref[sel]
                    extra = self._unscale(self._draw(cond[sel], z_sel, ctx[sel], gen, rng, **draw))
                    pool = np.vstack([pool, M[sel] + extra])
                Y[rows] += _mean_matching_shift(pool, means[k])
        X = np.clip(Y, 0.0, None).astype(np.float32)
        var = pd.DataFrame(index=adata.var_names.copy())
        n_genes = adata.n_vars
        obs = sample_obs(perturbation, dose, adata.obs_names[idx].to_numpy())
        if not self.protein_names_:
            return ad.AnnData(X=X, obs=obs, var=var)
        out = ad.AnnData(X=X[:, :n_genes].copy(), obs=obs, var=var)
        return with_sampled_proteins(out, X[:, n_genes:], self.protein_names_)

    def _draw(
        self,
        cond: np.ndarray,
        z_ref: np.ndarray | None,
        ctx: np.ndarray,
        gen: torch.Generator,
        rng: np.random.Generator,
        *,
        n_steps: int,
        eta: float,
        guidance_scale: float,
        batch_size: int,
    ) -> np.ndarray:
        """Gene-space residuals (diffusion sample decoded, plus the tail) for conditions ``cond``, in order.

        With proteins: joint residuals ``[genes, w * proteins]`` (:meth:`_unscale` gives the proteins' units).
        """
        m = self.module.eval()
        device = next(m.parameters()).device
        coords = []
        for start in range(0, len(cond), batch_size):
            c = torch.as_tensor(cond[start : start + batch_size], device=device)
            y = m.sample(c, n_steps=n_steps, eta=eta, guidance_scale=guidance_scale, generator=gen)
            coords.append(y.cpu().numpy().astype(np.float64))
        return self._to_genes(np.concatenate(coords), z_ref) + self._tail(ctx, rng)

    def _control_coords(self, adata: AnnData, idx: np.ndarray) -> np.ndarray:
        """Standardised residual coordinates of control cells around their context's control mean.

        With proteins (``space="pca"``) the joint residual ``[genes, w * proteins]``, whose protein part is 0 (the
        context's mean) for a control cell without measured proteins. Expression is read in row blocks.
        """
        ctx_all = self._contexts(adata)
        ctrl = self._control_indices(adata, None)
        ctx = ctx_all[idx]
        contexts = sorted(set(ctx))
        pools = {}
        for k in contexts:
            pool = ctrl[ctx_all[ctrl] == k]
            pools[k] = pool if len(pool) else ctrl
        out = np.zeros((len(idx), self.n_dims_), dtype=np.float32)
        if self.space == "vae":
            for k in contexts:
                rows = np.flatnonzero(ctx == k)
                z = self.mean_model._latents(adata, idx[rows]) - self._condition_latent(adata, CONTROL, 1.0, pools[k])
                out[rows] = z / self.coord_scale_
            return out
        code = pd.Index(contexts).get_indexer(ctx)
        means = np.stack([self._cells_mean(adata, pools[k]) for k in contexts])
        prot = None
        if self.protein_names_:
            prot = np.zeros((len(idx), len(self.protein_names_)))
            for i, k in enumerate(contexts):
                rows = np.flatnonzero(code == i)
                prot[rows] = self._control_protein_residual(adata, idx[rows], pools[k], ctrl)
        for start, stop, E in self._expression_blocks(adata, idx):
            E -= means[code[start:stop]]
            diff = E if prot is None else np.concatenate([E, prot[start:stop]], axis=1)
            out[start:stop] = ((diff - self.pca_mean_) @ self.pca_components_.T) / self.coord_scale_
        return out

    def _control_protein_residual(
        self, adata: AnnData, idx: np.ndarray, pool: np.ndarray, ctrl: np.ndarray
    ) -> np.ndarray:
        """``w * (proteins - mean of the measured cells of pool)`` of control cells ``idx`` (0: unmeasured cells).

        The mean falls back to the measured cells of ``ctrl`` when ``pool`` has none.
        """
        P = self._protein_expression(adata, idx).astype(np.float64)
        out = np.zeros_like(P)
        seen = np.isfinite(P).all(1)
        for cells in (pool, ctrl):
            Q = self._protein_expression(adata, cells).astype(np.float64)
            ok = np.isfinite(Q).all(1)
            if ok.any():
                out[seen] = self.protein_weight_ * (P[seen] - Q[ok].mean(0))
                break
        return out

    # ------------------------------------------------------------------ save / load
    def save(self, dir_path: str | Path, prefix: str | None = None, overwrite: bool = False, **kwargs: Any) -> None:
        """Save the model and its mean model (in ``dir_path/mean_model``); arguments of :meth:`PerturbationModel.save`."""
        super().save(str(dir_path), prefix=prefix, overwrite=overwrite, **kwargs)
        self.mean_model.save(str(Path(dir_path) / _MEAN_DIR), prefix=prefix, overwrite=True)

    @classmethod
    def load(cls, dir_path: str | Path, adata: AnnData | MuData | None = None, **kwargs: Any) -> ResidualDiffusion:
        """Load a model saved by :meth:`save` (with its mean model); arguments of :meth:`PerturbationModel.load`.

        ``adata`` may be a MuData (its ``rna`` modality is registered, the proteins of a protein model copied).
        """
        from vcell import model as vmodel

        mdata = adata if adata is not None and hasattr(adata, "mod") else None
        if mdata is not None:
            if "rna" not in mdata.mod:
                msg = f"MuData has no 'rna' modality; modalities: {list(mdata.mod)}"
                raise KeyError(msg)
            adata = mdata.mod["rna"]
        model = super().load(str(dir_path), adata=adata, **kwargs)
        model._attach_protein(mdata)
        name = model.mean_model_name_
        mean_cls = vmodel.Baseline if name in BASELINE_METHODS else getattr(vmodel, name)
        model.mean_model = mean_cls.load(str(Path(dir_path) / _MEAN_DIR), adata=adata, **kwargs)
        return model


def _mean_matching_shift(Y: np.ndarray, target: np.ndarray, n_iter: int = 40) -> np.ndarray:
    """Per-gene shift ``s`` with ``mean(max(0, Y + s)) = target`` (columns of ``Y``; bisection, ``target >= 0``).

    The left side increases with ``s``; at ``s = -max(Y)`` it is 0 and at ``s = target - mean(Y)`` at least
    ``target``, so the root lies between.
    """
    hi = target - Y.mean(0)
    lo = np.minimum(-Y.max(0), hi)
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        above = np.clip(Y + mid, 0.0, None).mean(0) > target
        hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
    return 0.5 * (lo + hi)


def _power_top(apply: Any, start: np.ndarray, n_iter: int = 200, tol: float = 1e-7) -> float:
    """Square root of the largest eigenvalue of a positive semi-definite ``A`` (``apply(v) = A v``).

    Power iteration from ``start + 1`` (deterministic), stopped when the value changes by at most ``tol``.
    """
    v = start + 1.0
    v /= np.linalg.norm(v)
    s = 0.0
    for _ in range(n_iter):
        w = apply(v)
        norm = float(np.linalg.norm(w))
        if norm == 0.0:
            return 0.0
        v = w / norm
        s_new = float(np.sqrt(norm))
        if abs(s_new - s) <= tol * s_new:
            return s_new
        s = s_new
    return s


def _top_singular_value(X: np.ndarray, n_iter: int = 200, tol: float = 1e-7) -> float:
    """Largest singular value of ``X`` (power iteration on ``X^T X`` from a deterministic start)."""
    if X.size == 0:
        return 0.0
    return _power_top(lambda v: X.T @ (X @ v), np.abs(X).sum(0), n_iter, tol)


def _weight(s_rna: float, s_prot: float) -> float:
    if s_rna <= 1e-12 or s_prot <= 1e-12:
        return 1.0
    return float(s_rna / s_prot)


def _block_weight(R_rna: np.ndarray, R_prot: np.ndarray) -> float:
    """Weight of the protein block: ratio of the blocks' leading singular values (multiple factor analysis).

    ``[R_rna, w R_prot]`` then has the same leading singular value in both blocks (1 when a block is constant).
    """
    return _weight(_top_singular_value(R_rna), _top_singular_value(R_prot))


def _block_weight_gram(gram: dict[str, np.ndarray], R_prot: np.ndarray) -> float:
    """:func:`_block_weight` with the RNA block given by its streamed moments (:func:`_residual_gram`)."""
    G = gram["gram"]
    s_rna = _power_top(lambda v: G @ v, gram["abs_sums"]) if gram["n"] else 0.0
    return _weight(s_rna, _top_singular_value(R_prot))


def _residual_gram(
    blocks: Iterator[tuple[int, int, np.ndarray]], n_genes: int, R_prot: np.ndarray | None, *, cross: bool
) -> dict[str, Any]:
    """Second moments of gene residuals read in row blocks ``(start, stop, R)``, float64.

    ``gram``: ``R^T R`` (genes x genes, symmetric; updated in place by BLAS ``dsyrk``); ``sums`` and ``abs_sums``:
    column sums of ``R`` and ``|R|``; ``n``: rows; with ``R_prot`` (rows of the same cells, in memory) and
    ``cross``: ``cross = R^T R_prot``.
    """
    from scipy.linalg.blas import dsyrk

    G = np.zeros((n_genes, n_genes))
    sums, abs_sums, n = np.zeros(n_genes), np.zeros(n_genes), 0
    cross_m = np.zeros((n_genes, R_prot.shape[1])) if R_prot is not None and cross else None
    for start, stop, R in blocks:
        R = np.ascontiguousarray(R, dtype=np.float64)
        out = dsyrk(1.0, R.T, beta=1.0, c=G.T, trans=0, lower=0, overwrite_c=1)  # lower triangle of G += R^T R
        if not np.shares_memory(out, G):  # (BLAS worked on a copy)
            G[...] = out.T
        sums += R.sum(0)
        if R_prot is not None:
            abs_sums += np.abs(R).sum(0)
        if cross_m is not None:
            cross_m += R.T @ R_prot[start:stop]
        n += stop - start
    for i in range(0, n_genes, 256):  # the upper triangle from the lower one, by row blocks
        j = min(i + 256, n_genes)
        D = G[i:j, i:j]
        D[...] = np.tril(D) + np.tril(D, -1).T
        G[i:j, j:] = G[j:, i:j].T
    return {"gram": G, "sums": sums, "abs_sums": abs_sums, "n": n, "cross": cross_m}


def _top_eigenvectors(C: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` leading eigenvectors (rows, by decreasing eigenvalue) of symmetric ``C``, overwritten.

    Each is signed so that its largest entry in absolute value is positive (scikit-learn's ``svd_flip`` of PCA
    components): the same components as ``PCA(svd_solver="covariance_eigh")`` up to rounding.
    """
    from scipy.linalg import eigh

    n = C.shape[0]
    if k < 1:
        return np.zeros((0, n))
    # C.T: the Fortran-ordered view LAPACK works on in place (no copy), its upper triangle C's lower one
    _, vecs = eigh(C.T, lower=False, subset_by_index=[n - k, n - 1], overwrite_a=True, check_finite=False)
    vecs = np.ascontiguousarray(vecs[:, ::-1].T)
    signs = np.sign(vecs[np.arange(k), np.argmax(np.abs(vecs), axis=1)])
    return vecs * signs[:, None]


class _Moments:
    """Per-column mean and variance (``ddof=0``) of rows added in blocks, float64 (Chan et al.'s merge)."""

    def __init__(self, n_features: int) -> None:
        self.n, self.mean, self.m2 = 0, np.zeros(n_features), np.zeros(n_features)

    def add(self, X: np.ndarray) -> None:
        nb = X.shape[0]
        if not nb:
            return
        mb = X.mean(0)
        d = X - mb
        m2b = np.einsum("ij,ij->j", d, d)
        total = self.n + nb
        delta = mb - self.mean
        self.mean += delta * (nb / total)
        self.m2 += m2b + delta**2 * (self.n * nb / total)
        self.n = total

    def var(self) -> np.ndarray:
        return self.m2 / max(self.n, 1)


def _vcell_class(cls: type) -> type:
    """The first class of ``cls``'s MRO that :mod:`vcell.model` exports (itself for vcell's models)."""
    from vcell import model as vmodel

    for base in cls.__mro__:
        if getattr(vmodel, base.__name__, None) is base:
            return base
    msg = f"mean_model must be a vcell model (or subclass one), got {cls.__name__}"
    raise ValueError(msg)
