"""Python-backend models without a server: a fake `triton_python_backend_utils` made of small dataclasses."""

from __future__ import annotations

import dataclasses
import json
import os
import threading

import numpy as np
import onnx
import pytest
from google.protobuf import json_format
from onnx import TensorProto, helper

from fusionrank.contract.names import BATCH_COMPUTE_METRIC
from fusionrank.contract.spec import Modality
from fusionrank.triton.exported import OnnxRuntimeModel
from fusionrank.triton.pool import PoolModel
from fusionrank.triton.preprocess import PreprocessModel
from fusionrank.triton.render import model_configs
from tests.fakes.pb_utils import FakeError, FakeRequest, install


@pytest.fixture
def pb(monkeypatch):
    return install(monkeypatch)


def _init(model_cls, spec, name, version_dir):
    config = json.loads(json_format.MessageToJson(model_configs(spec)[name]["cpu"], preserving_proto_field_name=True))
    version_dir.mkdir(parents=True, exist_ok=True)
    model = model_cls()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(version_dir.parent),
                      "model_version": version_dir.name})
    return model


def _outputs(response):
    return {t.name: t.array for t in response.output_tensors}


def _payloads(n: int, size=(80, 60)):
    import io

    import soundfile as sf
    from PIL import Image

    image, wav = io.BytesIO(), io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(image, format="JPEG")
    sf.write(wav, np.zeros(8000, dtype=np.float32), 16000, format="WAV")
    return {"item_text": np.array([[b"hiking boots"]] * n, dtype=object),
            "item_image": np.array([[image.getvalue()]] * n, dtype=object),
            "item_audio": np.array([[wav.getvalue()]] * n, dtype=object)}


@pytest.fixture(scope="module")
def clip():
    from PIL import Image

    from fusionrank.preprocess.video import encode_video

    return encode_video([Image.new("RGB", (32, 32), c) for c in ((0, 0, 255), (0, 255, 0), (255, 0, 0))])


@pytest.fixture
def preprocess(pb, ci_spec, tmp_path):
    from fusionrank.contract.paths import resolve_text_checkpoint

    version_dir = tmp_path / "preprocess" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "tokenizer").symlink_to(resolve_text_checkpoint(ci_spec.modalities.text.encoder.checkpoint))
    return _init(PreprocessModel, ci_spec, "preprocess", version_dir)


def _history(ci_spec, n):
    """One user's history, repeated for each of the n candidates."""
    length, vocab = ci_spec.ranker.history.length, ci_spec.ranker.history.vocab_size
    return np.repeat(np.arange(length, dtype=np.int64)[None, :] % vocab, n, axis=0)


def test_preprocess_outputs_every_encoder_input(preprocess, ci_spec):
    (response,) = preprocess.execute([FakeRequest({**_payloads(3), "user_history": _history(ci_spec, 3)})])
    out = _outputs(response)
    size, audio = ci_spec.modalities.image.size, ci_spec.modalities.audio
    assert out["input_ids"].shape == (3, 16) and out["attention_mask"].shape == (3, 16)
    assert out["pixel_values"].shape == (3, 3, size, size)
    assert out["log_mel"].shape == (3, audio.n_mels, audio.num_frames)
    for m in ("text", "image", "audio"):
        np.testing.assert_array_equal(out[f"{m}_owner"], [[0], [1], [2]])
    np.testing.assert_array_equal(out["history"], _history(ci_spec, 3))
    np.testing.assert_array_equal(out["modality_mask"], np.ones((3, 3), dtype=np.float32))


