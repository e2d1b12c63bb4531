"""Admission control against the real server (issue 19): what Triton 2.51 and the route answer a caller when the
server is past its capacity, a request's deadline passes, or a request costs more than its budget. Behaviour only:
the speed figures come from `fusionrank bench traffic`."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from benchmarks.lib import RequestSets, big_png
from clients import OverCapacityError, RankingClient
from clients.errors import to_client_error
from fusionrank.contract.spec import Modality, Priority
from fusionrank.contract.tensors import CLICK_PROBABILITY, infer_inputs
from fusionrank.model.synthetic_data import load_benchmark
from fusionrank.request.scenario import RequestFactory, Scenario, png_with_nonce

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cold(ci_spec):
    """Never-seen requests of `n` candidates (every payload misses the route's cache)."""
    bench = load_benchmark(ci_spec)
    seeds = iter(range(1000, 100_000))

    def make(n: int) -> dict:
        scenario = Scenario(name="admission", candidates={n: 1.0}, novel_share=1.0, source="test")
        return RequestFactory(ci_spec, bench, scenario, seed=next(seeds)).next().arrays()

    return make


def _send_all(url: str, model: str, requests: list[dict], **kw) -> list[tuple[float, float, Exception | None]]:
    """Send every request at once; (sent, answered, error) of each, in order."""
    outcomes: list = [None] * len(requests)
    done = threading.Semaphore(0)
    with grpcclient.InferenceServerClient(url) as client:
        for i, arrays in enumerate(requests):
            sent = time.monotonic()

            def finish(result, error, i=i, sent=sent):
                outcomes[i] = (sent, time.monotonic(), error)
                done.release()

            client.async_infer(model, infer_inputs(grpcclient, arrays), callback=finish, client_timeout=120, **kw)
        for _ in requests:
            done.acquire(timeout=180)
    return outcomes


def _responses(metrics_url: str, route: str, code: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name.startswith("fusionrank_route_responses") and s.labels.get("model") == route
               and s.labels.get("code") == code)


def test_a_request_whose_timeout_passes_in_the_queue_is_refused_unavailable(triton_server, ci_spec, cold):
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as info:
            # 1 us: expired before the route's dynamic batcher (1 ms delay) hands it to an instance.
            client.infer(ci_spec.serving.route, infer_inputs(grpcclient, cold(2)), timeout=1, client_timeout=30)
        answered = client.infer(ci_spec.serving.route, infer_inputs(grpcclient, cold(2)), timeout=30_000_000,
                                client_timeout=30, priority=ci_spec.serving.admission.level(Priority.LOADTEST))
    assert str(info.value.status()) == "StatusCode.UNAVAILABLE"
    assert "timeout" in info.value.message().lower()
    error = to_client_error(info.value, triton_server.grpc_url)
    assert isinstance(error, OverCapacityError) and str(error).startswith("server over capacity")
    # A caller's timeout reaches the route's member calls (`pb_utils.InferenceRequest(timeout=...)`) and its
    # priority level is one the route serves.
    assert answered.as_numpy(CLICK_PROBABILITY).shape == (2, 1)


def test_more_requests_than_the_server_holds_are_refused_unavailable_and_it_keeps_serving(triton_server, ci_spec,
                                                                                          cold):
    route, admission = ci_spec.serving.route, ci_spec.serving.admission
    instances = ci_spec.serving.batching(route).instances
    # Past what the route's instances hold (each: its gate's slots, at most `max_decoding_requests`, and its
    # waiting room of `route_queue.max_queue_size`), a request is refused: waiting room full, or its expected wait
    # past what the SLO's median allows a request without a deadline, or Triton's own queue full.
    requests = [cold(16) for _ in range(instances * (admission.max_decoding_requests
                                                     + admission.route_queue.max_queue_size) + 16)]
    bad = set(range(7, len(requests), 8))  # among them, requests with a GIF (a format the spec refuses) in row 3
    for i in bad:
        requests[i]["item_image"][3, 0] = b"GIF89a" + bytes(64)
    outcomes = _send_all(triton_server.grpc_url, route, requests)
    # A bad payload is named whenever the route sees it, however busy: never "over capacity", which a caller retries.
    named = 0
    for i in bad:
        error = outcomes[i][2]
        assert error is not None, "a request with a GIF was served"
        if str(error.status()) == "StatusCode.INVALID_ARGUMENT":
            named += 1
            assert error.message().startswith("item_image[3]: unsupported image format"), error.message()
        else:  # Triton's own queue may refuse it before the route sees it
            assert "the server is over capacity" not in error.message(), error.message()
    assert named, "the route named the bad payload of at least one request"
    refused = [error for i, (_, _, error) in enumerate(outcomes) if error is not None and i not in bad]
    assert refused, "more requests than instances and queue hold: some must be refused"
    for error in refused:
        assert str(error.status()) == "StatusCode.UNAVAILABLE", error
        message = error.message().lower()
        assert any(m in message for m in ("exceeds maximum queue size", "request timeout expired",
                                          "the server is over capacity")), error.message()
        assert isinstance(to_client_error(error), OverCapacityError)
    assert any(error is None for _, _, error in outcomes), "the server served what it admitted"
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        after = client.infer(route, infer_inputs(grpcclient, cold(4)), client_timeout=120)
    assert after.as_numpy(CLICK_PROBABILITY).shape == (4, 1)


def test_bench_traffics_callers_on_the_measurement_core_are_served_with_their_deadlines(triton_server, ci_spec):
    """`fusionrank bench traffic`'s closed-loop callers (deadline, DEADLINE_PARAMETER) and open-loop arrivals reach
    the route as requests it answers, each counted once by outcome; none is dropped by the driver."""
    from benchmarks import traffic

    sets = RequestSets(ci_spec, load_benchmark(ci_spec), candidates=4, seed=5)
    url, route = triton_server.grpc_url, ci_spec.serving.route
    closed = traffic.closed_loop(url, route, sets.cold(2, 0), 2.0, 30.0)
    assert closed.answered and not closed.failed, closed.first_error
    burst = traffic.open_loop(url, route, sets.cold(1, 1)[0], rate=3.0, seconds=2.0, seed=0)
    assert burst.answered and not burst.failed and burst.dropped == 0, burst.first_error


def test_a_request_over_its_cost_budget_is_invalid_before_decoding(triton_server, ci_spec, cold):
    budget = ci_spec.serving.admission.cost.max_pixels
    side = 4000
    images = budget // side ** 2 + 1
    arrays = cold(images)
    png = big_png(side)
    arrays["item_image"][:, 0] = [png_with_nonce(png, i) for i in range(images)]
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer(ci_spec.serving.route, infer_inputs(grpcclient, arrays), client_timeout=60)
    assert str(info.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message() == (f"request: the request costs {images * side * side} decoded pixels to decode "
                                    f"(rows not in the cache), over the budget serving.admission.cost.max_pixels = "
                                    f"{budget}; send fewer or smaller payloads per request")


def test_a_caller_gone_before_encoding_costs_no_encoding(triton_server, ci_spec, cold):
    route = ci_spec.serving.route
    before = _responses(triton_server.metrics_url, route, "CANCELLED") + _responses(
        triton_server.metrics_url, route, "UNAVAILABLE")
    png = big_png(3000)
    arrays = cold(6)
    arrays["item_image"][:, 0] = [png_with_nonce(png, 10_000 + i) for i in range(6)]
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as info:
            # The deadline passes while the route decodes 6 nine-megapixel images: it answers CANCELLED (the caller
            # went) or UNAVAILABLE (its deadline passed) and sends nothing to the encoders; or, once the route has
            # seen how long such requests take, it refuses the request at once (UNAVAILABLE, over capacity).
            client.infer(route, infer_inputs(grpcclient, arrays), client_timeout=0.3, timeout=300_000)
    status = str(info.value.status())
    assert status == "StatusCode.DEADLINE_EXCEEDED" or (
        status == "StatusCode.UNAVAILABLE" and "over capacity" in info.value.message()), info.value
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = _responses(triton_server.metrics_url, route, "CANCELLED") + _responses(
            triton_server.metrics_url, route, "UNAVAILABLE")
        if after > before:
            break
        time.sleep(0.5)
    assert after > before, "the route dropped the request instead of answering it late"


def test_the_client_reads_the_route_from_the_server_and_drops_invalid_candidates(triton_server, ci_spec, cold):
    from clients import Candidate

    with RankingClient(None, triton_server.grpc_url, on_invalid="drop", timeout=60) as client:
        assert client.options.max_candidates == ci_spec.serving.max_candidates
        assert client.options.history_length == ci_spec.ranker.history.length
        arrays = cold(3)
        candidates = [Candidate(text=arrays["item_text"][i, 0], image=arrays["item_image"][i, 0],
                                audio=arrays["item_audio"][i, 0], item_id=f"sku-{i}") for i in range(3)]
        candidates[1] = Candidate(text="broken image", image=b"not an image", audio=candidates[1].audio,
                                  item_id="sku-bad")
        result = client.rank(candidates, arrays["user_history"][0])
    assert list(result.errors) == [1]
    error = result.errors[1]
    assert (error.input, error.row, error.candidate_id) == ("item_image", 1, "sku-bad")
    assert error.server_message.startswith("item_image[1]:")
    assert np.isfinite(result.scores[[0, 2]]).all() and np.isnan(result.scores[1]), "the others are scored"
    assert Modality.IMAGE in client.options.modalities


def test_production_requests_are_served_before_load_test_requests_that_waited_longer(triton_server, ci_spec, cold):
    """The fusionrank client's traffic class (`priority=`) reaches the route and the route's gate serves its waiters
    by level: production requests sent behind a backlog of load-test requests are answered before load-test requests
    sent with them, which wait at the back of the backlog."""
    from clients import AsyncRankingClient

    backlog = [cold(8) for _ in range(40)]
    late = {p: [cold(8) for _ in range(2)] for p in (Priority.PRODUCTION, Priority.LOADTEST)}

    async def timed(client: AsyncRankingClient, arrays: dict) -> float:
        items = {m: list(arrays[f"item_{m.value}"][:, 0]) for m in client.options.modalities}
        sent = time.monotonic()
        result = await client.rank_payloads(items, arrays["user_history"][0])
        assert np.isfinite(result.scores).all() and not result.errors
        return time.monotonic() - sent

    async def serve() -> dict:
        # Every request may wait 120 s (the deadline the client sends): none is refused for its deadline.
        clients = {p: AsyncRankingClient(ci_spec, triton_server.grpc_url, timeout=120, priority=p) for p in late}
        try:
            queued = [asyncio.create_task(timed(clients[Priority.LOADTEST], a)) for a in backlog]
            await asyncio.sleep(0.5)  # the backlog is queued at the route's gates
            sent = {(p, i): asyncio.create_task(timed(clients[p], late[p][i]))  # each production request beside a
                    for i in range(2) for p in late}                            # load-test one sent at that moment
            await asyncio.wait_for(asyncio.gather(*queued, *sent.values()), 180)
            return {key: task.result() for key, task in sent.items()}
        finally:
            for client in clients.values():
                await client.close()

    took = asyncio.run(serve())
    production = [took[(Priority.PRODUCTION, i)] for i in range(2)]
    loadtest = [took[(Priority.LOADTEST, i)] for i in range(2)]
    assert max(production) < min(loadtest), f"production {production} s vs load test sent with it {loadtest} s"
