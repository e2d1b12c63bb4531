"""TensorRT steps on the real exported CI repository, with the fake TensorRT and CUDA of tests/fakes/ (no GPU here):
INT8 calibration on catalogue samples, profiles against the exported ONNX inputs, the GPU check's steps."""

from __future__ import annotations

import shutil

import onnx

from export.convert.onnx2trt import build_engines
from export.profiles import engine_models, model_profiles
from release.gpu_check import run_gpu_check
from tests.fakes.cuda import FakeCudart
from tests.fakes.tensorrt import FakeTRT
from tests.paths import REPO_ROOT
from tests.unit.export.test_trt_build import _probe
from tests.unit.release.test_gpu_check import GPU, NOW, _statuses


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
    batch = ci_spec.serving.batching("text_encoder").preferred_batch_sizes[-1]
    shape = (batch, ci_spec.modalities.text.max_length)  # padded to max_length: every title fits, none is cut
    assert config.calibration_profile.shapes == {"input_ids": (shape, shape, shape),
                                                 "attention_mask": (shape, shape, shape)}
    assert len(config.calibrated) == -(-ci_spec.export.tensorrt.calibration_samples // batch)
    assert all(len(pointers) == 2 and all(pointers) for pointers in config.calibrated)
    assert FakeCudart.memory == {}  # calibration buffers freed after the build


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
    # The fake engine is a text encoder for every plan: running the others fails, and says so.
    assert steps["tensorrt-parity-latency"][0] == "failed" and steps["tensorrt-parity-latency"][1]
    assert steps["onnxruntime-cuda"][0] == "skipped" and "no CUDA provider" in steps["onnxruntime-cuda"][1]
    assert not (built_repository / "text_encoder" / "1" / "model.plan").exists()  # built in a scratch copy
