"""Ranking client: unit tests with fake Triton clients, then end to end against real tritonservers."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from clients.errors import DeadlineExceededError, InvalidInputError, ServerError, UnavailableError
from clients.ranking_client import (
    AsyncRankingClient,
    Candidate,
    EndpointPool,
    RankingClient,
    RetryPolicy,
    chunk_bounds,
    history_matrix,
    parse_urls,
    to_client_error,
)
from fusionrank.spec import Modality, PipelineSpec
from fusionrank.tensors import CLICK_PROBABILITY, ITEM_INPUT, MODALITY_WEIGHTS, USER_HISTORY

SPEC = PipelineSpec()
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, jitter=0.0)


# --- fakes ---------------------------------------------------------------------------------------------------------


def _decode(inputs) -> dict[str, np.ndarray]:
    out = {}
    for t in inputs:
        raw = t._get_content()
        if raw is None:  # sent through shared memory: only the shape is known here
            out[t.name()] = np.zeros(t.shape(), dtype=np.int64)
        elif t.datatype() == "BYTES":
            out[t.name()] = deserialize_bytes_tensor(raw).reshape(t.shape())
        else:
            out[t.name()] = np.frombuffer(raw, dtype=np.int64).reshape(t.shape())
    return out


class _Result:
    def __init__(self, outputs):
        self.outputs = outputs

    def as_numpy(self, name):
        return self.outputs.get(name)


class FakeTriton:
    """A tritonclient stand-in: scores each candidate as int(title) / 1000; `failures` are raised first, in order."""

    def __init__(self, url: str, log: list, failures=(), ready=True, delay=0.0):
        self.url, self.log, self.failures, self.ready, self.delay = url, log, list(failures), ready, delay
        self.closed = False
        self.answered = 0

    def _answer(self, model, inputs, client_timeout):
        arrays = _decode(inputs)
        self.log.append((self.url, len(arrays[USER_HISTORY]), client_timeout))
        if self.failures:
            raise self.failures.pop(0)
        titles = arrays[ITEM_INPUT[Modality.TEXT]][:, 0]
        scores = np.array([[int(t) / 1000.0] for t in titles], dtype=np.float32)
        weights = np.tile(np.array([[0.5, 0.3, 0.2]], dtype=np.float32), (len(titles), 1))
        self.answered += 1
        return _Result({CLICK_PROBABILITY: scores, MODALITY_WEIGHTS: weights})

    def async_infer(self, model, inputs, callback, client_timeout=None, **_):
        def answer():
            try:
                result = self._answer(model, inputs, client_timeout)
            except InferenceServerException as exc:
                callback(result=None, error=exc)
            else:
                callback(result=result, error=None)

        if self.delay:
            threading.Timer(self.delay, answer).start()
        else:
            answer()

    def is_server_ready(self, client_timeout=None):
        return self.ready

    def is_model_ready(self, model, client_timeout=None):
        return self.ready

    def close(self):
        self.closed = True


class FakeAsyncTriton(FakeTriton):
    async def infer(self, model, inputs, client_timeout=None, **_):
        await asyncio.sleep(self.delay)
        return self._answer(model, inputs, client_timeout)

    async def is_server_ready(self, client_timeout=None):
        return self.ready

    async def is_model_ready(self, model, client_timeout=None):
        return self.ready

    async def close(self):
        self.closed = True


def _err(status: str, message: str = "boom") -> InferenceServerException:
    return InferenceServerException(message, status=status)


def _items(n: int) -> dict[Modality, list[bytes]]:
    return {Modality.TEXT: [str(i).encode() for i in range(n)], Modality.IMAGE: [b"img"] * n,
            Modality.AUDIO: [b"wav"] * n}


def _client(fakes: dict[str, FakeTriton], cls=RankingClient, **kw):
    return cls(SPEC, list(fakes), client_factory=lambda url: fakes[url], retry=kw.pop("retry", FAST_RETRY), **kw)


# --- unit tests ----------------------------------------------------------------------------------------------------


def test_chunking_splits_long_lists_and_merges_in_order():
    log = []
    fakes = {"a:1": FakeTriton("a:1", log)}
    with _client(fakes, max_candidates=4) as client:
        result = client.rank_payloads(_items(10), [5, 6, 7])
    assert [rows for _, rows, _ in log] == [4, 4, 2]
    np.testing.assert_allclose(result.scores, np.arange(10) / 1000.0, rtol=1e-6)
    assert result.weights.shape == (10, 3)
    assert list(result.order()) == list(range(9, -1, -1))
    assert fakes["a:1"].closed
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(64, 64) == [(0, 64)]


def test_async_client_chunks_concurrently_and_keeps_order():
    log = []
    fakes = {"a:1": FakeAsyncTriton("a:1", log)}

    async def main():
        async with _client(fakes, cls=AsyncRankingClient, max_candidates=3) as client:
            return await client.rank([Candidate(text=str(i), image=b"i", audio=b"a", item_id=i) for i in range(7)],
                                     [1, 2])

    result = asyncio.run(main())
    assert sorted(rows for _, rows, _ in log) == [1, 3, 3]
    np.testing.assert_allclose(result.scores, np.arange(7) / 1000.0, rtol=1e-6)
    assert fakes["a:1"].closed


def test_transient_errors_are_retried_with_backoff():
    log = []
    fakes = {"a:1": FakeTriton("a:1", log, failures=[_err("StatusCode.UNAVAILABLE", "failed to connect"),
                                                      _err("StatusCode.INTERNAL", "Connection reset by peer")])}
    with _client(fakes) as client:
        started = time.monotonic()
        result = client.rank_payloads(_items(3), [1])
        waited = time.monotonic() - started
    assert len(log) == 3 and client.stats.attempts == 3 and client.stats.retries == 2
    assert waited >= 0.01 + 0.02 - 1e-3  # backoff 10 ms, then 20 ms: a single endpoint has no failover
    np.testing.assert_allclose(result.scores, [0, 0.001, 0.002], rtol=1e-6)


@pytest.mark.parametrize("status,error", [("StatusCode.INVALID_ARGUMENT", InvalidInputError),
                                          ("StatusCode.DEADLINE_EXCEEDED", DeadlineExceededError),
                                          ("StatusCode.INTERNAL", ServerError),
                                          ("StatusCode.NOT_FOUND", ServerError)])
def test_non_transient_errors_are_never_retried(status, error):
    log = []
    fakes = {"a:1": FakeTriton("a:1", log, failures=[_err(status, "item_image[1]: cannot decode image")]),
             "b:1": FakeTriton("b:1", log)}
    with _client(fakes) as client, pytest.raises(error) as info:
        client.rank_payloads(_items(3), [1])
    assert len(log) == 1 and client.stats.retries == 0
    assert info.value.server_message == "item_image[1]: cannot decode image"
    assert info.value.status == status and info.value.endpoint == "a:1"


def test_gives_up_after_max_attempts_with_the_last_server_message():
    log = []
    fakes = {"a:1": FakeTriton("a:1", log, failures=[_err("StatusCode.UNAVAILABLE", f"down {i}") for i in range(9)])}
    with _client(fakes, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.001, jitter=0)) as client, \
            pytest.raises(UnavailableError, match=r"after 3 attempt\(s\); last error: down 2"):
        client.rank_payloads(_items(2), [1])
    assert len(log) == 3


def test_round_robin_failover_and_recovery_after_health_check():
    log = []
    fakes = {u: FakeTriton(u, log) for u in ("a:1", "b:1", "c:1")}
    with _client(fakes, recheck_interval=0.2) as client:
        for _ in range(3):
            client.rank_payloads(_items(1), [1])
        assert [u for u, _, _ in log] == ["a:1", "b:1", "c:1"]
        log.clear()
        fakes["b:1"].failures = [_err("StatusCode.UNAVAILABLE", "Socket closed")]
        fakes["b:1"].ready = False
        for _ in range(6):
            client.rank_payloads(_items(1), [1])
        # The call that hit b fails over to c at once; b is then skipped and the others share the calls.
        assert [u for u, _, _ in log] == ["a:1", "b:1", "c:1", "a:1", "c:1", "a:1", "c:1"]
        assert client.stats.failovers == 1
        time.sleep(0.25)
        for _ in range(2):  # due for a check, but still not ready: stays out
            client.rank_payloads(_items(1), [1])
        assert "b:1" not in [u for u, _, _ in log[-2:]]
        fakes["b:1"].ready = True
        time.sleep(0.25)
        log.clear()
        for _ in range(6):
            client.rank_payloads(_items(1), [1])
        assert log[0][0] == "b:1" and {u for u, _, _ in log} == {"a:1", "b:1", "c:1"}  # back in the rotation


def test_every_endpoint_down_tries_the_longest_failed_one():
    pool = EndpointPool(["a", "b"], recheck_s=100)
    a, b = pool.endpoints
    pool.mark_down(a)
    time.sleep(0.01)
    pool.mark_down(b)
    assert pool.plan() == [] and pool.fallback() is a and not pool.any_up()


def test_deadline_is_shared_by_retries():
    log = []
    fakes = {"a:1": FakeTriton("a:1", log, failures=[_err("StatusCode.UNAVAILABLE")] * 50)}
    slow = RetryPolicy(max_attempts=50, initial_backoff_s=0.05, multiplier=1.0, jitter=0)
    with _client(fakes, retry=slow, abandon_grace=5.0) as client, \
            pytest.raises(DeadlineExceededError, match="deadline of 0.12s"):
        client.rank_payloads(_items(2), [1], timeout=0.12)
    assert 2 <= len(log) <= 4
    # Each RPC's gRPC deadline is what is left of the call's, plus the abandon grace.
    assert all(0 < t - 5.0 <= 0.12 for _, _, t in log) and log[-1][2] < log[0][2]


@pytest.mark.parametrize("cls", [RankingClient, AsyncRankingClient])
def test_a_call_past_its_deadline_is_abandoned_not_cancelled(cls):
    # Triton 2.51 can crash when a client cancels an in-flight ensemble request, so a call whose deadline passes
    # leaves the RPC running (with the grace on its gRPC deadline), and close() waits for it before closing.
    log = []
    fake = (FakeAsyncTriton if cls is AsyncRankingClient else FakeTriton)("a:1", log, delay=1.0)
    client = _client({"a:1": fake}, cls=cls, abandon_grace=2.0)

    async def over_aio():
        with pytest.raises(DeadlineExceededError, match="left to finish there"):
            await client.rank_payloads(_items(2), [1], timeout=0.05)
        assert fake.answered == 0 and client.stats.abandoned == 1
        await client.close()

    if cls is AsyncRankingClient:
        asyncio.run(over_aio())
    else:
        with pytest.raises(DeadlineExceededError, match="left to finish there"):
            client.rank_payloads(_items(2), [1], timeout=0.05)
        assert fake.answered == 0 and client.stats.abandoned == 1  # raised at the deadline, before the answer
        client.close()
    assert fake.answered == 1 and fake.closed, "close() waits for the abandoned call before closing the channel"
    assert 2.0 < log[0][2] <= 2.05 and client.stats.retries == 0


def test_an_abandoned_call_keeps_its_shared_memory_until_it_ends():
    # The server still reads the inputs of an abandoned call: its region is unregistered only after the call ends.
    log, events = [], []
    fake = FakeTriton("127.0.0.1:1", log, delay=1.0)
    fake.register_system_shared_memory = lambda name, key, size, client_timeout=None: events.append(("register", name))
    fake.unregister_system_shared_memory = lambda name: events.append(("unregister", name))
    client = _client({"127.0.0.1:1": fake}, shared_memory_threshold=0, abandon_grace=2.0)
    with pytest.raises(DeadlineExceededError):
        client.rank_payloads(_items(2), [1], timeout=0.05)
    assert [e for e, _ in events] == ["register"] and fake.answered == 0
    client.close()
    assert fake.answered == 1 and [e for e, _ in events] == ["register", "unregister"]
    assert events[0][1] == events[1][1]


def test_history_matrix_pads_truncates_and_checks_shape():
    h = history_matrix([3, 4], rows=2, length=4)
    assert h.dtype == np.int64 and h.tolist() == [[0, 0, 3, 4], [0, 0, 3, 4]]
    assert history_matrix(list(range(1, 7)), 1, 4).tolist() == [[3, 4, 5, 6]]
    assert history_matrix([], 1, 3).tolist() == [[0, 0, 0]]
    with pytest.raises(InvalidInputError, match="shape"):
        history_matrix(np.zeros((3, 4), np.int64), 2, 4)
    with pytest.raises(InvalidInputError, match="integers"):
        history_matrix([1.5], 1, 4)


def test_request_validation_happens_before_any_call():
    log = []
    fakes = {"a:1": FakeTriton("a:1", log)}
    with _client(fakes) as client:
        with pytest.raises(InvalidInputError, match="audio"):
            client.rank_payloads({Modality.TEXT: [b"1"], Modality.IMAGE: [b"i"]}, [1])
        with pytest.raises(InvalidInputError, match="one payload per candidate"):
            client.rank_payloads({Modality.TEXT: [b"1", b"2"], Modality.IMAGE: [b"i"], Modality.AUDIO: [b"a"]}, [1])
    assert log == []


def test_candidate_reads_files_and_names_missing_ones(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"jpeg-bytes")
    c = Candidate(text="red shoes", image=tmp_path / "a.jpg", audio=str(tmp_path / "missing.wav"), item_id=7)
    assert c.payload(Modality.TEXT) == b"red shoes" and c.payload(Modality.IMAGE) == b"jpeg-bytes"
    with pytest.raises(InvalidInputError, match="candidate 7: cannot read audio file"):
        c.payload(Modality.AUDIO)


def test_error_mapping_and_urls():
    assert isinstance(to_client_error(_err("StatusCode.UNAVAILABLE")), UnavailableError)
    assert isinstance(to_client_error(_err("StatusCode.UNKNOWN", "recvmsg:Connection reset by peer")),
                      UnavailableError)
    assert isinstance(to_client_error(_err("StatusCode.INVALID_ARGUMENT", "connection reset")), InvalidInputError)
    # A draining server unloads its models: that endpoint is unavailable, the request is fine elsewhere.
    draining = _err("StatusCode.NOT_FOUND", "Request for unknown model: 'rank' has no available versions")
    assert isinstance(to_client_error(draining), UnavailableError)
    assert isinstance(to_client_error(_err("StatusCode.NOT_FOUND", "Request for unknown model: 'x' is not found")),
                      ServerError)
    assert parse_urls("a:1, b:2,,a:1") == ["a:1", "b:2"] and parse_urls(["grpc://c:3"]) == ["c:3"]


def test_shared_memory_region_round_trips_the_request():
    from tritonclient.utils import shared_memory as shm

    from clients.ranking_client import _Request, _ShmRegion

    arrays = {ITEM_INPUT[Modality.TEXT]: np.array([b"ab", b"cde"], dtype=object).reshape(-1, 1),
              USER_HISTORY: np.arange(6, dtype=np.int64).reshape(2, 3)}
    region = _ShmRegion(_Request(arrays))
    try:
        name, offset, size = region.placement[USER_HISTORY]
        got = shm.get_contents_as_numpy(region.handle, np.int64, [2, 3], offset=offset)
        np.testing.assert_array_equal(got, arrays[USER_HISTORY])
        _, t_off, t_size = region.placement[ITEM_INPUT[Modality.TEXT]]
        assert t_off == 0 and t_size == 4 + 2 + 4 + 3 and offset == t_size and size == 48
    finally:
        region.destroy()


# --- end to end ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench(ci_spec):
    from fusionrank.benchmark import load_benchmark

    return load_benchmark(ci_spec)


def _request(bench, ids, session):
    items = {Modality.TEXT: [bench.item(int(i)).text_bytes() for i in ids],
             Modality.IMAGE: [bench.item(int(i)).image_bytes() for i in ids],
             Modality.AUDIO: [bench.item(int(i)).audio_bytes() for i in ids]}
    return items, np.repeat(bench.sessions.history[session][None, :], len(ids), axis=0)


@pytest.mark.e2e
def test_ranking_matches_offline_pytorch(triton_server, ci_spec, bench, reference_pipeline):
    tol = ci_spec.export.tolerance(CLICK_PROBABILITY)
    with RankingClient(ci_spec, triton_server.grpc_url) as client:
        client.wait_ready(30)
        for session in bench.frozen_sessions(3):
            items, history = _request(bench, bench.sessions.candidates[session], int(session))
            served = client.rank_payloads(items, history)
            offline, weights = reference_pipeline.score(items, history)
            np.testing.assert_allclose(served.scores, offline, atol=tol.atol, rtol=tol.rtol)
            np.testing.assert_allclose(served.weights, weights, atol=1e-4)
            assert list(served.order()) == list(np.argsort(-offline, kind="stable"))


@pytest.mark.e2e
def test_more_candidates_than_the_max_batch_are_chunked(triton_server, ci_spec, bench, reference_pipeline):
    n = ci_spec.serving.max_candidates + 7
    ids = (np.arange(n) % bench.num_items) + 1
    session = int(bench.frozen_sessions(1)[0])
    items, history = _request(bench, ids, session)
    tol = ci_spec.export.tolerance(CLICK_PROBABILITY)
    with RankingClient(ci_spec, triton_server.grpc_url, shared_memory_threshold=0) as client:
        served = client.rank_payloads(items, history[0])
        assert client.stats.attempts == 2  # two chunks, no retry
    offline, _ = reference_pipeline.score(items, history)
    np.testing.assert_allclose(served.scores, offline, atol=tol.atol, rtol=tol.rtol)

    async def over_aio():
        async with AsyncRankingClient(ci_spec, triton_server.grpc_url) as aclient:
            await aclient.wait_ready(10)
            return await aclient.rank_payloads(items, history)

    np.testing.assert_allclose(asyncio.run(over_aio()).scores, served.scores, atol=1e-6)


@pytest.mark.e2e
def test_deadline_and_invalid_input_surface_as_typed_errors(triton_server, ci_spec, bench):
    session = int(bench.frozen_sessions(1)[0])
    items, history = _request(bench, bench.sessions.candidates[session], session)
    with RankingClient(ci_spec, triton_server.grpc_url) as client:
        with pytest.raises(DeadlineExceededError, match="left to finish there"):
            client.rank_payloads(items, history, timeout=0.001)
        assert client.stats.abandoned == 1
        bad = {m: list(v) for m, v in items.items()}
        bad[Modality.IMAGE][1] = b"\xff\xd8\xff\xe0 not really a jpeg"
        before = client.stats.attempts
        with pytest.raises(InvalidInputError) as info:
            client.rank_payloads(bad, history)
        assert client.stats.attempts == before + 1 and client.stats.retries == 0
        assert "item_image" in info.value.server_message and info.value.status == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.e2e
def test_calls_past_their_deadline_leave_the_server_serving(triton_server, ci_spec):
    # Regression guard: Triton 2.51 segfaults when clients cancel in-flight ensemble requests
    # (triton-inference-server/server#7368), so the client abandons a late call instead. With abandon_grace=0
    # (cancel at the deadline) this test failed 3 runs out of 3, the server dying in round 3 or 4.
    from loadtest.deadline_stress import stress

    out = io.StringIO()
    assert stress(ci_spec, triton_server.grpc_url, rounds=30, abandon_grace=30.0,
                  alive=lambda: triton_server.process.poll() is None, out=out) == 30, out.getvalue()
    assert "the server still serves" in out.getvalue() and "0 cancelled" in out.getvalue()


@pytest.mark.e2e
def test_failover_between_two_real_servers_loses_no_call(triton_server, built_repository, ci_spec, bench,
                                                         tmp_path):
    from fusionrank.serving.server import TritonServer

    second = TritonServer(built_repository, profile="cpu", log_file=tmp_path / "second.log",
                          cache=tmp_path / "backend")
    second.start(timeout=300)
    session = int(bench.frozen_sessions(1)[0])
    items, history = _request(bench, bench.sessions.candidates[session][:4], session)
    served_by, errors, stop = [], [], threading.Event()
    try:
        with RankingClient(ci_spec, [second.grpc_url, triton_server.grpc_url], recheck_interval=60,
                           retry=RetryPolicy(max_attempts=4, initial_backoff_s=0.05)) as client:
            client.wait_ready(60, all_endpoints=True)
            expected = client.rank_payloads(items, history).scores

            def loop():
                while not stop.is_set():
                    try:
                        np.testing.assert_allclose(client.rank_payloads(items, history).scores, expected, atol=1e-6)
                        served_by.append(time.monotonic())
                    except Exception as exc:  # noqa: BLE001 - every failure is collected and reported
                        errors.append(exc)

            worker = threading.Thread(target=loop)
            worker.start()
            time.sleep(2.0)
            before_stop = len(served_by)
            second.stop()
            stopped_at = time.monotonic()
            time.sleep(2.0)
            stop.set()
            worker.join(timeout=60)
    finally:
        stop.set()
        second.stop()
    assert not errors, f"failed calls during failover: {errors[:3]}"
    assert before_stop >= 2 and sum(t > stopped_at for t in served_by) >= 2
    assert client.pool.endpoints[0].down_since is not None, "the stopped server should be marked down"


@pytest.mark.e2e
def test_rank_command_prints_a_ranked_table_and_json(triton_server, ci_spec, bench, tmp_path, capsys):
    import json

    from clients.rank_command import rank_benchmark_request, run_rank

    table = rank_benchmark_request(ci_spec, triton_server.grpc_url, user=0, candidates=12).splitlines()
    rows = table[3:]
    assert table[1].split()[:4] == ["rank", "item", "title", "score"] and table[1].split()[4:] == ["text", "image",
                                                                                                  "audio"]
    assert [int(r.split()[0]) for r in rows] == list(range(1, 13))
    scores = [float(r.split()[-4]) for r in rows]
    assert scores == sorted(scores, reverse=True)

    items = [bench.item(i) for i in (3, 9)]
    (tmp_path / "cands.json").write_text(json.dumps({"history": [5, 6], "candidates": [
        {"id": it.item_id, "text": it.title, "image": str(it.image_path), "audio": str(it.audio_path)}
        for it in items]}))
    assert run_rank(ci_spec, f"127.0.0.1:1,{triton_server.grpc_url}", items=[str(tmp_path / "cands.json")],
                    as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    ranking = out["ranking"]
    assert sorted(r["item_id"] for r in ranking) == [3, 9] and ranking[0]["score"] >= ranking[1]["score"]
    assert set(ranking[0]["modality_weights"]) == {"text", "image", "audio"}
