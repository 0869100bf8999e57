"""Malformed inputs give a clear error naming the key, label or value (issue 20: no silent wrong answers).

One table (:data:`CASES`) of malformed inputs, each with the exception it must raise and a regex naming the offending
key or value; every row but those marked as kept answered with a wrong number or an unclear error before. Then the
same kinds across every model class (doses, training arguments, predicting before training, NaN in the cells read, label order), the writers
that refuse to overwrite, and the documented behaviours that go with them (controls at dose 0, low-depth counts).
Tiny data: the whole file runs in well under 30 s.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import vcell
from vcell._constants import CONTROL, DOSE_COL, PERT_COL
from vcell.model import Baseline
from vcell.model._base import model_classes

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
SETUP = {"perturbation_key": "perturbation", "control": "control", "covariate_keys": ["cell_type"]}
#: tiny hyperparameters of every model (as tests/model/test_contract.py) and extra train arguments
SIZES: dict[str, tuple[dict, dict]] = {
    "Baseline": ({"method": "additive"}, {}),
    "CausalVAE": ({"n_latent": 4, "n_hidden": 8}, {}),
    "ResidualDiffusion": ({"mean_model": "additive", "n_components": 3, "n_hidden": 8, "n_layers": 1}, {}),
    "FlowMatching": ({"n_components": 4, "n_hidden": 8, "n_layers": 1, "coupling_size": 32}, {}),
    "CellJEPA": ({"n_latent": 4, "n_modules": 2, "n_hidden": 8, "n_layers": 1, "n_heads": 1}, {"pretrain_epochs": 1}),
}
NAMES = list(model_classes())


def screen(seed: int = 0, **kw) -> ad.AnnData:
    """A tiny simulated screen: 3 singles and one combination, 2 cell types, NB counts (float32 CSR)."""
    args = {"n_cells": 120, "n_genes": 12, "n_perturbations": 3, "n_combos": 1, "cell_types": 2, "seed": seed}
    return vcell.datasets.simulate(**{**args, **kw})


def perturbed(adata: ad.AnnData, n: int) -> pd.Index:
    return adata.obs_names[(adata.obs["perturbation"] != CONTROL).to_numpy()][:n]


def controls(adata: ad.AnnData) -> np.ndarray:
    return np.flatnonzero((adata.obs["perturbation"] == CONTROL).to_numpy())


def fitted_baseline(adata: ad.AnnData | None = None) -> tuple[ad.AnnData, Baseline]:
    adata = screen() if adata is None else adata
    Baseline.setup_anndata(adata, **SETUP)
    model = Baseline(adata)
    model.train()
    return adata, model


def combo(adata: ad.AnnData) -> str:
    return next(p for p in adata.obs["perturbation"].astype(str).unique() if "+" in p)


def single(adata: ad.AnnData) -> str:
    return next(p for p in sorted(adata.obs["perturbation"].astype(str).unique()) if p != CONTROL and "+" not in p)


# ------------------------------------------------------------------------------------------------ the table
def _with_doses(values, n: int = 3) -> Callable[[], None]:
    def run() -> None:
        adata = screen()
        col = adata.obs["dose"].astype(object if isinstance(values, str) else np.float64)
        col.loc[perturbed(adata, n)] = values
        adata.obs["dose"] = col
        Baseline.setup_anndata(adata, dose_key="dose", **SETUP)

    return run


def _setup_on(change: Callable[[ad.AnnData], ad.AnnData | None], **setup) -> Callable[[], None]:
    def run() -> None:
        adata = screen()
        changed = change(adata)
        adata = adata if changed is None else changed
        Baseline.setup_anndata(adata, **{**SETUP, **setup})

    return run


def _nan_covariate(adata: ad.AnnData) -> None:
    col = adata.obs["cell_type"].astype(object)
    col.iloc[5] = np.nan
    adata.obs["cell_type"] = col


def _numeric_labels(adata: ad.AnnData) -> None:
    adata.obs["perturbation"] = pd.factorize(adata.obs["perturbation"])[0]


def _dup_genes(adata: ad.AnnData) -> None:
    adata.var_names = ["G0001", *adata.var_names[1:]]


def _dense(adata: ad.AnnData, value: float, where: tuple[int, int] = (7, 3)) -> None:
    X = adata.X.toarray()
    X[where] = value
    adata.X = X


def _cp10k(adata: ad.AnnData) -> None:  # normalised, not log-transformed: neither counts nor log data
    X = adata.X.toarray()
    adata.X = X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4


def _label(adata: ad.AnnData, label: str) -> None:
    col = adata.obs["perturbation"].astype(str).to_numpy()
    col[(col != CONTROL).nonzero()[0][:2]] = label
    adata.obs["perturbation"] = col


def _split_label(label: str) -> Callable[[], None]:
    def run() -> None:
        adata = screen()
        _label(adata, label)
        vcell.bench.split(adata, kind="random_cells", perturbation_key="perturbation", seed=0)

    return run


def _harmonize_label(label: str) -> Callable[[], None]:
    def run() -> None:
        adata = screen()
        _label(adata, label)
        vcell.pp.harmonize(adata, perturbation_key="perturbation", control="control")

    return run


def _after_setup(change: Callable[[ad.AnnData, Baseline], object]) -> Callable[[], None]:
    def run() -> None:
        adata, model = fitted_baseline()
        change(adata, model)

    return run


def _retrain_with_bad_dose(adata: ad.AnnData, model: Baseline) -> None:
    adata.obs.loc[perturbed(adata, 2), DOSE_COL] = -1.0  # changed after setup_anndata
    model.train()


def _dup_obs_controls(adata: ad.AnnData, model: Baseline) -> None:
    other = adata.copy()
    ctrl = controls(other)
    names = other.obs_names.to_numpy().copy()
    names[ctrl[1]] = names[ctrl[0]]
    other.obs_names = names
    model.predict(other, perturbation=single(adata), controls=[names[ctrl[0]]])


def _predict_rows(change: Callable[[np.ndarray, np.ndarray], None]) -> Callable[[ad.AnnData, Baseline], object]:
    def run(adata: ad.AnnData, model: Baseline) -> object:
        other = adata.copy()
        X = other.X.toarray()
        change(X, controls(other))
        other.X = X
        return model.predict(other, perturbation=single(adata))

    return run


def _truncated_h5ad() -> None:
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    full, cut = folder / "full.h5ad", folder / "cut.h5ad"
    screen().write_h5ad(full)
    cut.write_bytes(full.read_bytes()[:4000])
    vcell.datasets.read(cut)


@dataclass
class Case:
    id: str
    run: Callable[[], object]
    exc: type[BaseException]
    match: str


CASES = [
    # doses at setup: the dose column of perturbed cells (controls get 0 whatever it says)
    Case("dose_negative", _with_doses(-1.0), ValueError, r"obs\['dose'\] is zero or negative for 3 perturbed cells"),
    Case("dose_zero", _with_doses(0.0), ValueError, r"obs\['dose'\] is zero or negative for 3 perturbed cells"),
    # (NaN and inf were refused before: kept, documented here beside the new rows)
    Case("dose_nan", _with_doses(np.nan), ValueError, r"obs\['dose'\] is missing \(NaN\) or infinite for 3 perturbed"),
    Case("dose_inf", _with_doses(np.inf), ValueError, r"obs\['dose'\] is missing \(NaN\) or infinite for 3 perturbed"),
    Case("dose_text_negative", _with_doses("-5"), ValueError, r"obs\['dose'\] value '-5' of label .* zero or negative"),
    Case(
        "dose_changed_after_setup",
        _after_setup(_retrain_with_bad_dose),
        ValueError,
        r"obs\['vcell_dose'\] of 2 perturbed training cells is not a finite number above 0 \(values -1\)",
    ),
    # labels
    Case(
        "control_int",
        _setup_on(_numeric_labels, control=0),
        ValueError,
        r"control must be a string or a list of strings, got 0 \(int\).*control='0'",
    ),
    Case(
        "control_int_in_list",
        _setup_on(lambda a: None, control=["control", 1]),
        ValueError,
        r"control must hold non-empty strings, got 1 \(labels are matched as text: pass '1'\)",
    ),
    Case(
        "numeric_label_column",
        _setup_on(_numeric_labels, control="control"),
        ValueError,
        r"no control cells.*obs\['perturbation'\] holds numbers, which are matched as text.*control='0'",
    ),
    # harmonize refused these before; bench.split and predict read them silently as other labels: now all refuse
    Case(
        "harmonize_trailing_sep",
        _harmonize_label("G0001+G0002+"),
        ValueError,
        r"ambiguous perturbation label\(s\) in obs\['perturbation'\]: 'G0001\+G0002\+' \(empty component",
    ),
    Case(
        "split_trailing_sep",
        _split_label("G0001+G0002+"),
        ValueError,
        r"ambiguous perturbation label\(s\) in adata.obs\['perturbation'\]: 'G0001\+G0002\+' \(empty component",
    ),
    Case(
        "harmonize_repeated",
        _harmonize_label("G0001+G0001"),
        ValueError,
        r"'G0001\+G0001' \(component 'G0001' appears twice\)",
    ),
    Case(
        "split_repeated", _split_label("G0001+G0001"), ValueError, r"'G0001\+G0001' \(component 'G0001' appears twice\)"
    ),
    # covariates, shapes, names
    Case(
        "covariate_nan",
        _setup_on(_nan_covariate),
        ValueError,
        r"covariate key obs\['cell_type'\] has 1 cells with a missing value",
    ),
    Case(
        "batch_nan",
        _setup_on(_nan_covariate, covariate_keys=[], batch_key="cell_type"),
        ValueError,
        r"batch_key obs\['cell_type'\] has 1 cells with a missing value",
    ),
    Case("zero_genes", _setup_on(lambda a: a[:, :0].copy()), ValueError, r"0 genes"),
    Case("zero_cells", _setup_on(lambda a: a[:0].copy()), ValueError, r"0 cells"),
    Case("duplicate_var_names", _setup_on(_dup_genes), ValueError, r"adata.var_names are not unique: 'G0001' appear"),
    # the expression matrix
    Case(
        "x_nan",
        _setup_on(lambda a: _dense(a, np.nan)),
        ValueError,
        r"adata.X contains NaN or infinite values \(e.g. in row 7\)",
    ),
    Case(
        "x_normalised_not_logged",
        _setup_on(_cp10k),
        ValueError,
        r"adata.X holds non-integer values up to .*: neither raw counts .* nor log-normalised",
    ),
    # prediction inputs
    Case(
        "predict_nan_control_row",
        _after_setup(_predict_rows(lambda X, c: X.__setitem__((c[2], 0), np.nan))),
        ValueError,
        r"adata.X contains NaN or infinite values \(e.g. in cell '\w+', row \d+\)",
    ),
    Case(
        "predict_negative_control_row",
        _after_setup(_predict_rows(lambda X, c: X.__setitem__((c[2], 0), -3.0))),
        ValueError,
        r"adata.X contains negative values \(min -3, e.g. in cell",
    ),
    Case(
        "predict_zero_genes",
        _after_setup(lambda a, m: m.predict(a[:, :0].copy(), perturbation=single(a))),
        ValueError,
        r"adata has 0 genes; expected the 12 genes",
    ),
    Case(
        "predict_zero_cells",
        _after_setup(lambda a, m: m.predict(a[:0].copy(), perturbation=single(a))),
        ValueError,
        r"0 cells",
    ),
    Case(
        "predict_duplicate_var_names",
        _after_setup(lambda a, m: (_dup_genes(b := a.copy()), m.predict(b, perturbation=single(a)))),
        ValueError,
        r"adata.var_names are not unique: 'G0001'",
    ),
    Case(
        "predict_controls_duplicate_obs_names",
        _after_setup(_dup_obs_controls),
        ValueError,
        r"adata.obs_names are not unique \('\w+' appear more than once\), so controls= given as obs names",
    ),
    Case(
        "predict_controls_float",
        _after_setup(lambda a, m: m.predict(perturbation=single(a), controls=[0.5])),
        ValueError,
        r"controls must be a boolean mask, integer indices or obs names, got float64",
    ),
    Case(
        "predict_label_trailing_sep",
        _after_setup(lambda a, m: m.predict(perturbation=combo(a) + "+")),
        ValueError,
        r"ambiguous perturbation label\(s\) in perturbation: '.*\+' \(empty component",
    ),
    Case(
        "predict_label_repeated",
        _after_setup(lambda a, m: m.predict(perturbation="G0001+G0001")),
        ValueError,
        r"'G0001\+G0001' \(component 'G0001' appears twice\)",
    ),
    Case(
        "predict_label_empty",
        _after_setup(lambda a, m: m.predict(perturbation=" ")),
        ValueError,
        r"perturbation holds an empty label",
    ),
    Case(
        "predict_before_train",
        lambda: (lambda a: (Baseline.setup_anndata(a, **SETUP), Baseline(a).predict(perturbation=single(a))))(screen()),
        RuntimeError,
        r"the Baseline model is not trained: call model.train\(\)",
    ),
    # training arguments of the closed-form baseline (checked as for every model)
    Case(
        "baseline_max_epochs_zero",
        _after_setup(lambda a, m: m.train(max_epochs=0)),
        ValueError,
        r"max_epochs must be a positive integer, got 0",
    ),
    Case(
        "baseline_ridge_negative",
        lambda: Baseline(fitted_baseline()[0], ridge=-1.0),
        ValueError,
        r"ridge must be a finite number >= 0, got -1.0",
    ),
    Case(
        "baseline_n_components_zero",
        lambda: Baseline(fitted_baseline()[0], n_components=0),
        ValueError,
        r"n_components must be a positive integer, got 0",
    ),
    # tools and writers
    Case(
        "tl_dose_nan",
        _after_setup(lambda a, m: vcell.tl.predict_perturbation(a, m, perturbations=single(a), dose=float("nan"))),
        ValueError,
        r"dose must be a finite number above 0 .*got nan",
    ),
    Case(
        "tl_same_condition_twice",
        _after_setup(
            lambda a, m: vcell.tl.predict_perturbation(
                a, m, perturbations=[combo(a), "+".join(combo(a).split("+")[::-1])]
            )
        ),
        ValueError,
        r"perturbations contains duplicates \(canonical label: spellings given\)",
    ),
    Case(
        "tl_overwrite_layer",
        _after_setup(
            lambda a, m: (
                a.layers.__setitem__("vcell_pred", a.X.copy()),
                vcell.tl.predict_perturbation(a, m, perturbations=single(a)),
            )
        ),
        ValueError,
        r"predict_perturbation would overwrite adata.layers\['vcell_pred'\].*overwrite=True",
    ),
    Case(
        "tl_registered_layer",
        lambda: (
            lambda a: (
                a.layers.__setitem__("counts", a.X.copy()),
                Baseline.setup_anndata(a, layer="counts", **SETUP),
                (m := Baseline(a)).train(),
                vcell.tl.predict_perturbation(a, m, perturbations=single(a), key_added="counts", overwrite=True),
            )
        )(screen()),
        ValueError,
        r"would write layer\(s\) \['counts'\], the expression matrix the model reads",
    ),
    Case(
        "split_overwrite",
        lambda: (
            lambda a: (
                vcell.bench.split(a, kind="random_cells", seed=0, perturbation_key="perturbation"),
                vcell.bench.split(a, kind="random_cells", seed=1, perturbation_key="perturbation"),
            )
        )(screen()),
        ValueError,
        r"split would overwrite adata.obs\['vcell_split'\], adata.uns\['vcell_split'\]",
    ),
    Case(
        "split_key_is_labels",
        lambda: vcell.bench.split(
            screen(), kind="random_cells", key_added="perturbation", perturbation_key="perturbation"
        ),
        ValueError,
        r"key_added 'perturbation' is the perturbation_key",
    ),
    Case(
        "log_normalize_overwrite",
        lambda: (lambda a: (vcell.pp.log_normalize(a), vcell.pp.log_normalize(a)))(screen()),
        ValueError,
        r"log_normalize would overwrite adata.layers\['log1p_cp10k'\]",
    ),
    Case(
        "log_normalize_onto_counts",
        lambda: (
            lambda a: (
                a.layers.__setitem__("counts", a.X.copy()),
                vcell.pp.log_normalize(a, layer="counts", key_added="counts", overwrite=True),
            )
        )(screen()),
        ValueError,
        r"would write layer\(s\) \['counts'\]",
    ),
    # files
    Case("truncated_h5ad", _truncated_h5ad, OSError, r"cannot read '.*cut\.h5ad' as an \.h5ad file \(4000 bytes\)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_is_named(case):
    with pytest.raises(case.exc, match=case.match):
        case.run()


def test_table_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


# ------------------------------------------------------------------------------------------------ every model
@pytest.fixture(scope="module")
def models() -> dict[str, tuple[ad.AnnData, object]]:
    """Every exported model class, trained one epoch on its own tiny screen."""
    out = {}
    for name in NAMES:
        adata = screen()
        cls = model_classes()[name]
        cls.setup_anndata(adata, **SETUP)
        model = cls(adata, **SIZES[name][0])
        model.train(max_epochs=1, seed=0, accelerator="cpu", trainer_kwargs=QUIET, **SIZES[name][1])
        out[name] = (adata, model)
    return out


def test_sizes_cover_every_model():
    assert set(SIZES) == set(NAMES)


BAD_TRAIN = [
    ({"max_epochs": 0}, r"max_epochs must be a positive integer, got 0"),
    ({"max_epochs": -1}, r"max_epochs must be a positive integer, got -1"),
    ({"max_epochs": 2.5}, r"max_epochs must be a positive integer, got 2.5"),
    ({"batch_size": 0}, r"batch_size must be a positive integer, got 0"),
    ({"lr": 0.0}, r"lr must be a finite number above 0, got 0.0"),
    ({"lr": float("nan")}, r"lr must be a finite number above 0, got nan"),
    ({"validation_fraction": 1.0}, r"validation_fraction must be a finite number in \[0, 1\), got 1.0"),
    ({"validation_fraction": -0.1}, r"validation_fraction must be a finite number in \[0, 1\), got -0.1"),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("args", "match"), BAD_TRAIN, ids=[next(iter(a.items())).__repr__() for a, _ in BAD_TRAIN])
def test_train_arguments_are_checked_by_every_model(name, args, match):
    adata = screen()
    cls = model_classes()[name]
    cls.setup_anndata(adata, **SETUP)
    model = cls(adata, **SIZES[name][0])
    with pytest.raises(ValueError, match=match):
        model.train(**{**SIZES[name][1], **args}, accelerator="cpu", trainer_kwargs=QUIET)
    assert not model.is_trained_


@pytest.mark.parametrize("name", NAMES)
def test_training_reads_checked_doses(name):
    """A dose changed after setup (-1: CausalVAE read it as unperturbed; Baseline divided by it) stops training."""
    adata = screen()
    cls = model_classes()[name]
    cls.setup_anndata(adata, **SETUP)
    model = cls(adata, **SIZES[name][0])
    adata.obs.loc[perturbed(adata, 4), DOSE_COL] = [-1.0, 0.0, np.nan, np.inf]
    with pytest.raises(ValueError, match=r"obs\['vcell_dose'\] of 4 perturbed training cells .*values -1, 0, nan, inf"):
        model.train(max_epochs=1, accelerator="cpu", trainer_kwargs=QUIET, **SIZES[name][1])


@pytest.mark.parametrize("name", NAMES)
def test_predict_before_train_is_vcells_error(name):
    adata = screen()
    cls = model_classes()[name]
    cls.setup_anndata(adata, **SETUP)
    model = cls(adata, **SIZES[name][0])
    with pytest.raises(RuntimeError, match=rf"the {name} model is not trained: call model.train\(\)"):
        model.predict(perturbation=single(adata))
    if model.capabilities.can_sample:
        with pytest.raises(RuntimeError, match="not trained"):
            model.sample(perturbation=single(adata))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dose", [0.0, -1.0, float("nan"), float("inf"), "1", None, True], ids=repr)
def test_every_model_refuses_a_bad_dose(models, name, dose):
    adata, model = models[name]
    p = single(adata)
    with pytest.raises(ValueError, match=r"dose must be .*above 0"):
        model.predict(perturbation=p, dose=dose)
    with pytest.raises(ValueError, match=r"dose must be .*above 0"):
        dict(model.predict_many(perturbations=[p], dose=dose))
    if model.capabilities.can_sample:
        with pytest.raises(ValueError, match=r"dose must be .*above 0"):
            model.sample(perturbation=p, dose=dose, n_cells=2)


@pytest.mark.parametrize("name", NAMES)
def test_combination_in_either_order_is_one_prediction(models, name):
    """'B+A' is 'A+B' (CausalVAE took another path for the reversed spelling: different numbers)."""
    adata, model = models[name]
    ab = combo(adata)
    ba = "+".join(ab.split("+")[::-1])
    np.testing.assert_array_equal(model.predict(perturbation=ba, seed=0), model.predict(perturbation=ab, seed=0))
    many = dict(model.predict_many(perturbations=[ba, ab], seed=0))
    assert list(many) == [ba, ab]  # given back under the labels asked for
    np.testing.assert_array_equal(many[ba], many[ab])
    if model.capabilities.can_sample:
        kw = {"n_cells": 3, "seed": 0}
        one, two = model.sample(perturbation=ba, **kw), model.sample(perturbation=ab, **kw)
        np.testing.assert_array_equal(one.X, two.X)
        assert set(one.obs[PERT_COL]) == {ab}


@pytest.mark.parametrize("name", NAMES)
def test_nan_in_a_starting_cell_is_named(models, name):
    adata, model = models[name]
    other = adata.copy()
    X = other.X.toarray()
    cell = controls(other)[3]
    X[cell, 2] = np.nan
    other.X = sparse.csr_matrix(X)
    with pytest.raises(
        ValueError, match=rf"NaN or infinite values \(e.g. in cell '{re.escape(other.obs_names[cell])}'"
    ):
        model.predict(other, perturbation=single(adata))
    ok = np.setdiff1d(controls(other), [cell])  # a NaN outside the cells read does not matter
    assert np.isfinite(model.predict(other, perturbation=single(adata), controls=ok, seed=0)).all()


@pytest.mark.parametrize("name", NAMES)
def test_predict_options_are_checked(models, name):
    adata, model = models[name]
    if "batch_size" in model.capabilities.predict_options:
        with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
            model.predict(perturbation=single(adata), batch_size=0)
    if "residual" in model.capabilities.predict_options:
        with pytest.raises(ValueError, match=r"residual must be True or False, got 2"):
            model.predict(perturbation=single(adata), residual=2)
    if model.capabilities.can_sample:
        with pytest.raises(ValueError, match=r"n_cells must be a positive integer, got 2.5"):
            model.sample(perturbation=single(adata), n_cells=2.5)


BAD_HYPERPARAMETERS = {
    "CausalVAE": [
        ({"kl_weight": float("nan")}, "kl_weight"),
        ({"dropout": -0.5}, "dropout"),
        ({"adversary_weight": -1.0}, "adversary_weight"),
        ({"n_latent": 0}, "n_latent"),
    ],
    "ResidualDiffusion": [({"p_uncond": 2.0}, "p_uncond"), ({"n_hidden": -1}, "n_hidden")],
    "CellJEPA": [
        ({"n_heads": 0}, "n_heads"),
        ({"variance_weight": float("nan")}, "variance_weight"),
        ({"n_layers": 0}, "n_layers"),
    ],
    "Baseline": [({"ridge": float("nan")}, "ridge")],
}


@pytest.mark.parametrize(
    ("name", "args", "key"), [(n, a, k) for n, rows in BAD_HYPERPARAMETERS.items() for a, k in rows], ids=str
)
def test_hyperparameters_are_checked(name, args, key):
    adata = screen()
    cls = model_classes()[name]
    cls.setup_anndata(adata, **SETUP)
    with pytest.raises(ValueError, match=rf"^{key} must be"):
        cls(adata, **{**SIZES[name][0], **args})


# ------------------------------------------------------------------------------------------------ writers
def test_predict_perturbation_overwrites_only_when_asked():
    adata, model = fitted_baseline()
    p = single(adata)
    vcell.tl.predict_perturbation(adata, model, perturbations=p)
    first = adata.layers["vcell_pred"].copy()
    for taken in ("vcell_pred", "vcell_pred_source"):  # the layer, the obs column, the uns entry: each refused
        other = adata.copy()
        del other.layers["vcell_pred"]
        if taken == "vcell_pred_source":
            del other.uns["vcell_pred"]
        with pytest.raises(ValueError, match=r"would overwrite adata\.(layers|obs|uns)\["):
            vcell.tl.predict_perturbation(other, model, perturbations=p)
    vcell.tl.predict_perturbation(adata, model, perturbations=p, dose=2.0, overwrite=True)
    assert not np.array_equal(np.nan_to_num(first), np.nan_to_num(adata.layers["vcell_pred"]))
    assert adata.uns["vcell_pred"]["params"]["dose"] == 2.0
    out = vcell.tl.predict_perturbation(adata, model, perturbations=p, return_adata=True)  # writes nothing
    assert out.n_obs == controls(adata).size


def test_split_and_log_normalize_overwrite_when_asked():
    adata = screen()
    vcell.bench.split(adata, kind="random_cells", seed=0, perturbation_key="perturbation")
    vcell.bench.split(adata, kind="random_cells", seed=1, perturbation_key="perturbation", overwrite=True)
    assert adata.uns["vcell_split"]["seed"] == 1
    vcell.pp.log_normalize(adata)
    vcell.pp.log_normalize(adata, target_sum=100.0, overwrite=True)
    assert float(adata.layers["log1p_cp10k"].max()) < np.log1p(100.0) + 1e-5


# ------------------------------------------------------------------------------------------------ documented behaviour
def test_controls_keep_dose_zero():
    """Controls at dose 0 (kang2018, simulate) are fine: harmonize gives every control dose 0 anyway."""
    adata = screen(doses=[1.0, 10.0])
    assert (adata.obs.loc[adata.obs["perturbation"] == CONTROL, "dose"] == 0).all()
    adata.obs.loc[adata.obs["perturbation"] == CONTROL, "dose"] = -5.0  # ignored for controls
    _, model = fitted_baseline(adata)
    assert (adata.obs.loc[adata.obs[PERT_COL] == CONTROL, DOSE_COL] == 0).all()
    assert np.isfinite(model.predict(perturbation=single(adata), dose=10.0)).all()


def test_low_depth_integer_counts_are_counts():
    """Integer values are counts whatever their maximum (a low-depth screen: no count above 20 was 'log data')."""
    adata = screen()
    adata.X = adata.X.minimum(20) if sparse.issparse(adata.X) else np.minimum(adata.X, 20)
    assert adata.X.max() <= 20
    assert vcell.data.is_count_matrix(adata.X)
    _, model = fitted_baseline(adata)
    assert model.counts_
    log = screen()
    vcell.pp.log_normalize(log)
    log.X = log.layers["log1p_cp10k"]
    assert not vcell.data.check_expression(log.X)


def test_numeric_labels_work_when_given_as_text():
    adata = screen()
    adata.obs["code"] = pd.factorize(adata.obs["perturbation"].astype(str))[0]
    ctrl = str(adata.obs.loc[adata.obs["perturbation"] == CONTROL, "code"].iloc[0])
    vcell.pp.harmonize(adata, perturbation_key="code", control=ctrl)
    assert (adata.obs[PERT_COL] == CONTROL).sum() == (adata.obs["perturbation"] == CONTROL).sum()


def test_split_reads_labels_as_harmonize_does():
    """bench.split and harmonize share one parser: 'B+A' and ' A + B ' are 'A+B', controls inside combos dropped."""
    adata = screen()
    ab = combo(adata)
    a, b = ab.split("+")
    col = adata.obs["perturbation"].astype(str).to_numpy()
    rows = np.flatnonzero(col == ab)
    col[rows[0]], col[rows[1]] = f"{b}+{a}", f" {a} + {b} "
    col[np.flatnonzero(col == a)[0]] = f"{a}+control"
    adata.obs["perturbation"] = col
    vcell.bench.split(adata, kind="random_cells", perturbation_key="perturbation", seed=0)
    from vcell.bench._split import cell_conditions

    conds = cell_conditions(adata, "perturbation", CONTROL)
    vcell.pp.harmonize(adata, perturbation_key="perturbation", control=CONTROL)
    np.testing.assert_array_equal(conds.astype(str), adata.obs[PERT_COL].astype(str).to_numpy())


def test_backed_sparse_x_is_accepted(tmp_path):
    adata = screen()
    adata.X = sparse.csr_matrix(adata.X)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    path = tmp_path / "screen.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    _, model = fitted_baseline(backed)
    assert np.isfinite(model.predict(backed, perturbation=single(adata))).all()
    vcell.pp.log_normalize(backed)  # was: "setting an array element with a sequence"
    want = vcell._utils.log1p_cp10k(adata.X)
    np.testing.assert_allclose(backed.layers["log1p_cp10k"].toarray(), want, rtol=1e-6)
    backed.file.close()


def test_evaluate_reads_labels_as_harmonize_does():
    """metrics.evaluate matched labels as plain strings: truth 'B+A' had 'no predicted cells' beside a pred 'A+B'."""
    adata, model = fitted_baseline()
    ab = combo(adata)
    ba = "+".join(ab.split("+")[::-1])
    pred = vcell.tl.predict_perturbation(adata, model, perturbations=ba, return_adata=True, space="log1p_cp10k")
    vcell.pp.log_normalize(adata)
    true = ad.AnnData(adata.layers["log1p_cp10k"], obs=adata.obs[["perturbation"]].copy(), var=adata.var[[]])
    ctrl = true[(true.obs["perturbation"] == CONTROL).to_numpy()].copy()
    true = true[(true.obs["perturbation"] == ab).to_numpy()].copy()
    true.obs["perturbation"] = ba  # the reversed spelling in the truth, the canonical one in pred
    out = vcell.metrics.evaluate(pred, true, ctrl, perturbation_key="perturbation", metrics=["pearson_delta"])
    assert out["perturbation"].astype(str).unique().tolist() == [ab]
    true.obs["perturbation"] = ab + "+"
    with pytest.raises(ValueError, match=r"ambiguous perturbation label\(s\) in true.obs\['perturbation'\]"):
        vcell.metrics.evaluate(pred, true, ctrl, perturbation_key="perturbation", metrics=["pearson_delta"])


def test_boolean_series_controls_follow_cell_names():
    """A boolean Series of another cell order selected cells by position: now by name, or a ValueError."""
    adata, model = fitted_baseline()
    p = single(adata)
    mask = adata.obs["cell_type"].astype(str).eq("type0") & adata.obs["perturbation"].eq(CONTROL)
    want = model.predict(perturbation=p, controls=mask.to_numpy())
    np.testing.assert_array_equal(model.predict(perturbation=p, controls=mask.iloc[::-1]), want)
    with pytest.raises(ValueError, match=r"boolean Series indexed by other cells than adata.obs_names \(12 of"):
        model.predict(perturbation=p, controls=mask.iloc[12:])
