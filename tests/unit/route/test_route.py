"""The route callers use (`fusionrank.route.stages`), without a server: the real in-process preprocessing, the
members replaced by small numpy functions, and its Triton shell on a fake `pb_utils`."""

from __future__ import annotations

import asyncio
import dataclasses
import io

import numpy as np
import pytest
from google.protobuf import json_format

from fusionrank.contract.spec import Modality
from fusionrank.contract.tensors import CLICK_PROBABILITY, MODALITY_WEIGHTS, request_arrays
from fusionrank.request.validation import RequestPreprocessor
from fusionrank.route.members import MemberCallError, RouteError, Status
from fusionrank.route.stages import RankingRoute, RouteRequest
from fusionrank.triton.render import model_configs
from tests.fakes.pb_utils import (
    FakeError,
    FakeMemberError,
    FakeMetricFamily,
    FakeRequest,
    FakeTritonModelException,
    install,
    route_responses,
)


def _one_column(values: np.ndarray, dim: int) -> np.ndarray:
    out = np.zeros((len(values), dim), dtype=np.float32)
    out[:, 0] = values
    return out


def member_functions(spec) -> dict:
    """Stand-ins for the members: each row's output depends on that row's input only, as in the real models."""
    dims = {m: spec.modalities.embedding_dim(m) for m in spec.modalities.enabled}

    def ranker(a):
        score = sum(a[f"{m.value}_embedding"][:, 0] for m in spec.modalities.enabled) + a["history"].sum(1) * 1e-3
        weights = np.repeat(np.array([[0.5, 0.3, 0.2]], dtype=np.float32), len(score), axis=0)
        return {CLICK_PROBABILITY: (1 / (1 + np.exp(-score)))[:, None].astype(np.float32), MODALITY_WEIGHTS: weights}

    return {
        "text_encoder": lambda a: {"text_embedding": _one_column((a["input_ids"] * a["attention_mask"]).sum(1) * 1e-4,
                                                                 dims[Modality.TEXT])},
        "image_encoder": lambda a: {"image_embedding": _one_column(a["pixel_values"].reshape(len(a["pixel_values"]), -1)
                                                                   .mean(1), dims[Modality.IMAGE])},
        "audio_encoder": lambda a: {"audio_embedding": _one_column(a["log_mel"].reshape(len(a["log_mel"]), -1).mean(1)
                                                                   * 1e-2, dims[Modality.AUDIO])},
        "fusion_ranker": ranker,
    }


class Members:
    """The `Infer` callable of the route: runs the stand-ins, records (model, rows) per call."""

    def __init__(self, spec):
        self.functions = member_functions(spec)
        self.calls: list[tuple[str, int]] = []
        self.deadlines: list[float | None] = []

    async def __call__(self, model, inputs, outputs, deadline=None):
        self.calls.append((model, len(next(iter(inputs.values())))))
        self.deadlines.append(deadline)
        await asyncio.sleep(0)  # let the other calls of the execute start, as BLS calls do
        result = self.functions[model](inputs)
        return {n: result[n] for n in outputs}

    def rows(self, model: str) -> list[int]:
        return [rows for m, rows in self.calls if m == model]


def _route(spec, preparer, members=None, errors=None, cache=None, slots=64):
    """A route over fake members. `slots`: its gate's (`max_decoding_requests`), all open from the start (the gate
    adapts up from 1); many by default, as these tests look at the requests of one execute passing the stages
    together (tests/unit/route/test_admission.py: the gate)."""
    admission = dataclasses.replace(spec.serving.admission, max_decoding_requests=slots)
    spec = spec.with_overrides(serving=dataclasses.replace(spec.serving, admission=admission))
    members = members or Members(spec)
    route = RankingRoute(spec, preparer, members, log_error=(errors.append if errors is not None else print),
                         cache=cache)
    route.gate.slots = slots
    return route, members


def _request(spec, n: int, seed: int = 0, title: bytes = b"hiking boots for wet trails") -> dict[str, np.ndarray]:
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, sounds = [], []
    for _ in range(n):
        image, wav = io.BytesIO(), io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 70, 3), dtype=np.uint8)).save(image, format="PNG")
        sf.write(wav, rng.uniform(-0.5, 0.5, 8000).astype(np.float32), 16000, format="WAV")
        images.append(image.getvalue())
        sounds.append(wav.getvalue())
    history = np.repeat(rng.integers(1, spec.ranker.history.vocab_size, (1, spec.ranker.history.length)), n, axis=0)
    titles = [title + b" %d" % i for i in range(n)]
    return request_arrays({Modality.TEXT: titles, Modality.IMAGE: images, Modality.AUDIO: sounds}, history)


