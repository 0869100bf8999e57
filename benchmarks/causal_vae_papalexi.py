"""Papalexi 2021 (ECCITE-seq, THP-1) unseen CRISPR knock-outs: CausalVAE beside ``mean`` and ``linear``.

A knock-out never seen in training can only be predicted from something known about it beforehand. Here that is
its Gene Ontology annotation (``shared/data/prior_knowledge/gene2go_human_orgHsEgDb_3.16.tsv.gz``, org.Hs.eg.db
3.16): every targeted gene gets a binary vector over the GO terms annotated to at least two of the targets
(MARCH8 is MARCHF8 there), rows scaled to unit length and reduced to ``--dims`` components by SVD. The table is
built from annotation only, never from expression, so it leaks nothing about held-out knock-outs. Both ``linear``
(``perturbation_embedding=`` table) and CausalVAE (``perturbation_embedding=`` table, its operators a learned function
of the embedding) use the same table; ``mean`` (average shift of all training knock-outs) needs none.

Split: ``vcell.bench.split(kind="unseen_perturbation")`` (20% of the knock-outs held out, per seed), metrics of
``vcell.bench.run`` on log1p(CP10k) of the 299 genes.

Usage: ``python benchmarks/causal_vae_papalexi.py [--seeds 0,1,2] [--dims 10] [--out DIR]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from _causal_vae_cli import add_causal_vae_arguments, causal_vae_spec, quiet_setup

import vcell

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ALIASES = {"MARCH8": "MARCHF8"}


def go_embedding(genes: list[str], dims: int) -> pd.DataFrame:
    """Unit-length GO-membership vectors of ``genes`` reduced by SVD to ``dims`` columns (index = ``genes``)."""
    go = pd.read_csv(SHARED / "prior_knowledge" / "gene2go_human_orgHsEgDb_3.16.tsv.gz", sep="\t")
    symbols = {g: ALIASES.get(g, g) for g in genes}
    go = go[go["symbol"].isin(set(symbols.values()))].drop_duplicates(["symbol", "go_id"])
    missing = sorted(g for g, s in symbols.items() if s not in set(go["symbol"]))
    if missing:
        msg = f"no GO annotation for {missing}"
        raise ValueError(msg)
    terms = go.groupby("go_id")["symbol"].nunique()
    terms = terms[(terms >= 2) & (terms < len(genes))].index
    M = pd.crosstab(go["symbol"], go["go_id"]).reindex(columns=terms, fill_value=0).clip(upper=1).astype(float)
    M = M.reindex([symbols[g] for g in genes]).fillna(0.0).to_numpy()
    M /= np.linalg.norm(M, axis=1, keepdims=True).clip(min=1e-12)
    U, S, _ = np.linalg.svd(M - M.mean(0), full_matrices=False)
    k = min(dims, len(S))
    return pd.DataFrame(U[:, :k] * S[:k], index=genes, columns=[f"go_svd{i}" for i in range(k)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_causal_vae_arguments(parser, epochs=200)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--dims", type=int, default=10)
    args = parser.parse_args()
    quiet_setup(args.threads)

    adata = ad.read_h5ad(SHARED / "papalexi2021_eccite_thp1_rna299_sceptre.h5ad")
    kos = sorted(set(adata.obs["perturbation"].astype(str)) - {"control"})
    emb = go_embedding(kos, args.dims)
    print(f"Papalexi: {adata.n_obs} cells x {adata.n_vars} genes, {len(kos)} knock-outs; GO embedding {emb.shape}")
    models = [
        "control",
        "mean",
        vcell.bench.ModelSpec("linear", vcell.model.Baseline, {"method": "linear", "perturbation_embedding": emb}, {}),
        causal_vae_spec(args, perturbation_embedding=emb),
    ]
    t0 = time.perf_counter()
    res = vcell.bench.run(
        adata,
        models=models,
        splits=["unseen_perturbation"],
        seeds=[int(s) for s in args.seeds.split(",")],
        progress=False,
    )
    print(f"benchmark took {time.perf_counter() - t0:.0f} s\n")
    r = res.results
    order = ["control", "mean", "linear", "CausalVAE"]
    metrics = ["pearson_delta", "pearson_delta_top_de", "mse_top_de", "energy_distance", "pds"]
    pd.set_option("display.width", 200)
    per_seed = r[r["metric"].isin(metrics)].pivot_table(index=["seed", "metric"], columns="model", values="value")
    print("== mean over held-out knock-outs, per seed")
    print(per_seed.reindex(columns=order).round(3).to_string(), "\n")
    print("== mean over seeds")
    print(per_seed.groupby(level="metric").mean().reindex(columns=order).round(3).to_string(), "\n")
    held = r[(r["metric"] == "pearson_delta") & (r["model"] == "mean")].groupby("seed")["perturbation"].apply(list)
    print("held-out knock-outs:", held.to_dict())
    print(res.timings.groupby("model")["total_s"].sum().round(1).to_string())
    if args.out:
        res.to_csv(args.out)


if __name__ == "__main__":
    main()
