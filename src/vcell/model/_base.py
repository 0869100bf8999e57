"""Base class of every vcell model: registry, vocabulary, inputs of counterfactual prediction."""

from __future__ import annotations

import contextvars
import functools
import inspect
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
from scvi.model.base import BaseModelClass

from vcell._constants import CONTROL, DOSE_COL, PERT_COL, REGISTRY_KEYS
from vcell._utils import (
    check_dose,
    check_number,
    check_obs_keys,
    check_positive_int,
    check_shape,
    check_unique_obs_names,
    check_var_names_match,
    expression_for_eval,
    get_matrix,
)
from vcell.data import PerturbationVocab, context_labels, setup_perturbation_anndata, vcell_state
from vcell.pp._space import ExpressionSpace, conversion_factor, parse_space, rescale_log1p

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


#: arguments of ``predict`` every model shares; ``Capabilities.predict_options`` names the others
SHARED_PREDICT_ARGS = ("adata", "perturbation", "controls", "dose", "seed", "modality", "space")

#: set while a ``predict``/``sample`` runs: a call made inside it (a model's override calling ``super().predict``,
#: ResidualDiffusion's mean model) answers in the model's own space, and the outer call converts once
_IN_PREDICTION: contextvars.ContextVar[bool] = contextvars.ContextVar("vcell_in_prediction", default=False)


def _in_context(stream: Iterator[Any]) -> Iterator[Any]:
    """``stream``, each of its steps computed as a call inside a prediction (:data:`_IN_PREDICTION` set)."""
    while True:
        token = _IN_PREDICTION.set(True)
        try:
            item = next(stream)
        except StopIteration:
            return
        finally:
            _IN_PREDICTION.reset(token)
        yield item


def with_space(fn: Callable) -> Callable:
    """``predict`` or ``sample`` of a model, taking ``space=`` and returning its RNA values in that space.

    :class:`PerturbationModel` applies it to its own ``predict``/``sample`` and to those of every subclass that
    defines them (``__init_subclass__``), so each model accepts ``space=`` without handling it: the model computes
    in its own space (:attr:`PerturbationModel.model_space`) and the outermost call converts the result once
    (``log1p(expm1(x) * t2 / t1)``, row block by row block; none when the spaces are equal, so the values are the
    model's own, bit for bit). A call made while another runs (``super().predict`` of an override, a nested mean
    model) returns the model's own space, and accepts only ``space=None`` or ``"model"``. ``predict`` of
    ``modality="prot"`` (always log1p(counts per 1e4 of the protein library)) takes no ``space`` but those naming
    it (``None``, ``"default"``, ``"model"``, ``"log1p_cp10k"``). ``sample``'s AnnData gets its ``X`` converted
    and recorded in ``uns["vcell_spaces"]``; its layers and ``obsm["protein"]`` are not changed. A method that
    declares ``space`` itself is left as it is (it handles the argument).
    """
    if getattr(fn, "_vcell_space", False) or "space" in inspect.signature(fn).parameters:
        return fn  # wrapped already, or a method that handles space= itself

    @functools.wraps(fn)
    def call(self: PerturbationModel, *args: Any, space: Any = None, **kwargs: Any) -> Any:
        if _IN_PREDICTION.get():
            if space is not None and not (isinstance(space, str) and space == "model"):
                msg = (
                    f"space={space!r} given to a {fn.__name__} called inside another prediction: the outer call "
                    "converts; inner calls answer in the model's own space (space=None or 'model')"
                )
                raise ValueError(msg)
            return fn(self, *args, **kwargs)
        target, factor = self._space_request(space, (kwargs.get("modality", "rna"),))
        token = _IN_PREDICTION.set(True)
        try:
            out = fn(self, *args, **kwargs)
        finally:
            _IN_PREDICTION.reset(token)
        if kwargs.get("modality", "rna") != "rna":
            return out
        if isinstance(out, np.ndarray):
            return rescale_log1p(out, factor)
        if hasattr(out, "X") and hasattr(out, "uns"):  # sample's AnnData
            from vcell.pp._space import record_space

            if factor is not None:
                out.X = rescale_log1p(out.X, factor)
            record_space(out, None, target)
        return out

    call._vcell_space = True  # type: ignore[attr-defined]
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    extra = inspect.Parameter(
        "space", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="ExpressionSpace | float | str | None"
    )
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    call.__signature__ = sig.replace(parameters=[*params[:at], extra, *params[at:]])  # type: ignore[attr-defined]
    return call


#: options of ``predict``/``sample`` (any model) that must be positive integers, and those that must be booleans
_POSITIVE_INT_OPTIONS = ("batch_size", "n_steps", "n_cells")
_BOOL_OPTIONS = ("residual", "match_mean")


def check_options(**options: Any) -> None:
    """Raise a :class:`ValueError` naming an option of ``predict``/``sample`` of the wrong kind (``None``: default).

    ``batch_size``, ``n_steps`` and ``n_cells`` are integers >= 1 (``2.5`` would be cut to 2, ``0`` fails deep
    inside); ``residual`` and ``match_mean`` are booleans. Other options are left to the model.
    """
    for name, value in options.items():
        if value is None:
            continue
        if name in _POSITIVE_INT_OPTIONS:
            check_positive_int(value, name=name)
        elif name in _BOOL_OPTIONS and not isinstance(value, bool | np.bool_):
            msg = f"{name} must be True or False, got {value!r}"
            raise ValueError(msg)


