from __future__ import annotations

import re

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import vcell

# 2 control, 2 perturbed "A", 1 "B" cell; 3 genes; counts with values > 20 so they are detected as counts
COUNTS = np.array(
    [
        [100.0, 50.0, 30.0],  # control
        [80.0, 60.0, 40.0],  # control
        [200.0, 20.0, 30.0],  # A
        [180.0, 10.0, 50.0],  # A
        [90.0, 90.0, 90.0],  # B
    ],
    dtype=np.float32,
)
PRED = np.array([1.0, 0.0, 3.0])  # predicted delta vs the control mean, per gene


def _log(x):
    return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)


@pytest.fixture
def adata():
    a = ad.AnnData(COUNTS.copy(), var=pd.DataFrame(index=["g0", "g1", "g2"]))
    a.obs_names = [f"c{i}" for i in range(5)]
    a.obs["vcell_perturbation"] = ["control", "control", "A", "A", "B"]
    a.obs["cell_type"] = ["T", "T", "T", "T", "T"]
    ctrl_mean = _log(COUNTS[:2]).mean(axis=0)
    pred = np.full(a.shape, np.nan, dtype=np.float32)
    # predictions on the two control cells; their mean minus the control mean is PRED
    pred[0] = ctrl_mean + PRED + 0.5
    pred[1] = ctrl_mean + PRED - 0.5
    a.layers["vcell_pred"] = pred
    return a


def _expected_r():
    lx = _log(COUNTS)
    true = lx[2:4].mean(axis=0) - lx[:2].mean(axis=0)
    pred = PRED
    t, p = true - true.mean(), pred - pred.mean()
    return float((t * p).sum() / np.sqrt((t * t).sum() * (p * p).sum()))


def _title_r(fig):
    m = re.search(r"Pearson r = (-?[0-9.]+|nan)", fig.axes[0].get_title())
    assert m is not None, fig.axes[0].get_title()
    return float(m.group(1))


