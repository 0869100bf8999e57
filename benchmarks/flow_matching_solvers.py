"""FlowMatching's ODE solver: predictions and scores of each (solver, steps) on Kang 2018 and a simulated screen.

Protocols of ``flow_matching.py``: ``--data kang``: 2,000 HVGs, each of the 7 cell types' stimulated cells held out
in turn (``unseen_cell_type``), ``covariate_keys=["cell_type"]``; ``--data sim``: ``vcell.datasets.simulate(
n_cells=4000, n_genes=200, n_perturbations=10, n_combos=20, frac_epistatic=0.3, seed=s)``, half of the doubles held
out (``combo_half``). FlowMatching with its defaults is trained once per split (seed ``--seed``); that one model then
predicts with every setting of ``--settings`` (``solver:n_steps``), each a row of ``vcell.bench.run`` (energy
distance, MMD, Pearson delta, top-20 DE). Besides the scores, every setting's
predictions are compared with those of a fine reference (``--reference``, default midpoint with 100 steps: the flow's
endpoints to within float rounding): ``rel_dev`` is the root mean square of (prediction - reference) over the
predicted cells and genes divided by that of (reference - control cell), i.e. the error of the integrator relative to
the predicted change. ``evals``: field evaluations per cell (the cost of a prediction is proportional).

Usage: ``python benchmarks/flow_matching_solvers.py [--data kang|sim] [--settings midpoint:20,midpoint:10,euler:20]
[--types B,NK] [--seed 0] [--threads 2] [--out benchmarks/results/flow_matching_solvers/kang]``
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _causal_vae_cli import quiet_setup
from flow_matching import KANG_METRICS, TimedSpec, recording

import vcell
from vcell.model._rows import model_reader, read_rows

QUIET = {"enable_progress_bar": False}
RESULTS = Path(__file__).resolve().parent / "results" / "flow_matching_solvers"


def _evals(solver: str, n_steps: int) -> int:
    return n_steps * (2 if solver == "midpoint" else 1)


@dataclass
class Setting:
    """Predictions of the last FlowMatching trained (``source.last``) with one solver setting (``bench.Predictor``)."""

    name: str
    source: type
    solver: str
    n_steps: int
    store: dict
    last_resources: dict = field(default_factory=dict)

    def fit_predict(self, train: Any, requests: list, *, seed: int, **kwargs: Any) -> dict:
        m = self.source.last
        if m is None or m.adata.n_obs != train.n_obs or not bool((m.adata.obs_names == train.obs_names).all()):
            msg = "Setting rows need the FlowMatching row of the same split first"
            raise RuntimeError(msg)
        if not hasattr(m, "split_serial_"):
            m.split_serial_ = len({k[0] for k in self.store})
        out: dict[str, np.ndarray | str] = {}
        t0 = time.perf_counter()
        for req in requests:
            pred = m.predict(
                m.adata,
                perturbation=req.perturbation,
                controls=req.controls,
                dose=req.dose,
                n_steps=self.n_steps,
                solver=self.solver,
            )
            out[req.condition] = pred
            own = read_rows(model_reader(m), np.asarray(req.controls))
            self.store[(m.split_serial_, req.condition, self.name)] = (pred, own)
        self.last_resources = {"fit_s": np.nan, "predict_s": time.perf_counter() - t0}
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["kang", "sim"], default="kang")
    parser.add_argument("--settings", default="midpoint:20,midpoint:10,midpoint:8,euler:20,euler:10,midpoint:5")
    parser.add_argument("--reference", default="midpoint:100")
    parser.add_argument("--types", default="", help="comma-separated held-out cell types (default: all 7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fm-epochs", type=int, default=0, help="FlowMatching epochs (0: its default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="", help="folder for summary.csv and results.csv (default: results/<data>)")
    args = parser.parse_args()
    quiet_setup(args.threads)
    from causal_vae_kang import load_kang

    def parse(s: str) -> tuple[str, int]:
        solver, steps = s.split(":")
        return solver.strip(), int(steps)

    settings = [parse(s) for s in args.settings.split(",") if s.strip()]
    reference = parse(args.reference)
    names = {s: f"{s[0]}:{s[1]}" for s in [reference, *settings]}
    if args.data == "kang":
        adata = load_kang()
        types = args.types.split(",") if args.types else sorted(adata.obs["cell_type"].unique())
        print(f"Kang 2018: {adata.n_obs} cells x {adata.n_vars} HVGs; held-out types {types}; seed {args.seed}")
        splits = [{"kind": "unseen_cell_type", "held_out": t, "name": t} for t in types]
        covariates = ["cell_type"]
    else:
        adata = vcell.datasets.simulate(
            n_cells=4000, n_genes=200, n_perturbations=10, n_combos=20, frac_epistatic=0.3, seed=args.seed
        )
        print(f"simulate(seed={args.seed}): {adata.n_obs} cells x {adata.n_vars} genes; split combo_half")
        splits, covariates = ["combo_half"], []
    fm_cls = recording(vcell.model.FlowMatching)
    train = {"trainer_kwargs": QUIET} | ({"max_epochs": args.fm_epochs} if args.fm_epochs else {})
    store: dict = {}
    models = [
        TimedSpec("FlowMatching (trained)", fm_cls, {}, train),
        *[Setting(names[s], fm_cls, s[0], s[1], store) for s in [reference, *settings]],
    ]
    t0 = time.perf_counter()
    res = vcell.bench.run(
        adata,
        models=models,
        splits=splits,
        seeds=[args.seed],
        covariate_keys=covariates,
        metrics=KANG_METRICS,
        progress=False,
    )
    print(f"took {time.perf_counter() - t0:.0f} s ({args.threads} threads)\n")

    # deviation of every setting from the reference, per split
    dev = []
    for (split, cond, name), (pred, own) in store.items():
        ref, _ = store[(split, cond, names[reference])]
        change = np.sqrt(np.mean((ref - own) ** 2))
        dev.append({"split": split, "setting": name, "rel_dev": np.sqrt(np.mean((pred - ref) ** 2)) / change})
    dev = pd.DataFrame(dev).groupby("setting")["rel_dev"].agg(["mean", "max"])

    r = res.results[res.results["model"] != "FlowMatching (trained)"]
    per_type = r.groupby(["metric", "split", "model"])["value"].mean().unstack("model")
    order = [names[s] for s in [reference, *settings]]
    means = r.groupby(["metric", "model"])["value"].mean().unstack("metric")[KANG_METRICS].reindex(order)
    means.insert(0, "evals", [_evals(*s) for s in [reference, *settings]])
    means["rel_dev_mean"] = dev["mean"].reindex(order)
    means["rel_dev_max"] = dev["max"].reindex(order)
    pred_s = res.timings.groupby("model")["predict_s"].sum().reindex(order)
    means["predict_s"] = pred_s
    print("== mean over held-out cell types (rel_dev: vs the reference, relative to the predicted change)")
    print(means.round(4).to_string(), "\n")
    ed = per_type.loc["energy_distance"].reindex(columns=order)
    print("== energy distance per split")
    print(ed.round(4).to_string(), "\n")
    out = Path(args.out) if args.out else RESULTS / args.data
    out.mkdir(parents=True, exist_ok=True)
    means.to_csv(out / "summary.csv")
    res.results.to_csv(out / "results.csv", index=False)
    print(f"wrote {out / 'summary.csv'} and {out / 'results.csv'}")


if __name__ == "__main__":
    main()
