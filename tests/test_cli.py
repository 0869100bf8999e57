from __future__ import annotations

import pandas as pd

import vcell
from vcell.cli import main


def test_demo_writes_table_and_figures(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--models", "control,additive"]) == 0
    out = capsys.readouterr().out
    assert "additive" in out
    assert "energy_distance" in out
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
