"""vcell's baselines scored by cell-eval itself, from files written by ``vcell.bench.run(export_dir=...)`` (issue 21).

Two tasks, baselines only:

* **papalexi** — Papalexi 2021 unseen knock-outs (``unseen_perturbation``, seeds 1-3, 5 KOs held out per seed; 299
  genes, log1p(CP10k)); models ``control``, ``mean`` and ``linear_gene`` (``linear`` on the target genes' expression);
  plus cell-eval's own cell-mean baseline (``cell-eval baseline``: every predicted cell the mean over the training
  conditions' mean profiles, controls included as cell-eval computes it), built by cell-eval from the split's
  training cells (train + val) and scored like a model;
* **kang** — Kang 2018 cell-type transfer (``unseen_cell_type``, each of the 7 types in turn, seed 1; 2,000 HVGs);
  models ``control``, ``mean``, ``additive``. One perturbation per split, so cell-eval's PDS is 1 by construction
  (vcell: NaN).

``vcell.bench.run`` writes, per split and seed, ``real.h5ad`` and one ``pred_<model>.h5ad`` per model (its
``manifest.csv`` lists them); this script then runs cell-eval 0.8.2 (``MetricsEvaluator``, profile ``minimal``, one
thread) on every pair in a separate Python that has cell-eval installed (``--cell-eval-python``, default
``/tmp/ce/bin/python``; vcell is not needed there), and normalises each model's aggregate scores with cell-eval's own
``score_agg_metrics`` (VCC's normalisation: ``1 - mae / mae_base``, ``(s - s_base) / (1 - s_base)`` for PDS and
overlap, clipped at 0; ``avg_score`` their mean, as in VCC) against two cell-mean baselines: vcell's ``mean`` (the
control cells shifted by the mean change of all training perturbed cells; both tasks) and cell-eval's own
(papalexi); a model that could not predict
every held-out condition (``linear_gene`` predicts only knock-outs of measured genes: 3 of the 15) is compared per
perturbation but not normalised, as its mean is over other conditions than the base's. Written to ``--out``:

* ``per_perturbation.csv``: cell-eval's ``overlap_at_N``, ``discrimination_score_l1``, ``mae``, ``pearson_delta``
  beside vcell's ``de_overlap``, ``pds``, ``mae``, ``pearson_delta`` and ``pearson_delta_pert`` (Systema's perturbed
  centroid of the training perturbations);
* ``scores.csv``: cell-eval's normalised scores per split, seed, model and base;
* ``summary.csv`` (means over perturbations, splits and seeds) and ``run_info.json``.

Usage: ``python benchmarks/cell_eval_export.py [--out benchmarks/results/cell_eval_export] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
PERT_COL, CONTROL_PERT = "target_gene", "non-targeting"
CE_METRICS = ("overlap_at_N", "discrimination_score_l1", "mae", "pearson_delta")
VCELL_METRICS = ("de_overlap", "pds", "mae", "pearson_delta", "pearson_delta_pert")
#: cell-eval's normalised scores reported (its score table has one row per metric and "avg_score")
SCORED = ("overlap_at_N", "discrimination_score_l1", "mae")


# ----------------------------------------------------------------------------------------------------------------------
# phase 2: cell-eval (runs in the Python that has cell-eval; imports no vcell)
# ----------------------------------------------------------------------------------------------------------------------
def cell_eval_phase(manifest_path: Path) -> None:
    """cell-eval on every file pair of the manifest, its own baseline where a ``train`` file is given, and scores."""
    import logging
    import warnings

    import anndata as ad
    import polars as pl
    from cell_eval import MetricsEvaluator, build_base_mean_adata, score_agg_metrics

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")  # e.g. scipy's pearsonr of the control baseline's constant change
    np.seterr(invalid="ignore")  # score_agg_metrics: 0/0 where the base scores 1 (cell-eval then writes 0)
    manifest = pd.read_csv(manifest_path)
    results, scores = [], []
    for (task, split, seed), rows in manifest.groupby(["task", "split", "seed"], sort=False):
        rows = rows.copy()
        folder = Path(rows["pred"].iloc[0]).parent
        train = rows["train"].dropna().unique() if "train" in rows else []
        if len(train):  # cell-eval's own cell-mean baseline from the split's training cells
            real = ad.read_h5ad(rows["real"].iloc[0])
            counts = real.obs[PERT_COL].astype(str).value_counts()
            counts = pl.DataFrame({PERT_COL: counts.index.tolist(), "n_cells": counts.to_numpy().tolist()})
            path = folder / "pred_cell_eval_baseline.h5ad"
            build_base_mean_adata(
                adata=str(train[0]),
                counts_df=counts,
                pert_col=PERT_COL,
                control_pert=CONTROL_PERT,
                output_path=str(path),
            )
            extra = rows.iloc[[0]].assign(model="cell_eval_baseline", pred=str(path))
            rows = pd.concat([rows, extra], ignore_index=True)
        agg, real_of = {}, {}
        for _, row in rows.iterrows():
            real_of[row["model"]] = row["real"]
            out = folder / f"cell_eval_{row['model']}"
            t0 = time.perf_counter()
            ev = MetricsEvaluator(
                adata_pred=row["pred"],
                adata_real=row["real"],
                control_pert=CONTROL_PERT,
                pert_col=PERT_COL,
                num_threads=1,
                outdir=str(out),
            )
            res, agg[row["model"]] = ev.compute(profile="minimal", write_csv=True)
            seconds = time.perf_counter() - t0
            res = res.to_pandas()
            res.insert(0, "model", row["model"])
            res.insert(0, "seed", seed)
            res.insert(0, "split", split)
            res.insert(0, "task", task)
            res["cell_eval_s"] = seconds
            results.append(res)
        for base in ("mean", "cell_eval_baseline"):
            if base not in agg:
                continue
            for model, user in agg.items():
                if real_of[model] != real_of[base]:  # fewer conditions than the base: not comparable
                    continue
                vcc = ["statistic", *SCORED]  # VCC's three metrics: its avg_score is their mean
                sc = score_agg_metrics(results_user=user.select(vcc), results_base=agg[base].select(vcc)).to_pandas()
                sc = sc.assign(task=task, split=split, seed=seed, model=model, base=base)
                scores.append(sc)
    out = manifest_path.parent
    pd.concat(results, ignore_index=True).to_csv(out / "cell_eval_results.csv", index=False)
    pd.concat(scores, ignore_index=True).to_csv(out / "cell_eval_scores.csv", index=False)


# ----------------------------------------------------------------------------------------------------------------------
# phase 1: vcell
# ----------------------------------------------------------------------------------------------------------------------
def _tasks(quick: bool) -> list[dict]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import run_baselines as rb

    papalexi, _ = rb.load_papalexi(quick)
    kang, _ = rb.load_kang(quick)
    kang_types = ("B", "NK") if quick else rb.KANG_TYPES
    return [
        {
            "task": "papalexi",
            "adata": papalexi,
            "models": ["control", "mean", rb._linear_gene()],
            "splits": ["unseen_perturbation"],
            "seeds": [1] if quick else [1, 2, 3],
            "kw": {"on_error": "skip"},
            "baseline_train": True,
        },
        {
            "task": "kang",
            "adata": kang,
            "models": ["control", "mean", "additive"],
            "splits": [
                {"kind": "unseen_cell_type", "held_out": t, "name": f"unseen_cell_type:{t}"} for t in kang_types
            ],
            "seeds": [1],
            "kw": {"covariate_keys": ["cell_type"]},
            "baseline_train": False,
        },
    ]


def _write_train(adata, split: str, seed: int, path: Path) -> None:
    """The split's training cells (train + val) in cell-eval's format, for ``cell-eval baseline``."""
    import anndata as ad

    import vcell
    from vcell._constants import CONTROL
    from vcell._constants import PERT_COL as VCELL_PERT

    a = adata.copy()
    vcell.pp.harmonize(a, perturbation_key="perturbation", control=CONTROL)
    vcell.bench.split(a, kind=split, seed=seed)
    train = a[a.obs["vcell_split"].isin(["train", "val"]).to_numpy()]
    labels = train.obs[VCELL_PERT].astype(str).replace({CONTROL: CONTROL_PERT})
    out = ad.AnnData(np.asarray(train.X, dtype=np.float32), obs=pd.DataFrame({PERT_COL: labels.to_numpy()}))
    out.obs_names = [f"train_{i}" for i in range(out.n_obs)]
    out.var_names = train.var_names
    out.write_h5ad(path)


def vcell_phase(out: Path, quick: bool) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """bench.run with export_dir on both tasks: vcell's results and the export manifest (with a task column)."""
    import vcell

    results, manifests, timing = [], [], {}
    for t in _tasks(quick):
        export = out / "files" / t["task"]
        t0 = time.perf_counter()
        res = vcell.bench.run(
            t["adata"],
            models=t["models"],
            splits=t["splits"],
            seeds=t["seeds"],
            metrics=list(VCELL_METRICS),
            ceiling=False,
            progress=False,
            export_dir=export,
            **t["kw"],
        )
        timing[f"bench_run_{t['task']}_s"] = round(time.perf_counter() - t0, 1)
        results.append(res.results.assign(task=t["task"]))
        manifest = pd.read_csv(export / "manifest.csv").assign(task=t["task"])
        if t["baseline_train"]:
            manifest["train"] = None
            for (split, seed), idx in manifest.groupby(["split", "seed"]).groups.items():
                path = Path(manifest.loc[idx[0], "pred"]).parent / "train.h5ad"
                _write_train(t["adata"], split, int(seed), path)
                manifest.loc[idx, "train"] = str(path)
        manifests.append(manifest)
    return pd.concat(results, ignore_index=True), pd.concat(manifests, ignore_index=True), timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/cell_eval_export")
    parser.add_argument("--quick", action="store_true", help="Papalexi 1 seed, Kang 2 types (smoke run)")
    parser.add_argument("--cell-eval-python", default="/tmp/ce/bin/python", help="a Python with cell-eval installed")
    parser.add_argument("--cell-eval-phase", metavar="MANIFEST", help=argparse.SUPPRESS)
    parser.add_argument("--keep-files", action="store_true", help="keep the exported h5ad files under OUT/files")
    args = parser.parse_args()
    if args.cell_eval_phase:
        cell_eval_phase(Path(args.cell_eval_phase))
        return
    import logging
    import shutil
    import warnings

    logging.getLogger("vcell").setLevel(logging.WARNING)
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    vres, manifest, timing = vcell_phase(out, args.quick)
    manifest_path = out / "files" / "manifest.csv"
    manifest.to_csv(manifest_path, index=False)
    t0 = time.perf_counter()
    subprocess.run([args.cell_eval_python, __file__, "--cell-eval-phase", str(manifest_path)], check=True)
    timing["cell_eval_s"] = round(time.perf_counter() - t0, 1)
    ce = pd.read_csv(out / "files" / "cell_eval_results.csv")
    scores = pd.read_csv(out / "files" / "cell_eval_scores.csv")

    # per perturbation: cell-eval beside vcell
    v = vres[vres["metric"].isin(VCELL_METRICS)]
    v = v.pivot_table(index=["task", "split", "seed", "model", "perturbation"], columns="metric", values="value")
    v = v.add_prefix("vcell_").reset_index()
    ce = ce[["task", "split", "seed", "model", "perturbation", *CE_METRICS, "cell_eval_s"]]
    ce = ce.rename(columns={m: f"cell_eval_{m}" for m in CE_METRICS})
    per = ce.merge(v, on=["task", "split", "seed", "model", "perturbation"], how="left")
    per.to_csv(out / "per_perturbation.csv", index=False, float_format="%.6g")
    scores = scores[scores["metric"].isin([*SCORED, "avg_score"])]
    scores.to_csv(out / "scores.csv", index=False, float_format="%.6g")

    # summary: means over perturbations, then over splits and seeds
    # cell-eval scores a perturbation without true DE genes 0 (vcell: NaN); models vcell did not score stay NaN
    scored = per["vcell_mae"].notna()
    per["vcell_de_overlap_nan_as_0"] = per["vcell_de_overlap"].where(~scored, per["vcell_de_overlap"].fillna(0.0))
    cols = [c for c in per.columns if c.startswith(("cell_eval_", "vcell_")) and c != "cell_eval_s"]
    summary = per.groupby(["task", "model"], sort=False)[cols].mean()
    summary.insert(0, "n", per.groupby(["task", "model"], sort=False).size())
    norm = scores.pivot_table(index=["task", "model"], columns=["base", "metric"], values="from_baseline", sort=False)
    norm.columns = [f"score_vs_{b}:{m}" for b, m in norm.columns]
    summary = summary.join(norm).reset_index()
    summary.to_csv(out / "summary.csv", index=False, float_format="%.6g")

    from importlib.metadata import version

    ce_version = subprocess.run(
        [args.cell_eval_python, "-c", "from importlib.metadata import version as v; print(v('cell-eval'), v('pdex'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    timing["total_s"] = round(time.perf_counter() - t_all, 1)
    info = {
        "command": " ".join(sys.argv),
        "cell_eval": ce_version[0],
        "pdex": ce_version[1],
        "vcell": version("vcell"),
        "anndata": version("anndata"),
        "quick": args.quick,
        "timing": timing,
        "file_pairs_scored": len(ce.groupby(["task", "split", "seed", "model"])),
    }
    (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if not args.keep_files:
        shutil.rmtree(out / "files")
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        show = summary.set_index(["task", "model"])
        print("cell-eval (ce) vs vcell (v), mean over perturbations, splits and seeds:")
        print(
            show[
                [
                    "n",
                    "cell_eval_overlap_at_N",
                    "vcell_de_overlap_nan_as_0",
                    "cell_eval_discrimination_score_l1",
                    "vcell_pds",
                    "cell_eval_mae",
                    "vcell_mae",
                    "cell_eval_pearson_delta",
                    "vcell_pearson_delta",
                    "vcell_pearson_delta_pert",
                ]
            ].to_string(float_format=lambda x: f"{x:.3f}")
        )
        print("\ncell-eval's normalised scores (score_agg_metrics; mean over splits and seeds):")
        print(show[[c for c in show.columns if c.startswith("score_vs_")]].to_string(float_format=lambda x: f"{x:.3f}"))
    print(json.dumps(timing))


if __name__ == "__main__":
    main()
