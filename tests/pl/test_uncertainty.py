from __future__ import annotations

import re

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

import vcell
from vcell._utils import log1p_cp10k

GENES = ["g0", "g1", "g2", "g3", "g4"]
# perturbation A: intervals [0, 1], [0, 2], ..., [0, 5] (widths 1..5), means at their middles
LOWER_A = np.zeros(5)
UPPER_A = np.arange(1.0, 6.0)
MEAN_A = UPPER_A / 2
# real cells of A: 10 cells valued 0, 0.5, ..., 4.5 in every gene
REAL = np.repeat((0.5 * np.arange(10.0))[:, None], 5, axis=1)
# cells <= upper: 3 (0, 0.5, 1), 5, 7, 9, 10 out of 10
COVERAGE_A = np.array([0.3, 0.5, 0.7, 0.9, 1.0])


def _sampled(perturbations=("A", "B"), level=0.9) -> ad.AnnData:
    sampled = ad.AnnData(np.zeros((4, 5), dtype=np.float32), var=pd.DataFrame(index=GENES))
    sampled.obs["perturbation"] = pd.Categorical(np.resize(list(perturbations), 4))
    shift = {p: float(i) for i, p in enumerate(perturbations)}
    for part, values in (("lower", LOWER_A), ("upper", UPPER_A), ("mean", MEAN_A)):
        sampled.varm[f"vcell_sample_{part}"] = pd.DataFrame({p: values + shift[p] for p in perturbations}, index=GENES)
    if level is not None:
        sampled.uns["vcell_sample"] = {"params": {"level": level}}
    return sampled


def _xlabels(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_xticklabels()]


def _interval_segments(fig: Figure) -> np.ndarray:
    (lines,) = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    return np.array([seg[:, 1] for seg in lines.get_segments()])  # (lower, upper) per gene


def _title_coverage(fig: Figure) -> float:
    m = re.search(r"coverage of (\d+) real cells = ([0-9.]+)", fig.axes[0].get_title())
    assert m is not None, fig.axes[0].get_title()
    return float(m.group(2))


def test_returns_figure_with_widest_intervals_first():
    fig = vcell.pl.uncertainty(_sampled(), REAL, perturbation="A", return_fig=True)
    assert isinstance(fig, Figure)
    assert _xlabels(fig) == ["g4", "g3", "g2", "g1", "g0"]  # 5 genes < n_genes=12, widest first
    np.testing.assert_allclose(_interval_segments(fig), np.column_stack([LOWER_A, UPPER_A])[::-1])
    # the mean markers: the last scatter, at (position, mean)
    offsets = fig.axes[0].collections[-1].get_offsets()
    np.testing.assert_allclose(offsets, np.column_stack([np.arange(5), MEAN_A[::-1]]))
    title = fig.axes[0].get_title()
    assert title.startswith("A: 90% predictive interval")


def test_n_genes_and_genes():
    fig = vcell.pl.uncertainty(_sampled(), perturbation="A", n_genes=3, return_fig=True)
    assert _xlabels(fig) == ["g4", "g3", "g2"]
    plt.close(fig)
    fig = vcell.pl.uncertainty(_sampled(), perturbation="B", genes=["g1", "g3"], return_fig=True)
    assert _xlabels(fig) == ["g1", "g3"]
    np.testing.assert_allclose(_interval_segments(fig), [[1.0, 3.0], [1.0, 5.0]])  # B = A + 1


def test_coverage_in_title_and_per_gene():
    fig = vcell.pl.uncertainty(_sampled(), REAL, perturbation="A", genes=GENES, return_fig=True)
    assert _title_coverage(fig) == pytest.approx(COVERAGE_A.mean())  # 0.68
    assert "coverage of 10 real cells" in fig.axes[0].get_title()
    per_gene = [t.get_text() for t in fig.axes[0].texts]
    assert per_gene == [f"{c:.2f}" for c in COVERAGE_A]
    # 10 cells x 5 genes drawn: inside and outside the interval (3 + 5 + 7 + 9 + 10 = 34 inside)
    inside, outside = fig.axes[0].collections[:2]
    assert len(inside.get_offsets()) == 34
    assert len(outside.get_offsets()) == 16


def test_without_real_and_single_perturbation():
    fig = vcell.pl.uncertainty(_sampled(perturbations=("A",)), return_fig=True)
    assert fig.axes[0].get_title() == "A: 90% predictive interval"
    assert len(fig.axes[0].texts) == 0
    assert len(fig.axes[0].collections) == 2  # intervals and means only


def test_level_missing_from_uns():
    fig = vcell.pl.uncertainty(_sampled(level=None), perturbation="A", return_fig=True)
    assert fig.axes[0].get_title() == "A: predictive interval"
    fig = vcell.pl.uncertainty(_sampled(level=0.5), perturbation="A", return_fig=True)
    assert fig.axes[0].get_title() == "A: 50% predictive interval"


