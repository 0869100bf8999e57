"""Speed of vcell's rank-sum DE (``vcell.metrics._de``) against ``scipy.stats.mannwhitneyu(axis=0)`` (issue 21).

Both compute the same p-values (checked here on every group: max absolute difference printed). scipy ranks the union
of each group with the control cells again for every group; vcell indexes the controls once
(``ControlRanks``) and then binary-searches each group's values. Synthetic log1p-like sparse data (a gene's share of
non-zero cells uniform in [0.02, 0.9], gamma values rounded to 0.01); one process, interleaved, best of 2; the
numbers are from whatever machine runs it (the committed table: a 2-core machine shared with other work).

Usage: ``python benchmarks/de_speed.py [--out benchmarks/results/de_speed]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse, stats

from vcell.metrics._de import ControlRanks, de_stats

CASES = [  # controls, genes, groups, cells per group
    (500, 2000, 10, 20),
    (2000, 2000, 10, 50),
    (5000, 2000, 5, 50),
    (5000, 2000, 2, 1000),
]


def _cells(rng: np.random.Generator, n: int, density: np.ndarray) -> np.ndarray:
    X = rng.gamma(2.0, 0.7, (n, density.size)) * (rng.random((n, density.size)) < density)
    return np.round(X, 2).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/de_speed")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n_ctrl, n_genes, n_groups, n_cells in CASES:
        density = rng.uniform(0.02, 0.9, n_genes)
        ctrl = _cells(rng, n_ctrl, density)
        groups = {f"g{i}": _cells(rng, n_cells, density) for i in range(n_groups)}
        C = sparse.csr_matrix(ctrl)
        t_index, t_vcell, t_scipy, diff = [], [], [], 0.0
        for _ in range(2):
            t0 = time.perf_counter()
            ranks = ControlRanks(C)
            t1 = time.perf_counter()
            out = de_stats(groups, ranks)
            t2 = time.perf_counter()
            ref = {
                k: stats.mannwhitneyu(X.astype(np.float64), ctrl.astype(np.float64), axis=0) for k, X in groups.items()
            }
            t3 = time.perf_counter()
            t_index.append(t1 - t0)
            t_vcell.append(t2 - t1)
            t_scipy.append(t3 - t2)
            diff = max(diff, max(float(np.abs(out[k].pvals - r.pvalue).max()) for k, r in ref.items()))
        rows.append(
            {
                "controls": n_ctrl,
                "genes": n_genes,
                "groups": n_groups,
                "cells_per_group": n_cells,
                "vcell_index_s": min(t_index),
                "vcell_groups_s": min(t_vcell),
                "scipy_groups_s": min(t_scipy),
                "speedup_incl_index": min(t_scipy) / (min(t_index) + min(t_vcell)),
                "max_abs_diff_pvalue": diff,
            }
        )
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "de_speed.csv", index=False)
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3g}"))


if __name__ == "__main__":
    main()
