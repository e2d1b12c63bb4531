"""The engine builder (`export.convert.onnx2trt`) against the fake TensorRT of tests/fakes/tensorrt.py: the spec's
profiles, precision, limits, timing cache, INT8 calibration and error reporting reach TensorRT;
test_gpu.py builds for real."""

from __future__ import annotations

import dataclasses

import pytest

from export.convert.onnx2trt import build_engines
from export.manifest import find_manifest
from export.node.facts import NodeInfo
from export.node.trt_api import EngineBuildError
from export.profiles import engine_models, model_profiles
from export.verify.preflight import preflight
from fusionrank.contract.spec import HardwareCompatibility, Precision
from fusionrank.contract.tensors import model_io
from tests.fakes.tensorrt import FAKE_TENSORRT_VERSION, Builder, FakeTRT, plan_flags, stand_in_onnx, timing_cache_blob


def _stand_in(spec, model, **changes) -> str:
    """The fake parser's stand-in of `model`'s exported graph: the contract's tensors (batch axis dynamic)."""
    io_ = model_io(spec, model)
    inputs = [(t.name, t.dtype, [-1, *t.dims]) for t in io_.inputs]
    outputs = [(t.name, t.dtype, [-1, *t.dims]) for t in io_.outputs]
    return stand_in_onnx(changes.get("inputs", inputs), changes.get("outputs", outputs), changes.get("ops", ()))


def _onnx_repo(spec, root, broken: str | None = None):
    """A repository whose model.onnx files are stand-ins of the contract's graphs (`BROKEN` for `broken`)."""
    repo = root / "repo"
    for model in engine_models(spec):
        (repo / model / "1").mkdir(parents=True)
        (repo / model / "1" / "model.onnx").write_text("BROKEN" if model == broken else _stand_in(spec, model))
    return repo


def _probe():
    return NodeInfo(gpu_name="Fake GPU X1", compute_capability="9.0", driver_version="570.1", cuda_version="12.8")


def test_builder_gets_the_spec_profiles_precision_and_limits(per_bucket_spec, tmp_path, fake_trt):
    spec = per_bucket_spec
    assert spec.export.tensorrt.precision is Precision.FP16  # the CI spec's precision, whose flags are checked here
    repo = _onnx_repo(spec, tmp_path)
    timing = tmp_path / "cache" / "timing.cache"
    results = build_engines(spec, repo, timing_cache=timing, probe=_probe)
    assert [r.model for r in results] == list(engine_models(spec))
    configs = dict(zip(engine_models(spec), FakeTRT.builds))
    for model, config in configs.items():
        expected = [{n: (r.min, r.opt, r.max) for n, r in p.inputs} for p in model_profiles(spec, model)]
        assert [p.shapes for p in config.profiles] == expected, model
        assert config.flags == {"FP16"}
        assert config.pool == {"WORKSPACE": spec.export.tensorrt.workspace_mib << 20}
        assert config.builder_optimization_level == spec.export.tensorrt.builder_optimization_level
        assert config.hardware_compatibility_level is None
        assert plan_flags((repo / model / "1" / "model.plan").read_bytes()) == ["FP16"]
        manifest = find_manifest(repo, model)
        assert manifest.tensorrt_version == FAKE_TENSORRT_VERSION and manifest.gpu_name == "Fake GPU X1"
    assert len(configs["text_encoder"].profiles) == \
        len(spec.modalities.text.buckets) * len(spec.serving.batch_profiles("text_encoder"))
    # The timing cache is written and fed to the next build (it grows with each one).
    assert timing.read_bytes() == timing_cache_blob(entries=b"+timings" * len(configs))
    assert configs["image_encoder"].cache.blob == b"+timings" * 2  # the text encoder's timings, then its own
    # What was just built passes pre-flight on the node that built it.
    node = NodeInfo(**{**_probe().as_dict(), "notes": (), "tensorrt_version": FAKE_TENSORRT_VERSION})
    assert preflight(spec, repo, probe=lambda: node) == []