def test_preprocess_sends_only_present_rows_and_video_frames(preprocess, ci_spec, clip):
    """No audio anywhere, no image for row 1, a video for row 2: the encoders get only rows that have their
    modality (one placeholder owned by no one where none has it), the ranker the mask."""
    payloads = _payloads(3)
    payloads["item_audio"] = np.array([[b""]] * 3, dtype=object)
    payloads["item_image"][1, 0] = b""
    present = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0]], dtype=bool)
    videos = np.array([[b""], [b""], [clip]], dtype=object)
    request = {**payloads, "user_history": _history(ci_spec, 3), "modality_present": present, "item_video": videos}
    (response,) = preprocess.execute([FakeRequest(request)])
    out = _outputs(response)
    frames = ci_spec.modalities.video.frames
    np.testing.assert_array_equal(out["image_owner"][:, 0], [0, 2] + [2] * frames)
    assert out["pixel_values"].shape[0] == 2 + frames
    np.testing.assert_array_equal(out["audio_owner"], [[-1]])
    assert out["log_mel"].shape[0] == 1
    np.testing.assert_array_equal(out["modality_mask"], present.astype(np.float32))


def test_pool_model_puts_rows_back_in_candidate_order(pb, ci_spec, tmp_path):
    pool = _init(PoolModel, ci_spec, "pool_embeddings", tmp_path)
    dims = {m: ci_spec.modalities.embedding_dim(m) for m in ci_spec.modalities.enabled}
    rng = np.random.default_rng(0)
    inputs = {"modality_mask": np.ones((3, 3), np.float32)}
    owners = {"text": [0, 1, 2], "image": [2, 0, 2, 2], "audio": [-1]}
    for m, d in dims.items():
        inputs[f"{m.value}_rows"] = rng.normal(size=(len(owners[m.value]), d)).astype(np.float32)
        inputs[f"{m.value}_owner"] = np.array(owners[m.value], np.int64)[:, None]
    (response,) = pool.execute([FakeRequest(inputs)])
    out = _outputs(response)
    np.testing.assert_array_equal(out["text_embedding"], inputs["text_rows"])
    image = inputs["image_rows"]
    np.testing.assert_allclose(out["image_embedding"], [image[1], np.zeros_like(image[0]), image[[0, 2, 3]].mean(0)],
                               rtol=1e-6)
    np.testing.assert_array_equal(out["audio_embedding"], np.zeros((3, dims[Modality.AUDIO]), np.float32))


def test_bad_request_fails_alone_naming_input_and_row(preprocess, ci_spec):
    good_a = {**_payloads(2), "user_history": _history(ci_spec, 2)}
    bad_history = {**_payloads(3), "user_history": _history(ci_spec, 3)}
    bad_history["user_history"][1, 4] = ci_spec.ranker.history.vocab_size  # out of vocabulary
    bad_image = {**_payloads(2), "user_history": _history(ci_spec, 2)}
    bad_image["item_image"] = bad_image["item_image"].copy()
    bad_image["item_image"][1, 0] = bad_image["item_image"][1, 0][:200]  # truncated JPEG
    good_b = {**_payloads(1, size=(64, 90)), "user_history": _history(ci_spec, 1)}
    responses = preprocess.execute([FakeRequest(r) for r in (good_a, bad_history, bad_image, good_b)])
    assert responses[0].error is None and responses[3].error is None
    assert _outputs(responses[0])["pixel_values"].shape[0] == 2
    np.testing.assert_array_equal(_outputs(responses[3])["history"], _history(ci_spec, 1))
    assert responses[1].error.code == FakeError.INVALID_ARG
    assert responses[1].error.message.startswith("user_history[1]")
    assert responses[2].error.code == FakeError.INVALID_ARG
    assert responses[2].error.message.startswith("item_image[1]")


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
    _tiny_onnx(version_dir / ci_spec.export.cpu.onnx_file("audio_encoder"))  # the file the CPU profile serves
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


