"""The batch-invariance gate on plain functions (no model): a row-wise one passes, one scaling by the batch fails."""

from __future__ import annotations

import numpy as np

from export.verify.batch_invariance import batch_mixes, check_batch_invariance


def test_mixes_put_each_row_beside_other_rows():
    names = [name for name, _ in batch_mixes(4)]
    assert names == ["the whole batch", "the batch reversed", "pairs of rows"]
    assert batch_mixes(4)[2][1].tolist() == [3, 0, 0, 1, 1, 2, 2, 3]


def test_invariance_gate_on_a_row_wise_function_and_a_batch_wise_one():
    inputs = {"x": np.arange(12, dtype=np.float32).reshape(6, 2)}
    row_wise = check_batch_invariance("rows", lambda f: {"y": f["x"] * 2}, inputs, 0.0)
    batch_wise = check_batch_invariance("batch", lambda f: {"y": f["x"] / np.abs(f["x"]).max()}, inputs, 1e-6)
    assert row_wise.passed and row_wise.max_abs_diff == 0 and row_wise.rows == 6
    assert not batch_wise.passed and batch_wise.output == "y" and batch_wise.max_abs_diff > 0.1
