"""Python-backend models without a server: a fake `triton_python_backend_utils` made of small dataclasses."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from google.protobuf import json_format
from onnx import TensorProto, helper

from fusionrank.serving.render import model_configs
from fusionrank.serving.triton_models import HistoryModel, OnnxRuntimeModel, PreprocessModel


@dataclass
class FakeTensor:
    name: str
    array: np.ndarray

    def as_numpy(self):
        return self.array


@dataclass
class FakeError:
    message: str
    code: int = 0
    INVALID_ARG = 3
    INTERNAL = 13

    def __str__(self):
        return self.message


@dataclass
class FakeResponse:
    output_tensors: list = field(default_factory=list)
    error: FakeError | None = None


@dataclass
class FakeRequest:
    inputs: dict


class FakeLogger:
    errors: list = []

    @classmethod
    def log_error(cls, msg):
        cls.errors.append(msg)


@pytest.fixture
def pb(monkeypatch):
    module = types.SimpleNamespace(
        Tensor=FakeTensor, InferenceResponse=FakeResponse, TritonError=FakeError, Logger=FakeLogger,
        get_input_tensor_by_name=lambda request, name: FakeTensor(name, request.inputs[name]))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


def _init(model_cls, spec, name, version_dir):
    config = json.loads(json_format.MessageToJson(model_configs(spec)[name]["cpu"], preserving_proto_field_name=True))
    version_dir.mkdir(parents=True, exist_ok=True)
    model = model_cls()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(version_dir.parent),
                      "model_version": version_dir.name})
    return model


def _outputs(response):
    return {t.name: t.array for t in response.output_tensors}


def test_history_bad_request_fails_alone(pb, ci_spec, tmp_path):
    model = _init(HistoryModel, ci_spec, "preprocess_history", tmp_path / "preprocess_history" / "1")
    length, vocab = ci_spec.ranker.history.length, ci_spec.ranker.history.vocab_size
    good_a = np.arange(2 * length, dtype=np.int64).reshape(2, length) % vocab
    bad = np.zeros((3, length), dtype=np.int64)
    bad[1, 4] = vocab  # out of vocabulary
    good_b = np.ones((1, length), dtype=np.int64)
    responses = model.execute([FakeRequest({"user_history": a}) for a in (good_a, bad, good_b)])
    assert responses[0].error is None and responses[2].error is None
    np.testing.assert_array_equal(_outputs(responses[0])["history"], good_a)
    np.testing.assert_array_equal(_outputs(responses[2])["history"], good_b)
    assert responses[1].error.code == FakeError.INVALID_ARG
    assert "user_history[1]" in responses[1].error.message


def test_image_bad_request_fails_alone(pb, ci_spec, tmp_path):
    import io

    from PIL import Image

    model = _init(PreprocessModel, ci_spec, "preprocess_image", tmp_path / "preprocess_image" / "1")
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (10, 200, 30)).save(buf, format="JPEG")
    good = np.array([[buf.getvalue()], [buf.getvalue()]], dtype=object)
    corrupt = np.array([[buf.getvalue()], [buf.getvalue()[:200]]], dtype=object)
    responses = model.execute([FakeRequest({"item_image": good}), FakeRequest({"item_image": corrupt})])
    size = ci_spec.modalities.image.size
    assert _outputs(responses[0])["pixel_values"].shape == (2, 3, size, size)
    assert responses[1].error.code == FakeError.INVALID_ARG
    assert responses[1].error.message.startswith("item_image[1]")


def _tiny_onnx(path):
    """y = x * 2 with a dynamic batch: stands in for an exported encoder."""
    x = helper.make_tensor_value_info("log_mel", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("audio_embedding", TensorProto.FLOAT, ["batch", 4])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["log_mel", "two"], ["audio_embedding"])], "g", [x], [y], [two])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_onnx_model_concatenates_runs_once_and_splits(pb, ci_spec, tmp_path, monkeypatch):
    version_dir = tmp_path / "audio_encoder" / "1"
    version_dir.mkdir(parents=True)
    _tiny_onnx(version_dir / "model.onnx")
    model = _init(OnnxRuntimeModel, ci_spec, "audio_encoder", version_dir)
    calls = []
    real_run = model.session.run
    monkeypatch.setattr(model.session, "run", lambda names, feed: calls.append(len(feed["log_mel"])) or
                        real_run(names, feed))
    batches = [np.full((n, 4), n, dtype=np.float32) for n in (1, 3, 2)]
    responses = model.execute([FakeRequest({"log_mel": b}) for b in batches])
    assert calls == [6], "all requests of the dynamic batch run in one session call"
    for batch, response in zip(batches, responses):
        np.testing.assert_array_equal(_outputs(response)["audio_embedding"], batch * 2)
