"""Cross-check of ``vcell.metrics`` against cell-eval itself (issue 21, Deliver 3).

Runs cell-eval (``MetricsEvaluator``, which computes DE with pdex) and ``vcell.metrics.evaluate`` on the same
predictions and compares, per perturbation: the DE tables (p-values, FDR, the FDR < 0.05 gene lists in cell-eval's
order), ``overlap_at_N`` vs ``de_overlap`` (vcell's NaN for a perturbation without true DE genes read as cell-eval's
0), ``mae``, ``pearson_delta`` and ``discrimination_score_l1`` vs ``pds``. It also times the DE of the true cells: pdex
(numba, one thread) against vcell's rank-sum test.

Data:

* **papalexi** — ``../shared/data/papalexi2021_eccite_thp1_rna299_sceptre.h5ad`` in log1p(CP10k),
  ``vcell.bench.split(kind="unseen_perturbation", seed=1)``: the held-out knock-outs are the perturbations, all
  control cells the controls. Predictions, each one cell per control as ``vcell.bench.run`` asks of a model:
  ``control`` (the control cells: no signal), ``mean`` (control cells + the mean shift of the training
  knock-outs, clipped at 0: cell-eval refuses negative values), ``shift`` (control cells + the true mean shift, clipped at 0) and ``half`` (a random half of the
  true cells).
* **kang_<type>** — Kang 2018 (2,000 ``seurat`` HVGs of log1p(CP10k)), the stimulated cells of one type (B,
  CD14+Mono, CD4T) held out against that type's control cells; predictions ``control``, ``shift`` (the control cells
  plus the mean stimulation shift of the other types, clipped at 0: the ``mean`` baseline's transfer) and ``half``.
* **synthetic** — 600 controls, 12 groups of 1-40 cells, 200 genes of sparse rounded expression (many ties, rare
  genes, genes never expressed in the controls); predictions ``control``, ``noisy`` (true cells + noise) and
  ``shift``.

Needs cell-eval (``pip install cell-eval``; 0.8.2 was used) in the same environment as vcell.

Usage: ``python benchmarks/cell_eval_crosscheck.py [--out benchmarks/results/cell_eval_crosscheck] [--label new]``;
``--label old`` with an earlier vcell on ``PYTHONPATH`` scores that one (no DE tables, no timing); ``--fixture``
prints cell-eval's numbers on the fixed dataset of ``tests/metrics/test_de.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

import vcell
from vcell.metrics import METRICS, evaluate

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CONTROL = "control"


def _adata(X: np.ndarray | sparse.spmatrix, labels: list[str] | np.ndarray, var_names: pd.Index) -> ad.AnnData:
    obs = pd.DataFrame({"perturbation": pd.Categorical(np.asarray(labels, dtype=str))})
    obs.index = [f"c{i}" for i in range(len(obs))]
    return ad.AnnData(sparse.csr_matrix(X, dtype=np.float32), obs=obs, var=pd.DataFrame(index=var_names))


def papalexi() -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], pd.Index]:
    """Control cells, true cells per held-out knock-out and four predictions, all log1p(CP10k)."""
    a = ad.read_h5ad(SHARED / "papalexi2021_eccite_thp1_rna299_sceptre.h5ad")
    vcell.bench.split(a, kind="unseen_perturbation", seed=1, perturbation_key="perturbation", control=CONTROL)
    X = vcell._utils.log1p_cp10k(a.X)
    pert = a.obs["perturbation"].astype(str).to_numpy()
    split = a.obs["vcell_split"].astype(str).to_numpy()
    ctrl = X[pert == CONTROL]
    held = sorted(set(pert[(split == "test") & (pert != CONTROL)]))
    true = {p: X[pert == p] for p in held}
    train_kos = (split == "train") & (pert != CONTROL)
    mean_shift = X[train_kos].mean(0) - ctrl.mean(0)
    rng = np.random.default_rng(0)
    preds = {
        "control": dict.fromkeys(held, ctrl),
        "mean": dict.fromkeys(held, np.clip(ctrl + mean_shift, 0, None)),
        "shift": {p: np.clip(ctrl + (true[p].mean(0) - ctrl.mean(0)), 0, None) for p in held},
        "half": {p: t[rng.permutation(len(t))[: max(1, len(t) // 2)]] for p, t in true.items()},
    }
    return ctrl, true, preds, a.var_names


def kang(cell_type: str) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], pd.Index]:
    """Kang 2018, stimulated ``cell_type`` cells held out; 2,000 ``seurat`` HVGs of log1p(CP10k) of all cells."""
    import scanpy as sc

    a = ad.read_h5ad(SHARED / "kang2018_pbmc_ifnb_small.h5ad")
    a.X = vcell._utils.log1p_cp10k(a.X)
    sc.pp.highly_variable_genes(a, n_top_genes=2000, flavor="seurat")
    a = a[:, a.var["highly_variable"].to_numpy()]
    X = np.asarray(a.X)
    ct = a.obs["cell_type"].astype(str).to_numpy()
    stim = a.obs["perturbation"].astype(str).to_numpy() != CONTROL
    ctrl, held = X[(ct == cell_type) & ~stim], X[(ct == cell_type) & stim]
    shift = X[(ct != cell_type) & stim].mean(0) - X[(ct != cell_type) & ~stim].mean(0)
    label = f"IFNb {cell_type}"
    rng = np.random.default_rng(0)
    preds = {
        "control": {label: ctrl},
        "shift": {label: np.clip(ctrl + shift, 0, None)},  # the mean baseline's transfer
        "half": {label: held[rng.permutation(len(held))[: len(held) // 2]]},
    }
    return ctrl, {label: held}, preds, a.var_names


def synthetic() -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], pd.Index]:
    """Sparse rounded expression with many ties, rare genes and genes absent from the controls."""
    rng = np.random.default_rng(21)
    n_genes = 200
    dens = rng.uniform(0.01, 0.9, n_genes)
    dens[:10] = 0.0  # never expressed in the controls

    def cells(n: int, shift: np.ndarray, dens: np.ndarray) -> np.ndarray:
        X = rng.gamma(2.0, 0.6, (n, n_genes)) * (rng.random((n, n_genes)) < dens) + shift
        return np.round(np.clip(X, 0, None), 1).astype(np.float32)

    ctrl = cells(600, np.zeros(n_genes), dens)
    true, preds = {}, {"control": {}, "noisy": {}, "shift": {}}
    for i, n in enumerate([1, 2, 3, 5, 8, 12, 17, 17, 20, 25, 30, 40]):
        shift = np.zeros(n_genes)
        hit = rng.choice(n_genes, 12, replace=False)
        shift[hit] = rng.choice([-1.0, 1.0], 12) * rng.uniform(0.3, 2.0, 12)
        d = dens.copy()
        d[rng.choice(n_genes, 5, replace=False)] = 0.0  # rare genes silent in the group (the MYC case)
        d[:3] = 0.3 if i % 2 else 0.0  # switched on in half of the groups
        p = f"p{i:02d}"
        true[p] = cells(n, shift, d)
        preds["control"][p] = ctrl[rng.choice(len(ctrl), 40, replace=False)]
        preds["noisy"][p] = np.round(np.clip(true[p] + rng.normal(0, 0.3, true[p].shape), 0, None), 1)
        preds["shift"][p] = np.round(np.clip(ctrl + (true[p].mean(0) - ctrl.mean(0)), 0, None), 1)
    return (
        ctrl,
        true,
        {k: {p: v.astype(np.float32) for p, v in d.items()} for k, d in preds.items()},
        pd.Index([f"g{j}" for j in range(n_genes)]),
    )


def _stack(ctrl: np.ndarray, groups: dict[str, np.ndarray], var_names: pd.Index) -> ad.AnnData:
    labels = [CONTROL] * len(ctrl) + [p for p, X in groups.items() for _ in range(len(X))]
    return _adata(np.vstack([ctrl, *groups.values()]), labels, var_names)


def cell_eval_run(real: ad.AnnData, pred: ad.AnnData, outdir: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """cell-eval's per-perturbation results and its DE tables (real, pred)."""
    from cell_eval import MetricsEvaluator

    ev = MetricsEvaluator(
        adata_pred=pred, adata_real=real, control_pert=CONTROL, pert_col="perturbation", num_threads=1, outdir=outdir
    )
    res, _ = ev.compute(profile="minimal", write_csv=False, skip_metrics=["precision_at_N", "de_nsig_counts", "mse"])
    de_real = pd.read_csv(Path(outdir) / "real_de.csv")
    de_pred = pd.read_csv(Path(outdir) / "pred_de.csv")
    return res.to_pandas(), de_real, de_pred


