"""FP16 safety (issue 21, item 7): exported graphs hold no constant FP16 cannot represent, and each engine's
precision is chosen by the accuracy gate, the next precision up when a lower one fails, with the reason recorded."""

from __future__ import annotations

import numpy as np
import pytest

from export.convert.fp16_constants import constants_beyond_fp16, fp16_safe_constants
from export.manifest import find_manifest
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.spec import Precision
from release.precision_gate import build_engines_gated, next_precision
from tests.fakes.tensorrt import FakeTRT
from tests.unit.export.test_trt_build import _onnx_repo, _probe


def _masked_softmax_onnx(path, fill: float) -> None:
    """softmax(scores + where(mask, 0, fill)): the attention-mask pattern transformers exports."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
             helper.make_node("Constant", [], ["fill"], value=helper.make_tensor("f", TensorProto.FLOAT, [], [fill])),
             helper.make_node("Where", ["mask", "zero", "fill"], ["bias"]),
             helper.make_node("Add", ["scores", "bias"], ["biased"]),
             helper.make_node("Softmax", ["biased"], ["probs"], axis=-1)]
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 4]),
                                                helper.make_tensor_value_info("mask", TensorProto.BOOL, [None, 4])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _run(path, scores, mask):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"scores": scores,
                                                                                          "mask": mask})[0]


def test_the_float32_mask_sentinel_becomes_fp16_safe_with_the_same_outputs(tmp_path):
    path = tmp_path / "masked.onnx"
    _masked_softmax_onnx(path, float(np.finfo(np.float32).min))
    scores = np.array([[1.0, 2.0, -3.0, 0.5], [8.0, -8.0, 0.0, 30.0]], np.float32)
    mask = np.array([[True, True, False, False], [True, False, True, False]])
    before = _run(path, scores, mask)
    assert constants_beyond_fp16(path)  # -3.4e38: -inf in an FP16 engine
    assert fp16_safe_constants(path) == 1
    assert constants_beyond_fp16(path) == []
    np.testing.assert_array_equal(_run(path, scores, mask), before)  # exp(-1e4) is 0 in FP32 as exp(-3.4e38)


def test_a_data_constant_beyond_fp16_is_refused_by_name(tmp_path):
    path = tmp_path / "big.onnx"
    _masked_softmax_onnx(path, 1e6)
    with pytest.raises(FusionRankError, match=r"constant f holds 1e\+06, beyond FP16's range"):
        fp16_safe_constants(path)


# --- precision chosen by the gate -------------------------------------------------------------------------------


def test_the_ladder_goes_up_from_int8_to_fp32():
    assert [next_precision(p) for p in (Precision.INT8, Precision.FP16, Precision.FP32)] == \
        [Precision.FP16, Precision.FP32, None]


def test_a_model_failing_the_gate_in_fp16_is_rebuilt_in_fp32_and_the_manifest_says_why(ci_spec, tmp_path, fake_trt):
    repo = _onnx_repo(ci_spec, tmp_path)
    asked = ci_spec.export.tensorrt.precision
    assert asked is Precision.FP16
    checked = []

    def gate(model):  # the ranker's FP16 engine misses the Kendall gate; everything else passes
        precision = find_manifest(repo, model).precision
        checked.append((model, precision))
        if model == "fusion_ranker" and precision == "fp16":
            return False, "ranking parity kendall_tau 0.91 < 0.95"
        return True, ""

    results = build_engines_gated(ci_spec, repo, _probe(), tmp_path / "t", check=gate)
    built = {r.model: r.precision for r in results}
    assert built == {"text_encoder": "fp16", "image_encoder": "fp16", "audio_encoder": "fp16", "fusion_ranker": "fp32"}
    assert ("fusion_ranker", "fp16") in checked and ("fusion_ranker", "fp32") in checked
    ranker = find_manifest(repo, "fusion_ranker")
    assert ranker.precision == "fp32" and ranker.build_flags["precision"] == "fp32"
    assert ranker.extra["precision_choice"] == {"asked": "fp16", "built": "fp32", "passed": True, "rejected": [
        {"precision": "fp16", "why": "ranking parity kendall_tau 0.91 < 0.95"}]}
    assert find_manifest(repo, "text_encoder").extra["precision_choice"]["rejected"] == []
    assert [c.flags for c in FakeTRT.builds][-2:] == [{"FP16"}, set()]  # the ranker: FP16, then FP32


def test_a_model_failing_even_in_fp32_keeps_fp32_and_is_recorded_failing(ci_spec, tmp_path, fake_trt):
    repo = _onnx_repo(ci_spec, tmp_path)
    results = build_engines_gated(ci_spec, repo, _probe(), tmp_path / "t", models=["audio_encoder"],
                                  check=lambda model: (False, "audio_embedding max |diff| 0.4"))
    assert results[0].precision == "fp32"
    choice = find_manifest(repo, "audio_encoder").extra["precision_choice"]
    assert choice["passed"] is False and choice["why"] == "audio_embedding max |diff| 0.4"
    assert [r["precision"] for r in choice["rejected"]] == ["fp16"]
