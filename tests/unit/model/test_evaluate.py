"""Ranking metrics and the missing-modality mask on known inputs (no trained model; tests/integration/test_train_eval.py
trains one)."""

from __future__ import annotations

import numpy as np
import pytest

from fusionrank.model.evaluate import missing_mask
from fusionrank.model.ranking_metrics import coverage, intra_list_diversity, ndcg_recall_at_k


def test_metrics_on_known_rankings():
    users = np.array([0] * 12 + [1] * 12)
    labels = np.zeros(24)
    labels[[0, 12]] = 1
    perfect = -np.arange(24.0)
    ndcg, recall = ndcg_recall_at_k(perfect, labels, users)
    assert ndcg == pytest.approx(1.0) and recall == pytest.approx(1.0)
    worst = np.arange(24.0)  # the clicked item is ranked last of 12: outside the top 10
    assert ndcg_recall_at_k(worst, labels, users) == (0.0, 0.0)
    assert coverage([np.array([1, 2]), np.array([2, 3])], 10) == pytest.approx(0.3)
    vectors = np.eye(4)
    assert intra_list_diversity([np.array([0, 1, 2])], vectors) == pytest.approx(1.0)
    assert intra_list_diversity([np.array([0, 0])], vectors) == pytest.approx(0.0)


def test_missing_mask_removes_exactly_the_share_asked():
    mask = missing_mask(1000, 3, 1, 0.3, seed=0)
    assert (~mask[:, 1]).sum() == 300 and mask[:, [0, 2]].all()
    assert np.array_equal(mask, missing_mask(1000, 3, 1, 0.3, seed=0))
    assert not missing_mask(10, 3, 2, 1.0, seed=0)[:, 2].any()
