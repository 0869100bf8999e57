"""ResidualDiffusion: mean model + residual diffusion; bimodal responders, seeded sampling, save/load, errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import vcell
from vcell._utils import group_means, log1p_cp10k, to_dense
from vcell.model import ResidualDiffusion

QUIET = {"enable_progress_bar": False}


def _bimodal_adata(seed: int = 0, n_ctrl: int = 300, n_pert: int = 300, n_genes: int = 20) -> ad.AnnData:
    """log1p-like data: controls N(2, 0.3^2); perturbation A: half the cells (responders) +1.5 on genes 0-4."""
    rng = np.random.default_rng(seed)
    X = 2.0 + 0.3 * rng.normal(size=(n_ctrl + n_pert, n_genes))
    responder = np.zeros(n_ctrl + n_pert, dtype=bool)
    responder[n_ctrl:] = rng.random(n_pert) < 0.5
    X[responder, :5] += 1.5
    obs = pd.DataFrame(
        {"perturbation": ["control"] * n_ctrl + ["A"] * n_pert, "responder": responder},
        index=[f"c{i}" for i in range(n_ctrl + n_pert)],
    )
    return ad.AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))


@pytest.fixture(scope="module")
def bimodal_trained():
    """Trained to learn the bimodal residual (300 epochs): only for the slow quality test."""
    adata = _bimodal_adata()
    ResidualDiffusion.setup_anndata(adata, perturbation_key="perturbation", control="control")
    model = ResidualDiffusion(adata, mean_model="additive", n_components=4, n_hidden=64, n_layers=2)
    model.train(max_epochs=300, batch_size=128, lr=3e-3, seed=0, early_stopping=False, trainer_kwargs=QUIET)
    return adata, model


@pytest.fixture(scope="module")
def bimodal():
    """A small, briefly trained model on the same design: the contract tests only read it."""
    adata = _bimodal_adata(n_ctrl=100, n_pert=100)
    ResidualDiffusion.setup_anndata(adata, perturbation_key="perturbation", control="control")
    model = ResidualDiffusion(adata, mean_model="additive", n_components=4, n_hidden=16, n_layers=1)
    model.train(max_epochs=3, batch_size=128, lr=3e-3, seed=0, early_stopping=False, trainer_kwargs=QUIET)
    return adata, model


def test_bimodal_samples_move_in_the_planted_direction(bimodal):
    """Fast sibling of the slow test below: same sample path, checks the planted shift rather than the two modes."""
    adata, model = bimodal
    s = model.sample(perturbation="A", n_cells=500, seed=0, n_steps=10)
    assert s.shape == (500, 20)
    pert = adata.obs["perturbation"].to_numpy()
    true = adata.X[pert == "A"]
    planted = float(true[:, :5].mean())  # 2 + 1.5 * share of responders, ~2.7 here
    score = s.X[:, :5].mean(1)
    assert abs(score.mean() - planted) < 0.1  # a model that predicts control lands near 2.0
    assert abs(float(s.X[:, 5:].mean()) - 2.0) < 0.1  # untouched genes stay at the control level
    assert abs(model.predict(perturbation="A").mean(0)[:5].mean() - planted) < 0.1
    assert score.std() > 0.2  # residuals are added (~0.45 here, 0.76 in the data): not every cell at mu(c)
    ctrl = model.sample(perturbation="control", n_cells=500, seed=0, n_steps=10)
    assert abs(float(ctrl.X[:, :5].mean()) - 2.0) < 0.1
    # the perturbed samples are closer to the perturbed cells than the control samples are
    ed_model = vcell.metrics.energy_distance(s.X, true, seed=0)
    ed_ctrl = vcell.metrics.energy_distance(ctrl.X, true, seed=0)
    assert ed_model < 0.5 * ed_ctrl


@pytest.mark.slow
def test_recovers_planted_bimodal_responders(bimodal_trained):
    adata, model = bimodal_trained
    s = model.sample(perturbation="A", n_cells=1000, seed=0)
    assert s.shape == (1000, 20)
    score = s.X[:, :5].mean(1)  # responders near 3.5, non-responders near 2.0
    high = score > 2.75
    share = adata.obs["responder"][adata.obs["perturbation"] == "A"].mean()  # 0.45 in this draw
    assert abs(high.mean() - share) < 0.08
    assert abs(score[high].mean() - 3.5) < 0.25
    assert abs(score[~high].mean() - 2.0) < 0.25
    assert np.mean(np.abs(score - 2.75) < 0.25) < 0.1  # the mean itself is not where samples land
    # the mean model alone puts every cell in the middle
    mean = model.predict(perturbation="A").mean(0)[:5].mean()
    assert abs(mean - 2.75) < 0.1
    # and beats the mean predictor with Gaussian noise of the residuals' per-gene sd in energy distance
    true = adata.X[adata.obs["perturbation"].to_numpy() == "A"]
    rng = np.random.default_rng(0)
    resid_sd = true.std(0)
    gauss = model.predict(perturbation="A").mean(0) + rng.normal(size=(1000, 20)) * resid_sd
    ed_model = vcell.metrics.energy_distance(s.X, true, seed=0)
    ed_gauss = vcell.metrics.energy_distance(gauss, true, seed=0)
    assert ed_model < 0.5 * ed_gauss


def test_sample_seeded_and_contract(bimodal):
    adata, model = bimodal
    a = model.sample(perturbation="A", n_cells=50, seed=1, n_steps=10)
    b = model.sample(perturbation="A", n_cells=50, seed=1, n_steps=10)
    c = model.sample(perturbation="A", n_cells=50, seed=2, n_steps=10)
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.array_equal(a.X, c.X)
    assert a.X.dtype == np.float32
    assert (a.X >= 0).all()
    assert list(a.obs.columns) == ["perturbation", "vcell_perturbation", "vcell_dose", "vcell_source_cell"]
    assert set(a.obs["vcell_source_cell"]) <= set(adata.obs_names[adata.obs["perturbation"] == "control"])
    one_each = model.sample(perturbation="A", seed=0, n_steps=5)
    assert one_each.n_obs == int((adata.obs["perturbation"] == "control").sum())
    ctrl = model.sample(perturbation="control", n_cells=300, seed=0, n_steps=10)
    assert abs(float(ctrl.X[:, :5].mean()) - 2.0) < 0.15


def test_predict_is_the_mean_models(bimodal):
    adata, model = bimodal
    np.testing.assert_array_equal(model.predict(perturbation="A"), model.mean_model.predict(adata, perturbation="A"))
    assert 0.0 <= model.residual_variance_explained_ <= 1.0
    assert "train_loss" in model.history_


def test_save_load_round_trip(bimodal, tmp_path):
    adata, model = bimodal
    model.save(tmp_path / "rd", overwrite=True)
    assert (tmp_path / "rd" / "mean_model" / "vcell_model.json").exists()
    loaded = ResidualDiffusion.load(tmp_path / "rd", adata=adata)
    np.testing.assert_allclose(
        loaded.sample(perturbation="A", n_cells=40, seed=3, n_steps=10).X,
        model.sample(perturbation="A", n_cells=40, seed=3, n_steps=10).X,
        atol=1e-5,
    )
    np.testing.assert_array_equal(loaded.predict(perturbation="A"), model.predict(perturbation="A"))


def test_same_seed_same_model():
    adata = _bimodal_adata(n_ctrl=40, n_pert=40, n_genes=8)
    ResidualDiffusion.setup_anndata(adata, perturbation_key="perturbation", control="control")
    samples = []
    for _ in range(2):
        model = ResidualDiffusion(adata, mean_model="mean", n_components=3, n_hidden=16, n_layers=1)
        model.train(max_epochs=2, seed=5, trainer_kwargs=QUIET)
        samples.append(model.sample(perturbation="A", n_cells=20, seed=0, n_steps=5).X)
    np.testing.assert_array_equal(*samples)


def test_vae_space_and_control_conditioning():
    adata = vcell.datasets.simulate(n_cells=200, n_genes=20, n_perturbations=2, n_combos=0, seed=0)
    ResidualDiffusion.setup_anndata(adata, perturbation_key="perturbation", control="control")
    model = ResidualDiffusion(
        adata,
        space="vae",
        mean_model_kwargs={"n_latent": 6, "n_hidden": 32},
        condition_on_control=True,
        tail="gaussian",
        n_hidden=32,
        n_layers=1,
    )
    assert model.n_dims_ == 6
    assert model.mean_from_ == "auto"  # a mean model that can sample: chosen when training
    model.train(
        max_epochs=2, seed=0, trainer_kwargs=QUIET, mean_train_kwargs={"max_epochs": 2, "trainer_kwargs": QUIET}
    )
    assert model.mean_model.is_trained_
    mse = model.mean_source_mse_
    assert model.mean_from_ == min(mse, key=mse.get)  # the source closer to the training conditions' means
    pert = model.mean_model.vocab.atoms[0]
    s = model.sample(perturbation=pert, n_cells=30, seed=0, n_steps=5)
    assert s.shape == (30, 20)
    assert np.isfinite(s.X).all()


def test_passing_a_trained_mean_model(bimodal):
    adata, model = bimodal
    rd = ResidualDiffusion(adata, mean_model=model.mean_model, n_components=3, n_hidden=16, n_layers=1)
    assert rd.mean_model is model.mean_model
    assert rd.init_params_["non_kwargs"]["mean_model"] == "additive"
    other = _bimodal_adata(n_ctrl=20, n_pert=20, n_genes=10)
    ResidualDiffusion.setup_anndata(other, perturbation_key="perturbation", control="control")
    with pytest.raises(ValueError, match="other genes"):
        ResidualDiffusion(other, mean_model=model.mean_model)


def test_errors(bimodal):
    adata, model = bimodal
    with pytest.raises(ValueError, match="space must be one of"):
        ResidualDiffusion(adata, mean_model="mean", space="umap")
    with pytest.raises(ValueError, match="mean_from must be"):
        ResidualDiffusion(adata, mean_model="mean", mean_from="median")
    with pytest.raises(ValueError, match="needs a mean model with a sample method"):
        ResidualDiffusion(adata, mean_model="additive", mean_from="sample")
    with pytest.raises(ValueError, match="tail must be one of"):
        ResidualDiffusion(adata, mean_model="mean", tail="t")
    with pytest.raises(ValueError, match="needs a CausalVAE"):
        ResidualDiffusion(adata, mean_model="mean", space="vae")
    with pytest.raises(ValueError, match="unknown mean_model 'SCVI'"):
        ResidualDiffusion(adata, mean_model="SCVI")
    with pytest.raises(RuntimeError, match="not trained"):
        ResidualDiffusion(adata, mean_model="mean").sample(perturbation="A")
    with pytest.raises(KeyError, match="'B'"):
        model.sample(perturbation="B", n_cells=5)
    with pytest.raises(ValueError, match="n_steps"):
        model.sample(perturbation="A", n_steps=0)
    with pytest.raises(ValueError, match="n_cells"):
        model.sample(perturbation="A", n_cells=0)


def test_mean_matching_shift_known_answer():
    from vcell.model._residual_diffusion import _mean_matching_shift

    Y = np.array([[-1.0, 5.0], [0.0, 5.0], [1.0, 5.0], [2.0, 5.0]])
    # gene 0: values (0, s, 1 + s, 2 + s) for s in (0, 1) average 1 at s = 1/3; gene 1 (never clipped): s = 2 - 5
    np.testing.assert_allclose(_mean_matching_shift(Y, np.array([1.0, 2.0])), [1 / 3, -3.0], atol=1e-9)
    np.testing.assert_allclose(np.clip(Y + _mean_matching_shift(Y, np.array([0.0, 0.0])), 0, None), 0.0, atol=1e-9)


def test_samples_keep_the_conditional_mean(bimodal):
    adata, model = bimodal
    mu = model.predict(perturbation="A").mean(0)
    big = model.sample(perturbation="A", n_cells=600, seed=0, n_steps=10)
    np.testing.assert_allclose(big.X.mean(0), mu, atol=1e-3)
    few = model.sample(perturbation="A", n_cells=30, seed=0, n_steps=10)  # shift estimated on extra draws
    assert np.abs(few.X.mean(0) - mu).mean() < 0.1
    raw = model.sample(perturbation="A", n_cells=600, seed=0, n_steps=10, match_mean=False)
    assert not np.allclose(raw.X, big.X)


# ---------------------------------------------------------------------- streamed statistics, backed data


def _sparse_screen(seed: int = 0, split: bool = False) -> ad.AnnData:
    """Counts (CSR), 600 cells x 50 genes, two cell types; optionally a seeded 20% test split."""
    adata = vcell.datasets.simulate(n_cells=600, n_genes=50, n_perturbations=6, n_combos=3, cell_types=2, seed=seed)
    adata.X = sparse.csr_matrix(to_dense(adata.X))
    if split:
        test = np.random.default_rng(seed).random(adata.n_obs) < 0.2
        adata.obs["vcell_split"] = np.where(test, "test", "train")
    return adata


def _fit_rd(adata: ad.AnnData, *, max_epochs: int = 1, **kw) -> ResidualDiffusion:
    ResidualDiffusion.setup_anndata(
        adata, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
    )
    model = ResidualDiffusion(
        adata, **{"mean_model": "additive", "n_components": 5, "n_hidden": 16, "n_layers": 1, **kw}
    )
    model.train(max_epochs=max_epochs, seed=0, accelerator="cpu", shuffle="full", trainer_kwargs=QUIET)
    return model


def test_streamed_residual_space_equals_the_dense_fit():
    """PCA, tails and explained variance read in row blocks equal those of the dense residual matrix.

    Reference: the fit before streaming (vcell fad41bc): the log1p(CP10k) matrix of the non-test cells, centred per
    (condition, dose, context), scikit-learn's PCA of it (:func:`vcell.metrics.fit_pca`) and the residuals outside
    the components. Blocks of 256 rows (``chunk_elements`` set low) and a test split exercise the filtered reads.
    """
    from vcell.metrics import fit_pca

    adata = _sparse_screen(split=True)
    old = vcell.settings.chunk_elements
    vcell.settings.chunk_elements = 64
    try:
        model = _fit_rd(adata.copy(), n_components=6)
    finally:
        vcell.settings.chunk_elements = old
    cells = np.flatnonzero(adata.obs["vcell_split"].to_numpy() != "test")
    E = log1p_cp10k(adata.X[cells]).astype(np.float64)
    obs = adata[cells].obs
    keys = obs["perturbation"].astype(str) + "|" + obs["cell_type"].astype(str)
    R = E - group_means(E, keys.to_numpy()).reindex(keys).to_numpy()
    comps, mean = fit_pca(R, 6, seed=0)
    np.testing.assert_allclose(model.pca_components_, comps, atol=1e-8)
    np.testing.assert_allclose(model.pca_mean_, mean, atol=1e-10)
    tails = (R - mean) - (R - mean) @ comps.T @ comps
    np.testing.assert_allclose(model.tail_std_, tails.std(0), rtol=1e-5)
    want = 1.0 - tails.var(0).sum() / R.var(0).sum()
    assert model.residual_variance_explained_ == pytest.approx(want, rel=1e-10)
    assert 0.0 < want < 1.0
    # kept tails: rows of the dense tails
    dist = ((tails[:, None, :] - model.tail_[None, :5, :]) ** 2).sum(-1).min(0)
    np.testing.assert_allclose(dist, 0.0, atol=1e-8)
    # the same model whatever the block size
    ref = _fit_rd(adata.copy(), n_components=6)
    np.testing.assert_allclose(ref.pca_components_, model.pca_components_, atol=1e-10)
    a = ref.sample(perturbation=ref.vocab.atoms[0], n_cells=50, seed=0, n_steps=5).X
    b = model.sample(perturbation=model.vocab.atoms[0], n_cells=50, seed=0, n_steps=5).X
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_backed_data_end_to_end(tmp_path):
    """A backed h5ad (sparse counts) sets up, trains, predicts and samples; the same model as in memory."""
    adata = _sparse_screen(seed=1)
    adata.write_h5ad(tmp_path / "screen.h5ad")
    backed = ad.read_h5ad(tmp_path / "screen.h5ad", backed="r")
    kw = {"condition_on_control": True}
    disk = _fit_rd(backed, **kw)
    assert disk.adata.isbacked
    mem = _fit_rd(adata, **kw)
    pert = mem.vocab.atoms[0]
    pred = disk.predict(perturbation=pert)
    n_ctrl = int((adata.obs["perturbation"] == "control").sum())
    assert pred.shape == (n_ctrl, adata.n_vars)
    assert np.isfinite(pred).all()
    np.testing.assert_allclose(pred, mem.predict(perturbation=pert), rtol=1e-5, atol=1e-5)
    s = disk.sample(perturbation=pert, n_cells=40, seed=0, n_steps=5)
    assert s.shape == (40, adata.n_vars)
    assert np.isfinite(s.X).all()
    np.testing.assert_allclose(s.X, mem.sample(perturbation=pert, n_cells=40, seed=0, n_steps=5).X, atol=1e-5)
    assert disk.residual_variance_explained_ == pytest.approx(mem.residual_variance_explained_, rel=1e-6)
    ctrl = disk.sample(perturbation="control", n_cells=20, seed=1, n_steps=5)
    assert ctrl.shape == (20, adata.n_vars)
    assert np.isfinite(ctrl.X).all()


def test_train_memory_stays_far_below_the_dense_matrix():
    """20k cells x 300 genes, sparse counts: training reads the matrix in row blocks.

    The dense float64 matrix of the training cells that train used to build is 20,000 x 300 x 8 B = 46 MiB (its
    residuals and tails as much again: the fit peaked at 193 MiB). Streamed, the peak is a block's few float64
    arrays (a quarter of ``chunk_elements``: 2 MiB each), the 4,000 kept tail rows (4.6 MiB) and per-cell
    coordinates and labels: 16 MiB measured. The bound, half the dense matrix, fails any fit that densifies it.
    """
    import tracemalloc

    rng = np.random.default_rng(0)
    n, g = 20_000, 300
    X = sparse.random(n, g, density=0.1, format="csr", random_state=0, dtype=np.float32)
    X.data = (rng.poisson(3, X.nnz) + 1).astype(np.float32)
    X.data[0] = 50.0  # counts (some value above 20)
    conds = ["control", *[f"G{i}" for i in range(10)], *[f"G{i}+G{i + 1}" for i in range(5)]]
    obs = pd.DataFrame(
        {"perturbation": rng.choice(conds, n), "cell_type": rng.choice(["a", "b"], n)},
        index=[f"c{i}" for i in range(n)],
    )
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(g)]))
    ResidualDiffusion.setup_anndata(
        adata, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
    )
    model = ResidualDiffusion(adata, mean_model="mean", n_components=10, n_hidden=16, n_layers=1)
    tracemalloc.start()
    try:
        model.train(max_epochs=1, batch_size=4096, seed=0, accelerator="cpu", trainer_kwargs=QUIET)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    dense = n * g * 8
    assert peak < 0.5 * dense, f"peak {peak / 2**20:.1f} MiB"
    assert model.tail_.shape == (4000, g)


@pytest.mark.parametrize("chunk_rows", [None, 16])
@pytest.mark.parametrize("mean_model", ["additive", "CausalVAE"])
def test_condition_means_read_controls_once_and_equal_one_call_per_condition(mean_model, chunk_rows, monkeypatch):
    """Training's condition means (all conditions of a context and dose from one read of its controls) equal the
    mean model's mean counterfactual per condition, in one chunk of controls and in several (16 rows)."""
    from vcell.model import _residual_diffusion

    adata = _sparse_screen()
    kw = {} if mean_model == "additive" else {"mean_train_kwargs": {"max_epochs": 1, "trainer_kwargs": QUIET}}
    ResidualDiffusion.setup_anndata(
        adata, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
    )
    model = ResidualDiffusion(adata, mean_model=mean_model, n_components=5, n_hidden=16, n_layers=1)
    model.train(max_epochs=1, seed=0, accelerator="cpu", trainer_kwargs=QUIET, **kw)
    perts = sorted(set(adata.obs["perturbation"].astype(str)) - {"control"})
    controls = np.flatnonzero((adata.obs["perturbation"] == "control").to_numpy())
    if chunk_rows is not None:
        monkeypatch.setattr(_residual_diffusion, "_MIN_PREDICT_ROWS", chunk_rows)
        monkeypatch.setattr(vcell.settings, "chunk_elements", chunk_rows * adata.n_vars)
        assert len(controls) > 2 * chunk_rows
    batched = model._predicted_means(adata, perts, 1.0, controls)
    single = [model._predicted_mean(adata, p, 1.0, controls) for p in perts]
    assert len(batched) == len(perts) > 1
    for p, a, b in zip(perts, batched, single, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=p)
