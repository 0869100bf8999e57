"""Peer adapters (``benchmarks/peers``): plumbing with known answers, the report generator, and scGen / the runner
end to end on tiny data (slow)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

PEERS_PARENT = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(PEERS_PARENT))
sys.path.insert(0, str(PEERS_PARENT / "peers" / "workers"))

from peers import _common  # noqa: E402
from peers.scgen import ScGen, _balanced_mean  # noqa: E402
from peers.vcell_models import LIBRARY_KEY, VcellModel, rescale_log1p_cp10k  # noqa: E402


def test_classify_request_known_answers():
    trained = {"A", "B", "A+C"}
    assert _common.classify_request("A", trained) == "seen"
    assert _common.classify_request("A+C", trained) == "seen"
    assert _common.classify_request("A+B", trained) == "combo"
    assert _common.classify_request("A+D", trained) == "unseen"
    assert _common.classify_request("D", trained) == "unseen"


def test_balanced_mean_weights_contexts_equally():
    Z = np.array([[0.0], [0.0], [0.0], [4.0]])
    ctx = np.array(["x", "x", "x", "y"])
    # plain mean 1.0; per-context means 0 and 4 -> 2.0
    assert _balanced_mean(Z, ctx)[0] == pytest.approx(2.0)


def test_go_edges_jaccard_and_top_k():
    from gears_worker import go_edges  # pure numpy/pandas; no GEARS needed

    g2g = {"a": ["t1", "t2"], "b": ["t2"], "c": ["t3"]}
    e = go_edges(g2g, ["a", "b", "c"], k=20)
    w = {(s, t): v for s, t, v in e.itertuples(index=False)}
    assert w[("a", "b")] == pytest.approx(0.5)  # |{t2}| / |{t1, t2}|
    assert w[("b", "a")] == pytest.approx(0.5)
    assert w[("a", "a")] == pytest.approx(1.0)  # GEARS keeps self edges
    assert ("a", "c") not in w
    assert ("c", "a") not in w
    # k=0 keeps the single strongest incoming edge per target (the self edge)
    e0 = go_edges(g2g, ["a", "b", "c"], k=0)
    assert sorted(zip(e0["source"], e0["target"], strict=True)) == [("a", "a"), ("b", "b"), ("c", "c")]


def test_gene2go_from_simulation_gives_every_gene_a_term():
    from peers.gears import gene2go_from_simulation

    import vcell

    a = vcell.datasets.simulate(n_cells=50, n_genes=20, n_perturbations=2, n_combos=1, seed=0)
    g2g = gene2go_from_simulation(a)
    W = a.uns["vcell_simulation"]["program_loadings"]
    assert set(g2g) == set(a.var_names)
    j = 3
    expected = [f"program{k}" for k in np.flatnonzero(W[:, j])] + [f"self:{a.var_names[j]}"]
    assert g2g[a.var_names[j]] == expected
    assert gene2go_from_simulation(a[:, :5].copy()) is None  # loadings no longer match the genes


def _tiny_train():
    import anndata as ad

    rng = np.random.default_rng(0)
    X = rng.poisson(3.0, size=(12, 5)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "vcell_perturbation": ["control"] * 6 + ["A"] * 3 + ["B"] * 3,
            "vcell_split": ["train"] * 12,
        },
        index=[f"c{i}" for i in range(12)],
    )
    return ad.AnnData(X=X, obs=obs)


def test_subprocess_peer_without_env_returns_reasons(tmp_path):
    from vcell.bench import PredictionRequest

    class Missing(_common.SubprocessPeer):
        def __post_init__(self):
            self.peer, self.worker = "no-such-peer", "none.py"

    train = _tiny_train()
    reqs = [PredictionRequest("A+B", "A+B", 1.0, np.arange(6))]
    out = Missing(name="missing").fit_predict(train, reqs, seed=0, covariate_keys=(), layer=None)
    assert isinstance(out["A+B"], str)
    assert "not built" in out["A+B"]


def test_write_and_read_worker_files(tmp_path):
    from vcell.bench import PredictionRequest

    train = _tiny_train()
    reqs = [PredictionRequest("A+B", "A+B", 1.0, np.array([0, 2])), PredictionRequest("C", "C", 1.0, np.arange(3))]
    _common.write_inputs(tmp_path, train, reqs, covariate_keys=(), layer=None, seed=3, options={"x": 1})
    import json

    spec = json.loads((tmp_path / "requests.json").read_text())
    assert spec["seed"] == 3
    assert spec["requests"][0]["controls"] == [0, 2]
    np.savez(tmp_path / "predictions.npz", **{"0": np.ones((2, 5))})
    (tmp_path / "reasons.json").write_text(json.dumps({"1": "no"}))
    out = _common.read_outputs(tmp_path, reqs)
    assert out["A+B"].shape == (2, 5)
    assert out["C"] == "no"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_scgen_adapter_on_tiny_split():
    import vcell

    adata = vcell.datasets.simulate(n_cells=400, n_genes=40, n_perturbations=4, n_combos=4, frac_epistatic=0.0, seed=1)
    sg = ScGen(max_epochs=3, batch_size=64, n_hidden=32, n_latent=8)
    res = vcell.bench.run(
        adata,
        models=["control", sg],
        splits=["combo_half"],
        seeds=[0],
        metrics=["pearson_delta"],
        ceiling=False,
        on_error="skip",
        progress=False,
    )
    r = res.results.query("model == 'scGen' and metric == 'pearson_delta'")
    assert len(r) == 2  # combo_half holds out half of the 4 doubles
    assert np.isfinite(r["value"]).all()
    t = res.timings.set_index("model").loc["scGen"]
    assert t["fit_s"] > 0
    assert t["peak_mem_mb"] > 0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_scgen_refuses_unseen_and_predicts_seen():
    from vcell.bench import PredictionRequest

    train = _tiny_train()
    train.obs["vcell_perturbation"] = train.obs["vcell_perturbation"].astype("category")
    reqs = [
        PredictionRequest("D", "D", 1.0, np.arange(6)),
        PredictionRequest("A+B", "A+B", 1.0, np.array([0, 1, 2])),
    ]
    out = ScGen(max_epochs=1, batch_size=4, n_hidden=8, n_latent=2).fit_predict(
        train, reqs, seed=0, covariate_keys=(), layer=None
    )
    assert isinstance(out["D"], str)
    assert "unseen" in out["D"]
    assert out["A+B"].shape == (3, 5)


def test_thread_env_caps_every_pool():
    env = _common.thread_env(1)
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["OPENBLAS_NUM_THREADS"] == "1"
    assert env["MKL_NUM_THREADS"] == "1"


def test_rescale_log1p_cp10k_known_answer():
    # 10 and 30 counts: 40 on the model's genes, 80 over all genes -> CP10k 2,500/7,500 -> 1,250/3,750
    y = np.log1p(np.array([[2500.0, 7500.0]]))
    out = rescale_log1p_cp10k(y, np.array([0.5]))
    np.testing.assert_allclose(out, np.log1p([[1250.0, 3750.0]]), rtol=1e-6)
    np.testing.assert_allclose(rescale_log1p_cp10k(y, np.array([1.0])), y, rtol=1e-6)  # same library: unchanged


class _IdentitySpec:
    """A fake vcell model: predicts each control cell's own log1p(CP10k) of the registered matrix."""

    name = "fake"

    def __init__(self, fail: bool = False):
        self.init_kwargs: dict = {}
        self.calls = 0
        self.fail = fail
        self.last_resources = {"fit_s": 1.0}

    def fit_predict(self, train, requests, *, seed, covariate_keys, layer):
        from vcell._utils import get_matrix, log1p_cp10k

        self.calls += 1
        if self.fail:
            msg = "boom"
            raise RuntimeError(msg)
        X = log1p_cp10k(get_matrix(train, layer))
        return {r.condition: X[np.asarray(r.controls)] for r in requests}