def _rank(route, *inputs, cancelled=()):
    requests = [RouteRequest(arrays, (lambda i=i: i in cancelled)) for i, arrays in enumerate(inputs)]
    return asyncio.run(route.rank(requests))


def test_requests_of_one_execute_share_one_call_per_encoder_and_come_back_in_order(ci_spec, preparer):
    requests = [_request(ci_spec, n, seed=n) for n in (2, 3, 1)]
    route, members = _route(ci_spec, preparer)
    together = _rank(route, *requests)
    for modality in ci_spec.modalities.enabled:
        assert members.rows(f"{modality.value}_encoder") == [6], "one call with every request's rows"
    assert sorted(members.rows("fusion_ranker")) == [1, 2, 3], "one ranker call per request"
    for request, result in zip(requests, together):
        alone = _rank(_route(ci_spec, preparer)[0], request)[0]
        assert result[CLICK_PROBABILITY].shape == (len(request["user_history"]), 1)
        np.testing.assert_array_equal(result[CLICK_PROBABILITY], alone[CLICK_PROBABILITY])
        np.testing.assert_array_equal(result[MODALITY_WEIGHTS], alone[MODALITY_WEIGHTS])
    assert len({float(r[CLICK_PROBABILITY][0, 0]) for r in together}) == 3, "each request got its own scores"


def test_text_padded_to_different_buckets_goes_in_separate_calls(ci_spec, preparer):
    long_title = b" ".join([b"waterproof"] * 20)
    route, members = _route(ci_spec, preparer)
    results = _rank(route, _request(ci_spec, 2), _request(ci_spec, 2, title=long_title), _request(ci_spec, 1))
    assert not any(isinstance(r, RouteError) for r in results)
    assert sorted(members.rows("text_encoder")) == [2, 3]
    assert members.rows("image_encoder") == [5]


def test_a_bad_request_fails_alone_before_any_member_sees_it(ci_spec, preparer):
    good = _request(ci_spec, 2)
    bad_history = {**_request(ci_spec, 3), "user_history": _request(ci_spec, 3)["user_history"].copy()}
    bad_history["user_history"][2, 5] = -4
    bad_image = _request(ci_spec, 2)
    bad_image["item_image"] = bad_image["item_image"].copy()
    bad_image["item_image"][1, 0] = b"\x89PNG\r\n\x1a\n truncated"
    route, members = _route(ci_spec, preparer)
    results = _rank(route, good, bad_history, bad_image, good)
    assert results[1] == RouteError(Status.INVALID_ARG, results[1].message)
    assert results[1].message.startswith("user_history[2]: negative item id -4")
    assert results[2].status is Status.INVALID_ARG and results[2].message.startswith("item_image[1]: ")
    np.testing.assert_array_equal(results[0][CLICK_PROBABILITY], results[3][CLICK_PROBABILITY])
    assert members.rows("image_encoder") == [4], "only the good requests' rows were encoded"


def test_too_many_candidates_and_no_candidates_are_invalid(ci_spec, preparer):
    route, members = _route(ci_spec, preparer)
    big = _request(ci_spec, 1)
    big = {n: np.repeat(a, ci_spec.serving.max_candidates + 1, axis=0) for n, a in big.items()}
    empty = {n: a[:0] for n, a in _request(ci_spec, 1).items()}
    results = _rank(route, big, empty)
    assert results[0].status is Status.INVALID_ARG and results[0].message == \
        f"item_text: 65 candidates; at most {ci_spec.serving.max_candidates} per request"
    assert results[1].status is Status.INVALID_ARG and "the request has no candidates (0 rows)" in results[1].message
    assert members.calls == []


class CancelAfter:
    """A request's `is_cancelled` that turns True after it has been asked `checks` times."""

    def __init__(self, checks: int):
        self.left = checks

    def __call__(self) -> bool:
        self.left -= 1
        return self.left < 0


