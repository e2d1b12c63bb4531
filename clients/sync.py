"""`RankingClient`: the blocking ranking client over `tritonclient.grpc`, safe to share between threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from clients._base import ClientBase, InvalidRows
from clients._endpoints import Endpoint
from clients._request import Candidate, Chunk, RankingResult, chunk_outputs, merge_outputs
from clients._retry import run
from clients._transport import ShmRegion, chunk_inputs, quietly, release
from clients.errors import InvalidInputError, probe_error, to_client_error
from fusionrank.contract.spec import Modality


class RankingClient(ClientBase):
    """Synchronous ranking client: `with RankingClient(spec, "host:8001,host2:8001") as c: c.rank(...)`."""

    def __enter__(self) -> RankingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Wait for abandoned calls (at most until their gRPC deadlines), then close every gRPC channel."""
        with self._lock:
            pending, self._abandoned = self._abandoned, []
        for call in pending:
            call.done.wait(max(0.0, call.rpc_deadline - time.monotonic()))
            call.release()
        for client in self._take_clients():
            quietly(client.close)

    def wait_ready(self, timeout: float = 60.0, all_endpoints: bool = False) -> list[str]:
        """Block until one endpoint (or every one) has the server and the route ready; returns the ready ones."""
        return run(self.planner.readiness(self.options.model, timeout, all_endpoints), self._healthy)

    def rank(self, candidates: Sequence[Candidate], history, timeout: float | None = None) -> RankingResult:
        """Score `candidates` for a user with `history` (their recent item ids, or a [N, L] array)."""
        items, videos = self._payloads(candidates)
        return self.rank_payloads(items, history, timeout=timeout, videos=videos,
                                  ids=[c.item_id for c in candidates])

    def rank_payloads(self, items: Mapping[Modality, Sequence[bytes | None]], history,
                      timeout: float | None = None, videos: Sequence[bytes | None] | None = None,
                      ids: Sequence | None = None) -> RankingResult:
        """Score raw payloads: `items[modality]` holds one bytes object per candidate (None: the candidate has
        none), `videos` one video or None per candidate, `ids` the candidates' ids for errors. The chunks of a
        list longer than the server's `max_candidates` are sent concurrently."""
        timeout, deadline = self._begin(timeout)
        chunks = self._chunks(items, history, videos)
        self._reap()
        send = partial(self._rank_chunk, deadline=deadline, timeout=timeout, ids=ids)
        if len(chunks) == 1:
            done = [send(chunks[0])]
        else:
            with ThreadPoolExecutor(len(chunks), thread_name_prefix="rank-chunk") as pool:
                done = list(pool.map(send, chunks))
        errors = {row: e for _, chunk_errors in done for row, e in chunk_errors.items()}
        return merge_outputs([outputs for outputs, _ in done], self.options.modalities, errors)

    def _rank_chunk(self, chunk: Chunk, deadline: float, timeout: float, ids: Sequence | None):
        """One chunk's (scores, weights) and the errors of the candidates dropped from it (`on_invalid`)."""
        rows = InvalidRows(chunk, ids, self.options.on_invalid == "drop")
        served = None
        while rows.live.rows:
            try:
                served = run(self.planner.call(deadline, timeout), self._healthy, partial(self._infer, rows.live))
                break
            except InvalidInputError as exc:
                rows.failed(exc)
        return rows.outputs(served, len(self.options.modalities)), rows.errors

    def _new_client(self, url: str):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(url, **self._channel_kwargs())

    def _healthy(self, endpoint: Endpoint, timeout: float) -> bool:
        try:
            client = self._client(endpoint)
            return bool(client.is_server_ready(client_timeout=timeout)
                        and client.is_model_ready(self.options.model, client_timeout=timeout))
        except Exception as exc:  # any failure of the probe (refused, timed out, broken channel) means "not ready"
            endpoint.last_error = probe_error(exc)
            return False

    def _reap(self) -> None:
        """Release the shared memory of abandoned calls that have ended since."""
        with self._lock:
            ended = [c for c in self._abandoned if c.done.is_set()]
            self._abandoned = [c for c in self._abandoned if not c.done.is_set()]
        for call in ended:
            call.release()

    def _infer(self, chunk: Chunk, endpoint: Endpoint, remaining: float) -> tuple[np.ndarray, np.ndarray]:
        """One attempt: send `chunk` to `endpoint` and wait at most `remaining` seconds for the answer."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = self._client(endpoint)
        shm = ShmRegion(chunk) if self._use_shm(endpoint, chunk) else None
        rpc_timeout = self.options.rpc_timeout(remaining)
        call = _SentCall(lambda: release(client, shm, self._admin_headers), time.monotonic() + rpc_timeout)
        try:
            if shm is not None:
                client.register_system_shared_memory(shm.name, shm.key, shm.byte_size, headers=self._admin_headers,
                                                     client_timeout=remaining)
            client.async_infer(self.options.model, chunk_inputs(grpcclient, chunk, shm), callback=call.finish,
                               client_timeout=rpc_timeout, **self.options.infer_kwargs(remaining))
        except BaseException as exc:
            call.release()
            if isinstance(exc, InferenceServerException):
                raise to_client_error(exc, endpoint.url) from None
            raise
        answered = False
        try:
            answered = call.done.wait(max(remaining, 0.0))
        finally:
            if not answered:  # late, or interrupted (Ctrl-C, a Locust user killed at stop): close() waits for it
                with self._lock:
                    self._abandoned.append(call)
        if not answered:
            raise self._abandoned_error(endpoint)
        call.release()
        if call.error is not None:
            raise to_client_error(call.error, endpoint.url)
        return chunk_outputs(call.result, chunk)


class _SentCall:
    """An inference RPC of the sync client: its outcome, set by tritonclient's callback, and its clean-up."""

    def __init__(self, release: Callable[[], None], rpc_deadline: float):
        self.done = threading.Event()
        self.result = self.error = None
        self.rpc_deadline = rpc_deadline
        self._release = release
        self._released = False

    def finish(self, result, error) -> None:
        self.result, self.error = result, error
        self.done.set()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release()
