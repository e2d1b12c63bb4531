"""The fake TensorRT refuses what the real one refuses (tests/fake_tensorrt.py cites where each rule comes from), and
the builder and runner turn each refusal into an `EngineBuildError` that says what went wrong."""

from __future__ import annotations

import numpy as np
import pytest

from export.convert.onnx2trt import build_engines
from export.node.trt_api import EngineBuildError
from export.node.trt_runner import TensorRTRunner
from tests.fakes.tensorrt import (
    FAKE_TENSORRT_VERSION,
    Builder,
    Config,
    FakeContext,
    FakeEngine,
    Network,
    Profile,
    Tensor,
    fake_plan,
)
from tests.unit.export.test_trt_build import _onnx_repo, _probe, _stand_in

RANKER_IO = ([("history", "int64", [-1, 4]), ("text_embedding", "float32", [-1, 3])],
             [("click_probability", "float32", [-1, 1]), ("modality_weights", "float32", [-1, 3])])
RANKER_PROFILE = [{"history": [[1, 4], [8, 4], [16, 4]], "text_embedding": [[1, 3], [8, 3], [16, 3]]}]


def _build_error(spec, repo, model, tmp_path) -> str:
    with pytest.raises(EngineBuildError) as err:
        build_engines(spec, repo, models=[model], probe=_probe, timing_cache=tmp_path / "t")
    return str(err.value)


# --- the parser -------------------------------------------------------------------------------------------------


def test_an_op_without_an_importer_fails_the_parse_with_the_parsers_error_list(ci_spec, tmp_path, fake_trt):
    repo = _onnx_repo(ci_spec, tmp_path)
    (repo / "audio_encoder" / "1" / "model.onnx").write_text(
        _stand_in(ci_spec, "audio_encoder", ops=["Conv", "FancyOp", "Relu"]))
    text = _build_error(ci_spec, repo, "audio_encoder", tmp_path)
    assert "could not parse" in text and "node 1: No importer registered for op: FancyOp" in text


def test_outputs_other_than_the_contracts_are_refused(ci_spec, tmp_path, fake_trt):
    repo = _onnx_repo(ci_spec, tmp_path)
    (repo / "fusion_ranker" / "1" / "model.onnx").write_text(
        _stand_in(ci_spec, "fusion_ranker", outputs=[("output.1", "float32", [-1, 1])]))
    assert "ONNX outputs ['output.1'] differ from the tensor contract" in _build_error(ci_spec, repo,
                                                                                        "fusion_ranker", tmp_path)


def test_a_real_onnx_graph_gives_its_inputs_outputs_and_ops(tmp_path, fake_trt):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "m.onnx"))
    network = Network()
    assert fake_trt.OnnxParser(network, None).parse_from_file(str(tmp_path / "m.onnx"))
    assert [(t.name, t.shape) for t in network.inputs] == [("x", (-1, 2))] and network.get_output(0).name == "y"


# --- profiles -----------------------------------------------------------------------------------------------------


def test_profiles_refuse_bad_shapes_as_the_python_binding_does():
    profile = Profile()
    with pytest.raises(RuntimeError, match="Shape provided for opt is inconsistent with other shapes"):
        profile.set_shape("x", (1, 4), (8,), (16, 4))
    with pytest.raises(RuntimeError, match="Shape provided for min"):
        profile.set_shape("x", (-1, 4), (8, 4), (16, 4))
    profile.set_shape("x", (1, 4), (32, 4), (16, 4))  # opt > max: accepted here, refused when added
    config = Config(logger=type("L", (), {"log": lambda self, s, m: None})())
    assert config.add_optimization_profile(profile) == -1
    good = Profile()
    good.set_shape("x", (1, 4), (8, 4), (16, 4))
    assert config.add_optimization_profile(good) == 0


def test_a_refused_shape_is_an_engine_error_naming_the_input(ci_spec, tmp_path, fake_trt, monkeypatch):
    def refuse(self, name, lo, opt, hi):
        raise RuntimeError("Shape provided for max is inconsistent with other shapes.")

    monkeypatch.setattr(Profile, "set_shape", refuse)
    text = _build_error(ci_spec, _onnx_repo(ci_spec, tmp_path), "audio_encoder", tmp_path)
    assert "refused the shapes of 'log_mel'" in text and "inconsistent with other shapes" in text


def test_a_network_input_missing_from_a_profile_fails_the_build(fake_trt):
    builder = Builder(logger=type("L", (), {"log": lambda self, s, m: None})())
    network = builder.create_network(0)
    network.inputs = [Tensor("a", "float32", (-1, 2)), Tensor("b", "float32", (-1, 3))]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("a", (1, 2), (4, 2), (8, 2))
    assert config.add_optimization_profile(profile) == 0
    assert builder.build_serialized_network(network, config) is None