class ValidateSpy(RequestPreprocessor):
    """The real preprocessor, recording the row count of every request it validates."""

    def __init__(self, real: RequestPreprocessor):
        self.__dict__.update(real.__dict__)
        self.validated: list[int] = []

    def validate(self, inputs):
        self.validated.append(len(inputs["user_history"]))
        return super().validate(inputs)


def test_cancelled_requests_are_answered_cancelled_and_skip_the_remaining_stages(ci_spec, preparer, monkeypatch):
    spy = ValidateSpy(preparer)
    route, members = _route(ci_spec, spy)
    # Rows 2, 3, 4, 5, 6: cancelled from the start, after the cache lookup (before decoding), after preprocessing,
    # after encoding, never.
    requests = [RouteRequest(_request(ci_spec, n), CancelAfter(checks))
                for n, checks in ((2, 0), (3, 1), (4, 2), (5, 3), (6, 99))]
    results = asyncio.run(route.rank(requests))
    assert [r.status for r in results[:4]] == [Status.CANCELLED] * 4
    assert results[4][CLICK_PROBABILITY].shape == (6, 1)
    assert spy.validated == [3, 4, 5, 6], "a request cancelled before its turn is not validated nor preprocessed"
    assert members.rows("image_encoder") == [11], "cancelled before decoding or after preprocessing: not encoded"
    assert members.rows("fusion_ranker") == [6], "cancelled after encoding: not ranked"


def _poisoned(members: Members, model: str, output: str, row_of_call: int, value: float, call: int = 0):
    real, seen = members.functions[model], []

    def poisoned(arrays):
        out = {k: v.copy() for k, v in real(arrays).items()}
        if len(seen) == call:
            out[output][row_of_call] = value
        seen.append(1)
        return out

    members.functions[model] = poisoned


def test_no_nan_or_infinity_leaves_the_route(ci_spec, preparer):
    errors: list[str] = []
    members = Members(ci_spec)
    _poisoned(members, "image_encoder", "image_embedding", row_of_call=3, value=np.nan)  # request 1, row 1
    _poisoned(members, "fusion_ranker", CLICK_PROBABILITY, row_of_call=0, value=np.inf)  # the first ranker call
    route, _ = _route(ci_spec, preparer, members, errors)
    results = _rank(route, _request(ci_spec, 2), _request(ci_spec, 2, seed=1), _request(ci_spec, 3, seed=2))
    assert results[1] == RouteError(Status.INVALID_ARG, "item_image[1]: the image encoder produced a non-finite "
                                                        "embedding; this candidate cannot be scored")
    bad_rank = [r for r in (results[0], results[2]) if isinstance(r, RouteError)]
    assert len(bad_rank) == 1 and bad_rank[0].status is Status.INVALID_ARG
    assert bad_rank[0].message.startswith("click_probability[0]: the ranker produced a non-finite value")
    good = [r for r in results if not isinstance(r, RouteError)]
    assert len(good) == 1 and np.isfinite(good[0][CLICK_PROBABILITY]).all()
    assert len(errors) == 2 and all("non-finite" in e for e in errors), "logged for the operator"


def test_preprocessing_that_yields_a_nan_is_invalid_input(ci_spec, preparer, monkeypatch):
    real = preparer.preprocessors[Modality.IMAGE]

    def nan_row(rows):
        out = real(rows)
        out["pixel_values"][len(rows) - 1, 0, 0, 0] = np.nan
        return out

    nan_row.header = real.header  # the payloads' headers are fine: the NaN comes from preprocessing
    monkeypatch.setitem(preparer.preprocessors, Modality.IMAGE, nan_row)
    route, members = _route(ci_spec, preparer)
    (result,) = _rank(route, _request(ci_spec, 3))
    assert result.status is Status.INVALID_ARG and result.message.startswith("item_image[2]: preprocessing produced "
                                                                             "non-finite values")
    assert members.calls == []