def _ce_lists(de: pd.DataFrame, var_names: pd.Index) -> dict[str, np.ndarray]:
    """cell-eval's ranked FDR < 0.05 lists (its get_top_genes: float32 |lfc|, ordinal ties in row order)."""
    pos = {g: i for i, g in enumerate(var_names)}
    out = {}
    for p, d in de.groupby("target", sort=False):
        d = d[d["fdr"].astype(np.float32) < np.float32(0.05)]
        key = np.abs(d["log2_fold_change"].to_numpy()).astype(np.float32)
        out[str(p)] = np.array([pos[g] for g in d["feature"].astype(str).to_numpy()[np.argsort(-key, kind="stable")]])
    return out


def _de_agreement(de: pd.DataFrame, groups: dict[str, np.ndarray], ctrl: np.ndarray, var_names: pd.Index) -> dict:
    """Max differences of vcell's DE statistics from pdex's, and agreement of the ranked FDR < 0.05 lists."""
    from vcell.metrics._de import de_stats, significant

    stats = de_stats(groups, ctrl)
    ce = _ce_lists(de, var_names)
    dp, dq, same_set, same_list, n_sig = 0.0, 0.0, 0, 0, 0
    for p, s in stats.items():
        d = de[de["target"].astype(str) == p].set_index("feature").loc[list(var_names)]
        dp = max(dp, float(np.abs(d["p_value"].to_numpy() - s.pvals).max()))
        dq = max(dq, float(np.abs(d["fdr"].to_numpy() - s.pvals_adj).max()))
        mine = significant(s, 0.05)
        theirs = ce.get(p, np.zeros(0, dtype=int))
        same_set += set(mine.tolist()) == set(theirs.tolist())
        same_list += np.array_equal(mine, theirs)
        n_sig += mine.size
    return {
        "max_abs_diff_pvalue": dp,
        "max_abs_diff_fdr": dq,
        "groups": len(stats),
        "same_sig_set": same_set,
        "same_ranked_list": same_list,
        "n_sig_genes_vcell": n_sig,
    }


