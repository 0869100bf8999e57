from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import vcell
from vcell.bench import BASELINES, BenchmarkResult
from vcell.cli import _models_available, _print_table, main
from vcell.pl._benchmark import lower_is_better


def test_demo_writes_table_and_figures(tmp_path, capsys, monkeypatch):
    titles = []
    scatter = vcell.pl.prediction_scatter

    def spy(*args, **kwargs):
        titles.append(kwargs.get("title"))
        return scatter(*args, **kwargs)

    monkeypatch.setattr(vcell.pl, "prediction_scatter", spy)
    # the demo's data, Kang 2018, cut to its 1000 most-counted genes (all 1975 cells): the command's flow and
    # outputs as with all 6998 genes, at half the time (the PCA of the distribution metrics, DE tests)
    kang = vcell.datasets.kang2018()
    top = np.sort(np.argsort(-np.asarray(kang.X.sum(0)).ravel())[:1000])
    kang = kang[:, top].copy()
    monkeypatch.setattr(vcell.datasets, "kang2018", kang.copy)
    assert main(["demo", "--out", str(tmp_path), "--models", "control,additive"]) == 0
    out = capsys.readouterr().out
    assert "(1975 cells x 1000 genes)" in out
    assert "additive" in out
    assert "energy_distance" in out
    assert "(ceiling): each metric between two random halves of the true held-out cells" in out
    assert "pds: needs >= 2 held-out perturbations per split" in out
    assert titles == ["additive on held-out CD4T (IFNb)"]
    for f in ("metrics.csv", "summary.csv", "benchmark.png", "prediction_scatter.png"):
        assert (tmp_path / f).stat().st_size > 0
    summary = pd.read_csv(tmp_path / "summary.csv").set_index(["model", "metric"])["mean"]
    assert summary[("additive", "energy_distance")] < summary[("control", "energy_distance")]


def test_benchmark_command_on_a_file(tmp_path, capsys):
    sim = vcell.datasets.simulate(n_cells=1200, n_genes=50, n_perturbations=6, n_combos=8, seed=1)
    path = tmp_path / "sim.h5ad"
    sim.write_h5ad(path)
    rc = main(
        [
            "benchmark",
            "--data",
            str(path),
            "--split",
            "combo_half",
            "--models",
            "control,mean,additive",
            "--seeds",
            "1,2",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    res = pd.read_csv(tmp_path / "out" / "results.csv")
    assert set(res["model"]) == {"control", "mean", "additive"}
    assert set(res["seed"]) == {1, 2}
    assert (tmp_path / "out" / "report.png").stat().st_size > 0


def test_benchmark_command_bad_input_exits_2(tmp_path, capsys):
    rc = main(["benchmark", "--data", str(tmp_path / "missing.h5ad"), "--split", "combo_half", "--out", str(tmp_path)])
    assert rc == 2
    assert "missing.h5ad" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "benchmark"])
