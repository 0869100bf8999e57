"""Speed and memory of ``vcell.tl.predict_perturbation``: many perturbations of the same control cells.

Data: ``vcell.datasets.simulate`` with ``--perturbations`` single perturbations, ``--genes`` genes and two cell
types (``covariate_keys=["cell_type"]``: the models see two contexts); ``5 x --controls`` cells, 20% of which are
controls. Every model is trained for one epoch (only prediction is timed). Then ``predict_perturbation`` predicts
every perturbation from all ``--controls`` control cells:

* ``return_adata``: a new AnnData of ``perturbations x controls`` rows (``return_adata=True``);
* ``layers``: one layer per perturbation in an AnnData of the control cells alone (``return_adata=False``; in an
  AnnData with more cells each layer is that AnnData's shape, NaN outside the controls).

Columns: ``seconds`` (wall) and ``cpu_s`` (process CPU time, all threads) of one call, best of ``--repeats``;
``peak_extra_mb``: the largest extra memory during a separate call, as counted by ``tracemalloc`` (numpy and Python
allocations; torch's own buffers are invisible to it); ``rss_extra_mb``: the rise of the process's peak resident
memory (``VmHWM``, reset before the call) over its resident memory before it (freed heap trimmed first), which
counts torch too;
``output_mb``: the size of what the call returns or writes (float32 predictions). ``--flow-steps 5,20`` also times
FlowMatching with ``predict_kwargs={"n_steps": 20}`` (``options`` column; its default, 5 midpoint steps, has none).

Usage: ``python benchmarks/predict_speed.py [--threads 2] [--models Baseline,CausalVAE,FlowMatching]
[--perturbations 100] [--controls 1000] [--genes 2000] [--repeats 2] [--flow-steps 5] [--label after]
[--out benchmarks/results/predict_speed]``
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time
import tracemalloc
from pathlib import Path

MODELS = ("Baseline", "CausalVAE", "FlowMatching", "CellJEPA", "ResidualDiffusion")


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _trim() -> None:
    """Give freed heap memory back to the OS (glibc), so that resident memory counts live data only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:  # Linux: "5" resets VmHWM to the current resident set
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def simulated(n_perturbations: int, n_controls: int, n_genes: int):
    import vcell

    adata = vcell.datasets.simulate(
        n_cells=5 * n_controls, n_genes=n_genes, n_perturbations=n_perturbations, n_combos=0, cell_types=2, seed=0
    )
    return adata


def trained(name: str, adata):
    import vcell

    cls = getattr(vcell.model, name)
    cls.setup_anndata(adata, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"])
    fit = {"max_epochs": 1, "accelerator": "cpu", "seed": 0, "trainer_kwargs": {"enable_progress_bar": False}}
    if name == "Baseline":
        model = cls(adata, method="additive")
        model.train()
    elif name == "CellJEPA":
        model = cls(adata)
        model.pretrain(**fit)
        model.train(**fit)
    elif name == "ResidualDiffusion":
        model = cls(adata, mean_model="additive")
        model.train(**fit)
    else:
        model = cls(adata)
        model.train(**fit)
    return model


def one_call(model, adata, perts: list[str], mode: str, controls, options: dict):
    import vcell

    kw = {"perturbations": perts, "seed": 0, "space": "model", **({"predict_kwargs": options} if options else {})}
    if mode == "return_adata":
        return vcell.tl.predict_perturbation(adata, model, controls=controls, return_adata=True, **kw)
    vcell.tl.predict_perturbation(adata, model, key_added="bench", overwrite=True, **kw)
    return adata


def drop_layers(adata) -> None:
    for key in [k for k in adata.layers if str(k).startswith("bench")]:
        del adata.layers[key]


def measure(model, full, ctrl, ctrl_idx, perts: list[str], mode: str, repeats: int, options: dict) -> dict:
    target = full if mode == "return_adata" else ctrl
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        out = one_call(model, target, perts, mode, ctrl_idx, options)
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        out_mb = (
            out.X.nbytes / 2**20
            if mode == "return_adata"
            else sum(out.layers[k].nbytes for k in out.layers if str(k).startswith("bench")) / 2**20
        )
        del out
        drop_layers(ctrl)
    gc.collect()
    _trim()
    base_rss = _rss_mb("VmRSS")
    reset = _reset_peak_rss()
    tracemalloc.start()
    out = one_call(model, target, perts, mode, ctrl_idx, options)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_extra = _rss_mb("VmHWM") - base_rss if reset else float("nan")
    del out
    drop_layers(ctrl)
    gc.collect()
    return {
        "seconds": round(best_wall, 3),
        "cpu_s": round(best_cpu, 2),
        "peak_extra_mb": round(peak / 2**20, 1),
        "rss_extra_mb": round(rss_extra, 1),
        "output_mb": round(out_mb, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="Baseline,CausalVAE,FlowMatching")
    parser.add_argument("--perturbations", type=int, default=100)
    parser.add_argument("--controls", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default="return_adata,layers")
    parser.add_argument(
        "--flow-steps",
        default="",
        help="FlowMatching n_steps to time, comma-separated (default: its default; others through predict_kwargs)",
    )
    parser.add_argument("--out", default=None, help="directory for predict_speed.csv (default: print only)")
    parser.add_argument("--label", default="", help="value of the 'code' column (e.g. before/after)")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np
    import pandas as pd
    import torch

    import vcell
    from vcell.module._flow_matching import DEFAULT_STEPS

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    vcell.settings.verbosity = "warning"
    vcell.settings.progress_bar = False

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {MODELS}")
    rows = []
    for name in names:
        full = simulated(args.perturbations, args.controls, args.genes)
        model = trained(name, full)
        is_ctrl = (full.obs["vcell_perturbation"].astype(str) == "control").to_numpy()
        ctrl_idx = np.flatnonzero(is_ctrl)[: args.controls]
        ctrl = full[ctrl_idx].copy()
        perts = [str(p) for p in model.vocab.atoms]
        chosen = [int(k) for k in args.flow_steps.split(",") if k.strip()] or [DEFAULT_STEPS]
        steps = chosen if name == "FlowMatching" else [DEFAULT_STEPS]
        settings = [{} if k == DEFAULT_STEPS else {"n_steps": k} for k in steps]
        for options, mode in [(o, m.strip()) for o in settings for m in args.modes.split(",") if m.strip()]:
            res = measure(model, full, ctrl, ctrl_idx, perts, mode, args.repeats, options)
            rows.append(
                {
                    "code": args.label,
                    "model": name,
                    "options": ",".join(f"{k}={v}" for k, v in options.items()),
                    "mode": mode,
                    "perturbations": len(perts),
                    "controls": len(ctrl_idx),
                    "genes": full.n_vars,
                    "threads": args.threads,
                    **res,
                }
            )
            print(pd.DataFrame([rows[-1]]).to_string(index=False, header=len(rows) == 1), flush=True)
        del full, ctrl, model
        gc.collect()
    table = pd.DataFrame(rows)
    print()
    print(table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "predict_speed.csv"
        if path.exists():
            table = pd.concat([pd.read_csv(path), table], ignore_index=True)
        table.to_csv(path, index=False)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