def compare(name: str, ctrl: np.ndarray, true: dict, preds: dict, var_names: pd.Index, label: str) -> tuple:
    real_ad = _stack(ctrl, true, var_names)
    true_ad = _adata(np.vstack(list(true.values())), [p for p, X in true.items() for _ in X], var_names)
    ctrl_ad = _adata(ctrl, [CONTROL] * len(ctrl), var_names)
    rows, de_rows = [], []
    for model, groups in preds.items():
        pred_ad = _adata(np.vstack(list(groups.values())), [p for p, X in groups.items() for _ in X], var_names)
        wanted = [m for m in ("de_overlap", "mae", "pearson_delta", "pds") if m in METRICS]
        v = evaluate(pred_ad, true_ad, ctrl_ad, metrics=wanted).pivot(index="perturbation", columns="metric")["value"]
        with tempfile.TemporaryDirectory() as tmp:
            res, de_real, de_pred = cell_eval_run(real_ad, _stack(ctrl, groups, var_names), tmp)
        res = res.set_index("perturbation") if "perturbation" in res else res.set_index(res.columns[0])
        for p in true:
            row = {"data": name, "model": model, "perturbation": p, "label": label}
            row["vcell_de_overlap"] = v.loc[p, "de_overlap"]
            row["cell_eval_overlap_at_N"] = res.loc[p, "overlap_at_N"]
            for m, ce in (("mae", "mae"), ("pearson_delta", "pearson_delta"), ("pds", "discrimination_score_l1")):
                row[f"vcell_{m}"] = v.loc[p, m] if m in v else np.nan
                row[f"cell_eval_{ce}"] = res.loc[p, ce]
            rows.append(row)
        if label == "new":
            de_rows.append(
                {"data": name, "model": model, "cells": "pred", **_de_agreement(de_pred, groups, ctrl, var_names)}
            )
            if model == next(iter(preds)):
                de_rows.append(
                    {"data": name, "model": "-", "cells": "true", **_de_agreement(de_real, true, ctrl, var_names)}
                )
    return pd.DataFrame(rows), pd.DataFrame(de_rows), real_ad


def time_de(real_ad: ad.AnnData, ctrl: np.ndarray, true: dict, repeats: int = 3) -> dict:
    """Best-of-``repeats`` seconds of DE of the true cells vs control: pdex (1 numba thread) and vcell."""
    from pdex import pdex

    from vcell.metrics._de import de_stats

    pdex(real_ad, groupby="perturbation", reference=CONTROL, threads=1, is_log1p=True, epsilon=0.0)  # JIT warm-up
    t_pdex, t_vcell = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pdex(real_ad, groupby="perturbation", reference=CONTROL, threads=1, is_log1p=True, epsilon=0.0)
        t1 = time.perf_counter()
        de_stats(true, sparse.csr_matrix(ctrl))
        t2 = time.perf_counter()
        t_pdex.append(t1 - t0)
        t_vcell.append(t2 - t1)
    return {"pdex_s": min(t_pdex), "vcell_s": min(t_vcell)}