def test_unknown_model_exits_2_listing_valid_names(command, tmp_path, capsys):
    # checked before any data is read: the missing file is not what the error is about
    extra = ["--data", str(tmp_path / "missing.h5ad"), "--split", "combo_half"] if command == "benchmark" else []
    rc = main([command, *extra, "--models", "mean,foo", "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'foo'" in err
    assert "'mean'" not in err  # only the unknown name is reported as unknown
    assert "missing.h5ad" not in err
    for name in _models_available():
        assert name in err
    assert not (tmp_path / "out").exists()


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vcell {vcell.__version__}"


def test_help_texts(capsys):
    assert main(["demo", "--help"]) == 0
    demo = " ".join(capsys.readouterr().out.split())
    assert "every model" not in demo
    assert "four baselines" in demo
    assert "default: control,mean,additive,linear" in demo
    assert main(["benchmark", "--help"]) == 0
    bench = " ".join(capsys.readouterr().out.split())
    for text in (
        "(default: control,mean,additive,linear)",
        "seeds (default: 1,2,3)",
        "perturbation labels (default: perturbation)",
        "control cells (default: control)",
        "cell_type for --split unseen_cell_type",
    ):
        assert text in bench, text
    assert main(["demo", "--no-such-option"]) == 2


def _summary(splits=("unseen_cell_type:B", "unseen_cell_type:NK")):
    rows = []
    for i, split in enumerate(splits):
        for model, base in (("control", 0.0), ("additive", 0.5)):
            for metric in ("pearson_delta", "energy_distance", "pds"):
                value = np.nan if metric == "pds" or (model == "control" and metric == "pearson_delta") else base + i
                ceiling = np.nan if metric == "pds" else 0.9 + i
                rows.append(
                    {"model": model, "split": split, "metric": metric, "mean": value, "n_seeds": 1, "ceiling": ceiling}
                )
    return pd.DataFrame(rows)


def test_table_legend_direction_and_ceiling(capsys):
    _print_table(_summary(splits=("unseen_cell_type:B",)))
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines[0].split()
    better = next(line for line in lines if line.startswith("better:")).split()[1:]
    assert header[1:] == ["pearson_delta", "energy_distance", "pds"]
    assert better == [("lower" if lower_is_better(m) else "higher") for m in header[1:]]
    assert better == ["higher", "lower", "higher"]
    legend = " ".join(out.split())
    assert "(ceiling): each metric between two random halves of the true held-out cells" in legend
    assert "mean of 3 random halvings" in legend
    assert "pearson_delta of control: a correlation with a predicted change of zero is undefined" in legend
    assert "pds: needs >= 2 held-out perturbations per split" in legend
    assert "Per split" not in out  # one split: nothing to spread
    ceiling_row = next(line for line in lines if line.startswith("(ceiling)")).split()
    assert ceiling_row[1:] == ["0.900", "0.900", "n/a"]


def test_table_over_several_splits_prints_each_split(capsys):
    _print_table(_summary())
    out = capsys.readouterr().out
    assert "Mean over 2 splits (unseen_cell_type: B, NK)" in out
    assert "then the 2 splits" in " ".join(out.split())
    mean_row = next(line for line in out.splitlines() if line.startswith("additive")).split()
    assert mean_row[1:3] == ["1.000", "1.000"]  # (0.5 + 1.5) / 2
    block = out.split("energy_distance (lower is better)")[1].splitlines()
    assert block[1].split() == ["B", "NK", "sd", "min", "max"]
    assert block[3].split() == ["additive", "0.500", "1.500", "0.707", "0.500", "1.500"]
    assert block[4].split()[:3] == ["(ceiling)", "0.900", "1.900"]
    assert "pds: n/a in every split" in out


def test_benchmark_command_plots_each_split(tmp_path, capsys, monkeypatch):
    import anndata as ad

    results = _summary().rename(columns={"mean": "value"}).assign(seed=1, perturbation="IFNb")
    fake = BenchmarkResult(results=results, summary=_summary(), timings=pd.DataFrame({"model": ["control"]}))
    calls = {}

    def run(adata, **kwargs):
        calls["run"] = kwargs
        return fake

    def plot(res, **kwargs):
        calls["plot"] = kwargs

    # no data and no training: the command's wiring only (bench.run itself is tested in tests/bench)
    monkeypatch.setattr(vcell.datasets, "load", lambda data: ad.AnnData(np.zeros((2, 2), dtype=np.float32)))
    monkeypatch.setattr(vcell.bench, "run", run)
    monkeypatch.setattr(vcell.pl, "benchmark", plot)
    args = ["benchmark", "--data", "x", "--split", "combo_half", "--models", ",".join(BASELINES)]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert calls["run"]["models"] == list(BASELINES)
    assert calls["plot"]["by"] == "split"
    assert calls["plot"]["save"] == tmp_path / "report.png"
    assert "Mean over 2 splits" in capsys.readouterr().out
