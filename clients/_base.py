"""What the sync and the asyncio ranking client share: settings, channels, request shaping and the planner.

Every call has one deadline, shared by its chunks and retries. A call whose deadline passes is abandoned, not
cancelled: its RPC keeps a longer gRPC deadline (`abandon_grace`) so the server finishes it. Triton 2.51 (the server
in the nvidia-pytriton wheel) segfaults when clients cancel in-flight ensemble requests
(triton-inference-server/server#7368, fixed upstream by #7840); the Go workaround in that issue does the same.
`close()` waits for abandoned calls, since closing a channel would cancel them.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clients._endpoints import Endpoint, EndpointPool, parse_urls
from clients._request import Candidate, Chunk, build_chunks, candidate_payloads, expand_outputs
from clients._retry import ClientStats, Planner, RetryPolicy
from clients._server_config import spec_from_server
from clients.errors import DeadlineExceededError, InvalidInputError
from clients.tls import ClientTls
from fusionrank.contract.admin import check_admin_key, grpc_admin_header
from fusionrank.contract.spec import Modality, PipelineSpec, Priority
from fusionrank.contract.tensors import PRIORITY_PARAMETER, deadline_arguments

ON_INVALID = ("raise", "drop")


@dataclass
class ClientOptions:
    """Settings shared by the sync and asyncio clients."""

    model: str
    modalities: tuple[Modality, ...]
    max_candidates: int
    history_length: int
    video_enabled: bool = True
    timeout_s: float = 30.0
    health_timeout_s: float = 2.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    recheck_s: float = 1.0
    shared_memory_threshold: int | None = None  # payload bytes from which loopback calls use shared memory
    abandon_grace_s: float = 30.0  # added to an inference RPC's gRPC deadline; 0: gRPC cancels at the deadline
    priority_level: int = 0  # Triton priority level of every request (1 is served first); 0: the server's default
    on_invalid: str = "raise"  # "drop": score the other candidates and report the invalid ones (RankingResult.errors)

    def infer_kwargs(self, remaining: float) -> dict[str, Any]:
        """tritonclient's per-request `priority` and `timeout` (microseconds): the call's deadline travels with
        the request, so a server past its capacity refuses it (queue policy) instead of serving it late."""
        arguments = deadline_arguments(remaining)
        if self.priority_level:
            arguments["parameters"][PRIORITY_PARAMETER] = self.priority_level
        return {"priority": self.priority_level, **arguments}

    def rpc_timeout(self, remaining: float) -> float:
        """The gRPC deadline of an inference RPC with `remaining` seconds of the call's deadline left."""
        return max(remaining, 1e-3) + self.abandon_grace_s

    @classmethod
    def from_spec(cls, spec: PipelineSpec, **overrides) -> ClientOptions:
        """Options for the spec's route, with `overrides` for the call settings."""
        return cls(model=spec.serving.route, modalities=spec.modalities.enabled,
                   max_candidates=spec.serving.max_candidates, history_length=spec.ranker.history.length,
                   video_enabled=spec.modalities.video_enabled, **overrides)


