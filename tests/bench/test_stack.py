from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

import vcell
from vcell.bench import Ensemble, Stacked, convex_weights

METRICS = ["pearson_delta", "mse_top_de"]


@pytest.fixture(scope="module")
def sim():
    return vcell.datasets.simulate(n_cells=900, n_genes=40, n_perturbations=6, n_combos=14, frac_epistatic=0.5, seed=4)


def _true_means(adata) -> pd.DataFrame:
    """Mean log1p(CP10k) of every condition in the *whole* screen (held-out cells included)."""
    from vcell._utils import group_means, log1p_cp10k

    return group_means(log1p_cp10k(adata.X), adata.obs["perturbation"].astype(str).to_numpy())


class _Oracle:
    """A member that knows the whole screen: the true mean of each condition, or noise where told.

    ``noisy(condition, train)`` says which conditions get noise instead of the truth.
    """

    def __init__(self, name, adata, noisy=lambda cond, train: False, scale=2.0, truth=True):
        self.name = name
        self.truth = truth
        self.means = _true_means(adata)
        self.noisy = noisy
        self.scale = scale
        self.calls = 0

    def fit_predict(self, train, requests, *, seed, covariate_keys, layer):
        self.calls += 1
        rng = np.random.default_rng(seed)
        out = {}
        for r in requests:
            mu = self.means.loc[r.perturbation if self.truth else "control"].to_numpy()
            if self.noisy(r.perturbation, train):
                mu = mu + rng.normal(0, self.scale, mu.size)
            out[r.condition] = np.tile(mu, (len(r.controls), 1)).astype(np.float32)
        return out


def _run(sim, models, split="combo_half", seeds=(1,)):
    return vcell.bench.run(sim, models=models, splits=[split], seeds=list(seeds), metrics=METRICS, progress=False)


def _values(res, model):
    r = res.results
    return r[r["model"] == model].sort_values(["perturbation", "metric"])["value"].to_numpy()


def test_weights_never_see_test_labels(sim):
    # truth on the held-out (test) doubles, noise on every condition the model trains or validates on: a weight fit
    # that saw the test labels would trust this member; one on validation conditions gives it weight 0
    test = vcell.bench.split(sim, kind="combo_half", seed=1, perturbation_key="perturbation", copy=True)
    test = set(test.uns["vcell_split"]["held_out"])

    def noisy(cond, train):
        return cond not in test

    model = Stacked(base="additive", members=[_Oracle("leaky", sim, noisy, scale=5.0)])
    res = _run(sim, ["additive", model])
    assert model.validation_["validation"] == "val"
    assert model.validation_["n_val_conditions"] >= 1
    assert model.weights_["leaky"] < 0.05  # fitted on the test conditions, it would be 1
    assert res.timings.set_index("model").loc["stacked", "weight:leaky"] == model.weights_["leaky"]
    s = res.summary.set_index(["model", "metric"])["mean"]
    assert s[("stacked", "mse_top_de")] < 1.5 * s[("additive", "mse_top_de")]


def test_noise_member_degrades_to_base(sim):
    # the member: control mean plus noise, nothing of the perturbation
    model = Stacked(base="additive", members=[_Oracle("noise", sim, lambda c, t: True, scale=3.0, truth=False)])
    res = _run(sim, ["additive", model])
    assert model.weights_["noise"] < 0.02
    assert model.weights_["additive"] == pytest.approx(1 - model.weights_["noise"])
    np.testing.assert_allclose(_values(res, "stacked"), _values(res, "additive"), rtol=0.1, atol=0.02)


def test_truth_like_member_is_trusted(sim):
    oracle = _Oracle("oracle", sim)
    model = Stacked(base="additive", members=[oracle])
    res = _run(sim, ["additive", oracle, model])
    assert model.weights_["oracle"] > 0.95
    s = res.summary.set_index(["model", "metric"])["mean"]
    assert s[("stacked", "mse_top_de")] < 0.5 * s[("additive", "mse_top_de")]
    assert s[("stacked", "mse_top_de")] == pytest.approx(s[("oracle", "mse_top_de")], rel=0.1, abs=1e-3)


