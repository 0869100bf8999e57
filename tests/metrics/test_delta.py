from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from vcell.metrics import (
    direction_accuracy,
    l2_top_expressed,
    mse_top_de,
    mse_top_de_normalized,
    pds,
    pearson_delta,
    perturbed_centroid_reference,
)


def test_pearson_delta_perfect_and_anticorrelated(rng):
    ref = rng.normal(size=50)
    true = ref + rng.normal(size=50)
    assert pearson_delta(true, true, ref) == pytest.approx(1.0)
    assert pearson_delta(2 * true - ref, true, ref) == pytest.approx(1.0)  # scale-free
    assert pearson_delta(2 * ref - true, true, ref) == pytest.approx(-1.0)


def test_pearson_delta_hand_computed_and_genes():
    ref = np.zeros(4)
    pred = np.array([1.0, 2.0, 3.0, 100.0])
    true = np.array([1.0, 3.0, 2.0, -5.0])
    # over genes 0..2: x = (1, 2, 3), y = (1, 3, 2) -> r = 0.5
    assert pearson_delta(pred, true, ref, genes=[0, 1, 2]) == pytest.approx(0.5)
    assert pearson_delta(pred, true, ref, genes=np.array([True, True, True, False])) == pytest.approx(0.5)


def test_pearson_delta_takes_cell_means_and_sparse(rng):
    cells = rng.normal(size=(10, 6))
    ref = rng.normal(size=6)
    mean = cells.mean(axis=0)
    target = mean + rng.normal(size=6)
    assert pearson_delta(cells, target, ref) == pytest.approx(pearson_delta(mean, target, ref))
    assert pearson_delta(sparse.csr_matrix(cells), target, ref) == pytest.approx(pearson_delta(mean, target, ref))


def test_pearson_delta_constant_is_nan():
    ref = np.ones(5)
    assert np.isnan(pearson_delta(ref, np.arange(5.0), ref))  # "no change" prediction


def test_pearson_delta_bad_input():
    with pytest.raises(ValueError, match="genes"):
        pearson_delta(np.zeros(3), np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="outside"):
        pearson_delta(np.arange(3.0), np.arange(3.0), np.zeros(3), genes=[5])


def test_perturbed_centroid_reference():
    means = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    np.testing.assert_allclose(perturbed_centroid_reference(means), [2.0, 3.0])
    with pytest.raises(ValueError, match="n_perturbations"):
        perturbed_centroid_reference(np.zeros(3))


def test_mse_top_de():
    pred = np.array([1.0, 2.0, 3.0])
    true = np.array([1.0, 0.0, 0.0])
    assert mse_top_de(pred, pred, genes=[0, 1]) == 0.0
    assert mse_top_de(pred, true, genes=[1, 2]) == pytest.approx((4 + 9) / 2)
    assert mse_top_de(pred, true) == pytest.approx(13 / 3)


def test_mae():
    from vcell.metrics import mae

    assert mae(np.array([1.0, 2.0, 0.0]), np.array([1.0, 0.0, 1.0])) == 1.0
    assert mae(np.array([1.0, 2.0, 0.0]), np.array([1.0, 0.0, 1.0]), genes=[1]) == 2.0
    cells = np.array([[0.0, 4.0], [2.0, 0.0]])  # the mean of the cells is compared
    assert mae(cells, np.array([1.0, 1.0])) == 0.5
    assert np.isnan(mae(np.ones(2), np.ones(2), genes=[]))
    with pytest.raises(ValueError, match="genes"):
        mae(np.ones(2), np.ones(3))


def test_mse_top_de_normalized():
    true = np.array([2.0, 2.0])
    ctrl = np.zeros(2)
    assert mse_top_de_normalized(true, true, ctrl) == 0.0
    assert mse_top_de_normalized(ctrl, true, ctrl) == 1.0
    assert mse_top_de_normalized(np.array([1.0, 1.0]), true, ctrl) == pytest.approx(0.25)
    assert np.isnan(mse_top_de_normalized(np.ones(2), ctrl, ctrl))  # control baseline is perfect: undefined


def test_l2_top_expressed():
    pred = np.array([3.0, 0.0, 100.0])
    true = np.array([0.0, 4.0, 0.0])
    # genes 0 and 1 are the most expressed -> sqrt(9 + 16)
    assert l2_top_expressed(pred, true, expressed_mean=[5.0, 4.0, 1.0], n_top=2) == pytest.approx(5.0)
    assert l2_top_expressed(true, true, expressed_mean=[1.0, 2.0, 3.0]) == 0.0
    with pytest.raises(ValueError, match="n_top"):
        l2_top_expressed(pred, true, expressed_mean=[1.0, 2.0, 3.0], n_top=0)


def test_direction_accuracy():
    ref = np.zeros(4)
    true = np.array([1.0, -2.0, 3.0, -0.5])
    assert direction_accuracy(true, true, ref) == 1.0
    assert direction_accuracy(-true, true, ref) == 0.0  # sign flip
    assert direction_accuracy(np.array([1.0, 2.0, 0.0, -1.0]), true, ref) == 0.5  # a zero change counts as wrong
    assert direction_accuracy(-true, true, ref, genes=[0]) == 0.0
    # genes with no true change are left out
    assert direction_accuracy(np.ones(2), np.array([1.0, 0.0]), np.zeros(2)) == 1.0
    assert np.isnan(direction_accuracy(np.ones(2), np.zeros(2), np.zeros(2)))


def test_pds_perfect_and_hand_computed():
    true = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    np.testing.assert_allclose(pds(true, true), [1.0, 1.0, 1.0])
    pred = np.array([[2.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    # row 0: distances to true rows = (2, 0, 5) -> one closer -> 1 - 1/3
    np.testing.assert_allclose(pds(pred, true), [2 / 3, 1.0, 1.0])


def test_pds_ties_count_half():
    true = np.ones((4, 3))
    np.testing.assert_allclose(pds(true, true), np.full(4, 1 - 1.5 / 4))


def test_pds_target_gene_excluded():
    true = np.array([[5.0, 0.0], [0.0, 0.0]])
    pred = np.zeros((2, 2))
    np.testing.assert_allclose(pds(pred, true), [0.5, 1.0])
    # without the target column, row 0 is tied between both perturbations
    np.testing.assert_allclose(pds(pred, true, target_gene_idx=[0, -1]), [0.75, 1.0])
    np.testing.assert_allclose(pds(pred, true, target_gene_idx=[[0], []]), [0.75, 1.0])
    with pytest.raises(ValueError, match="one per perturbation"):
        pds(pred, true, target_gene_idx=[0])


def test_pds_random_is_about_half():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(300, 20))
    pred = rng.normal(size=(300, 20))
    assert pds(pred, true).mean() == pytest.approx(0.5, abs=0.05)


def test_pds_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        pds(np.zeros((2, 3)), np.zeros((3, 3)))


def test_round_off_changes_count_as_no_change(rng):
    ref = rng.uniform(0, 5, 30)
    true = ref + rng.normal(size=30)
    pred = (ref.astype(np.float32) + np.float32(0)).astype(np.float64) + 1e-9 * rng.normal(size=30)
    assert np.isnan(pearson_delta(pred, true, ref))
    assert direction_accuracy(pred, true, ref) == 0.0
