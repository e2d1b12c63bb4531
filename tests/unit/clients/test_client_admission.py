"""The ranking client under admission control (issue 19), without a server: over-capacity refusals retried on
another endpoint, the call's deadline and priority sent with every request, structured invalid-input errors,
`on_invalid="drop"`, concurrent chunks, and a client built from the server's model config instead of a spec."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from clients import AsyncRankingClient, Candidate, InvalidInputError, OverCapacityError, RankingClient, RetryPolicy
from clients._server_config import spec_from_config
from clients.errors import UnavailableError, parse_input, to_client_error
from fusionrank.contract.spec import Modality, PipelineSpec, Priority
from fusionrank.contract.tensors import PRIORITY_PARAMETER
from fusionrank.route.stages import LATE
from fusionrank.triton.render import model_configs
from tests.fakes.clients import FakeAsyncTriton, FakeTriton

SPEC = PipelineSpec()
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, jitter=0.0)


def _err(status: str, message: str) -> InferenceServerException:
    return InferenceServerException(message, status=status)


def _candidates(n: int) -> list[Candidate]:
    return [Candidate(text=str(i), image=b"i", audio=b"a", item_id=f"sku-{i}") for i in range(n)]


class Recording(FakeTriton):
    """Records the per-request keyword arguments (priority, timeout) and the most calls in flight at once."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.kwargs: list[dict] = []
        self.in_flight = self.most_in_flight = 0
        self.guard = threading.Lock()

    def async_infer(self, model, inputs, callback, client_timeout=None, **kw):
        self.kwargs.append(kw)
        with self.guard:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

        def done(result=None, error=None):
            with self.guard:
                self.in_flight -= 1
            callback(result=result, error=error)

        super().async_infer(model, inputs, done, client_timeout)


class RecordingAsync(FakeAsyncTriton):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.kwargs: list[dict] = []

    async def infer(self, model, inputs, client_timeout=None, **kw):
        self.kwargs.append(kw)
        return await super().infer(model, inputs, client_timeout)


def _client(cls, fakes, **kw):
    return cls(SPEC, list(fakes), client_factory=lambda url: fakes[url], retry=FAST_RETRY, **kw)


def _run(cls, value):
    return asyncio.run(value) if cls is AsyncRankingClient else value


@pytest.mark.parametrize("message", ["Exceeds maximum queue size", "Request timeout expired", LATE])
def test_refusals_of_a_server_past_its_capacity_are_over_capacity_errors(message):
    error = to_client_error(_err("StatusCode.UNAVAILABLE", message), "a:1")
    assert isinstance(error, OverCapacityError) and isinstance(error, UnavailableError)
    assert str(error).startswith("server over capacity: ")
    assert not isinstance(to_client_error(_err("StatusCode.UNAVAILABLE", "Socket closed")), OverCapacityError)


@pytest.mark.parametrize("cls", [RankingClient, AsyncRankingClient])
def test_an_over_capacity_refusal_is_retried_on_another_endpoint(cls):
    log = []
    fake = RecordingAsync if cls is AsyncRankingClient else Recording
    fakes = {u: fake(u, log) for u in ("a:1", "b:1")}
    fakes["a:1"].failures = [_err("StatusCode.UNAVAILABLE", "Exceeds maximum queue size")]
    client = _client(cls, fakes)
    _run(cls, client.wait_ready(1.0, all_endpoints=True))
    result = _run(cls, client.rank(_candidates(2), [1]))
    _run(cls, client.close())
    np.testing.assert_allclose(result.scores, [0, 0.001], rtol=1e-6)
    assert [u for u, _, _ in log] == ["a:1", "b:1"] and client.stats.failovers == 1


@pytest.mark.parametrize("cls", [RankingClient, AsyncRankingClient])
def test_every_request_carries_the_calls_deadline_and_its_traffic_class(cls):
    log = []
    fake = RecordingAsync if cls is AsyncRankingClient else Recording
    fakes = {"a:1": fake("a:1", log)}
    client = _client(cls, fakes, priority=Priority.WARMUP, timeout=3.0)
    _run(cls, client.rank(_candidates(2), [1]))
    _run(cls, client.close())
    (sent,) = fakes["a:1"].kwargs
    assert sent["priority"] == SPEC.serving.admission.level(Priority.WARMUP) == 2
    assert 2_000_000 < sent["timeout"] <= 3_000_000, "microseconds left of the 3-s deadline"
    # The route's own queue orders waiters by level: the Python backend does not tell it the request's priority.
    assert sent["parameters"][PRIORITY_PARAMETER] == 2
    plain = _client(cls, {"a:1": fake("a:1", [])})
    assert PRIORITY_PARAMETER not in plain.options.infer_kwargs(1.0)["parameters"]
    assert plain.options.priority_level == 0, "no class: the server's default level (production)"


