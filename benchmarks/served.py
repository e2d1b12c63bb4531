"""Load on a served model from the benchmark catalogue, through the shared measurement core (`benchmarks.lib`):
one closed-loop caller per `RequestFactory` (Zipf popularity, a share of never-seen items), each with its own gRPC
client, the call failing on any error; or Poisson arrivals drawing from the same factories (`open_window`). Used by
`fusionrank tune` and the serving-memory benchmark."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.lib import (
    CALLER_TIMEOUT_S,
    LoadResult,
    Stability,
    StableRun,
    closed_loop,
    open_loop,
    until_stable,
    workers_for,
)
from fusionrank.contract.spec import PipelineSpec
from fusionrank.contract.tensors import CLICK_PROBABILITY, deadline_arguments, infer_inputs
from fusionrank.request.scenario import RequestFactory, Scenario


@dataclass(frozen=True)
class Stream:
    """The candidate stream: candidates per request, closed-loop callers, popularity, never-seen share, seed."""

    candidates: int = 16
    callers: int = 8
    zipf_exponent: float = 1.1
    novel_share: float = 1.0  # 1.0: every candidate never seen (the cold route, cache misses only)
    seed: int = 0

    def scenario(self) -> Scenario:
        return Scenario(name="capacity", users=self.callers, candidates={self.candidates: 1.0},
                        zipf_exponent=self.zipf_exponent, novel_share=self.novel_share, source="fusionrank tune")


class ServedLoad:
    """Callers of one model on one server; each `window` runs them for a while and returns the driver's result.
    Factories persist across windows, so never-seen items stay never-seen for the whole measurement."""

    def __init__(self, spec: PipelineSpec, bench, url: str, model: str, stream: Stream,
                 timeout_s: float = CALLER_TIMEOUT_S):
        self.url, self.model, self.stream, self.timeout_s = url, model, stream, timeout_s
        # Never-seen items get new bytes, not new content: building them costs the callers, which share the cores
        # with the server, a hundredth of the CPU (`RequestFactory`'s `renew_novel`).
        self.factories = [RequestFactory(spec, bench, stream.scenario(), seed=stream.seed * 10_000 + k,
                                         renew_novel=True) for k in range(stream.callers)]
        self._clients: list = []

    def _make_call(self, k: int) -> Callable[[list], None]:
        import tritonclient.grpc as grpcclient  # only where a server is called

        client = grpcclient.InferenceServerClient(self.url)
        self._clients.append(client)

        def call(inputs: list) -> None:
            # The deadline each caller holds travels with its request, as the fusionrank client sends it: the route
            # admits it to wait as long as its answer can come within that time.
            result = client.infer(self.model, inputs, client_timeout=self.timeout_s,
                                  **deadline_arguments(self.timeout_s))
            if result.as_numpy(CLICK_PROBABILITY) is None:
                raise RuntimeError(f"{self.model}: answer without {CLICK_PROBABILITY}")

        return call

    def _prepare(self, k: int) -> list:
        """Caller k's next request as gRPC inputs (built off the clock)."""
        import tritonclient.grpc as grpcclient

        return infer_inputs(grpcclient, self.factories[k].next().arrays())

    def window(self, seconds: float) -> LoadResult:
        """The callers for `seconds` (their first call each untimed on the first window)."""
        warmup = 0 if self._clients else 1
        self.close()
        return closed_loop(self._make_call, self.stream.callers, duration_s=seconds, warmup=warmup,
                           prepare=self._prepare)

    def open_window(self, rate_rps: float, seconds: float) -> LoadResult:
        """Poisson arrivals at `rate_rps` for `seconds` (the measurement core's open loop), each request drawn from
        the factories in turn and built before its arrival, sent on one gRPC client (thread-safe for unary calls) with
        a worker for every arrival it can draw, so none is dropped for want of one."""
        self.close()
        return open_loop(self._make_call(0), rate_rps, seconds, seed=self.stream.seed,
                         max_outstanding=workers_for(rate_rps, seconds),
                         prepare=lambda i: self._prepare(i % self.stream.callers))

    def stable(self, seconds: float, rule: Stability, on_window=None) -> StableRun:
        """Windows of `seconds` until the rule holds (perf_analyzer's stability windows)."""
        return until_stable(lambda: self.window(seconds), rule, on_window)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients = []
