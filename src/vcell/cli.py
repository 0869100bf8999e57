"""Command line: ``vcell demo`` and ``vcell benchmark``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vcell._utils import resolve_seed


def _models_available() -> list[str]:
    """The baselines plus every learned vcell model that exists in this version."""
    from . import model as vmodel
    from .bench import BASELINES

    learned = [name for name in ("CausalVAE", "ResidualDiffusion", "FlowMatching", "CellJEPA") if hasattr(vmodel, name)]
    return [*BASELINES, *learned]


def _print_table(summary, *, metrics: Sequence[str] | None = None) -> None:
    import pandas as pd

    s = summary if metrics is None else summary[summary["metric"].isin(metrics)]
    wide = s.pivot_table(index="model", columns="metric", values="mean", sort=False)
    ceil = s.groupby("metric", sort=False)["ceiling"].mean()
    wide.loc["(ceiling)"] = ceil.reindex(wide.columns)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print(wide.to_string())


def demo(
    out: str | Path = "vcell_demo_out",
    *,
    cell_type: str = "CD4T",
    seed: int | None = None,
    models: Sequence[str] | None = None,
    max_epochs: int = 20,
) -> Path:
    """Hold out one cell type's IFN-beta response in Kang 2018, predict it with every model, report.

    Parameters
    ----------
    out
        Output folder: ``metrics.csv``, ``summary.csv``, ``benchmark.png``, ``prediction_scatter.png``.
    cell_type
        The cell type whose stimulated cells are held out.
    seed
        Random seed (default ``vcell.settings.seed``).
    models
        Models to run (default: the four baselines; learned models such as ``"CausalVAE"`` on request, since
        they train for minutes on a CPU).
    max_epochs
        Training budget of the learned models (a demo budget: benchmarks train longer).

    Returns
    -------
    The output folder.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import bench, datasets, model, pl, pp, tl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed = resolve_seed(seed)
    t0 = time.perf_counter()
    adata = datasets.kang2018()
    pp.harmonize(adata, perturbation_key="perturbation", control="control")
    if not models:
        models = list(bench.BASELINES)
        learned = [m for m in _models_available() if m not in bench.BASELINES]
        if learned:
            print(
                f"vcell demo: learned models available ({', '.join(learned)}); add them with "
                f"--models control,mean,additive,linear,{learned[0]} (training takes minutes on a CPU)"
            )
    models = list(models)
    specs = [
        m if m in bench.BASELINES else bench.ModelSpec(m, getattr(model, m), {}, {"max_epochs": max_epochs})
        for m in models
    ]
    print(
        f"vcell demo: Kang 2018 IFN-beta PBMCs ({adata.n_obs} cells x {adata.n_vars} genes); "
        f"held out: stimulated {cell_type} cells; models: {', '.join(models)}"
    )
    res = bench.run(
        adata,
        models=specs,
        splits=[{"kind": "unseen_cell_type", "held_out": cell_type, "name": f"unseen_cell_type:{cell_type}"}],
        seeds=[seed],
        covariate_keys=["cell_type"],
        progress=False,
    )
    res.results.to_csv(out / "metrics.csv", index=False)
    res.summary.to_csv(out / "summary.csv", index=False)
    _print_table(res.summary)
    pl.benchmark(res.results, save=out / "benchmark.png", show=False)
    plt.close("all")

    # counterfactual of the held-out type's control cells with the best model by energy distance
    summ = res.summary[res.summary["metric"] == "energy_distance"].sort_values("mean")
    best = summ["model"].iloc[0] if len(summ) else "additive"
    bench.split(adata, kind="unseen_cell_type", seed=seed, held_out=cell_type)
    train = adata[adata.obs["vcell_split"].isin(["train", "val"])].copy()
    cls = model.Baseline if best in bench.BASELINES else getattr(model, best)
    cls.setup_anndata(train, perturbation_key="vcell_perturbation", control="control", covariate_keys=["cell_type"])
    m = cls(train, method=best) if cls is model.Baseline else cls(train)
    m.train() if cls is model.Baseline else m.train(max_epochs=max_epochs)
    sub = adata[adata.obs["cell_type"] == cell_type].copy()
    tl.predict_perturbation(sub, m, perturbations="IFNb", key_added="vcell_pred")
    pl.prediction_scatter(
        sub, perturbation="IFNb", pred_layer="vcell_pred", save=out / "prediction_scatter.png", show=False
    )
    plt.close("all")
    print(
        f"best model by energy distance: {best}; wrote {out}/metrics.csv, summary.csv, benchmark.png, "
        f"prediction_scatter.png in {time.perf_counter() - t0:.1f} s"
    )
    return out


