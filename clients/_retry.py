"""When and where the ranking client tries, decided once for the sync and the asyncio client.

`Planner` holds the decisions and does no I/O: `Planner.call` is a generator that yields steps (`Probe` an endpoint,
make an `Attempt` on one, `Sleep`) and is sent each step's outcome; it raises the error that ends the call.
`run` (blocking) and `run_async` (asyncio) carry the steps out. One call
- shares one deadline between its attempts, backoffs and health checks;
- fails over at once to another endpoint believed up, and backs off exponentially when none is;
- retries only transient errors (`UnavailableError`); any other error ends the call as it is.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from clients._endpoints import Endpoint, EndpointPool
from clients.errors import ClientError, DeadlineExceededError, UnavailableError

T = TypeVar("T")

READY_POLL_S = 0.25  # wait_ready's pause between two sweeps over the endpoints
CALL_PROBE_FLOOR_S = 0.05  # a health check inside a call gets at least this long, even just before the deadline
READY_PROBE_FLOOR_S = 0.1


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


# --- steps: what the planner asks the I/O loop to do ---------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """Health-check `endpoint` within `timeout` seconds; send back whether it is ready."""

    endpoint: Endpoint
    timeout: float


@dataclass(frozen=True)
class Attempt:
    """Send the request to `endpoint` with `remaining` seconds of the deadline left; on failure send back the
    ClientError (a success ends the call)."""

    endpoint: Endpoint
    remaining: float


@dataclass(frozen=True)
class Sleep:
    """Wait `seconds`, then send back None."""

    seconds: float


Step = Probe | Attempt | Sleep
Plan = Generator[Step, Any, T]


class Planner:
    """The decisions of the ranking clients, shared by every call of one client."""

    def __init__(self, pool: EndpointPool, policy: RetryPolicy, stats: ClientStats, *, health_timeout_s: float,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic):
        self.pool = pool
        self.policy = policy
        self.stats = stats
        self.health_timeout_s = health_timeout_s
        self.rng = rng
        self.clock = clock

    def call(self, deadline: float, timeout: float) -> Plan[None]:
        """The steps of one ranking request due by `deadline` (`timeout` seconds after it began, for messages)."""
        last: ClientError | None = None
        attempt = 0
        while True:
            if deadline - self.clock() <= 0:
                detail = f"; last error: {last}" if last else ""
                raise DeadlineExceededError(
                    f"deadline of {timeout:g}s passed before the ranking request completed{detail}")
            endpoint = yield from self._pick(deadline)
            attempt += 1
            self.stats.attempts += 1
            last = yield Attempt(endpoint, deadline - self.clock())
            wait = self._after_failure(endpoint, last, attempt)
            if wait is None:
                raise UnavailableError(f"no endpoint of {', '.join(self.pool.urls)} served the request after "
                                       f"{attempt} attempt(s); last error: {last.server_message}", last.status,
                                       last.endpoint)
            if wait:
                yield Sleep(max(0.0, min(wait, deadline - self.clock())))

    def _pick(self, deadline: float) -> Plan[Endpoint]:
        """The endpoint of the next attempt: the first due-for-a-check one that a probe finds ready, else the next
        healthy one in turn, else (all down) the one that failed longest ago."""
        for endpoint, needs_check in self.pool.plan():
            if not needs_check:
                return endpoint
            if (yield self._probe(endpoint, deadline, CALL_PROBE_FLOOR_S)):
                self.pool.mark_up(endpoint)
                return endpoint
            self.pool.mark_checked(endpoint)
        return self.pool.fallback()

    def _after_failure(self, endpoint: Endpoint, error: ClientError, attempt: int) -> float | None:
        """After a failed attempt: re-raise a non-transient error; else mark the endpoint down and return the seconds
        to wait before the next attempt (0: fail over to a healthy endpoint now; None: attempts exhausted)."""
        if not isinstance(error, UnavailableError):
            raise error
        self.pool.mark_down(endpoint)
        if attempt >= self.policy.max_attempts:
            return None
        self.stats.retries += 1
        if self.pool.any_up():
            self.stats.failovers += 1
            return 0.0
        return self.policy.backoff(attempt, self.rng)

    def _probe(self, endpoint: Endpoint, deadline: float, floor: float) -> Probe:
        self.stats.health_checks += 1
        return Probe(endpoint, min(self.health_timeout_s, max(floor, deadline - self.clock())))

    def readiness(self, model: str, timeout: float, all_endpoints: bool = False) -> Plan[list[str]]:
        """Probe every endpoint until one (or every one) has `model` ready; returns the ready URLs, or raises
        UnavailableError once `timeout` has passed."""
        deadline = self.clock() + timeout
        while True:
            ready: list[str] = []
            for endpoint in self.pool.endpoints:
                if (yield self._probe(endpoint, deadline, READY_PROBE_FLOOR_S)):
                    self.pool.mark_up(endpoint)
                    ready.append(endpoint.url)
                else:
                    self.pool.mark_down(endpoint)
            if ready and (not all_endpoints or len(ready) == len(self.pool.endpoints)):
                return ready
            if self.clock() >= deadline:
                why = "".join(f"; {e.url}: {e.last_error}" for e in self.pool.endpoints
                              if e.last_error and e.url not in ready)
                raise UnavailableError(f"model {model!r} not ready within {timeout:g}s on {', '.join(self.pool.urls)}"
                                       f" (ready: {', '.join(ready) or 'none'}){why}")
            yield Sleep(READY_POLL_S)


# --- the two I/O loops ---------------------------------------------------------------------------------------------


def run(plan: Plan, probe: Callable[[Endpoint, float], bool],
        attempt: Callable[[Endpoint, float], T] | None = None, sleep: Callable[[float], None] = time.sleep):
    """Carry out `plan` with blocking I/O; returns the first successful attempt's result or the plan's own."""
    outcome = None
    while True:
        try:
            step = plan.send(outcome)
        except StopIteration as done:
            return done.value
        if isinstance(step, Attempt):
            try:
                return attempt(step.endpoint, step.remaining)
            except ClientError as exc:
                outcome = exc
        elif isinstance(step, Probe):
            outcome = probe(step.endpoint, step.timeout)
        else:
            sleep(step.seconds)
            outcome = None


async def run_async(plan: Plan, probe: Callable[[Endpoint, float], Awaitable[bool]],
                    attempt: Callable[[Endpoint, float], Awaitable[T]] | None = None,
                    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
    """`run` for asyncio: the same loop, awaiting each step."""
    outcome = None
    while True:
        try:
            step = plan.send(outcome)
        except StopIteration as done:
            return done.value
        if isinstance(step, Attempt):
            try:
                return await attempt(step.endpoint, step.remaining)
            except ClientError as exc:
                outcome = exc
        elif isinstance(step, Probe):
            outcome = await probe(step.endpoint, step.timeout)
        else:
            await sleep(step.seconds)
            outcome = None
