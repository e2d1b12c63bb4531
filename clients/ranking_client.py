"""gRPC ranking client for the fusionrank ensemble, sync (`RankingClient`) and asyncio (`AsyncRankingClient`).

A ranking request is one user's candidate list. The client
- splits a list longer than the ensemble's max batch (`serving.max_candidates`) into several requests and merges
  the scores back in the caller's order;
- gives every call one deadline, shared by its chunks and retries. A call whose deadline passes is abandoned, not
  cancelled: its RPC keeps a longer gRPC deadline (`abandon_grace`) so the server finishes it. Triton 2.51 (the
  server in the nvidia-pytriton wheel) segfaults when clients cancel in-flight ensemble requests
  (triton-inference-server/server#7368, fixed upstream by #7840); the Go workaround in that issue does the same.
  `close()` waits for abandoned calls, since closing a channel would cancel them;
- retries with exponential backoff only on transient errors (UNAVAILABLE, connection reset), never on invalid input;
- spreads calls round-robin over several endpoints, skips one that failed until a health check finds it ready again,
  and fails over to the next endpoint at once;
- raises its own exceptions (`clients.errors`) carrying the server's message;
- optionally sends large payloads through system shared memory when the server is on the same host.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clients.errors import (
    ClientError,
    DeadlineExceededError,
    InvalidInputError,
    ServerError,
    UnavailableError,
)
from fusionrank.spec import Modality, PipelineSpec
from fusionrank.tensors import CLICK_PROBABILITY, ITEM_INPUT, MODALITY_WEIGHTS, USER_HISTORY

log = logging.getLogger(__name__)

# Substrings of error messages that mean the endpoint cannot serve right now rather than the request being bad:
# the connection broke (RST, GOAWAY), or the server is shutting down: while it drains, Triton unloads the models and
# answers NOT_FOUND "Request for unknown model: 'rank' has no available versions". Another endpoint can serve the
# same (idempotent) ranking request.
_ENDPOINT_UNAVAILABLE = ("connection reset", "socket closed", "broken pipe", "failed to connect", "connection refused",
                         "goaway", "stream removed", "has no available versions", "server is stopping",
                         "shutting down")
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


# --- request and result --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One item to rank: its title and its image and audio, each as bytes or a file path."""

    text: str | bytes | None = None
    image: bytes | str | Path | None = None
    audio: bytes | str | Path | None = None
    item_id: int | str | None = None

    def payload(self, modality: Modality) -> bytes:
        """The raw bytes sent for one modality (text as UTF-8; image and audio read from a path if given one)."""
        value = getattr(self, modality.value)
        label = f"candidate {self.item_id}" if self.item_id is not None else "candidate"
        if value is None:
            raise InvalidInputError(f"{label}: no {modality.value} given, but the ensemble needs {modality.value}")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if modality is Modality.TEXT:
            return str(value).encode("utf-8")
        path = Path(value).expanduser()
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"{label}: cannot read {modality.value} file {str(path)!r}: {exc.strerror}") \
                from exc


@dataclass(frozen=True)
class RankingResult:
    """Scores of one ranking request, in the order the candidates were given."""

    scores: np.ndarray  # [N] click probability
    weights: np.ndarray  # [N, M] weight of each enabled modality in the fused score
    modalities: tuple[Modality, ...]

    def __len__(self) -> int:
        return len(self.scores)

    def order(self) -> np.ndarray:
        """Candidate indices, best first (ties keep the given order)."""
        return np.argsort(-self.scores, kind="stable")


def history_matrix(history: Sequence[int] | np.ndarray, rows: int, length: int) -> np.ndarray:
    """The [rows, length] INT64 history tensor: a 1-D id list is cut to its last `length` ids, left-padded with 0
    and repeated per candidate; a 2-D array must already have that shape."""
    h = np.asarray(history)
    if h.size and not np.issubdtype(h.dtype, np.integer):
        raise InvalidInputError(f"{USER_HISTORY}: item ids must be integers, got dtype {h.dtype}")
    h = h.astype(np.int64, copy=False)
    if h.ndim == 1:
        row = np.zeros(length, dtype=np.int64)
        tail = h[-length:] if len(h) else h
        row[length - len(tail):] = tail
        return np.repeat(row[None, :], rows, axis=0)
    if h.ndim == 2 and h.shape == (rows, length):
        return np.ascontiguousarray(h)
    raise InvalidInputError(f"{USER_HISTORY}: expected {length} ids or an array of shape [{rows}, {length}], "
                            f"got shape {list(h.shape)}")