class ClientBase:
    """Channels, request building and the retry planner of the sync and asyncio clients."""

    def __init__(self, spec: PipelineSpec | None, urls: str | Sequence[str], *, timeout: float = 30.0,
                 health_timeout: float = 2.0, retry: RetryPolicy | None = None, recheck_interval: float = 1.0,
                 shared_memory_threshold: int | None = None, max_candidates: int | None = None,
                 abandon_grace: float = 30.0, client_factory: Callable[[str], Any] | None = None,
                 seed: int | None = None, tls: ClientTls | None = None, admin_key: str | None = None,
                 priority: Priority | str | None = None, on_invalid: str = "raise", model: str | None = None):
        """`spec`: None reads the route's name, limits, modalities and history length from the first endpoint
        that answers (its model config, `model` or "rank"); `tls`: TLS channels (None: plaintext); `admin_key`:
        the server's admin key, sent with the shared-memory calls, which servers started by fusionrank restrict to
        its holders; `priority`: the traffic class of every request (None: the server's default, production);
        `on_invalid`: "raise" the first invalid candidate's `InvalidInputError`, or "drop" invalid candidates and
        score the rest."""
        if abandon_grace < 0:
            raise ValueError(f"abandon_grace must be >= 0 seconds, got {abandon_grace}")
        if on_invalid not in ON_INVALID:
            raise ValueError(f"on_invalid must be one of {', '.join(ON_INVALID)}, got {on_invalid!r}")
        if spec is None:
            spec = spec_from_server(parse_urls(urls), model or "rank", timeout=health_timeout, tls=tls)
        level = 0 if priority is None else spec.serving.admission.level(priority)
        self.options = ClientOptions.from_spec(
            spec, timeout_s=timeout, health_timeout_s=health_timeout, retry=retry or RetryPolicy(),
            recheck_s=recheck_interval, shared_memory_threshold=shared_memory_threshold,
            abandon_grace_s=abandon_grace, priority_level=level, on_invalid=on_invalid)
        if max_candidates is not None:
            if not 0 < max_candidates <= spec.serving.max_candidates:
                raise ValueError(f"max_candidates must be in [1, {spec.serving.max_candidates}], got {max_candidates}")
            self.options.max_candidates = max_candidates
        self.pool = EndpointPool(parse_urls(urls), recheck_s=recheck_interval)
        self.stats = ClientStats()
        self.planner = Planner(self.pool, self.options.retry, self.stats, health_timeout_s=health_timeout,
                               rng=random.Random(seed))
        self._factory = client_factory
        self.tls = tls
        self._admin_headers = grpc_admin_header(check_admin_key(admin_key)) if admin_key is not None else None
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._abandoned: list = []  # calls past their deadline still running on the server (see close())

    @property
    def urls(self) -> list[str]:
        return self.pool.urls

    def _new_client(self, url: str):
        """A tritonclient gRPC client (sync or aio, by subclass) for one endpoint."""
        raise NotImplementedError

    def _channel_kwargs(self) -> dict[str, Any]:
        """tritonclient's channel arguments: TLS credentials, or none for plaintext."""
        return self.tls.channel_kwargs() if self.tls is not None else {}

    def _client(self, endpoint: Endpoint):
        with self._lock:  # one channel per endpoint, also when threads share a sync client
            client = self._clients.get(endpoint.url)
            if client is None:
                client = self._factory(endpoint.url) if self._factory else self._new_client(endpoint.url)
                self._clients[endpoint.url] = client
            return client

    def _take_clients(self) -> list:
        """Every open channel, forgotten here so that close() closes each once."""
        clients, self._clients = self._clients, {}
        return list(clients.values())

    def _payloads(self, candidates: Sequence[Candidate],
                  ) -> tuple[dict[Modality, list[bytes | None]], list[bytes | None] | None]:
        return candidate_payloads(candidates, self.options.modalities)

    def _begin(self, timeout: float | None) -> tuple[float, float]:
        """(timeout, deadline) of one ranking call, which is counted."""
        timeout = self.options.timeout_s if timeout is None else timeout
        self.stats.calls += 1
        return timeout, self.planner.clock() + timeout

    def _chunks(self, items: Mapping[Modality, Sequence[bytes | None]], history,
                videos: Sequence[bytes | None] | None = None) -> list[Chunk]:
        opts = self.options
        return build_chunks(items, history, opts.modalities, opts.history_length, opts.max_candidates, videos,
                            opts.video_enabled)

    def _use_shm(self, endpoint: Endpoint, chunk: Chunk) -> bool:
        threshold = self.options.shared_memory_threshold
        return threshold is not None and endpoint.is_loopback and chunk.payload_bytes() >= threshold

    def _abandoned_error(self, endpoint: Endpoint) -> DeadlineExceededError:
        self.stats.abandoned += 1
        return DeadlineExceededError(
            f"deadline passed before {endpoint.url} answered; the request was left to finish there "
            f"(not cancelled) for up to {self.options.abandon_grace_s:g}s more", endpoint=endpoint.url)


class InvalidRows:
    """The `on_invalid` policy for one chunk: the rows still to send and the errors of those dropped."""

    def __init__(self, chunk: Chunk, ids: Sequence | None, drop: bool):
        self.chunk = self.live = chunk
        self.ids, self.drop = ids, drop
        self.errors: dict[int, InvalidInputError] = {}

    def failed(self, exc: InvalidInputError) -> None:
        """The server refused the live rows: drop the candidate it named, or raise (naming the caller's index)."""
        position = exc.row
        exc = exc.in_request(self.live.index, self.ids)
        if not self.drop or position is None or position >= self.live.rows:
            raise exc
        self.errors[exc.row] = exc
        self.live = self.live.without(position)

    def outputs(self, served, width: int):
        """The chunk's (scores, weights): the served rows' and NaN for dropped ones."""
        return expand_outputs(self.chunk, self.live, served, width)
