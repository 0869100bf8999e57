"""Biology-structured CausalVAE on Kang 2018 cell-type transfer: pathway decoder and TF->target penalty, switched.

Protocol as ``causal_vae_kang.py``: raw counts of ``kang2018_pbmc_ifnb_small.h5ad``, 2,000 highly variable genes
(scanpy ``flavor="seurat"`` on log1p(CP10k) of all cells), ``covariate_keys=["cell_type"]``; for each held-out cell
type its stimulated cells are held out (``unseen_cell_type``) and predicted from that type's control cells. Variants
(same seed, same split, same training settings; only the switch differs):

- ``CausalVAE``: the default (MLP decoder, no penalty);
- ``CausalVAE+pathways``: ``pathways=`` PROGENy (top 500 footprint genes per pathway; the 14 pathways with >= 5
  genes among the 2,000 become latent factors tied to their genes);
- ``CausalVAE+regulatory``: ``regulatory_network=`` CollecTRI (signed TF->target edges with both ends among the
  genes), ``regulatory_weight`` as given (chosen on held-out NK cells, never on the reported types);
- ``CausalVAE+both``: both switches;

beside the ``additive`` and ``mean`` baselines. Metrics from ``vcell.bench.run(..., pathway_nets=...)``: energy
distance, Pearson delta (all genes, top-20 DE), and ``pathway_agreement_progeny`` / ``pathway_agreement_collectri``
(correlation of ULM pathway / TF activities of the predicted vs the true mean change). Note that the regulatory
variant trains with CollecTRI, which the ``collectri`` agreement also uses, and the pathway variant with PROGENy.

Usage: ``python benchmarks/causal_vae_structured.py --threads 1 [--types CD14+Mono,B,CD4T] [--seeds 0]
[--out benchmarks/results/causal_vae_structured]``. Tuning the penalty weight (not reported with the others):
``--types NK --variants default,regulatory --regulatory-weights 0.3,1,3``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _causal_vae_cli import add_causal_vae_arguments, causal_vae_spec, quiet_setup
from causal_vae_kang import RecordedCausalVAE, load_kang

import vcell
from vcell._constants import CONTROL, PERT_COL
from vcell._utils import log1p_cp10k
from vcell.module import regulatory_edges

PRIORS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prior_knowledge"
METRICS = [
    "energy_distance",
    "pearson_delta",
    "pearson_delta_top_de",
    "pathway_agreement_progeny",
    "pathway_agreement_collectri",
]
LOWER_IS_BETTER = {"energy_distance"}


def variant_specs(args: argparse.Namespace, progeny: pd.DataFrame, collectri: pd.DataFrame) -> list:
    """The CausalVAE ``ModelSpec`` of every requested variant (and penalty weight)."""
    specs = []
    weights = [float(w) for w in args.regulatory_weights.split(",")]
    for variant in args.variants.split(","):
        if variant == "default":
            specs.append(("CausalVAE", {}))
        elif variant == "pathways":
            specs.append(("CausalVAE+pathways", {"pathways": progeny}))
        elif variant in ("regulatory", "both"):
            for w in weights:
                kw = {"regulatory_network": collectri, "regulatory_weight": w}
                if variant == "both":
                    kw["pathways"] = progeny
                name = f"CausalVAE+{variant}" + (f"(w={w:g})" if len(weights) > 1 else "")
                specs.append((name, kw))
        else:
            msg = f"unknown variant {variant!r}; expected default, pathways, regulatory, both"
            raise ValueError(msg)
    out = []
    for name, kw in specs:
        spec = causal_vae_spec(args, RecordedCausalVAE, **kw)
        spec.name = name
        out.append(spec)
    return out


def sign_diagnostics(
    adata, models: list, runs: list[tuple[str, str, str]], collectri: pd.DataFrame, *, threshold: float = 0.1
) -> pd.DataFrame:
    """Share of co-changing CollecTRI edges whose signs the predicted (and the true) IFNb change contradicts.

    Edges with TF and target among the genes; "co-changing": ``|delta| > threshold`` at both ends (mean log1p(CP10k)
    change of the held-out type's stimulated cells vs its control cells, or of the model's prediction from those
    controls vs the controls). Contradicted: ``sign * delta_tf * delta_target < 0``.
    """
    tf, target, sign = regulatory_edges(collectri["source"], collectri["target"], collectri["weight"], adata.var_names)

    def shares(delta: np.ndarray) -> tuple[int, float]:
        both = (np.abs(delta[tf]) > threshold) & (np.abs(delta[target]) > threshold)
        bad = sign * delta[tf] * delta[target] < 0
        return int(both.sum()), float(bad[both].mean()) if both.any() else np.nan

    expr = log1p_cp10k(adata.X)
    rows = []
    for (cell_type, seed, name), model in zip(runs, models, strict=True):
        in_type = (adata.obs["cell_type"].astype(str) == cell_type).to_numpy()
        cond = adata.obs["perturbation"].astype(str).to_numpy()
        true = expr[in_type & (cond == "IFNb")].mean(0) - expr[in_type & (cond == "control")].mean(0)
        n_true, share_true = shares(np.asarray(true).ravel())
        tr = model.adata
        mask = (tr.obs["cell_type"].astype(str) == cell_type).to_numpy() & (tr.obs[PERT_COL] == CONTROL).to_numpy()
        pred = model.predict(perturbation="IFNb", controls=mask, space="model").mean(0) - model._expression(
            tr, np.flatnonzero(mask)
        ).mean(0)
        n_pred, share_pred = shares(pred)
        rows.append(
            {
                "split": cell_type,
                "seed": seed,
                "model": name,
                "edges_co_changing_pred": n_pred,
                "contradicted_pred": share_pred,
                "edges_co_changing_true": n_true,
                "contradicted_true": share_true,
            }
        )
    return pd.DataFrame(rows)


def program_effects(model, perturbation: str = "IFNb", top: int = 5) -> str:
    """The programs a pathway model's operator moves most: operator component x L2 norm of the program's loadings."""
    emb = model.get_perturbation_embedding([perturbation]).iloc[0].to_numpy()[: len(model.pathway_names_)]
    strength = pd.Series(emb * np.linalg.norm(model.get_pathway_loadings().to_numpy(), axis=0), model.pathway_names_)
    strength = strength.reindex(strength.abs().sort_values(ascending=False).index)[:top]
    return ", ".join(f"{k} {v:+.2f}" for k, v in strength.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_causal_vae_arguments(parser, epochs=300, epochs_help="max epochs (early stopping on val_counterfactual_mse)")
    parser.add_argument("--types", default="CD14+Mono,B,CD4T", help="comma-separated held-out cell types")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--variants", default="default,pathways,regulatory,both")
    parser.add_argument("--regulatory-weights", default="1", help="comma-separated regulatory_weight values")
    args = parser.parse_args()
    quiet_setup(args.threads)

    t_start = time.perf_counter()
    adata = load_kang()
    progeny = vcell.priors.read_network(PRIORS / "progeny_human_top500.csv")
    collectri = vcell.priors.read_network(PRIORS / "collectri_human.csv")
    specs = variant_specs(args, progeny, collectri)
    types = args.types.split(",")
    res = vcell.bench.run(
        adata,
        models=["mean", "additive", *specs],
        splits=[{"kind": "unseen_cell_type", "held_out": t, "name": t} for t in types],
        seeds=[int(s) for s in args.seeds.split(",")],
        covariate_keys=["cell_type"],
        metrics=["energy_distance", "pearson_delta", "pearson_delta_top_de"],
        pathway_nets={"progeny": progeny, "collectri": collectri},
        progress=False,
    )
    wall = time.perf_counter() - t_start
    order = ["mean", "additive", *[s.name for s in specs]]
    r = res.results
    lines = [__doc__.splitlines()[0], ""]
    lines.append(f"settings: {json.dumps(vars(args))}")
    lines.append(f"wall time: {wall:.0f} s; held-out types {types}, seeds {args.seeds}")
    timing = res.timings.set_index(["model", "split", "seed"])["fit_s"]
    lines.append(
        "mean fit seconds: "
        + ", ".join(
            f"{name} {timing.xs(name, level='model').mean():.0f}" for name in order if name.startswith("Causal")
        )
    )
    summaries = [m._model_summary_string for m in RecordedCausalVAE.trained[: len(specs)]]
    lines += ["models (first split):", *[f"  {s}" for s in summaries], ""]
    pd.set_option("display.width", 250)
    tab = r[r["metric"].isin(METRICS)].pivot_table(index=["split", "seed"], columns=["metric", "model"], values="value")
    for metric in METRICS:
        t = tab[metric].reindex(columns=order)
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        lines += [f"== {metric} ({better} is better)", t.round(3).to_string(), ""]
    means = r[r["metric"].isin(METRICS)].groupby(["metric", "model"])["value"].mean().unstack("model")
    lines += ["== mean over held-out types and seeds", means.reindex(index=METRICS, columns=order).round(3).to_string()]
    lines.append("")
    base = tab.xs("CausalVAE", axis=1, level="model") if "CausalVAE" in order else None
    if base is not None:
        lines.append("== runs where the variant beats the default CausalVAE (energy distance lower; others higher)")
        for name in order[3:]:
            v = tab.xs(name, axis=1, level="model")
            wins = [
                f"{metric} {int(((v[metric] < base[metric]) if metric in LOWER_IS_BETTER else (v[metric] > base[metric])).sum())}/{len(v)}"
                for metric in METRICS
            ]
            lines.append(f"{name}: " + ", ".join(wins))
        lines.append("")
    runs = [(t, seed, s.name) for t in types for seed in args.seeds.split(",") for s in specs]
    epochs_rows = [
        {"split": t, "seed": seed, "model": name, "epochs": len(m.history_["train_loss"]), "best": m.best_epoch_}
        for (t, seed, name), m in zip(runs, RecordedCausalVAE.trained, strict=True)
    ]
    ep = pd.DataFrame(epochs_rows).pivot_table(index=["split", "seed"], columns="model", values="epochs")
    lines += ["== epochs trained (early stopping)", ep.reindex(columns=order[2:]).to_string(), ""]
    signs = sign_diagnostics(adata, RecordedCausalVAE.trained, runs, collectri)
    n_edges = len(regulatory_edges(collectri["source"], collectri["target"], collectri["weight"], adata.var_names)[0])
    lines += [
        f"== share of co-changing CollecTRI edges ({n_edges} among the genes; |delta| > 0.1 at TF and target) whose"
        " sign the IFNb change contradicts: predicted (true in the last column)",
        signs.pivot_table(index=["split", "seed"], columns="model", values="contradicted_pred")
        .reindex(columns=order[2:])
        .assign(truth=signs.groupby(["split", "seed"])["contradicted_true"].first())
        .round(3)
        .to_string(),
        "co-changing edges: "
        + signs.groupby("model")["edges_co_changing_pred"]
        .mean()
        .reindex(order[2:])
        .round(0)
        .to_string()
        .replace("\n", "; ")
        + f"; truth {signs.groupby('split')['edges_co_changing_true'].first().mean():.0f}",
        "",
    ]
    effects = [
        (t, n, program_effects(m))
        for (t, _, n), m in zip(runs, RecordedCausalVAE.trained, strict=True)
        if m.pathway_names_
    ]
    if effects:
        lines.append("== IFNb operator on the PROGENy factors (component x loading norm; top 5 by size)")
        lines += [f"{t} {n}: {e}" for t, n, e in effects]
        lines.append("")
    report = "\n".join(lines)
    print(report)
    if args.out:
        res.to_csv(args.out)
        signs.to_csv(Path(args.out) / "sign_consistency.csv", index=False)
        (Path(args.out) / "report.txt").write_text(report + "\n")


if __name__ == "__main__":
    main()
