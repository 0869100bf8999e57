from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import vcell
from vcell.bench import ModelSpec, summarize


@pytest.fixture(scope="module")
def sim():
    return vcell.datasets.simulate(n_cells=1500, n_genes=60, n_perturbations=6, n_combos=8, frac_epistatic=0.5, seed=3)


def test_run_tidy_results_and_summary(sim):
    before = sim.copy()
    res = vcell.bench.run(
        sim,
        models=["control", "additive"],
        splits=["combo_half"],
        seeds=[1, 2],
        metrics=["pearson_delta", "mse_top_de", "energy_distance", "interaction_auprc"],
        progress=False,
    )
    r = res.results
    assert {"model", "split", "seed", "perturbation", "metric", "value", "ceiling"} <= set(r.columns)
    assert set(r["model"]) == {"control", "additive"}
    assert set(r["seed"]) == {1, 2}
    assert set(r["metric"]) == {"pearson_delta", "mse_top_de", "energy_distance", "interaction_auprc"}
    # held-out doubles are evaluated, nothing else
    evaluated = set(r.loc[r["metric"] == "mse_top_de", "perturbation"])
    assert all("+" in p for p in evaluated)
    # the additive baseline is far better than no change on mostly additive doubles
    s = res.summary.set_index(["model", "metric"])
    assert s.loc[("additive", "mse_top_de"), "mean"] < 0.5 * s.loc[("control", "mse_top_de"), "mean"]
    assert s.loc[("additive", "energy_distance"), "mean"] < s.loc[("control", "energy_distance"), "mean"]
    finite = s.dropna(subset=["mean"])
    assert (finite["ci_low"] <= finite["mean"]).all()
    assert (finite["mean"] <= finite["ci_high"]).all()
    assert np.isnan(s.loc[("control", "pearson_delta"), "mean"])  # no change: correlation undefined
    # input untouched
    assert list(sim.obs.columns) == list(before.obs.columns)
    assert set(res.timings["model"]) == {"control", "additive"}


def test_random_cells_scores_every_condition_with_test_cells(sim):
    """random_cells holds out cells, not conditions: every perturbed condition with test cells is predicted."""
    res = vcell.bench.run(
        sim, models=["control", "additive"], splits=["random_cells"], seeds=[0], metrics=["mse_top_de"], progress=False
    )
    r = res.results[res.results["metric"] == "mse_top_de"]
    conditions = set(sim.obs["perturbation"].astype(str)) - {"control"}
    assert set(r["perturbation"]) == conditions
    per = r.pivot_table(index="perturbation", columns="model", values="value")
    singles = [c for c in conditions if "+" not in c]
    # a single's own training cells give its shift: far better than no change
    assert (per.loc[singles, "additive"] < 0.5 * per.loc[singles, "control"]).all()


def test_run_is_reproducible(sim):
    kw = {"models": ["mean"], "splits": ["unseen_perturbation"], "seeds": [5], "metrics": ["mmd"], "progress": False}
    a = vcell.bench.run(sim, **kw).results
    b = vcell.bench.run(sim, **kw).results
    pd.testing.assert_frame_equal(a, b)


def test_run_accepts_model_spec_and_rejects_unknown(sim):
    spec = ModelSpec("add2", vcell.model.Baseline, {"method": "additive"})
    res = vcell.bench.run(sim, models=[spec], splits=["combo_seen2"], seeds=[1], metrics=["pds"], progress=False)
    assert set(res.results["model"]) == {"add2"}
    with pytest.raises(ValueError, match="unknown model"):
        vcell.bench.run(sim, models=["GEARS"], splits=["combo_half"], seeds=[1])
    with pytest.raises(ValueError, match="models is empty"):
        vcell.bench.run(sim, models=[], splits=["combo_half"], seeds=[1])
    with pytest.raises(KeyError, match="cell_type_x"):
        vcell.bench.run(sim, splits=["combo_half"], seeds=[1], covariate_keys=["cell_type_x"])


def test_summarize_ci_matches_t_interval():
    rows = [
        {"model": "m", "split": "s", "seed": seed, "perturbation": p, "metric": "x", "value": v, "ceiling": 1.0}
        for seed, vals in ((1, (1.0, 3.0)), (2, (2.0, 4.0)), (3, (3.0, 5.0)))
        for p, v in zip(("a", "b"), vals, strict=True)
    ]
    s = summarize(pd.DataFrame(rows)).iloc[0]
    # per-seed means 2, 3, 4 -> mean 3, sd 1, t(0.975, 2) = 4.3027
    assert s["mean"] == pytest.approx(3.0)
    assert s["ci_high"] - s["mean"] == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
    assert s["ceiling"] == pytest.approx(1.0)
    assert s["n_seeds"] == 3