def test_builder_flags_for_fp32_and_compatibility(ci_spec, tmp_path, fake_trt):
    trt = dataclasses.replace(ci_spec.export.tensorrt, hardware_compatibility=HardwareCompatibility.AMPERE_PLUS,
                              version_compatible=True)
    spec = ci_spec.with_overrides(export=dataclasses.replace(ci_spec.export, tensorrt=trt))
    repo = _onnx_repo(spec, tmp_path)
    build_engines(spec, repo, precision="fp32", models=["fusion_ranker"], probe=_probe,
                  timing_cache=tmp_path / "t.cache")
    (config,) = FakeTRT.builds
    assert config.flags == {"VERSION_COMPATIBLE"}
    assert config.hardware_compatibility_level == "AMPERE_PLUS"
    flags = find_manifest(repo, "fusion_ranker").build_flags
    assert flags["precision"] == "fp32" and flags["hardware_compatibility_level"] == "ampere_plus"
    assert flags["version_compatible"] is True


def test_parser_and_builder_errors_are_reported_in_full(ci_spec, tmp_path, fake_trt, monkeypatch):
    repo = _onnx_repo(ci_spec, tmp_path, broken="audio_encoder")
    with pytest.raises(EngineBuildError) as err:
        build_engines(ci_spec, repo, models=["audio_encoder"], probe=_probe, timing_cache=tmp_path / "t")
    text = str(err.value)
    assert "could not parse" in text and "node 7: no importer for op FancyOp" in text
    assert "onnxOpImporters.cpp:42 importFancyOp" in text and "failed to import node 7" in text

    monkeypatch.setattr(Builder, "fail", True)
    with pytest.raises(EngineBuildError, match="failed to build the engine:\n  Skipping tactic: out of memory"):
        build_engines(ci_spec, repo, models=["image_encoder"], probe=_probe, timing_cache=tmp_path / "t")
    assert not (repo / "image_encoder" / "1" / "model.plan").exists()


def test_onnx_inputs_must_match_the_contract(ci_spec, tmp_path, fake_trt):
    repo = _onnx_repo(ci_spec, tmp_path)
    auto_named = [("input.1", "int64", [-1, -1]), ("attention_mask", "int64", [-1, -1])]
    (repo / "text_encoder" / "1" / "model.onnx").write_text(_stand_in(ci_spec, "text_encoder", inputs=auto_named))
    with pytest.raises(EngineBuildError, match="input.1"):
        build_engines(ci_spec, repo, models=["text_encoder"], probe=_probe, timing_cache=tmp_path / "t")


def test_no_gpu_no_build(ci_spec, tmp_path, fake_trt):
    with pytest.raises(EngineBuildError, match="no GPU on this node"):
        build_engines(ci_spec, _onnx_repo(ci_spec, tmp_path), probe=lambda: NodeInfo(notes=("nvidia-smi not found",)))


@pytest.mark.parametrize("stale", [timing_cache_blob("10.12.0.36", b"+old"), b"not a timing cache"])
def test_a_timing_cache_from_another_tensorrt_or_corrupt_is_replaced(ci_spec, tmp_path, fake_trt, stale):
    timing = tmp_path / "timing.cache"
    timing.write_bytes(stale)
    build_engines(ci_spec, _onnx_repo(ci_spec, tmp_path), models=["audio_encoder"], probe=_probe,
                  timing_cache=timing)
    assert timing.read_bytes() == timing_cache_blob(entries=b"+timings")