def test_precision_flags_on_a_strongly_typed_network_fail_the_build(fake_trt):
    logged = []
    builder = Builder(logger=type("L", (), {"log": lambda self, s, m: logged.append(m)})())
    network = builder.create_network(1 << fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network.inputs, network.outputs = [Tensor("x", "float32", (4,))], [Tensor("y", "float32", (4,))]
    config = builder.create_builder_config()
    config.set_flag(fake_trt.BuilderFlag.FP16)
    assert builder.build_serialized_network(network, config) is None
    assert "not allowed on a strongly typed network" in logged[-1]


# --- plans and the runner -----------------------------------------------------------------------------------------


def _plan(tmp_path, **plan):
    path = tmp_path / "model.plan"
    path.write_bytes(fake_plan(**plan))
    return path


def test_a_plan_of_another_tensorrt_version_does_not_load(tmp_path, fake_trt, fake_cuda):
    with pytest.raises(EngineBuildError, match=f"Current Version: {FAKE_TENSORRT_VERSION}, Serialized Engine "
                                               "Version: 10.12.0.36"):
        TensorRTRunner(_plan(tmp_path, version="10.12.0.36"))


def test_a_version_compatible_plan_needs_host_code_allowed(tmp_path, fake_trt, fake_cuda):
    plan = _plan(tmp_path, version="10.12.0.36", flags=["VERSION_COMPATIBLE"])
    with pytest.raises(EngineBuildError, match="engine_host_code_allowed"):
        TensorRTRunner(plan)
    TensorRTRunner(plan, allow_host_code=True).close()  # an older 10.x plan runs on 10.13 when allowed
    with pytest.raises(EngineBuildError, match="cannot run on"):
        TensorRTRunner(_plan(tmp_path, version="8.6.1.6", flags=["VERSION_COMPATIBLE"]), allow_host_code=True)


def test_a_version_compatible_engine_loads_through_the_latency_runner(ci_spec, tmp_path, fake_trt, fake_cuda):
    from benchmarks.latency import make_runner
    from export.manifest import create_manifest, manifest_path
    from export.profiles import model_profiles
    from tests.unit.export.test_manifest import BUILD_NODE, FLAGS

    repo = _onnx_repo(ci_spec, tmp_path)
    (repo / "text_encoder" / "1" / "model.plan").write_bytes(fake_plan(flags=["VERSION_COMPATIBLE"]))
    manifest = create_manifest(ci_spec, repo, "text_encoder", BUILD_NODE, "fp16",
                               model_profiles(ci_spec, "text_encoder"), {**FLAGS, "version_compatible": True})
    manifest.write(manifest_path(repo, "text_encoder"))
    make_runner("gpu", repo, "text_encoder").close()


def test_an_engine_has_the_networks_outputs(tmp_path, fake_trt, fake_cuda):
    inputs, outputs = RANKER_IO
    with TensorRTRunner(_plan(tmp_path, inputs=inputs, outputs=outputs, profiles=RANKER_PROFILE)) as runner:
        out = runner.run({"history": np.ones((5, 4), np.int64), "text_embedding": np.zeros((5, 3), np.float32)})
    assert set(out) == {"click_probability", "modality_weights"}
    assert out["click_probability"].shape == (5, 1) and out["modality_weights"].shape == (5, 3)
    np.testing.assert_array_equal(out["click_probability"][:, 0], np.full(5, 4.0, np.float32))


def test_a_tensor_without_an_address_fails_the_execution(tmp_path, fake_trt, fake_cuda, monkeypatch):
    inputs, outputs = RANKER_IO
    engine = FakeEngine(RANKER_PROFILE, inputs, outputs)
    context = engine.create_execution_context()
    logged = []
    context.logger = type("L", (), {"log": lambda self, s, m: logged.append(m)})()
    context.set_input_shape("history", (2, 4))
    context.set_tensor_address("history", 1)
    assert context.execute_async_v3(0) is False and "has no address set" in logged[-1]
    assert FakeContext.executions == 1


def test_a_refused_profile_switch_raises_as_the_binding_does_and_the_runner_names_it(ci_spec, tmp_path, fake_trt,
                                                                                   fake_cuda, monkeypatch):
    from export.profiles import model_profiles
    from tests.fakes.tensorrt import FakeRuntime

    monkeypatch.setattr(FakeRuntime, "profiles", model_profiles(ci_spec, "text_encoder"))
    engine = FakeEngine(model_profiles(ci_spec, "text_encoder"))
    monkeypatch.setattr(FakeContext, "refused", {0})
    with pytest.raises(RuntimeError, match="Error in set optimization profile async"):
        engine.create_execution_context().set_optimization_profile_async(0, 0)
