"""ResidualDiffusion: distributions and uncertainty beside CausalVAE samples and the mean predictor plus Gaussian noise.

Two settings (issue 7):

* ``--data sim``: ``vcell.datasets.simulate(responder_fraction=0.5)`` (each perturbed cell responds with probability
  1/2, so every perturbation's cells are bimodal), raw counts; 30% of each perturbation's cells are held out (new
  cells of seen conditions), models train on the rest (all controls).
* ``--data kang``: Kang 2018 cell-type transfer, 2,000 HVGs (as ``causal_vae_kang.py``); a type's stimulated cells
  are held out, models train on the rest and sample that type's stimulated cells from its control cells.

Generators compared, per held-out condition, each drawing ``--n-samples`` cells (clipped at 0, log1p(CP10k)):

* ``RD(additive)`` / ``RD(CausalVAE)``: ResidualDiffusion (defaults: 30-PC residual space, empirical tails,
  ``match_mean``) with that mean model (the CausalVAE is the one trained for the CausalVAE rows, passed in trained;
  ``mu(c)`` from its samples, ``mean_from="auto"``); ``RD(CausalVAE,vae)``: the same in the CausalVAE's latent space;
* ``additive+gauss`` / ``CausalVAE+gauss``: that mean model's conditional mean ``mu(c)`` (mean counterfactual of the
  context's controls) plus independent Gaussian noise per gene with the training residuals' per-gene sd;
* ``CausalVAE.sample``: cells drawn from the CausalVAE's decoded negative binomial;
* ``additive`` / ``CausalVAE`` (points): each control cell's counterfactual (``predict``), for reference.

Metrics against the held-out cells: energy distance and MMD in a 50-PC space fitted on the training cells,
``diversity`` (variance ratio, coverage), and the observed coverage of the per-gene 90% predictive intervals
(``vcell.metrics.predictive_interval`` / ``interval_coverage``) over all genes and over the 200 genes most variable in
the training cells. Sampling speed of ResidualDiffusion (cells/s, ``--n-steps`` DDIM steps) is in ``timings.csv``.

Usage: ``python benchmarks/residual_diffusion.py --data sim --seeds 0,1,2 --out benchmarks/results/residual_diffusion``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from _causal_vae_cli import quiet_setup

import vcell
from vcell._utils import log1p_cp10k

QUIET = {"enable_progress_bar": False}


def sim_tasks(seed: int) -> list[tuple[str, ad.AnnData, ad.AnnData, list[str]]]:
    adata = vcell.datasets.simulate(
        n_cells=6000, n_genes=200, n_perturbations=8, n_combos=0, responder_fraction=0.5, seed=seed
    )
    rng = np.random.default_rng(seed)
    pert = adata.obs["perturbation"].astype(str).to_numpy()
    test = (pert != "control") & (rng.random(adata.n_obs) < 0.3)
    conditions = sorted(set(pert[test]))
    return [("sim", adata[~test].copy(), adata[test].copy(), conditions)]


def kang_tasks(types: list[str]) -> list[tuple[str, ad.AnnData, ad.AnnData, list[str]]]:
    from causal_vae_kang import load_kang

    adata = load_kang()
    out = []
    for t in types or sorted(adata.obs["cell_type"].unique()):
        held = (adata.obs["cell_type"].astype(str) == t).to_numpy() & (
            adata.obs["perturbation"] != "control"
        ).to_numpy()
        out.append((f"kang:{t}", adata[~held].copy(), adata[held].copy(), ["IFNb"]))
    return out


def conditional_mean(model, adata: ad.AnnData, pert: str, controls: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(adata, perturbation=pert, controls=controls, space="model"), dtype=np.float64).mean(
        0
    )


def gaussian_sampler(model, train: ad.AnnData, covariates: list[str], seed: int):
    """``mu(c) + N(0, sd_g^2)`` with the per-gene sd of the training cells' residuals around their ``mu(c)``."""
    E = log1p_cp10k(train.X)
    pert = train.obs["vcell_perturbation"].astype(str).to_numpy()
    ctx = train.obs[covariates].astype(str).agg("|".join, axis=1).to_numpy() if covariates else np.zeros(len(pert))
    ctrl = pert == "control"
    resid = []
    for p, k in sorted(set(zip(pert, ctx, strict=True))):
        rows = (pert == p) & (ctx == k)
        controls = np.flatnonzero(ctrl & (ctx == k))
        mu = E[controls].mean(0) if p == "control" else conditional_mean(model, train, p, controls)
        resid.append(E[rows] - mu)
    sd = np.concatenate(resid).std(0)
    rng = np.random.default_rng(seed)

    def draw(pert_label: str, controls: np.ndarray, n: int) -> np.ndarray:
        mu = conditional_mean(model, train, pert_label, controls)
        return np.clip(mu + rng.normal(size=(n, len(sd))) * sd, 0, None)

    return draw


