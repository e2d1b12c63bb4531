"""The engine runner (`export.node.trt_runner`) against the fake TensorRT and cuda-python of tests/fakes/tensorrt.py:
profile choice per text bucket, chunking over the profile's max batch, load errors, buffers freed."""

from __future__ import annotations

import numpy as np
import pytest

from export.node.trt_api import EngineBuildError
from export.node.trt_runner import TensorRTRunner
from export.profiles import find_profile, model_profiles
from tests.fakes.cuda import FakeCudart
from tests.fakes.tensorrt import FakeContext, FakeEngine, FakeRuntime, FakeTRT, fake_plan


@pytest.fixture
def text_engine(per_bucket_spec, fake_trt, fake_cuda, monkeypatch):
    """Plans load as a text encoder engine with one profile per padding bucket."""
    monkeypatch.setattr(FakeRuntime, "profiles", model_profiles(per_bucket_spec, "text_encoder"))
    return FakeRuntime


def test_runner_picks_the_bucket_profile_and_splits_over_max_batch(ci_spec, tmp_path, text_engine):
    plan = tmp_path / "model.plan"
    plan.write_bytes(fake_plan())
    runner = TensorRTRunner(plan)
    rng = np.random.default_rng(0)
    buckets = ci_spec.modalities.text.buckets
    max_batch = ci_spec.serving.batching("text_encoder").max_batch_size
    profiles = FakeRuntime.profiles
    for bucket in buckets:
        ids = rng.integers(0, 1000, size=(2 * max_batch + 5, bucket))
        out = runner.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})["text_embedding"]
        np.testing.assert_array_equal(out[:, 0], ids.sum(1).astype(np.float32))
        # Each chunk on the profile tuned for this bucket and its batch size (small and large batch profiles).
        expected = [find_profile(profiles, {"input_ids": (rows, bucket), "attention_mask": (rows, bucket)})
                    for rows in (max_batch, max_batch, 5)]
        assert out[:, 1].tolist() == [float(expected[0])] * 2 * max_batch + [float(expected[2])] * 5
    assert [c[1] for c in FakeContext.calls[:3]] == [max_batch, max_batch, 5]  # chunks of the largest profile
    with pytest.raises(EngineBuildError, match="fit no optimisation profile"):
        runner.run({"input_ids": np.ones((2, buckets[-1] + 1), np.int64),
                    "attention_mask": np.ones((2, buckets[-1] + 1), np.int64)})
    runner.close()
    assert FakeCudart.memory == {}  # every device buffer freed


def test_runner_reports_why_a_plan_does_not_load(tmp_path, text_engine):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"GARBAGE")
    with pytest.raises(EngineBuildError, match="magicTagRead == kMAGIC_TAG failed"):
        TensorRTRunner(plan)


def _plan(tmp_path, **plan):
    path = tmp_path / "model.plan"
    path.write_bytes(fake_plan(**plan))
    return path


def _ids(rows: int, seq: int = 8):
    ids = np.arange(rows * seq, dtype=np.int64).reshape(rows, seq)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_every_builder_and_runtime_shares_the_process_logger(tmp_path, text_engine, fake_trt):
    from export.node.trt_api import process_logger

    with TensorRTRunner(_plan(tmp_path)), TensorRTRunner(_plan(tmp_path)):
        pass
    assert len(FakeTRT.loggers) == 2 and all(logger is process_logger(fake_trt) for logger in FakeTRT.loggers)


def test_a_failure_names_only_its_own_errors(tmp_path, text_engine, monkeypatch):
    runner = TensorRTRunner(_plan(tmp_path))
    monkeypatch.setattr(FakeContext, "fail_execution", True)
    messages = []
    for _ in range(2):
        with pytest.raises(EngineBuildError) as err:
            runner.run(_ids(2))
        messages.append(str(err.value))
    assert "(execution 1)" in messages[0]
    assert "(execution 2)" in messages[1] and "(execution 1)" not in messages[1]
    runner.close()


def test_no_execution_context_is_a_clear_error_and_frees_what_was_taken(tmp_path, text_engine, monkeypatch):
    monkeypatch.setattr(FakeEngine, "no_context", True)
    with pytest.raises(EngineBuildError, match=r"cannot create an execution context .*out of GPU memory"):
        TensorRTRunner(_plan(tmp_path))
    assert FakeCudart.memory == {} and FakeCudart.host == {}


def test_a_refused_profile_switch_or_shape_is_an_engine_error(ci_spec, tmp_path, text_engine, monkeypatch):
    runner = TensorRTRunner(_plan(tmp_path))
    monkeypatch.setattr(FakeContext, "refused", {1})
    bucket = ci_spec.modalities.text.buckets[1]  # served by profile 1 of the per-bucket engine
    with pytest.raises(EngineBuildError, match="switching to optimisation profile 1 failed: .*in use by another"):
        runner.run(_ids(2, bucket))
    monkeypatch.setattr(FakeContext, "refused", set())
    runner.run(_ids(2, bucket))  # the runner did not believe it had switched
    assert FakeContext.calls[-1][0] == 1
    runner.close()