_HYPERPARAMETER_RULES: dict[str, Any] = {
    "int>=1": lambda v, n: check_positive_int(v, name=n),
    "int>=0": lambda v, n: check_positive_int(v, name=n, minimum=0),
    ">=0": lambda v, n: check_number(v, name=n, low=0.0),
    ">0": lambda v, n: check_number(v, name=n, low=0.0, closed="neither"),
    "[0,1)": lambda v, n: check_number(v, name=n, low=0.0, high=1.0, closed="left"),
    "[0,1]": lambda v, n: check_number(v, name=n, low=0.0, high=1.0),
}


def check_hyperparameters(**args: tuple[Any, str]) -> None:
    """Raise a :class:`ValueError` naming a model hyperparameter outside its range: ``name=(value, rule)``.

    Rules: ``"int>=1"``, ``"int>=0"``, ``">=0"`` / ``">0"`` (finite numbers), ``"[0,1)"`` and ``"[0,1]"``; a ``None``
    value is not checked. Each model's ``__init__`` checks its numbers here before building anything, so that a
    negative weight or a NaN does not train into a model that predicts NaN or the wrong sign.

    Examples
    --------
    >>> check_hyperparameters(n_latent=(8, "int>=1"), dropout=(0.1, "[0,1)"))
    >>> check_hyperparameters(kl_weight=(float("nan"), ">=0"))
    Traceback (most recent call last):
    ...
    ValueError: kl_weight must be a finite number >= 0, got nan
    """
    for name, (value, rule) in args.items():
        if value is not None:
            _HYPERPARAMETER_RULES[rule](value, name)


#: what each training argument must be: (kind, lowest value, whether the lowest value is allowed, highest value)
_TRAIN_ARG_RULES: dict[str, tuple[str, float, bool, float | None]] = {
    "max_epochs": ("int", 1, True, None),
    "pretrain_epochs": ("int", 1, True, None),
    "batch_size": ("int", 1, True, None),
    "early_stopping_patience": ("int", 0, True, None),
    "num_nodes": ("int", 1, True, None),
    "lr": ("number", 0.0, False, None),
    "weight_decay": ("number", 0.0, True, None),
    "validation_fraction": ("number", 0.0, True, 1.0),
}


def check_train_args(**args: Any) -> None:
    """Raise a :class:`ValueError` naming a training argument outside its range (``None``: the model's default).

    The one validator of every model's ``train`` (and CellJEPA's ``pretrain``): ``max_epochs``, ``pretrain_epochs``,
    ``batch_size`` and ``num_nodes`` are integers >= 1 (``max_epochs=0`` would mark random weights as trained, a
    negative value never stops), ``early_stopping_patience`` an integer >= 0, ``lr`` a finite number above 0,
    ``weight_decay`` one >= 0 and ``validation_fraction`` one in ``[0, 1)``. Arguments without a rule are not checked.

    Examples
    --------
    >>> check_train_args(max_epochs=10, lr=1e-3, validation_fraction=0.1)
    >>> check_train_args(max_epochs=0)
    Traceback (most recent call last):
    ...
    ValueError: max_epochs must be a positive integer, got 0
    """
    for name, value in args.items():
        rule = _TRAIN_ARG_RULES.get(name)
        if rule is None or value is None:
            continue
        kind, low, closed_low, high = rule
        if kind == "int":
            check_positive_int(value, name=name, minimum=int(low))
        else:
            check_number(value, name=name, low=low, high=high, closed="left" if closed_low else "neither")


@dataclass(frozen=True)
class Capabilities:
    """What a model class can do: declared once per class (``capabilities``), inherited by its subclasses.

    Code that treats models alike (``tl``, ``bench``, the command line, :class:`~vcell.model.ResidualDiffusion`'s mean
    model) reads these flags instead of probing methods or signatures; a model lacking a capability that is asked
    for it raises a ValueError naming the models that have it. ``tests/model/test_contract.py`` checks every
    exported model's declaration against what it does.

    Attributes
    ----------
    learned
        ``train`` fits weights by gradient descent (:func:`vcell.train.fit`); ``False``: a closed-form fit
        (:class:`~vcell.model.Baseline`).
    can_sample
        ``sample`` draws cells from the predicted distribution (:func:`vcell.tl.sample_perturbation`); without it
        ``sample`` raises a ValueError.
    models_proteins
        The model accepts data registered with ``setup_anndata(mdata, protein_modality=...)`` and predicts proteins
        with ``predict(..., modality="prot")``; without it such a registration is a ValueError at construction.
    predict_options
        Names of the keyword options of ``predict`` beyond the shared arguments (``adata``, ``perturbation``,
        ``controls``, ``dose``, ``seed``, ``modality``), e.g. FlowMatching's ``n_steps`` and ``solver``: what
        ``predict_many`` and :func:`vcell.tl.predict_perturbation`'s ``predict_kwargs`` accept (a ValueError names
        any other key). A subclass adding an option declares it: ``capabilities = dataclasses.replace(
        Base.capabilities, predict_options=(*Base.capabilities.predict_options, "scale"))``.
    """

    learned: bool = True
    can_sample: bool = False
    models_proteins: bool = False
    predict_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        options = tuple(str(o) for o in self.predict_options)
        shared = sorted(set(options) & set(SHARED_PREDICT_ARGS))
        if shared:
            msg = f"predict_options {shared} are shared arguments of predict, not model options"
            raise ValueError(msg)
        object.__setattr__(self, "predict_options", options)