def score(name: str, samples: np.ndarray, real: np.ndarray, pca, top: np.ndarray, seed: int) -> dict:
    from vcell import metrics as M

    lo, hi = M.predictive_interval(samples, level=0.9)
    Ps, Pr = M.pca_project(samples, *pca), M.pca_project(real, *pca)
    div = M.diversity(samples, real, pca=pca, seed=seed)
    return {
        "model": name,
        "energy_distance": M.energy_distance(Ps, Pr, seed=seed),
        "mmd": M.mmd(Ps, Pr, seed=seed),
        "variance_ratio": div["variance_ratio"],
        "nn_coverage": div["coverage"],
        "interval_coverage_all": M.interval_coverage(real, lo, hi),
        "interval_coverage_top200": M.interval_coverage(real[:, top], lo[top], hi[top]),
    }


def run_task(task, seed: int, args) -> tuple[list[dict], list[dict]]:
    name, train, test, conditions = task
    covariates = ["cell_type"] if "cell_type" in train.obs and train.obs["cell_type"].nunique() > 1 else []
    E_train = log1p_cp10k(train.X)
    pca = vcell.metrics.fit_pca(E_train, 50, seed=seed)
    top = np.argsort(-E_train.var(0))[:200]
    setup = {"perturbation_key": "perturbation", "control": "control", "covariate_keys": covariates}
    rows, times = [], []

    vcell.model.CausalVAE.setup_anndata(train, **setup)
    t0 = time.perf_counter()
    cvae = vcell.model.CausalVAE(train)
    cvae.train(max_epochs=args.epochs, seed=seed, trainer_kwargs=QUIET)
    times.append({"task": name, "seed": seed, "model": "CausalVAE", "fit_s": time.perf_counter() - t0})
    vcell.model.Baseline.setup_anndata(train, **setup)
    additive = vcell.model.Baseline(train, method="additive")
    additive.train()
    generators = {}
    for mean_name, mean_model in (("additive", additive), ("CausalVAE", cvae)):
        vcell.model.ResidualDiffusion.setup_anndata(train, **setup)
        t0 = time.perf_counter()
        rd = vcell.model.ResidualDiffusion(train, mean_model=mean_model, n_components=args.n_components)
        rd.train(max_epochs=args.rd_epochs, seed=seed, trainer_kwargs=QUIET)
        times.append({"task": name, "seed": seed, "model": f"RD({mean_name})", "fit_s": time.perf_counter() - t0})
        generators[f"RD({mean_name})"] = rd
        if mean_name == "CausalVAE":  # the same mean model, residuals in its latent space
            t0 = time.perf_counter()
            rd = vcell.model.ResidualDiffusion(train, mean_model=mean_model, space="vae")
            rd.train(max_epochs=args.rd_epochs, seed=seed, trainer_kwargs=QUIET)
            times.append({"task": name, "seed": seed, "model": "RD(CausalVAE,vae)", "fit_s": time.perf_counter() - t0})
            generators["RD(CausalVAE,vae)"] = rd
        generators[f"{mean_name}+gauss"] = gaussian_sampler(mean_model, train, covariates, seed)
        generators[mean_name] = mean_model

    ctrl_all = np.flatnonzero(train.obs["vcell_perturbation"].astype(str).to_numpy() == "control")
    for cond in conditions:
        real = log1p_cp10k(test[test.obs["perturbation"].astype(str) == cond].X)
        controls = ctrl_all
        if covariates:
            ctype = test.obs.loc[test.obs["perturbation"].astype(str) == cond, "cell_type"].astype(str).iloc[0]
            controls = ctrl_all[train.obs["cell_type"].astype(str).to_numpy()[ctrl_all] == ctype]
        n = args.n_samples
        for gname, gen in generators.items():
            t0 = time.perf_counter()
            if isinstance(gen, vcell.model.ResidualDiffusion):
                X = gen.sample(
                    train,
                    perturbation=cond,
                    n_cells=n,
                    controls=controls,
                    seed=seed,
                    n_steps=args.n_steps,
                    space="model",
                ).X
                dt = time.perf_counter() - t0
                times.append({"task": name, "seed": seed, "model": gname, "sample_cells_per_s": n / dt})
            elif callable(gen) and not hasattr(gen, "predict"):
                X = gen(cond, controls, n)
            else:
                X = gen.predict(train, perturbation=cond, controls=controls, space="model")
            rows.append(
                {"task": name, "seed": seed, "condition": cond, **score(gname, np.asarray(X), real, pca, top, seed)}
            )
        X = cvae.sample(train, perturbation=cond, n_cells=n, controls=controls, seed=seed, space="model").X
        rows.append(
            {
                "task": name,
                "seed": seed,
                "condition": cond,
                **score("CausalVAE.sample", np.asarray(X), real, pca, top, seed),
            }
        )
    return rows, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["sim", "kang", "speed"], default="sim")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--types", default="", help="Kang cell types (comma-separated; default all 7)")
    parser.add_argument("--epochs", type=int, default=200, help="CausalVAE max epochs (early stopping)")
    parser.add_argument("--rd-epochs", type=int, default=300, help="diffusion max epochs (early stopping)")
    parser.add_argument("--n-components", type=int, default=30)
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--n-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "residual_diffusion"))
    args = parser.parse_args()
    quiet_setup(args.threads)

    out = Path(args.out) / args.data
    out.mkdir(parents=True, exist_ok=True)
    if args.data == "speed":
        speed(args, out)
        return
    rows, times = [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        tasks = sim_tasks(seed) if args.data == "sim" else kang_tasks([t for t in args.types.split(",") if t])
        for task in tasks:
            t0 = time.perf_counter()
            r, t = run_task(task, seed, args)
            rows += r
            times += t
            print(f"{task[0]} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
            write(pd.DataFrame(rows), pd.DataFrame(times), out)  # after every task, so a stop keeps the finished ones


def speed(args, out: Path) -> None:
    """Sampling throughput (cells/s) of ResidualDiffusion by DDIM step count (200 genes, 30 dims, 256 x 3 MLP)."""
    import torch

    adata = vcell.datasets.simulate(n_cells=3000, n_genes=200, n_perturbations=4, n_combos=0, seed=0)
    vcell.model.ResidualDiffusion.setup_anndata(adata, perturbation_key="perturbation", control="control")
    rd = vcell.model.ResidualDiffusion(adata, mean_model="additive", n_components=args.n_components)
    rd.train(max_epochs=2, seed=0, trainer_kwargs=QUIET)  # speed does not depend on training
    pert = rd.mean_model.vocab.atoms[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rd.module.to(device)
    rows = []
    for n_steps in (5, 10, 20, 50):
        rd.sample(perturbation=pert, n_cells=200, n_steps=n_steps, seed=0, space="model")  # warm-up
        t0 = time.perf_counter()
        rd.sample(perturbation=pert, n_cells=args.n_samples, n_steps=n_steps, seed=0, space="model")
        dt = time.perf_counter() - t0
        rows.append(
            {
                "device": device,
                "threads": args.threads,
                "n_steps": n_steps,
                "cells": args.n_samples,
                "seconds": dt,
                "cells_per_s": args.n_samples / dt,
            }
        )
    df = pd.DataFrame(rows)
    path = out / f"speed_{device}_{args.threads}threads.csv"
    df.to_csv(path, index=False)
    print(df.to_string(index=False))


def write(res: pd.DataFrame, times: pd.DataFrame, out: Path) -> None:
    """``results.csv``, ``timings.csv`` and ``summary.csv`` (mean over conditions per seed, then mean/sd over seeds)."""
    res.to_csv(out / "results.csv", index=False)
    times.to_csv(out / "timings.csv", index=False)
    metrics = [c for c in res.columns if c not in ("task", "seed", "condition", "model")]
    per_seed = res.groupby(["task", "model", "seed"])[metrics].mean()
    summary = per_seed.groupby(["task", "model"]).agg(["mean", "std"])
    summary.columns = [f"{m}_{s}" for m, s in summary.columns]
    summary.to_csv(out / "summary.csv")
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
        print(per_seed.groupby(["task", "model"]).mean(), flush=True)
        print(times.groupby(["task", "model"]).mean(numeric_only=True), flush=True)


if __name__ == "__main__":
    main()
