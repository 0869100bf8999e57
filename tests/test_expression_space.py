"""Expression spaces (issue 20, "Expression space made explicit"): recorded or inferred, carried by models, converted
on request, and checked wherever predictions meet data."""

from __future__ import annotations

import json
import re

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import vcell
from vcell.model._base import sample_obs
from vcell.pp import ExpressionSpace
from vcell.pp._space import infer_space, prediction_space, rescale_log1p

matplotlib.use("Agg")

CP10K = ExpressionSpace.log1p_cp10k()


def _counts(n_cells: int = 200, n_genes: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0.5, 2.0, size=(n_cells, 1))  # library sizes that differ between cells
    return rng.poisson(depth * rng.gamma(1.0, 3.0, size=(1, n_genes))).astype(np.float32)


def _normalize_log(counts: np.ndarray, target: float) -> np.ndarray:
    totals = counts.sum(1, keepdims=True)
    return np.log1p(counts / np.where(totals > 0, totals, 1) * target).astype(np.float32)


@pytest.fixture(scope="module")
def scanpy_setup():
    """The common scanpy setup: counts in layers['counts'], X = normalize_total (median) + log1p; a trained model."""
    import scanpy as sc

    adata = vcell.datasets.simulate(n_cells=400, n_genes=80, n_perturbations=2, n_combos=0, seed=0)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    vcell.model.Baseline.setup_anndata(adata, perturbation_key="perturbation", control="control", layer="counts")
    model = vcell.model.Baseline(adata, method="additive")
    model.train()
    pert = sorted(p for p in adata.obs["vcell_perturbation"].unique() if p != "control")[0]
    return adata, model, pert


# ---------------------------------------------------------------------------------------------- the description
def test_space_str_dict_and_equality():
    median = ExpressionSpace("log1p", 2013.0, basis="median")
    assert str(median) == "log1p(normalised to 2,013 per cell: the median library size, scanpy normalize_total default)"
    assert str(CP10K) == "log1p(CP10k: normalised to 10,000 per cell)"
    assert str(ExpressionSpace("counts")) == "raw counts"
    assert str(ExpressionSpace("log1p")) == "log1p(normalised counts, target sum unknown)"
    for space in (median, CP10K, ExpressionSpace("counts"), ExpressionSpace("log1p"), ExpressionSpace("unknown")):
        assert ExpressionSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space
    assert ExpressionSpace.from_dict(median.to_dict()).basis == "median"
    assert median == ExpressionSpace("log1p", 2013)  # basis is a note, not part of the space
    with pytest.raises(ValueError, match="kind must be one of"):
        ExpressionSpace("log2")
    with pytest.raises(ValueError, match="target_sum applies to kind 'log1p' only"):
        ExpressionSpace("counts", 1e4)
    with pytest.raises(ValueError, match="finite number above 0"):
        ExpressionSpace("log1p", -1.0)
    with pytest.raises(ValueError, match="'kind'"):
        ExpressionSpace.from_dict({"target_sum": 1e4})


def test_differs_only_when_provable():
    assert ExpressionSpace("counts").differs_from(CP10K)
    assert CP10K.differs_from(ExpressionSpace("log1p", 2013.0))
    assert not CP10K.differs_from(ExpressionSpace("log1p", 1e4 * 1.005))  # within 1%
    assert not CP10K.differs_from(ExpressionSpace("log1p"))  # unknown target sum: allowed
    assert not ExpressionSpace("unknown").differs_from(ExpressionSpace("counts"))


# ---------------------------------------------------------------------------------------------- inference
def test_infer_counts_cp10k_median_subset_and_unknown():
    import scanpy as sc

    counts = _counts()
    adata = ad.AnnData(sparse.csr_matrix(counts))
    assert vcell.pp.expression_space(adata) == ExpressionSpace("counts")
    adata.layers["cp10k"] = _normalize_log(counts, 1e4)
    assert vcell.pp.expression_space(adata, "cp10k") == CP10K  # exactly 1e4 (float32 round-off snapped)
    assert vcell.pp.expression_space(adata, "cp10k").target_sum == 1e4
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    totals = counts.sum(1)
    median = float(np.median(totals[totals > 0]))
    assert vcell.pp.expression_space(adata) == ExpressionSpace("log1p", median)
    hvg = adata[:, :20].copy()  # genes subset after normalisation: rows no longer share a sum
    assert vcell.pp.expression_space(hvg) == ExpressionSpace("log1p")
    assert vcell.pp.expression_space(ad.AnnData(counts - 5.0)) == ExpressionSpace("unknown")
    pred = np.full((4, 3), np.nan, dtype=np.float32)
    pred[:2] = _normalize_log(counts[:2, :3], 50.0)  # rows without a prediction (all NaN) are skipped
    assert infer_space(pred) == ExpressionSpace("log1p", 50.0)
    constant = np.full((5, 3), 0.5, dtype=np.float32)  # a mean prediction: every row shares any sum
    assert prediction_space(ad.AnnData(constant)) == ExpressionSpace("log1p")