def test_ensemble_picks_the_truth_and_records_weights(sim):
    ens = Ensemble(["mean", _Oracle("oracle", sim), _Oracle("noise", sim, lambda c, t: True)])
    res = _run(sim, [ens])
    assert ens.weights_["oracle"] > 0.95
    assert sum(ens.weights_.values()) == pytest.approx(1.0)
    row = res.timings.iloc[0]
    assert row["weight:oracle"] == ens.weights_["oracle"]
    assert row["val_mse:oracle"] < row["val_mse:mean"] < row["val_mse:noise"]


def test_seed_reproducible_and_cache(sim):
    def member():
        return _Oracle("jitter", sim, lambda c, t: True, scale=0.05)

    a = _run(sim, [Stacked(base="mean", members=[member()])], seeds=[2])
    b = _run(sim, [Stacked(base="mean", members=[member()])], seeds=[2])
    c = _run(sim, [Stacked(base="mean", members=[member()])], seeds=[3])
    np.testing.assert_array_equal(_values(a, "stacked"), _values(b, "stacked"))
    assert not np.array_equal(_values(a, "stacked"), _values(c, "stacked"))
    # a shared cache: the member is fitted once for validation and once on train+val, whatever uses it
    cache: dict = {}
    m = member()
    _run(sim, [Stacked(base="mean", members=[m], cache=cache), Ensemble(["additive", m], cache=cache)], seeds=[2])
    assert m.calls == 2


def test_no_validation_conditions_warns_and_falls_back(sim):
    model = Stacked(base="additive", members=[_Oracle("oracle", sim)])
    with pytest.warns(UserWarning, match="no validation conditions"):
        res = vcell.bench.run(
            sim,
            models=["additive", model],
            splits=[{"kind": "combo_half", "val_frac": 0.0}],
            seeds=[1],
            metrics=METRICS,
            progress=False,
        )
    assert model.weights_ == {"additive": 1.0, "oracle": 0.0}
    assert model.validation_["validation"].startswith("none")
    np.testing.assert_allclose(_values(res, "stacked"), _values(res, "additive"), rtol=1e-5, atol=1e-6)


def test_cell_type_transfer_validates_on_another_type():
    adata = vcell.datasets.simulate(n_cells=900, n_genes=30, n_perturbations=2, n_combos=0, cell_types=3, seed=1)
    model = Stacked(base="additive", members=["mean"])
    res = vcell.bench.run(
        adata,
        models=[model],
        splits=["unseen_cell_type"],
        seeds=[0],
        covariate_keys=["cell_type"],
        metrics=["pearson_delta"],
        progress=False,
    )
    test_type = vcell.bench.split(adata, kind="unseen_cell_type", seed=0, perturbation_key="perturbation", copy=True)
    test_type = test_type.uns["vcell_split"]["cell_type"]
    assert model.validation_["validation"] == "resplit"
    assert model.validation_["n_val_conditions"] >= 1
    # validated on another held-out type (the test type has no perturbed training cell to validate on)
    val_types = {c.split("|")[1] for c in model.validation_["val_conditions"].split(",")}
    assert test_type not in val_types
    assert np.isfinite(res.results["value"]).all()


def test_refit_false_uses_the_train_fits(sim):
    model = Stacked(base="additive", members=["linear"], refit=False)
    res = _run(sim, [model])
    assert np.isfinite(_values(res, "stacked")).all()
    assert set(model.weights_) == {"additive", "linear"}


def test_fixed_weights_give_the_member(sim):
    model = Stacked(base="additive", members=["linear"], weights=[0, 1])
    res = _run(sim, ["linear", model])
    np.testing.assert_allclose(_values(res, "stacked"), _values(res, "linear"), rtol=1e-5, atol=1e-6)
    assert model.validation_["validation"] == "fixed weights"


