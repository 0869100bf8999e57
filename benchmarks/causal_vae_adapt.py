"""Few-shot adaptation on Kang 2018: ``CausalVAE.adapt`` to an unseen cell type vs training from scratch.

Protocol: raw counts of ``kang2018_pbmc_ifnb_small.h5ad``, the 2,000 highly variable genes of
``causal_vae_kang.py``. For each held-out cell type T, a CausalVAE is pretrained (its defaults, early stopping on
``val_counterfactual_mse``) on the control and IFNb cells of the 6 other types. T's cells are split once per seed:
half of its control cells are *source* cells (the prediction starts from them; never trained on), 40% of its IFNb
cells are *test* cells (the truth); the rest is the few-shot pool, from which k control and k IFNb cells are drawn
(nested over k). Per (T, k, seed), methods predict the IFNb response of the source cells:

- ``adapt``: ``pretrained.adapt(few cells)``: a new cell-type row plus rank-``--rank`` LoRA on encoder and decoder
  (everything else frozen), ``--epochs`` epochs at ``--lr``;
- ``adapt_rank0``: the same with no adapters (only the new cell-type embedding row trains);
- ``adapt_elbo``: ``adapt`` with ``counterfactual_weight=0`` (the model's own loss only);
- ``scratch``: a CausalVAE of the same size trained from scratch (``train``) on the few cells only, ``--scratch-epochs``
  epochs at ``--lr``, no validation split;
- ``scratch_cf``: the same with adapt's objective (loss + counterfactual error), all weights trainable;
- ``pretrained_nearest``: the pretrained model without adaptation, the source cells labelled as the known type whose
  control mean is nearest (Pearson) to the few control cells' mean;
- ``pretrain_additive``: source cells + the mean IFNb shift over the 6 pretraining types (uses no T cells);
- ``fewshot_additive``: source cells + (mean of the k IFNb cells - mean of the k control cells) of T;
- ``fewshot_mean``: the mean of the k IFNb cells of T, for every source cell.

Scores from ``vcell.metrics.evaluate`` as in ``vcell.bench``: ``pearson_delta`` (all genes, vs the source-control
mean), ``pearson_delta_top_de`` (top-20 DE genes of test vs source cells) and ``energy_distance`` (50-PC space fit
on the pretraining cells).

Usage: ``python benchmarks/causal_vae_adapt.py --threads 1 [--types FCGR3A+Mono,CD14+Mono,B] [--shots 10,25,50]
[--seeds 0,1,2] [--out benchmarks/results/causal_vae_adapt]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from _causal_vae_cli import quiet_setup
from causal_vae_kang import load_kang

import vcell
from vcell._constants import CONTROL
from vcell._utils import log1p_cp10k
from vcell.model import CausalVAE
from vcell.model._adapt import AdaptMixin, _add_counterfactual_loss

QUIET = {"enable_progress_bar": False}
METRICS = ["pearson_delta", "pearson_delta_top_de", "energy_distance"]
FITTED = ["adapt", "adapt_rank0", "adapt_elbo", "scratch", "scratch_cf"]
METHODS = [
    "adapt",
    "adapt_rank0",
    "adapt_elbo",
    "scratch",
    "scratch_cf",
    "pretrained_nearest",
    "pretrain_additive",
    "fewshot_additive",
    "fewshot_mean",
]


class AdaptableCausalVAE(AdaptMixin, CausalVAE):
    """CausalVAE with ``adapt`` (until the mixin is part of CausalVAE)."""


def _labelled(X: np.ndarray, label: str, var_names: pd.Index) -> ad.AnnData:
    obs = pd.DataFrame({"perturbation": [label] * X.shape[0]}, index=[f"{label}-{i}" for i in range(X.shape[0])])
    return ad.AnnData(X=np.asarray(X, dtype=np.float32), obs=obs, var=pd.DataFrame(index=var_names))


def _split_type(adata: ad.AnnData, cell_type: str, seed: int) -> dict[str, np.ndarray]:
    """Source controls, test IFNb cells and the (shuffled) few-shot pools of one cell type."""
    rng = np.random.default_rng([seed, 7])
    is_t = (adata.obs["cell_type"] == cell_type).to_numpy()
    pert = adata.obs["perturbation"].astype(str).to_numpy()
    ctrl = rng.permutation(np.flatnonzero(is_t & (pert == "control")))
    stim = rng.permutation(np.flatnonzero(is_t & (pert == "IFNb")))
    n_src, n_test = len(ctrl) // 2, int(round(0.4 * len(stim)))
    return {"source": ctrl[:n_src], "pool_ctrl": ctrl[n_src:], "test": stim[:n_test], "pool_stim": stim[n_test:]}


def _pretrain(pre: ad.AnnData, args: argparse.Namespace) -> AdaptableCausalVAE:
    AdaptableCausalVAE.setup_anndata(
        pre, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
    )
    model = AdaptableCausalVAE(pre, **json.loads(args.model_kwargs))
    model.train(max_epochs=args.pretrain_epochs, seed=0, accelerator="cpu", trainer_kwargs=QUIET)
    return model


def _score(pred: np.ndarray, truth: ad.AnnData, ctrl: ad.AnnData, pca, de, seed: int) -> dict[str, float]:
    df = vcell.metrics.evaluate(
        _labelled(pred, "IFNb", truth.var_names),
        truth,
        ctrl,
        metrics=METRICS,
        pca=pca,
        de_genes={"IFNb": de},
        seed=seed,
    )
    return dict(zip(df["metric"], df["value"], strict=True))


def run_type(adata: ad.AnnData, cell_type: str, args: argparse.Namespace) -> tuple[list[dict], dict]:
    shots = [int(k) for k in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    pre = adata[(adata.obs["cell_type"] != cell_type).to_numpy()].copy()
    base = _pretrain(pre, args)
    pre_s = time.perf_counter() - t0
    E_pre = log1p_cp10k(pre.X)
    pca = vcell.metrics.fit_pca(E_pre, n_comps=50, seed=0)
    pre_pert = pre.obs["perturbation"].astype(str).to_numpy()
    pre_type = pre.obs["cell_type"].astype(str).to_numpy()
    types = sorted(set(pre_type))
    ctrl_means = np.stack([E_pre[(pre_type == t) & (pre_pert == "control")].mean(0) for t in types])
    shift = np.mean(
        [
            E_pre[(pre_type == t) & (pre_pert == "IFNb")].mean(0)
            - E_pre[(pre_type == t) & (pre_pert == "control")].mean(0)
            for t in types
        ],
        axis=0,
    )
    info = {"cell_type": cell_type, "pretrain_s": round(pre_s, 1), "pretrain_epochs": len(base.history_["train_loss"])}
    rows = []
    init = json.loads(args.model_kwargs)
    for seed in seeds:
        parts = _split_type(adata, cell_type, seed)
        src = adata[parts["source"]].copy()
        vcell.pp.harmonize(src, perturbation_key="perturbation", control="control")
        E_src = log1p_cp10k(src.X)
        truth = _labelled(log1p_cp10k(adata[parts["test"]].X), "IFNb", adata.var_names)
        ctrl = _labelled(E_src, "control", adata.var_names)
        de = vcell.metrics.top_de_genes(truth.X, E_src, n_top=20)
        for k in shots:
            if k > min(len(parts["pool_ctrl"]), len(parts["pool_stim"])):
                continue
            few_idx = np.r_[parts["pool_ctrl"][:k], parts["pool_stim"][:k]]
            few = adata[few_idx].copy()
            E_few = log1p_cp10k(few.X)
            is_stim = (few.obs["perturbation"] == "IFNb").to_numpy()
            preds, secs, extra = {}, {}, {}
            variants = {"adapt": {}, "adapt_rank0": {"rank": 0}, "adapt_elbo": {"counterfactual_weight": 0.0}}
            for method, kw in variants.items():
                t = time.perf_counter()
                m = base.adapt(
                    few.copy(),
                    **{"rank": args.rank, "max_epochs": args.epochs, "lr": args.lr, **kw},
                    seed=seed,
                    accelerator="cpu",
                    trainer_kwargs=QUIET,
                )
                preds[method] = m.predict(src, perturbation="IFNb", space="model")  # log1p(CP10k), as E_src
                secs[method] = time.perf_counter() - t
                extra[method] = m.adapt_summary_["n_trainable"]
            for method in ("scratch", "scratch_cf"):
                t = time.perf_counter()
                scratch_ad = few.copy()
                AdaptableCausalVAE.setup_anndata(
                    scratch_ad, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"]
                )
                scratch = AdaptableCausalVAE(scratch_ad, **init)
                if method == "scratch_cf":
                    code = scratch._conditions().index(CONTROL)
                    _add_counterfactual_loss(scratch.module, 1.0, control_code=code, mode=scratch.prediction)
                scratch.train(
                    max_epochs=args.scratch_epochs,
                    lr=args.lr,
                    seed=seed,
                    accelerator="cpu",
                    early_stopping=False,
                    validation_fraction=0.0,
                    trainer_kwargs=QUIET,
                )
                preds[method] = scratch.predict(src, perturbation="IFNb", space="model")
                secs[method] = time.perf_counter() - t
                extra[method] = sum(p.numel() for p in scratch.module.parameters())
            r = [np.corrcoef(E_few[~is_stim].mean(0), c)[0, 1] for c in ctrl_means]
            nearest = types[int(np.argmax(r))]
            src_near = src.copy()
            src_near.obs["cell_type"] = nearest
            preds["pretrained_nearest"] = base.predict(src_near, perturbation="IFNb", space="model")
            preds["pretrain_additive"] = np.clip(E_src + shift, 0, None)
            preds["fewshot_additive"] = np.clip(E_src + E_few[is_stim].mean(0) - E_few[~is_stim].mean(0), 0, None)
            preds["fewshot_mean"] = np.repeat(E_few[is_stim].mean(0, keepdims=True), len(E_src), axis=0)
            for method in METHODS:
                scores = _score(preds[method], truth, ctrl, pca, de, seed)
                for metric, value in scores.items():
                    rows.append(
                        {
                            "cell_type": cell_type,
                            "k": k,
                            "seed": seed,
                            "method": method,
                            "metric": metric,
                            "value": value,
                            "fit_s": round(secs.get(method, 0.0), 2),
                            "n_trainable": extra.get(method, 0),
                            "nearest_type": nearest if method == "pretrained_nearest" else "",
                        }
                    )
            print(
                f"  {cell_type} seed {seed} k={k}: done ({time.perf_counter() - t0:.0f} s since start of type)",
                flush=True,
            )
    info["n_total_params"] = sum(p.numel() for p in base.module.parameters())
    info["source_cells"], info["test_cells"] = len(parts["source"]), len(parts["test"])
    return rows, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="FCGR3A+Mono,CD14+Mono,B", help="held-out cell types")
    parser.add_argument("--shots", default="10,25,50", help="control and IFNb cells of the held-out type for training")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--pretrain-epochs", type=int, default=200, help="max pretraining epochs (early stopping)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of adapt (one step each with <= 128 cells)")
    parser.add_argument("--scratch-epochs", type=int, default=200, help="epochs of scratch and scratch_cf")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of adapt and scratch")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of adapt")
    parser.add_argument("--model-kwargs", default="{}", help="JSON dict of CausalVAE(...) arguments")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="", help="folder for results.csv / summary.csv / report.txt")
    args = parser.parse_args()
    quiet_setup(args.threads)
    t0 = time.perf_counter()
    adata = load_kang()
    rows, infos = [], []
    for cell_type in args.types.split(","):
        r, info = run_type(adata, cell_type, args)
        rows += r
        infos.append(info)
    res = pd.DataFrame(rows)
    wall = time.perf_counter() - t0

    summary = res.groupby(["cell_type", "k", "method", "metric"])["value"].agg(["mean", "std", "count"]).reset_index()
    lines = [__doc__.splitlines()[0], ""]
    lines.append(f"settings: {vars(args)}")
    lines.append(f"wall time: {wall:.0f} s")
    lines.append(
        "pretraining: "
        + "; ".join(
            f"{i['cell_type']}: {i['pretrain_epochs']} epochs, {i['pretrain_s']} s, "
            f"{i['source_cells']} source / {i['test_cells']} test cells"
            for i in infos
        )
    )
    n_total = infos[0]["n_total_params"]
    ntr = res[res["method"].isin(FITTED)].groupby("method")["n_trainable"].first()
    lines.append(
        "trainable parameters: "
        + ", ".join(f"{m} {int(n):,}" for m, n in ntr.items())
        + f" (pretrained model: {n_total:,}; adapt trains {ntr.get('adapt', 0) / n_total:.2%})"
    )
    fit = res[res["method"].isin(FITTED)].groupby("method")["fit_s"].mean()
    lines.append("mean seconds per fit: " + ", ".join(f"{m} {s:.1f}" for m, s in fit.items()))
    lines.append("")
    pd.set_option("display.width", 200)
    for metric in METRICS:
        tab = summary[summary["metric"] == metric].pivot_table(
            index=["cell_type", "k"], columns="method", values="mean"
        )
        tab = tab.reindex(columns=METHODS)
        lines.append(
            f"== {metric} (mean over {len(args.seeds.split(','))} seeds; "
            f"{'lower' if metric == 'energy_distance' else 'higher'} is better)"
        )
        lines.append(tab.round(3).to_string())
        lines.append("")
    # adapt vs scratch, per (type, k, seed)
    wide = res.pivot_table(index=["cell_type", "k", "seed", "metric"], columns="method", values="value").reset_index()
    others = ("scratch", "scratch_cf", "adapt_elbo", "fewshot_additive", "pretrained_nearest")
    lines.append(f"== runs (type x k x seed) where adapt is better than: {' / '.join(others)}")
    for metric in METRICS:
        w = wide[wide["metric"] == metric]
        better = (lambda a, b: a < b) if metric == "energy_distance" else (lambda a, b: a > b)
        counts = [f"{int(better(w['adapt'], w[o]).sum())}/{len(w)}" for o in others]
        lines.append(f"{metric}: " + " / ".join(counts))
    lines.append("")
    overall = summary.groupby(["k", "method", "metric"])["mean"].mean().unstack("method").reindex(columns=METHODS)
    lines.append("== mean over held-out types")
    lines.append(overall.round(3).to_string())
    report = "\n".join(lines)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        res.to_csv(out / "results.csv", index=False)
        summary.to_csv(out / "summary.csv", index=False)
        (out / "report.txt").write_text(report + "\n")


if __name__ == "__main__":
    main()
