from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse, stats

from vcell.metrics import de_genes_fdr, de_overlap, evaluate, top_de_genes
from vcell.metrics._de import ControlRanks, de_stats, significant


@pytest.fixture
def planted(rng):
    ctrl = rng.normal(2.0, 0.3, size=(80, 12))
    shift = np.zeros(12)
    shift[[3, 7, 9]] = [0.3, -0.6, 0.15]
    pert = rng.normal(2.0, 0.3, size=(60, 12)) + shift
    return pert, ctrl


def _sparse_cells(rng, n, density, shift=0.0):
    """Rounded sparse expression: many ties (zeros and repeated values), as in log1p counts."""
    X = rng.gamma(2.0, 0.6, (n, density.size)) * (rng.random((n, density.size)) < density) + shift
    return np.round(np.clip(X, 0, None), 1).astype(np.float32)


def _reference(cells, ctrl, fdr=0.05):
    """Independent reference: scipy's Mann-Whitney U gene by gene, BH, cell-eval's ranking of the FDR list."""
    x, c = np.asarray(cells, dtype=np.float64), np.asarray(ctrl, dtype=np.float64)
    p = np.array([stats.mannwhitneyu(x[:, j], c[:, j], method="asymptotic").pvalue for j in range(x.shape[1])])
    p = np.nan_to_num(p, nan=1.0)
    q = stats.false_discovery_control(p, method="bh")
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2(np.expm1(x.mean(0)) / np.expm1(c.mean(0)))
    lfc[np.isnan(lfc)] = 0.0
    sig = np.flatnonzero(q < fdr)
    z = np.abs(stats.norm.isf(p / 2))  # |z| as the p-value orders it (ties of |log2 fold change| go to the larger)
    return p, q, np.array(sorted(sig, key=lambda g: (-np.float32(abs(lfc[g])), -z[g], g)), dtype=np.int64)