def test_infer_backed(tmp_path):
    counts = _counts()
    adata = ad.AnnData(sparse.csr_matrix(_normalize_log(counts, 1e4)))
    adata.layers["counts"] = sparse.csr_matrix(counts)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    assert vcell.pp.expression_space(backed) == CP10K
    assert infer_space(backed.X, n_rows=50, seed=1) == CP10K  # a seeded sample of rows
    backed.file.close()


def test_set_expression_space_records_and_refuses():
    counts = _counts()
    adata = ad.AnnData(_normalize_log(counts, 1e4)[:, :20])  # a gene subset: target unknown until declared
    assert vcell.pp.expression_space(adata) == ExpressionSpace("log1p")
    vcell.pp.set_expression_space(adata, kind="log1p", target_sum=1e4)
    assert adata.uns["vcell_spaces"] == {"X": {"kind": "log1p", "target_sum": 1e4}}
    assert vcell.pp.expression_space(adata) == CP10K
    vcell.pp.set_expression_space(adata, kind="log1p", target_sum=1e4)  # the same again: fine
    with pytest.raises(ValueError, match=r"recorded as log1p\(CP10k.*overwrite=True.*normalised to 2,000"):
        vcell.pp.set_expression_space(adata, kind="log1p", target_sum=2000.0)
    vcell.pp.set_expression_space(adata, kind="log1p", target_sum=2000.0, overwrite=True)
    assert vcell.pp.expression_space(adata).target_sum == 2000.0
    full = ad.AnnData(_normalize_log(counts, 1e4))
    with pytest.raises(ValueError, match=r"holds values in log1p\(CP10k.*not log1p\(normalised to 2,000"):
        vcell.pp.set_expression_space(full, kind="log1p", target_sum=2000.0)  # every row sums to 1e4
    with pytest.raises(ValueError, match="not raw counts"):
        vcell.pp.set_expression_space(full, kind="counts")
    with pytest.raises(KeyError, match="'nope'"):
        vcell.pp.set_expression_space(full, layer="nope", kind="counts")


# ---------------------------------------------------------------------------------------------- setup and models
def test_setup_records_spaces_scanpy_setup(scanpy_setup):
    adata, model, _ = scanpy_setup
    x_space = vcell.pp.expression_space(adata)
    assert model.registered_space == ExpressionSpace("counts")
    assert model.model_space == CP10K
    assert model.output_space == x_space  # the space of the user's X
    assert model.output_space.basis == "median"  # X's target is the counts' median library size
    totals = np.asarray(adata.layers["counts"].sum(1)).ravel()
    assert model.output_space.target_sum == float(np.median(totals[totals > 0]))


def test_default_for_counts_in_x_is_the_median():
    adata = vcell.datasets.simulate(n_cells=200, n_genes=30, n_perturbations=2, n_combos=0, seed=1)
    vcell.model.Baseline.setup_anndata(adata, perturbation_key="perturbation", control="control")
    model = vcell.model.Baseline(adata, method="additive")
    totals = np.asarray(adata.X.sum(1)).ravel()
    assert model.output_space == ExpressionSpace("log1p", float(np.median(totals[totals > 0])))
    assert model._space_request("median")[0] == model.output_space


