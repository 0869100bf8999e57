"""The model contract (``vcell.model.PerturbationModel``, docs/adding_a_model.md), checked for every model class.

The classes come from ``vcell.model.__all__`` (:func:`vcell.model._base.model_classes`): a new model is run through
every test here as soon as it is exported, and :func:`test_every_model_class_is_exported_and_covered` fails for a
model class defined in ``vcell.model`` but not exported, or without tiny hyperparameters in :data:`SIZES`.

Each model is set up on a tiny simulated screen, trained one epoch, and checked for: predictions (shape, float32,
finite, gene order), ``predict_many`` against ``predict``, ``sample`` where ``capabilities.can_sample`` says so (and a
ValueError where not), options and capability declarations against what the class does, a save/load round trip,
proteins (``capabilities.models_proteins``) and a backed h5ad with a sparse matrix.
"""

from __future__ import annotations

import inspect
import re

import anndata as ad
import numpy as np
import pytest
import torch
from scipy import sparse

import vcell
from vcell._constants import CONTROL
from vcell.model import Capabilities, PerturbationModel
from vcell.model._base import SHARED_PREDICT_ARGS, model_classes

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
SETUP = {"perturbation_key": "perturbation", "control": "control", "covariate_keys": ["cell_type"]}

#: tiny hyperparameters of every exported model (a model missing here fails the coverage test): constructor and
#: extra ``train`` arguments
SIZES: dict[str, tuple[dict, dict]] = {
    "Baseline": ({"method": "additive"}, {}),
    "CausalVAE": ({"n_latent": 4, "n_hidden": 16}, {}),
    "ResidualDiffusion": ({"mean_model": "additive", "n_components": 3, "n_hidden": 16, "n_layers": 1}, {}),
    "FlowMatching": ({"n_components": 5, "n_hidden": 16, "n_layers": 2, "coupling_size": 64}, {}),
    "CellJEPA": ({"n_latent": 8, "n_modules": 4, "n_hidden": 16}, {"pretrain_epochs": 1}),
}
#: cheap options of ``sample`` (fewer solver steps)
SAMPLE_OPTIONS = {"ResidualDiffusion": {"n_steps": 2}, "FlowMatching": {"n_steps": 2}}

#: models that cannot train on a backed h5ad yet (the shared loader of vcell.data is being rolled out): strict xfails,
#: so that each turns into a failure once the model reads backed data, and its entry must then be removed
BACKED_FAILS: dict[str, str] = {}

NAMES = list(model_classes())


def _params(names: list[str], fails: dict[str, str] | None = None) -> list:
    fails = fails or {}
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, raises=ValueError, reason=fails[n])) if n in fails else n
        for n in names
    ]


def _screen(*, protein: bool = False, seed: int = 0):
    args = {"n_cells": 200, "n_genes": 30, "n_perturbations": 3, "n_combos": 1, "cell_types": 2, "seed": seed}
    if protein:
        return vcell.datasets.simulate(protein=True, n_proteins=5, **args)
    return vcell.datasets.simulate(**args)


def _build(name: str, data):
    cls = model_classes()[name]
    if name not in SIZES:
        pytest.fail(f"add tiny hyperparameters of {name} to SIZES in tests/model/test_contract.py")
    init, _ = SIZES[name]
    return cls(data, **init)


def _train(model, name: str) -> None:
    model.train(max_epochs=1, seed=0, accelerator="cpu", trainer_kwargs=QUIET, **SIZES[name][1])


def _fit(name: str, data):
    model_classes()[name].setup_anndata(data, **SETUP)
    model = _build(name, data)
    _train(model, name)
    return model


def _controls(adata: ad.AnnData) -> np.ndarray:
    return np.flatnonzero((adata.obs["vcell_perturbation"].astype(str) == CONTROL).to_numpy())


def _perturbations(model) -> list[str]:
    """A single, the seen combination, and control."""
    seen = sorted(set(model.adata.obs["vcell_perturbation"].astype(str)) - {CONTROL})
    return [seen[0], next(p for p in seen if "+" in p), CONTROL]


@pytest.fixture(scope="module", params=NAMES)
def fitted(request):
    """``(name, adata, model)``: a model trained one epoch on a tiny RNA screen, and its initial state."""
    name = request.param
    adata = _screen()
    model_classes()[name].setup_anndata(adata, **SETUP)
    model = _build(name, adata)
    before = {k: v.detach().clone() for k, v in model.module.named_parameters()}
    _train(model, name)
    return name, adata, model, before