def test_rank_sum_test_equals_scipy_gene_by_gene(rng):
    density = rng.uniform(0.02, 0.9, 40)
    density[:3] = 0.0  # never expressed in the controls (and switched on in some groups)
    ctrl = _sparse_cells(rng, 150, density)
    ctrl[:, 3] = 1.5  # constant in both control and groups: every value tied, p = 1
    groups = {}
    for i, n in enumerate([1, 2, 5, 17, 30]):
        d = density.copy()
        d[rng.choice(40, 4, replace=False)] = 0.0  # rare genes silent in the group
        d[:3] = 0.4 if i % 2 else 0.0
        shift = np.zeros(40)
        shift[rng.choice(np.arange(4, 40), 6, replace=False)] = rng.choice([-1.0, 1.0], 6)
        groups[f"p{i}"] = _sparse_cells(rng, n, d, shift)
        groups[f"p{i}"][:, 3] = 1.5
    ranks = ControlRanks(sparse.csr_matrix(ctrl))
    n_sig = 0
    for key, cells in groups.items():
        s = de_stats({key: cells}, ranks)[key]
        p, q, sig = _reference(cells, ctrl)
        np.testing.assert_allclose(s.pvals, p, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(s.pvals_adj, q, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(significant(s, 0.05), sig)
        assert s.pvals[3] == 1.0
        assert s.scores[3] == 0.0
        u1 = stats.mannwhitneyu(cells.astype(np.float64), ctrl.astype(np.float64), method="asymptotic").statistic
        np.testing.assert_array_equal(np.sign(s.scores), np.sign(u1 - len(cells) * len(ctrl) / 2))
        n_sig += sig.size
    assert n_sig > 10  # the comparison covers significant genes too
    # the same numbers from dense, sparse and one-cell-block controls
    dense = de_stats(groups, ctrl)
    for key, cells in groups.items():
        s = de_stats({key: sparse.csr_matrix(cells)}, ranks)[key]
        for a, b in zip(s, dense[key], strict=True):
            np.testing.assert_array_equal(a, b)


def test_rank_sum_test_reads_backed_controls(rng, tmp_path):
    density = rng.uniform(0.05, 0.9, 15)
    ctrl = _sparse_cells(rng, 60, density)
    cells = _sparse_cells(rng, 9, density, shift=np.r_[1.0, np.zeros(14)])
    path = tmp_path / "ctrl.h5ad"
    ad.AnnData(sparse.csr_matrix(ctrl)).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    s_backed = de_stats({"p": cells}, backed.X)["p"]
    s_mem = de_stats({"p": cells}, ctrl)["p"]
    backed.file.close()
    np.testing.assert_array_equal(s_backed.pvals, s_mem.pvals)
    np.testing.assert_array_equal(s_backed.log2fc, s_mem.log2fc)


def test_top_de_genes_ranks_by_absolute_z(planted):
    pert, ctrl = planted
    top = top_de_genes(pert, ctrl, n_top=3)
    assert top.dtype.kind == "i"
    assert list(top) == [7, 3, 9]  # the down-regulated gene is the most separated
    full = top_de_genes(pert, ctrl, n_top=None)
    assert sorted(full) == list(range(12))
    np.testing.assert_array_equal(top_de_genes(ctrl, pert, n_top=None), full)  # |z| is symmetric


def test_top_de_genes_sparse_input_and_no_mutation(planted):
    pert, ctrl = planted
    before = pert.copy()
    dense = top_de_genes(pert, ctrl, n_top=3)
    sp = top_de_genes(sparse.csr_matrix(pert), sparse.csr_matrix(ctrl), n_top=3)
    np.testing.assert_array_equal(dense, sp)
    np.testing.assert_array_equal(pert, before)


def test_de_genes_fdr_are_ranked_by_absolute_log_fold_change(rng):
    ctrl = rng.normal(2.0, 0.3, size=(80, 12))
    shift = np.zeros(12)
    shift[[3, 7, 9]] = [1.5, -1.0, 0.8]
    pert = rng.normal(2.0, 0.3, size=(60, 12)) + shift
    for fdr in (0.05, 1e-6):
        sig = de_genes_fdr(pert, ctrl, fdr=fdr)
        _, _, expected = _reference(pert.astype(np.float32), ctrl.astype(np.float32), fdr)
        np.testing.assert_array_equal(sig, expected)
        assert list(sig[:3]) == [3, 7, 9]  # |log2 fold change| of expm1 means: +1.5 beats -1.0
    with pytest.raises(ValueError, match="fdr"):
        de_genes_fdr(pert, ctrl, fdr=0)


def test_rare_genes_silent_in_a_small_group_are_not_de(rng):
    """Case (a) of issue 21: a Welch t-test calls them DE (zero variance in the group), a rank test does not."""
    density = np.full(30, 0.6)
    density[:6] = 0.08  # rare genes: expressed in 8% of controls
    ctrl = _sparse_cells(rng, 400, density)
    shift = np.zeros(30)
    shift[20:24] = [1.5, 1.2, 1.0, 0.8]
    d = density.copy()
    d[:6] = 0.0  # all 17 perturbed cells are zero there (the MYC case)
    pert = _sparse_cells(rng, 17, d, shift)
    sig = de_genes_fdr(pert, ctrl)
    assert not set(sig) & set(range(6))
    assert set(sig) <= set(range(20, 24))
    assert set(top_de_genes(pert, ctrl, n_top=4)) == set(range(20, 24))


def _ad(X, label):
    obs = pd.DataFrame({"perturbation": [label] * len(X)}, index=[f"{label}{i}" for i in range(len(X))])
    return ad.AnnData(np.asarray(X, dtype=np.float32), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(20)]))


@pytest.fixture
def two_de_genes():
    """Control cells and true cells with genes 0 and 1 strongly DE (the only true DE genes)."""
    rng = np.random.default_rng(1)  # a draw without chance DE genes
    ctrl = rng.normal(3.0, 0.5, size=(200, 20)).clip(0)
    shift = np.zeros(20)
    shift[:2] = [2.0, -1.5]
    true = (rng.normal(3.0, 0.5, size=(40, 20)) + shift).clip(0)
    assert list(de_genes_fdr(true, ctrl)) == [0, 1]
    return ctrl, true


def test_predicted_de_list_is_filtered_by_fdr(two_de_genes):
    """Case (b): a gene whose predicted change is not significant does not count, however it ranks."""
    ctrl, true = two_de_genes
    pred = ctrl.copy()
    pred[:, 0] += 2.0  # gene 0 predicted right
    pred[:, 1] -= 0.01  # gene 1: a tiny, non-significant change (the second largest |t|, all others are 0)
    v = evaluate(_ad(pred, "A"), _ad(true, "A"), _ad(ctrl, "ctrl"), metrics=["de_overlap"])["value"]
    assert v.item() == 0.5


def test_prediction_without_signal_scores_zero(two_de_genes):
    """Case (c): the control cells as the prediction have no DE genes: overlap 0, not gene order or chance."""
    ctrl, true = two_de_genes
    v = evaluate(_ad(ctrl, "A"), _ad(true, "A"), _ad(ctrl, "ctrl"), metrics=["de_overlap"])["value"]
    assert v.item() == 0.0
    perfect = evaluate(_ad(true, "A"), _ad(true, "A"), _ad(ctrl, "ctrl"), metrics=["de_overlap"])["value"]
    assert perfect.item() == 1.0


