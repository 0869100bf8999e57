"""Does RNA help predict protein, and protein help predict RNA? Joint vs single-modality models (issue 10).

Data: ``vcell.datasets.simulate(protein=True, effects="target_programs")``: RNA and protein counts driven by the
same latent programs, with the ground-truth gene graph of the programs (``uns['vcell_simulation']['gene_graph']``)
that lets a model predict a perturbation it never saw. Two splits of ``vcell.bench.split``, the same cells held out
for every model and modality: ``combo_half`` (half of the double perturbations held out) and
``unseen_perturbation`` (20% of the single perturbations held out, with the doubles containing them).

For every model family (``--families``: CausalVAE, FlowMatching, CellJEPA, ResidualDiffusion) three variants are
trained on the same training cells by ``vcell.bench.run`` (CellJEPA on the proteins alone with ``n_proteins // 4``
gene modules, as 20 proteins cannot make its default 32):

* ``<family> joint``: registered on the MuData with ``protein_modality="prot"`` (one model of both modalities);
* ``<family> rna``: on the RNA modality alone; ``<family> prot``: on the protein counts alone (proteins as genes).

Models are given the gene graph (``gene_graph=``; ResidualDiffusion through its CausalVAE mean model) so unseen
singles can be predicted. ResidualDiffusion is scored on its sampled cells (one per control cell, ``output="sample"``;
its ``predict`` is its CausalVAE mean model's), the others on ``predict``. The baselines (control, mean, additive, linear) are fitted on both modalities (they work
feature by feature; ``linear`` fits one joint gene/protein embedding). Metrics per modality (``bench.run``'s
``modality`` column): Pearson delta, MSE of the top-DE features, energy distance in a PCA of the training cells.

Printed and written (``--out``): the summary per split, modality, metric and model (mean and 95% t-interval over
seeds), and the paired difference joint minus single-modality per family (mean and 95% t-interval over seeds).

Usage: ``python benchmarks/multimodal.py --seeds 0,1,2 [--families CausalVAE,FlowMatching] [--epochs 150]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from _causal_vae_cli import quiet_setup
from scipy import stats

import vcell

METRICS = ["pearson_delta", "mse_top_de", "energy_distance"]
SPLITS = ["combo_half", "unseen_perturbation"]
BASELINES = ["control", "mean", "additive", "linear"]
QUIET = {"enable_progress_bar": False}


def simulation(args: argparse.Namespace):
    mdata = vcell.datasets.simulate(
        n_cells=args.cells,
        n_genes=args.genes,
        n_perturbations=args.perturbations,
        n_combos=args.combos,
        n_proteins=args.proteins,
        n_programs=args.programs,
        effects="target_programs",
        protein=True,
        seed=args.data_seed,
    )
    graph = pd.DataFrame(mdata["rna"].uns["vcell_simulation"]["gene_graph"])
    return mdata, graph


def family_spec(family: str, variant: str, graph: pd.DataFrame, args: argparse.Namespace) -> vcell.bench.ModelSpec:
    """The ``ModelSpec`` of one family, all given the gene graph and ``--epochs``."""
    train = {"max_epochs": args.epochs, "trainer_kwargs": QUIET}
    name = f"{family} {variant}"
    if family == "ResidualDiffusion":
        init = {"mean_model": "CausalVAE", "mean_model_kwargs": {"gene_graph": graph}}
        train = {**train, "mean_train_kwargs": train}
        return vcell.bench.ModelSpec(name, vcell.model.ResidualDiffusion, init, train, output="sample")
    init = {"gene_graph": graph}
    if family == "CellJEPA":
        train = {**train, "pretrain_epochs": args.epochs}
        if variant == "prot":  # 20 proteins: fewer modules than the default 32
            init["n_modules"] = max(2, args.proteins // 4)
    return vcell.bench.ModelSpec(name, getattr(vcell.model, family), init, train)


def protein_anndata(mdata) -> ad.AnnData:
    """The protein counts as an AnnData of their own, with the RNA modality's obs (labels)."""
    prot = mdata["prot"]
    return ad.AnnData(X=prot.X.copy(), obs=mdata["rna"].obs.copy(), var=prot.var.copy())


