"""Kang 2018 cell-type transfer: CausalVAE beside the four baselines, all 7 held-out cell types (BENCHMARK.md).

Protocol: raw counts of ``kang2018_pbmc_ifnb_small.h5ad``; 2,000 highly variable genes chosen with scanpy
(``flavor="seurat"``) on log1p(CP10k) of all cells, then the counts subset to them; for each cell type, its
stimulated cells are held out (``vcell.bench.split(kind="unseen_cell_type")``), every model trains on the rest and
predicts them from that type's control cells; metrics from ``vcell.bench.run`` (energy distance in a 50-PC space fit
on training cells, Pearson delta over all genes and the top-20 DE genes). ``covariate_keys=["cell_type"]``.

Besides the benchmark table, the script reports how much ``z_basal`` still reveals the perturbation and the cell type:
the model's own adversaries (accuracy on training cells, beside chance = majority share), and a fresh 5-fold
cross-validated logistic-regression probe on ``z_basal``.

Usage: ``python benchmarks/causal_vae_kang.py [--epochs 200] [--seed 0] [--out benchmarks/results/causal_vae_kang]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from _causal_vae_cli import add_causal_vae_arguments, causal_vae_spec, quiet_setup

import vcell
from vcell._utils import log1p_cp10k

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kang2018_pbmc_ifnb_small.h5ad"


class RecordedCausalVAE(vcell.model.CausalVAE):
    """CausalVAE that keeps every trained instance (for the adversary report)."""

    trained: list = []

    def train(self, seed: int | None = None, **kwargs) -> None:
        t0 = time.perf_counter()
        super().train(seed=seed, **kwargs)
        self.fit_seconds_ = time.perf_counter() - t0
        type(self).trained.append(self)


def load_kang() -> ad.AnnData:
    adata = ad.read_h5ad(DATA)
    logn = adata.copy()
    logn.X = log1p_cp10k(adata.X)
    sc.pp.highly_variable_genes(logn, flavor="seurat", n_top_genes=2000)
    return adata[:, logn.var["highly_variable"].to_numpy()].copy()


def probe_accuracy(z: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, float]:
    """5-fold cross-validated accuracy of a logistic regression predicting ``y`` from ``z``, and chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    _, counts = np.unique(y, return_counts=True)
    folds = StratifiedKFold(n_splits=min(5, counts.min()), shuffle=True, random_state=seed)
    acc = cross_val_score(LogisticRegression(max_iter=2000), z, y, cv=folds).mean()
    return float(acc), float(counts.max() / counts.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_causal_vae_arguments(parser, epochs=300, epochs_help="max epochs (early stopping on val_counterfactual_mse)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--types", default="", help="comma-separated cell types (default: all 7)")
    args = parser.parse_args()
    quiet_setup(args.threads)

    adata = load_kang()
    types = args.types.split(",") if args.types else sorted(adata.obs["cell_type"].unique())
    spec = causal_vae_spec(args, RecordedCausalVAE)
    t0 = time.perf_counter()
    res = vcell.bench.run(
        adata,
        models=["control", "mean", "additive", "linear", spec],
        splits=[{"kind": "unseen_cell_type", "held_out": t, "name": t} for t in types],
        seeds=[args.seed],
        covariate_keys=["cell_type"],
        metrics=["energy_distance", "pearson_delta", "pearson_delta_top_de", "mse_top_de"],
        progress=False,
    )
    print(f"benchmark took {time.perf_counter() - t0:.0f} s\n")
    r = res.results
    metrics = ["energy_distance", "pearson_delta", "pearson_delta_top_de"]
    tab = r[r["metric"].isin(metrics)].pivot_table(index="split", columns=["metric", "model"], values="value")
    pd.set_option("display.width", 200)
    for metric in metrics:
        t = tab[metric].reindex(columns=["control", "mean", "additive", "linear", "CausalVAE"]).copy()
        if metric == "energy_distance":
            t["CausalVAE < additive"] = t["CausalVAE"] < t["additive"]
        print(f"== {metric} (per held-out cell type)")
        print(t.round(3).to_string(), "\n")
    means = r[r["metric"].isin(metrics)].groupby(["metric", "model"])["value"].mean().unstack("model")
    print("== mean over cell types")
    print(means.reindex(columns=["control", "mean", "additive", "linear", "CausalVAE"]).round(3).to_string(), "\n")
    ed = tab["energy_distance"]
    wins = int((ed["CausalVAE"] < ed["additive"]).sum())
    print(f"CausalVAE energy distance below additive on {wins}/{len(ed)} cell types (target: >= 5 of 7)")
    print(
        f"CausalVAE below scGen's mean energy distance from BENCHMARK.md (3.263) on {int((ed['CausalVAE'] < 3.263).sum())}/{len(ed)}\n"
    )

    rows = []
    for model, split in zip(RecordedCausalVAE.trained, types, strict=True):
        z = model.get_latent_representation()
        obs = model.adata.obs
        pert_acc, pert_chance = probe_accuracy(z, obs["vcell_perturbation"].astype(str).to_numpy(), args.seed)
        ct_acc, ct_chance = probe_accuracy(z, obs["cell_type"].astype(str).to_numpy(), args.seed)
        adv = model.adversary_accuracy_
        rows.append(
            {
                "held_out": split,
                "epochs": len(model.history["train_loss"]),
                "fit_s": round(model.fit_seconds_, 1),
                "adv_pert_acc": adv.loc["perturbation", "accuracy"],
                "adv_pert_chance": adv.loc["perturbation", "chance"],
                "adv_type_acc": adv.loc["cell_type", "accuracy"],
                "adv_type_chance": adv.loc["cell_type", "chance"],
                "probe_pert_acc": pert_acc,
                "probe_pert_chance": pert_chance,
                "probe_type_acc": ct_acc,
                "probe_type_chance": ct_chance,
            }
        )
    print("== z_basal: adversaries (training cells) and a 5-fold logistic-regression probe, vs chance")
    print(pd.DataFrame(rows).set_index("held_out").round(3).to_string())
    if args.out:
        res.to_csv(args.out)
        pd.DataFrame(rows).to_csv(Path(args.out) / "causal_vae_z_basal.csv", index=False)


if __name__ == "__main__":
    main()