def test_de_errors(planted):
    pert, ctrl = planted
    with pytest.raises(ValueError, match="at least 1 cell"):
        top_de_genes(pert[:0], ctrl)
    with pytest.raises(ValueError, match="at least 2 cells"):
        top_de_genes(pert, ctrl[:1])
    with pytest.raises(ValueError, match="genes"):
        top_de_genes(pert[:, :5], ctrl)
    with pytest.raises(ValueError, match="2-D"):
        top_de_genes(pert[0], ctrl)


def test_one_cell_is_tested_and_never_significant(planted):
    pert, ctrl = planted
    s = de_stats({"one": pert[:1]}, ctrl)["one"]
    assert np.isfinite(s.scores).all()
    assert s.pvals_adj.min() > 0.05  # one cell among 80 controls: |z| <= 1.7
    assert de_genes_fdr(pert[:1], ctrl).size == 0


def test_de_overlap():
    assert de_overlap([1, 2, 3], [3, 2, 1]) == 1.0
    assert de_overlap([3, 1, 2, 0], [1, 2]) == 0.5  # top-2 predicted = {3, 1}
    assert de_overlap([5, 6], [1, 2]) == 0.0
    assert de_overlap([], [1, 2]) == 0.0  # no predicted DE genes
    assert de_overlap([1, 9, 2], [1, 2, 3], k=2) == 0.5
    assert de_overlap([1, 9, 2], [1, 2], k=50) == 0.5  # k capped at the true DE genes (cell-eval's overlap_at_50)
    assert np.isnan(de_overlap([1, 2], []))
    with pytest.raises(ValueError, match="k"):
        de_overlap([1], [1], k=-1)


def cell_eval_dataset():
    """A fixed dataset (controls, true and predicted cells per perturbation) that cell-eval 0.8.2 scored."""
    rng = np.random.default_rng(2021)
    density = rng.uniform(0.02, 0.9, 60)
    density[:4] = 0.0
    ctrl = _sparse_cells(rng, 300, density)
    true, pred = {}, {}
    for i, n in enumerate([3, 8, 17, 25, 40]):
        shift = np.zeros(60)
        shift[rng.choice(60, 8, replace=False)] = rng.uniform(0.5, 2.0, 8)
        d = density.copy()
        d[rng.choice(np.arange(4, 60), 4, replace=False)] = 0.0
        d[:4] = 0.5 if i % 2 else 0.0
        true[f"p{i}"] = _sparse_cells(rng, n, d, shift)
        noisy = true[f"p{i}"] + rng.normal(0.0, 0.4, true[f"p{i}"].shape)
        pred[f"p{i}"] = np.round(np.clip(noisy, 0, None), 1).astype(np.float32)
    return ctrl, true, pred


#: cell-eval 0.8.2 on :func:`cell_eval_dataset` (``benchmarks/cell_eval_crosscheck.py --fixture``): per perturbation,
#: ``overlap_at_N``, ``mae`` and the number of true DE genes (FDR < 0.05)
CELL_EVAL_0_8_2 = {
    "p0": (1 / 3, 0.16777779161930084, 3),
    "p1": (7 / 10, 0.14812499284744263, 10),
    "p2": (7 / 11, 0.11029411107301712, 11),
    "p3": (9 / 12, 0.0981999933719635, 12),
    "p4": (5 / 10, 0.11566666513681412, 10),
}


def test_equals_cell_eval_on_a_fixed_dataset():
    ctrl, true, pred = cell_eval_dataset()

    def stack(groups):
        X = np.vstack(list(groups.values()))
        obs = pd.DataFrame({"perturbation": [p for p, x in groups.items() for _ in x]})
        obs.index = obs.index.astype(str)
        return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(ctrl.shape[1])]))

    df = evaluate(stack(pred), stack(true), stack({"ctrl": ctrl}), metrics=["de_overlap", "mae"])
    v = df.pivot(index="perturbation", columns="metric")["value"]
    for p, (overlap, mae, n_de) in CELL_EVAL_0_8_2.items():
        assert v.loc[p, "de_overlap"] == pytest.approx(overlap, abs=1e-12)
        assert v.loc[p, "mae"] == pytest.approx(mae, rel=1e-6)  # cell-eval averages in float32
        assert de_genes_fdr(true[p], ctrl).size == n_de
