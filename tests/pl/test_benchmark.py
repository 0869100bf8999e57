from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import vcell
from vcell.pl._benchmark import _mean_ci, lower_is_better

MODELS = ["control", "mean", "additive", "linear", "CausalVAE", "FlowMatching"]
METRICS = ["pearson_delta", "pearson_delta_top20_de", "mse_top_de", "energy_distance", "mmd"]


def _mean_markers(ax):
    """y of the mean marker of each model, in x order (one errorbar container per model)."""
    return [float(c.lines[0].get_ydata()[0]) for c in ax.containers]


def _results(rng, *, ceiling=True, seeds=(1, 2, 3)):
    rows = []
    for model, seed, pert, metric in itertools.product(MODELS, seeds, ["CD4T", "NK", "B"], METRICS):
        value = rng.normal(0.5 if "pearson" in metric else 3.0, 0.1)
        rows.append(
            {
                "model": model,
                "split": f"unseen_cell_type:{pert}",
                "seed": seed,
                "perturbation": "IFNb",
                "metric": metric,
                "value": value,
                "ceiling": 0.9 if "pearson" in metric else 0.5,
            }
        )
    df = pd.DataFrame(rows)
    return df if ceiling else df.drop(columns="ceiling")


def test_benchmark_one_axes_per_metric(rng, tmp_path):
    res = _results(rng)
    out = tmp_path / "bench.png"
    fig = vcell.pl.benchmark(res, save=out, return_fig=True)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == len(METRICS)
    assert [a.get_title().splitlines()[0] for a in fig.axes] == METRICS
    assert out.stat().st_size > 5000
    ax = fig.axes[0]
    # baselines first in the given order, then the other models
    assert [t.get_text() for t in ax.get_xticklabels()] == MODELS
    # ceiling line drawn at the mean ceiling of the metric
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1
    assert dashed[0].get_ydata()[0] == pytest.approx(0.9)


def test_benchmark_points_are_seed_means_and_ci(rng):
    res = _results(rng)
    fig = vcell.pl.benchmark(res, metrics=["energy_distance"], return_fig=True)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    # one scatter per model, with one point per seed = mean over the perturbations of that seed
    sub = res[(res.metric == "energy_distance") & (res.model == "CausalVAE")]
    seed_means = sub.groupby("seed")["value"].mean().to_numpy()
    x = MODELS.index("CausalVAE")
    pts = [c for c in ax.collections if c.get_offsets().shape[0] == 3]
    vae = [c for c in pts if np.allclose(np.round(c.get_offsets()[:, 0]), x)]
    assert len(vae) == 1
    np.testing.assert_allclose(np.sort(vae[0].get_offsets()[:, 1]), np.sort(seed_means))
    # mean marker at the mean over seeds
    means = _mean_markers(ax)
    assert means[x] == pytest.approx(seed_means.mean())
    # the CI bar spans the t-interval over the three seeds
    (_, lo), (_, hi) = ax.containers[x].lines[2][0].get_segments()[0]
    half = 4.302653 * seed_means.std(ddof=1) / np.sqrt(3)
    assert (lo, hi) == pytest.approx((seed_means.mean() - half, seed_means.mean() + half), rel=1e-5)
    # baselines are grey, models coloured
    assert vae[0].get_facecolor()[0][:3] != pytest.approx((0.55, 0.55, 0.55))
    assert "lower is better" in ax.get_title()


def test_mean_ci_hand_computed():
    mean, half = _mean_ci(np.array([1.0, 2.0, 3.0]))
    # t_{0.975, 2} = 4.302653; sd = 1; sem = 1/sqrt(3)
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
    assert _mean_ci(np.array([0.7])) == (0.7, 0.0)


def test_lower_is_better():
    for m in ["energy_distance", "mmd", "mse_top_de", "mse_top_de_norm", "l2_top_expressed"]:
        assert lower_is_better(m), m
    for m in ["pearson_delta", "pds", "direction_accuracy", "de_overlap", "interaction_auprc"]:
        assert not lower_is_better(m), m


def test_benchmark_without_ceiling_single_seed_and_no_seed_column(rng, tmp_path):
    res = _results(rng, ceiling=False, seeds=(0,))
    fig = vcell.pl.benchmark(res, return_fig=True)
    assert len(fig.axes) == len(METRICS)
    assert all(ln.get_linestyle() != "--" for a in fig.axes for ln in a.get_lines())
    assert "higher is better" in fig.axes[0].get_title()
    fig = vcell.pl.benchmark(res.drop(columns=["seed", "split"]), metrics=["mmd"], return_fig=True)
    assert len(fig.axes) == 1