def benchmark(
    data: str,
    *,
    split: str,
    models: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    perturbation_key: str = "perturbation",
    control: str = "control",
    covariate_keys: Sequence[str] = (),
    held_out: Sequence[str] | None = None,
) -> Path:
    """Run :func:`vcell.bench.run` on a dataset and write ``results.csv``, ``summary.csv``, ``report.png``.

    Parameters
    ----------
    data
        A bundled dataset name (``vcell.datasets.available()``) or a path (h5ad, h5mu, GEARS folder).
    split
        Split kind.
    models
        Model names.
    seeds
        Seeds.
    out
        Output folder.
    perturbation_key, control
        Label column and control label.
    covariate_keys
        Context columns (default for ``unseen_cell_type``: the split's cell-type key ``cell_type``).
    held_out
        For ``unseen_cell_type``: cell types held out, one split each (default: every type).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import bench, datasets, pl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adata = datasets.load(data)
    covariate_keys = list(covariate_keys)
    if split == "unseen_cell_type":
        covariate_keys = covariate_keys or ["cell_type"]
        types = held_out or sorted(adata.obs[covariate_keys[0]].astype(str).unique())
        splits = [{"kind": split, "held_out": t, "name": f"{split}:{t}"} for t in types]
    else:
        splits = [split]
    res = bench.run(
        adata,
        models=list(models),
        splits=splits,
        seeds=list(seeds),
        perturbation_key=perturbation_key,
        control=control,
        covariate_keys=covariate_keys,
        on_error="skip",
    )
    res.to_csv(out)
    _print_table(res.summary)
    pl.benchmark(res.results, save=out / "report.png", show=False)
    plt.close("all")
    print(f"wrote {out}/results.csv, summary.csv, timings.csv, report.png")
    return out


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vcell`` command."""
    parser = argparse.ArgumentParser(prog="vcell", description="Virtual-cell perturbation models and benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="Kang 2018 cell-type transfer with every model; metrics table and figures")
    p_demo.add_argument("--out", default="vcell_demo_out", help="output folder (default: vcell_demo_out)")
    p_demo.add_argument("--cell-type", default="CD4T", help="cell type to hold out (default: CD4T)")
    p_demo.add_argument("--seed", type=int, default=None, help="random seed (default: vcell.settings.seed)")
    p_demo.add_argument(
        "--models",
        type=_csv,
        default=None,
        help="comma-separated models (default: the four baselines; add e.g. CausalVAE)",
    )
    p_demo.add_argument("--max-epochs", type=int, default=20, help="training epochs of learned models (default: 20)")
    p_b = sub.add_parser("benchmark", help="benchmark models on a split with the baselines")
    p_b.add_argument("--data", required=True, help="bundled dataset name or path (h5ad, h5mu, GEARS folder)")
    p_b.add_argument("--split", required=True, help="split kind, e.g. unseen_cell_type, combo_seen1")
    p_b.add_argument("--models", type=_csv, default=["control", "mean", "additive", "linear"])
    p_b.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], default=[1, 2, 3])
    p_b.add_argument("--out", required=True, help="output folder")
    p_b.add_argument("--perturbation-key", default="perturbation")
    p_b.add_argument("--control", default="control")
    p_b.add_argument("--covariate-keys", type=_csv, default=[])
    p_b.add_argument("--held-out", type=_csv, default=None, help="unseen_cell_type: types to hold out")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            demo(args.out, cell_type=args.cell_type, seed=args.seed, models=args.models, max_epochs=args.max_epochs)
        else:
            benchmark(
                args.data,
                split=args.split,
                models=args.models,
                seeds=args.seeds,
                out=args.out,
                perturbation_key=args.perturbation_key,
                control=args.control,
                covariate_keys=args.covariate_keys,
                held_out=args.held_out,
            )
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"vcell {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