def test_vcell_model_answers_in_the_benchmark_normalisation():
    from vcell.bench import PredictionRequest

    train = _tiny_train()
    train.X = train.X + 25  # integer values: counts
    extra = np.arange(1, 13, dtype=np.float64) * 10  # counts of genes the model does not see
    train.obs[LIBRARY_KEY] = train.X.sum(1) + extra
    spec = _IdentitySpec()
    reqs = [PredictionRequest("A", "A", 1.0, np.array([0, 3, 5]))]
    out = VcellModel(spec).fit_predict(train, reqs, seed=0, covariate_keys=(), layer="log1p_cp10k")
    c = np.array([0, 3, 5])
    expected = np.log1p(train.X[c] / train.obs[LIBRARY_KEY].to_numpy()[c, None] * 1e4)
    np.testing.assert_allclose(out["A"], expected, rtol=1e-5)
    assert spec.calls == 1


def test_vcell_model_refuses_unseen_without_training_and_reports_failures():
    from vcell.bench import PredictionRequest

    train = _tiny_train()
    spec = _IdentitySpec()
    model = VcellModel(spec)
    out = model.fit_predict(
        train, [PredictionRequest("D", "D", 1.0, np.arange(6))], seed=0, covariate_keys=(), layer=None
    )
    assert "no training cell carries ['D']" in out["D"]
    assert spec.calls == 0  # nothing to answer: not trained
    # a combination of trained singles is answered
    out = model.fit_predict(
        train, [PredictionRequest("A+B", "A+B", 1.0, np.arange(2))], seed=0, covariate_keys=(), layer=None
    )
    assert out["A+B"].shape == (2, 5)
    failing = VcellModel(_IdentitySpec(fail=True))
    out = failing.fit_predict(
        train, [PredictionRequest("A", "A", 1.0, np.arange(2))], seed=0, covariate_keys=(), layer=None
    )
    assert out["A"] == "fake failed: RuntimeError: boom"