def test_benchmark_split_filter_and_ax(rng):
    res = _results(rng)
    fig = vcell.pl.benchmark(res, split="unseen_cell_type:NK", metrics=["mmd"], return_fig=True)
    ax = fig.axes[0]
    expected = res[(res.split == "unseen_cell_type:NK") & (res.metric == "mmd") & (res.model == "control")]["value"]
    assert _mean_markers(ax)[0] == pytest.approx(expected.mean())
    fig, axes = plt.subplots(1, 2)
    assert vcell.pl.benchmark(res, metrics=["mmd", "pearson_delta"], ax=axes, return_fig=True) is fig
    assert axes[1].get_title().startswith("pearson_delta")
    fig, ax = plt.subplots()
    assert vcell.pl.benchmark(res, metrics=["mmd"], ax=ax) is None
    assert ax.get_title().startswith("mmd")


def test_benchmark_errors(rng):
    res = _results(rng)
    with pytest.raises(KeyError, match="'value'"):
        vcell.pl.benchmark(res.drop(columns="value"))
    with pytest.raises(KeyError, match="nope"):
        vcell.pl.benchmark(res, metrics=["nope"])
    with pytest.raises(KeyError, match="combo_seen2"):
        vcell.pl.benchmark(res, split="combo_seen2")
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="one per panel"):
        vcell.pl.benchmark(res, ax=ax)


def test_benchmark_by_split_points_are_split_means_with_legend(rng):
    res = _results(rng)
    fig = vcell.pl.benchmark(res, metrics=["mmd"], by="split", return_fig=True)
    ax = fig.axes[0]
    x = MODELS.index("CausalVAE")
    sub = res[(res.metric == "mmd") & (res.model == "CausalVAE")]
    split_means = sub.groupby("split")["value"].mean().to_numpy()  # one perturbation: mean over seeds
    pts = [c for c in ax.collections if np.allclose(np.round(c.get_offsets()[:, 0]), x)]
    assert len(pts) == 1
    np.testing.assert_allclose(np.sort(pts[0].get_offsets()[:, 1]), np.sort(split_means))
    assert _mean_markers(ax)[x] == pytest.approx(split_means.mean())
    # points coloured by split: three distinct colours, one legend entry per split (kind stripped)
    assert len({tuple(c) for c in pts[0].get_facecolor()}) == 3
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["CD4T", "NK", "B"]
    assert "over 3 splits" in fig.get_suptitle()
    # the default stays one point per seed
    fig = vcell.pl.benchmark(res, metrics=["mmd"], return_fig=True)
    assert "over 3 seeds" in fig.get_suptitle()
    assert not fig.legends


def test_benchmark_by_split_errors(rng):
    res = _results(rng)
    with pytest.raises(ValueError, match="'sample'"):
        vcell.pl.benchmark(res, by="sample")
    with pytest.raises(KeyError, match="split"):
        vcell.pl.benchmark(res.drop(columns="split"), by="split")


def test_benchmark_empty_panel_and_na_notes(rng):
    res = _results(rng)
    pds = res[res.metric == "mmd"].assign(metric="pds", value=np.nan, ceiling=np.nan)
    res = pd.concat([res, pds], ignore_index=True)
    res.loc[(res.metric == "pearson_delta") & (res.model == "control"), "value"] = np.nan
    # rows of failed predictions are not a metric to plot
    err = pd.DataFrame({"model": ["linear"], "split": ["unseen_cell_type:NK"], "metric": ["error"], "value": [np.nan]})
    fig = vcell.pl.benchmark(pd.concat([res, err], ignore_index=True), return_fig=True)
    titles = [a.get_title().splitlines()[0] for a in fig.axes]
    assert titles == [*METRICS, "pds"]
    empty = fig.axes[-1]
    note = " ".join(t.get_text() for t in empty.texts).replace("\n", " ")
    assert "not defined for these splits" in note
    assert "needs ≥ 2 held-out perturbations per split" in note
    assert "here: 1" in note
    assert not empty.collections  # nothing drawn
    # a model without a value in a panel with values gets "n/a" at its place
    ax = fig.axes[0]
    na = [t for t in ax.texts if t.get_text() == "n/a"]
    assert len(na) == 1
    assert na[0].get_position()[0] == MODELS.index("control")
    assert not [t for t in fig.axes[1].texts if t.get_text() == "n/a"]
    assert "n/a = undefined" in fig.get_suptitle()


def test_undefined_note_and_split_labels():
    from vcell.pl._benchmark import describe_splits, short_split_labels, undefined_note

    assert "needs >= 2 held-out perturbations" in undefined_note("pds")
    assert undefined_note("mmd") == "NaN for every model here"
    assert short_split_labels(["unseen_cell_type:B", "unseen_cell_type:NK"]) == {
        "unseen_cell_type:B": "B",
        "unseen_cell_type:NK": "NK",
    }
    assert short_split_labels(["combo_seen1", "combo_seen2"]) == {
        "combo_seen1": "combo_seen1",
        "combo_seen2": "combo_seen2",
    }
    assert describe_splits(["unseen_cell_type:B", "unseen_cell_type:NK", "unseen_cell_type:T"], max_shown=2) == (
        "unseen_cell_type: B, NK, … (3 splits)"
    )
