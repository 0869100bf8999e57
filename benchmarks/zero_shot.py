"""Zero-shot prediction of unseen perturbations from prior knowledge (issue 6, part 4).

Two tasks, both ``vcell.bench.split(kind="unseen_perturbation")`` (20% of the single perturbations held out per seed):

* **Papalexi 2021** (ECCITE-seq, THP-1, 25 CRISPR knock-outs, 299 genes). Prior: the GO gene graph in GEARS' format
  (``shared/data/prior_knowledge/go_graph_jaccard_top20_human.csv.gz``: Jaccard overlap of GO terms, top 20
  neighbours per gene; MARCH8 is MARCHF8 there).
* **Simulation** (``vcell.datasets.simulate(effects="target_programs")``): each knocked-down gene acts on the
  programs that load it, and the ground-truth gene graph (genes sharing a program) is the prior.

Models, all on the same splits and metrics:

* ``mean`` (average shift of the training perturbations) and ``control``: need no prior;
* ``linear (GO)``: Ahlmann-Eltze et al.'s linear model with gene embeddings from the graph
  (:func:`vcell.priors.graph_embedding`, propagation of random codes over neighbours, 32 dimensions);
* ``CausalVAE (one-hot)``: cannot answer an unseen perturbation (its rows say why);
* ``CausalVAE (GO table)``: operators a learned function of the same graph embedding;
* ``CausalVAE (gene graph)``: operators from a graph neural network over the gene graph (an unseen gene's operator
  comes from its graph neighbours).

Reported: PDS, pearson_delta and de_overlap (plus mse_top_de and energy_distance), mean over held-out perturbations
per seed, then mean and 95% t-interval over seeds (``vcell.bench.summarize``).

Usage: ``python benchmarks/zero_shot.py [--task papalexi,simulation] [--seeds 0,1,2] [--epochs 200] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import pandas as pd
from _causal_vae_cli import add_causal_vae_arguments, quiet_setup

import vcell

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ALIASES = {"MARCH8": "MARCHF8"}
METRICS = ["pds", "pearson_delta", "de_overlap", "mse_top_de", "energy_distance"]


def papalexi() -> tuple[ad.AnnData, pd.DataFrame, dict[str, str]]:
    """Papalexi counts, the GO graph and the label -> graph-node map of the knock-outs."""
    adata = ad.read_h5ad(SHARED / "papalexi2021_eccite_thp1_rna299_sceptre.h5ad")
    graph = vcell.priors.read_gene_graph(SHARED / "prior_knowledge" / "go_graph_jaccard_top20_human.csv.gz")
    kos = sorted(set(adata.obs["perturbation"].astype(str)) - {"control"})
    return adata, graph, {k: ALIASES.get(k, k) for k in kos}


def simulation(seed: int) -> tuple[ad.AnnData, pd.DataFrame, dict[str, str]]:
    """A target-program simulation, its ground-truth gene graph and the identity label map."""
    adata = vcell.datasets.simulate(
        n_cells=6000, n_genes=300, n_perturbations=30, n_combos=0, n_programs=12, effects="target_programs", seed=seed
    )
    graph = pd.DataFrame(adata.uns["vcell_simulation"]["gene_graph"])
    perts = list(adata.uns["vcell_simulation"]["perturbations"])
    return adata, graph, {p: p for p in perts}


def models(args: argparse.Namespace, graph: pd.DataFrame, nodes: dict[str, str]) -> list:
    """The baselines and CausalVAE variants, every prior built from ``graph`` only (never from expression)."""
    emb = vcell.priors.graph_embedding(graph, nodes=list(nodes.values()), n_components=args.dims, seed=0)
    emb.index = list(nodes)  # rows named by the perturbation labels
    train_kwargs = {"max_epochs": args.epochs, "trainer_kwargs": {"enable_progress_bar": False}}
    train_kwargs.update(json.loads(args.train_kwargs))
    cvae = vcell.model.CausalVAE
    label_of = {v: k for k, v in nodes.items() if k != v}  # graph node -> perturbation label (MARCHF8 -> MARCH8)
    graph_labels = graph.replace({"source": label_of, "target": label_of})
    specs = [
        "control",
        "mean",
        vcell.bench.ModelSpec("linear (GO)", vcell.model.Baseline, {"method": "linear", "perturbation_embedding": emb}),
        vcell.bench.ModelSpec("CausalVAE (one-hot)", cvae, {}, train_kwargs),
        vcell.bench.ModelSpec("CausalVAE (GO table)", cvae, {"perturbation_embedding": emb}, train_kwargs),
        vcell.bench.ModelSpec("CausalVAE (gene graph)", cvae, {"gene_graph": graph_labels}, train_kwargs),
        vcell.bench.ModelSpec(
            "CausalVAE (gene graph, neighbours only)",
            cvae,
            {"gene_graph": graph_labels, "graph_own_embedding": False},
            train_kwargs,
        ),
    ]
    keep = set(args.models.split(";")) if args.models else None
    return [s for s in specs if keep is None or (s if isinstance(s, str) else s.name) in keep]


def report(task: str, res: vcell.bench.BenchmarkResult, order: list[str]) -> str:
    """Summary table (mean [95% CI] over seeds) and the models' errors, as text."""
    s = res.summary[res.summary["metric"].isin(METRICS)].copy()
    s["cell"] = s.apply(lambda r: f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]", axis=1)
    table = s.pivot_table(index="model", columns="metric", values="cell", aggfunc="first")
    table = table.reindex(index=[m for m in order if m in table.index], columns=[m for m in METRICS if m in table])
    errors = res.results.loc[res.results["error"] != "", ["model", "perturbation", "error"]].drop_duplicates("model")
    held = res.results[res.results["model"] == "mean"].groupby("seed")["perturbation"].unique()
    lines = [f"== {task}: mean [95% t-interval] over seeds", table.to_string(), ""]
    lines += [f"cannot predict: {r.model}: {r.error}" for r in errors.itertuples()]
    lines += [f"held-out (seed {k}): {sorted(v)}" for k, v in held.items()]
    lines += ["", "fit + predict seconds:", res.timings.groupby("model")["total_s"].sum().round(1).to_string(), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_causal_vae_arguments(parser, epochs=200)
    parser.add_argument("--task", default="papalexi,simulation")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--dims", type=int, default=32, help="graph-embedding dimensions")
    parser.add_argument("--models", default="", help="model names separated by ';' (default: all)")
    args = parser.parse_args()
    quiet_setup(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out) if args.out else None
    texts = []
    for task in args.task.split(","):
        adata, graph, nodes = papalexi() if task == "papalexi" else simulation(seed=0)
        specs = models(args, graph, nodes)
        order = [s if isinstance(s, str) else s.name for s in specs]
        t0 = time.perf_counter()
        res = vcell.bench.run(
            adata, models=specs, splits=["unseen_perturbation"], seeds=seeds, on_error="skip", progress=False
        )
        text = f"{task}: {adata.n_obs} cells x {adata.n_vars} genes, {len(nodes)} perturbations, graph {len(graph)} "
        text += f"edges; {time.perf_counter() - t0:.0f} s\n" + report(task, res, order)
        print(text, flush=True)
        texts.append(text)
        if out:
            res.to_csv(out / task)
    if out:
        (out / "report.txt").write_text("\n".join(texts))


if __name__ == "__main__":
    main()