def test_builds_share_the_process_logger_and_report_only_their_own_errors(ci_spec, tmp_path, fake_trt, monkeypatch):
    from export.node.trt_api import process_logger

    repo = _onnx_repo(ci_spec, tmp_path, broken="audio_encoder")
    build_engines(ci_spec, repo, models=["text_encoder", "image_encoder"], probe=_probe, timing_cache=tmp_path / "t")
    assert len(FakeTRT.loggers) == 4 and all(logger is process_logger(fake_trt) for logger in FakeTRT.loggers)
    with pytest.raises(EngineBuildError, match="failed to import node 7"):
        build_engines(ci_spec, repo, models=["audio_encoder"], probe=_probe, timing_cache=tmp_path / "t")
    monkeypatch.setattr(Builder, "fail", True)
    with pytest.raises(EngineBuildError) as err:
        build_engines(ci_spec, repo, models=["fusion_ranker"], probe=_probe, timing_cache=tmp_path / "t")
    assert "out of memory" in str(err.value) and "failed to import node 7" not in str(err.value)


def test_plan_and_manifest_are_replaced_atomically_manifest_last(ci_spec, tmp_path, fake_trt, monkeypatch):
    import os

    from export.manifest import manifest_path, plan_path

    repo = _onnx_repo(ci_spec, tmp_path)
    build_engines(ci_spec, repo, models=["fusion_ranker"], probe=_probe, timing_cache=tmp_path / "t")
    plan, manifest = plan_path(repo, "fusion_ranker"), manifest_path(repo, "fusion_ranker")
    plan.write_bytes(b"OLD PLAN")
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((os.path.basename(dst), manifest.exists()))
        if dst == str(plan) or dst == plan:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        build_engines(ci_spec, repo, models=["fusion_ranker"], probe=_probe, timing_cache=tmp_path / "t")
    assert seen == [("model.plan", False)]  # the old manifest was gone before the new plan could appear
    assert plan.read_bytes() == b"OLD PLAN" and not manifest.exists()
    assert [p.name for p in plan.parent.iterdir() if p.name.endswith(".tmp")] == []  # no half-written file left
    assert preflight(ci_spec, repo, probe=lambda: dataclasses.replace(_probe(), tensorrt_version="10.13.3.9")) != []


def test_calibration_table_is_keyed_by_what_it_depends_on(ci_spec, tmp_path):
    import numpy as np

    from export.convert.trt_calibration import calibration_table

    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"graph")
    batch = {"input_ids": np.zeros((64, 32), np.int64)}
    base = calibration_table(tmp_path, ci_spec, "text_encoder", onnx, batch, "10.13.3.9")
    assert calibration_table(tmp_path, ci_spec, "text_encoder", onnx, batch, "10.13.3.9") == base
    more = ci_spec.with_overrides(export=dataclasses.replace(ci_spec.export, tensorrt=dataclasses.replace(
        ci_spec.export.tensorrt, calibration_samples=ci_spec.export.tensorrt.calibration_samples * 2)))
    changed = {
        calibration_table(tmp_path, more, "text_encoder", onnx, batch, "10.13.3.9"),
        calibration_table(tmp_path, ci_spec, "text_encoder", onnx, {"input_ids": np.zeros((32, 32))}, "10.13.3.9"),
        calibration_table(tmp_path, ci_spec, "text_encoder", onnx, batch, "10.14.1.48"),
    }
    onnx.write_bytes(b"another graph")
    changed.add(calibration_table(tmp_path, ci_spec, "text_encoder", onnx, batch, "10.13.3.9"))
    assert base not in changed and len(changed) == 4


