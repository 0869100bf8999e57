"""Base class of every vcell model: registry, vocabulary, inputs of counterfactual prediction."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scvi.model.base import BaseModelClass

from vcell._constants import CONTROL, DOSE_COL, PERT_COL, REGISTRY_KEYS
from vcell._utils import check_obs_keys, check_var_names_match, expression_for_eval
from vcell.data import PerturbationVocab, context_labels, setup_perturbation_anndata, vcell_state

from ._protein import PROTEIN_OBSM_KEY, ProteinData, protein_copy, protein_info, record_protein, registered_protein

if TYPE_CHECKING:
    from anndata import AnnData
    from mudata import MuData


def sample_obs(perturbation: str, dose: float, sources: np.ndarray) -> pd.DataFrame:
    """``obs`` of cells drawn by a model's ``sample``.

    Columns ``perturbation`` and ``vcell_perturbation`` (categorical), ``vcell_dose`` and ``vcell_source_cell`` (the
    starting cell); index ``sample-0, sample-1, ...``.
    """
    n = len(sources)
    return pd.DataFrame(
        {
            "perturbation": pd.Categorical([perturbation] * n),
            PERT_COL: pd.Categorical([perturbation] * n),
            DOSE_COL: np.full(n, float(dose)),
            "vcell_source_cell": sources,
        },
        index=[f"sample-{i}" for i in range(n)],
    )


class PerturbationModel(ProteinData, BaseModelClass):
    """Shared machinery of vcell models, on scvi-tools' :class:`~scvi.model.base.BaseModelClass`.

    Subclasses build ``self.module`` (a pure-torch module) in ``__init__`` from summary numbers, and
    implement :meth:`train` and :meth:`predict`. Every model predicts in the evaluation space of
    BENCHMARK.md, log1p(CP10k), whatever its likelihood. A model registered with proteins
    (``setup_anndata(mdata, protein_modality=...)``) has ``protein_names_`` and predicts them with
    ``predict(..., modality="prot")``; a subclass that cannot model proteins sets ``_models_proteins = False``.
    """

    #: whether the model can be trained on a MuData registered with ``protein_modality``
    _models_proteins: bool = True

    def __init__(self, adata: AnnData | MuData | None = None, registry: dict | None = None) -> None:
        if adata is not None and hasattr(adata, "mod"):
            if "rna" not in adata.mod:
                msg = f"MuData has no 'rna' modality; modalities: {list(adata.mod)}"
                raise KeyError(msg)
            adata = adata.mod["rna"]
        super().__init__(adata, registry=registry)
        protein = registered_protein(self.registry_)
        self.protein_names_: list[str] = [str(n) for n in protein.get("names", [])]
        self.protein_modality_: str | None = protein.get("modality")
        if self.protein_names_ and not self._models_proteins:
            msg = (
                f"{type(self).__name__} does not model proteins: register the data without protein_modality= "
                "(or pass mdata['rna'])"
            )
            raise ValueError(msg)
        mapping = self.registry_["field_registries"][REGISTRY_KEYS.PERT_KEY]["state_registry"]["categorical_mapping"]
        self.vocab = PerturbationVocab([str(c) for c in mapping])
        state = vcell_state(self.registry_)
        self.counts_: bool = bool(state["counts"])
        self.context_keys_: list[str] = list(state["context_keys"])
        if adata is not None:
            self.var_names_: list[str] = [str(v) for v in adata.var_names]

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData | MuData,
        *,
        perturbation_key: str,
        control: str | Sequence[str],
        dose_key: str | None = None,
        covariate_keys: Sequence[str] = (),
        layer: str | None = None,
        batch_key: str | None = None,
        sep: str = "+",
        protein_modality: str | None = None,
        protein_layer: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register a perturbation screen for this model.

        A MuData is accepted: its ``rna`` modality is registered (keys refer to ``mdata['rna'].obs``); the other
        modalities are ignored unless one is named by ``protein_modality``.

        Parameters
        ----------
        adata
            Cells x genes; ``X`` (or ``layer``) holds raw counts or log-normalised expression. Or a MuData with
            such an ``rna`` modality. The matrix may be dense, sparse or backed (``anndata.read_h5ad(path,
            backed="r")``): it is checked in row blocks (:func:`vcell.data.check_expression`), never densified.
        perturbation_key
            ``obs`` column with perturbation labels (singles, ``"A+B"`` combinations, GEARS or scPerturb style).
        control
            Label(s) of control cells in ``perturbation_key``.
        dose_key
            Optional ``obs`` column with doses.
        covariate_keys
            Categorical ``obs`` columns of the cell context (e.g. ``["cell_type"]``); controls are paired
            with perturbed cells of the same context.
        layer
            Layer with the expression matrix; ``None`` uses ``X``.
        batch_key
            Optional ``obs`` column with batches (also part of the context).
        sep
            Separator of combinations in ``perturbation_key``.
        protein_modality
            With a MuData: the modality of protein counts (e.g. ``"prot"``; pertpy's papalexi_2021 calls it
            ``"adt"``, see :func:`vcell.datasets.read`'s ``modalities=``), modelled jointly with RNA. Its cells
            must be the ``rna`` modality's (any order); a cell without protein measurement can be a row of NaN (or
            of zeros): it is left out of protein fitting. ``None`` (default): RNA only.
        protein_layer
            Layer of the protein modality holding the counts; ``None``: its ``X``.
        **kwargs
            Passed to scvi-tools' ``AnnDataManager.register_fields``.

        Sets the following fields
        -------------------------
        ``adata.obs['vcell_perturbation']``, ``['vcell_n_perturbations']``, ``['vcell_dose']``, ``adata.uns['vcell_harmonize']``
            Canonical labels (:func:`vcell.pp.harmonize`); in ``mdata['rna']`` for a MuData.
        ``adata.obs['_scvi_*']``, ``adata.uns['_scvi_uuid']``, ``adata.uns['_scvi_manager_uuid']``
            scvi-tools' registry; with ``protein_modality`` its vcell state also records the protein modality, layer
            and names (``model.protein_names_``).
        ``mdata['rna'].obsm['vcell_protein']``
            With ``protein_modality``: dense float32 copy of the protein counts in the RNA modality's cell order
            (cells x proteins; what the model reads).

        Examples
        --------
        >>> import vcell
        >>> adata = vcell.datasets.kang2018()
        >>> vcell.model.Baseline.setup_anndata(
        ...     adata, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
        ... )
        >>> adata.obs["vcell_perturbation"].value_counts().to_dict()
        {'IFNb': 1039, 'control': 936}
        """
        setup_locals = {k: v for k, v in locals().items() if k not in ("protein_modality", "protein_layer")}
        setup_method_args = cls._get_setup_method_args(**setup_locals)  # proteins: recorded in the vcell state
        counts, info = None, None
        if protein_modality is not None:
            counts, info = protein_info(adata, protein_modality, protein_layer)
        elif hasattr(adata, "mod") and "rna" not in adata.mod:
            msg = f"MuData has no 'rna' modality; modalities: {list(adata.mod)}"
            raise KeyError(msg)
        mdata, adata = adata, (adata.mod["rna"] if hasattr(adata, "mod") else adata)
        source = kwargs.get("source_registry")  # load(): the saved model's registry
        if info is None and source is not None and registered_protein(source):
            info = registered_protein(source)
            if hasattr(mdata, "mod") and PROTEIN_OBSM_KEY not in adata.obsm and info["modality"] in mdata.mod:
                counts = protein_copy(mdata, info["modality"], "rna", info.get("layer"))
        setup_perturbation_anndata(
            cls,
            adata,
            setup_method_args=setup_method_args,
            perturbation_key=perturbation_key,
            control=control,
            dose_key=dose_key,
            covariate_keys=covariate_keys,
            layer=layer,
            batch_key=batch_key,
            sep=sep,
            **kwargs,
        )
        if counts is not None:
            adata.obsm[PROTEIN_OBSM_KEY] = counts
        if info is not None:
            record_protein(cls._get_most_recent_anndata_manager(adata, required=True).registry, info)

    @classmethod
    def load(cls, dir_path: str | Path, adata: AnnData | MuData | None = None, **kwargs: Any) -> PerturbationModel:
        """Load a saved model (scvi-tools' ``load``); ``adata`` may be the MuData it was trained on.

        Parameters
        ----------
        dir_path
            Directory the model was saved into.
        adata
            Data to attach (same genes): an AnnData, or a MuData whose ``rna`` modality is used (and whose proteins
            are attached for a protein model); ``None`` uses the AnnData saved with the model.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load` (``accelerator``, ``device``, ``prefix``, ...).
        """
        mdata = adata if adata is not None and hasattr(adata, "mod") else None
        if mdata is not None and "rna" not in mdata.mod:
            msg = f"MuData has no 'rna' modality; modalities: {list(mdata.mod)}"
            raise KeyError(msg)
        model = super().load(str(dir_path), adata=mdata.mod["rna"] if mdata is not None else adata, **kwargs)
        model._attach_protein(mdata)
        return model

    # ---------------------------------------------------------------- helpers for subclasses
    def _layer(self) -> str | None:
        """Layer the model reads (``None`` = ``X``)."""
        return self.registry_["setup_args"].get("layer")

    def _check_adata(self, adata: AnnData | MuData | None) -> AnnData:
        """The AnnData a model reads (a MuData's ``rna``, its proteins attached), its genes checked."""
        adata = self.adata if adata is None else adata
        if adata is not None and hasattr(adata, "mod"):
            if "rna" not in adata.mod:
                msg = f"MuData has no 'rna' modality; modalities: {list(adata.mod)}"
                raise KeyError(msg)
            self._attach_protein(adata)
            adata = adata.mod["rna"]
        if adata is None:
            msg = "this model was loaded without data: pass adata="
            raise ValueError(msg)
        check_var_names_match(self.var_names_, adata, what=type(self).__name__)
        return adata

    def _expression(self, adata: AnnData, indices: np.ndarray | None = None) -> np.ndarray:
        """log1p(CP10k) expression of (a subset of) cells, dense float32."""
        sub = adata if indices is None else adata[indices]
        return expression_for_eval(sub, self._layer(), counts=self.counts_)

    def _contexts(self, adata: AnnData) -> np.ndarray:
        check_obs_keys(adata, self.context_keys_, what="context (covariate/batch) key")
        return context_labels(adata.obs, self.context_keys_)

    def _canonical_obs(self, adata: AnnData, *, required: bool = True) -> pd.DataFrame | None:
        """Canonical label (``vcell_perturbation``) and dose (``vcell_dose``) of each cell, read-only.

        ``adata.obs``'s own columns when :func:`vcell.pp.harmonize` (or ``setup_anndata``) wrote them. Otherwise they
        are computed on the fly, as harmonize would, from the column the model was set up with (its registered
        ``perturbation_key``, control label(s), ``sep`` and, when ``adata`` has it, ``dose_key``), on a copy of
        that column: nothing is written into ``adata``. Without either column: a KeyError naming both, or ``None``
        when not ``required``.
        """
        if PERT_COL in adata.obs:
            if DOSE_COL in adata.obs:
                return adata.obs[[PERT_COL, DOSE_COL]]
            return pd.DataFrame({PERT_COL: adata.obs[PERT_COL], DOSE_COL: 1.0}, index=adata.obs_names)
        args = self.registry_["setup_args"]
        key, control = args.get("perturbation_key"), args.get("control")
        if key is None or key not in adata.obs:
            if not required:
                return None
            msg = (
                f"adata.obs has neither {PERT_COL!r} (written by vcell.pp.harmonize) nor {key!r}, the "
                f"perturbation_key {type(self).__name__} was set up with (control label(s) {control!r}). Add the "
                f"labels as adata.obs[{key!r}], or run vcell.pp.harmonize(adata, perturbation_key=..., "
                "control=...) on the column that holds them, or pass controls= (a mask, indices or obs names of the "
                "cells to start from)"
            )
            raise KeyError(msg)
        import anndata as ad

        from vcell.pp._harmonize import _harmonize

        dose_key = args.get("dose_key")
        dose_key = dose_key if dose_key is not None and dose_key in adata.obs else None
        labels = ad.AnnData(obs=adata.obs[[key, *([dose_key] if dose_key else [])]].copy())
        _harmonize(
            labels,
            perturbation_key=key,
            control=control,
            sep=args.get("sep", "+"),
            dose_key=dose_key,
            log_report="never",
        )
        return labels.obs[[PERT_COL, DOSE_COL]]

    def _control_indices(self, adata: AnnData, controls: Any = None) -> np.ndarray:
        """Integer indices of the control cells a prediction starts from.

        ``controls`` is ``None`` (all cells labelled control: ``obs['vcell_perturbation'] == 'control'``, or, on data
        never harmonised, the registered control label(s) in the registered ``perturbation_key``), a boolean mask,
        integer indices or obs names.
        """
        if controls is None:
            labels = self._canonical_obs(adata)[PERT_COL]
            idx = np.flatnonzero((labels.astype(str) == CONTROL).to_numpy())
            if idx.size == 0:
                msg = f"adata has no control cells (obs[{PERT_COL!r}] == {CONTROL!r}); pass controls="
                raise ValueError(msg)
            return idx
        arr = np.asarray(controls)
        if arr.dtype == bool:
            if arr.shape != (adata.n_obs,):
                msg = f"boolean controls mask has shape {arr.shape}, expected ({adata.n_obs},)"
                raise ValueError(msg)
            idx = np.flatnonzero(arr)
        elif np.issubdtype(arr.dtype, np.integer):
            idx = arr.astype(np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= adata.n_obs):
                msg = f"controls indices out of range for {adata.n_obs} cells"
                raise ValueError(msg)
        else:
            names = arr.astype(str)
            missing = np.setdiff1d(names, adata.obs_names)
            if missing.size:
                msg = f"controls names not in adata.obs_names: {missing[:5].tolist()}"
                raise KeyError(msg)
            idx = adata.obs_names.get_indexer(names)
        if idx.size == 0:
            msg = "no control cells selected"
            raise ValueError(msg)
        return idx

    @staticmethod
    def _non_test_cells(adata: AnnData) -> np.ndarray:
        """Integer indices of the cells a model may fit on: all but ``obs['vcell_split'] == 'test'``."""
        if "vcell_split" not in adata.obs:
            return np.arange(adata.n_obs)
        return np.flatnonzero((adata.obs["vcell_split"].astype(str) != "test").to_numpy())

    def _doses(self, adata: AnnData, indices: np.ndarray) -> np.ndarray:
        return adata.obs[DOSE_COL].to_numpy(dtype=np.float32)[indices]

    def predict(
        self,
        adata: AnnData | None = None,
        *,
        perturbation: str,
        controls: Any = None,
        dose: float = 1.0,
        seed: int | None = None,
    ) -> np.ndarray:
        """Counterfactual expression of control cells under ``perturbation`` (log1p(CP10k), float32).

        Parameters
        ----------
        adata
            Data holding the control cells (same genes as in training); ``None`` uses the training data.
        perturbation
            Canonical condition, e.g. ``"IFNb"`` or ``"A+B"``.
        controls
            Cells to start from: ``None`` (all control cells), a boolean mask, indices or obs names.
        dose
            Dose of the perturbation.
        seed
            Random seed (for stochastic models).

        Returns
        -------
        Array of shape ``(n_selected_cells, n_genes)``.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- many perturbations of the same cells
    #: arguments of ``predict`` that ``predict_many`` and ``tl.predict_perturbation`` set themselves
    _SHARED_PREDICT_ARGS = ("adata", "perturbation", "controls", "dose", "seed", "modality")

    def predict_many(
        self,
        adata: AnnData | MuData | None = None,
        *,
        perturbations: str | Sequence[str],
        controls: Any = None,
        dose: float = 1.0,
        seed: int | None = None,
        modality: str = "rna",
        **kwargs: Any,
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Counterfactuals of the same control cells under each of several perturbations, one array at a time.

        Gives, in the order of ``perturbations``, ``(p, model.predict(adata, perturbation=p, controls=controls,
        dose=dose, seed=seed, modality=modality, **kwargs))``: the same numbers, but the work the perturbations share
        (reading the control cells, encoding them, decoding their own state) is done once for all of them where the
        model allows it (Baseline, CausalVAE, FlowMatching, CellJEPA, ResidualDiffusion's mean model). Arguments and
        perturbations are checked before this returns; each array is computed when the iterator reaches it, so
        memory holds one perturbation's prediction at a time unless the caller keeps them
        (``dict(model.predict_many(...))`` keeps all).

        Parameters
        ----------
        adata, controls, dose, seed, modality
            As in :meth:`predict`.
        perturbations
            Canonical conditions, e.g. ``["IFNb", "A+B"]``.
        **kwargs
            Further options of this model's :meth:`predict` (e.g. FlowMatching's ``n_steps``); a ValueError names
            an unknown one and those accepted.

        Returns
        -------
        Iterator of ``(perturbation, array)``: arrays of shape ``(n_selected_cells, n_genes)`` (``"prot"``:
        ``(n_selected_cells, n_proteins)``), float32.

        Examples
        --------
        >>> import vcell
        >>> adata = vcell.datasets.kang2018()
        >>> vcell.model.Baseline.setup_anndata(
        ...     adata, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
        ... )
        >>> model = vcell.model.Baseline(adata, method="additive")
        >>> model.train()
        >>> {p: x.shape for p, x in model.predict_many(perturbations=["IFNb", "control"])}
        {'IFNb': (936, 6998), 'control': (936, 6998)}
        """
        perts = [perturbations] if isinstance(perturbations, str) else [str(p) for p in perturbations]
        kwargs = self._check_predict_kwargs(kwargs, what="predict_many")
        stream = self._predict_many(
            adata, perts, controls=controls, dose=dose, seed=seed, modalities=(modality,), **kwargs
        )
        return ((p, out[modality]) for p, out in stream)

    @classmethod
    def _predict_options(cls) -> list[str] | None:
        """Options of ``cls.predict`` beyond the shared arguments (``None``: it takes any keyword)."""
        params = inspect.signature(cls.predict).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return None
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        shared = set(cls._SHARED_PREDICT_ARGS)
        return sorted(n for n, p in params.items() if p.kind in kinds and n != "self" and n not in shared)

    def _check_predict_kwargs(self, kwargs: dict[str, Any] | None, *, what: str = "predict_kwargs") -> dict[str, Any]:
        """``kwargs`` as a dict; ValueError naming any key ``predict`` does not accept, and the accepted ones."""
        kwargs = dict(kwargs or {})
        shared = sorted(set(kwargs) & set(self._SHARED_PREDICT_ARGS))
        if shared:
            msg = f"{what}: {shared} are arguments of their own, not predict options; pass them directly"
            raise ValueError(msg)
        accepted = self._predict_options()
        unknown = [] if accepted is None else sorted(set(kwargs) - set(accepted))
        if unknown:
            msg = (
                f"{what}: unknown option(s) {unknown} for {type(self).__name__}.predict; "
                f"accepted: {accepted if accepted else 'none'}"
            )
            raise ValueError(msg)
        return kwargs

    def _own_predict(self, cls: type) -> bool:
        """Whether this model predicts with ``cls.predict`` (not a subclass's own ``predict``).

        ``cls``'s batched ``_predict_many`` computes what ``cls.predict`` does; a subclass that changed ``predict`` is
        honoured by falling back to the default, which calls it.
        """
        return type(self).predict is cls.predict

    def _predict_many(
        self,
        adata: AnnData | MuData | None,
        perturbations: list[str],
        *,
        controls: Any,
        dose: float,
        seed: int | None,
        modalities: Sequence[str] = ("rna",),
        **kwargs: Any,
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """Batched :meth:`predict`: ``(perturbation, {modality: array})`` per perturbation, in order.

        This default calls :meth:`predict` per perturbation and modality (``modality=`` only for ``"prot"``, so that
        a subclass whose ``predict`` has no ``modality`` works). Models override it to share work; an override
        checks its inputs before returning its iterator (nothing is computed until then), and falls back to this
        one when a subclass changed ``predict`` (:meth:`_own_predict`).
        """
        for modality in modalities:
            self._check_modality(modality)

        def run() -> Iterator[tuple[str, dict[str, np.ndarray]]]:
            for p in perturbations:
                out = {}
                for modality in modalities:
                    extra = {"modality": modality} if modality != "rna" else {}
                    out[modality] = self.predict(
                        adata, perturbation=p, controls=controls, dose=dose, seed=seed, **extra, **kwargs
                    )
                yield p, out

        return run()
