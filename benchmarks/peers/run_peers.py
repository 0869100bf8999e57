"""Peers side by side: scGen, GEARS, STATE and CellFlow beside vcell's baselines and models, on vcell's splits and metrics.

One command runs the three tasks and writes ``docs/peers.md``::

    bash benchmarks/peers/setup_envs.sh          # once: builds .venvs/{gears,state,cellflow} from PyPI
    python benchmarks/peers/run_peers.py         # all tasks, all peers, vcell's CausalVAE, seed 0

Tasks (each one :func:`vcell.bench.run` call, so every model sees the same split, controls and metrics):

``kang``
    Kang 2018 PBMCs (bundled with vcell), IFN-beta: each of the 7 cell types' stimulated cells held out in turn
    (``unseen_cell_type``), 2,000 HVGs of log1p(CP10k) (normalised before selecting genes), ``cell_type`` as context.
``papalexi``
    Papalexi 2021 ECCITE-seq THP-1 (``shared/data``), 25 CRISPR KOs on 299 genes: ``unseen_perturbation`` (5 KOs
    held out).
``combos``
    ``vcell.datasets.simulate(n_cells=3000, n_genes=200, n_perturbations=10, n_combos=20, frac_epistatic=0.3)``:
    ``combo_half`` (half of the 20 doubles held out, all singles trained).

Models: the four baselines, the peers (``--peers``; budgets in :data:`BUDGETS`) and vcell's learned models
(``--models``, default ``CausalVAE``; see ``vcell_models.py``). ``--threads`` (default 1) caps the OpenMP/BLAS/torch
threads of this process and of the peers' workers. ``--kang-types`` restricts Kang to some held-out types (to time
one split). Results go to ``--out`` (``results.csv``, ``summary.csv``, ``timings.csv`` per task; ``walls.json``)
and the tables to ``--doc``.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from peers import _common  # noqa: E402
from peers.vcell_models import LIBRARY_KEY, MODELS  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
TASKS = ("kang", "papalexi", "combos")
PEERS = ("scgen", "gears", "state", "cellflow")
BASELINES = ("control", "mean", "additive", "linear")
#: training budgets of the peers in the full run (the adapters' parameters; see their docstrings)
BUDGETS = {
    "scgen": {"max_epochs": 20, "batch_size": 32, "early_stopping_patience": 25},
    "gears": {"epochs": 5, "max_cells_per_condition": 50},
    "state": {"max_steps": 200, "batch_size": 4, "cell_set_len": 32},
    "cellflow": {"num_iterations": 300, "ode_tol": 1e-3},
}
#: ``--quick``: tiny budgets for smoke tests (numbers meaningless)
QUICK_BUDGETS = {
    "scgen": {"max_epochs": 2, "batch_size": 32, "early_stopping_patience": 25},
    "gears": {"epochs": 1, "max_cells_per_condition": 20},
    "state": {"max_steps": 5, "batch_size": 4, "cell_set_len": 32},
    "cellflow": {"num_iterations": 20, "ode_tol": 1e-3},
}
#: columns of the main tables (metric -> short header)
SHOW = {
    "pearson_delta": "Pearson Δ",
    "pearson_delta_top_de": "Pearson Δ top-20 DE",
    "mse_top_de_normalized": "MSE top-20 DE / control",
    "direction_accuracy": "direction acc.",
    "energy_distance": "energy dist.",
    "mmd": "MMD",
    "de_overlap": "DE overlap",
    "pds": "PDS",
    "interaction_auprc": "interaction AUPRC",
}
LOWER_IS_BETTER = {"mse_top_de_normalized", "energy_distance", "mmd"}
TASK_TITLES = {
    "kang": "Kang 2018: cell-type transfer (IFN-β, 7 held-out cell types)",
    "papalexi": "Papalexi 2021: unseen CRISPR knock-outs (THP-1, 299 genes)",
    "combos": "Simulated combinations (combo_half, 30% epistatic doubles)",
}
#: why two models can predict the same on a task (shown when their metrics coincide on every condition)
SAME_REASONS = {
    ("linear", "mean"): (
        "with a single training perturbation (IFN-β on Kang) the linear baseline's centred response matrix "
        "`Y - b` is zero, so `W = 0` and it predicts the mean shift `b`: the `mean` baseline"
    ),
}


def load_task(task: str) -> tuple:
    """``(adata, run kwargs)`` of a task (see the module docstring).

    ``X`` keeps the raw counts (for vcell's count models), ``layers['log1p_cp10k']`` is the benchmark's expression,
    and ``obs[LIBRARY_KEY]`` the library size behind it (all genes of the file, before any gene selection).
    """
    import anndata as ad
    import scanpy as sc

    import vcell

    if task == "kang":
        adata = vcell.datasets.kang2018()
        vcell.pp.log_normalize(adata)
        adata.obs[LIBRARY_KEY] = np.asarray(adata.X.sum(axis=1)).ravel()
        sc.pp.highly_variable_genes(adata, layer="log1p_cp10k", n_top_genes=2000)
        adata = adata[:, adata.var["highly_variable"]].copy()
        types = sorted(adata.obs["cell_type"].astype(str).unique())
        splits = [{"kind": "unseen_cell_type", "held_out": t, "name": t} for t in types]
        metrics = [m for m in vcell.metrics.METRICS if m != "pds"]  # one perturbation: PDS undefined
        return adata, {"splits": splits, "covariate_keys": ["cell_type"], "metrics": metrics}
    if task == "papalexi":
        adata = ad.read_h5ad(SHARED / "papalexi2021_eccite_thp1_rna299_sceptre.h5ad")
        vcell.pp.log_normalize(adata)
        adata.obs[LIBRARY_KEY] = np.asarray(adata.X.sum(axis=1)).ravel()
        return adata, {"splits": ["unseen_perturbation"], "covariate_keys": [], "metrics": None}
    if task == "combos":
        adata = vcell.datasets.simulate(
            n_cells=3000, n_genes=200, n_perturbations=10, n_combos=20, frac_epistatic=0.3, seed=0
        )
        vcell.pp.log_normalize(adata)
        adata.obs[LIBRARY_KEY] = np.asarray(adata.X.sum(axis=1)).ravel()
        return adata, {"splits": ["combo_half"], "covariate_keys": [], "metrics": None}
    msg = f"unknown task {task!r}; expected one of {TASKS}"
    raise ValueError(msg)


def make_peers(
    names: list[str],
    quick: bool,
    *,
    threads: int | None = 1,
    gene2go: dict | None = None,
    budgets: dict[str, dict] | None = None,
) -> list:
    """Peer adapters with the budgets of :data:`BUDGETS` (``quick``: :data:`QUICK_BUDGETS`; or ``budgets``).

    ``threads`` caps the workers' OpenMP/BLAS/torch threads; ``gene2go`` is GEARS' gene -> terms map (``None``: the
    shared GO table).
    """
    from peers.cellflow import CellFlow
    from peers.gears import Gears
    from peers.scgen import ScGen
    from peers.state import State

    if budgets is None:
        budgets = QUICK_BUDGETS if quick else BUDGETS
    out = []
    for n in names:
        if n == "scgen":
            out.append(ScGen(**budgets["scgen"]))
        elif n == "gears":
            out.append(Gears(**budgets["gears"], gene2go=gene2go, threads=threads))
        elif n == "state":
            out.append(State(**budgets["state"], threads=threads))
        elif n == "cellflow":
            out.append(CellFlow(**budgets["cellflow"], threads=threads))
        else:
            msg = f"unknown peer {n!r}; expected some of {PEERS}"
            raise ValueError(msg)
    return out


def make_models(names: list[str], quick: bool, task: str = "") -> list:
    """vcell's learned models (``vcell_models.MODELS``), each a :class:`peers.vcell_models.VcellModel`."""
    out = []
    for n in names:
        if n not in MODELS:
            msg = f"unknown vcell model {n!r}; expected some of {tuple(MODELS)}"
            raise ValueError(msg)
        out.append(MODELS[n](quick, task))
    return out


def run_task(
    task: str,
    peers: list[str],
    models: list[str],
    seeds: list[int],
    quick: bool,
    out: Path,
    *,
    threads: int | None = 1,
    kang_types: list[str] | None = None,
):
    """Run one task (baselines + peers + vcell models) and write its CSVs."""
    import vcell
    from vcell.bench import ModelSpec

    adata, kw = load_task(task)
    if task == "kang" and kang_types:
        unknown = sorted(set(kang_types) - {s["name"] for s in kw["splits"]})
        if unknown:
            msg = f"unknown Kang cell types {unknown}; expected some of {[s['name'] for s in kw['splits']]}"
            raise ValueError(msg)
        kw["splits"] = [s for s in kw["splits"] if s["name"] in kang_types]
    gene2go = None
    if task == "combos" and "gears" in peers:
        from peers.gears import gene2go_from_simulation

        # bench.run hands models no uns['vcell_simulation'] (it holds the held-out outcomes): GEARS' gene graph
        # (co-membership in the simulated programs: gene-level prior structure, no outcome) is built here
        gene2go = gene2go_from_simulation(adata)
    predictors = [_common.Measured(ModelSpec(b, vcell.model.Baseline, {"method": b})) for b in BASELINES]
    predictors += [_common.Measured(p) for p in make_models(models, quick, task)]
    predictors += make_peers(peers, quick, threads=threads, gene2go=gene2go)
    t0 = time.perf_counter()
    res = vcell.bench.run(
        adata,
        models=predictors,
        seeds=seeds,
        perturbation_key="perturbation",
        layer="log1p_cp10k",
        on_error="skip",
        progress=False,
        **kw,
    )
    wall = time.perf_counter() - t0
    res.to_csv(out / task)
    print(f"[{task}] done in {wall:.0f} s", flush=True)
    return res, wall


# ---------------------------------------------------------------------------------------------------------------
# report
def _fmt(v: float) -> str:
    return "" if pd.isna(v) else f"{v:.3f}"


def _md(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join([df.index.name or "", *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([str(idx), *[str(v) for v in row.to_numpy()]]) + " |")
    return "\n".join(lines)


def same_predictions(ok: pd.DataFrame, models: list[str]) -> dict[str, str]:
    """Models whose every metric on every condition equals an earlier model's: ``{model: earlier model}``.

    Such a model predicted what the other predicted (e.g. ``linear`` = ``mean`` with one training perturbation);
    the tables label it so, rather than showing what looks like a duplicated row.
    """
    keys = ["split", "seed", "perturbation", "metric"]
    vals = {m: ok[ok["model"] == m].set_index(keys)["value"].sort_index() for m in models}
    out: dict[str, str] = {}
    for i, m in enumerate(models):
        v = vals[m]
        if v.notna().sum() == 0:
            continue
        for other in models[:i]:
            w = vals[other]
            if other not in out and v.index.equals(w.index) and np.allclose(v, w, rtol=0, atol=1e-9, equal_nan=True):
                out[m] = other
                break
    return out


def task_tables(task: str, results: pd.DataFrame, timings: pd.DataFrame, models: list[str]) -> str:
    """Markdown of one task: metrics (mean over held-out conditions and splits), resources, refusals.

    One row per model (in ``models`` order); the best model value of each metric column is in bold.
    """
    ok = results[results["metric"] != "error"]
    err = results[results["metric"] == "error"]
    per_cond = results[results["perturbation"] != "all doubles"]  # interaction_auprc rows pool the doubles
    n_cond = per_cond[per_cond["model"] == models[0]].groupby(["split", "seed"])["perturbation"].nunique().sum()
    # mean over perturbations per split and seed, then over splits and seeds
    per = ok.groupby(["model", "split", "seed", "metric"])["value"].mean().reset_index()
    means = per.groupby(["model", "metric"])["value"].mean().unstack("metric")
    ceil = ok.groupby("metric")["ceiling"].mean()
    answered = ok[ok["metric"] == "pearson_delta"].groupby("model")["perturbation"].count()
    same = same_predictions(ok, models)
    label = {m: (f"{m} (= {same[m]})" if m in same else m) for m in models}
    cols = [m for m in SHOW if m in means.columns]
    tab = pd.DataFrame(index=pd.Index([label[m] for m in models], name="model"))
    tab["answered"] = [f"{int(answered.get(m, 0))}/{n_cond}" for m in models]
    for c in cols:
        col = means[c].reindex(models) if c in means else pd.Series(np.nan, index=models)
        valid = col.dropna()
        best = (valid.idxmin() if c in LOWER_IS_BETTER else valid.idxmax()) if len(valid) > 1 else None
        cells = []
        for mo in models:
            if mo not in means.index or (pd.isna(col[mo]) and answered.get(mo, 0) == 0):
                cells.append("n/a")
            elif mo == best or (best is not None and np.isclose(col[mo], col[best], rtol=0, atol=5e-4)):
                cells.append(f"**{_fmt(col[mo])}**")
            else:
                cells.append(_fmt(col[mo]))
        tab[SHOW[c]] = cells
    ceil_row = pd.DataFrame(
        [["", *[_fmt(ceil.get(m, np.nan)) for m in cols]]], columns=tab.columns, index=["split-half ceiling"]
    )
    tab = pd.concat([tab, ceil_row])
    tab.index.name = "model"
    # resources
    t = timings.copy()
    for c in ("fit_s", "predict_s", "peak_mem_mb", "start_mem_mb"):
        if c not in t:
            t[c] = np.nan
    t["added_mem_mb"] = t["peak_mem_mb"] - t["start_mem_mb"].fillna(0.0)
    res = t.groupby("model", sort=False).agg(
        total_s=("total_s", "sum"),
        fit_s=("fit_s", "sum"),
        predict_s=("predict_s", "sum"),
        peak=("peak_mem_mb", "max"),
        added=("added_mem_mb", "max"),
    )
    res = res.reindex(models)
    answered_any = {m for m in models if answered.get(m, 0) > 0}

    def _num(v: float, nd: int = 1, model: str = "") -> str:
        if pd.isna(v) or (model and model not in answered_any):  # a model that only refused: nothing to measure
            return ""
        return f"{v:.{nd}f}"

    rtab = pd.DataFrame(
        {
            "wall time (s, all splits)": [f"{v:.1f}" for v in res["total_s"]],
            "fit (s)": [_num(v, 1, m) for m, v in res["fit_s"].items()],
            "predict (s)": [_num(v, 1, m) for m, v in res["predict_s"].items()],
            "peak RSS (MiB)": [_num(v, 0, m) for m, v in res["peak"].items()],
            "RSS added by the call (MiB)": [_num(v, 0, m) for m, v in res["added"].items()],
        },
        index=pd.Index(models, name="model"),
    )
    parts = [_md(tab), "", _md(rtab)]
    if same:
        parts += [""]
        for m, other in same.items():
            why = SAME_REASONS.get((m, other), "")
            parts.append(
                f"`{m}` predicted what `{other}` predicted (the same value of every metric on every held-out "
                f"condition){': ' + why if why else ''}."
            )
    if task == "kang":
        pd_rows = ok[ok["metric"] == "pearson_delta"].pivot_table(index="split", columns="model", values="value")
        pd_rows = pd_rows.reindex(columns=[m for m in models if m in pd_rows.columns]).map(_fmt)
        pd_rows.columns = [label[m] for m in pd_rows.columns]
        pd_rows.index.name = "held-out type"
        parts += ["", "Pearson Δ (all genes) per held-out cell type:", "", _md(pd_rows)]
    if len(err):
        reasons = err.groupby("model")["error"].agg(lambda s: (s.nunique(), s.iloc[0]))
        lines = ["", "Conditions a model did not answer (one reason shown per model):", ""]
        for mo in models:
            if mo in reasons.index:
                k, r = reasons[mo]
                n = int((err["model"] == mo).sum())
                first = str(r).replace("\n", " ").replace("|", "/")[:400]
                lines.append(f"- **{mo}** ({n} of {n_cond}): {first}")
        parts += lines
    return "\n".join(parts)


def walls_table(out: Path, tasks: list[str], walls: dict) -> str:
    """Markdown: wall time (s) per model and task (summed over splits), the whole tasks, and the total."""
    cols = {}
    for task in tasks:
        f = out / task / "timings.csv"
        if f.is_file():
            cols[task] = pd.read_csv(f).groupby("model", sort=False)["total_s"].sum()
    if not cols:
        return ""
    tab = pd.DataFrame(cols)
    tab["all tasks"] = tab.sum(axis=1)
    whole = {t: walls.get(t, np.nan) for t in cols}
    whole["all tasks"] = np.nansum(list(whole.values()))
    tab.loc["whole task (models + data split + metrics)"] = pd.Series(whole)
    tab = tab.map(lambda v: "" if pd.isna(v) else ("< 1" if v < 0.5 else f"{v:.0f}"))
    tab.index.name = "model"
    return _md(tab)


def settings_text(quick: bool, threads: int | None, models: list[str], budgets: dict | None = None) -> str:
    """The Settings paragraph of the page, written from the adapters' parameters (``budgets``, default
    :data:`BUDGETS` or, with ``quick``, :data:`QUICK_BUDGETS`)."""
    sg, ge, st, cf = make_peers(list(PEERS), quick, threads=threads, budgets=budgets)
    mc = ge.max_cells_per_condition
    if cf.ode_steps:
        ode = f"Tsit5 with {cf.ode_steps} fixed steps"
    elif cf.ode_tol == 1e-5:
        ode = "CellFlow's default ODE solve (Tsit5, adaptive step, rtol = atol = 1e-5)"
    else:
        ode = (
            f"Tsit5 with an adaptive step (rtol = atol = {cf.ode_tol:g}; CellFlow's default 1e-5 gave the same "
            "metrics to 3 decimals at 5-9x the prediction time)"
        )
    lines = [
        f"scGen ≤ {sg.max_epochs} epochs, batch {sg.batch_size}, early stopping (patience "
        f"{sg.early_stopping_patience}) on scvi-tools' validation cells (pertpy's defaults otherwise: {sg.n_hidden} "
        f"hidden, {sg.n_latent} latent);",
        f"GEARS {ge.epochs} epochs, ≤ {mc} training cells per condition ({4 * mc} controls), GO graph from "
        "org.Hs.eg.db 3.16 (Papalexi; MARCH8 → MARCHF8) or, for the simulation, gene co-membership in the simulated "
        "programs;",
        f"STATE a small state-transition model (hidden {st.hidden_dim}, {st.n_layers}+{st.n_layers} layers, cell "
        f"sets of {st.cell_set_len}, {st.batch_size} sets per batch, lr {st.lr:g}) for {st.max_steps} steps, no "
        "pretrained embeddings;",
        f"CellFlow OT flow matching in a {cf.n_pcs}-PC space, width {cf.width}, {cf.num_iterations} iterations of "
        f"{cf.batch_size} cells, predictions by {ode}, decoded from the PCs;",
    ]
    if "CausalVAE" in models:
        lines.append(
            "vcell's CausalVAE with its defaults (negative binomial on the raw counts of the task's genes, "
            f"≤ {2 if quick else 200} epochs with its own early stopping; on the simulated combos 300 epochs at "
            "learning rate 3e-3 without early stopping, which stopped before the singles' strong effects were "
            "learned), its log1p(CP10k) predictions rescaled "
            "to the benchmark layer's library sizes (`benchmarks/peers/vcell_models.py`);"
        )
    thr = (
        f"every process (this one and the peers' workers) with {threads} OpenMP/BLAS/torch thread"
        f"{'s' if threads and threads > 1 else ''} (`--threads {threads}`; JAX, used by scGen and CellFlow, keeps "
        "its own pool): on 2 cores shared with other jobs, STATE's steps ran 10x faster with 1 thread than with 2"
        if threads
        else "the libraries' default threads (`--threads 0`)"
    )
    return (
        "Settings (see the adapters' docstrings): "
        + " ".join(lines)
        + f" {thr}. These are CPU budgets, far below the papers' (GPU) training; read the peers' numbers as "
        '"what each tool gives in minutes on a laptop", not as their best.'
    )


def write_doc(doc: Path, out: Path, tasks: list[str], walls: dict, meta: dict) -> None:
    """Write ``docs/peers.md`` from the CSVs under ``out`` (``meta``: seeds, quick, threads, models, loads)."""
    import platform

    import vcell

    seeds, quick = meta.get("seeds", [0]), bool(meta.get("quick", False))
    threads, models = meta.get("threads", 1), list(meta.get("models", []))
    budgets = meta.get("budgets")
    sections = []
    for task in tasks:
        d = out / task
        if not (d / "results.csv").is_file():
            continue
        results = pd.read_csv(d / "results.csv", keep_default_na=True)
        results["error"] = results.get("error", "").fillna("")
        timings = pd.read_csv(d / "timings.csv")
        task_models = list(dict.fromkeys(timings["model"]))
        wall = walls.get(task)
        head = f"## {TASK_TITLES[task]}" + (f"\n\nWhole task: {wall / 60:.1f} min." if wall else "")
        sections.append(head + "\n\n" + task_tables(task, results, timings, task_models))
    cpu = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    total = sum(v for t, v in walls.items() if t in TASKS)
    loads = meta.get("load_average", {})
    load_txt = ", ".join(f"{t} {v:.1f}" for t, v in loads.items() if t in tasks)
    cmd_txt = ""
    if meta.get("command_s"):
        cmd_txt = (
            f" The command `{meta.get('command', '')}` took {meta['command_s'] / 60:.1f} min from start to report."
        )
    vcell_models = ", ".join(f"`{m}`" for m in models) or "none"
    text = f"""# Peers side by side

vcell's baselines, vcell's learned models and the field's main tools, run by `benchmarks/peers/run_peers.py` in one
run on the same splits, the same control cells and the same metrics (`vcell.bench.run`; definitions in the
[baseline benchmark](benchmarks.md) and the benchmark protocol). Each peer is an adapter in `benchmarks/peers/` (a
`vcell.bench.Predictor`) that trains on the split's training cells only and predicts the counterfactual of the
held-out conditions' control cells in log1p(CP10k). Where a model cannot answer a task by design, the table says
`n/a` and lists its reason; no number is made up.

Regenerate (the peers' environments are built from PyPI, never as vcell dependencies):

```bash
bash benchmarks/peers/setup_envs.sh       # .venvs/gears, .venvs/state, .venvs/cellflow
python benchmarks/peers/run_peers.py      # writes benchmarks/peers/results/ and this page
```

This run: vcell {vcell.__version__}, seeds {seeds}{" (QUICK smoke-test budgets: numbers meaningless)" if quick else ""},
vcell models: {vcell_models}; {cpu}; total {total / 60:.1f} min over the tasks' `bench.run` calls.{cmd_txt} Values are
means over held-out conditions (and over the 7 held-out cell types for Kang); the best model value of each column
is in bold; "answered" counts the held-out conditions a model predicted. Wall time is per model, summed over the
task's splits (for peers in their own venv it includes writing the data, starting the interpreter and the peer's own
pre-processing). Peak RSS: for GEARS, STATE and CellFlow the largest resident set of the worker's process tree (a
fresh interpreter: libraries + data + model); for the models that run inside the benchmark process (baselines,
scGen, vcell's models), the whole process's peak during the call, which includes everything loaded before (the
data, torch, JAX); the last column is the increase over the process's RSS at the start of the call. Wall times
depend on the load of the machine{f" (1-minute load average at the end of each task: {load_txt})" if load_txt else ""}.

| peer | version | runs | can do |
|---|---|---|---|
| scGen | pertpy 1.0.3 `pertpy.tl.Scgen` (JAX) | in vcell's env | cell-type transfer; combos by latent vector arithmetic (`z + δA + δB`, not in the paper); no unseen perturbation |
| GEARS | cell-gears 0.1.2, torch-geometric 2.8.1 | `.venvs/gears` | unseen genes and combos on a GO gene graph; no cell-type transfer |
| STATE | arc-state 0.11.1 (`state tx train` / `state tx infer`) | `.venvs/state` | cell-type transfer (one-hot perturbations, expression input); no unseen perturbation or combination |
| CellFlow | cellflow-tools 0.0.9 (JAX CPU) | `.venvs/cellflow` | cell-type transfer, combos of trained singles (one-hot); no unseen perturbation |
| CPA | cpa-tools | not run | requires torch < 2 and scvi-tools < 1: cannot be installed beside torch 2.x / Python 3.11 |

{settings_text(quick, threads, models, budgets)}

Wall time (s) per model and task, summed over the task's splits:

{walls_table(out, tasks, walls)}

{chr(10).join(chr(10) + s + chr(10) for s in sections)}
"""
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    print(f"wrote {doc}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {TASKS}")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {PEERS} ('' for none)")
    p.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated vcell models of {tuple(MODELS)} ('' for none)"
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0: one seed fits the CPU budget)")
    p.add_argument("--threads", type=int, default=1, help="OpenMP/BLAS/torch threads per process (0: libraries' own)")
    p.add_argument("--kang-types", default="", help="comma-separated Kang held-out cell types (default: all 7)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "peers.md")
    p.add_argument("--quick", action="store_true", help="tiny training budgets (smoke test)")
    p.add_argument("--report-only", action="store_true", help="rewrite --doc from the CSVs in --out, run nothing")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    peers = [x for x in args.peers.split(",") if x]
    models = [x for x in args.models.split(",") if x]
    seeds = [int(s) for s in args.seeds.split(",")]
    kang_types = [t for t in args.kang_types.split(",") if t]
    for t in tasks:
        if t not in TASKS:
            p.error(f"unknown task {t!r}; expected some of {TASKS}")
    for x in peers:
        if x not in PEERS:
            p.error(f"unknown peer {x!r}; expected some of {PEERS}")
    for x in models:
        if x not in MODELS:
            p.error(f"unknown vcell model {x!r}; expected some of {tuple(MODELS)}")
    if args.threads < 0:
        p.error("--threads must be >= 0")
    import vcell

    vcell.settings.seed = seeds[0]
    args.out.mkdir(parents=True, exist_ok=True)
    walls_file = args.out / "walls.json"
    saved = json.loads(walls_file.read_text()) if walls_file.is_file() else {}
    walls = {t: v for t, v in saved.items() if t in TASKS}
    meta = saved.get("_meta", {"seeds": saved.get("_seeds", seeds), "quick": saved.get("_quick", False)})
    if not args.report_only:
        threads = args.threads or None
        meta = {
            "seeds": seeds,
            "quick": args.quick,
            "threads": args.threads,
            "models": models,
            "budgets": QUICK_BUDGETS if args.quick else BUDGETS,
            "kang_types": kang_types,
            "load_average": {},
            "command": " ".join(["python benchmarks/peers/run_peers.py", *(sys.argv[1:] if argv is None else argv)]),
        }
        import contextlib

        limit = contextlib.nullcontext()
        if threads:
            import torch
            from threadpoolctl import threadpool_limits

            torch.set_num_threads(threads)
            limit = threadpool_limits(threads)
        with limit:
            for t in tasks:
                _, walls[t] = run_task(
                    t, peers, models, seeds, args.quick, args.out, threads=threads, kang_types=kang_types
                )
                meta["load_average"][t] = os.getloadavg()[0]
                walls_file.write_text(json.dumps(walls | {"_meta": meta}))
        meta["command_s"] = time.perf_counter() - _T0
        walls_file.write_text(json.dumps(walls | {"_meta": meta}, indent=1))
    write_doc(args.doc, args.out, tasks, walls, meta)
    if not args.report_only:
        print(f"total {(time.perf_counter() - _T0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