def test_text_rows_of_different_buckets_share_an_execute_and_run_each_shape_on_its_own(pb, ci_spec, tmp_path,
                                                                                        monkeypatch):
    """The CPU text encoder allows ragged batches (Triton's batcher held requests of different padding buckets apart
    and the second sometimes waited 500 ms for its wake-up: `fusionrank bench mixed_shapes`), so one execute may hold
    several shapes: each shape's rows run together, and each request gets its own rows back."""
    from fusionrank.contract.spec import ServingProfile

    configs = model_configs(ci_spec)
    text = configs["text_encoder"][ServingProfile.CPU]
    assert text.input and all(i.allow_ragged_batch for i in text.input), "its inputs have a variable length"
    assert not any(i.allow_ragged_batch for i in configs["image_encoder"][ServingProfile.CPU].input)
    version_dir = tmp_path / "text_encoder" / "1"
    version_dir.mkdir(parents=True)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("text_embedding", TensorProto.FLOAT, ["batch", 1])
    nodes = [helper.make_node("Mul", ["input_ids", "attention_mask"], ["kept"]),
             helper.make_node("Cast", ["kept"], ["real"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["real", "axis"], ["text_embedding"], keepdims=1)]
    axis = helper.make_tensor("axis", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(nodes, "g", [ids, mask], [out], [axis])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
              str(version_dir / ci_spec.export.cpu.onnx_file("text_encoder")))
    model = _init(OnnxRuntimeModel, ci_spec, "text_encoder", version_dir)
    calls = []
    real_run = model.session.run
    monkeypatch.setattr(model.session, "run", lambda names, feed: calls.append(feed["input_ids"].shape) or
                        real_run(names, feed))
    shapes = [(1, 16), (2, 32), (1, 16)]
    batches = [np.full(shape, k + 1, dtype=np.int64) for k, shape in enumerate(shapes)]
    responses = model.execute([FakeRequest({"input_ids": b, "attention_mask": np.ones_like(b)}) for b in batches])
    assert sorted(calls) == [(2, 16), (2, 32)], "one session call per shape"
    for batch, response in zip(batches, responses):
        np.testing.assert_array_equal(_outputs(response)["text_embedding"], batch.sum(axis=1, keepdims=True))


def test_encoders_run_their_batches_at_batch_work_priority_and_the_ranker_does_not(pb, ci_spec, tmp_path,
                                                                                    monkeypatch):
    """Only never-seen items reach an encoder: its batches run at `BATCH_WORK_NICENESS`, so the route's event loop
    (refusals, cached answers) and the ranker every request needs get a busy core first."""
    from fusionrank.contract.spec import ServingProfile
    from fusionrank.triton._batched import BATCH_WORK_NICENESS

    configs = model_configs(ci_spec)
    flags = {m: configs[m][ServingProfile.CPU].parameters["background_priority"].string_value
             for m in ("text_encoder", "image_encoder", "audio_encoder", "fusion_ranker")}
    assert flags == {"text_encoder": "true", "image_encoder": "true", "audio_encoder": "true", "fusion_ranker": ""}
    version_dir = tmp_path / "audio_encoder" / "1"
    version_dir.mkdir(parents=True)
    _tiny_onnx(version_dir / ci_spec.export.cpu.onnx_file("audio_encoder"))
    seen = []

    def serve():  # in a thread of its own: the test runner's thread keeps its priority
        model = _init(OnnxRuntimeModel, ci_spec, "audio_encoder", version_dir)
        real_run = model.session.run
        monkeypatch.setattr(model.session, "run", lambda names, feed: seen.append(
            os.getpriority(os.PRIO_PROCESS, threading.get_native_id())) or real_run(names, feed))
        model.execute([FakeRequest({"log_mel": np.ones((2, 4), dtype=np.float32)})])

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    worker = threading.Thread(target=serve)
    worker.start()
    worker.join()
    assert seen == [max(base, BATCH_WORK_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


def _audio_encoder(ci_spec, tmp_path, **batching):
    serving = ci_spec.serving
    models = {**serving.models, "audio_encoder": dataclasses.replace(serving.batching("audio_encoder"), **batching)}
    spec = ci_spec.with_overrides(serving=dataclasses.replace(serving, models=models))
    version_dir = tmp_path / "audio_encoder" / "1"
    version_dir.mkdir(parents=True)
    _tiny_onnx(version_dir / spec.export.cpu.onnx_file("audio_encoder"))
    return _init(OnnxRuntimeModel, spec, "audio_encoder", version_dir)


def _concurrent_audio_encoder(ci_spec, tmp_path, batches: int):
    return _audio_encoder(ci_spec, tmp_path, concurrent_batches=batches)


@pytest.mark.parametrize("arena", [False, True])
def test_the_session_keeps_a_memory_arena_only_where_the_spec_asks(pb, ci_spec, tmp_path, arena):
    model = _audio_encoder(ci_spec, tmp_path, memory_arena=arena)
    assert model.session.get_session_options().enable_cpu_mem_arena is arena
    out = model.execute([FakeRequest({"log_mel": np.ones((2, 4), dtype=np.float32)})])
    np.testing.assert_array_equal(_outputs(out[0])["audio_embedding"], np.full((2, 4), 2.0))


def test_an_instance_runs_concurrent_batches_on_its_one_session(pb, ci_spec, tmp_path, monkeypatch):
    """`concurrent_batches: 2`: execute hands its batch to a worker and returns (None) while a slot is free, each
    request answered once, final, through its sender; two batches run at once on the one session."""
    model = _concurrent_audio_encoder(ci_spec, tmp_path, 2)
    both_running = threading.Barrier(2, timeout=10)  # a second batch that never starts alongside breaks it
    real_run = model.session.run
    monkeypatch.setattr(model.session, "run", lambda names, feed: both_running.wait() >= 0 and real_run(names, feed))
    requests = [FakeRequest({"log_mel": np.full((n, 4), n, dtype=np.float32)}) for n in (1, 3)]
    assert model.execute([requests[0]]) is None
    assert model.execute([requests[1]]) is None
    model.finalize()  # waits for the workers
    for n, request in zip((1, 3), requests):
        assert request.final and len(request.sent) == 1
        np.testing.assert_array_equal(_outputs(request.sent[0])["audio_embedding"], np.full((n, 4), 2.0 * n))
    # Triton's timing stops at the hand-off: the member counts its batches' time itself.
    assert pb.MetricFamily.families[BATCH_COMPUTE_METRIC].total(model="audio_encoder") > 0


def test_concurrent_batches_count_their_time_one_update_at_a_time(pb, ci_spec, tmp_path, monkeypatch):
    """Two workers updating one pb_utils metric at once crashed Triton 2.51 (the stub rewrites the metric's shared
    memory with the GIL released): the updates are serialised."""
    model = _concurrent_audio_encoder(ci_spec, tmp_path, 2)
    both_running = threading.Barrier(2, timeout=10)
    real_run = model.session.run
    monkeypatch.setattr(model.session, "run", lambda names, feed: both_running.wait() >= 0 and real_run(names, feed))
    together, overlapped = threading.Barrier(2, timeout=0.5), []

    def increment(value):  # both workers inside at once pass the barrier; one at a time, the first one breaks it
        try:
            together.wait()
            overlapped.append(value)
        except threading.BrokenBarrierError:
            pass

    monkeypatch.setattr(model.concurrent.compute_us, "increment", increment)
    requests = [FakeRequest({"log_mel": np.ones((1, 4), dtype=np.float32)}) for _ in range(2)]
    for request in requests:
        model.execute([request])
    model.finalize()
    assert all(r.final for r in requests) and together.broken and not overlapped


def test_a_concurrent_batch_that_fails_answers_each_request_and_frees_its_slot(pb, ci_spec, tmp_path, monkeypatch):
    model = _concurrent_audio_encoder(ci_spec, tmp_path, 2)
    real_run = model.session.run
    failing = iter([True, False])
    monkeypatch.setattr(model.session, "run", lambda names, feed: real_run(names, feed) if not next(failing)
                        else 1 / 0)
    bad = [FakeRequest({"log_mel": np.ones((2, 4), dtype=np.float32)}) for _ in range(2)]
    good = FakeRequest({"log_mel": np.ones((1, 4), dtype=np.float32)})
    model.execute(bad)
    model.execute([good])  # a slot is free again: the failed batch released its own
    model.finalize()
    assert [r.sent[0].error.code for r in bad] == [FakeError.INTERNAL] * 2
    np.testing.assert_array_equal(_outputs(good.sent[0])["audio_embedding"], np.full((1, 4), 2.0))
    assert model.concurrent.free._value == 2, "every slot back"


def _tiny_ranker_onnx(path):
    """click_probability = log(mean(text_embedding)) (NaN for a negative mean), modality_weights = image_embedding:
    stands in for the exported ranker, with its tensor names; the other inputs are unused."""
    def value(name, dims):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT if name != "history" else TensorProto.INT64, dims)

    inputs = [value("text_embedding", ["batch", "d"]), value("image_embedding", ["batch", 3]),
              value("audio_embedding", ["batch", "a"]), value("history", ["batch", "h"]),
              value("modality_mask", ["batch", 3])]
    outputs = [value("click_probability", ["batch", 1]), value("modality_weights", ["batch", 3])]
    nodes = [helper.make_node("ReduceMean", ["text_embedding"], ["mean"], keepdims=1, axes=[1]),
             helper.make_node("Log", ["mean"], ["click_probability"]),
             helper.make_node("Identity", ["image_embedding"], ["modality_weights"])]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_ensembles_ranker_step_answers_a_non_finite_output_invalid_naming_the_row(pb, ci_spec, tmp_path):
    version_dir = tmp_path / "fusion_ranker" / "1"
    version_dir.mkdir(parents=True)
    _tiny_ranker_onnx(version_dir / ci_spec.export.cpu.onnx_file("fusion_ranker"))
    model = _init(OnnxRuntimeModel, ci_spec, "fusion_ranker", version_dir)

    def request(text_means):
        n = len(text_means)
        return FakeRequest({"text_embedding": np.array(text_means, np.float32)[:, None].repeat(4, axis=1),
                            "image_embedding": np.full((n, 3), 1 / 3, np.float32),
                            "audio_embedding": np.zeros((n, 2), np.float32), "history": np.zeros((n, 5), np.int64),
                            "modality_mask": np.ones((n, 3), np.float32)})

    good, bad, weights_bad = request([0.5, 0.25]), request([0.5, 0.5, -1.0]), request([0.5])
    weights_bad.inputs["image_embedding"][0, 2] = np.inf
    responses = model.execute([good, bad, weights_bad])
    assert responses[0].error is None
    np.testing.assert_allclose(_outputs(responses[0])["click_probability"][:, 0], np.log([0.5, 0.25]), rtol=1e-6)
    assert responses[1].error.code == FakeError.INVALID_ARG
    assert responses[1].error.message.startswith("click_probability[2]: fusion_ranker produced a non-finite value")
    assert responses[2].error.code == FakeError.INVALID_ARG
    assert responses[2].error.message.startswith("modality_weights[0]: ")


def test_preprocess_refuses_more_image_rows_than_the_encoder_takes_in_one_call(pb, ci_spec, tmp_path, clip):
    """The ensemble sends a modality's rows in one call: a request whose clips need more frames than the image
    encoder's max batch is INVALID_ARG naming item_video (the route would cut its calls instead)."""
    import dataclasses

    from fusionrank.contract.paths import resolve_text_checkpoint
    from fusionrank.contract.spec import BatchingSpec

    models = {**ci_spec.serving.models, "image_encoder": BatchingSpec(max_batch_size=4, preferred_batch_sizes=(4,))}
    spec = ci_spec.with_overrides(serving=dataclasses.replace(ci_spec.serving, max_candidates=4, models=models))
    version_dir = tmp_path / "preprocess" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "tokenizer").symlink_to(resolve_text_checkpoint(spec.modalities.text.encoder.checkpoint))
    model = _init(PreprocessModel, spec, "preprocess", version_dir)
    request = {**_payloads(2), "user_history": _history(spec, 2), "item_video": np.array([[clip]] * 2, dtype=object)}
    (too_many,) = model.execute([FakeRequest(request)])
    assert too_many.error.code == FakeError.INVALID_ARG
    assert too_many.error.message.startswith("item_video: the request needs 8 image encoder rows")
    video_only = np.array([[b""], [request["item_image"][1, 0]]], dtype=object)  # row 0: its clip, no still
    (fits,) = model.execute([FakeRequest({**request, "item_image": video_only,
                                          "item_video": np.array([[clip], [b""]], dtype=object)})])
    assert fits.error is None and _outputs(fits)["image_owner"][:, 0].tolist() == [1, 0, 0, 0]