def test_log_data_predict_in_their_space_and_unknown_target_refuses_conversion():
    adata = vcell.datasets.simulate(n_cells=200, n_genes=30, n_perturbations=2, n_combos=0, seed=1)
    counts = adata.X.toarray()
    adata.X = _normalize_log(counts, 5000.0)
    vcell.model.Baseline.setup_anndata(adata, perturbation_key="perturbation", control="control")
    model = vcell.model.Baseline(adata, method="additive")
    model.train()
    assert model.model_space == model.output_space == ExpressionSpace("log1p", 5000.0)
    pert = sorted(p for p in adata.obs["vcell_perturbation"].unique() if p != "control")[0]
    own = model.predict(perturbation=pert)
    np.testing.assert_array_equal(own, model.predict(perturbation=pert, space="model"))
    np.testing.assert_allclose(
        model.predict(perturbation=pert, space="log1p_cp10k"), rescale_log1p(own, 2.0), rtol=1e-6, atol=1e-6
    )
    hvg = adata[:, :15].copy()  # log data of unknown target sum: predictions stay in it
    hvg.uns.pop("vcell_spaces", None)
    vcell.model.Baseline.setup_anndata(hvg, perturbation_key="perturbation", control="control")
    sub = vcell.model.Baseline(hvg, method="additive")
    sub.train()
    assert sub.output_space == ExpressionSpace("log1p")
    sub.predict(perturbation=pert)
    with pytest.raises(ValueError, match=r"target sum unknown.*to log1p\(CP10k.*set_expression_space"):
        sub.predict(perturbation=pert, space="log1p_cp10k")
    with pytest.raises(ValueError, match="space='median'.*not counts"):
        sub.predict(perturbation=pert, space="median")
    vcell.pp.set_expression_space(hvg, kind="log1p", target_sum=5000.0)  # declared: conversions work again
    vcell.model.Baseline.setup_anndata(hvg, perturbation_key="perturbation", control="control")
    assert vcell.model.Baseline(hvg, method="additive").model_space == ExpressionSpace("log1p", 5000.0)


def test_conversions_equal_converting_afterwards(scanpy_setup):
    adata, model, pert = scanpy_setup
    own = model.predict(adata, perturbation=pert, space="model")
    t_default = model.output_space.target_sum
    for space, target in (
        (None, t_default),
        ("default", t_default),
        ("median", t_default),
        ("log1p_cp10k", 1e4),
        (1234.5, 1234.5),
        (ExpressionSpace("log1p", 50.0), 50.0),
    ):
        expected = np.log1p(np.expm1(own.astype(np.float64)) * target / 1e4)
        np.testing.assert_allclose(model.predict(adata, perturbation=pert, space=space), expected, atol=1e-6)
    many = dict(model.predict_many(adata, perturbations=[pert, "control"], space=2000.0))
    np.testing.assert_allclose(many[pert], rescale_log1p(own, 0.2), atol=1e-6)
    with pytest.raises(ValueError, match="space must be None or 'default'"):
        model.predict(adata, perturbation=pert, space="cp10k")
    with pytest.raises(ValueError, match=r"cannot convert .* to raw counts"):
        model.predict(adata, perturbation=pert, space=ExpressionSpace("counts"))


def test_cp10k_path_is_bit_identical(scanpy_setup):
    """space='log1p_cp10k' of a model set up with counts is the model's own output, unconverted (BENCHMARK.md)."""
    adata, model, pert = scanpy_setup
    ((_, raw),) = list(model._predict_many(adata, [pert], controls=None, dose=1.0, seed=0))
    cp10k = model.predict(adata, perturbation=pert, space="log1p_cp10k")
    np.testing.assert_array_equal(cp10k, raw["rna"])
    out = vcell.tl.predict_perturbation(adata, model, perturbations=pert, return_adata=True, space="log1p_cp10k")
    np.testing.assert_array_equal(out.X, raw["rna"])
    assert vcell.pp.expression_space(out) == CP10K


def test_tl_records_and_converts(scanpy_setup):
    adata, model, pert = scanpy_setup
    adata = adata.copy()
    vcell.tl.predict_perturbation(adata, model, perturbations=pert, key_added="d")
    vcell.tl.predict_perturbation(adata, model, perturbations=pert, key_added="c", space="log1p_cp10k")
    assert vcell.pp.expression_space(adata, "d") == model.output_space
    assert vcell.pp.expression_space(adata, "c") == CP10K
    assert adata.uns["d"]["space"] == model.output_space.to_dict()
    rows = adata.obs["d_source"].to_numpy()
    factor = model.output_space.target_sum / 1e4
    np.testing.assert_allclose(adata.layers["d"][rows], rescale_log1p(adata.layers["c"][rows], factor), atol=1e-6)
    assert np.isnan(adata.layers["d"][~rows]).all()
    with pytest.raises(ValueError, match="arguments of their own"):
        vcell.tl.predict_perturbation(adata, model, perturbations=pert, key_added="e", predict_kwargs={"space": 1.0})