def test_real_anndata_with_log_data_and_perturbation_key():
    # log data pass through; genes matched by name (real: other order, one gene more); other cells dropped
    values = np.vstack([REAL, np.full((5, 5), 100.0)])
    real = ad.AnnData(
        np.column_stack([values[:, ::-1], np.zeros(15)]).astype(np.float32),
        var=pd.DataFrame(index=[*GENES[::-1], "extra"]),
    )
    real.obs["condition"] = ["A"] * 10 + ["other"] * 5
    fig = vcell.pl.uncertainty(
        _sampled(), real, perturbation="A", genes=GENES, perturbation_key="condition", return_fig=True
    )
    assert _title_coverage(fig) == pytest.approx(COVERAGE_A.mean())
    with pytest.raises(KeyError, match="'B' labels no cells"):
        vcell.pl.uncertainty(_sampled(), real, perturbation="B", perturbation_key="condition")
    with pytest.raises(KeyError, match="'missing'"):
        vcell.pl.uncertainty(_sampled(), real, perturbation="A", perturbation_key="missing")


def test_real_anndata_counts_are_normalised(rng):
    counts = rng.poisson(40.0, size=(30, 5)).astype(np.float32)
    real = ad.AnnData(counts, var=pd.DataFrame(index=GENES))
    logged = log1p_cp10k(counts)
    sampled = _sampled(perturbations=("A",))
    lower = np.quantile(logged, 0.2, axis=0)
    upper = np.quantile(logged, 0.8, axis=0)
    sampled.varm["vcell_sample_lower"] = pd.DataFrame({"A": lower}, index=GENES)
    sampled.varm["vcell_sample_upper"] = pd.DataFrame({"A": upper}, index=GENES)
    fig = vcell.pl.uncertainty(sampled, real, return_fig=True)
    expected = vcell.metrics.interval_coverage(logged, lower, upper)
    assert expected < 1.0
    assert _title_coverage(fig) == pytest.approx(expected, abs=0.005)


def test_save_ax_and_input_unchanged(tmp_path):
    sampled = _sampled()
    before = sampled.copy()
    out = tmp_path / "uncertainty.png"
    assert vcell.pl.uncertainty(sampled, REAL, perturbation="A", save=out) is None
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, axes = plt.subplots(1, 2)
    assert vcell.pl.uncertainty(sampled, perturbation="A", ax=axes[1], return_fig=True) is fig
    assert axes[1].get_title().startswith("A: ")
    assert axes[0].get_title() == ""
    assert list(sampled.varm.keys()) == list(before.varm.keys())
    pd.testing.assert_frame_equal(sampled.varm["vcell_sample_upper"], before.varm["vcell_sample_upper"])
    assert list(sampled.obs.columns) == list(before.obs.columns)


def test_jitter_is_seeded():
    def offsets(seed):
        fig = vcell.pl.uncertainty(_sampled(), REAL, perturbation="A", seed=seed, return_fig=True)
        out = np.vstack([c.get_offsets() for c in fig.axes[0].collections[:2]])
        plt.close(fig)
        return out

    np.testing.assert_array_equal(offsets(0), offsets(0))
    assert not np.array_equal(offsets(0), offsets(1))


def test_missing_varm_keys():
    sampled = _sampled()
    del sampled.varm["vcell_sample_upper"]
    with pytest.raises(KeyError, match=r"'vcell_sample_upper'.*vcell\.tl\.sample_perturbation"):
        vcell.pl.uncertainty(sampled, perturbation="A")
    with pytest.raises(KeyError, match="'other_lower'"):
        vcell.pl.uncertainty(_sampled(), perturbation="A", key="other")


def test_perturbation_errors():
    with pytest.raises(ValueError, match=r"2 perturbations \['A', 'B'\].*perturbation="):
        vcell.pl.uncertainty(_sampled())
    with pytest.raises(KeyError, match="'Z'.*available: \\['A', 'B'\\]"):
        vcell.pl.uncertainty(_sampled(), perturbation="Z")


def test_gene_and_shape_errors():
    with pytest.raises(KeyError, match="'zz'"):
        vcell.pl.uncertainty(_sampled(), perturbation="A", genes=["g0", "zz"])
    with pytest.raises(ValueError, match="n_genes"):
        vcell.pl.uncertainty(_sampled(), perturbation="A", n_genes=0)
    with pytest.raises(ValueError, match="real has 3 genes"):
        vcell.pl.uncertainty(_sampled(), REAL[:, :3], perturbation="A")
    real = ad.AnnData(REAL[:, :2].astype(np.float32), var=pd.DataFrame(index=["g0", "g1"]))
    with pytest.raises(KeyError, match="'g2'.*real.var_names"):
        vcell.pl.uncertainty(_sampled(), real, perturbation="A")
    with pytest.raises(ValueError, match="pass real="):
        vcell.pl.uncertainty(_sampled(), perturbation="A", perturbation_key="condition")
    with pytest.raises(ValueError, match="AnnData real"):
        vcell.pl.uncertainty(_sampled(), REAL, perturbation="A", layer="counts")


def test_input_type_errors():
    with pytest.raises(TypeError, match="sampled must be an AnnData"):
        vcell.pl.uncertainty(np.zeros((3, 5)))
    sampled = _sampled()
    sampled.varm["vcell_sample_mean"] = np.zeros((5, 2))
    with pytest.raises(ValueError, match="'vcell_sample_mean'.*DataFrame"):
        vcell.pl.uncertainty(sampled, perturbation="A")