def test_a_failed_member_call_fails_only_the_requests_it_held(ci_spec, preparer):
    members = Members(ci_spec)
    real_ranker = members.functions["fusion_ranker"]

    def ranker(arrays):
        if len(arrays["history"]) == 2:
            raise MemberCallError("fusion_ranker", "out of memory")
        if len(arrays["history"]) == 3:
            raise MemberCallError("fusion_ranker", "click_probability[1]: non-finite", Status.INVALID_ARG)
        return real_ranker(arrays)

    members.functions["fusion_ranker"] = ranker
    errors: list[str] = []
    route, _ = _route(ci_spec, preparer, members, errors)
    results = _rank(route, _request(ci_spec, 2), _request(ci_spec, 3), _request(ci_spec, 4))
    assert results[0] == RouteError(Status.INTERNAL, "route: fusion_ranker failed (see server log)")
    assert results[1] == RouteError(Status.INVALID_ARG, "click_probability[1]: non-finite"), "its own row: passed on"
    assert results[2][CLICK_PROBABILITY].shape == (4, 1)
    assert any("out of memory" in e for e in errors)

    members.functions["audio_encoder"] = lambda arrays: (_ for _ in ()).throw(
        MemberCallError("audio_encoder", "model is not ready", Status.UNAVAILABLE))
    results = _rank(route, _request(ci_spec, 2), _request(ci_spec, 1))
    assert [r.status for r in results] == [Status.UNAVAILABLE] * 2
    assert results[0].message == "audio_encoder is unavailable: model is not ready"


def test_member_calls_are_cut_at_the_members_max_batch(ci_spec, preparer):
    small = dataclasses.replace(ci_spec.serving.batching("image_encoder"), max_batch_size=4,
                                preferred_batch_sizes=(4,))
    serving = dataclasses.replace(ci_spec.serving, max_candidates=4,
                                  models={**ci_spec.serving.models, "image_encoder": small})
    spec = dataclasses.replace(ci_spec, serving=serving)
    requests = [_request(spec, n, seed=n) for n in (3, 3, 2)]
    route, members = _route(spec, preparer)
    results = _rank(route, *requests)
    assert members.rows("image_encoder") == [4, 4], "8 rows cut at 4: the second request spans both calls"
    for request, result in zip(requests, results):
        alone = _rank(_route(spec, preparer)[0], request)[0]
        np.testing.assert_array_equal(result[CLICK_PROBABILITY], alone[CLICK_PROBABILITY])


# --- the Triton shell ---------------------------------------------------------------------------------------------


@pytest.fixture
def route_model(monkeypatch, ci_spec, tmp_path):
    from fusionrank.contract.paths import resolve_text_checkpoint
    from fusionrank.triton.route import RouteModel

    # Every member GPU-resident, as the gpu profile's TensorRT engines: the route reads them only if it asks for CPU.
    functions = member_functions(ci_spec)
    pb = install(monkeypatch, functions, gpu_members=functions)
    repo = tmp_path / "repo"
    (repo / "preprocess" / "1").mkdir(parents=True)
    (repo / "preprocess" / "1" / "tokenizer").symlink_to(resolve_text_checkpoint(ci_spec.modalities.text.encoder
                                                                                 .checkpoint))
    for modality in ci_spec.modalities.enabled:  # the files the cache keys digest (stand-ins: members are fakes)
        model = f"{modality.value}_encoder"
        (repo / model / "1").mkdir(parents=True)
        (repo / model / "1" / ci_spec.export.cpu.onnx_file(model)).write_bytes(modality.value.encode())
    config = model_configs(ci_spec)[ci_spec.serving.route]["cpu"]
    model = RouteModel()
    model.initialize({"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
                      "model_repository": str(repo / ci_spec.serving.route), "model_version": "1"})
    return model, pb


def test_shell_answers_each_request_with_its_outputs_or_its_error_code(route_model, ci_spec):
    model, pb = route_model
    good = _request(ci_spec, 2)
    bad = {**_request(ci_spec, 1), "item_text": np.array([[b"\xff\xfe"]], dtype=object)}
    responses = route_responses(model, [FakeRequest(good), FakeRequest(bad), FakeRequest(good, cancelled=True)])
    outputs = {t.name: t.array for t in responses[0].output_tensors}
    assert responses[0].error is None and outputs[CLICK_PROBABILITY].shape == (2, 1)
    assert outputs[MODALITY_WEIGHTS].shape == (2, 3)
    assert responses[1].error.code == FakeError.INVALID_ARG and responses[1].error.message.startswith("item_text[0]")
    assert responses[2].error.code == FakeError.CANCELLED and responses[2].output_tensors == []
    assert [m for m, _ in pb.calls].count("image_encoder") == 1