def chunk_bounds(rows: int, max_rows: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most `max_rows` each, covering 0..rows in order."""
    if max_rows <= 0:
        raise ValueError(f"max_rows must be > 0, got {max_rows}")
    return [(start, min(start + max_rows, rows)) for start in range(0, rows, max_rows)]


# --- errors and retries --------------------------------------------------------------------------------------------


def to_client_error(exc: Exception, endpoint: str | None = None) -> ClientError:
    """Map a tritonclient `InferenceServerException` (or gRPC error) to the client's own exception type."""
    status = exc.status() if callable(getattr(exc, "status", None)) else None
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    message = message or str(exc)
    status = str(status) if status else None
    if status == "StatusCode.INVALID_ARGUMENT":
        return InvalidInputError(message, status, endpoint)
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return DeadlineExceededError(message, status, endpoint)
    if status == "StatusCode.UNAVAILABLE" or any(m in message.lower() for m in _ENDPOINT_UNAVAILABLE):
        return UnavailableError(message, status, endpoint)
    return ServerError(message, status, endpoint)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient errors: attempt k (k >= 1) waits initial * multiplier**(k-1), capped."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2  # +- this fraction of the wait, so clients retrying together spread out

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError("RetryPolicy: backoffs must be >= 0, multiplier >= 1 and jitter in [0, 1)")

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        wait = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        if self.jitter and rng is not None:
            wait *= 1 + self.jitter * (2 * rng.random() - 1)
        return wait


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass
class ClientStats:
    """Counters a caller (or a test) can read: how often the client retried and failed over."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    failovers: int = 0
    health_checks: int = 0
    abandoned: int = 0  # calls whose deadline passed, left to finish on the server


# --- endpoints -----------------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    url: str
    down_since: float | None = None  # None: believed healthy
    last_check: float = 0.0

    @property
    def is_loopback(self) -> bool:
        host = self.url.rsplit(":", 1)[0] if self.url.count(":") == 1 or self.url.startswith("[") else self.url
        return host in _LOOPBACK_HOSTS


def parse_urls(urls: str | Sequence[str]) -> list[str]:
    """Endpoints from a comma-separated string or a list, in order, without blanks or duplicates."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for url in (u.strip() for u in items):
        if url.startswith(("grpc://", "http://")):
            url = url.split("://", 1)[1]
        if url and url not in out:
            out.append(url)
    if not out:
        raise ValueError("no gRPC endpoint given")
    return out


class EndpointPool:
    """Round-robin over endpoints. A failed endpoint is skipped until `recheck_s` has passed and a health check
    finds it ready again; when every endpoint is down, the one that failed longest ago is tried anyway."""

    def __init__(self, urls: Sequence[str], recheck_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.endpoints = [Endpoint(u) for u in urls]
        self.recheck_s = recheck_s
        self.clock = clock
        self._next = 0
        self._lock = threading.Lock()

    def plan(self) -> list[tuple[Endpoint, bool]]:
        """Endpoints to try for the next attempt, in order, each with whether it needs a health check first: those
        due for a check (at most one probe per endpoint per `recheck_s`, so a recovered endpoint rejoins even while
        others serve), then the healthy ones in round-robin order (so calls spread evenly over them)."""
        now = self.clock()
        up = [e for e in self.endpoints if e.down_since is None]
        with self._lock:
            start = self._next % len(up) if up else 0
            self._next += 1
        due = [(e, True) for e in self.endpoints if e.down_since is not None and now - e.last_check >= self.recheck_s]
        return due + [(e, False) for e in up[start:] + up[:start]]

    def fallback(self) -> Endpoint:
        """Every endpoint is down and none is due for a check: the one that failed longest ago."""
        return min(self.endpoints, key=lambda e: e.down_since if e.down_since is not None else float("-inf"))

    def any_up(self) -> bool:
        return any(e.down_since is None for e in self.endpoints)

    def mark_down(self, endpoint: Endpoint) -> None:
        now = self.clock()
        if endpoint.down_since is None:
            log.warning("endpoint %s marked down", endpoint.url)
            endpoint.down_since = now
        endpoint.last_check = now

    def mark_checked(self, endpoint: Endpoint) -> None:
        endpoint.last_check = self.clock()

    def mark_up(self, endpoint: Endpoint) -> None:
        if endpoint.down_since is not None:
            log.info("endpoint %s is back", endpoint.url)
        endpoint.down_since = None


# --- tensors -------------------------------------------------------------------------------------------------------


@dataclass
class _Request:
    """One chunk's input arrays, ready to become InferInputs (over the wire or through shared memory)."""

    arrays: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return len(self.arrays[USER_HISTORY])

    def payload_bytes(self) -> int:
        return sum(sum(len(b) for b in a.ravel()) if a.dtype == np.object_ else a.nbytes for a in self.arrays.values())


def _infer_inputs(module, request: _Request, shm: _ShmRegion | None = None) -> list:
    inputs = []
    for name, array in request.arrays.items():
        tensor = module.InferInput(name, list(array.shape), "BYTES" if array.dtype == np.object_ else "INT64")
        if shm is not None:
            region, offset, size = shm.placement[name]
            tensor.set_shared_memory(region, size, offset)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class _ShmRegion:
    """A system shared-memory region holding one request's inputs, created, filled and destroyed per call."""

    def __init__(self, request: _Request):
        from tritonclient.utils import serialize_byte_tensor
        from tritonclient.utils import shared_memory as shm

        self._shm = shm
        parts, self.placement, offset = [], {}, 0
        self.name = f"fusionrank-{uuid.uuid4().hex[:16]}"
        self.key = f"/{self.name}"
        for name, array in request.arrays.items():
            part = serialize_byte_tensor(array) if array.dtype == np.object_ else array
            size = len(part.item()) if part.dtype == np.object_ else part.nbytes
            parts.append(part)
            self.placement[name] = (self.name, offset, size)
            offset += size
        self.byte_size = max(offset, 1)
        self.handle = shm.create_shared_memory_region(self.name, self.key, self.byte_size)
        try:
            shm.set_shared_memory_region(self.handle, parts)
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        self._shm.destroy_shared_memory_region(self.handle)


# --- the clients ---------------------------------------------------------------------------------------------------


@dataclass
class ClientOptions:
    """Settings shared by the sync and asyncio clients."""

    model: str
    modalities: tuple[Modality, ...]
    max_candidates: int
    history_length: int
    timeout_s: float = 30.0
    health_timeout_s: float = 2.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    recheck_s: float = 1.0
    shared_memory_threshold: int | None = None  # payload bytes from which loopback calls use shared memory
    abandon_grace_s: float = 30.0  # added to an inference RPC's gRPC deadline; 0: gRPC cancels at the deadline

    def rpc_timeout(self, remaining: float) -> float:
        """The gRPC deadline of an inference RPC with `remaining` seconds of the call's deadline left."""
        return max(remaining, 1e-3) + self.abandon_grace_s

    @classmethod
    def from_spec(cls, spec: PipelineSpec, **overrides) -> ClientOptions:
        return cls(model=spec.serving.route, modalities=spec.modalities.enabled,
                   max_candidates=spec.serving.max_candidates, history_length=spec.ranker.history.length,
                   **overrides)


class _ClientBase:
    """Request building, endpoint choice and retry bookkeeping shared by the sync and asyncio clients."""

    def __init__(self, spec: PipelineSpec, urls: str | Sequence[str], *, timeout: float = 30.0,
                 health_timeout: float = 2.0, retry: RetryPolicy | None = None, recheck_interval: float = 1.0,
                 shared_memory_threshold: int | None = None, max_candidates: int | None = None,
                 abandon_grace: float = 30.0, client_factory: Callable[[str], Any] | None = None,
                 seed: int | None = None):
        if abandon_grace < 0:
            raise ValueError(f"abandon_grace must be >= 0 seconds, got {abandon_grace}")
        self.options = ClientOptions.from_spec(
            spec, timeout_s=timeout, health_timeout_s=health_timeout, retry=retry or RetryPolicy(),
            recheck_s=recheck_interval, shared_memory_threshold=shared_memory_threshold,
            abandon_grace_s=abandon_grace)
        if max_candidates is not None:
            if not 0 < max_candidates <= spec.serving.max_candidates:
                raise ValueError(f"max_candidates must be in [1, {spec.serving.max_candidates}], got {max_candidates}")
            self.options.max_candidates = max_candidates
        self.pool = EndpointPool(parse_urls(urls), recheck_s=recheck_interval)
        self.stats = ClientStats()
        self._factory = client_factory
        self._clients: dict[str, Any] = {}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._abandoned: list = []  # calls past their deadline still running on the server (see close())

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.pool.endpoints]

    def _new_client(self, url: str):
        """A tritonclient gRPC client (sync or aio, by subclass) for one endpoint."""
        raise NotImplementedError

    def _client(self, endpoint: Endpoint):
        with self._lock:  # one channel per endpoint, also when threads share a sync client
            client = self._clients.get(endpoint.url)
            if client is None:
                client = self._factory(endpoint.url) if self._factory else self._new_client(endpoint.url)
                self._clients[endpoint.url] = client
            return client

    def _probe_timeout(self, deadline: float, floor: float) -> float:
        return min(self.options.health_timeout_s, max(floor, deadline - time.monotonic()))

    def _record_probe(self, endpoint: Endpoint, healthy: bool, ready: list[str]) -> None:
        if healthy:
            self.pool.mark_up(endpoint)
            ready.append(endpoint.url)
        else:
            self.pool.mark_down(endpoint)

    def _ready_enough(self, ready: list[str], all_endpoints: bool, deadline: float, timeout: float) -> bool:
        """wait_ready's verdict after one sweep: True when done; raises UnavailableError once the deadline passed."""
        if ready and (not all_endpoints or len(ready) == len(self.pool.endpoints)):
            return True
        if time.monotonic() >= deadline:
            raise UnavailableError(f"model {self.options.model!r} not ready within {timeout:g}s on "
                                   f"{', '.join(self.urls)} (ready: {', '.join(ready) or 'none'})")
        return False

    def _payloads(self, candidates: Sequence[Candidate]) -> dict[Modality, list[bytes]]:
        return {m: [c.payload(m) for c in candidates] for m in self.options.modalities}

    def _begin(self, timeout: float | None) -> tuple[float, float]:
        """(timeout, deadline) of one ranking call, which is counted."""
        timeout = self.options.timeout_s if timeout is None else timeout
        self.stats.calls += 1
        return timeout, time.monotonic() + timeout

    def _requests(self, items: Mapping[Modality, Sequence[bytes]], history) -> list[_Request]:
        """Validate one ranking request and split it into chunks of at most max_candidates rows."""
        opts = self.options
        missing = [m.value for m in opts.modalities if m not in items]
        if missing:
            raise InvalidInputError(f"no payloads for enabled modalities: {', '.join(missing)}")
        counts = {m: len(items[m]) for m in opts.modalities}
        rows = next(iter(counts.values()))
        if len(set(counts.values())) != 1:
            raise InvalidInputError("every modality needs one payload per candidate; got "
                                    + ", ".join(f"{m.value}={n}" for m, n in counts.items()))
        if rows == 0:
            raise InvalidInputError("no candidates to rank")
        hist = history_matrix(history, rows, opts.history_length)
        columns = {ITEM_INPUT[m]: np.array([bytes(b) for b in items[m]], dtype=object).reshape(-1, 1)
                   for m in opts.modalities}
        return [_Request({**{k: v[a:b] for k, v in columns.items()}, USER_HISTORY: hist[a:b]})
                for a, b in chunk_bounds(rows, opts.max_candidates)]

    def _use_shm(self, endpoint: Endpoint, request: _Request) -> bool:
        threshold = self.options.shared_memory_threshold
        return threshold is not None and endpoint.is_loopback and request.payload_bytes() >= threshold

    def _merge(self, results: list[tuple[np.ndarray, np.ndarray]]) -> RankingResult:
        scores = np.concatenate([r[0].reshape(-1) for r in results]).astype(np.float32, copy=False)
        weights = np.concatenate([r[1].reshape(len(r[0]), -1) for r in results]).astype(np.float32, copy=False)
        return RankingResult(scores, weights, self.options.modalities)

    def _outputs(self, result, request: _Request) -> tuple[np.ndarray, np.ndarray]:
        scores, weights = result.as_numpy(CLICK_PROBABILITY), result.as_numpy(MODALITY_WEIGHTS)
        if scores is None or weights is None or len(scores) != request.rows or len(weights) != request.rows:
            raise ServerError(f"response has {None if scores is None else len(scores)} scores for "
                              f"{request.rows} candidates")
        return scores, weights

    def _give_up(self, attempts: int, last: ClientError) -> UnavailableError:
        return UnavailableError(f"no endpoint of {', '.join(self.urls)} served the request after {attempts} "
                                f"attempt(s); last error: {last.server_message}", last.status, last.endpoint)

    def _deadline_error(self, timeout: float, last: ClientError | None) -> DeadlineExceededError:
        detail = f"; last error: {last}" if last else ""
        return DeadlineExceededError(f"deadline of {timeout:g}s passed before the ranking request completed{detail}")

    def _abandoned_error(self, endpoint: Endpoint) -> DeadlineExceededError:
        self.stats.abandoned += 1
        return DeadlineExceededError(
            f"deadline passed before {endpoint.url} answered; the request was left to finish there "
            f"(not cancelled) for up to {self.options.abandon_grace_s:g}s more", endpoint=endpoint.url)

    def _after_failure(self, endpoint: Endpoint, error: ClientError, attempt: int) -> float:
        """After a failed attempt: re-raise a non-transient error; else mark the endpoint down and return the seconds
        to wait before the next attempt (0: fail over to a healthy endpoint now; -1: attempts exhausted)."""
        if not isinstance(error, UnavailableError):
            raise error
        self.pool.mark_down(endpoint)
        if attempt >= self.options.retry.max_attempts:
            return -1.0
        self.stats.retries += 1
        if self.pool.any_up():
            self.stats.failovers += 1
            return 0.0
        return self.options.retry.backoff(attempt, self._rng)


class RankingClient(_ClientBase):
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
        clients, self._clients = self._clients, {}
        for client in clients.values():
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken channel must not mask the caller's error
                log.debug("error closing gRPC client", exc_info=True)

    def _reap(self) -> None:
        """Release the shared memory of abandoned calls that have ended since."""
        with self._lock:
            ended = [c for c in self._abandoned if c.done.is_set()]
            self._abandoned = [c for c in self._abandoned if not c.done.is_set()]
        for call in ended:
            call.release()

    def _new_client(self, url: str):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(url)

    def _healthy(self, endpoint: Endpoint, timeout: float) -> bool:
        self.stats.health_checks += 1
        try:
            client = self._client(endpoint)
            return bool(client.is_server_ready(client_timeout=timeout)
                        and client.is_model_ready(self.options.model, client_timeout=timeout))
        except Exception:  # noqa: BLE001 - any failure of the probe means "not ready"
            return False

    def wait_ready(self, timeout: float = 60.0, all_endpoints: bool = False) -> list[str]:
        """Block until one endpoint (or every one) has the server and the ensemble ready; returns the ready ones."""
        deadline = time.monotonic() + timeout
        while True:
            ready: list[str] = []
            for endpoint in self.pool.endpoints:
                self._record_probe(endpoint, self._healthy(endpoint, self._probe_timeout(deadline, 0.1)), ready)
            if self._ready_enough(ready, all_endpoints, deadline, timeout):
                return ready
            time.sleep(0.25)

    def rank(self, candidates: Sequence[Candidate], history, timeout: float | None = None) -> RankingResult:
        """Score `candidates` for a user with `history` (their recent item ids, or a [N, L] array)."""
        return self.rank_payloads(self._payloads(candidates), history, timeout=timeout)

    def rank_payloads(self, items: Mapping[Modality, Sequence[bytes]], history,
                      timeout: float | None = None) -> RankingResult:
        """Score raw payloads: `items[modality]` holds one bytes object per candidate."""
        timeout, deadline = self._begin(timeout)
        requests = self._requests(items, history)
        self._reap()
        return self._merge([self._call(r, deadline, timeout) for r in requests])

    def _pick(self, deadline: float) -> Endpoint:
        for endpoint, needs_check in self.pool.plan():
            if not needs_check:
                return endpoint
            if self._healthy(endpoint, self._probe_timeout(deadline, 0.05)):
                self.pool.mark_up(endpoint)
                return endpoint
            self.pool.mark_checked(endpoint)
        return self.pool.fallback()

    def _call(self, request: _Request, deadline: float, timeout: float) -> tuple[np.ndarray, np.ndarray]:
        last: ClientError | None = None
        attempt = 0
        while True:
            if deadline - time.monotonic() <= 0:
                raise self._deadline_error(timeout, last)
            endpoint = self._pick(deadline)
            attempt += 1
            self.stats.attempts += 1
            try:
                return self._infer(endpoint, request, deadline - time.monotonic())
            except ClientError as exc:
                last = exc
            wait = self._after_failure(endpoint, last, attempt)
            if wait < 0:
                raise self._give_up(attempt, last)
            if wait:
                time.sleep(max(0.0, min(wait, deadline - time.monotonic())))

    def _infer(self, endpoint: Endpoint, request: _Request, remaining: float) -> tuple[np.ndarray, np.ndarray]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = self._client(endpoint)
        shm = _ShmRegion(request) if self._use_shm(endpoint, request) else None
        rpc_timeout = self.options.rpc_timeout(remaining)
        call = _SentCall(lambda: _release_sync(client, shm), time.monotonic() + rpc_timeout)
        try:
            if shm is not None:
                client.register_system_shared_memory(shm.name, shm.key, shm.byte_size, client_timeout=remaining)
            client.async_infer(self.options.model, _infer_inputs(grpcclient, request, shm), callback=call.finish,
                               client_timeout=rpc_timeout)
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
        return self._outputs(call.result, request)


class AsyncRankingClient(_ClientBase):
    """asyncio ranking client over `tritonclient.grpc.aio`; chunks of one request are sent concurrently."""

    async def __aenter__(self) -> AsyncRankingClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Wait for abandoned calls (at most `abandon_grace` seconds), then close every gRPC channel."""
        pending, self._abandoned = self._abandoned, []
        if pending:
            await asyncio.wait(pending, timeout=self.options.abandon_grace_s)
        clients, self._clients = self._clients, {}
        for client in clients.values():
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - closing a broken channel must not mask the caller's error
                log.debug("error closing gRPC client", exc_info=True)

    def _new_client(self, url: str):
        import tritonclient.grpc.aio as aioclient

        return aioclient.InferenceServerClient(url)

    async def _healthy(self, endpoint: Endpoint, timeout: float) -> bool:
        self.stats.health_checks += 1
        try:
            client = self._client(endpoint)
            return bool(await client.is_server_ready(client_timeout=timeout)
                        and await client.is_model_ready(self.options.model, client_timeout=timeout))
        except Exception:  # noqa: BLE001 - any failure of the probe means "not ready"
            return False

    async def wait_ready(self, timeout: float = 60.0, all_endpoints: bool = False) -> list[str]:
        """Wait until one endpoint (or every one) has the server and the ensemble ready; returns the ready ones."""
        deadline = time.monotonic() + timeout
        while True:
            ready: list[str] = []
            for endpoint in self.pool.endpoints:
                healthy = await self._healthy(endpoint, self._probe_timeout(deadline, 0.1))
                self._record_probe(endpoint, healthy, ready)
            if self._ready_enough(ready, all_endpoints, deadline, timeout):
                return ready
            await asyncio.sleep(0.25)

    async def rank(self, candidates: Sequence[Candidate], history, timeout: float | None = None) -> RankingResult:
        """Score `candidates` for a user with `history` (their recent item ids, or a [N, L] array)."""
        return await self.rank_payloads(self._payloads(candidates), history, timeout=timeout)

    async def rank_payloads(self, items: Mapping[Modality, Sequence[bytes]], history,
                            timeout: float | None = None) -> RankingResult:
        """Score raw payloads; the chunks of a long candidate list run concurrently, merged in order."""
        timeout, deadline = self._begin(timeout)
        requests = self._requests(items, history)
        results = await asyncio.gather(*(self._call(r, deadline, timeout) for r in requests))
        return self._merge(list(results))

    async def _pick(self, deadline: float) -> Endpoint:
        for endpoint, needs_check in self.pool.plan():
            if not needs_check:
                return endpoint
            if await self._healthy(endpoint, self._probe_timeout(deadline, 0.05)):
                self.pool.mark_up(endpoint)
                return endpoint
            self.pool.mark_checked(endpoint)
        return self.pool.fallback()

    async def _call(self, request: _Request, deadline: float, timeout: float) -> tuple[np.ndarray, np.ndarray]:
        last: ClientError | None = None
        attempt = 0
        while True:
            if deadline - time.monotonic() <= 0:
                raise self._deadline_error(timeout, last)
            endpoint = await self._pick(deadline)
            attempt += 1
            self.stats.attempts += 1
            try:
                return await self._infer(endpoint, request, deadline - time.monotonic())
            except ClientError as exc:
                last = exc
            wait = self._after_failure(endpoint, last, attempt)
            if wait < 0:
                raise self._give_up(attempt, last)
            if wait:
                await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))

    async def _infer(self, endpoint: Endpoint, request: _Request, remaining: float) -> tuple[np.ndarray, np.ndarray]:
        import tritonclient.grpc.aio as aioclient
        from tritonclient.utils import InferenceServerException

        client = self._client(endpoint)
        shm = _ShmRegion(request) if self._use_shm(endpoint, request) else None
        try:
            if shm is not None:
                await client.register_system_shared_memory(shm.name, shm.key, shm.byte_size,
                                                           client_timeout=remaining)
            sent = asyncio.ensure_future(client.infer(self.options.model, _infer_inputs(aioclient, request, shm),
                                                      client_timeout=self.options.rpc_timeout(remaining)))
        except BaseException as exc:
            await _release_async(client, shm)
            if isinstance(exc, InferenceServerException):
                raise to_client_error(exc, endpoint.url) from None
            raise
        try:
            done, _ = await asyncio.wait({sent}, timeout=max(remaining, 0.0))
        except asyncio.CancelledError:  # the caller gave up: leave the RPC to finish, as on a deadline
            self._abandon(sent, client, shm)
            raise
        if not done:
            self._abandon(sent, client, shm)
            raise self._abandoned_error(endpoint)
        await _release_async(client, shm)
        try:
            return self._outputs(sent.result(), request)
        except InferenceServerException as exc:
            raise to_client_error(exc, endpoint.url) from None

    def _abandon(self, sent: asyncio.Future, client, shm: _ShmRegion | None) -> None:
        async def finish() -> None:
            try:
                await sent
            except Exception:  # noqa: BLE001 - nobody waits for this result any more
                pass
            finally:
                await _release_async(client, shm)

        task = asyncio.ensure_future(finish())
        self._abandoned.append(task)
        task.add_done_callback(lambda t: self._abandoned.remove(t) if t in self._abandoned else None)


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


def _release_sync(client, shm: _ShmRegion | None) -> None:
    if shm is not None:
        _quietly(client.unregister_system_shared_memory, shm.name)
        shm.destroy()


async def _release_async(client, shm: _ShmRegion | None) -> None:
    if shm is not None:
        await _quietly_async(client.unregister_system_shared_memory, shm.name)
        shm.destroy()


def _quietly(fn, *args) -> None:
    # Clean-up after a failed call (e.g. unregistering shared memory on a server that went away) must not hide
    # the call's own error.
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        log.debug("clean-up call %s failed", getattr(fn, "__name__", fn), exc_info=True)


async def _quietly_async(fn, *args) -> None:
    try:
        await fn(*args)
    except Exception:  # noqa: BLE001 - see _quietly
        log.debug("clean-up call %s failed", getattr(fn, "__name__", fn), exc_info=True)
