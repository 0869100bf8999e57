"""Command line: ``vcell demo`` and ``vcell benchmark``."""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from vcell._utils import resolve_seed


def _models_available() -> list[str]:
    """The baselines plus every learned model class of :mod:`vcell.model` (``capabilities.learned``)."""
    from .bench import BASELINES
    from .model._base import model_classes

    learned = [name for name, cls in model_classes().items() if cls.capabilities.learned]
    return [*BASELINES, *learned]


def _check_models(models: Sequence[str]) -> list[str]:
    """``models`` as a list, or a ValueError naming the unknown ones and listing the valid names."""
    models = list(models)
    valid = _models_available()
    unknown = [m for m in models if m not in valid]
    if unknown:
        msg = f"unknown model(s) {', '.join(map(repr, unknown))}; valid models: {', '.join(valid)}"
        raise ValueError(msg)
    if not models:
        msg = f"no model given; valid models: {', '.join(valid)}"
        raise ValueError(msg)
    return models


#: what the ``(ceiling)`` row of the printed table is (how ``bench.run`` computes ``ceiling``, via ``metrics.evaluate``)
CEILING_LEGEND = (
    "(ceiling): each metric between two random halves of the true held-out cells (half 1 scored as if it were "
    "the prediction; mean of 3 random halvings): how well the data agree with themselves. A guide, not a bound: "
    "with few cells it is noisy."
)


def _fmt(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.3f}"


def _text_table(wide, better: dict[str, str]) -> str:
    """``wide`` (rows x metric columns of floats) as text, with a ``better`` row under the header."""
    import pandas as pd

    body = wide.map(_fmt)
    head = pd.DataFrame([[better[c] for c in wide.columns]], index=["better:"], columns=wide.columns)
    table = pd.concat([head, body])
    table.columns.name = wide.columns.name
    table.index.name = wide.index.name
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.max_colwidth", 40):
        return table.to_string()


def _na_legend(wide) -> str | None:
    """One paragraph saying why the table has ``n/a`` cells, or None when it has none."""
    from .pl._benchmark import undefined_note

    reasons: dict[str, list[str]] = {}  # reason -> what it explains
    for metric in wide.columns:
        na = wide[metric].isna()
        which = ", ".join(map(str, wide.index[na]))
        if na.all():
            reasons.setdefault(undefined_note(metric), []).append(metric)
        elif na.any() and metric.startswith("pearson"):
            reasons.setdefault("a correlation with a predicted change of zero is undefined", []).append(
                f"{metric} of {which}"
            )
        elif na.any():
            reasons.setdefault("undefined", []).append(f"{metric} of {which}")
    if not reasons:
        return None
    return "n/a: " + "; ".join(f"{', '.join(what)}: {why}" for why, what in reasons.items())


def _legend(text: str) -> str:
    return textwrap.fill(text, width=110, subsequent_indent="  ", break_on_hyphens=False)


def _print_table(summary, *, metrics: Sequence[str] | None = None) -> None:
    """Print the mean per model and metric with a legend; with several splits, also each split's values."""
    import pandas as pd

    from .pl._benchmark import better, describe_splits, short_split_labels

    s = summary[summary["metric"] != "error"]
    if metrics is not None:
        s = s[s["metric"].isin(metrics)]
    cols = list(pd.unique(s["metric"]))
    rows = list(pd.unique(s["model"]))
    splits = list(pd.unique(s["split"].astype(str))) if "split" in s else []
    direction = {m: better(m) for m in cols}
    wide = s.groupby(["model", "metric"], sort=False)["mean"].mean().unstack("metric").reindex(index=rows, columns=cols)
    wide.loc["(ceiling)"] = s.groupby("metric", sort=False)["ceiling"].mean().reindex(cols)
    wide.columns.name, wide.index.name = "metric", "model"
    if len(splits) > 1:
        print(f"Mean over {len(splits)} splits ({describe_splits(splits)}); per split below.")
    print(_text_table(wide, direction))
    per = "mean over held-out perturbations, then seeds" + (
        f", then the {len(splits)} splits" if len(splits) > 1 else ""
    )
    print(_legend(f"Values: {per}. better: whether a higher or a lower value is better."))
    print(_legend(CEILING_LEGEND))
    na = _na_legend(wide)
    if na:
        print(_legend(na))
    if len(splits) > 1:
        labels = short_split_labels(splits)
        print(
            f"\nPer split ({len(splits)} splits; mean over held-out perturbations, then seeds; sd and range over splits):"
        )
        s = s.assign(split=s["split"].astype(str).map(labels))
        for metric in cols:
            sm = s[s["metric"] == metric]
            if sm["mean"].isna().all():
                print(f"\n{metric}: n/a in every split (see above)")
                continue
            t = sm.groupby(["model", "split"], sort=False)["mean"].mean().unstack("split")
            t = t.reindex(index=rows, columns=[labels[x] for x in splits])
            t.loc["(ceiling)"] = sm.groupby("split", sort=False)["ceiling"].mean().reindex(t.columns)
            stats = pd.DataFrame({"sd": t.std(axis=1, ddof=1), "min": t.min(axis=1), "max": t.max(axis=1)})
            t = pd.concat([t, stats], axis=1).map(_fmt)
            t.columns.name, t.index.name = None, None
            print(f"\n{metric} ({direction[metric]} is better)")
            with pd.option_context("display.width", 250, "display.max_columns", 40):
                print(t.to_string())