def test_persisted_with_save_and_load(scanpy_setup, tmp_path):
    adata, model, pert = scanpy_setup
    model.save(tmp_path / "m", overwrite=True)
    other = adata.copy()
    other.X = other.layers["counts"].copy()  # another X: the loaded model keeps the spaces it was trained with
    for loaded in (
        vcell.model.Baseline.load(tmp_path / "m", adata=other, accelerator="cpu"),
        vcell.model.Baseline.load(tmp_path / "m", adata=False, accelerator="cpu"),
    ):
        assert loaded.registered_space == model.registered_space
        assert loaded.output_space == model.output_space
        assert loaded.output_space.basis == "median"
    np.testing.assert_array_equal(
        vcell.model.Baseline.load(tmp_path / "m", adata=other, accelerator="cpu").predict(other, perturbation=pert),
        model.predict(adata, perturbation=pert),
    )
    # a model saved before spaces were recorded: without data it predicts as it did (its own space)
    meta_path = tmp_path / "m" / "vcell_model.json"
    meta = json.loads(meta_path.read_text())
    for key in ("space", "output_space", "median_library_size"):
        meta["registry"]["vcell_setup"].pop(key)
    meta_path.write_text(json.dumps(meta))
    old = vcell.model.Baseline.load(tmp_path / "m", adata=False, accelerator="cpu")
    assert old.output_space == old.model_space == CP10K


def test_user_subclass_gets_space_and_nested_calls_stay_in_model_space(scanpy_setup):
    """A user's subclass overriding predict/sample gets space= (converted once, by the outer call)."""
    adata, model, pert = scanpy_setup

    class Sampler(vcell.model.Baseline):
        capabilities = vcell.model.Baseline.capabilities.__class__(learned=False, can_sample=True)

        def sample(self, adata=None, *, perturbation, n_cells=None, controls=None, dose=1.0, seed=None):
            X = self.predict(adata, perturbation=perturbation, controls=controls, dose=dose)  # nested: model space
            obs = sample_obs(perturbation, dose, np.arange(len(X)).astype(str))
            return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=self.var_names_))

    class Twice(vcell.model.Baseline):
        def predict(self, adata=None, *, perturbation, controls=None, dose=1.0, seed=None, modality="rna"):
            return super().predict(adata, perturbation=perturbation, space="log1p_cp10k")

    adata = adata.copy()
    Sampler.setup_anndata(adata, perturbation_key="perturbation", control="control", layer="counts")
    s = Sampler(adata, method="additive")
    s.train()
    own = s.predict(adata, perturbation=pert, space="model")
    cells = s.sample(adata, perturbation=pert)
    np.testing.assert_allclose(cells.X, s.predict(adata, perturbation=pert), atol=1e-6)
    assert vcell.pp.expression_space(cells) == s.output_space
    np.testing.assert_array_equal(s.sample(adata, perturbation=pert, space="model").X, own)
    sampled = vcell.tl.sample_perturbation(adata, s, perturbations=pert, space="log1p_cp10k")
    np.testing.assert_array_equal(sampled.X, own)
    assert vcell.pp.expression_space(sampled, "vcell_sample_upper") == CP10K
    Twice.setup_anndata(adata, perturbation_key="perturbation", control="control", layer="counts")
    t = Twice(adata, method="additive")
    t.train()
    with pytest.raises(ValueError, match="called inside another prediction"):
        t.predict(adata, perturbation=pert)


# ---------------------------------------------------------------------------------------------- comparisons
def _scatter(fig) -> tuple[float, float]:
    """Pearson r and mean offset (predicted minus true delta) of the points of a prediction scatter."""
    x, y = np.asarray(fig.axes[0].collections[0].get_offsets(), dtype=np.float64).T
    assert float(re.search(r"Pearson r = ([-0-9.]+)", fig.axes[0].get_title()).group(1)) == round(
        float(np.corrcoef(x, y)[0, 1]), 3
    )
    return float(np.corrcoef(x, y)[0, 1]), float(np.mean(y - x))


