from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import vcell
from vcell._utils import expression_for_eval
from vcell.model import CellJEPA
from vcell.module import effective_rank

QUIET = {"enable_progress_bar": False}
FAST = {"n_latent": 32, "n_modules": 8, "n_hidden": 64}
#: pretraining of the shared model (and of its no-anti-collapse twin): 10 epochs at lr 3e-3, formerly 30 at 1e-3.
#: Over simulation seeds 0-2 it ends as spread (embedding std min 0.79-0.82, mean 0.90-0.92, effective rank
#: 17-18) and the twin as collapsed (std ratio 0.22-0.37; the 30 epochs gave 0.23 and 0.41 for seeds 0-1)
PRETRAIN = {"max_epochs": 10, "lr": 3e-3, "batch_size": 128}


def _sim(seed: int = 0, **kw) -> ad.AnnData:
    args = {"n_cells": 400, "n_genes": 50, "n_perturbations": 3, "n_combos": 0, "seed": seed}
    adata = vcell.datasets.simulate(**{**args, **kw})
    CellJEPA.setup_anndata(adata, perturbation_key="perturbation", control="control")
    return adata


@pytest.fixture(scope="module")
def trained(accelerator) -> dict:
    adata = _sim()
    model = CellJEPA(adata, **FAST)  # co-expression modules, transformer, JEPA, EMA, anti-collapse
    model.pretrain(**PRETRAIN, seed=0, accelerator=accelerator, trainer_kwargs=QUIET)
    # 20 transition epochs at lr 1e-2 (formerly 60 at 1e-3): pearson delta >= 0.90 over seeds 0-2, retrieval top-1
    model.train(max_epochs=20, lr=1e-2, batch_size=128, seed=0, accelerator=accelerator, trainer_kwargs=QUIET)
    return {"adata": adata, "model": model}


def test_no_collapse_with_anti_collapse(trained, accelerator):
    model = trained["model"]
    z = model.get_latent_representation()
    assert z.shape == (400, 32)
    assert z.dtype == np.float32
    std = z.std(0)
    print("embedding std", std.mean(), std.min(), "effective rank", effective_rank(z))
    assert std.min() > 0.4
    assert std.mean() > 0.6
    assert effective_rank(z) > 8
    # the diagnostics are logged per epoch
    h = model.pretrain_history_
    assert {"train_jepa", "train_variance", "train_covariance", "train_embedding_std", "train_effective_rank"} <= set(h)
    assert len(h["train_embedding_std"]) == PRETRAIN["max_epochs"]
    assert h["train_effective_rank"].iloc[-1, 0] > 8
    assert h["train_embedding_std"].iloc[-1, 0] > 0.6
    assert {"transition_train_loss", "train_transition_mse", "train_decoder_mse", "train_effective_rank"} <= set(
        model.history_
    )
    # with EMA and anti-collapse off the embedding shrinks toward a constant
    off = CellJEPA(trained["adata"], **FAST, ema=False, anti_collapse=False)
    off.pretrain(**PRETRAIN, seed=0, accelerator=accelerator, trainer_kwargs=QUIET)
    std_off = off.get_latent_representation().std(0)
    print("embedding std without anti-collapse", std_off.mean())
    assert std_off.mean() < 0.5 * std.mean()


def test_transition_recovers_planted_shift(trained):
    model, adata = trained["model"], trained["adata"]
    X = expression_for_eval(adata)
    labels = adata.obs["vcell_perturbation"].astype(str).to_numpy()
    ctrl = labels == "control"
    base = X[ctrl].mean(0)
    for p in sorted(set(labels) - {"control"}):
        pred = model.predict(perturbation=p, space="log1p_cp10k")
        assert pred.shape == (ctrl.sum(), adata.n_vars)
        assert pred.dtype == np.float32
        assert (pred >= 0).all()
        r = np.corrcoef(pred.mean(0) - base, X[labels == p].mean(0) - base)[0, 1]
        print(p, "pearson delta", r)
        assert r > 0.7
    # the control condition is the identity: delta 0, so the residual prediction is each cell itself
    np.testing.assert_allclose(model.predict(perturbation="control", space="log1p_cp10k"), X[ctrl], atol=1e-5)
    p = sorted(set(labels) - {"control"})[0]
    emb = model.predict_embedding(perturbation=p, controls=[0, 1, 2])
    assert emb.shape == (3, 32)
    assert not np.allclose(emb, model.get_latent_representation(indices=[0, 1, 2]))
    assert model.predict(perturbation=p, residual=False).shape == (ctrl.sum(), adata.n_vars)
    table = model.embedding_retrieval()
    print(table)
    assert list(table.index) == sorted(set(labels) - {"control"})
    assert table["top1"].all()
    assert (table["rank"] == 1).all()
    assert (table["nearest"] == table.index).all()
    assert (table["cosine_error"] < 0.2).all()
    assert (table["n_cells"] == [int((labels == q).sum()) for q in table.index]).all()
    one = model.embedding_retrieval(perturbations=[p])
    assert one.shape[0] == 1
    assert one["rank"].iloc[0] == 1