def test_an_invalid_candidate_error_names_the_input_the_row_in_the_callers_list_and_its_id():
    assert parse_input("item_image[12]: cannot decode image") == ("item_image", 12)
    assert parse_input("request: the request costs 9 decoded pixels") == ("request", None)
    assert parse_input("something else") == (None, None)
    log = []
    fakes = {"a:1": FakeTriton("a:1", log)}
    fakes["a:1"].failures = [_err("StatusCode.INVALID_ARGUMENT", "item_audio[1]: cannot decode WAV")]
    with _client(RankingClient, fakes, max_candidates=4) as client, pytest.raises(InvalidInputError) as info:
        client.rank(_candidates(10), [1])
    error = info.value
    assert error.input == "item_audio"
    assert error.row in (1, 5, 9), "row 1 of whichever chunk failed, counted in the whole list"
    assert error.candidate_id == f"sku-{error.row}"


@pytest.mark.parametrize("cls", [RankingClient, AsyncRankingClient])
def test_on_invalid_drop_scores_the_other_candidates_and_reports_the_bad_ones(cls):
    log = []
    fake = RecordingAsync if cls is AsyncRankingClient else Recording
    fakes = {"a:1": fake("a:1", log)}
    fakes["a:1"].failures = [_err("StatusCode.INVALID_ARGUMENT", "item_image[2]: cannot decode image"),
                             _err("StatusCode.INVALID_ARGUMENT", "item_text[0]: not UTF-8")]
    client = _client(cls, fakes, on_invalid="drop")
    result = _run(cls, client.rank(_candidates(5), [1]))
    _run(cls, client.close())
    assert sorted(result.errors) == [0, 2]
    assert result.errors[2].input == "item_image" and result.errors[2].candidate_id == "sku-2"
    assert result.errors[0].input == "item_text" and result.errors[0].candidate_id == "sku-0"
    assert np.isnan(result.scores[[0, 2]]).all()
    np.testing.assert_allclose(result.scores[[1, 3, 4]], [0.001, 0.003, 0.004], rtol=1e-6)
    assert list(result.order())[-2:] == [0, 2], "dropped candidates rank last"
    assert [rows for _, rows, _ in log] == [5, 4, 3], "each refusal drops the candidate it names"


def test_a_request_wide_error_is_raised_even_when_dropping():
    fakes = {"a:1": FakeTriton("a:1", [])}
    fakes["a:1"].failures = [_err("StatusCode.INVALID_ARGUMENT", "request: the request costs 10 decoded pixels")]
    with _client(RankingClient, fakes, on_invalid="drop") as client, pytest.raises(InvalidInputError) as info:
        client.rank(_candidates(3), [1])
    assert info.value.input == "request" and info.value.row is None
    with pytest.raises(ValueError, match="on_invalid"):
        _client(RankingClient, fakes, on_invalid="skip")


def test_the_sync_client_sends_the_chunks_of_a_long_list_concurrently():
    log = []
    fakes = {"a:1": Recording("a:1", log, delay=0.2)}
    with _client(RankingClient, fakes, max_candidates=4) as client:
        result = client.rank(_candidates(10), [1])
    assert fakes["a:1"].most_in_flight == 3
    np.testing.assert_allclose(result.scores, np.arange(10) / 1000.0, rtol=1e-6)


def test_the_route_config_gives_the_client_everything_a_spec_did(ci_spec):
    config = model_configs(ci_spec)[ci_spec.serving.route]["cpu"]
    served = spec_from_config(json.loads(json_format.MessageToJson(config, preserving_proto_field_name=True)),
                              ci_spec.serving.route)
    assert served.serving.route == ci_spec.serving.route
    assert served.serving.max_candidates == ci_spec.serving.max_candidates
    assert served.ranker.history.length == ci_spec.ranker.history.length
    assert served.modalities.enabled == ci_spec.modalities.enabled
    assert served.serving.admission == ci_spec.serving.admission
    assert Modality.TEXT in served.modalities.enabled


def test_connection_refused_fails_fast_instead_of_waiting_for_the_deadline():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(UnavailableError):
        with RankingClient(SPEC, f"127.0.0.1:{port}", timeout=30.0, retry=FAST_RETRY) as client:
            client.rank(_candidates(1), [1])
    assert time.monotonic() - started < 10, "refused, not left to the 30-s deadline"
    with pytest.raises(UnavailableError, match="no endpoint gave the model config"):
        RankingClient(None, f"127.0.0.1:{port}")