# ------------------------------------------------------------------------------------------ declarations
def test_every_model_class_is_exported_and_covered():
    """Every concrete model class of vcell.model is exported (and so tested here) and has tiny SIZES."""

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    defined = {
        c.__name__
        for c in subclasses(PerturbationModel)
        if c.__module__.startswith("vcell.model.") and not c.__name__.startswith("_") and not inspect.isabstract(c)
    }
    assert defined <= set(NAMES), f"model classes not in vcell.model.__all__: {sorted(defined - set(NAMES))}"
    assert set(NAMES) <= set(SIZES), f"no tiny hyperparameters in SIZES for {sorted(set(NAMES) - set(SIZES))}"
    assert {"Baseline", "CausalVAE", "ResidualDiffusion", "FlowMatching", "CellJEPA"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_capabilities_are_declared_and_match_the_class(name):
    cls = model_classes()[name]
    assert "capabilities" in vars(cls), f"{name} must declare its own capabilities"
    caps = cls.capabilities
    assert isinstance(caps, Capabilities)
    assert not inspect.isabstract(cls)
    assert cls._predict is not PerturbationModel._predict, f"{name} must implement the batched _predict hook"
    # predict's own keyword options are exactly the declared ones (a documented predict, or the base's **options)
    params = inspect.signature(cls.predict).parameters
    own = [
        n
        for n, p in params.items()
        if n != "self" and n not in SHARED_PREDICT_ARGS and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    assert sorted(own) == sorted(caps.predict_options)
    assert set(inspect.signature(cls._predict).parameters) >= set(caps.predict_options)
    # sample is implemented exactly when declared
    assert (cls.sample is not PerturbationModel.sample) == caps.can_sample
    assert "seed" in inspect.signature(cls.train).parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.train).parameters.values()
    )


def test_capabilities_reject_shared_arguments_as_options():
    with pytest.raises(ValueError, match=r"\['dose'\] are shared arguments"):
        Capabilities(predict_options=("dose",))
    with pytest.raises(AttributeError):
        Capabilities().can_sample = True  # frozen: a subclass declares its own


# ------------------------------------------------------------------------------------------ train, predict
def test_train_matches_learned(fitted):
    name, _, model, before = fitted
    assert model.is_trained_
    trainable = {k for k, p in model.module.named_parameters() if p.requires_grad}
    if model.capabilities.learned:
        after = dict(model.module.named_parameters())
        assert any(not torch.equal(before[k], after[k].detach()) for k in trainable), f"{name}: train changed nothing"
    else:
        assert not trainable, f"{name} declares learned=False but has trainable parameters"


def test_predict_shape_finite_and_gene_order(fitted):
    name, adata, model, _ = fitted
    ctrl = _controls(adata)
    for p in _perturbations(model):
        out = model.predict(adata, perturbation=p, seed=0)
        assert isinstance(out, np.ndarray)
        assert out.dtype == np.float32
        assert out.shape == (ctrl.size, adata.n_vars)
        assert np.isfinite(out).all()
    assert model.var_names_ == list(adata.var_names)
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[ctrl[:7]] = True
    assert model.predict(adata, perturbation=_perturbations(model)[0], controls=mask).shape == (7, adata.n_vars)
    reordered = adata[:, adata.var_names[::-1]].copy()
    with pytest.raises(ValueError, match="different order"):
        model.predict(reordered, perturbation=_perturbations(model)[0])
    with pytest.raises(KeyError, match="NOPE"):
        model.predict(adata, perturbation="NOPE")
    with pytest.raises(ValueError, match="modality"):
        model.predict(adata, perturbation=_perturbations(model)[0], modality="prot")  # no proteins registered


def test_predict_many_equals_predict(fitted):
    _, adata, model, _ = fitted
    perts = _perturbations(model)
    many = dict(model.predict_many(adata, perturbations=perts, dose=0.7, seed=0))
    assert list(many) == perts
    for p in perts:
        np.testing.assert_array_equal(many[p], model.predict(adata, perturbation=p, dose=0.7, seed=0))
    with pytest.raises(KeyError, match="NOPE"):
        model.predict_many(adata, perturbations=[perts[0], "NOPE"])  # checked before iterating