def _results(models_values: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for model, values in models_values.items():
        for split, v in zip(("B", "NK"), values, strict=True):
            for metric in ("pearson_delta", "energy_distance"):
                rows.append(
                    {
                        "model": model,
                        "split": split,
                        "seed": 0,
                        "perturbation": "IFNb",
                        "metric": metric,
                        "value": v,
                        "ceiling": 0.9,
                        "error": "",
                    }
                )
    return pd.DataFrame(rows)


def test_report_labels_identical_models_once_and_bolds_the_best():
    from peers import run_peers

    res = _results({"mean": [0.5, 0.7], "additive": [0.6, 0.8], "linear": [0.5, 0.7]})
    assert run_peers.same_predictions(res, ["mean", "additive", "linear"]) == {"linear": "mean"}
    timings = pd.DataFrame(
        {"model": ["mean", "additive", "linear"] * 2, "split": ["B"] * 3 + ["NK"] * 3, "seed": 0, "total_s": 1.0}
    )
    md = run_peers.task_tables("kang", res, timings, ["mean", "additive", "linear"])
    main = md.split("\n\n")[0].splitlines()
    labels = [line.split("|")[1].strip() for line in main[2:]]
    assert labels == ["mean", "additive", "linear (= mean)", "split-half ceiling"]
    additive = main[labels.index("additive") + 2]
    assert "**0.700**" in additive  # mean Pearson delta of additive (0.6, 0.8): the best
    assert "`linear` predicted what `mean` predicted" in md


def test_settings_paragraph_is_written_from_the_budgets():
    from peers import run_peers

    text = run_peers.settings_text(False, 1, ["CausalVAE"])
    b = run_peers.BUDGETS
    assert f"for {b['state']['max_steps']} steps" in text
    assert f"scGen ≤ {b['scgen']['max_epochs']} epochs" in text
    assert f"{b['cellflow']['num_iterations']} iterations" in text
    assert f"GEARS {b['gears']['epochs']} epochs" in text
    assert "CausalVAE" in text
    assert "CausalVAE" not in run_peers.settings_text(False, 1, [])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_run_peers_quick_with_causal_vae(tmp_path):
    """The runner end to end on the simulated task: baselines + CausalVAE (2 epochs), no peer; the page and walls."""
    import json

    from peers import run_peers

    run_peers.main(
        ["--tasks", "combos", "--peers", "", "--quick", "--out", str(tmp_path), "--doc", str(tmp_path / "p.md")]
    )
    t = pd.read_csv(tmp_path / "combos" / "timings.csv")
    assert list(t["model"]) == ["control", "mean", "additive", "linear", "CausalVAE"]
    r = pd.read_csv(tmp_path / "combos" / "results.csv")
    cv = r[(r["model"] == "CausalVAE") & (r["metric"] == "pearson_delta")]
    assert len(cv) == 10
    assert np.isfinite(cv["value"]).all()
    page = (tmp_path / "p.md").read_text()
    assert "| CausalVAE | 10/10 |" in page
    walls = json.loads((tmp_path / "walls.json").read_text())
    assert walls["combos"] > 0
    assert walls["_meta"]["models"] == ["CausalVAE"]
