"""CellJEPA ablation (issue 9): one factor at a time around the default model, beside the baselines and CausalVAE.

Arms (every other option as in the ``default`` arm):

* ``default``: co-expression modules, EMA target encoder, VICReg anti-collapse, ``objective="jepa"``;
* ``modules=random``: genes split at random into modules;
* ``modules=hallmark``: MSigDB Hallmark pathways (``shared/data/prior_knowledge/msigdb_hallmark_human.gmt``; the
  ``n_modules`` largest with at least 5 model genes plus a ``rest`` module). Papalexi only: the simulation's genes
  (``G0000``...) are in no pathway;
* ``ema=False``: the target is the context encoder under stop-gradient;
* ``anti_collapse=False``: no variance/covariance terms;
* ``objective=reconstruction``: the control arm, decoding the masked genes instead of predicting their embedding.

A full factorial (3-4 module policies x EMA x anti-collapse x objective, 24 arms) does not fit the CPU budget; one
factor at a time shows each factor's effect around the default, not their interactions.

Baselines: ``control``, ``mean``, ``additive`` and ``linear`` (``additive`` and plain ``linear`` cannot predict an
unseen knock-out, so on Papalexi ``linear`` uses the GO embedding of ``causal_vae_papalexi.py`` and ``additive`` is
left out), and CausalVAE (default, ``--epochs`` max epochs). CellJEPA and CausalVAE use the same GO table on Papalexi
(``perturbation_embedding=``), one-hot perturbations on the simulation.

Tasks:

1. **Papalexi 2021** unseen knock-outs (``split(kind="unseen_perturbation")``, 20% of the 25 knock-outs held out per
   seed), on a fixed subsample (``--papalexi-cells`` per knock-out, ``--papalexi-controls`` controls; seed 0) so that
   the 18 CellJEPA fits fit the budget;
2. **simulation**: ``vcell.datasets.simulate(n_cells=4000, n_genes=200, n_perturbations=10, n_combos=20,
   frac_epistatic=0.3, seed=s)`` for seed ``s``, split ``combo_half`` with the same seed.

Metrics: pearson_delta (all genes and top-20 DE), mse_top_de, energy_distance; mean over held-out conditions per seed,
then mean and 95% t-interval over seeds (``vcell.bench.summarize``).

Diagnostics: every CellJEPA fit inside ``bench.run`` also records the last pretraining epoch's embedding std and
effective rank (``model.pretrain_history_``) and ``model.embedding_retrieval()`` on its training data (top-1
retrieval rate and mean cosine error of the predicted embedding shifts), written to ``diagnostics.csv``.

Usage: ``python benchmarks/cell_jepa_ablation.py [--tasks papalexi,simulation] [--seeds 0,1,2] [--threads 1]
[--arms default,...] [--pretrain-epochs 30] [--out DIR] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from _causal_vae_cli import add_causal_vae_arguments, causal_vae_spec, quiet_setup
from causal_vae_papalexi import go_embedding

import vcell

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HALLMARK = SHARED / "prior_knowledge" / "msigdb_hallmark_human.gmt"
REFERENCE = "CellJEPA default"
METRICS = ["pearson_delta", "pearson_delta_top_de", "mse_top_de", "energy_distance"]
#: one factor changed from the default per arm
ARMS: dict[str, dict[str, Any]] = {
    "default": {},
    "modules=random": {"modules": "random"},
    "modules=hallmark": {"modules": str(HALLMARK)},
    "ema=False": {"ema": False},
    "anti_collapse=False": {"anti_collapse": False},
    "objective=reconstruction": {"objective": "reconstruction"},
}


class RecordedCellJEPA(vcell.model.CellJEPA):
    """CellJEPA that records its representation diagnostics after every ``train`` (one row per fit)."""

    arm = ""
    task = ""
    records: list[dict[str, Any]] = []

    def train(self, seed: int | None = None, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        super().train(seed=seed, **kwargs)
        fit_s = time.perf_counter() - t0
        h = self.pretrain_history_
        ret = self.embedding_retrieval()
        last = {k: float(v.iloc[-1, 0]) for k, v in h.items()}
        RecordedCellJEPA.records.append(
            {
                "task": self.task,
                "arm": self.arm,
                "seed": seed,
                "n_modules": len(self.gene_modules_),
                "pretrain_epochs": len(h["train_loss"]),
                "embedding_std": last["train_embedding_std"],
                "effective_rank": last["train_effective_rank"],
                "val_embedding_std": last.get("val_embedding_std", np.nan),
                "val_effective_rank": last.get("val_effective_rank", np.nan),
                "retrieval_top1": float(ret["top1"].mean()),
                "retrieval_mean_rank": float(ret["rank"].mean()),
                "n_retrieved": len(ret),
                "cosine_error": float(ret["cosine_error"].mean()),
                "fit_s": fit_s,
            }
        )


def jepa_specs(args: argparse.Namespace, task: str, arms: list[str], **extra: Any) -> list[vcell.bench.ModelSpec]:
    """One ``ModelSpec`` per arm; each arm gets its own ``RecordedCellJEPA`` subclass (its name in the records)."""
    base = {**json.loads(args.jepa_kwargs), **extra}
    train = {
        "max_epochs": args.jepa_epochs,
        "pretrain_epochs": args.pretrain_epochs,
        "batch_size": args.batch_size,
        "trainer_kwargs": {"enable_progress_bar": False},
    }
    if args.arms:
        unknown = sorted(set(args.arms.split(",")) - set(ARMS))
        if unknown:
            msg = f"unknown arm(s) {unknown}; expected some of {list(ARMS)}"
            raise ValueError(msg)
        arms = [a for a in arms if a in args.arms.split(",")]
    specs = []
    for arm in arms:
        cls = type(f"CellJEPA_{arm}", (RecordedCellJEPA,), {"arm": arm, "task": task})
        specs.append(vcell.bench.ModelSpec(f"CellJEPA {arm}", cls, {**base, **ARMS[arm]}, dict(train)))
    return specs


def papalexi(args: argparse.Namespace) -> ad.AnnData:
    """The Papalexi counts, subsampled (seeded, fixed across seeds) to the per-condition caps."""
    adata = ad.read_h5ad(SHARED / "papalexi2021_eccite_thp1_rna299_sceptre.h5ad")
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    keep = []
    for p in sorted(set(labels)):
        cap = args.papalexi_controls if p == "control" else args.papalexi_cells
        keep.append(rng.permutation(np.flatnonzero(labels == p))[:cap])
    return adata[np.sort(np.concatenate(keep))].copy()


def run_papalexi(args: argparse.Namespace, seeds: list[int]) -> vcell.bench.BenchmarkResult:
    adata = papalexi(args)
    kos = sorted(set(adata.obs["perturbation"].astype(str)) - {"control"})
    emb = go_embedding(kos, args.dims)
    print(f"papalexi: {adata.n_obs} cells x {adata.n_vars} genes, {len(kos)} knock-outs; GO embedding {emb.shape}")
    models = [
        "control",
        "mean",
        vcell.bench.ModelSpec("linear (GO)", vcell.model.Baseline, {"method": "linear", "perturbation_embedding": emb}),
        causal_vae_spec(args, perturbation_embedding=emb),
        *jepa_specs(args, "papalexi", list(ARMS), perturbation_embedding=emb),
    ]
    return vcell.bench.run(
        adata,
        models=models,
        splits=["unseen_perturbation"],
        seeds=seeds,
        metrics=METRICS,
        on_error="skip",
        progress=False,
    )


def simulated(seed: int, quick: bool) -> ad.AnnData:
    kw = {"n_cells": 800, "n_genes": 60} if quick else {"n_cells": 4000, "n_genes": 200}
    return vcell.datasets.simulate(**kw, n_perturbations=10, n_combos=20, frac_epistatic=0.3, seed=seed)


def run_simulation(args: argparse.Namespace, seeds: list[int]) -> vcell.bench.BenchmarkResult:
    arms = [a for a in ARMS if a != "modules=hallmark"]  # G0000... genes are in no pathway
    models = ["control", "mean", "additive", "linear", causal_vae_spec(args), *jepa_specs(args, "simulation", arms)]
    parts = []
    for seed in seeds:  # new data per seed: simulate(seed=s), combo_half split with seed s
        adata = simulated(seed, args.quick)
        if seed == seeds[0]:
            print(f"simulation: {adata.n_obs} cells x {adata.n_vars} genes per seed")
        parts.append(
            vcell.bench.run(adata, models=models, splits=["combo_half"], seeds=[seed], metrics=METRICS, progress=False)
        )
    results = pd.concat([p.results for p in parts], ignore_index=True)
    timings = pd.concat([p.timings for p in parts], ignore_index=True)
    return vcell.bench.BenchmarkResult(results, vcell.bench.summarize(results), timings)


def paired_differences(results: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    """``model - reference`` per split, seed, condition and metric, summarised like ``bench.summarize`` (paired)."""
    v = results.pivot_table(index=["split", "seed", "perturbation", "metric"], columns="model", values="value")
    diff = v.sub(v[reference], axis=0).drop(columns=reference).stack().rename("value").reset_index()
    return vcell.bench.summarize(diff)


def ci_table(summary: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """``mean [ci_low, ci_high]`` per model (rows, in ``order``) and metric (columns), with ``n_seeds``."""
    s = summary[summary["metric"].isin(METRICS)].copy()
    s["cell"] = s.apply(lambda r: f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]", axis=1)
    table = s.pivot_table(index="model", columns="metric", values="cell", aggfunc="first")
    order = [m for m in order if m in table.index]
    table = table.reindex(index=order, columns=[m for m in METRICS if m in table])
    table["n_seeds"] = s.groupby("model")["n_seeds"].min().reindex(order)
    return table


def report(task: str, res: vcell.bench.BenchmarkResult, diag: pd.DataFrame, seconds: float | None = None) -> str:
    """Mean [95% CI] per model and metric, paired differences to the default arm, the diagnostics, timings."""
    order = list(dict.fromkeys(res.results["model"]))
    table = ci_table(res.summary, order)
    s = res.summary[res.summary["metric"].isin(METRICS)]
    ceiling = s.groupby("metric")["ceiling"].mean().reindex([c for c in table.columns if c != "n_seeds"])
    took = "" if seconds is None else f" ({seconds:.0f} s)"
    lines = [f"== {task}: mean [95% t-interval] over seeds{took}", table.to_string()]
    lines += ["split-half ceiling: " + ", ".join(f"{k} {v:.3f}" for k, v in ceiling.items()), ""]
    errors = res.results.loc[res.results["error"].fillna("") != "", ["model", "error"]].drop_duplicates("model")
    lines += [f"cannot predict: {r.model}: {r.error}" for r in errors.itertuples()]
    held = res.results[res.results["model"] == "mean"].groupby("seed")["perturbation"].unique()
    lines += [f"held-out (seed {k}): {sorted(v)}" for k, v in held.items()]
    if REFERENCE in order:
        paired = ci_table(paired_differences(res.results), order)
        lines += ["", f"== model - {REFERENCE}, paired by seed and condition: mean [95% t-interval] over seeds"]
        lines += [paired.to_string()]
    if len(diag):
        cols = ["n_modules", "embedding_std", "effective_rank", "retrieval_top1", "cosine_error", "fit_s"]
        d = diag.groupby("arm", sort=False)[cols].mean()
        lines += ["", "== CellJEPA diagnostics (training data; mean over seeds)", d.round(3).to_string()]
    per_model = res.timings.groupby("model", sort=False)["total_s"].sum().round(1)
    lines += ["", "fit + predict seconds (all seeds):", per_model.to_string(), ""]
    return "\n".join(lines)


def main() -> None:
    t_start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_causal_vae_arguments(parser, epochs=200, epochs_help="CausalVAE max epochs")
    parser.add_argument("--tasks", default="papalexi,simulation")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--pretrain-epochs", type=int, default=30, help="CellJEPA pretraining epochs")
    parser.add_argument("--jepa-epochs", type=int, default=50, help="CellJEPA transition max epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="CellJEPA batch size")
    parser.add_argument(
        "--jepa-kwargs",
        default='{"n_latent": 32, "n_modules": 16, "n_hidden": 64}',
        help="JSON dict of CellJEPA(...) arguments shared by all arms",
    )
    parser.add_argument("--arms", default="", help="comma-separated CellJEPA arms to run (default: all)")
    parser.add_argument("--dims", type=int, default=10, help="GO embedding dimensions (Papalexi)")
    parser.add_argument("--papalexi-cells", type=int, default=200, help="cells kept per knock-out")
    parser.add_argument("--papalexi-controls", type=int, default=800, help="control cells kept")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, 2 epochs, first seed")
    parser.add_argument("--from-csv", action="store_true", help="rewrite the reports from the CSVs under --out")
    args = parser.parse_args()
    if args.from_csv:
        for task in args.tasks.split(","):
            d = Path(args.out) / task
            tables = [pd.read_csv(d / f"{n}.csv", keep_default_na=True) for n in ("results", "summary", "timings")]
            tables[0]["error"] = tables[0]["error"].fillna("")
            text = report(task, vcell.bench.BenchmarkResult(*tables), pd.read_csv(d / "diagnostics.csv"))
            print(text)
            (Path(args.out) / f"report_{task}.txt").write_text(text)
        return
    if args.quick:
        args.seeds = args.seeds.split(",")[0]
        args.epochs = args.jepa_epochs = args.pretrain_epochs = 2
        args.papalexi_cells, args.papalexi_controls = 30, 150
    quiet_setup(args.threads)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # a Lightning deprecation, once per fit
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out) if args.out else None
    texts = []
    for task in args.tasks.split(","):
        if task not in ("papalexi", "simulation"):
            msg = f"unknown task {task!r}; expected papalexi or simulation"
            raise ValueError(msg)
        RecordedCellJEPA.records.clear()
        t0 = time.perf_counter()
        res = run_papalexi(args, seeds) if task == "papalexi" else run_simulation(args, seeds)
        diag = pd.DataFrame(RecordedCellJEPA.records)
        text = report(task, res, diag, time.perf_counter() - t0)
        print(text, flush=True)
        texts.append(text)
        if out:
            res.to_csv(out / task)
            diag.to_csv(out / task / "diagnostics.csv", index=False)
            (out / f"report_{task}.txt").write_text(text)
    total = time.perf_counter() - t_start
    print(f"total wall time {total:.0f} s ({total / 60:.1f} min); args {vars(args)}")
    if out:
        info = {"args": vars(args), "total_s": round(total, 1), "tasks": args.tasks.split(",")}
        (out / f"run_info_{'_'.join(args.tasks.split(','))}.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
