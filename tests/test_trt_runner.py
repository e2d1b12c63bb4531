"""The engine runner (`export.trt_runner`) against the fake TensorRT and cuda-python of tests/fake_tensorrt.py:
profile choice per text bucket, chunking over the profile's max batch, load errors, buffers freed."""

from __future__ import annotations

import numpy as np
import pytest

from export.profiles import model_profiles
from export.trt_api import EngineBuildError
from export.trt_runner import TensorRTRunner
from tests.fake_tensorrt import FakeContext, FakeCudart, FakeRuntime


@pytest.fixture
def text_engine(per_bucket_spec, fake_trt, fake_cuda, monkeypatch):
    """Plans load as a text encoder engine with one profile per padding bucket."""
    monkeypatch.setattr(FakeRuntime, "profiles", model_profiles(per_bucket_spec, "text_encoder"))
    return FakeRuntime


def test_runner_picks_the_bucket_profile_and_splits_over_max_batch(ci_spec, tmp_path, text_engine):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"PLAN")
    runner = TensorRTRunner(plan)
    rng = np.random.default_rng(0)
    buckets = ci_spec.modalities.text.buckets
    max_batch = ci_spec.serving.batching("text_encoder").max_batch_size
    for index, bucket in enumerate(buckets):
        ids = rng.integers(0, 1000, size=(2 * max_batch + 5, bucket))
        out = runner.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})["text_embedding"]
        np.testing.assert_array_equal(out[:, 0], ids.sum(1).astype(np.float32))
        assert set(out[:, 1]) == {index}  # the profile tuned for this bucket
    assert [c[1] for c in FakeContext.calls[:3]] == [max_batch, max_batch, 5]
    with pytest.raises(EngineBuildError, match="fit no optimisation profile"):
        runner.run({"input_ids": np.ones((2, buckets[-1] + 1), np.int64),
                    "attention_mask": np.ones((2, buckets[-1] + 1), np.int64)})
    runner.close()
    assert FakeCudart.memory == {}  # every device buffer freed


def test_runner_reports_why_a_plan_does_not_load(tmp_path, text_engine):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"GARBAGE")
    with pytest.raises(EngineBuildError, match="magicTagRead failed"):
        TensorRTRunner(plan)