def test_predict_options_are_checked(fitted):
    name, adata, model, _ = fitted
    pert = _perturbations(model)[0]
    accepted = sorted(model.capabilities.predict_options)
    with pytest.raises(ValueError, match=rf"\['bogus'\] for {name}\.predict"):
        vcell.tl.predict_perturbation(adata.copy(), model, perturbations=pert, predict_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match=r"\['dose'\] are arguments of their own"):
        vcell.tl.predict_perturbation(adata.copy(), model, perturbations=pert, predict_kwargs={"dose": 2.0})
    with pytest.raises(ValueError, match=re.escape(f"accepted: {accepted if accepted else 'none'}")):
        model.predict_many(adata, perturbations=[pert], bogus=1)


# ------------------------------------------------------------------------------------------ sample
def test_sample_where_declared(fitted):
    name, adata, model, _ = fitted
    pert = _perturbations(model)[0]
    if model.capabilities.can_sample:
        cells = model.sample(adata, perturbation=pert, n_cells=12, seed=0, **SAMPLE_OPTIONS.get(name, {}))
        assert isinstance(cells, ad.AnnData)
        assert cells.shape == (12, adata.n_vars)
        assert list(cells.var_names) == list(adata.var_names)
        assert (cells.obs["vcell_perturbation"].astype(str) == pert).all()
        assert np.isfinite(np.asarray(cells.X)).all()
        out = vcell.tl.sample_perturbation(
            adata, model, perturbations=pert, n_samples=5, seed=0, **SAMPLE_OPTIONS.get(name, {})
        )
        assert out.n_obs == 5
    else:
        able = [n for n, c in model_classes().items() if c.capabilities.can_sample]
        with pytest.raises(ValueError, match=rf"{name} cannot sample cells.*models that can: {', '.join(able)}"):
            model.sample(adata, perturbation=pert)
        with pytest.raises(ValueError, match=rf"{name} cannot sample"):
            vcell.tl.sample_perturbation(adata, model, perturbations=pert)


# ------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip(fitted, tmp_path):
    name, adata, model, _ = fitted
    perts = _perturbations(model)
    model.save(tmp_path / name, overwrite=True, save_anndata=False)
    loaded = type(model).load(tmp_path / name, adata=adata, accelerator="cpu")
    assert type(loaded) is type(model)
    assert loaded.is_trained_
    for p in perts:
        np.testing.assert_array_equal(
            loaded.predict(adata, perturbation=p, seed=0), model.predict(adata, perturbation=p, seed=0)
        )


# ------------------------------------------------------------------------------------------ proteins
@pytest.mark.parametrize("name", NAMES)
def test_proteins_match_models_proteins(name, tmp_path, protein_round_trip):
    mdata = _screen(protein=True)
    cls = model_classes()[name]
    cls.setup_anndata(mdata, protein_modality="prot", **SETUP)
    if not cls.capabilities.models_proteins:
        with pytest.raises(ValueError, match=f"{name} does not model proteins"):
            _build(name, mdata)
        return
    model = _build(name, mdata)
    _train(model, name)
    rna = mdata["rna"]
    n_ctrl = _controls(rna).size
    pert = _perturbations(model)[0]
    prot = model.predict(mdata, perturbation=pert, modality="prot")
    assert prot.shape == (n_ctrl, mdata["prot"].n_vars)
    assert prot.dtype == np.float32
    finite = np.isfinite(prot).all(axis=1)
    assert finite.any()
    assert (
        finite | np.isnan(prot).all(axis=1)
    ).all()  # a cell's proteins are predicted, or NaN (a baseline's unmeasured cells)
    out = model.predict(mdata, perturbation=pert)
    assert out.shape == (n_ctrl, rna.n_vars)
    many = dict(model.predict_many(mdata, perturbations=[pert, CONTROL], modality="prot"))
    np.testing.assert_array_equal(many[pert], prot)
    protein_round_trip(model, mdata, pert, tmp_path / name, out, prot, load_adata=mdata)


# ------------------------------------------------------------------------------------------ backed input
@pytest.mark.parametrize("name", _params(NAMES, BACKED_FAILS))
def test_backed_sparse_h5ad(name, tmp_path):
    adata = _screen()
    adata.X = sparse.csr_matrix(adata.X)
    path = tmp_path / "screen.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    model = _fit(name, backed)
    pert = _perturbations(model)[0]
    out = model.predict(backed, perturbation=pert)
    assert out.shape == (_controls(backed).size, backed.n_vars)
    assert np.isfinite(out).all()
    # the same numbers as from the matrix in memory, read the same way
    memory = ad.read_h5ad(path)
    np.testing.assert_allclose(model.predict(memory, perturbation=pert), out, rtol=1e-6, atol=1e-6)