def test_default_space_compares_with_x_and_mismatch_is_refused(scanpy_setup):
    """The issue's scatter: log1p(CP10k) predictions against normalize_total (median) + log1p X."""
    adata, model, pert = scanpy_setup
    adata = adata.copy()
    vcell.tl.predict_perturbation(adata, model, perturbations=pert, key_added="default")
    vcell.tl.predict_perturbation(adata, model, perturbations=pert, key_added="cp10k", space="log1p_cp10k")
    kw = {"perturbation": pert, "return_fig": True}
    fig = vcell.pl.prediction_scatter(adata, pred_layer="default", **kw)
    r_default, offset_default = _scatter(fig)
    assert "1,669 per cell" in fig.axes[0].get_xlabel()  # the data's space, not a hard-coded CP10k
    both = r"in log1p\(CP10k: normalised to 10,000 per cell\).*in log1p\(normalised to 1,669 per cell\)"
    with pytest.raises(ValueError, match=both):
        vcell.pl.prediction_scatter(adata, pred_layer="cp10k", **kw)
    with pytest.raises(ValueError, match="different expression spaces"):
        vcell.pl.delta_heatmap(adata, pred_layer=["default", "cp10k"], perturbation=pert, return_fig=True)
    # counts as the truth: normalised into the predictions' space, both layers compare
    r_counts_cp10k, offset_counts = _scatter(
        vcell.pl.prediction_scatter(adata, pred_layer="cp10k", layer="counts", **kw)
    )
    assert r_counts_cp10k == pytest.approx(r_default, abs=0.005)
    # what happened before spaces were recorded: the cp10k layer unrecorded is compared with X, shifted by up to
    # log(1e4 / 1669) in expressed genes, and r drops
    del adata.uns["vcell_spaces"]["cp10k"]
    r_mismatch, offset_mismatch = _scatter(vcell.pl.prediction_scatter(adata, pred_layer="cp10k", **kw))
    assert r_default > 0.995
    assert r_mismatch < r_default - 0.01
    assert abs(offset_default) < 0.02
    assert abs(offset_counts) < 0.02
    assert offset_mismatch > 0.5


def test_evaluate_checks_spaces(scanpy_setup):
    adata, model, pert = scanpy_setup
    true = adata[adata.obs["vcell_perturbation"] == pert].copy()
    control = adata[adata.obs["vcell_perturbation"] == "control"].copy()
    true.obs["perturbation"] = pert
    kw = {"metrics": ["pearson_delta", "mse_top_de"], "perturbation_key": "perturbation"}
    pred = vcell.tl.predict_perturbation(adata, model, perturbations=pert, return_adata=True)
    good = vcell.metrics.evaluate(pred, true, control, **kw).set_index("metric")["value"]
    cp10k = vcell.tl.predict_perturbation(adata, model, perturbations=pert, return_adata=True, space="log1p_cp10k")
    both = r"pred.X, in log1p\(CP10k.*with true.X, in log1p\(normalised to 1,669 per cell\)"
    with pytest.raises(ValueError, match=both):
        vcell.metrics.evaluate(cp10k, true, control, **kw)
    cp10k.uns.pop("vcell_spaces")  # unrecorded predictions: target unknown, compared (as before), and worse
    bad = vcell.metrics.evaluate(cp10k, true, control, **kw).set_index("metric")["value"]
    assert good["pearson_delta"] > 0.995
    assert good["pearson_delta"] > bad["pearson_delta"] + 0.01
    assert bad["mse_top_de"] > 10 * good["mse_top_de"]
    counts = ad.AnnData(true.layers["counts"], obs=true.obs, var=true.var)
    with pytest.raises(ValueError, match=r"true.X holds raw counts.*pred: log1p\(normalised to 1,669"):
        vcell.metrics.evaluate(pred, counts, control, **kw)


def test_bench_refuses_a_predictor_declared_in_another_space():
    class Median:
        name = "median_space"
        expression_space = ExpressionSpace("log1p", 2000.0)  # not the truth's log1p(CP10k)

        def fit_predict(self, train, requests, *, seed, covariate_keys, layer):
            return {r.condition: np.full((r.controls.size, train.n_vars), 0.5, np.float32) for r in requests}

    adata = vcell.datasets.simulate(n_cells=300, n_genes=20, n_perturbations=3, n_combos=2, seed=0)
    kw = {"perturbation_key": "perturbation", "splits": ["combo_seen2"], "seeds": [0], "metrics": ["pearson_delta"]}
    kw |= {"ceiling": False, "progress": False}
    both = r"pred.X, in log1p\(normalised to 2,000 per cell\), with true.X, in log1p\(CP10k"
    with pytest.raises(ValueError, match=both):
        vcell.bench.run(adata, models=[Median()], **kw)
    Median.expression_space = ExpressionSpace.log1p_cp10k()
    assert len(vcell.bench.run(adata, models=[Median()], **kw).results)