def test_linear_without_embedding_is_recorded_not_hidden(papalexi_path):
    import anndata as ad

    adata = ad.read_h5ad(papalexi_path)
    res = vcell.bench.run(
        adata,
        models=["linear"],
        splits=[{"kind": "unseen_perturbation", "held_out": ["IFNGR1", "STAT1"], "name": "ko"}],
        seeds=[1],
        metrics=["pearson_delta"],
        progress=False,
        on_error="skip",
    )
    err = res.results[res.results["metric"] == "error"]
    assert set(err["perturbation"]) == {"IFNGR1", "STAT1"}
    assert err["error"].str.contains("embedding").all()


def test_model_spec_sample_output_scores_generated_cells(sim):
    """output="sample" benchmarks a generative model's cells: its spread reaches the distribution metrics."""
    rd = ModelSpec(
        "rd",
        vcell.model.ResidualDiffusion,
        {"mean_model": "additive", "n_components": 5, "n_hidden": 32, "n_layers": 1},
        {"max_epochs": 5, "trainer_kwargs": {"enable_progress_bar": False}},
        output="sample",
        sample_kwargs={"n_steps": 5},
    )
    point = ModelSpec("rd_mean", vcell.model.ResidualDiffusion, rd.init_kwargs, rd.train_kwargs)
    res = vcell.bench.run(
        sim, models=[rd, point], splits=["combo_half"], seeds=[1], metrics=["energy_distance"], progress=False
    )
    per = res.results.pivot_table(index="perturbation", columns="model", values="value")
    assert per.notna().all().all()
    assert not np.allclose(per["rd"], per["rd_mean"])  # samples, not the mean model's counterfactuals
    with pytest.raises(ValueError, match="output must be"):
        ModelSpec("x", vcell.model.Baseline, output="mean")


def _assert_same_results(a: pd.DataFrame, b: pd.DataFrame) -> None:
    keys = ["model", "split", "seed", "perturbation", "metric"]
    pd.testing.assert_frame_equal(a[keys], b[keys])
    for col in ("value", "ceiling"):
        np.testing.assert_allclose(
            a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-9, atol=1e-12, equal_nan=True
        )


@pytest.mark.parametrize("chunk_elements", [None, 600])
def test_run_same_results_on_dense_and_sparse_copies(sim, monkeypatch, chunk_elements):
    """Statistics are streamed from the stored matrix (PCA, additive means), whatever holds it; with a small block
    budget (600 values: 10 cells) the truth and control cells stay sparse through evaluate too."""
    if chunk_elements is not None:
        monkeypatch.setattr(vcell.settings, "chunk_elements", chunk_elements)
    assert sparse.issparse(sim.X)
    dense = sim.copy()
    dense.X = sim.X.toarray()
    kw = {"models": ["control", "additive"], "splits": ["combo_half"], "seeds": [1], "progress": False}
    _assert_same_results(vcell.bench.run(sim, **kw).results, vcell.bench.run(dense, **kw).results)


def test_run_on_a_backed_h5ad(sim, tmp_path):
    """A backed screen is read in row blocks (only the training cells the models need are loaded)."""
    import anndata as ad

    path = tmp_path / "sim.h5ad"
    sim.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    kw = {
        "models": ["mean"],
        "splits": ["combo_half"],
        "seeds": [2],
        "metrics": ["mse_top_de", "mmd"],
        "progress": False,
    }
    _assert_same_results(vcell.bench.run(backed, **kw).results, vcell.bench.run(sim, **kw).results)
    assert backed.isbacked


def test_nan_predictions_are_the_models_error_not_a_score():
    """A predictor returning NaN for a condition: reported as its error (on_error='skip'), or raised."""
    import vcell

    class NaNPredictor:
        name = "nan_model"

        def fit_predict(self, train, requests, *, seed, covariate_keys, layer):
            return {r.condition: np.full((r.controls.size, train.n_vars), np.nan, np.float32) for r in requests}

    adata = vcell.datasets.simulate(n_cells=600, n_genes=30, n_perturbations=4, n_combos=2, seed=0)
    kw = {"perturbation_key": "perturbation", "control": "control", "splits": ["combo_seen2"], "seeds": [0]}
    res = vcell.bench.run(adata, models=["additive", NaNPredictor()], on_error="skip", progress=False, **kw)
    errors = res.results[(res.results["model"] == "nan_model") & (res.results["metric"] == "error")]
    assert len(errors)
    assert errors["error"].astype(str).str.contains("NaN or infinite").all()
    assert np.isfinite(res.results.loc[res.results["model"] == "additive", "value"].dropna()).all()
    with pytest.raises(ValueError, match="nan_model returned NaN"):
        vcell.bench.run(adata, models=[NaNPredictor()], on_error="raise", progress=False, **kw)


