from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from vcell.metrics import de_genes_fdr, de_overlap, top_de_genes
from vcell.metrics._de import de_stats


@pytest.fixture
def planted(rng):
    ctrl = rng.normal(2.0, 0.3, size=(80, 12))
    shift = np.zeros(12)
    shift[[3, 7, 9]] = [1.5, -2.5, 0.8]
    pert = rng.normal(2.0, 0.3, size=(60, 12)) + shift
    return pert, ctrl


def test_top_de_genes_ranks_by_absolute_score(planted):
    pert, ctrl = planted
    top = top_de_genes(pert, ctrl, n_top=3)
    assert top.dtype.kind == "i"
    assert list(top) == [7, 3, 9]  # the down-regulated gene has the largest |score|
    full = top_de_genes(pert, ctrl, n_top=None)
    assert sorted(full) == list(range(12))


def test_top_de_genes_sparse_input_and_no_mutation(planted):
    pert, ctrl = planted
    before = pert.copy()
    dense = top_de_genes(pert, ctrl, n_top=3)
    sp = top_de_genes(sparse.csr_matrix(pert), sparse.csr_matrix(ctrl), n_top=3)
    np.testing.assert_array_equal(dense, sp)
    np.testing.assert_array_equal(pert, before)


def _bh(p):
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    adj = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(p)
    out[order] = np.minimum(adj, 1)
    return out


def test_de_genes_fdr_matches_welch_t_test_with_bh(planted):
    from scipy import stats

    pert, ctrl = planted
    pvals = stats.ttest_ind(pert, ctrl, equal_var=False).pvalue
    for fdr in (0.05, 1e-6):
        expected = set(np.flatnonzero(_bh(pvals) < fdr))
        sig = de_genes_fdr(pert, ctrl, fdr=fdr)
        assert set(sig) == expected
        assert {3, 7, 9} <= set(sig)
        assert sig[0] == 7
    with pytest.raises(ValueError, match="fdr"):
        de_genes_fdr(pert, ctrl, fdr=0)


def test_de_errors(planted):
    pert, ctrl = planted
    with pytest.raises(ValueError, match="at least 2"):
        top_de_genes(pert[:1], ctrl)
    with pytest.raises(ValueError, match="method"):
        top_de_genes(pert, ctrl, method="magic")
    with pytest.raises(ValueError, match="genes"):
        top_de_genes(pert[:, :5], ctrl)


def test_de_overlap():
    assert de_overlap([1, 2, 3], [3, 2, 1]) == 1.0
    assert de_overlap([3, 1, 2, 0], [1, 2]) == 0.5  # top-2 predicted = {3, 1}
    assert de_overlap([5, 6], [1, 2]) == 0.0
    assert de_overlap([1, 9, 2], [1, 2, 3], k=2) == 0.5
    assert np.isnan(de_overlap([1, 2], []))


def test_constant_genes_do_not_dominate_a_shifted_prediction(rng):
    ctrl = rng.normal(2.0, 0.5, size=(60, 6)).astype(np.float32)
    ctrl[:, 0] = 0.0  # never expressed in control
    shift = np.array([0.01, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=np.float32)
    pred = ctrl + shift  # deterministic shift: gene 0 stays constant, up to float round-off
    scores, pvals_adj = de_stats({"p": pred}, ctrl)["p"]
    assert scores[0] == 0.0
    assert pvals_adj[0] == 1.0
    assert top_de_genes(pred, ctrl, n_top=1)[0] == 2
    assert 0 not in de_genes_fdr(pred, ctrl)