def test_random_and_pathway_modules(tmp_path):
    adata = _sim(n_cells=100)
    genes = list(adata.var_names)
    model = CellJEPA(adata, n_latent=16, modules="random", n_modules=8, seed=3)
    sizes = sorted(len(v) for v in model.gene_modules_.values())
    assert sizes == [6, 6, 6, 6, 6, 6, 7, 7]  # 50 genes in 8 near-equal groups
    flat = [g for v in model.gene_modules_.values() for g in v]
    assert sorted(flat) == sorted(genes)  # every gene exactly once
    again = CellJEPA(adata, n_latent=16, modules="random", n_modules=8, seed=3)
    assert again.gene_modules_ == model.gene_modules_
    assert CellJEPA(adata, n_latent=16, modules="random", n_modules=8, seed=4).gene_modules_ != model.gene_modules_
    # the module's membership buffer matches
    member = model.module.jepa.membership.numpy()
    for k, v in enumerate(model.gene_modules_.values()):
        np.testing.assert_array_equal(np.flatnonzero(member[k]), sorted(genes.index(g) for g in v))
    # pathways: modules with >= min_genes model genes (shared genes allowed), genes of no module in "rest"
    table = pd.DataFrame(
        {
            "source": ["A"] * 6 + ["B"] * 4 + ["C"] * 2,
            "target": [*genes[:4], "NOT_A_GENE", "ALSO_NOT", *genes[3:7], *genes[10:12]],
        }
    )
    pm = CellJEPA(adata, n_latent=16, modules=table, min_genes=3)
    assert pm.gene_modules_ == {"A": genes[:4], "B": genes[3:7], "rest": genes[7:]}
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("".join(f"{s}\tdesc\t" + "\t".join(g) + "\n" for s, g in table.groupby("source")["target"]))
    assert CellJEPA(adata, n_latent=16, modules=str(gmt), min_genes=3).gene_modules_ == pm.gene_modules_
    # n_modules caps the pathway modules at the largest ones
    assert list(CellJEPA(adata, n_latent=16, modules=table, min_genes=2, n_modules=2).gene_modules_) == [
        "A",
        "B",
        "rest",
    ]
    # a dict is used as given
    mods = {"x": genes[:25], "y": genes[25:]}
    assert CellJEPA(adata, n_latent=16, modules=mods).gene_modules_ == mods