def test_shell_reads_gpu_resident_members_by_asking_for_their_outputs_in_cpu_memory(route_model, ci_spec):
    model, pb = route_model
    (response,) = route_responses(model, [FakeRequest(_request(ci_spec, 2))])
    assert response.error is None, response.error
    assert pb.memories and all(m == pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0) for m in pb.memories)
    # Without it, a GPU member's outputs stay on the GPU and cannot be read as NumPy (the real backend's message).
    request = pb.InferenceRequest("audio_encoder", [pb.Tensor("log_mel", np.zeros((1, 4, 4), np.float32))],
                                  ["audio_embedding"])
    tensor = pb.get_output_tensor_by_name(asyncio.run(request.async_exec()), "audio_embedding")
    assert not tensor.is_cpu()
    with pytest.raises(FakeTritonModelException, match="Tensor is stored in GPU and cannot be converted to NumPy"):
        tensor.as_numpy()


def test_shell_maps_member_errors_to_status_codes(route_model, ci_spec):
    model, pb = route_model
    pb.members["text_encoder"] = lambda arrays: FakeMemberError("model 'text_encoder' is not ready",
                                                                FakeError.NOT_FOUND)
    (response,) = route_responses(model, [FakeRequest(_request(ci_spec, 1))])
    assert response.error.code == FakeError.UNAVAILABLE and "text_encoder" in response.error.message
    pb.members["text_encoder"] = lambda arrays: FakeMemberError("onnxruntime: bad alloc", FakeError.INTERNAL)
    (response,) = route_responses(model, [FakeRequest(_request(ci_spec, 1))])
    assert response.error.code == FakeError.INTERNAL and "bad alloc" not in response.error.message
    # A stopping server: the Python backend reports the call it could not submit with its own code (INTERNAL) and
    # Triton's message; the caller must be able to retry on another server.
    pb.members["text_encoder"] = lambda arrays: FakeMemberError(
        "Model text_encoder - Error when running inference: Server not ready", FakeError.INTERNAL)
    (response,) = route_responses(model, [FakeRequest(_request(ci_spec, 1))])
    assert response.error.code == FakeError.UNAVAILABLE


def test_shell_publishes_the_cache_counters_as_triton_metrics(route_model, ci_spec):
    model, pb = route_model
    for _ in range(2):
        route_responses(model, [FakeRequest(_request(ci_spec, 3))])
    families = FakeMetricFamily.families
    hits, misses = families["fusionrank_cache_hits"], families["fusionrank_cache_misses"]
    assert misses.total() == 9 and hits.total(tier="lru") == 9 and hits.total(modality="image") == 3
    assert families["fusionrank_cache_bytes"].total() > 0
    assert families["fusionrank_cache_store_errors"].total() == 0
    assert {m.labels["instance"] for m in hits.metrics} == {model.metrics.hits[Modality.TEXT, "lru"].labels["instance"]}


def test_shell_counts_every_response_by_the_status_the_caller_sees(route_model, ci_spec):
    model, pb = route_model
    responses = FakeMetricFamily.families["fusionrank_route_responses"]
    assert {m.labels["code"] for m in responses.metrics} >= {"OK", "INVALID_ARGUMENT", "CANCELLED", "INTERNAL"}
    assert responses.total() == 0, "every series exists at 0 before the first request"
    good = _request(ci_spec, 2)
    bad = {**_request(ci_spec, 1), "item_text": np.array([[b"\xff\xfe"]], dtype=object)}
    route_responses(model, [FakeRequest(good), FakeRequest(bad), FakeRequest(bad), FakeRequest(good, True)])
    pb.members["text_encoder"] = lambda arrays: FakeMemberError("onnxruntime: bad alloc", FakeError.INTERNAL)
    route_responses(model, [FakeRequest(_request(ci_spec, 1, title=b"not in the cache yet"))])
    counts = {m.labels["code"]: m.value for m in responses.metrics if m.value}
    assert counts == {"OK": 1, "INVALID_ARGUMENT": 2, "CANCELLED": 1, "INTERNAL": 1}
    assert {m.labels["model"] for m in responses.metrics} == {ci_spec.serving.route}


def test_shell_answers_its_requests_when_the_metric_update_fails(route_model, ci_spec, monkeypatch):
    model, pb = route_model

    def broken(self, value):
        raise RuntimeError("metrics server gone")

    monkeypatch.setattr(type(model.responses.metrics["OK"]), "increment", broken)
    (response,) = route_responses(model, [FakeRequest(_request(ci_spec, 1))])
    assert response.error is None
    assert any("publishing response metrics failed" in e for e in pb.Logger.errors)
