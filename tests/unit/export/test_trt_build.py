"""The engine builder (`export.convert.onnx2trt`) against the fake TensorRT of tests/fakes/tensorrt.py: the spec's
profiles, precision, limits, timing cache, INT8 calibration and error reporting reach TensorRT;
test_gpu.py builds for real."""

from __future__ import annotations

import dataclasses
import json

import pytest

from export.convert.onnx2trt import build_engines
from export.manifest import find_manifest
from export.node.facts import NodeInfo
from export.node.trt_api import EngineBuildError
from export.profiles import engine_models, model_profiles
from export.verify.preflight import preflight
from fusionrank.contract.spec import Precision
from fusionrank.contract.tensors import model_io
from tests.fakes.tensorrt import FAKE_TENSORRT_VERSION, Builder, Config, FakeTRT


def _onnx_repo(spec, root, broken: str | None = None):
    """A repository whose model.onnx files list the contract's input names (`BROKEN` for `broken`)."""
    repo = root / "repo"
    for model in engine_models(spec):
        (repo / model / "1").mkdir(parents=True)
        names = [t.name for t in model_io(spec, model).inputs]
        (repo / model / "1" / "model.onnx").write_text("BROKEN" if model == broken else json.dumps(names))
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
        assert (repo / model / "1" / "model.plan").read_bytes() == b"PLAN:FP16"
        manifest = find_manifest(repo, model)
        assert manifest.tensorrt_version == FAKE_TENSORRT_VERSION and manifest.gpu_name == "Fake GPU X1"
    assert len(configs["text_encoder"].profiles) == len(spec.modalities.text.buckets)
    # The timing cache is written and fed to the next build (it grows with each one).
    assert timing.read_bytes() == b"+timings" * len(configs)
    assert configs["image_encoder"].cache.blob == b"+timings"
    # What was just built passes pre-flight on the node that built it.
    node = NodeInfo(**{**_probe().as_dict(), "notes": (), "tensorrt_version": FAKE_TENSORRT_VERSION})
    assert preflight(spec, repo, probe=lambda: node) == []


def test_builder_flags_for_fp32_and_compatibility(ci_spec, tmp_path, fake_trt):
    trt = dataclasses.replace(ci_spec.export.tensorrt, hardware_compatible=True, version_compatible=True)
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
    (repo / "text_encoder" / "1" / "model.onnx").write_text(json.dumps(["input.1", "attention_mask"]))
    with pytest.raises(EngineBuildError, match="input.1"):
        build_engines(ci_spec, repo, models=["text_encoder"], probe=_probe, timing_cache=tmp_path / "t")


def test_no_gpu_no_build(ci_spec, tmp_path, fake_trt):
    with pytest.raises(EngineBuildError, match="no GPU on this node"):
        build_engines(ci_spec, _onnx_repo(ci_spec, tmp_path), probe=lambda: NodeInfo(notes=("nvidia-smi not found",)))


def test_a_timing_cache_from_another_node_is_replaced(ci_spec, tmp_path, fake_trt, monkeypatch):
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"from-another-gpu")
    monkeypatch.setattr(Config, "set_timing_cache", lambda self, cache, ignore_mismatch: (
        setattr(self, "cache", cache) or not cache.blob.startswith(b"from-another")))
    build_engines(ci_spec, _onnx_repo(ci_spec, tmp_path), models=["audio_encoder"], probe=_probe,
                  timing_cache=timing)
    assert timing.read_bytes() == b"+timings"


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


def _qdq_onnx(path, input_name: str, zero_point: int, zero_type: int) -> None:
    """A Q/DQ graph on one float input, its zero point constant of ONNX element type `zero_type`."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    zero = helper.make_tensor("zero", zero_type, [], [zero_point])
    scale = onnx.numpy_helper.from_array(np.array(0.05, np.float32), "scale")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", [input_name, "scale", "zero"], ["q"], name="quantize_input"),
         helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["out"], name="dequantize_input")],
        "qdq", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 4])], [scale, zero])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_an_explicitly_quantized_graph_builds_strongly_typed(ci_spec, tmp_path, fake_trt):
    from onnx import TensorProto

    repo = _onnx_repo(ci_spec, tmp_path)
    (name,) = [t.name for t in model_io(ci_spec, "audio_encoder").inputs]
    _qdq_onnx(repo / "audio_encoder" / "1" / "model.onnx", name, 0, TensorProto.INT8)
    (result,) = build_engines(ci_spec, repo, precision="int8", models=["audio_encoder"], probe=_probe,
                              timing_cache=tmp_path / "t")
    (config,) = FakeTRT.builds
    assert config.network_flags == 1 << fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert config.flags == set() and not hasattr(config, "int8_calibrator")  # the graph carries the precision
    flags = find_manifest(repo, "audio_encoder").build_flags
    assert flags["strongly_typed"] is True and flags["calibration_samples"] == 0 and result.precision == "int8"
    with pytest.raises(EngineBuildError, match="explicitly quantized .* build it with precision int8"):
        build_engines(ci_spec, repo, precision="fp16", models=["audio_encoder"], probe=_probe,
                      timing_cache=tmp_path / "t")


@pytest.mark.parametrize("zero_point, zero_type, fragment", [(128, 2, "element type 2"), (3, 3, "is not 0")])
def test_a_graph_quantized_for_another_runtime_is_refused_by_node(ci_spec, tmp_path, fake_trt, zero_point, zero_type,
                                                                   fragment):
    repo = _onnx_repo(ci_spec, tmp_path)
    (name,) = [t.name for t in model_io(ci_spec, "audio_encoder").inputs]
    _qdq_onnx(repo / "audio_encoder" / "1" / "model.onnx", name, zero_point, zero_type)
    with pytest.raises(EngineBuildError, match=f"QuantizeLinear 'quantize_input': zero point 'zero' .*{fragment}"):
        build_engines(ci_spec, repo, precision="int8", models=["audio_encoder"], probe=_probe,
                      timing_cache=tmp_path / "t")
    assert FakeTRT.builds == []


def test_a_refused_timing_cache_stays_out_of_a_later_build_error(ci_spec, tmp_path, fake_trt, monkeypatch):
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"from-another-gpu")

    def refuse_foreign(self, cache, ignore_mismatch):
        if cache.blob.startswith(b"from-another"):
            self.logger.log(FakeTRT.ILogger.Severity.ERROR, "Timing cache was created for a different device")
            return False
        self.cache = cache
        return True

    monkeypatch.setattr(Config, "set_timing_cache", refuse_foreign)
    monkeypatch.setattr(Builder, "fail", True)
    with pytest.raises(EngineBuildError) as err:
        build_engines(ci_spec, _onnx_repo(ci_spec, tmp_path), models=["audio_encoder"], probe=_probe,
                      timing_cache=timing)
    assert "out of memory" in str(err.value) and "different device" not in str(err.value)