def _qdq_onnx(path, spec, zero_point: int, zero_type: int) -> None:
    """A Q/DQ graph on the audio encoder's input, its zero point constant of ONNX element type `zero_type`."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    io_ = model_io(spec, "audio_encoder")
    (tensor,), output = io_.inputs, io_.outputs[0].name
    input_name = tensor.name
    zero = helper.make_tensor("zero", zero_type, [], [zero_point])
    scale = onnx.numpy_helper.from_array(np.array(0.05, np.float32), "scale")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", [input_name, "scale", "zero"], ["q"], name="quantize_input"),
         helper.make_node("DequantizeLinear", ["q", "scale", "zero"], [output], name="dequantize_input")],
        "qdq", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [None, *tensor.dims])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [None, *tensor.dims])], [scale, zero])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_an_explicitly_quantized_graph_builds_strongly_typed(ci_spec, tmp_path, fake_trt):
    from onnx import TensorProto

    repo = _onnx_repo(ci_spec, tmp_path)
    _qdq_onnx(repo / "audio_encoder" / "1" / "model.onnx", ci_spec, 0, TensorProto.INT8)
    (result,) = build_engines(ci_spec, repo, precision="int8", models=["audio_encoder"], probe=_probe,
                              timing_cache=tmp_path / "t")
    (config,) = FakeTRT.builds
    assert config.network_flags == 1 << fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert config.flags == set() and config.int8_calibrator is None  # the graph carries the precision
    flags = find_manifest(repo, "audio_encoder").build_flags
    assert flags["strongly_typed"] is True and flags["calibration_samples"] == 0 and result.precision == "int8"
    with pytest.raises(EngineBuildError, match="explicitly quantized .* build it with precision int8"):
        build_engines(ci_spec, repo, precision="fp16", models=["audio_encoder"], probe=_probe,
                      timing_cache=tmp_path / "t")


@pytest.mark.parametrize("zero_point, zero_type, fragment", [(128, 2, "element type 2"), (3, 3, "is not 0")])
def test_a_graph_quantized_for_another_runtime_is_refused_by_node(ci_spec, tmp_path, fake_trt, zero_point, zero_type,
                                                                   fragment):
    repo = _onnx_repo(ci_spec, tmp_path)
    _qdq_onnx(repo / "audio_encoder" / "1" / "model.onnx", ci_spec, zero_point, zero_type)
    with pytest.raises(EngineBuildError, match=f"QuantizeLinear 'quantize_input': zero point 'zero' .*{fragment}"):
        build_engines(ci_spec, repo, precision="int8", models=["audio_encoder"], probe=_probe,
                      timing_cache=tmp_path / "t")
    assert FakeTRT.builds == []


def test_a_refused_timing_cache_stays_out_of_a_later_build_error(ci_spec, tmp_path, fake_trt, monkeypatch):
    timing = tmp_path / "timing.cache"
    timing.write_bytes(timing_cache_blob("10.12.0.36", b"+old"))  # refused: another TensorRT's timings
    monkeypatch.setattr(Builder, "fail", True)
    with pytest.raises(EngineBuildError) as err:
        build_engines(ci_spec, _onnx_repo(ci_spec, tmp_path), models=["audio_encoder"], probe=_probe,
                      timing_cache=timing)
    assert "out of memory" in str(err.value) and "10.12.0.36" not in str(err.value)


def test_same_compute_capability_builds_one_plan_for_h100_and_h200(ci_spec, tmp_path, fake_trt):
    level = HardwareCompatibility.SAME_COMPUTE_CAPABILITY
    trt = dataclasses.replace(ci_spec.export.tensorrt, hardware_compatibility=level)
    spec = ci_spec.with_overrides(export=dataclasses.replace(ci_spec.export, tensorrt=trt))
    repo = _onnx_repo(spec, tmp_path)
    h100 = NodeInfo(gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", driver_version="580.82.07",
                    cuda_version="13.0")
    build_engines(spec, repo, precision="fp32", models=["fusion_ranker"], probe=lambda: h100,
                  timing_cache=tmp_path / "t.cache")
    (config,) = FakeTRT.builds
    assert config.hardware_compatibility_level == "SAME_COMPUTE_CAPABILITY"
    manifest = find_manifest(repo, "fusion_ranker")
    assert manifest.hardware_compatibility == "same_compute_capability"
    h200 = NodeInfo(**{**h100.as_dict(), "gpu_name": "NVIDIA H200", "notes": (),
                       "tensorrt_version": FAKE_TENSORRT_VERSION})
    assert [m for m in preflight(spec, repo, probe=lambda: h200) if m.model == "fusion_ranker"] == []
