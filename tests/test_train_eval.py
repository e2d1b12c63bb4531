"""Training writes a usable checkpoint; evaluation reports every metric beside the oracle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusionrank.evaluate import COLUMNS, evaluate_all
from fusionrank.metrics import coverage, intra_list_diversity, ndcg_recall_at_k

pytestmark = pytest.mark.slow


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


def test_evaluate_reports_fused_baselines_and_oracle(ci_spec, ci_checkpoint, tmp_path):
    report = evaluate_all(ci_spec, fusions=["concat"], progress=False)
    names = [r["model"] for r in report.rows]
    assert names == ["concat", "text_only", "image_only", "audio_only", "oracle (true probabilities)",
                     "oracle without personal taste"]
    oracle = report.rows[-2]
    for row in report.rows:
        assert set(COLUMNS) <= set(row)
        assert 0.5 < row["auc"] <= oracle["auc"] + 0.02, row  # every model learns something, none beats the truth
    table = report.table()
    assert "oracle" in table and "ndcg@10" in table
    report.write_json(tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text())["rows"][0]["model"] == "concat"