def test_max_controls_caps_the_cells_a_prediction_starts_from():
    """Each request starts from at most ``max_controls`` training controls (seeded, sorted); ``None``: all of them."""
    seen: dict[object, list[np.ndarray]] = {}

    class Recorder:
        name = "recorder"

        def __init__(self, key):
            self.key = key

        def fit_predict(self, train, requests, *, seed, covariate_keys, layer):
            seen[self.key] = [r.controls for r in requests]
            ctrl = train.obs["vcell_perturbation"].astype(str).to_numpy() == "control"
            for r in requests:
                assert ctrl[r.controls].all()
            return {r.condition: np.full((r.controls.size, train.n_vars), 0.5, np.float32) for r in requests}

    adata = vcell.datasets.simulate(n_cells=600, n_genes=30, n_perturbations=4, n_combos=2, seed=0)
    kw = {"perturbation_key": "perturbation", "control": "control", "splits": ["combo_seen2"], "seeds": [0]}
    kw |= {"metrics": ["pearson_delta"], "ceiling": False, "progress": False}
    vcell.bench.run(adata, models=[Recorder(None)], max_controls=None, **kw)
    vcell.bench.run(adata, models=[Recorder(7)], max_controls=7, **kw)
    vcell.bench.run(adata, models=[Recorder("again")], max_controls=7, **kw)
    assert all(c.size > 7 for c in seen[None])
    for full, capped, again in zip(seen[None], seen[7], seen["again"], strict=True):
        assert capped.size == 7
        assert np.isin(capped, full).all()
        assert (np.diff(capped) > 0).all()
        np.testing.assert_array_equal(capped, again)
    with pytest.raises(ValueError, match="max_controls"):
        vcell.bench.run(adata, models=["control"], max_controls=0, **kw)


def test_model_predictions_are_scored_from_one_block_without_a_stacked_copy(sim, monkeypatch):
    """A ModelSpec writes each condition's prediction into its rows of one block; evaluate gets that block itself."""
    from vcell.bench import _run
    from vcell.metrics import _evaluate

    blocks, evaluated = [], []
    put = _run._PredictionBlock.put

    def recording_put(self, condition, pred):
        blocks.append(self.X)
        return put(self, condition, pred)

    def recording_evaluate(pred, true, control, **kw):
        evaluated.append(pred.X)
        return _evaluate.evaluate(pred, true, control, **kw)

    monkeypatch.setattr(_run._PredictionBlock, "put", recording_put)
    monkeypatch.setattr("vcell.metrics.evaluate", recording_evaluate)
    res = vcell.bench.run(
        sim,
        models=["additive"],
        splits=["combo_seen2"],
        seeds=[0],
        perturbation_key="perturbation",
        control="control",
        metrics=["pearson_delta"],
        ceiling=False,
        progress=False,
    )
    assert len(evaluated) == 1
    assert blocks
    assert np.shares_memory(evaluated[0], blocks[0])
    assert res.results["value"].notna().all()
    preds = {"a": np.ones((2, 3), np.float32), "b": np.zeros((1, 3), np.float32)}  # arrays of their own: copied
    stacked = _run._stack_predictions(dict(preds), pd.Index(["g0", "g1", "g2"]))
    np.testing.assert_array_equal(stacked.X, np.vstack(list(preds.values())))
    assert not any(np.shares_memory(stacked.X, p) for p in preds.values())