def test_coexpression_modules_recover_blocks(rng):
    """Four blocks of 10 genes, each driven by its own latent factor: k-means on correlations finds the blocks."""
    n = 300
    factors = rng.normal(size=(n, 4))
    X = np.repeat(factors, 10, axis=1) + 0.3 * rng.normal(size=(n, 40))
    order = rng.permutation(40)  # blocks interleaved along var_names
    adata = ad.AnnData(
        X=(3 + X[:, order]).clip(0).astype(np.float32),
        obs=pd.DataFrame({"perturbation": ["control"] * n}, index=[f"c{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(40)]),
    )
    CellJEPA.setup_anndata(adata, perturbation_key="perturbation", control="control")
    model = CellJEPA(adata, n_latent=16, n_modules=4)
    block = {f"g{j}": order[j] // 10 for j in range(40)}
    found = sorted(sorted(block[g] for g in v) for v in model.gene_modules_.values())
    assert found == [[k] * 10 for k in range(4)]


def test_test_cells_excluded_and_train_runs_pretraining(accelerator):
    adata = _sim(n_cells=200)
    split = np.array(["train"] * 200, dtype=object)
    split[:30] = "test"
    adata.obs["vcell_split"] = split
    model = CellJEPA(adata, n_latent=16, n_modules=4, modules="random")
    assert not model.is_pretrained_
    model.train(max_epochs=2, pretrain_epochs=3, seed=0, accelerator=accelerator, trainer_kwargs=QUIET)
    assert model.is_pretrained_
    assert model.is_trained_
    assert len(model.history_["train_jepa"]) == 3
    assert len(model.history_["transition_train_loss"]) == 2
    used = np.union1d(model.pretrain_indices_, np.union1d(model.train_indices_, model.validation_indices_))
    assert not np.isin(np.arange(30), used).any()
    assert len(used) == 170


@pytest.mark.parametrize("kw", [{"encoder": "mlp"}, {"objective": "reconstruction", "decoder": "linear"}])
def test_options_train(kw, accelerator):
    adata = _sim(n_cells=200)
    model = CellJEPA(adata, n_latent=16, n_modules=4, modules="random", **kw)
    model.train(max_epochs=2, pretrain_epochs=2, seed=0, accelerator=accelerator, trainer_kwargs=QUIET)
    obj = kw.get("objective", "jepa")
    assert f"train_{obj}" in model.history_
    p = str(adata.uns["vcell_simulation"]["perturbations"][0])
    assert model.predict(perturbation=p).shape == (int((adata.obs["vcell_perturbation"] == "control").sum()), 50)


def test_same_seed_same_model_and_save_load(tmp_path):
    adata = _sim(n_cells=100)
    p = str(adata.uns["vcell_simulation"]["perturbations"][0])

    def fit(seed: int) -> CellJEPA:  # tiny, 2 epochs each (the per-epoch reshuffle included): seeding, not learning
        m = CellJEPA(adata, n_latent=16, n_modules=4, n_hidden=16, n_layers=1)
        m.train(max_epochs=2, pretrain_epochs=2, seed=seed, accelerator="cpu", trainer_kwargs=QUIET)
        return m

    m1, m2, m3 = fit(7), fit(7), fit(8)
    z1, p1 = m1.get_latent_representation(), m1.predict(perturbation=p)
    np.testing.assert_array_equal(z1, m2.get_latent_representation())
    np.testing.assert_array_equal(p1, m2.predict(perturbation=p))
    assert not np.allclose(z1, m3.get_latent_representation())
    m1.save(tmp_path / "jepa", overwrite=True, save_anndata=False)
    loaded = CellJEPA.load(tmp_path / "jepa", adata=adata, accelerator="cpu")
    assert loaded.gene_modules_ == m1.gene_modules_
    np.testing.assert_array_equal(p1, loaded.predict(perturbation=p))
    np.testing.assert_array_equal(z1, loaded.get_latent_representation())
    with pytest.warns(UserWarning, match="without anndata"):  # scvi-tools' notice
        bare = CellJEPA.load(tmp_path / "jepa", accelerator="cpu")
    np.testing.assert_array_equal(p1, bare.predict(adata, perturbation=p))
    pd.testing.assert_frame_equal(m1.embedding_retrieval(), bare.embedding_retrieval(adata))


def test_errors():
    adata = _sim(n_cells=100)
    with pytest.raises(ValueError, match="encoder"):
        CellJEPA(adata, encoder="cnn")
    with pytest.raises(ValueError, match="objective"):
        CellJEPA(adata, objective="contrastive")
    with pytest.raises(ValueError, match="n_modules"):
        CellJEPA(adata, n_modules=51)
    with pytest.raises(ValueError, match="n_modules"):
        CellJEPA(adata, n_modules=1)
    with pytest.raises(ValueError, match="n_latent"):
        CellJEPA(adata, n_latent=0)
    with pytest.raises(ValueError, match="mask_ratio"):
        CellJEPA(adata, n_modules=4, mask_ratio=0.0)
    with pytest.raises(ValueError, match="modules must be"):
        CellJEPA(adata, modules=5)
    with pytest.raises(ValueError, match="min_genes=5"):
        CellJEPA(adata, modules=pd.DataFrame({"source": ["A", "A"], "target": list(adata.var_names[:2])}))
    with pytest.raises(ValueError, match="lacks"):
        CellJEPA(adata, modules=pd.DataFrame({"set": ["A"], "gene": ["G0000"]}))
    with pytest.raises(FileNotFoundError):
        CellJEPA(adata, modules="no_such_file.gmt")
    model = CellJEPA(adata, n_latent=16, n_modules=4, modules="random")
    p = str(adata.uns["vcell_simulation"]["perturbations"][0])
    with pytest.raises(RuntimeError, match="pretrained"):
        model.get_latent_representation()
    with pytest.raises(RuntimeError, match="not trained"):
        model.predict(perturbation=p)
    model.train(max_epochs=1, pretrain_epochs=1, seed=0, accelerator="cpu", trainer_kwargs=QUIET)
    with pytest.raises(KeyError, match="NOPE"):
        model.predict(perturbation="NOPE")
    with pytest.raises(KeyError, match="NOPE"):
        model.predict_embedding(perturbation=f"{p}+NOPE")
    with pytest.raises(KeyError, match="NOPE"):
        model.embedding_retrieval(perturbations=["NOPE"])
    with pytest.raises(ValueError, match="order"):
        model.predict(adata[:, ::-1].copy(), perturbation=p)


def test_bench_run_by_class_name():
    from vcell.bench._run import _resolve_models

    (spec,) = _resolve_models(["CellJEPA"])  # what bench.run(models=["CellJEPA"]) builds
    assert spec.model_cls is CellJEPA
    adata = vcell.datasets.simulate(n_cells=300, n_genes=30, n_perturbations=4, n_combos=2, seed=1)
    spec = vcell.bench.ModelSpec(
        "CellJEPA",
        CellJEPA,
        {"n_latent": 16, "n_modules": 4, "modules": "random"},
        {"max_epochs": 3, "pretrain_epochs": 3, "trainer_kwargs": QUIET},
    )
    res = vcell.bench.run(adata, models=["additive", spec], splits=["combo_half"], seeds=[0])
    assert set(res.results["model"]) == {"additive", "CellJEPA"}
    assert res.results.loc[res.results["model"] == "CellJEPA", "value"].notna().any()


def test_backed_sparse_input_trains_and_predicts(tmp_path):
    """A backed h5ad pretrains, trains and predicts end to end (rows read per batch, embeddings per block); with the
    in-memory copy's cell order (``shuffle="full"``) it gives the same model."""
    from scipy import sparse

    mem = vcell.datasets.simulate(n_cells=240, n_genes=30, n_perturbations=3, n_combos=0, seed=0)
    mem.X = sparse.csr_matrix(mem.X)
    mem.write_h5ad(tmp_path / "screen.h5ad")
    backed = ad.read_h5ad(tmp_path / "screen.h5ad", backed="r")
    small = {"n_latent": 8, "n_modules": 4, "n_hidden": 16, "n_layers": 1}
    out = {}
    for name, adata, shuffle in (("mem", mem, "full"), ("backed", backed, "full"), ("auto", backed, "auto")):
        CellJEPA.setup_anndata(adata, perturbation_key="perturbation", control="control")
        model = CellJEPA(adata, **small, seed=0)  # co-expression modules: a subsample read from disk
        kw = {"seed": 0, "accelerator": "cpu", "trainer_kwargs": QUIET, "batch_size": 64, "shuffle": shuffle}
        model.train(max_epochs=1, pretrain_epochs=1, **kw)
        pert = model.vocab.atoms[0]
        out[name] = (model.predict(perturbation=pert), model.get_latent_representation())
    assert backed.isbacked
    n_ctrl = int((mem.obs["vcell_perturbation"] == "control").sum())
    for pred, z in out.values():
        assert pred.shape == (n_ctrl, mem.n_vars)
        assert z.shape == (mem.n_obs, 8)
        assert np.isfinite(pred).all()
        assert np.isfinite(z).all()
    for k in (0, 1):
        np.testing.assert_allclose(out["backed"][k], out["mem"][k], atol=1e-5)