def test_convex_weights_exact():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(50, 3))
    t = A @ np.array([0.2, 0.0, 0.8]) + rng.normal(0, 0.1, 50)
    w = convex_weights(A, t)
    assert w.min() >= 0
    assert w.sum() == pytest.approx(1.0)
    grid = [np.array(v) / 20 for v in itertools.product(range(21), repeat=3) if sum(v) == 20]
    brute = min(float(np.sum((t - A @ g) ** 2)) for g in grid)
    assert float(np.sum((t - A @ w) ** 2)) <= brute + 1e-9
    # one component, and the truth itself among the components
    assert convex_weights(A[:, :1], t).tolist() == [1.0]
    assert convex_weights(np.column_stack([A[:, 0], t]), t).round(6).tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base": "nope", "members": ["linear"]}, "unknown base 'nope'"),
        ({"base": 3, "members": ["linear"]}, "base must be"),
        ({"base": "additive", "members": []}, "members must be a non-empty list"),
        ({"base": "additive", "members": "linear"}, "members must be a non-empty list"),
        ({"base": "additive", "members": ["nope"]}, "unknown model 'nope'"),
        ({"base": "additive", "members": ["additive"]}, "must be unique"),
        ({"base": "additive", "members": ["linear"], "validation": "test"}, "validation must be one of"),
        ({"base": "additive", "members": ["linear"], "n_seeds": 0}, "n_seeds must be a positive integer"),
        ({"base": "additive", "members": ["linear"], "weights": [1]}, "weights must be 2 non-negative"),
        ({"base": "additive", "members": ["linear"], "weights": [-1, 2]}, "weights must be 2 non-negative"),
        ({"base": "additive", "members": ["linear"], "max_val_controls": 0}, "max_val_controls must be"),
        ({"base": "additive", "members": ["linear"], "cache": []}, "cache must be a dict"),
        ({"base": "additive", "members": ["linear"], "name": ""}, "name must be a non-empty string"),
    ],
)
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Stacked(**kwargs)


def test_ensemble_bad_inputs():
    with pytest.raises(ValueError, match="at least two members"):
        Ensemble(["linear"])
    with pytest.raises(ValueError, match="at least two members"):
        Ensemble("linear")
    with pytest.raises(ValueError, match="at least one component"):
        convex_weights(np.zeros((3, 0)), np.zeros(3))


def test_pearson_delta_objective(sim):
    oracle = _Oracle("oracle", sim)
    model = Stacked(base="additive", members=[oracle], objective="pearson_delta")
    _run(sim, [model])
    assert model.validation_["objective"] == "pearson_delta"
    assert model.weights_["oracle"] > 0.9
    noise = Stacked(
        base="additive", members=[_Oracle("noise", sim, lambda c, t: True, truth=False)], objective="pearson_delta"
    )
    _run(sim, [noise])
    assert noise.weights_["noise"] < 0.1
    with pytest.raises(ValueError, match="objective must be one of"):
        Stacked(base="additive", members=["linear"], objective="r2")


def test_pearson_delta_weights_grid():
    from vcell.bench import pearson_delta_weights

    rng = np.random.default_rng(1)
    ctrl = rng.normal(size=(3, 30))
    truth = ctrl + rng.normal(size=(3, 30))
    good = truth + 0.01 * rng.normal(size=(3, 30))
    bad = ctrl + rng.normal(size=(3, 30))
    w = pearson_delta_weights(np.stack([bad, good], axis=1), truth, ctrl=ctrl)
    assert w.tolist() == [0.0, 1.0]
    # equal scores: the first component (the base) wins
    w = pearson_delta_weights(np.stack([good, good], axis=1), truth, ctrl=ctrl)
    assert w.tolist() == [1.0, 0.0]


def test_interaction_baseline_by_name_alone_and_stacked_on_additive(sim):
    """``"interaction"`` (not among the four report baselines) is accepted by name, alone and as a member."""
    assert "interaction" not in vcell.bench.BASELINES
    stacked = Stacked("additive", ["interaction"], name="additive+interaction", weights=[0, 1])
    ls = vcell.bench.ModelSpec(
        "interaction_ls", vcell.model.Baseline, {"method": "interaction", "interaction_ridge": 0}
    )
    res = _run(sim, ["additive", "interaction", stacked, ls])
    assert set(res.results["model"]) == {"additive", "interaction", "additive+interaction", "interaction_ls"}
    assert (res.results["error"].fillna("") == "").all()
    # weights [0, 1]: the stacked model is the member, fitted on the same cells
    np.testing.assert_allclose(_values(res, "additive+interaction"), _values(res, "interaction"), rtol=1e-5, atol=1e-6)
    # random interactions here: cross-validation may keep additive, but least squares moves away from it
    assert not np.allclose(_values(res, "interaction_ls"), _values(res, "additive"))
