"""Does RNA help predict protein, and protein help predict RNA? CausalVAE joint vs single-modality (issue 10).

Data: ``vcell.datasets.simulate(protein=True)``: RNA and protein counts driven by the same latent programs. Split:
``vcell.bench.split(kind="combo_half")`` on the RNA modality (half of the double perturbations held out; their cells
never trained on), applied to both modalities. Models, all trained on the same training cells:

* ``joint``: CausalVAE on RNA + protein (``protein_modality="prot"``), predicting both;
* ``rna_only``: CausalVAE on RNA alone; ``prot_only``: CausalVAE on the protein counts alone;
* ``additive``: the additive baseline, fitted per modality.

For every held-out double: Pearson delta of the mean predicted change of the control cells against the true mean
change (log1p of counts per 1e4 of each modality's library), and the MSE of the mean, per modality. Means over the
held-out doubles per seed, then mean and sd over seeds.

Usage: ``python benchmarks/multimodal.py --seeds 0,1,2 [--epochs 200] [--threads 1]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _causal_vae_cli import quiet_setup

import vcell
from vcell._utils import log1p_cp10k

QUIET = {"enable_progress_bar": False}
SETUP = {"perturbation_key": "perturbation", "control": "control"}


def score(pred: np.ndarray, true: np.ndarray, ctrl: np.ndarray) -> dict:
    return {
        "pearson_delta": float(np.corrcoef(pred - ctrl, true - ctrl)[0, 1]),
        "mse": float(np.mean((pred - true) ** 2)),
    }


def run_seed(seed: int, args) -> list[dict]:
    mdata = vcell.datasets.simulate(
        n_cells=args.cells, n_genes=200, n_perturbations=10, n_combos=20, protein=True, n_proteins=20, seed=seed
    )
    rna, prot = mdata["rna"], mdata["prot"]
    vcell.bench.split(rna, kind="combo_half", seed=seed, perturbation_key="perturbation", control="control")
    split = rna.obs["vcell_split"].astype(str).to_numpy()
    train_mask = split != "test"
    held = sorted(set(rna.obs["perturbation"].astype(str)[split == "test"]) - {"control"})
    train = mdata[train_mask].copy()
    E = {"rna": log1p_cp10k(rna.X), "prot": log1p_cp10k(prot.X)}
    labels = rna.obs["perturbation"].astype(str).to_numpy()
    ctrl_train = np.flatnonzero(train["rna"].obs["perturbation"].astype(str).to_numpy() == "control")

    preds: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    t0 = time.perf_counter()
    vcell.model.CausalVAE.setup_anndata(train, protein_modality="prot", **SETUP)
    joint = vcell.model.CausalVAE(train)
    joint.train(max_epochs=args.epochs, seed=seed, trainer_kwargs=QUIET)
    preds["joint"] = {
        m: {p: joint.predict(train, perturbation=p, controls=ctrl_train, modality=m).mean(0) for p in held}
        for m in ("rna", "prot")
    }
    for name, mod in (("rna_only", "rna"), ("prot_only", "prot")):
        ad = train[mod].copy()
        vcell.model.CausalVAE.setup_anndata(ad, **SETUP)
        single = vcell.model.CausalVAE(ad)
        single.train(max_epochs=args.epochs, seed=seed, trainer_kwargs=QUIET)
        preds[name] = {mod: {p: single.predict(ad, perturbation=p, controls=ctrl_train).mean(0) for p in held}}
    preds["additive"] = {}
    for mod in ("rna", "prot"):
        ad = train[mod].copy()
        vcell.model.Baseline.setup_anndata(ad, **SETUP)
        add = vcell.model.Baseline(ad, method="additive")
        add.train()
        preds["additive"][mod] = {p: add.predict(ad, perturbation=p, controls=ctrl_train).mean(0) for p in held}
    print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)

    rows = []
    ctrl_mean = {m: E[m][np.flatnonzero(train_mask & (labels == "control"))].mean(0) for m in E}
    for model, by_mod in preds.items():
        for mod, by_pert in by_mod.items():
            for p, pred in by_pert.items():
                true = E[mod][labels == p].mean(0)
                rows.append(
                    {
                        "seed": seed,
                        "model": model,
                        "modality": mod,
                        "perturbation": p,
                        **score(pred, true, ctrl_mean[mod]),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--cells", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "multimodal"))
    args = parser.parse_args()
    quiet_setup(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows += run_seed(seed, args)
        res = pd.DataFrame(rows)
        res.to_csv(out / "results.csv", index=False)
        per_seed = res.groupby(["modality", "model", "seed"])[["pearson_delta", "mse"]].mean()
        summary = per_seed.groupby(["modality", "model"]).agg(["mean", "std"])
        summary.columns = [f"{m}_{s}" for m, s in summary.columns]
        summary.to_csv(out / "summary.csv")
        with pd.option_context("display.width", 200, "display.precision", 3):
            print(summary, flush=True)


if __name__ == "__main__":
    main()