def demo(
    out: str | Path = "vcell_demo_out",
    *,
    cell_type: str = "CD4T",
    seed: int | None = None,
    models: Sequence[str] | None = None,
    max_epochs: int = 20,
) -> Path:
    """Hold out one cell type's IFN-beta response in Kang 2018, predict it with the baselines (or ``models``), report.

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
        they train for minutes on a CPU). An unknown name raises a ValueError listing the valid ones.
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

    if models:
        models = _check_models(models)
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
        sub,
        perturbation="IFNb",
        pred_layer="vcell_pred",
        title=f"{best} on held-out {cell_type} (IFNb)",
        save=out / "prediction_scatter.png",
        show=False,
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
        Model names: baselines and learned models (an unknown name raises a ValueError listing the valid ones).
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

    models = _check_models(models)
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
    by = "split" if res.results["split"].nunique() > 1 else "seed"
    pl.benchmark(res.results, by=by, save=out / "report.png", show=False)
    plt.close("all")
    print(f"wrote {out}/results.csv, summary.csv, timings.csv, report.png")
    return out


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vcell`` command; returns the exit status (2 for input errors)."""
    from . import __version__

    baselines = "control,mean,additive,linear"
    models_help = (
        f"comma-separated models: baselines {baselines.replace(',', ', ')} and learned models "
        "(vcell.model classes that train weights, e.g. CausalVAE, FlowMatching)"
    )
    parser = argparse.ArgumentParser(prog="vcell", description="Virtual-cell perturbation models and benchmarks.")
    parser.add_argument("--version", action="version", version=f"vcell {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser(
        "demo",
        help="Kang 2018 cell-type transfer with the four baselines (learned models with --models); "
        "metrics table and figures",
        description="Hold out one cell type's IFN-beta response in Kang 2018 and predict it with the four baselines "
        "(add learned models with --models); print a metrics table, write CSVs and figures.",
    )
    p_demo.add_argument("--out", default="vcell_demo_out", help="output folder (default: vcell_demo_out)")
    p_demo.add_argument("--cell-type", default="CD4T", help="cell type to hold out (default: CD4T)")
    p_demo.add_argument("--seed", type=int, default=None, help="random seed (default: vcell.settings.seed)")
    p_demo.add_argument(
        "--models",
        type=_csv,
        default=None,
        help=f"{models_help} (default: {baselines}; learned models train for minutes on a CPU)",
    )
    p_demo.add_argument("--max-epochs", type=int, default=20, help="training epochs of learned models (default: 20)")
    p_b = sub.add_parser("benchmark", help="benchmark models on a split with the baselines")
    p_b.add_argument("--data", required=True, help="bundled dataset name or path (h5ad, h5mu, GEARS folder)")
    p_b.add_argument("--split", required=True, help="split kind, e.g. unseen_cell_type, combo_seen1")
    p_b.add_argument("--models", type=_csv, default=_csv(baselines), help=f"{models_help} (default: {baselines})")
    p_b.add_argument(
        "--seeds",
        type=lambda s: [int(x) for x in _csv(s)],
        default=[1, 2, 3],
        help="comma-separated split and training seeds (default: 1,2,3)",
    )
    p_b.add_argument("--out", required=True, help="output folder")
    p_b.add_argument(
        "--perturbation-key",
        default="perturbation",
        help="obs column with the perturbation labels (default: perturbation)",
    )
    p_b.add_argument("--control", default="control", help="label of the control cells (default: control)")
    p_b.add_argument(
        "--covariate-keys",
        type=_csv,
        default=[],
        help="comma-separated obs columns of the cells' context, controls are matched by them "
        "(default: none; cell_type for --split unseen_cell_type)",
    )
    p_b.add_argument(
        "--held-out",
        type=_csv,
        default=None,
        help="unseen_cell_type: comma-separated cell types to hold out, one split each (default: every type)",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version (0) and usage errors (2): a status, not an exception
        return 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 2
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
