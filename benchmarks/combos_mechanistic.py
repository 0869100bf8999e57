"""Simulated doubles with random-draw vs mechanistic interactions: baselines and CausalVAE on combo_seen0/1/2.

Issue 21, deliverable 2. Data: ``vcell.datasets.simulate(effects="target_programs", interactions=MODE)`` for each
seed (16 singles, 48 doubles, 30% of them non-additive, 10 programs), in the two modes:

* ``random``: an epistatic double draws its own interaction (``+-c (e_A + e_B) + u``): nothing in the singles or in
  other doubles predicts it, so the honest target is "no worse than ``additive``";
* ``mechanistic``: non-additivity follows from structure (shared programs with saturation, AND gates on program
  pairs, cascades through a perturbed regulator; a third each), which singles and seen doubles reveal.

Splits: GEARS' simulation split (``combo_seen0/1/2``: held-out doubles whose singles were seen 0/1/2 times in
training), split seed = simulation seed, all scored by ``vcell.bench.run`` with the same control cells for every
model. ``effects="target_programs"`` gives a ground-truth gene graph (genes sharing a program), which CausalVAE gets
as its prior (``gene_graph``) so that it can answer doubles of unseen singles; ``linear`` embeds a single by its
target gene's row of ``G`` (every target is a measured gene); ``additive`` needs both singles in training, so it
cannot answer ``combo_seen0/1``.

Models: ``control``, ``mean``, ``additive``, ``linear`` and ``CausalVAE`` (gene graph, ``--epochs`` max epochs).
Left out for the CPU budget: FlowMatching, CellJEPA and ResidualDiffusion (minutes per fit each on this machine;
run them with ``--extra``).

Reported per mode, split and model (mean and 95% t-interval over seeds): Pearson delta (all genes, mean over the
held-out doubles); L2 error of the mean prediction on each double's top-20 DE genes (``sqrt(20 * mse_top_de)``),
averaged separately over non-additive and additive held-out doubles (the simulation's labels), and its ratio to
``additive``'s on the same seed (``combo_seen2`` only); interaction AUPRC against the simulation's labels.

Usage: ``python benchmarks/combos_mechanistic.py [--seeds 1,2,3] [--cells 2600] [--genes 100] [--epochs 25]
[--out benchmarks/results/combos_mechanistic]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _causal_vae_cli import add_causal_vae_arguments, quiet_setup
from scipy import stats

import vcell

MODES = ("random", "mechanistic")
SPLITS = ("combo_seen0", "combo_seen1", "combo_seen2")
BASELINES = ["control", "mean", "additive", "linear"]
METRICS = ["pearson_delta", "mse_top_de", "interaction_auprc"]
#: CausalVAE training for the CPU budget: large batches, validation (early stopping) every 5 epochs
TRAIN = {
    "batch_size": 512,
    "lr": 3e-3,
    "trainer_kwargs": {"enable_progress_bar": False, "check_val_every_n_epoch": 5},
}


def simulate(mode: str, seed: int, args: argparse.Namespace):
    return vcell.datasets.simulate(
        n_cells=args.cells,
        n_genes=args.genes,
        n_perturbations=args.perturbations,
        n_combos=args.combos,
        frac_epistatic=0.3,
        effects="target_programs",
        interactions=mode,
        seed=seed,
    )


def model_specs(args: argparse.Namespace, graph: pd.DataFrame) -> list:
    train = {**TRAIN, "max_epochs": args.epochs, **json.loads(args.train_kwargs)}
    init = {"gene_graph": graph, **json.loads(args.model_kwargs)}
    specs: list = [*BASELINES, vcell.bench.ModelSpec("CausalVAE", vcell.model.CausalVAE, init, train)]
    for name in filter(None, args.extra.split(",")):
        specs.append(vcell.bench.ModelSpec(name, getattr(vcell.model, name), {}, train))
    return specs


def per_seed(res: vcell.bench.BenchmarkResult, labels: dict[str, bool], mode: str) -> pd.DataFrame:
    """One row per (model, split, seed): the reported quantities."""
    r = res.results
    r = r[r["error"].fillna("") == ""] if "error" in r else r
    rows = []
    for (model, split, seed), sub in r.groupby(["model", "split", "seed"]):
        doubles = sub[sub["perturbation"].isin(list(labels))]
        pd_all = doubles.loc[doubles["metric"] == "pearson_delta", "value"]
        mse = doubles[doubles["metric"] == "mse_top_de"].set_index("perturbation")["value"]
        l2 = np.sqrt(20 * mse)
        non = np.array([labels[p] for p in l2.index], dtype=bool)
        auprc = sub.loc[sub["metric"] == "interaction_auprc", "value"]
        rows.append(
            {
                "mode": mode,
                "split": split,
                "seed": seed,
                "model": model,
                "pearson_delta": pd_all.mean() if len(pd_all) else np.nan,
                "l2_nonadditive": l2[non].mean() if non.any() else np.nan,
                "l2_additive": l2[~non].mean() if (~non).any() else np.nan,
                "interaction_auprc": auprc.iloc[0] if len(auprc) else np.nan,
                "n_nonadditive": int(non.sum()),
                "n_additive": int((~non).sum()),
            }
        )
    out = pd.DataFrame(rows)
    add = out[out["model"] == "additive"].set_index(["split", "seed"])
    for col in ("l2_nonadditive", "l2_additive"):
        ref = out.set_index(["split", "seed"]).index.map(add[col].to_dict() if len(add) else {})
        out[f"{col}_vs_additive"] = out[col].to_numpy() / np.asarray(ref, dtype=float)
    return out


def _cell(values: pd.Series) -> str:
    v = values.dropna().to_numpy(dtype=float)
    if v.size == 0:
        return "–"
    if v.size == 1:
        return f"{v[0]:.3f} (n=1)"
    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    more = "" if v.size == values.size else f" (n={v.size})"
    return f"{v.mean():.3f} [{v.mean() - half:.3f}, {v.mean() + half:.3f}]{more}"


COLUMNS = {
    "pearson_delta": "Pearson delta",
    "l2_nonadditive": "L2 top-20 DE, non-additive",
    "l2_nonadditive_vs_additive": "÷ additive",
    "l2_additive": "L2 top-20 DE, additive",
    "l2_additive_vs_additive": "÷ additive ",
    "interaction_auprc": "interaction AUPRC",
}


def table(df: pd.DataFrame, order: list[str]) -> str:
    lines = []
    for mode in MODES:
        for split in SPLITS:
            sub = df[(df["mode"] == mode) & (df["split"] == split)]
            if sub.empty:
                continue
            counts = sub[sub["model"] == "mean"][["n_nonadditive", "n_additive"]].sum()
            lines += [
                f"### {mode}, {split} (held-out doubles over the seeds: {counts['n_nonadditive']} non-additive, "
                f"{counts['n_additive']} additive)",
                "",
                "| model | " + " | ".join(COLUMNS.values()) + " |",
                "|---" * (len(COLUMNS) + 1) + "|",
            ]
            for model in [m for m in order if m in set(sub["model"])]:
                m = sub[sub["model"] == model]
                lines.append(f"| {model} | " + " | ".join(_cell(m[c]) for c in COLUMNS) + " |")
            missing = [m for m in order if m not in set(sub["model"])]
            if missing:
                lines.append(f"\nno prediction (a single unseen in training): {', '.join(missing)}")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_causal_vae_arguments(parser, epochs=25)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--cells", type=int, default=2600)
    parser.add_argument("--genes", type=int, default=100)
    parser.add_argument("--perturbations", type=int, default=16)
    parser.add_argument("--combos", type=int, default=48)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--extra", default="", help="more vcell.model classes (default arguments), e.g. FlowMatching")
    args = parser.parse_args()
    quiet_setup(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    t_start, load_start = time.perf_counter(), os.getloadavg()[1]
    frames, timings, order = [], [], []
    for mode in args.modes.split(","):
        for seed in seeds:
            adata = simulate(mode, seed, args)
            truth = adata.uns["vcell_simulation"]
            labels = dict(zip(map(str, truth["combos"]), np.asarray(truth["epistatic"], dtype=bool), strict=True))
            specs = model_specs(args, pd.DataFrame(truth["gene_graph"]))
            order = [s if isinstance(s, str) else s.name for s in specs]
            t0 = time.perf_counter()
            res = vcell.bench.run(
                adata, models=specs, splits=list(SPLITS), seeds=[seed], metrics=METRICS, on_error="skip", progress=False
            )
            print(f"{mode} seed {seed}: {adata.n_obs} cells x {adata.n_vars} genes, {time.perf_counter() - t0:.0f} s")
            frames.append(per_seed(res, labels, mode))
            timings.append(res.timings.assign(mode=mode))
            if out:
                res.results.assign(mode=mode).to_csv(out / f"results_{mode}_seed{seed}.csv", index=False)
    df = pd.concat(frames, ignore_index=True)
    tim = pd.concat(timings, ignore_index=True)
    wall = time.perf_counter() - t_start
    fit_s = tim.groupby("model")["total_s"].sum().reindex(order).round(1)
    header = (
        f"# Simulated doubles: random-draw vs mechanistic interactions (seeds {args.seeds})\n\n"
        f"Budget: 2 CPU cores shared with other jobs (load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[1]:.1f} at the end; {args.threads} torch threads), {wall / 60:.1f} min wall for the whole "
        "run; "
        f"`simulate(n_cells={args.cells}, n_genes={args.genes}, n_perturbations={args.perturbations}, "
        f"n_combos={args.combos}, frac_epistatic=0.3, effects='target_programs', interactions=MODE, seed=SEED)`; "
        f"CausalVAE with the ground-truth gene graph, max_epochs={args.epochs}, batch_size={TRAIN['batch_size']}, "
        f"lr={TRAIN['lr']}, validation every 5 epochs. Left out for the budget: "
        "FlowMatching, CellJEPA, ResidualDiffusion. Cells: mean [95% t-interval] over seeds (n = seeds with a value "
        "when fewer). L2 = sqrt(20 x mse_top_de) of the mean prediction on each double's top-20 DE genes, averaged "
        "over the held-out doubles of that kind; '÷ additive' is the per-seed ratio to `additive` (which needs both "
        "singles in training: combo_seen2 only).\n\n"
        f"Fit + predict seconds, all modes, seeds and splits: {fit_s.to_dict()}\n\n"
    )
    text = header + table(df, order)
    print(text)
    if out:
        df.to_csv(out / "per_seed.csv", index=False)
        tim.to_csv(out / "timings.csv", index=False)
        (out / "report.md").write_text(text)


if __name__ == "__main__":
    main()
