from __future__ import annotations

import numpy as np
import pytest

from vcell.metrics import interaction_auprc, nonadditivity


@pytest.fixture
def combos():
    additive = np.zeros((6, 3))
    true = np.array(
        [[0.0, 0.0, 0.1], [3.0, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 5.0]]
    )
    return additive, true


def test_nonadditivity():
    np.testing.assert_allclose(nonadditivity([[3.0, 4.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 1.0]]), [5.0, 0.0])


def test_interaction_auprc_perfect_and_no_interaction(combos):
    additive, true = combos
    assert interaction_auprc(true, additive, true) == pytest.approx(1.0)
    # predicting the additive expectation ties every score: AP = prevalence = 0.5 with the median threshold
    assert interaction_auprc(additive, additive, true) == pytest.approx(0.5)


def test_interaction_auprc_hand_computed(combos):
    additive, _ = combos
    labels = np.array([True, False, True, False, False, False])
    pred = np.zeros((6, 3))
    pred[:3, 0] = [3.0, 2.0, 1.0]  # ranking: pos, neg, pos, then three tied negatives
    # AP = 0.5 * 1 + 0.5 * 2/3
    assert interaction_auprc(pred, additive, labels=labels) == pytest.approx(0.5 + 1 / 3)


def test_interaction_auprc_threshold_and_errors(combos):
    additive, true = combos
    # threshold 4.5: only the last combo is non-additive, and it has the largest predicted norm
    assert interaction_auprc(true, additive, true, threshold=4.5) == pytest.approx(1.0)
    assert np.isnan(interaction_auprc(true, additive, true, threshold=10.0))
    with pytest.raises(ValueError, match="boolean"):
        interaction_auprc(true, additive, labels=[1, 0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="true_double"):
        interaction_auprc(true, additive)
    with pytest.raises(ValueError, match="same shape"):
        interaction_auprc(true[:2], additive, true)