def fixture() -> None:
    """Print cell-eval's numbers on the fixed dataset of ``tests/metrics/test_de.py`` (its ``CELL_EVAL_0_8_2``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "metrics"))
    from test_de import cell_eval_dataset

    ctrl, true, pred = cell_eval_dataset()
    var_names = pd.Index([f"g{j}" for j in range(ctrl.shape[1])])
    with tempfile.TemporaryDirectory() as tmp:
        res, de_real, _ = cell_eval_run(_stack(ctrl, true, var_names), _stack(ctrl, pred, var_names), tmp)
    res = res.set_index("perturbation")
    n_de = de_real[de_real["fdr"] < 0.05].groupby("target").size()
    for p in true:
        overlap, mae = float(res.loc[p, "overlap_at_N"]), float(res.loc[p, "mae"])
        print(f'"{p}": ({overlap!r}, {mae!r}, {int(n_de.get(p, 0))}),')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/cell_eval_crosscheck")
    parser.add_argument("--label", default="new", help="'new' (this vcell) or e.g. 'old' for a previous vcell")
    parser.add_argument("--fixture", action="store_true", help="print cell-eval's numbers for tests/metrics/test_de.py")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    if args.fixture:
        fixture()
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_pert, de_tables, timings = [], [], []
    files = {"papalexi": "papalexi2021_eccite_thp1_rna299_sceptre.h5ad", "kang": "kang2018_pbmc_ifnb_small.h5ad"}
    makers = [("synthetic", synthetic), ("papalexi", papalexi)]
    makers += [(f"kang_{t}", lambda t=t: kang(t)) for t in ("B", "CD14+Mono", "CD4T")]
    for name, make in makers:
        if name != "synthetic" and not (SHARED / files[name.split("_")[0]]).exists():
            continue
        ctrl, true, preds, var_names = make()
        rows, de_rows, real_ad = compare(name, ctrl, true, preds, var_names, args.label)
        per_pert.append(rows)
        de_tables.append(de_rows)
        if args.label == "new":
            timings.append({"data": name, "groups": len(true), "controls": len(ctrl), **time_de(real_ad, ctrl, true)})
    df = pd.concat(per_pert, ignore_index=True)
    df.to_csv(out / f"per_perturbation_{args.label}.csv", index=False)
    df["vcell_de_overlap_nan_as_0"] = df["vcell_de_overlap"].fillna(0.0)
    summary = df.groupby(["data", "model"], sort=False).agg(
        n=("perturbation", "size"),
        n_no_true_de=("vcell_de_overlap", lambda s: int(s.isna().sum())),
        vcell_de_overlap=("vcell_de_overlap_nan_as_0", "mean"),
        cell_eval_overlap_at_N=("cell_eval_overlap_at_N", "mean"),
        vcell_mae=("vcell_mae", "mean"),
        cell_eval_mae=("cell_eval_mae", "mean"),
    )
    diffs = (
        df.assign(
            d_overlap=(df["vcell_de_overlap_nan_as_0"] - df["cell_eval_overlap_at_N"]).abs(),
            d_mae=(df["vcell_mae"] - df["cell_eval_mae"]).abs(),
            d_pearson=(df["vcell_pearson_delta"] - df["cell_eval_pearson_delta"]).abs(),
            d_pds=(df["vcell_pds"] - df["cell_eval_discrimination_score_l1"]).abs(),
        )
        .groupby(["data", "model"], sort=False)[["d_overlap", "d_mae", "d_pearson", "d_pds"]]
        .max()
    )
    same = (
        df.assign(same=(df["vcell_de_overlap_nan_as_0"] - df["cell_eval_overlap_at_N"]).abs() < 1e-12)
        .groupby(["data", "model"], sort=False)["same"]
        .sum()
        .rename("n_same_overlap")
    )
    summary = summary.join(same).join(diffs.add_prefix("max_"))
    summary.to_csv(out / f"summary_{args.label}.csv")
    from importlib.metadata import version

    info = {
        "cell_eval": version("cell-eval"),
        "pdex": version("pdex"),
        "label": args.label,
        "command": " ".join(sys.argv),
    }
    print(f"cell-eval cross-check ({args.label} vcell), per (data, model): means over perturbations and max |diff|")
    print(summary.to_string(float_format=lambda x: f"{x:.3g}"))
    if de_tables and args.label == "new":
        de = pd.concat(de_tables, ignore_index=True)
        de.to_csv(out / "de_tables.csv", index=False)
        print("\nDE tables, vcell vs pdex (cell-eval's DE):")
        print(de.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
        tm = pd.DataFrame(timings)
        tm.to_csv(out / "de_timing.csv", index=False)
        print("\nDE of the true cells, best of 3 (s):")
        print(tm.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    (out / f"run_info_{args.label}.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
