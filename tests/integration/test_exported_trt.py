"""TensorRT steps on the real exported CI repository, with the fake TensorRT and CUDA of tests/fakes/ (no GPU here):
INT8 calibration on catalogue samples, profiles against the exported ONNX inputs, the GPU check's steps."""

from __future__ import annotations

import json
import shutil

import onnx

from export.convert.onnx2trt import build_engines
from export.profiles import engine_models, model_profiles
from release.gpu_check import run_gpu_check
from tests.fakes.cuda import FakeCudart
from tests.fakes.tensorrt import FakeTRT
from tests.paths import REPO_ROOT
from tests.unit.export.test_trt_build import _probe
from tests.unit.release.test_gpu_check import GPU, NOW, OLD_DRIVER, _statuses


def test_int8_build_calibrates_on_catalogue_samples(ci_spec, built_repository, tmp_path, fake_trt, fake_cuda):
    repo = tmp_path / "repo"
    for part in ("text_encoder/1/model.onnx", "preprocess/1/tokenizer"):
        copy = shutil.copytree if (built_repository / part).is_dir() else shutil.copy
        (repo / part).parent.mkdir(parents=True, exist_ok=True)
        copy(built_repository / part, repo / part)
    (result,) = build_engines(ci_spec, repo, precision="int8", models=["text_encoder"], probe=_probe,
                              timing_cache=tmp_path / "trt" / "timing.cache")
    (config,) = FakeTRT.builds
    assert config.flags == {"INT8", "FP16"} and result.precision == "int8"
    batch = ci_spec.serving.batch_profiles("text_encoder")[-1][1]  # the largest batch profile's opt
    shape = (batch, ci_spec.modalities.text.max_length)  # padded to max_length: every title fits, none is cut
    assert config.calibration_profile.shapes == {"input_ids": (shape, shape, shape),
                                                 "attention_mask": (shape, shape, shape)}
    assert len(config.calibrated) == -(-ci_spec.export.tensorrt.calibration_samples // batch)
    assert all(len(pointers) == 2 and all(pointers) for pointers in config.calibrated)
    assert FakeCudart.memory == {}  # calibration buffers freed after the build
    # TensorRT asks read_calibration_cache first: the second build uses the table the first wrote, reads no batch.
    build_engines(ci_spec, repo, precision="int8", models=["text_encoder"], probe=_probe,
                  timing_cache=tmp_path / "trt" / "timing.cache")
    assert FakeTRT.builds[-1].used_cached_table and FakeTRT.builds[-1].calibrated == []


def test_profiles_agree_with_the_exported_onnx_inputs(ci_spec, built_repository):
    for model in engine_models(ci_spec):
        graph = onnx.load(str(built_repository / model / "1" / "model.onnx"), load_external_data=False).graph
        onnx_inputs = {i.name: [d.dim_value or None for d in i.type.tensor_type.shape.dim] for i in graph.input}
        for profile in model_profiles(ci_spec, model):
            assert set(profile.ranges()) == set(onnx_inputs), model
            for name, r in profile.inputs:
                dims = onnx_inputs[name]
                assert len(dims) == len(r.min), (model, name)
                for i, d in enumerate(dims):
                    if d is not None:  # a static ONNX dim must be exactly what the profile allows
                        assert r.min[i] == r.max[i] == d, (model, name, i)


def test_on_a_gpu_node_the_allowed_steps_run(ci_spec, built_repository, tmp_path, fake_trt, fake_cuda):
    _, report = run_gpu_check(ci_spec, built_repository, tmp_path / "out", root=REPO_ROOT, probe=lambda: GPU,
                              now=NOW)
    steps = _statuses(report)
    assert steps["cuda-driver"][0] == "ran" and steps["prepare-repository"][0] == "ran"
    assert steps["tensorrt-build"] == ("ran", "")
    built = report["steps"][3]["data"]
    assert set(built) == {"text_encoder", "image_encoder", "audio_encoder", "fusion_ranker"}
    # The fake engines' outputs are stand-ins: every model fails the gate (built up to FP32) and parity, saying so.
    assert steps["tensorrt-parity-latency"][0] == "failed" and steps["tensorrt-parity-latency"][1]
    assert steps["onnxruntime-cuda"][0] == "skipped" and "no CUDA provider" in steps["onnxruntime-cuda"][1]
    assert not (built_repository / "text_encoder" / "1" / "model.plan").exists()  # built in a scratch copy


def test_an_old_driver_is_reported_and_the_tensorrt_steps_skipped(ci_spec, built_repository, tmp_path, fake_trt,
                                                                   fake_cuda, monkeypatch):
    def nullptr(self, logger):  # what tensorrt-cu13's Builder does on a driver without CUDA 13
        raise TypeError("pybind11::init(): factory function returned nullptr")

    monkeypatch.setattr(fake_trt.Builder, "__init__", nullptr)
    folder, report = run_gpu_check(ci_spec, built_repository, tmp_path / "out", root=REPO_ROOT,
                                   probe=lambda: OLD_DRIVER, now=NOW)
    steps = _statuses(report)
    assert steps["cuda-driver"][0] == "failed"
    assert "570.124.06 is older than 580.65.06" in steps["cuda-driver"][1] and "CUDA 13" in steps["cuda-driver"][1]
    assert steps["tensorrt-build"] == ("skipped", steps["cuda-driver"][1])
    assert report["lacks"]["driver"] == steps["cuda-driver"][1]
    assert "| cuda-driver | failed |" in (folder / "gpu-check.md").read_text()


def test_any_exception_of_a_step_is_that_steps_failure_and_the_report_is_written(ci_spec, built_repository, tmp_path,
                                                                                fake_trt, fake_cuda, monkeypatch):
    def nullptr(self, logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    monkeypatch.setattr(fake_trt.Builder, "__init__", nullptr)
    folder, report = run_gpu_check(ci_spec, built_repository, tmp_path / "out", root=REPO_ROOT, probe=lambda: GPU,
                                   now=NOW)
    steps = _statuses(report)
    assert steps["tensorrt-build"] == ("failed", "TypeError: pybind11::init(): factory function returned nullptr")
    assert steps["serve-gpu-profile"][1].startswith("no engines: tensorrt-build failed")
    assert "Traceback" in (folder / "gpu-check.log").read_text()
    assert json.loads((folder / "gpu-check.json").read_text()) == report


def test_the_timing_cache_persists_under_the_project_cache(ci_spec, built_repository, tmp_path, fake_trt, fake_cuda,
                                                           monkeypatch):
    monkeypatch.setenv("FUSIONRANK_CACHE", str(tmp_path / "cache"))
    run_gpu_check(ci_spec, built_repository, tmp_path / "out", root=REPO_ROOT, probe=lambda: GPU, now=NOW)
    cache = tmp_path / "cache" / "tensorrt" / "timing.cache"
    assert cache.is_file(), "a second run must find the first run's timings"
    first = cache.read_bytes()
    run_gpu_check(ci_spec, built_repository, tmp_path / "out2", root=REPO_ROOT, probe=lambda: GPU, now=NOW)
    assert cache.read_bytes().startswith(first), "the second run starts from the first run's cache"


def test_the_exported_text_encoder_has_no_constant_beyond_fp16(built_repository):
    from export.convert.fp16_constants import FP16_MAX, constants_beyond_fp16

    path = built_repository / "text_encoder" / "1" / "model.onnx"
    assert constants_beyond_fp16(path) == [], f"an FP16 engine of {path} would overflow these (max {FP16_MAX})"
