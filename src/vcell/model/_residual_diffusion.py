"""``ResidualDiffusion``: a conditional-mean predictor plus a diffusion model of the residuals around it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from vcell._constants import CONTROL, DOSE_COL, PERT_COL
from vcell._settings import logger
from vcell._utils import group_means, resolve_seed
from vcell.module import BASELINE_METHODS
from vcell.module._residual_diffusion import CONDITION_KEY, RESIDUAL_KEY, ResidualDiffusionModule

from ._base import Capabilities, PerturbationModel, sample_obs
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


class ResidualDiffusion(PerturbationModel):
    """Conditional mean ``mu(c)`` from any vcell model, plus a conditional diffusion model of ``x - mu(c)``.

    Stage 1 is a mean predictor (default :class:`~vcell.model.CausalVAE`, or a baseline) trained inside or passed in
    trained. For a condition ``c`` (perturbation, dose, context) its conditional mean ``mu(c)`` is the mean of its
    counterfactual predictions of the context's control cells (for controls, their mean). Stage 2 learns the
    distribution of the residuals ``x - mu(c)`` of the training cells (centred per condition, so it learns their
    shape and ``mu(c)`` stays the mean of the samples) with a denoising diffusion model
    (:class:`vcell.module.ResidualDiffusionModule`: cosine schedule, v-prediction, DDIM sampler, optional
    classifier-free guidance) in a low-dimensional space:

    * ``space="pca"``: the top ``n_components`` principal components of the training residuals (standardised);
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
        if not self.is_trained_ or self.mean_model is None:
            msg = "the model is not trained: call model.train() first"
            raise RuntimeError(msg)

    def _condition_mean(
        self, adata: AnnData, perturbation: str, dose: float, controls: np.ndarray, source: str | None = None
    ) -> np.ndarray:
        """``mu(c)`` from ``controls`` (see ``mean_from``; the controls' mean for ``control``), log1p(CP10k)."""
        if perturbation == CONTROL:
            return self._expression(adata, controls).mean(0)
        if (source or self.mean_from_) == "sample":
            n = max(1000, 2 * len(controls))
            cells = self.mean_model.sample(
                adata, perturbation=perturbation, n_cells=n, controls=controls, dose=dose, seed=0
            )
            return np.asarray(cells.X, dtype=np.float64).mean(0)
        pred = self.mean_model.predict(adata, perturbation=perturbation, controls=controls, dose=dose)
        return np.asarray(pred, dtype=np.float64).mean(0)

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
        pred = self.mean_model.predict(adata, perturbation=perturbation, controls=controls, dose=dose, modality="prot")
        pred = np.asarray(pred, dtype=np.float64)
        seen = np.isfinite(pred).all(1)
        if not seen.any():
            msg = f"the mean model predicts no finite protein values for {perturbation!r} from these controls"
            raise ValueError(msg)
        return pred[seen].mean(0)

    def _choose_mean_source(
        self,
        adata: AnnData,
        E: np.ndarray,
        groups: dict,
        ctrl_of: dict,
        all_controls: np.ndarray,
        means: list[np.ndarray],
    ) -> str:
        """``mean_from="auto"``: the source whose ``mu(c)`` is closer to the training conditions' means.

        ``means`` (computed with ``"predict"``) is replaced in place when ``"sample"`` wins; both errors go to
        ``mean_source_mse_``.
        """
        errors = {"predict": [], "sample": []}
        sampled = []
        for g, ((p, d, k), rows) in enumerate(groups.items()):
            controls = ctrl_of[k] if len(ctrl_of[k]) else all_controls
            if p == CONTROL:  # the controls' mean whatever the source
                sampled.append(means[g])
                continue
            sampled.append(self._condition_mean(adata, p, d, controls, "sample"))
            target = E[rows].mean(0)
            errors["predict"].append(np.mean((means[g] - target) ** 2))
            errors["sample"].append(np.mean((sampled[g] - target) ** 2))
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

    # ------------------------------------------------------------------ training
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
    ) -> None:
        """Train the mean model (unless it is trained already), then the residual diffusion model.

        Cells with ``obs['vcell_split'] == 'test'`` are never used. The diffusion model holds out a seeded
        ``validation_fraction`` of the cells for its validation loss (computed with fixed noise, so epochs compare).

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
            Arguments of the mean model's ``train`` (when it is not trained yet).

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

        from vcell.data import CellBatches
        from vcell.train import TrainingPlan, fit

        seed = resolve_seed(seed)
        adata = self.adata
        if not self.mean_model.is_trained_:
            self.mean_model.train(**{"seed": seed, **(mean_train_kwargs or {})})
        lightning.seed_everything(seed, verbose=False)
        if not self.is_trained_:
            self.module.reset_parameters()
        rng = np.random.default_rng(seed)
        cells = self._non_test_cells(adata)
        E = self._expression(adata, cells).astype(np.float64)
        pert = adata.obs[PERT_COL].astype(str).to_numpy()[cells]
        dose = adata.obs[DOSE_COL].to_numpy(dtype=np.float64)[cells]
        ctx = self._contexts(adata)[cells]
        is_ctrl = pert == CONTROL
        if not is_ctrl.any():
            msg = f"no control cells in the training data (obs[{PERT_COL!r}] == {CONTROL!r})"
            raise ValueError(msg)
        groups = pd.DataFrame({"p": pert, "d": dose, "k": ctx}).groupby(["p", "d", "k"], sort=True).indices
        ctrl_of = {k: cells[is_ctrl & (ctx == k)] for k in np.unique(ctx)}
        means, pmeans, latents, group_of = [], [], [], np.zeros(len(cells), dtype=np.int64)
        source = "predict" if self.mean_from_ == "auto" else self.mean_from_
        for g, ((p, d, k), rows) in enumerate(groups.items()):
            controls = ctrl_of[k] if len(ctrl_of[k]) else cells[is_ctrl]
            means.append(self._condition_mean(adata, p, d, controls, source))
            if self.protein_names_:
                pmeans.append(self._condition_protein_mean(adata, p, d, controls))
            if self.space == "vae":
                latents.append(self._condition_latent(adata, p, d, controls))
            group_of[rows] = g
        if self.mean_from_ == "auto":
            self.mean_from_ = self._choose_mean_source(adata, E, groups, ctrl_of, cells[is_ctrl], means)
        M = np.stack(means)
        R = E - M[group_of]
        Z = np.stack(latents) if latents else None
        present = np.arange(len(M))  # the conditions of the cells the residual model fits
        if self.protein_names_:  # joint residuals [genes, w * proteins] of the cells with measured proteins
            P = self._protein_expression(adata, cells).astype(np.float64)
            fit_rows = np.flatnonzero(np.isfinite(P).all(1))
            self._check_protein_cells(fit_rows, is_ctrl)
            Mp = np.stack(pmeans)
            R = np.concatenate([R, P - Mp[group_of]], axis=1)[fit_rows]
            cells, ctx, is_ctrl = cells[fit_rows], ctx[fit_rows], is_ctrl[fit_rows]
            present, group_of = np.unique(group_of[fit_rows], return_inverse=True)
            Z = None if Z is None else Z[present]
            R -= group_means(R, group_of).to_numpy()[group_of]
            n_genes = E.shape[1]
            self.protein_weight_ = self.protein_weight or _block_weight(R[:, :n_genes], R[:, n_genes:])
            R[:, n_genes:] *= self.protein_weight_
            M = np.concatenate([M, self.protein_weight_ * Mp], axis=1)
            self.n_protein_cells_ = len(fit_rows)
        else:
            # centred per condition: the diffusion model learns shapes, not the mean model's in-sample errors
            # (which it would carry over to unseen conditions, and which tails of other conditions would add back)
            R -= group_means(R, group_of).to_numpy()[group_of]
        coords, tails = self._fit_space(adata, cells, R, group_of, Z, rng)
        self._fit_conditions(M)
        cond = self._project_condition(M)[present][group_of]
        if self.condition_on_control:
            partner = np.zeros(len(cells), dtype=np.int64)
            for k in np.unique(ctx):  # a random control of the same context (any control if it has none)
                rows, pool = np.flatnonzero(ctx == k), np.flatnonzero(is_ctrl & (ctx == k))
                pool = pool if len(pool) else np.flatnonzero(is_ctrl)
                partner[rows] = rng.choice(pool, size=len(rows))
            cond = np.concatenate([cond, coords[partner]], axis=1)
        keep = np.sort(rng.choice(len(cells), size=min(_N_TAIL, len(cells)), replace=False))
        self.tail_, self.tail_context_ = tails[keep].astype(np.float32), ctx[keep].astype(str)
        self.tail_std_ = tails.std(0).astype(np.float32)
        self.residual_variance_explained_ = float(1.0 - tails.var(0).sum() / max(R.var(0).sum(), 1e-12))

        tensors = {RESIDUAL_KEY: torch.as_tensor(coords, dtype=torch.float32), CONDITION_KEY: torch.as_tensor(cond)}
        order = rng.permutation(len(cells))
        n_val = int(round(validation_fraction * len(cells))) if len(cells) >= 20 else 0
        train_idx, val_idx = np.sort(order[n_val:]), np.sort(order[:n_val])
        train_dl = CellBatches(tensors, train_idx, batch_size=batch_size, shuffle=True, seed=seed)
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

    def _fit_space(
        self,
        adata: AnnData,
        cells: np.ndarray,
        R: np.ndarray,
        group_of: np.ndarray,
        Z: np.ndarray | None,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Standardised residual coordinates of the training cells and their residuals outside the space."""
        from vcell.metrics import fit_pca

        if self.space == "pca":
            comps, mean = fit_pca(R, self.n_dims_, seed=int(rng.integers(2**31)))
            if comps.shape[0] < self.n_dims_:  # fewer cells/genes than components: pad with null directions
                comps = np.vstack([comps, np.zeros((self.n_dims_ - comps.shape[0], comps.shape[1]))])
            self.pca_components_, self.pca_mean_ = comps, mean
            Y = (R - mean) @ comps.T
            self.coord_scale_ = np.maximum(Y.std(0), 1e-6)
            coords = Y / self.coord_scale_
            return coords.astype(np.float32), R - self._to_genes(coords, None)
        Y = self.mean_model._latents(adata, cells) - Z[group_of]
        Y -= group_means(Y, group_of).to_numpy()[group_of]
        self.coord_scale_ = np.maximum(Y.std(0), 1e-6)
        coords = Y / self.coord_scale_
        return coords.astype(np.float32), R - self._to_genes(coords, Z[group_of])

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
        """The mean model's counterfactual prediction of control cells (deterministic; log1p(CP10k), float32).

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

        Returns
        -------
        A new AnnData (``n_cells`` x genes): ``X`` holds log1p(CP10k) samples (float32), ``obs['perturbation']`` /
        ``obs['vcell_perturbation']`` the condition, ``obs['vcell_dose']`` the dose and ``obs['vcell_source_cell']`` the
        starting cell. A model with proteins also sets ``obsm['protein']``: a DataFrame (cells x
        ``protein_names_``) of the proteins sampled jointly with the genes, ``max(0, mu_prot(c) + residual)`` in
        log1p(counts per 1e4 of the protein library) (``match_mean`` applies to them too).
        """
        import anndata as ad

        self._require_trained()
        if int(n_steps) < 1:
            msg = f"n_steps must be a positive integer, got {n_steps!r}"
            raise ValueError(msg)
        adata = self._check_adata(adata)
        seed = resolve_seed(seed)
        rng = np.random.default_rng(seed)
        pool = self._control_indices(adata, controls)
        idx = pool
        if n_cells is not None:
            if int(n_cells) < 1:
                msg = f"n_cells must be a positive integer, got {n_cells!r}"
                raise ValueError(msg)
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
        context's mean) for a control cell without measured proteins.
        """
        ctx_all = self._contexts(adata)
        E = self._expression(adata, idx).astype(np.float64)
        ctrl = self._control_indices(adata, None)
        out = np.zeros((len(idx), self.n_dims_), dtype=np.float32)
        for k in sorted(set(ctx_all[idx])):
            rows = np.flatnonzero(ctx_all[idx] == k)
            pool = ctrl[ctx_all[ctrl] == k]
            pool = pool if len(pool) else ctrl
            mean = self._expression(adata, pool).mean(0)
            if self.space == "pca":
                diff = E[rows] - mean
                if self.protein_names_:
                    diff = np.concatenate([diff, self._control_protein_residual(adata, idx[rows], pool, ctrl)], 1)
                out[rows] = ((diff - self.pca_mean_) @ self.pca_components_.T) / self.coord_scale_
            else:
                z = self.mean_model._latents(adata, idx[rows]) - self._condition_latent(adata, CONTROL, 1.0, pool)
                out[rows] = z / self.coord_scale_
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
        """Save the model and its mean model (in ``dir_path/mean_model``); arguments of scvi-tools' ``save``."""
        super().save(str(dir_path), prefix=prefix, overwrite=overwrite, **kwargs)
        self.mean_model.save(str(Path(dir_path) / _MEAN_DIR), prefix=prefix, overwrite=True)

    @classmethod
    def load(cls, dir_path: str | Path, adata: AnnData | MuData | None = None, **kwargs: Any) -> ResidualDiffusion:
        """Load a model saved by :meth:`save` (with its mean model); arguments of scvi-tools' ``load``.

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


def _top_singular_value(X: np.ndarray, n_iter: int = 200, tol: float = 1e-7) -> float:
    """Largest singular value of ``X`` (power iteration on ``X^T X`` from a deterministic start)."""
    if X.size == 0:
        return 0.0
    v = np.abs(X).sum(0) + 1.0
    v /= np.linalg.norm(v)
    s = 0.0
    for _ in range(n_iter):
        w = X.T @ (X @ v)
        norm = float(np.linalg.norm(w))
        if norm == 0.0:
            return 0.0
        v = w / norm
        s_new = float(np.sqrt(norm))
        if abs(s_new - s) <= tol * s_new:
            return s_new
        s = s_new
    return s


def _block_weight(R_rna: np.ndarray, R_prot: np.ndarray) -> float:
    """Weight of the protein block: ratio of the blocks' leading singular values (multiple factor analysis).

    ``[R_rna, w R_prot]`` then has the same leading singular value in both blocks (1 when a block is constant).
    """
    s_rna, s_prot = _top_singular_value(R_rna), _top_singular_value(R_prot)
    if s_rna <= 1e-12 or s_prot <= 1e-12:
        return 1.0
    return float(s_rna / s_prot)


def _vcell_class(cls: type) -> type:
    """The first class of ``cls``'s MRO that :mod:`vcell.model` exports (itself for vcell's models)."""
    from vcell import model as vmodel

    for base in cls.__mro__:
        if getattr(vmodel, base.__name__, None) is base:
            return base
    msg = f"mean_model must be a vcell model (or subclass one), got {cls.__name__}"
    raise ValueError(msg)