def model_classes() -> dict[str, type[PerturbationModel]]:
    """The model classes :mod:`vcell.model` exports, by name, in ``__all__`` order (not the base class)."""
    from vcell import model as vmodel

    classes = {name: getattr(vmodel, name) for name in vmodel.__all__}
    return {
        name: cls
        for name, cls in classes.items()
        if isinstance(cls, type) and issubclass(cls, PerturbationModel) and cls is not PerturbationModel
    }


class PerturbationModel(ProteinData, BaseModelClass):
    """Shared machinery of vcell models, on scvi-tools' :class:`~scvi.model.base.BaseModelClass`: the model contract.

    A model class

    * declares what it can do in ``capabilities`` (:class:`Capabilities`);
    * registers data with :meth:`setup_anndata` (scvi-tools' registry, shared by every model);
    * builds ``self.module`` (a pure-torch module) in ``__init__`` from summary numbers;
    * implements :meth:`train` (learned models: :func:`vcell.train.fit` on batches from :mod:`vcell.data`'s loader);
    * implements the batched :meth:`_predict` hook: :meth:`predict`, :meth:`predict_many` and
      :func:`vcell.tl.predict_perturbation` run the shared checks (modality, trained, genes, starting control cells)
      and then call it;
    * implements :meth:`sample` when ``capabilities.can_sample``;
    * saves and loads with :meth:`save` / :meth:`load` (scvi-tools' arguments and directory, vcell's format: JSON and
      tensors, never unpickled, DESIGN.md): what it needs to predict lives in ``self.module``'s tensors and in
      attributes ending in ``_`` of the types the format stores (numbers, strings, lists, dicts, arrays, tensors,
      pandas objects; docs/adding_a_model.md), never in arbitrary Python objects.

    Every model computes in :attr:`model_space`: log1p(CP10k) (BENCHMARK.md's evaluation space) when it was set up
    with counts, whatever its likelihood, or the space of the log data it was set up with. ``predict``,
    ``predict_many`` and ``sample`` return RNA in the space asked for with ``space=`` (default :attr:`output_space`,
    the space of the user's ``adata.X`` in the scanpy setup; see :func:`with_space` and docs "Expression spaces").
    A model registered with proteins (``setup_anndata(mdata, protein_modality=...)``,
    ``capabilities.models_proteins``) has ``protein_names_`` and predicts them with ``predict(..., modality="prot")``.
    See docs/adding_a_model.md.
    """

    #: what this class can do (every model class declares its own; a subclass inherits it)
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give the ``predict`` and ``sample`` a subclass defines the ``space=`` argument (:func:`with_space`)."""
        super().__init_subclass__(**kwargs)
        for name in ("predict", "sample"):
            fn = cls.__dict__.get(name)
            if inspect.isfunction(fn):
                setattr(cls, name, with_space(fn))

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
        if self.protein_names_ and not self.capabilities.models_proteins:
            msg = (
                f"{type(self).__name__} does not model proteins: register the data without protein_modality= "
                f"(or pass mdata['rna']); models that do: {self._models_that('models_proteins')}"
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

    # ---------------------------------------------------------------- expression spaces
    @property
    def registered_space(self) -> ExpressionSpace:
        """Space of the matrix the model was set up with (recorded by :meth:`setup_anndata`).

        A model saved before spaces were recorded and loaded without data: raw counts or log1p of an unknown target
        sum, from ``counts_``.
        """
        recorded = vcell_state(self.registry_).get("space")
        if recorded is not None:
            return ExpressionSpace.from_dict(recorded)
        return ExpressionSpace("counts") if self.counts_ else ExpressionSpace("log1p")

    @property
    def model_space(self) -> ExpressionSpace:
        """Space the model computes in: log1p(CP10k) when set up with counts, else :attr:`registered_space`."""
        return ExpressionSpace.log1p_cp10k() if self.counts_ else self.registered_space

    @property
    def output_space(self) -> ExpressionSpace:
        """Default space of predictions (``space=None``), recorded by :meth:`setup_anndata`.

        Set up with log data: their own space. With counts: the space of ``adata.X`` when it is another matrix
        holding log1p data of a known target sum (``layer="counts"`` beside scanpy's ``normalize_total`` and
        ``log1p`` in ``X``), else log1p of the median library size of the registered counts (what
        ``normalize_total`` picks). A model saved before spaces were recorded: :attr:`model_space` (as it predicted).
        """
        recorded = vcell_state(self.registry_).get("output_space")
        return self.model_space if recorded is None else ExpressionSpace.from_dict(recorded)

    def _space_request(self, space: Any, modalities: Sequence[str] = ("rna",)) -> tuple[ExpressionSpace, float | None]:
        """The space ``space=`` asks for and the factor converting :attr:`model_space` into it (``None``: none).

        ValueError for an impossible conversion (naming both spaces), or for a ``space`` other than ``None``,
        ``"default"``, ``"model"`` or ``"log1p_cp10k"`` asked of protein predictions alone (their space is fixed:
        log1p(counts per 1e4 of the protein library)).
        """
        if "rna" not in modalities:
            if space is not None and not (isinstance(space, str) and space in ("model", "default", "log1p_cp10k")):
                msg = (
                    f"space={space!r} applies to RNA; proteins are predicted in log1p(counts per 1e4 of the protein "
                    "library) only: leave space out (or pass 'log1p_cp10k') for modality='prot'"
                )
                raise ValueError(msg)
            return self.model_space, None
        median = vcell_state(self.registry_).get("median_library_size")
        target = parse_space(space, default=self.output_space, model=self.model_space, median=median)
        return target, conversion_factor(self.model_space, target, what=f"{type(self).__name__} predictions")

    # ---------------------------------------------------------------- persistence (never unpickles)
    def save(
        self,
        dir_path: str | Path,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs: Any,
    ) -> None:
        """Save the model into a directory, in a format that loads without unpickling (scvi-tools' arguments).

        The directory holds ``{prefix}vcell_model.json`` (class, genes, registry and the attributes ending in ``_``,
        as JSON) and ``{prefix}vcell_tensors.pt`` (the module's weights and numeric arrays, read back with
        ``torch.load(weights_only=True)``; ``vcell/model/_persist.py``). An attribute of a type the format does
        not store is a TypeError naming it, before anything is written.

        Parameters
        ----------
        dir_path
            Directory to save into (created).
        prefix
            Prefix of the file names.
        overwrite
            Write into an existing directory; ``False``: a ValueError if it exists.
        save_anndata
            Also save the model's AnnData (``{prefix}adata.h5ad``), which :meth:`load` then uses without ``adata``.
        **anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write_h5ad`.
        """
        from ._persist import save_model

        save_model(
            self, dir_path, prefix=prefix, overwrite=overwrite, save_anndata=save_anndata, **anndata_write_kwargs
        )

    @classmethod
    def load(
        cls,
        dir_path: str | Path,
        adata: AnnData | MuData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        allow_unsafe_legacy: bool = False,
        allowed_classes_names_list: list[str] | None = None,
    ) -> PerturbationModel:
        """Load a model saved by :meth:`save` (scvi-tools' ``load``); ``adata`` may be the MuData it was trained on.

        Nothing is unpickled: JSON and ``torch.load(weights_only=True)``. A directory holding only scvi-tools'
        pickled ``model.pt`` (saved by vcell before this format) is a ValueError unless ``allow_unsafe_legacy``.

        Parameters
        ----------
        dir_path
            Directory the model was saved into.
        adata
            Data to attach (same genes, checked): an AnnData, or a MuData whose ``rna`` modality is used (and whose
            proteins are attached for a protein model); registered as the saved model's data was (its
            ``setup_anndata`` arguments are replayed). ``None`` uses the AnnData saved with the model
            (``save_anndata=True``), or none (a warning); ``False``: none.
        accelerator, device
            Where to put the module (scvi-tools' arguments).
        prefix
            Prefix of the file names.
        allow_unsafe_legacy
            Read scvi-tools' pickled ``model.pt`` with ``torch.load(weights_only=False)``, which can execute code
            hidden in the file: only for a file you trust (a warning says so); save the model again to convert it.
        allowed_classes_names_list
            Names of other classes whose saved models this class may load.
        """
        from ._persist import find_saved, load_model

        mdata = adata if adata is not None and hasattr(adata, "mod") else None
        if mdata is not None and "rna" not in mdata.mod:
            msg = f"MuData has no 'rna' modality; modalities: {list(mdata.mod)}"
            raise KeyError(msg)
        rna = mdata.mod["rna"] if mdata is not None else adata
        kind = find_saved(dir_path, prefix, allow_unsafe_legacy=allow_unsafe_legacy, what=f"{cls.__name__}.load")
        if kind == "legacy":
            model = super().load(
                str(dir_path),
                adata=rna,
                accelerator=accelerator,
                device=device,
                prefix=prefix,
                allowed_classes_names_list=allowed_classes_names_list,
            )
        else:
            model = load_model(
                cls,
                dir_path,
                rna,
                accelerator=accelerator,
                device=device,
                prefix=prefix,
                allowed_classes_names_list=allowed_classes_names_list,
            )
        model._attach_protein(mdata)
        return model

    @staticmethod
    def load_registry(dir_path: str | Path, prefix: str | None = None, allow_unsafe_legacy: bool = False) -> dict:
        """The registry saved with a model (scvi-tools' ``load_registry``), read from JSON without unpickling.

        ``allow_unsafe_legacy``: as in :meth:`load`, for scvi-tools' pickled ``model.pt``.
        """
        from ._persist import find_saved, read_registry

        kind = find_saved(dir_path, prefix, allow_unsafe_legacy=allow_unsafe_legacy, what="load_registry")
        if kind == "legacy":
            return BaseModelClass.load_registry(str(dir_path), prefix)
        return read_registry(dir_path, prefix)

    @staticmethod
    def view_setup_args(dir_path: str | Path, prefix: str | None = None, allow_unsafe_legacy: bool = False) -> None:
        """Print the ``setup_anndata`` arguments of a saved model (scvi-tools' ``view_setup_args``), without unpickling.

        ``allow_unsafe_legacy``: as in :meth:`load`, for scvi-tools' pickled ``model.pt``.
        """
        import rich.pretty  # noqa: F401  (scvi-tools' view_setup_method_args uses it without importing it)
        from scvi.data import AnnDataManager

        registry = PerturbationModel.load_registry(dir_path, prefix, allow_unsafe_legacy=allow_unsafe_legacy)
        AnnDataManager.view_setup_method_args(registry)

    # ---------------------------------------------------------------- capabilities
    @staticmethod
    def _models_that(capability: str) -> str:
        """Names of the exported model classes whose ``capabilities.<capability>`` is true (``"none"``: none)."""
        names = [n for n, c in model_classes().items() if getattr(c.capabilities, capability)]
        return ", ".join(names) if names else "none"

    @classmethod
    def _require_capability(cls, capability: str, what: str) -> None:
        """ValueError naming the class, ``what`` it cannot do and the models that can, unless it has ``capability``."""
        if getattr(cls.capabilities, capability):
            return
        msg = (
            f"{cls.__name__} cannot {what} (capabilities.{capability} is False); "
            f"models that can: {cls._models_that(capability)}"
        )
        raise ValueError(msg)

    # ---------------------------------------------------------------- training
    @abstractmethod
    def train(
        self,
        max_epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        accelerator: str = "auto",
        devices: int | str = "auto",
        early_stopping: bool = True,
        seed: int | None = None,
        trainer_kwargs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        """Fit the model on the registered cells, except those with ``obs['vcell_split'] == 'test'``.

        Every model accepts these arguments (a closed-form model, ``capabilities.learned = False``, ignores them).
        A learned model trains through :func:`vcell.train.fit` (Lightning) with a :class:`vcell.train.TrainingPlan`
        on batches from :mod:`vcell.data`'s loader, and sets ``is_trained_`` and ``history_``.

        Parameters
        ----------
        max_epochs
            Passes over the training cells (``None``: the model's default).
        lr
            Learning rate (``None``: the model's default).
        batch_size
            Cells (or pairs) per batch (``None``: the model's default).
        accelerator, devices
            Lightning's ``Trainer`` arguments.
        early_stopping
            Stop when the validation loss stops improving.
        seed
            Random seed (initialisation, batches, validation cells); ``None`` uses ``vcell.settings.seed``.
        trainer_kwargs
            Further arguments of Lightning's ``Trainer``.
        **kwargs
            Model-specific training arguments.
        """
        msg = f"{type(self).__name__} does not implement train(): every vcell model must (see PerturbationModel)"
        raise NotImplementedError(msg)

    # ---------------------------------------------------------------- sampling
    @with_space
    def sample(
        self,
        adata: AnnData | MuData | None = None,
        *,
        perturbation: str,
        n_cells: int | None = None,
        controls: Any = None,
        dose: float = 1.0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> AnnData:
        """Cells drawn from the model's counterfactual distribution (models with ``capabilities.can_sample``).

        A model that cannot sample raises a ValueError naming the models that can.

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
            Dose of the perturbation.
        seed
            Random seed; ``None`` uses ``vcell.settings.seed``.
        space
            Expression space of the sampled RNA values, as in :meth:`predict` (default :attr:`output_space`).
            Every model's ``sample`` takes it (:func:`with_space`).
        **kwargs
            Model-specific sampling options.

        Returns
        -------
        A new AnnData (``n_cells`` x genes) of values in ``space``, recorded in ``uns["vcell_spaces"]["X"]``, with
        ``obs`` from :func:`sample_obs`.
        """
        self._require_capability("can_sample", "sample cells")
        msg = f"{type(self).__name__} declares capabilities.can_sample but does not implement sample()"
        raise NotImplementedError(msg)

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
        if adata.n_obs == 0:
            msg = "adata has 0 cells: there is no control cell to start a prediction from"
            raise ValueError(msg)
        if controls is None:
            labels = self._canonical_obs(adata)[PERT_COL]
            idx = np.flatnonzero((labels.astype(str) == CONTROL).to_numpy())
            if idx.size == 0:
                msg = f"adata has no control cells (obs[{PERT_COL!r}] == {CONTROL!r}); pass controls="
                raise ValueError(msg)
            return idx
        if isinstance(controls, pd.Series) and pd.api.types.is_bool_dtype(controls.dtype):
            controls = self._aligned_mask(adata, controls)
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
        elif arr.dtype.kind in "fc":
            msg = f"controls must be a boolean mask, integer indices or obs names, got {arr.dtype} values"
            raise ValueError(msg)
        else:
            names = arr.astype(str).ravel()
            missing = np.setdiff1d(names, adata.obs_names)
            if missing.size:
                msg = f"controls names not in adata.obs_names: {missing[:5].tolist()}"
                raise KeyError(msg)
            check_unique_obs_names(adata, names, what="controls= given as obs names")
            idx = adata.obs_names.get_indexer_for(names)
        if idx.size == 0:
            msg = "no control cells selected"
            raise ValueError(msg)
        return idx

    @staticmethod
    def _aligned_mask(adata: AnnData, mask: pd.Series) -> np.ndarray:
        """A boolean Series of cells as a mask in ``adata``'s cell order (by its index, not by position).

        A mask made on another AnnData (another cell order, a subset) would otherwise select the wrong cells.
        """
        if mask.index.equals(adata.obs_names) or isinstance(mask.index, pd.RangeIndex):
            return mask.to_numpy()
        if mask.index.has_duplicates or not adata.obs_names.is_unique:
            msg = "controls is a boolean Series whose index is not adata.obs_names and names are not unique"
            raise ValueError(msg)
        missing = adata.obs_names.difference(mask.index)
        if len(missing) or len(mask) != adata.n_obs:
            msg = (
                f"controls is a boolean Series indexed by other cells than adata.obs_names ({len(missing)} of adata's "
                f"cells missing, e.g. {list(missing[:3])}; {len(mask)} values for {adata.n_obs} cells): build it "
                "from adata.obs, or pass obs names or integer indices"
            )
            raise ValueError(msg)
        return mask.reindex(adata.obs_names).to_numpy()

    @staticmethod
    def _non_test_cells(adata: AnnData) -> np.ndarray:
        """Integer indices of the cells a model may fit on: all but ``obs['vcell_split'] == 'test'``."""
        if "vcell_split" not in adata.obs:
            return np.arange(adata.n_obs)
        return np.flatnonzero((adata.obs["vcell_split"].astype(str) != "test").to_numpy())

    def _doses(self, adata: AnnData, indices: np.ndarray) -> np.ndarray:
        return adata.obs[DOSE_COL].to_numpy(dtype=np.float32)[indices]

    def _require_trained(self) -> None:
        if not self.is_trained_:
            msg = f"the {type(self).__name__} model is not trained: call model.train() before predicting or sampling"
            raise RuntimeError(msg)

    def _check_train(self, **args: Any) -> None:
        """The checks of every ``train``: its arguments (:func:`check_train_args`), then the training cells' doses.

        Doses were checked when the data were set up (:func:`vcell.pp.harmonize`), but ``obs['vcell_dose']`` may have
        changed since: a perturbed cell with a dose that is not a finite number above 0 is a ValueError naming the
        column, the number of such cells and a value (a model would read dose -1 as "unperturbed", or divide by 0).
        """
        check_train_args(**args)
        adata = self.adata
        if adata is None or DOSE_COL not in adata.obs or PERT_COL not in adata.obs:
            return
        dose = adata.obs[DOSE_COL].to_numpy(dtype=np.float64)
        perturbed = (adata.obs[PERT_COL].astype(str) != CONTROL).to_numpy()
        bad = perturbed & ~(np.isfinite(dose) & (dose > 0))
        if bad.any():
            values = ", ".join(f"{v:g}" for v in pd.unique(dose[bad])[:5])
            msg = (
                f"obs[{DOSE_COL!r}] of {int(bad.sum())} perturbed training cells is not a finite number above 0 "
                f"(values {values}); doses are positive amounts: fix the column (or run setup_anndata again with "
                "dose_key=) before training"
            )
            raise ValueError(msg)

    def _query(self, perturbations: Sequence[str], *, what: str = "perturbation") -> list[str]:
        """Canonical form of the condition(s) asked for (:func:`vcell.pp._labels.canonical_labels`).

        ``"B+A"`` is read as ``"A+B"``, so both take the same prediction path; labels that
        :func:`vcell.pp.harmonize` rejects (``"A+B+"``, ``"A+A"``, ``""``) are a ValueError naming them.
        """
        from vcell.pp._labels import canonical_labels

        labels = [perturbations] if isinstance(perturbations, str) else [str(p) for p in perturbations]
        return canonical_labels(labels, where=what)

    def _query_inputs(
        self, adata: AnnData | MuData | None, perturbation: str, controls: Any, dose: float
    ) -> tuple[AnnData, np.ndarray, str, float]:
        """The preamble of ``predict`` for a model's other per-perturbation methods (``sample``, trajectories, ...).

        Returns the AnnData read, the starting cells' indices, the canonical perturbation and the checked dose, after
        the checks of :meth:`_predict_checked` (trained, label, dose, genes, cells, finite rows).
        """
        self._require_trained()
        perturbation = self._query([perturbation])[0]
        dose = check_dose(dose)
        adata = self._check_adata(adata)
        check_shape(adata, what=f"{type(self).__name__}")
        idx = self._control_indices(adata, controls)
        self._check_rows(adata, idx)
        return adata, idx, perturbation, dose

    def _check_rows(self, adata: AnnData, idx: np.ndarray) -> None:
        """ValueError if the starting cells ``idx`` hold NaN, infinite or negative values in the registered matrix.

        Only these rows are read (the cells a prediction starts from), in row blocks; the message names a cell.
        """
        from vcell.data._chunked import check_finite_nonnegative

        layer = self._layer()
        check_finite_nonnegative(
            get_matrix(adata, layer),
            name=f"adata.layers[{layer!r}]" if layer else "adata.X",
            rows=np.unique(idx),
            row_names=adata.obs_names,
        )

    # ---------------------------------------------------------------- prediction
    @with_space
    def predict(
        self,
        adata: AnnData | MuData | None = None,
        *,
        perturbation: str,
        controls: Any = None,
        dose: float = 1.0,
        seed: int | None = None,
        modality: str = "rna",
        **options: Any,
    ) -> np.ndarray:
        """Counterfactual expression of control cells under ``perturbation`` (float32, in the space asked for).

        The shared checks (modality, trained model, genes of ``adata``, starting control cells), then the model's
        batched :meth:`_predict` for this one perturbation. Models override ``predict`` only to document their
        options (calling this one), never to compute differently from :meth:`_predict`. Every ``predict`` (this
        one and each model's) takes ``space=`` (:func:`with_space`): the returned RNA values are in that space,
        by default :attr:`output_space`, the space to compare with the user's ``adata.X``.

        Parameters
        ----------
        adata
            Data holding the control cells (same genes as in training), or a MuData whose ``rna`` modality is such
            data; ``None`` uses the training data.
        perturbation
            Canonical condition, e.g. ``"IFNb"`` or ``"A+B"``.
        controls
            Cells to start from: ``None`` (all control cells), a boolean mask, indices or obs names.
        dose
            Dose of the perturbation.
        seed
            Random seed (for stochastic models).
        modality
            ``"rna"`` or, for a model registered with proteins, ``"prot"``.
        space
            Expression space of the returned RNA values: ``None`` (:attr:`output_space`: for a model set up with
            counts, the space of ``adata.X`` when that holds log1p data of a known target sum, else log1p of the
            median library size; for log data, their own space), ``"log1p_cp10k"`` (BENCHMARK.md's space),
            ``"median"`` (log1p of the median library size of the registered counts), ``"model"`` (the model's own
            space, :attr:`model_space`, no conversion), a target sum (a number) or a
            :class:`vcell.pp.ExpressionSpace`. A conversion that cannot be made (e.g. from log data of unknown target
            sum) is a ValueError naming both spaces.
        **options
            The model's own options (``capabilities.predict_options``); a ValueError names an unknown one.

        Returns
        -------
        Array of shape ``(n_selected_cells, n_genes)`` (``"prot"``: ``(n_selected_cells, n_proteins)``, always
        log1p(counts per 1e4 of the protein library)).

        Raises
        ------
        RuntimeError
            If the model is not trained.
        ValueError
            If ``dose`` is not a finite number above 0, ``perturbation`` is a label :func:`vcell.pp.harmonize` would
            reject (``"A+B+"``, ``"A+A"``), ``adata`` has no cell or duplicated genes, or a starting cell holds NaN,
            infinite or negative values.
        KeyError
            If ``perturbation`` has a component the model cannot predict, or a name in ``controls`` is not a cell.
        """
        options = self._check_predict_kwargs(options, what="predict")
        stream = self._predict_checked(adata, [str(perturbation)], controls, dose, seed, (modality,), options)
        return next(stream)[1][modality]

    def _predict_checked(
        self,
        adata: AnnData | MuData | None,
        perturbations: list[str],
        controls: Any,
        dose: float,
        seed: int | None,
        modalities: Sequence[str],
        options: dict[str, Any],
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """The shared preamble of every prediction, then the model's :meth:`_predict`.

        Checks, in this order: the modalities, that the model is trained (a RuntimeError), the perturbation labels
        (canonical form, :meth:`_query`: ``"B+A"`` is predicted as ``"A+B"`` and given back under the label asked
        for), the dose (a finite number above 0, :func:`vcell._utils.check_dose`), the data (the model's genes, at
        least one cell) and the starting cells (no NaN, infinite or negative value in the rows read).
        """
        for modality in modalities:
            self._check_modality(modality)
        self._require_trained()
        canonical = self._query(perturbations)
        dose = check_dose(dose)
        adata = self._check_adata(adata)
        check_shape(adata, what="predict")
        idx = self._control_indices(adata, controls)
        self._check_rows(adata, idx)
        stream = self._predict(adata, idx, canonical, dose=dose, seed=seed, modalities=tuple(modalities), **options)
        if canonical == list(perturbations):
            return stream
        return ((given, out) for given, (_, out) in zip(perturbations, stream, strict=True))

    def _predict(
        self,
        adata: AnnData,
        idx: np.ndarray,
        perturbations: list[str],
        *,
        dose: float,
        seed: int | None,
        modalities: tuple[str, ...],
        **options: Any,
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """The model's batched prediction: ``(perturbation, {modality: array})`` per perturbation, in order.

        Called after the shared checks: ``adata`` is an AnnData with the model's genes (a MuData's ``rna``, proteins
        attached), ``idx`` the integer indices of the starting cells, ``modalities`` valid for the model, which is
        trained; ``options`` are the model's ``capabilities.predict_options``. An implementation checks the
        perturbations and options now (KeyError/ValueError before anything is computed) and returns an iterator that
        computes each perturbation's arrays (float32, ``(len(idx), n_features)``) when it is reached, sharing what
        the perturbations have in common (reading and encoding the cells).
        """
        msg = f"{type(self).__name__} implements neither _predict (batched prediction) nor predict"
        raise NotImplementedError(msg)

    # ---------------------------------------------------------------- many perturbations of the same cells
    def predict_many(
        self,
        adata: AnnData | MuData | None = None,
        *,
        perturbations: str | Sequence[str],
        controls: Any = None,
        dose: float = 1.0,
        seed: int | None = None,
        modality: str = "rna",
        space: Any = None,
        **kwargs: Any,
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Counterfactuals of the same control cells under each of several perturbations, one array at a time.

        Gives, in the order of ``perturbations``, ``(p, model.predict(adata, perturbation=p, controls=controls,
        dose=dose, seed=seed, modality=modality, **kwargs))``: the same numbers, but the work the perturbations share
        (reading the control cells, encoding them, decoding their own state) is done once for all of them, in the
        model's batched :meth:`_predict` (a subclass that changed ``predict`` without its own ``_predict`` is
        honoured: ``predict`` is then called per perturbation). Arguments and perturbations are checked before this
        returns; each array is computed when the iterator reaches it, so memory holds one perturbation's prediction
        at a time unless the caller keeps them (``dict(model.predict_many(...))`` keeps all).

        Parameters
        ----------
        adata, controls, dose, seed, modality, space
            As in :meth:`predict`.
        perturbations
            Canonical conditions, e.g. ``["IFNb", "A+B"]``.
        **kwargs
            Further options of this model's :meth:`predict` (``capabilities.predict_options``, e.g. FlowMatching's
            ``n_steps``); a ValueError names an unknown one and those accepted.

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
            adata, perts, controls=controls, dose=dose, seed=seed, modalities=(modality,), space=space, **kwargs
        )
        return ((p, out[modality]) for p, out in stream)

    def _check_predict_kwargs(self, kwargs: dict[str, Any] | None, *, what: str = "predict_kwargs") -> dict[str, Any]:
        """``kwargs`` as a dict; ValueError naming any key not in ``capabilities.predict_options``, and those."""
        kwargs = dict(kwargs or {})
        shared = sorted(set(kwargs) & set(SHARED_PREDICT_ARGS))
        if shared:
            msg = f"{what}: {shared} are arguments of their own, not predict options; pass them directly"
            raise ValueError(msg)
        accepted = sorted(self.capabilities.predict_options)
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            msg = (
                f"{what}: unknown option(s) {unknown} for {type(self).__name__}.predict; "
                f"accepted: {accepted if accepted else 'none'}"
            )
            raise ValueError(msg)
        check_options(**kwargs)
        return kwargs

    def _batched_predict(self) -> bool:
        """Whether :meth:`_predict` computes what this model's ``predict`` does.

        True unless a subclass overrode ``predict`` below the class that implements ``_predict`` (a user's model that
        changed ``predict``): then batched prediction calls that ``predict`` per perturbation.
        """
        mro = type(self).__mro__
        owner = {name: next(i for i, c in enumerate(mro) if name in vars(c)) for name in ("predict", "_predict")}
        return owner["predict"] >= owner["_predict"]

    def _predict_many(
        self,
        adata: AnnData | MuData | None,
        perturbations: list[str],
        *,
        controls: Any,
        dose: float,
        seed: int | None,
        modalities: Sequence[str] = ("rna",),
        space: Any = "model",
        **kwargs: Any,
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """Batched :meth:`predict`: ``(perturbation, {modality: array})`` per perturbation, in order.

        What :meth:`predict_many` and :func:`vcell.tl.predict_perturbation` call: the options checked, then the shared
        checks and the model's :meth:`_predict` (inputs checked before this returns, nothing computed until then).
        When a subclass changed ``predict`` (:meth:`_batched_predict`), that ``predict`` is called per perturbation
        and modality instead (``modality=`` only for ``"prot"``, so that a ``predict`` without it works). RNA comes
        in ``space`` (as in :meth:`predict`; by default ``"model"``: the model's own space, unconverted, what
        :func:`vcell.bench.run` scores); each step runs as a call inside a prediction (:func:`with_space`).
        """
        kwargs = self._check_predict_kwargs(kwargs, what="predict options")
        _, factor = self._space_request(space, modalities)
        stream = _in_context(self._predict_stream(adata, perturbations, controls, dose, seed, modalities, kwargs))
        if factor is None:
            return stream
        return ((p, {m: rescale_log1p(x, factor) if m == "rna" else x for m, x in out.items()}) for p, out in stream)

    def _predict_stream(
        self,
        adata: AnnData | MuData | None,
        perturbations: list[str],
        controls: Any,
        dose: float,
        seed: int | None,
        modalities: Sequence[str],
        kwargs: dict[str, Any],
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """:meth:`_predict_many`'s stream in the model's own space (its inputs checked before this returns)."""
        if self._batched_predict():
            return self._predict_checked(adata, perturbations, controls, dose, seed, modalities, kwargs)
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