def run_all(args: argparse.Namespace, out: Path) -> pd.DataFrame:
    mdata, graph = simulation(args)
    families = [f for f in args.families.split(",") if f]
    seeds = [int(s) for s in args.seeds.split(",")]
    common = {"splits": SPLITS, "seeds": seeds, "metrics": METRICS, "on_error": "skip", "progress": False}
    parts = []
    t0 = time.perf_counter()
    joint = [family_spec(f, "joint", graph, args) for f in families]
    res = vcell.bench.run(mdata, models=[*BASELINES, *joint], protein_modality="prot", **common)
    parts.append(res.results)
    res.results.to_csv(out / "results_joint.csv", index=False)  # each run kept as soon as it ends
    print(f"joint run: {time.perf_counter() - t0:.0f} s", flush=True)
    for modality, data in (("rna", mdata["rna"]), ("prot", protein_anndata(mdata))):
        t0 = time.perf_counter()
        specs = [family_spec(f, modality, graph, args) for f in families]
        res = vcell.bench.run(data, models=specs, **common)
        parts.append(res.results.assign(modality=modality))
        parts[-1].to_csv(out / f"results_{modality}_only.csv", index=False)
        print(f"{modality}-only run: {time.perf_counter() - t0:.0f} s", flush=True)
    return pd.concat(parts, ignore_index=True)


def paired(results: pd.DataFrame, families: list[str]) -> pd.DataFrame:
    """Joint minus single-modality, per family, split, modality and metric: mean and 95% t-interval over seeds."""
    r = results[results["metric"].isin(METRICS)]
    per_seed = r.groupby(["model", "split", "modality", "metric", "seed"])["value"].mean()
    rows = []
    for fam in families:
        for (split, modality, metric), _ in per_seed.groupby(["split", "modality", "metric"]):
            try:
                a = per_seed.loc[(f"{fam} joint", split, modality, metric)]
                b = per_seed.loc[(f"{fam} {modality}", split, modality, metric)]
            except KeyError:
                continue
            d = (a - b).dropna()
            n = len(d)
            half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
            mean = float(d.mean()) if n else np.nan
            rows.append(
                {
                    "family": fam,
                    "split": split,
                    "modality": modality,
                    "metric": metric,
                    "joint_minus_single": mean,
                    "ci_low": mean - half,
                    "ci_high": mean + half,
                    "n_seeds": n,
                }
            )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--families", default="CausalVAE,FlowMatching,CellJEPA,ResidualDiffusion")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--proteins", type=int, default=20)
    parser.add_argument("--perturbations", type=int, default=24)
    parser.add_argument("--programs", type=int, default=8)
    parser.add_argument("--combos", type=int, default=16)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "multimodal"))
    parser.add_argument(
        "--from-results", default="", help="comma-separated results.csv files (e.g. one per seed) to merge and report"
    )
    args = parser.parse_args()
    quiet_setup(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        results = pd.concat(
            [pd.read_csv(f, keep_default_na=False, na_values=[""]) for f in args.from_results.split(",")]
        )
        results["error"] = results["error"].fillna("")
    else:
        results = run_all(args, out)
    results.to_csv(out / "results.csv", index=False)
    summary = vcell.bench.summarize(results)
    summary.to_csv(out / "summary.csv", index=False)
    diff = paired(results, [f for f in args.families.split(",") if f])
    diff.to_csv(out / "paired.csv", index=False)
    errors = results.loc[results["error"].fillna("") != "", ["model", "split", "error"]].drop_duplicates("model")
    with pd.option_context("display.width", 220, "display.max_rows", 500, "display.precision", 3):
        s = summary.copy()
        s["cell"] = s.apply(lambda r: f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]", axis=1)
        for split in SPLITS:
            table = s[s["split"] == split].pivot_table(
                index="model", columns=["modality", "metric"], values="cell", aggfunc="first"
            )
            print(f"\n== {split}: mean [95% t-interval] over seeds", flush=True)
            print(table.to_string())
        print("\n== joint minus single-modality (same split, seeds and cells)")
        print(diff.to_string(index=False))
        if len(errors):
            print("\ncannot predict:")
            print(errors.to_string(index=False))


if __name__ == "__main__":
    main()