def test_prediction_scatter_returns_figure_with_hand_computed_r(adata):
    fig = vcell.pl.prediction_scatter(adata, perturbation="A", return_fig=True)
    assert isinstance(fig, Figure)
    r = _expected_r()
    assert 0.05 < abs(r) < 1  # a non-trivial value
    assert _title_r(fig) == pytest.approx(r, abs=6e-4)
    assert fig.axes[0].get_title().startswith("A: ")
    # the scatter holds one point per gene at (true delta, predicted delta)
    offsets = fig.axes[0].collections[0].get_offsets()
    lx = _log(COUNTS)
    np.testing.assert_allclose(offsets[:, 0], lx[2:4].mean(0) - lx[:2].mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(offsets[:, 1], PRED, atol=1e-5)


def test_prediction_scatter_labels_top_genes(adata):
    fig = vcell.pl.prediction_scatter(adata, perturbation="A", n_label=1, return_fig=True)
    texts = [t.get_text() for t in fig.axes[0].texts]
    lx = _log(COUNTS)
    true = lx[2:4].mean(0) - lx[:2].mean(0)
    assert texts == [f"g{int(np.argmax(np.abs(true)))}"]


def test_prediction_scatter_genes_subset_changes_r(adata):
    fig = vcell.pl.prediction_scatter(adata, perturbation="A", genes=["g0", "g1"], return_fig=True)
    lx = _log(COUNTS)
    true = (lx[2:4].mean(0) - lx[:2].mean(0))[:2]
    # two points: r is +-1 by construction
    expected = np.sign((true[0] - true[1]) * (PRED[0] - PRED[1]))
    assert _title_r(fig) == pytest.approx(expected)
    assert len(fig.axes[0].collections[0].get_offsets()) == 2


def test_prediction_scatter_reads_layer_and_log_data(adata):
    # log data in a layer are passed through; X is ignored
    adata.layers["logged"] = _log(COUNTS).astype(np.float32)
    adata.X = np.zeros_like(COUNTS)
    fig = vcell.pl.prediction_scatter(adata, perturbation="A", layer="logged", return_fig=True)
    assert _title_r(fig) == pytest.approx(_expected_r(), abs=6e-4)


def test_prediction_scatter_save_show_ax(adata, tmp_path):
    out = tmp_path / "scatter.png"
    assert vcell.pl.prediction_scatter(adata, perturbation="A", save=out) is None
    assert out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, axes = plt.subplots(1, 2)
    res = vcell.pl.prediction_scatter(adata, perturbation="A", ax=axes[1], return_fig=True)
    assert res is fig
    assert axes[1].get_title().startswith("A: ")
    assert axes[0].get_title() == ""


def test_prediction_scatter_does_not_modify_adata(adata):
    before = adata.copy()
    vcell.pl.prediction_scatter(adata, perturbation="A")
    np.testing.assert_array_equal(adata.X, before.X)
    assert list(adata.layers.keys()) == list(before.layers.keys())
    assert list(adata.obs.columns) == list(before.obs.columns)


def test_prediction_scatter_groupby(adata):
    fig = vcell.pl.prediction_scatter(adata, perturbation="A", groupby="cell_type", group="T", return_fig=True)
    assert "(T)" in fig.axes[0].get_title()
    with pytest.raises(KeyError, match="'NK'"):
        vcell.pl.prediction_scatter(adata, perturbation="A", groupby="cell_type", group="NK")
    with pytest.raises(ValueError, match="groupby and group"):
        vcell.pl.prediction_scatter(adata, perturbation="A", groupby="cell_type")


def test_prediction_scatter_errors(adata):
    with pytest.raises(KeyError, match="'missing_pred'"):
        vcell.pl.prediction_scatter(adata, perturbation="A", pred_layer="missing_pred")
    with pytest.raises(KeyError, match="'Z'"):
        vcell.pl.prediction_scatter(adata, perturbation="Z")
    with pytest.raises(KeyError, match="'ctrl'"):
        vcell.pl.prediction_scatter(adata, perturbation="A", control="ctrl")
    with pytest.raises(KeyError, match="'condition'"):
        vcell.pl.prediction_scatter(adata, perturbation="A", perturbation_key="condition")
    with pytest.raises(KeyError, match="'counts'"):
        vcell.pl.prediction_scatter(adata, perturbation="A", layer="counts")
    with pytest.raises(KeyError, match="g9"):
        vcell.pl.prediction_scatter(adata, perturbation="A", genes=["g0", "g9"])
    adata.layers["vcell_pred"][:] = np.nan
    with pytest.raises(ValueError, match="no prediction"):
        vcell.pl.prediction_scatter(adata, perturbation="A")
    adata.layers["vcell_pred"][0] = [1.0, np.nan, 2.0]
    with pytest.raises(ValueError, match="partly NaN"):
        vcell.pl.prediction_scatter(adata, perturbation="A")


@pytest.fixture
def deltas():
    return pd.DataFrame(
        {"g0": [0.5, 0.4, 0.0], "g1": [-3.0, -1.0, 0.0], "g2": [2.0, 2.5, 0.0], "g3": [0.1, 0.0, 0.0]},
        index=["true: IFNb|CD4T", "additive", "control"],
    )


def test_delta_heatmap_genes_and_symmetric_limits(deltas, tmp_path):
    fig = vcell.pl.delta_heatmap(deltas, n_genes=3, return_fig=True)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    # top-3 |delta| of the first row, ordered by that delta (descending)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["g2", "g0", "g1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(deltas.index)
    im = ax.images[0]
    assert im.get_clim() == (-3.0, 3.0)
    np.testing.assert_array_equal(im.get_array(), deltas[["g2", "g0", "g1"]].to_numpy())
    # rank by another row
    fig = vcell.pl.delta_heatmap(deltas, n_genes=2, rank_by="additive", return_fig=True)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["g2", "g1"]
    # explicit genes keep their order
    fig = vcell.pl.delta_heatmap(deltas, genes=["g3", "g0"], return_fig=True)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["g3", "g0"]
    assert fig.axes[0].images[0].get_clim() == (-0.5, 0.5)


def test_delta_heatmap_save_and_ax(deltas, tmp_path):
    out = tmp_path / "heatmap.png"
    assert vcell.pl.delta_heatmap(deltas, save=str(out)) is None
    assert out.stat().st_size > 1000
    fig, ax = plt.subplots()
    assert vcell.pl.delta_heatmap(deltas, ax=ax, return_fig=True) is fig
    assert len(ax.images) == 1


def test_delta_heatmap_errors(deltas):
    with pytest.raises(KeyError, match="g9"):
        vcell.pl.delta_heatmap(deltas, genes=["g9"])
    with pytest.raises(KeyError, match="'scgen'"):
        vcell.pl.delta_heatmap(deltas, rank_by="scgen")
    with pytest.raises(ValueError, match="empty"):
        vcell.pl.delta_heatmap(deltas.iloc[:0])
    with pytest.raises(TypeError, match="DataFrame"):
        vcell.pl.delta_heatmap(deltas.to_numpy())


def test_all_zero_deltas_do_not_fail(deltas):
    fig = vcell.pl.delta_heatmap(deltas * 0, return_fig=True)
    assert fig.axes[0].images[0].get_clim() == (-1.0, 1.0)


def test_prediction_scatter_title(adata):
    fig = vcell.pl.prediction_scatter(adata, perturbation="A", title="additive on held-out T (A)", return_fig=True)
    first, second = fig.axes[0].get_title().splitlines()
    assert first == "additive on held-out T (A)"
    assert second.startswith("Pearson r = ")
    assert _title_r(fig) == pytest.approx(_expected_r(), abs=6e-4)


def _hand_deltas(pred_rows):
    lx = _log(COUNTS)
    true = lx[2:4].mean(0) - lx[:2].mean(0)
    return pd.DataFrame([true, *pred_rows.values()], index=["true: A (T)", *pred_rows], columns=["g0", "g1", "g2"])


def test_delta_heatmap_adata_equals_dataframe_route(adata):
    # a second prediction layer: the first one plus 1 everywhere (delta PRED + 1)
    adata.layers["other"] = adata.layers["vcell_pred"] + 1.0
    fig = vcell.pl.delta_heatmap(
        adata,
        perturbation="A",
        pred_layer=["vcell_pred", "other"],
        groupby="cell_type",
        group="T",
        n_genes=2,
        return_fig=True,
    )
    expected = _hand_deltas({"vcell_pred": PRED, "other": PRED + 1.0})
    ref = vcell.pl.delta_heatmap(expected, n_genes=2, return_fig=True)
    ax, ax_ref = fig.axes[0], ref.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["true: A (T)", "vcell_pred", "other"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [t.get_text() for t in ax_ref.get_xticklabels()]
    np.testing.assert_allclose(ax.images[0].get_array(), ax_ref.images[0].get_array(), rtol=1e-5, atol=1e-6)
    assert ax.images[0].get_clim() == pytest.approx(ax_ref.images[0].get_clim(), rel=1e-5)
    # one layer name, no group: the truth row is labelled by the perturbation alone
    fig = vcell.pl.delta_heatmap(adata, perturbation="A", return_fig=True)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["true: A", "vcell_pred"]


def test_delta_heatmap_adata_errors(adata, deltas):
    with pytest.raises(ValueError, match="perturbation is required"):
        vcell.pl.delta_heatmap(adata)
    with pytest.raises(KeyError, match="'missing_pred'"):
        vcell.pl.delta_heatmap(adata, perturbation="A", pred_layer="missing_pred")
    with pytest.raises(KeyError, match="'Z'"):
        vcell.pl.delta_heatmap(adata, perturbation="Z")
    with pytest.raises(ValueError, match="applies to an AnnData"):
        vcell.pl.delta_heatmap(deltas, perturbation="A")
    with pytest.raises(TypeError, match="AnnData"):
        vcell.pl.delta_heatmap([1, 2])