def test_copies_run_async_on_the_engine_stream_through_pinned_memory(tmp_path, text_engine):
    runner = TensorRTRunner(_plan(tmp_path))
    FakeCudart.calls.clear()
    inputs = _ids(3)
    out = runner.run(inputs)["text_embedding"]
    np.testing.assert_array_equal(out[:, 0], inputs["input_ids"].sum(1).astype(np.float32))
    names = [name for name, _ in FakeCudart.calls]
    assert "cudaMemcpy" not in names  # nothing on the legacy default stream
    copies = [stream for name, stream in FakeCudart.calls if name == "cudaMemcpyAsync"]
    assert copies == [runner.stream_handle] * 3  # two inputs in, one output back, all on the runner's stream
    assert names.count("cudaStreamSynchronize") == 1 and names[-1] == "cudaStreamSynchronize"
    assert names.count("cudaMallocHost") == 3  # staged in pinned host buffers
    runner.run(inputs)
    assert names.count("cudaMallocHost") == [n for n, _ in FakeCudart.calls].count("cudaMallocHost")  # reused
    runner.close()


def test_close_releases_everything_once_and_the_runner_is_a_context_manager(tmp_path, text_engine):
    import gc
    import weakref

    with TensorRTRunner(_plan(tmp_path)) as runner:
        runner.run(_ids(2))
        held = [weakref.ref(runner.context), weakref.ref(runner.engine), weakref.ref(runner.runtime)]
    gc.collect()
    assert [ref() for ref in held] == [None, None, None]
    assert FakeCudart.memory == {} and FakeCudart.host == {}
    assert ("cudaStreamDestroy", runner.stream_handle) in FakeCudart.calls
    runner.close()  # a second close does nothing
    with pytest.raises(EngineBuildError, match="closed"):
        runner.run(_ids(1))


def test_close_reports_cuda_errors_after_releasing_everything(tmp_path, text_engine):
    runner = TensorRTRunner(_plan(tmp_path))
    runner.run(_ids(2))
    FakeCudart.fail.update({"cudaFree", "cudaStreamDestroy"})
    with pytest.raises(EngineBuildError, match="cudaStreamDestroy.*cudaMalloc free of 'input_ids'"):
        runner.close()
    assert FakeCudart.memory == {} and FakeCudart.host == {} and runner.context is None


def test_zero_rows_give_empty_outputs_and_bad_inputs_are_named(tmp_path, text_engine):
    with TensorRTRunner(_plan(tmp_path)) as runner:
        out = runner.run(_ids(0))["text_embedding"]
        assert out.shape == (0, 2) and out.dtype == np.float32
        with pytest.raises(EngineBuildError, match=r"missing input\(s\) \['attention_mask'\]"):
            runner.run({"input_ids": np.ones((2, 8), np.int64)})
        with pytest.raises(EngineBuildError, match="different row counts"):
            runner.run({"input_ids": np.ones((2, 8), np.int64), "attention_mask": np.ones((3, 8), np.int64)})


def test_bfloat16_outputs_come_back_as_float32(tmp_path, text_engine, monkeypatch):
    monkeypatch.setattr(FakeEngine, "dtypes", {"text_embedding": "bfloat16"})
    with TensorRTRunner(_plan(tmp_path)) as runner:
        inputs = _ids(4)
        out = runner.run(inputs)["text_embedding"]
    assert out.dtype == np.float32
    expected = inputs["input_ids"].sum(1).astype(np.float32)
    np.testing.assert_allclose(out[:, 0], expected, rtol=2 ** -7)  # bfloat16 keeps 8 bits of mantissa


def test_bfloat16_conversions_round_to_nearest_even():
    from export.node.trt_dtypes import bfloat16_bits_to_float32, float32_to_bfloat16_bits

    values = np.array([1.0, -2.5, 3.14159, 1 + 2 ** -8, 1 + 3 * 2 ** -8, np.inf, 0.0], np.float32)
    bits = float32_to_bfloat16_bits(values)
    assert bits.dtype == np.uint16
    back = bfloat16_bits_to_float32(bits)
    # 1 + 2^-8 is a tie: to the even mantissa 1.0; 1 + 3*2^-8 rounds up to 1 + 2^-6.
    np.testing.assert_array_equal(back, np.array([1.0, -2.5, 3.140625, 1.0, 1 + 2 ** -6, np.inf, 0.0], np.float32))
    assert np.isnan(bfloat16_bits_to_float32(float32_to_bfloat16_bits(np.array([np.nan], np.float32))))[0]


def test_tensor_types_numpy_cannot_hold_are_refused_by_name(tmp_path, text_engine, monkeypatch):
    monkeypatch.setattr(FakeEngine, "dtypes", {"text_embedding": "fp8"})
    with pytest.raises(EngineBuildError, match="'text_embedding' has TensorRT type fp8"):
        TensorRTRunner(_plan(tmp_path))
