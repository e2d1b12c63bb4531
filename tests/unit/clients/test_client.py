"""Ranking clients without a server: request shaping, error mapping, shared memory, and both clients over fake
tritonclient clients (chunking, retries, failover, abandoned calls)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from clients import (
    AccessDeniedError,
    AsyncRankingClient,
    Candidate,
    ClientError,
    ClientTls,
    DeadlineExceededError,
    InvalidInputError,
    RankingClient,
    RetryPolicy,
    ServerError,
    UnavailableError,
)
from clients._endpoints import parse_urls
from clients._request import Chunk, build_chunks, chunk_bounds, history_matrix
from clients._transport import ShmRegion
from clients.errors import to_client_error
from fusionrank.contract.spec import Modality, PipelineSpec
from fusionrank.contract.tensors import ITEM_INPUT, ITEM_VIDEO, MODALITY_PRESENT, USER_HISTORY
from tests.fakes.clients import FakeAsyncTriton, FakeClock, FakeTriton

SPEC = PipelineSpec()
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, jitter=0.0)


def _err(status: str, message: str = "boom") -> InferenceServerException:
    return InferenceServerException(message, status=status)


def _items(n: int) -> dict[Modality, list[bytes]]:
    return {Modality.TEXT: [str(i).encode() for i in range(n)], Modality.IMAGE: [b"img"] * n,
            Modality.AUDIO: [b"wav"] * n}


def _client(fakes: dict[str, FakeTriton], cls=RankingClient, **kw):
    return cls(SPEC, list(fakes), client_factory=lambda url: fakes[url], retry=kw.pop("retry", FAST_RETRY), **kw)


def _fakes(cls, urls, log, **kw) -> dict[str, FakeTriton]:
    fake = FakeAsyncTriton if cls is AsyncRankingClient else FakeTriton
    return {u: fake(u, log, **kw) for u in urls}


def _sync(cls, value):
    """The value of a sync client's call, or of an asyncio client's coroutine."""
    return asyncio.run(value) if cls is AsyncRankingClient else value


# --- request shaping and error mapping -----------------------------------------------------------------------------


def test_history_matrix_pads_truncates_and_checks_shape():
    h = history_matrix([3, 4], rows=2, length=4)
    assert h.dtype == np.int64 and h.tolist() == [[0, 0, 3, 4], [0, 0, 3, 4]]
    assert history_matrix(list(range(1, 7)), 1, 4).tolist() == [[3, 4, 5, 6]]
    assert history_matrix([], 1, 3).tolist() == [[0, 0, 0]]
    with pytest.raises(InvalidInputError, match="shape"):
        history_matrix(np.zeros((3, 4), np.int64), 2, 4)
    with pytest.raises(InvalidInputError, match="integers"):
        history_matrix([1.5], 1, 4)


def test_candidate_reads_files_and_names_missing_ones(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"jpeg-bytes")
    c = Candidate(text="red shoes", image=tmp_path / "a.jpg", audio=str(tmp_path / "missing.wav"), item_id=7)
    assert c.payload(Modality.TEXT) == b"red shoes" and c.payload(Modality.IMAGE) == b"jpeg-bytes"
    with pytest.raises(InvalidInputError, match="candidate 7: cannot read audio file"):
        c.payload(Modality.AUDIO)


def test_candidate_fields_may_be_none_but_not_all(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"mp4-bytes")
    c = Candidate(text="title only", item_id=3, video=tmp_path / "a.mp4")
    assert c.payload(Modality.IMAGE) is None and c.payload(Modality.AUDIO) is None
    assert c.video_payload() == b"mp4-bytes"
    with pytest.raises(InvalidInputError, match="candidate 1 has no modality"):
        build_chunks({m: [b"1", None] for m in SPEC.modalities.enabled}, [1], SPEC.modalities.enabled, 20, 64)
    with pytest.raises(InvalidInputError, match="video is disabled"):
        build_chunks(_items(1), [1], SPEC.modalities.enabled, 20, 64, videos=[b"v"], video_enabled=False)


def test_absent_modalities_and_videos_are_said_in_the_request():
    log = []
    fakes = {"a:1": FakeTriton("a:1", log)}
    candidates = [Candidate(text="1", image=b"img", audio=b"wav"), Candidate(text="2", video=b"clip"),
                  Candidate(text="3", image=b"img"), Candidate(text="4", image=b"img", audio=b"wav", video=b"clip")]
    with _client(fakes, max_candidates=3) as client:
        client.rank(candidates[:1], [1])
        client.rank(candidates, [1])
    first, *chunks = fakes["a:1"].requests
    assert MODALITY_PRESENT not in first and ITEM_VIDEO not in first  # complete: the request as it always was
    present = np.concatenate([c[MODALITY_PRESENT] for c in chunks])
    assert present.dtype == np.bool_ and present.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 1]]
    assert np.concatenate([c[ITEM_VIDEO] for c in chunks])[:, 0].tolist() == [b"", b"clip", b"", b"clip"]
    assert np.concatenate([c[ITEM_INPUT[Modality.IMAGE]] for c in chunks])[:, 0].tolist() == [b"img", b"", b"img",
                                                                                             b"img"]
    assert chunks[0][ITEM_INPUT[Modality.AUDIO]][1:, 0].tolist() == [b"", b""]


def test_rank_items_file_takes_video_and_missing_fields(tmp_path):
    from fusionrank.contract.errors import DataError
    from fusionrank_cli.rank_command import file_request

    (tmp_path / "c.json").write_text('{"history": [4], "candidates": [{"id": 1, "text": "a"}, '
                                     '{"id": 2, "video": "a.mp4", "audio": null}]}')
    request = file_request([str(tmp_path / "c.json")])
    assert request.candidates[0].image is None and request.candidates[1].video == tmp_path / "a.mp4"
    assert request.candidates[1].text is None and request.candidates[1].audio is None
    (tmp_path / "bad.json").write_text('[{"id": 1}]')
    with pytest.raises(DataError, match="candidate 0 has none of text, image, audio, video"):
        file_request([str(tmp_path / "bad.json")])


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
    # Triton refuses a restricted API with UNAVAILABLE: not transient, another endpoint would refuse too.
    refused = to_client_error(_err("StatusCode.UNAVAILABLE", "This protocol is restricted, expecting header 'x'"))
    assert isinstance(refused, AccessDeniedError) and "admin_key" in str(refused)
    # gRPC's words for a TLS mismatch get a hint; a refused connection (a server that is down) does not.
    plaintext = to_client_error(_err("StatusCode.UNAVAILABLE", "failed to connect to all addresses; last error: "
                                                               "UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"))
    assert isinstance(plaintext, UnavailableError) and "TLS endpoint does that to a plaintext client" in str(plaintext)
    handshake = to_client_error(_err("StatusCode.UNAVAILABLE", "failed to connect to all addresses; last error: "
                                                               "UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed"))
    assert "check the CA the client trusts" in str(handshake)
    down = to_client_error(_err("StatusCode.UNAVAILABLE", "failed to connect to all addresses; last error: "
                                                          "UNAVAILABLE: ipv4:127.0.0.1:1: Connection refused"))
    assert "TLS" not in str(down)


def test_client_tls_files_are_checked_and_read(tmp_path):
    with pytest.raises(ClientError, match="private_key and certificate_chain go together"):
        ClientTls(private_key=tmp_path / "k.pem")
    with pytest.raises(ClientError, match="root_certificates: .*ca.pem does not exist"):
        ClientTls(tmp_path / "ca.pem")
    (tmp_path / "ca.pem").write_text("not checked until a channel is made")
    assert set(ClientTls(tmp_path / "ca.pem").channel_kwargs()) == {"creds"}
    named = ClientTls(tmp_path / "ca.pem", server_name="ranker.example").channel_kwargs()
    assert ("grpc.ssl_target_name_override", "ranker.example") in named["channel_args"]


def test_shared_memory_region_round_trips_the_request():
    from tritonclient.utils import shared_memory as shm

    arrays = {ITEM_INPUT[Modality.TEXT]: np.array([b"ab", b"cde"], dtype=object).reshape(-1, 1),
              USER_HISTORY: np.arange(6, dtype=np.int64).reshape(2, 3)}
    region = ShmRegion(Chunk(arrays))
    try:
        name, offset, size = region.placement[USER_HISTORY]
        got = shm.get_contents_as_numpy(region.handle, np.int64, [2, 3], offset=offset)
        np.testing.assert_array_equal(got, arrays[USER_HISTORY])
        _, t_off, t_size = region.placement[ITEM_INPUT[Modality.TEXT]]
        assert t_off == 0 and t_size == 4 + 2 + 4 + 3 and offset == t_size and size == 48
    finally:
        region.destroy()


# --- the clients over fake tritonclients ---------------------------------------------------------------------------


def test_request_validation_happens_before_any_call():
    log = []
    fakes = {"a:1": FakeTriton("a:1", log)}
    with _client(fakes) as client:
        with pytest.raises(InvalidInputError, match="audio"):
            client.rank_payloads({Modality.TEXT: [b"1"], Modality.IMAGE: [b"i"]}, [1])
        with pytest.raises(InvalidInputError, match="one payload per candidate"):
            client.rank_payloads({Modality.TEXT: [b"1", b"2"], Modality.IMAGE: [b"i"], Modality.AUDIO: [b"a"]}, [1])
        with pytest.raises(InvalidInputError, match="no candidates"):
            client.rank_payloads(_items(0), [1])
    assert log == []


def test_chunking_splits_long_lists_and_merges_in_order():
    log = []
    fakes = {"a:1": FakeTriton("a:1", log)}
    with _client(fakes, max_candidates=4) as client:
        result = client.rank_payloads(_items(10), [5, 6, 7])
    assert sorted(rows for _, rows, _ in log) == [2, 4, 4], "chunks are sent concurrently, in any order"
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


@pytest.mark.parametrize("cls", [RankingClient, AsyncRankingClient])
@pytest.mark.parametrize("status,error", [("StatusCode.INVALID_ARGUMENT", InvalidInputError),
                                          ("StatusCode.DEADLINE_EXCEEDED", DeadlineExceededError),
                                          ("StatusCode.INTERNAL", ServerError),
                                          ("StatusCode.NOT_FOUND", ServerError)])
def test_non_transient_errors_are_never_retried(cls, status, error):
    log = []
    fakes = _fakes(cls, ["a:1", "b:1"], log)
    fakes["a:1"].failures = [_err(status, "item_image[1]: cannot decode image")]
    client = _client(fakes, cls=cls)
    with pytest.raises(error) as info:
        _sync(cls, client.rank_payloads(_items(3), [1]))
    _sync(cls, client.close())
    assert len(log) == 1 and client.stats.retries == 0
    assert info.value.server_message == "item_image[1]: cannot decode image"
    assert info.value.status == status and info.value.endpoint == "a:1"


@pytest.mark.parametrize("cls", [RankingClient, AsyncRankingClient])
def test_a_transient_error_fails_over_to_the_next_endpoint(cls):
    log = []
    fakes = _fakes(cls, ["a:1", "b:1"], log)
    fakes["a:1"].failures = [_err("StatusCode.UNAVAILABLE", "Socket closed")]
    client = _client(fakes, cls=cls)
    assert _sync(cls, client.wait_ready(1.0, all_endpoints=True)) == ["a:1", "b:1"]
    result = _sync(cls, client.rank_payloads(_items(2), [1]))
    np.testing.assert_allclose(result.scores, [0, 0.001], rtol=1e-6)
    assert [u for u, _, _ in log] == ["a:1", "b:1"] and client.stats.failovers == 1
    assert client.pool.endpoints[0].down_since is not None and client.stats.health_checks == 2
    _sync(cls, client.close())
    assert all(f.closed for f in fakes.values())


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
        clock = client.pool.clock = FakeClock()  # the recheck interval passes on this clock, without waiting
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
        clock.now += 0.25
        for _ in range(2):  # due for a check, but still not ready: stays out
            client.rank_payloads(_items(1), [1])
        assert "b:1" not in [u for u, _, _ in log[-2:]] and client.stats.health_checks == 1
        fakes["b:1"].ready = True
        clock.now += 0.25
        log.clear()
        for _ in range(6):
            client.rank_payloads(_items(1), [1])
        assert log[0][0] == "b:1" and {u for u, _, _ in log} == {"a:1", "b:1", "c:1"}  # back in the rotation


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
    fake.register_system_shared_memory = lambda name, key, size, headers=None, client_timeout=None: events.append(
        ("register", name, headers))
    fake.unregister_system_shared_memory = lambda name, headers=None: events.append(("unregister", name, headers))
    client = _client({"127.0.0.1:1": fake}, shared_memory_threshold=0, abandon_grace=2.0, admin_key="k3y")
    with pytest.raises(DeadlineExceededError):
        client.rank_payloads(_items(2), [1], timeout=0.05)
    assert [e[0] for e in events] == ["register"] and fake.answered == 0
    client.close()
    assert fake.answered == 1 and [e[0] for e in events] == ["register", "unregister"]
    assert events[0][1] == events[1][1]
    # Servers restrict shared memory to the admin key's holders: both calls carry it.
    assert events[0][2] == events[1][2] == {"triton-grpc-protocol-fusionrank-admin-key": "k3y"}