def test_run_on_a_backed_h5ad_keeps_training_cells_on_disk(sim, tmp_path, monkeypatch):
    """The predictors' training AnnData of a backed screen is backed too (written to TMPDIR, removed after)."""
    import tempfile

    import anndata as ad

    path = tmp_path / "sim.h5ad"
    sim.write_h5ad(path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seen = []

    class Recorder:
        name = "recorder"

        def fit_predict(self, train, requests, *, seed, covariate_keys, layer):
            seen.append((type(train.X).__name__, train.n_obs))
            return {r.condition: np.full((r.controls.size, train.n_vars), 0.5, np.float32) for r in requests}

    kw = {"models": ["mean", Recorder()], "splits": ["combo_half"], "seeds": [2], "progress": False}
    res = vcell.bench.run(ad.read_h5ad(path, backed="r"), metrics=["mse_top_de"], **kw)
    assert "Dataset" in seen[0][0], seen  # anndata's CSRDataset: rows read from disk, not loaded
    assert not list(scratch.iterdir())  # the temporary training file is gone
    mem = vcell.bench.run(sim, metrics=["mse_top_de"], **kw)
    assert seen[1] == ("csr_matrix", seen[0][1])  # in memory: the same training cells, as stored
    _assert_same_results(res.results, mem.results)


def test_max_eval_cells_subsamples_truth_and_reference(monkeypatch):
    """Metrics read at most ``max_eval_cells`` cells per condition and of the control reference (seeded)."""
    import vcell.metrics as vm

    adata = vcell.datasets.simulate(n_cells=900, n_genes=30, n_perturbations=4, n_combos=2, seed=0)
    kw = {
        "models": ["mean"],
        "splits": ["combo_seen2"],
        "seeds": [0],
        "metrics": ["pearson_delta"],
        "perturbation_key": "perturbation",
        "control": "control",
        "progress": False,
    }
    sizes = []
    real = vm.evaluate

    def spy(pred, true, ctrl, **k):
        sizes.append((true.obs["perturbation"].value_counts().max(), ctrl.n_obs))
        return real(pred, true, ctrl, **k)

    monkeypatch.setattr(vm, "evaluate", spy)
    full = vcell.bench.run(adata, max_eval_cells=None, **kw).results
    assert full.equals(vcell.bench.run(adata, **kw).results)  # the default cap does not bind here
    capped = vcell.bench.run(adata, max_eval_cells=25, **kw).results
    assert sizes[0][0] > 25
    assert sizes[0][1] > 25
    assert sizes[-1] == (25, 25)
    assert np.isfinite(capped["value"]).all()
    assert capped.equals(vcell.bench.run(adata, max_eval_cells=25, **kw).results)  # seeded
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_eval_cells must be a positive integer"):
            vcell.bench.run(adata, max_eval_cells=bad, **kw)


def test_pca_of_the_metrics_is_fitted_on_a_capped_seeded_subsample(monkeypatch):
    """Above ``_PCA_MAX_CELLS`` training cells the metrics' PCA reads a seeded subsample of them."""
    import vcell.bench._run as run_mod
    import vcell.metrics as vm

    adata = vcell.datasets.simulate(n_cells=600, n_genes=30, n_perturbations=4, n_combos=2, seed=0)
    rows_seen = []
    real = vm.fit_pca

    def spy(X, n_comps, **k):
        rows_seen.append(np.asarray(k["rows"]))
        return real(X, n_comps, **k)

    monkeypatch.setattr(vm, "fit_pca", spy)
    kw = {"models": ["mean"], "splits": ["combo_seen2"], "metrics": ["energy_distance"], "progress": False}
    kw |= {"perturbation_key": "perturbation", "control": "control"}
    vcell.bench.run(adata, seeds=[0], **kw)
    assert rows_seen[0].size > 50
    monkeypatch.setattr(run_mod, "_PCA_MAX_CELLS", 50)
    res = vcell.bench.run(adata, seeds=[0], **kw).results
    assert rows_seen[1].size == 50
    assert np.isin(rows_seen[1], rows_seen[0]).all()  # training cells only
    assert np.isfinite(res["value"]).all()
    vcell.bench.run(adata, seeds=[0], **kw)
    np.testing.assert_array_equal(rows_seen[2], rows_seen[1])  # seeded


def test_run_on_data_the_user_already_split_leaves_their_split_alone() -> None:
    """A user who ran bench.split to look at a split can still bench.run: bench splits its own copy."""
    adata = vcell.datasets.simulate(n_cells=400, n_genes=30, n_perturbations=4, n_combos=4, seed=0)
    vcell.pp.harmonize(adata, perturbation_key="perturbation", control="control")
    vcell.bench.split(adata, kind="combo_half", seed=5)
    before = adata.obs["vcell_split"].copy()
    res = vcell.bench.run(adata, models=["additive"], splits=["combo_half"], seeds=[1], progress=False)
    assert len(res.results)
    assert adata.obs["vcell_split"].equals(before)
