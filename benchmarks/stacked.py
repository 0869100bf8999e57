"""Stacked models and ensembles (issue 21): base alone, members alone, stacked, ensemble, in one run per task.

Every combination is a :class:`vcell.bench.Stacked` or :class:`vcell.bench.Ensemble` whose convex weights are fitted
on the split's *validation* conditions only (members fitted on the ``train`` cells predict the ``val`` conditions;
for ``unseen_cell_type`` the training cells are re-split and another cell type validates), then refitted on
train+val. All combinations of a task share one member cache, so each member is fitted once on the train cells and
once on train+val per split and seed; "member alone" rows are that same train+val fit (``weights=[0, 1]``).

Tasks:

* ``papalexi``: Papalexi 2021 unseen knock-outs (``unseen_perturbation``), base ``mean``, members ``linear`` and
  CausalVAE with the GO embedding of ``causal_vae_papalexi.py`` (``--epochs``, default 200 as there).
* ``combos``: ``simulate(effects="target_programs", interactions=MODE)`` for MODE in random / mechanistic (as in
  ``combos_mechanistic.py``), ``combo_half`` and ``combo_seen2``, base ``additive``, members ``linear``,
  ``interaction`` (``Baseline(method="interaction")``: shared genetic-interaction coefficients fitted on the training
  doubles) and CausalVAE with the ground-truth gene graph (``--epochs``, default 25; batch 512, lr 3e-3 as there;
  ``--no-causal-vae`` leaves it out).
* ``papalexi_genepert``: the same split, base ``mean``, GenePert-style members: ``linear`` on three GO embeddings
  of the knock-outs (annotation SVD; ``vcell.priors.graph_embedding`` of the GO Jaccard graph, propagation and
  spectral).
* ``kang``: Kang 2018 cell-type transfer (``unseen_cell_type``, ``--types``), base ``additive``, member CausalVAE
  (``--epochs``), as in ``causal_vae_kang.py``.

Usage: ``python benchmarks/stacked.py --task papalexi|combos|kang [--seeds 0,1,2] [--epochs N] [--threads 1]
[--out benchmarks/results/stacked/TASK] [--split-kwargs '{"val_frac": 0.25}'] [--no-causal-vae]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from _causal_vae_cli import add_causal_vae_arguments, quiet_setup
from scipy import stats

import vcell

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PAPALEXI_METRICS = ["pearson_delta", "pds", "mse_top_de", "pearson_delta_top_de", "energy_distance"]
KANG_METRICS = ["energy_distance", "pearson_delta", "pearson_delta_top_de", "mse_top_de"]
COMBO_METRICS = ["pearson_delta", "mse_top_de", "interaction_auprc"]


def ci(values: pd.Series) -> str:
    """Mean [95% t-interval] of the finite values (n shown when some are missing)."""
    v = pd.Series(values).dropna().to_numpy(dtype=float)
    if v.size == 0:
        return "–"
    if v.size == 1:
        return f"{v[0]:.3f}"
    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    more = "" if v.size == len(values) else f" (n={v.size})"
    return f"{v.mean():.3f} [{v.mean() - half:.3f}, {v.mean() + half:.3f}]{more}"


def markdown(df: pd.DataFrame) -> str:
    """A markdown table of ``df`` (no index), without the optional ``tabulate`` dependency."""
    cols = [str(c) for c in df.columns]
    rows = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for rec in df.itertuples(index=False):
        rows.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in rec) + " |")
    return "\n".join(rows)


def combinations(base: str, members: dict, cache: dict, objective: str = "mse") -> list:
    """Base alone, each member alone, each member stacked on the base, all stacked, ensemble of the members."""
    names = list(members)
    models: list = [base]
    for n, spec in members.items():
        models.append(vcell.bench.Stacked(base, [spec], weights=[0, 1], name=n, cache=cache))
    for n, spec in members.items():
        models.append(vcell.bench.Stacked(base, [spec], name=f"{base}+{n}", cache=cache, objective=objective))
    if len(names) > 1:
        models.append(
            vcell.bench.Stacked(base, list(members.values()), name=f"{base}+all", cache=cache, objective=objective)
        )
        models.append(
            vcell.bench.Ensemble(list(members.values()), name="ensemble(members)", cache=cache, objective=objective)
        )
    return models


def weights_table(timings: pd.DataFrame, by: list[str]) -> str:
    """Fitted weights per combination (one row per split/seed), and how many validation conditions fitted them."""
    cols = [c for c in timings.columns if c.startswith("weight:")]
    t = timings[timings["validation"].fillna("").ne("fixed weights") & timings[cols].notna().any(axis=1)]
    t = t[[*by, "model", "n_val_conditions", *cols]].copy()
    t.columns = [c.replace("weight:", "w ") for c in t.columns]
    return markdown(t.round(3))


def metric_table(res: pd.DataFrame, metrics: list[str], order: list[str], group: list[str]) -> str:
    """Mean over held-out conditions per seed, then mean [95% t-interval] over seeds."""
    r = res[res["metric"].isin(metrics) & (res["error"].fillna("") == "")]
    per_seed = r.groupby([*group, "model", "metric", "seed"])["value"].mean()
    out = per_seed.groupby(level=[*group, "model", "metric"]).apply(ci).unstack("metric")
    out = out.reindex(columns=[m for m in metrics if m in out.columns])
    out = out.reset_index()
    out["model"] = pd.Categorical(out["model"], order, ordered=True)
    return markdown(out.sort_values([*group, "model"]))


def paired_table(res: pd.DataFrame, metrics: list[str], order: list[str], base: str) -> str:
    """Per seed, model minus ``base`` (mean over held-out conditions), then mean [95% t-interval] over seeds."""
    r = res[res["metric"].isin(metrics) & (res["error"].fillna("") == "")]
    per_seed = r.groupby(["model", "metric", "seed"])["value"].mean().unstack("model")
    diff = per_seed.sub(per_seed[base], axis=0).drop(columns=base)
    out = diff.stack().rename("d").reset_index().groupby(["model", "metric"])["d"].apply(ci).unstack("metric")
    out = out.reindex(columns=[m for m in metrics if m in out.columns]).reset_index()
    out["model"] = pd.Categorical(out["model"], order, ordered=True)
    return markdown(out.sort_values("model"))


def header(args: argparse.Namespace, t_start: float, load_start: float, extra: str) -> str:
    return (
        f"Command: `python benchmarks/stacked.py {' '.join(args.argv)}`; 2 CPU cores shared with other jobs (load "
        f"average {load_start:.1f} at the start, {os.getloadavg()[1]:.1f} at the end; {args.threads} torch threads), "
        f"{(time.perf_counter() - t_start) / 60:.1f} min wall. Weights objective: {args.objective}. {extra} Cells: mean [95% t-interval] over seeds of the "
        "mean over held-out conditions. Weights: convex, fitted on validation conditions only (column `w <name>`; "
        "`n_val_conditions` = conditions that fitted them).\n\n"
    )


# ------------------------------------------------------------------------------------------------- tasks
def _read_papalexi() -> tuple[ad.AnnData, list[str]]:
    adata = ad.read_h5ad(SHARED / "papalexi2021_eccite_thp1_rna299_sceptre.h5ad")
    return adata, sorted(set(adata.obs["perturbation"].astype(str)) - {"control"})


def _papalexi_report(args: argparse.Namespace, adata: ad.AnnData, members: dict, title: str, extra: str) -> str:
    """``mean`` stacked with ``members`` (and their combinations) on ``unseen_perturbation``: run, save, report."""
    models = combinations("mean", members, {}, args.objective)
    order = [m if isinstance(m, str) else m.name for m in models]
    res = vcell.bench.run(
        adata,
        models=models,
        splits=[{"kind": "unseen_perturbation", **json.loads(args.split_kwargs)}],
        seeds=args.seed_list,
        metrics=PAPALEXI_METRICS,
        progress=False,
    )
    res.to_csv(args.out_dir)
    text = f"## {title}\n\n" + header(args, args.t0, args.load0, extra)
    text += metric_table(res.results, PAPALEXI_METRICS, order, ["split"]) + "\n\n### Paired: model - mean, per seed\n\n"
    text += paired_table(res.results, PAPALEXI_METRICS, order, "mean") + "\n\n### Fitted weights\n\n"
    return text + weights_table(res.timings, ["seed"]) + "\n"


def papalexi(args: argparse.Namespace) -> str:
    from causal_vae_papalexi import go_embedding

    adata, kos = _read_papalexi()
    emb = go_embedding(kos, 10)
    cvae = vcell.bench.ModelSpec(
        "CausalVAE",
        vcell.model.CausalVAE,
        {"perturbation_embedding": emb, **json.loads(args.model_kwargs)},
        {"max_epochs": args.epochs, "trainer_kwargs": {"enable_progress_bar": False}, **json.loads(args.train_kwargs)},
    )
    lin = vcell.bench.ModelSpec("linear", vcell.model.Baseline, {"method": "linear", "perturbation_embedding": emb})
    extra = (
        f"Papalexi 2021 ({adata.n_obs} cells x {adata.n_vars} genes, {len(kos)} knock-outs), `unseen_perturbation` "
        f"{args.split_kwargs}, seeds {args.seeds}; GO embedding (10 SVD dims) for `linear` and CausalVAE "
        f"(max_epochs={args.epochs}, early stopping)."
    )
    return _papalexi_report(args, adata, {"linear": lin, "CausalVAE": cvae}, "Papalexi unseen knock-outs", extra)


def graph_embeddings(kos: list[str], dims: int, seed: int) -> dict[str, pd.DataFrame]:
    """GO-graph embeddings of the knock-outs (``vcell.priors.graph_embedding``, propagation and spectral)."""
    from causal_vae_papalexi import ALIASES

    graph = pd.read_csv(SHARED / "prior_knowledge" / "go_graph_jaccard_top20_human.csv.gz")
    nodes = [ALIASES.get(k, k) for k in kos]
    out = {}
    for method in ("propagation", "spectral"):
        emb = vcell.priors.graph_embedding(graph, nodes=nodes, n_components=dims, method=method, seed=seed)
        out[method] = emb.set_axis(kos, axis=0).astype(np.float64)
    return out


def papalexi_genepert(args: argparse.Namespace) -> str:
    """GenePert-style members: ``linear`` on GO embeddings (annotation SVD, GO-graph propagation / spectral)."""
    from causal_vae_papalexi import go_embedding

    adata, kos = _read_papalexi()
    embs = {"svd": go_embedding(kos, 10), **graph_embeddings(kos, 10, seed=0)}
    members = {
        f"linear_{k}": vcell.bench.ModelSpec(
            f"linear_{k}", vcell.model.Baseline, {"method": "linear", "perturbation_embedding": e}
        )
        for k, e in embs.items()
    }
    extra = (
        f"Papalexi 2021, `unseen_perturbation` {args.split_kwargs}, seeds {args.seeds}; `linear` (Ahlmann-Eltze, "
        "10 components, ridge 0.1) on three 10-dimensional GO embeddings of the knock-outs: annotation SVD "
        "(`linear_svd`, as causal_vae_papalexi.py), and `vcell.priors.graph_embedding` of the GO Jaccard graph "
        "(`go_graph_jaccard_top20_human.csv.gz`), propagation and spectral (seed 0)."
    )
    title = "Papalexi unseen knock-outs: GenePert-style linear members"
    return _papalexi_report(args, adata, members, title, extra)


def interaction_fits(adata: ad.AnnData, splits: list, seed: int) -> list[dict]:
    """Per split: ``Baseline(method="interaction")`` refitted on the train+val cells, as ``bench.run`` fits it.

    Its fitted coefficients, ridge and number of training doubles (the benchmark's fits are not kept by ``run``).
    """
    import warnings

    rows = []
    for spec in splits:
        kind, opts = (
            (spec, {}) if isinstance(spec, str) else (spec["kind"], {k: v for k, v in spec.items() if k != "kind"})
        )
        a = adata.copy()
        vcell.pp.harmonize(a, perturbation_key="perturbation", control="control")
        vcell.bench.split(a, kind=kind, seed=seed, overwrite=True, **opts)
        train = a[a.obs["vcell_split"].isin(["train", "val"]).to_numpy()].copy()
        train.uns.pop("vcell_simulation", None)
        vcell.model.Baseline.setup_anndata(train, perturbation_key="vcell_perturbation", control="control")
        m = vcell.model.Baseline(train, method="interaction")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.train()
        rows.append(
            {
                "split": kind,
                "seed": seed,
                "n_train_doubles": m.n_interaction_doubles_,
                "ridge": m.interaction_ridge_,
                **{f"c_{k}": round(v, 3) for k, v in m.interaction_coef_.items()},
            }
        )
    return rows


def combos(args: argparse.Namespace) -> str:
    from combos_mechanistic import TRAIN, per_seed

    frames, timings, results, fits = [], [], [], []
    order: list[str] = []
    split_kwargs = json.loads(args.split_kwargs)
    splits = [{"kind": "combo_half", **split_kwargs}, "combo_seen2"]
    for mode in args.modes.split(","):
        for seed in args.seed_list:
            adata = vcell.datasets.simulate(
                n_cells=2600,
                n_genes=100,
                n_perturbations=16,
                n_combos=48,
                frac_epistatic=0.3,
                effects="target_programs",
                interactions=mode,
                seed=seed,
            )
            truth = adata.uns["vcell_simulation"]
            labels = dict(zip(map(str, truth["combos"]), np.asarray(truth["epistatic"], dtype=bool), strict=True))
            cvae = vcell.bench.ModelSpec(
                "CausalVAE",
                vcell.model.CausalVAE,
                {"gene_graph": pd.DataFrame(truth["gene_graph"]), **json.loads(args.model_kwargs)},
                {**TRAIN, "max_epochs": args.epochs, **json.loads(args.train_kwargs)},
            )
            cache: dict = {}
            members = {"linear": "linear", "interaction": "interaction", "CausalVAE": cvae}
            if args.no_causal_vae:
                del members["CausalVAE"]
            models = combinations("additive", members, cache, args.objective)
            order = [m if isinstance(m, str) else m.name for m in models]
            t0 = time.perf_counter()
            res = vcell.bench.run(
                adata,
                models=models,
                splits=splits,
                seeds=[seed],
                metrics=COMBO_METRICS,
                on_error="skip",
                progress=False,
            )
            print(f"{mode} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
            frames.append(per_seed(res, labels, mode))
            fits += [{"mode": mode, **r} for r in interaction_fits(adata, splits, seed)]
            timings.append(res.timings.assign(mode=mode))
            results.append(res.results.assign(mode=mode))
    df = pd.concat(frames, ignore_index=True)
    tim = pd.concat(timings, ignore_index=True)
    pd.concat(results, ignore_index=True).to_csv(args.out_dir / "results.csv", index=False)
    df.to_csv(args.out_dir / "per_seed.csv", index=False)
    tim.to_csv(args.out_dir / "timings.csv", index=False)
    cols = {
        "l2_nonadditive_vs_additive": "top-20 DE L2 ÷ additive, non-additive doubles",
        "l2_additive_vs_additive": "÷ additive, additive doubles",
        "pearson_delta": "Pearson delta",
        "interaction_auprc": "interaction AUPRC",
    }
    lines = []
    for (mode, split), sub in df.groupby(["mode", "split"], sort=False):
        n = sub[sub["model"] == "additive"][["n_nonadditive", "n_additive"]].sum()
        lines += [
            f"### {mode}, {split} ({n['n_nonadditive']} non-additive and {n['n_additive']} additive held-out doubles "
            "over the seeds)",
            "",
            "| model | " + " | ".join(cols.values()) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for model in order:
            m = sub[sub["model"] == model]
            if len(m):
                lines.append(f"| {model} | " + " | ".join(ci(m[c]) for c in cols) + " |")
        lines.append("")
    extra = (
        f"`simulate(n_cells=2600, n_genes=100, n_perturbations=16, n_combos=48, frac_epistatic=0.3, "
        f"effects='target_programs', interactions=MODE, seed=SEED)`, seeds {args.seeds}, splits combo_half "
        f"{args.split_kwargs} and combo_seen2; "
        + (
            "no CausalVAE (`--no-causal-vae`). "
            if args.no_causal_vae
            else f"CausalVAE with the ground-truth gene graph, max_epochs={args.epochs}, "
            f"batch_size={TRAIN['batch_size']}, lr={TRAIN['lr']}. "
        )
        + "`interaction`: `Baseline(method='interaction')`, ridge by leave-one-double-out cross-validation on the "
        "training doubles. L2 = sqrt(20 x mse_top_de) of the mean prediction on "
        "each double's top-20 DE genes, averaged over the held-out doubles of that kind, as a per-seed ratio to "
        "`additive`."
    )
    text = "## Simulated doubles\n\n" + header(args, args.t0, args.load0, extra) + "\n".join(lines)
    text += "\n### Fitted weights\n\n" + weights_table(tim, ["mode", "split", "seed"]) + "\n"
    text += (
        "\n### `interaction` fits (train+val cells; `c_sum`, `c_product`, `c_saturation`: coefficients of "
        "dA + dB, dA ⊙ dB and the same-sign min-magnitude term; additive = 1, 0, 0)\n\n"
        + markdown(pd.DataFrame(fits))
        + "\n"
    )
    return text


def kang(args: argparse.Namespace) -> str:
    from causal_vae_kang import load_kang

    adata = load_kang()
    types = args.types.split(",")
    cvae = vcell.bench.ModelSpec(
        "CausalVAE",
        vcell.model.CausalVAE,
        json.loads(args.model_kwargs),
        {"max_epochs": args.epochs, "trainer_kwargs": {"enable_progress_bar": False}, **json.loads(args.train_kwargs)},
    )
    cache: dict = {}
    models = combinations("additive", {"CausalVAE": cvae}, cache, args.objective)
    order = [m if isinstance(m, str) else m.name for m in models]
    res = vcell.bench.run(
        adata,
        models=models,
        splits=[{"kind": "unseen_cell_type", "held_out": t, "name": t} for t in types],
        seeds=args.seed_list,
        covariate_keys=["cell_type"],
        metrics=KANG_METRICS,
        progress=False,
    )
    res.to_csv(args.out_dir)
    extra = (
        f"Kang 2018 (2,000 HVGs as in causal_vae_kang.py), held-out types {types}, seed {args.seeds}; CausalVAE "
        f"defaults, max_epochs={args.epochs} (early stopping). Validation: the training cells re-split "
        "(`unseen_cell_type`, same seed): another type's stimulated cells."
    )
    text = "## Kang cell-type transfer\n\n" + header(args, args.t0, args.load0, extra)
    text += metric_table(res.results, KANG_METRICS, order, ["split"]) + "\n\n### Fitted weights\n\n"
    tim = res.timings.assign(val_type=res.timings["val_conditions"].astype(str).str.split("|").str[-1])
    text += weights_table(tim, ["split", "val_type"]) + "\n"
    return text


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_causal_vae_arguments(parser, epochs=0, epochs_help="CausalVAE max epochs (0: the task's default)")
    parser.add_argument("--task", choices=["papalexi", "papalexi_genepert", "combos", "kang"], required=True)
    parser.add_argument("--seeds", default="")
    parser.add_argument("--modes", default="random,mechanistic")
    parser.add_argument("--types", default="NK,FCGR3A+Mono,Dendritic")
    parser.add_argument("--objective", default="mse", choices=["mse", "pearson_delta"], help="weights' objective")
    parser.add_argument("--split-kwargs", default="{}", help="JSON options of the split kind (e.g. val_frac)")
    parser.add_argument("--no-causal-vae", action="store_true", help="combos: leave the CausalVAE member out")
    parser.add_argument("--paired-from", default="", help="only print the paired table (vs `mean`) of DIR/results.csv")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    if args.paired_from:
        res = pd.read_csv(Path(args.paired_from) / "results.csv")
        text = paired_table(res, PAPALEXI_METRICS, list(dict.fromkeys(res["model"])), "mean")
        print(text)
        (Path(args.paired_from) / "paired.md").write_text(text + "\n")
        return
    defaults = {
        "papalexi": ("0,1,2", 200),
        "papalexi_genepert": ("0,1,2", 1),
        "combos": ("1,2,3", 25),
        "kang": ("0", 100),
    }
    defaults = defaults[args.task]
    args.seeds = args.seeds or defaults[0]
    args.epochs = args.epochs or defaults[1]
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.out_dir = Path(args.out or f"benchmarks/results/stacked/{args.task}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    quiet_setup(args.threads)
    args.t0, args.load0 = time.perf_counter(), os.getloadavg()[1]
    tasks = {"papalexi": papalexi, "papalexi_genepert": papalexi_genepert, "combos": combos, "kang": kang}
    text = tasks[args.task](args)
    print(text)
    (args.out_dir / "report.md").write_text(text)


if __name__ == "__main__":
    main()
