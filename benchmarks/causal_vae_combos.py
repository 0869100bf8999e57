"""Simulated double perturbations (30% epistatic): CausalVAE's interaction term beside the baselines.

Data: ``vcell.datasets.simulate`` (counts with known ground truth: which doubles are epistatic). Two splits, scored
by ``vcell.bench.run`` with the same metrics and control cells for every model:

* ``combo_half``: half of the doubles held out entirely (all singles and the other doubles train). In this
  simulation an epistatic double's interaction is ``+-c (e_A + e_B) + u`` with a random program effect ``u``
  drawn per double, so nothing in the training data tells an unseen double's interaction: no model can beat
  ``additive`` here on the epistatic doubles except by chance, and the honest target is "no worse than additive".
* ``random_cells``: 20% of the cells of every condition held out, so each double has training cells (a screen
  where doubles are measured but sparsely). Here the model's gated interaction vector can represent what
  ``additive`` (control + sum of the singles' shifts) cannot; the question is whether it does without hurting
  the additive doubles.

Reported per split: L2 error of the mean prediction on each double's top-20 DE genes (``sqrt(20 * mse_top_de)``),
averaged separately over epistatic and additive doubles (ground truth of the simulation), as a ratio to
``additive``; and the interaction AUPRC against the simulation's epistatic labels (the 'no interaction' rate is
the share of epistatic doubles among the held-out ones).

Usage: ``python benchmarks/causal_vae_combos.py [--seed 0] [--epochs 300] [--out DIR]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from _causal_vae_cli import add_causal_vae_arguments, causal_vae_spec, quiet_setup

import vcell

MODELS = ["mean", "additive", "linear"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_causal_vae_arguments(parser, epochs=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cells", type=int, default=6000)
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--splits", default="combo_half,random_cells")
    args = parser.parse_args()
    quiet_setup(args.threads)

    adata = vcell.datasets.simulate(
        n_cells=args.cells, n_genes=args.genes, n_perturbations=10, n_combos=20, frac_epistatic=0.3, seed=args.seed
    )
    sim = adata.uns["vcell_simulation"]
    epistatic = dict(zip(map(str, sim["combos"]), np.asarray(sim["epistatic"], dtype=bool), strict=True))
    print(
        f"simulate: {adata.n_obs} cells x {adata.n_vars} genes, {len(sim['perturbations'])} singles, "
        f"{len(epistatic)} doubles ({sum(epistatic.values())} epistatic), seed {args.seed}"
    )
    spec = causal_vae_spec(args)
    t0 = time.perf_counter()
    res = vcell.bench.run(
        adata,
        models=[*MODELS, spec],
        splits=args.splits.split(","),
        seeds=[args.seed],
        metrics=["mse_top_de", "pearson_delta", "energy_distance", "interaction_auprc"],
        progress=False,
    )
    print(f"benchmark took {time.perf_counter() - t0:.0f} s\n")
    r = res.results
    order = [*MODELS, "CausalVAE"]
    pd.set_option("display.width", 200)
    for split_name, sub in r.groupby("split"):
        doubles = sub[sub["perturbation"].isin(list(epistatic)) & (sub["metric"] == "mse_top_de")].copy()
        doubles["l2_top_de"] = np.sqrt(20 * doubles["value"])
        doubles["kind"] = np.where(doubles["perturbation"].map(epistatic), "epistatic", "additive")
        l2 = doubles.pivot_table(index="kind", columns="model", values="l2_top_de").reindex(columns=order)
        n = doubles.drop_duplicates("perturbation")["kind"].value_counts()
        print(f"== {split_name}: L2 on top-20 DE genes of held-out doubles (mean over doubles)")
        print(l2.round(3).to_string())
        print("ratio to additive:")
        print((l2.div(l2["additive"], axis=0)).round(3).to_string())
        print("held-out doubles:", n.to_dict())
        auprc = sub[sub["metric"] == "interaction_auprc"].set_index("model")["value"].reindex(order)
        rate = n.get("epistatic", 0) / n.sum()
        print(f"interaction AUPRC (no-interaction rate {rate:.2f}):", auprc.round(3).to_dict())
        pdelta = sub[sub["metric"] == "pearson_delta"].groupby("model")["value"].mean().reindex(order)
        print("Pearson delta, mean over held-out conditions:", pdelta.round(3).to_dict(), "\n")
    print(res.timings.groupby("model")["total_s"].sum().round(1).to_string())
    if args.out:
        res.to_csv(args.out)


if __name__ == "__main__":
    main()
