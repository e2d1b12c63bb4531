"""The retry planner, the endpoint pool and the two I/O loops, on a fake clock with fake outcomes: no server, no
sleeping."""

from __future__ import annotations

import asyncio
import random

import pytest

from clients._endpoints import EndpointPool
from clients._retry import Attempt, ClientStats, Planner, Probe, RetryPolicy, Sleep, run, run_async
from clients.errors import DeadlineExceededError, InvalidInputError, ServerError, UnavailableError
from tests.fakes.clients import FakeClock

POLICY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, jitter=0.0)


class FakeIO:
    """Carries out the planner's steps with fake outcomes and records them. `outcomes[url]` is a queue of attempt
    outcomes (an exception fails the attempt, anything else is its result; empty: "ok"), `ready[url]` what a
    probe finds (default ready); an attempt takes `attempt_s` fake seconds."""

    def __init__(self, clock: FakeClock, outcomes=None, ready=None, attempt_s: float = 0.0):
        self.clock, self.attempt_s = clock, attempt_s
        self.outcomes = {url: list(v) for url, v in (outcomes or {}).items()}
        self.ready = dict(ready or {})
        self.trace: list[tuple] = []

    def probe(self, endpoint, timeout):
        self.trace.append(("probe", endpoint.url, round(timeout, 6)))
        return self.ready.get(endpoint.url, True)

    def attempt(self, endpoint, remaining):
        self.trace.append(("attempt", endpoint.url, round(remaining, 6)))
        self.clock.now += self.attempt_s
        queue = self.outcomes.get(endpoint.url)
        outcome = queue.pop(0) if queue else "ok"
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def sleep(self, seconds):
        self.trace.append(("sleep", round(seconds, 6)))
        self.clock.now += seconds

    def run(self, plan):
        return run(plan, self.probe, self.attempt, self.sleep)

    def run_async(self, plan):
        async def probe(endpoint, timeout):
            return self.probe(endpoint, timeout)

        async def attempt(endpoint, remaining):
            return self.attempt(endpoint, remaining)

        async def sleep(seconds):
            self.sleep(seconds)

        return asyncio.run(run_async(plan, probe, attempt, sleep))


def _planner(urls=("a", "b"), policy=POLICY, recheck_s=1.0, health_timeout_s=2.0, seed=None):
    clock = FakeClock()
    pool = EndpointPool(list(urls), recheck_s=recheck_s, clock=clock)
    return Planner(pool, policy, ClientStats(), health_timeout_s=health_timeout_s,
                   rng=random.Random(seed) if seed is not None else None, clock=clock), clock


def _down(msg="Socket closed", url="a"):
    return UnavailableError(msg, "StatusCode.UNAVAILABLE", url)


# --- the planner, stepped by hand ----------------------------------------------------------------------------------


def test_first_attempts_go_round_robin_with_the_whole_deadline():
    planner, clock = _planner(("a", "b", "c"))
    firsts = [next(planner.call(clock() + 5.0, 5.0)) for _ in range(4)]
    assert [(s.endpoint.url, s.remaining) for s in firsts] == [("a", 5.0), ("b", 5.0), ("c", 5.0), ("a", 5.0)]
    assert all(isinstance(s, Attempt) for s in firsts) and planner.stats.attempts == 4


def test_a_transient_failure_fails_over_at_once():
    planner, clock = _planner(("a", "b"))
    plan = planner.call(clock() + 1.0, 1.0)
    assert next(plan).endpoint.url == "a"
    step = plan.send(_down())
    assert isinstance(step, Attempt) and step.endpoint.url == "b"  # no Sleep in between
    a = planner.pool.endpoints[0]
    assert a.down_since == clock() and planner.stats.retries == 1 and planner.stats.failovers == 1
    assert next(planner.call(clock() + 1.0, 1.0)).endpoint.url == "b", "a down endpoint leaves the rotation"


@pytest.mark.parametrize("error", [InvalidInputError("item_image[1]: cannot decode", "StatusCode.INVALID_ARGUMENT"),
                                   DeadlineExceededError("late", "StatusCode.DEADLINE_EXCEEDED"),
                                   ServerError("oops", "StatusCode.INTERNAL")])
def test_a_non_transient_error_ends_the_call_as_it_is(error):
    planner, clock = _planner(("a", "b"))
    plan = planner.call(clock() + 1.0, 1.0)
    next(plan)
    with pytest.raises(type(error)) as info:
        plan.send(error)
    assert info.value is error
    assert planner.pool.any_up() and planner.pool.endpoints[0].down_since is None
    assert planner.stats.retries == 0 and planner.stats.attempts == 1


def test_alone_it_backs_off_exponentially_then_gives_up_with_the_last_message():
    planner, clock = _planner(("a",), policy=RetryPolicy(max_attempts=4, initial_backoff_s=0.01, jitter=0.0))
    io = FakeIO(clock, outcomes={"a": [_down(f"down {i}") for i in range(9)]})
    last = r"after 4 attempt\(s\); last error: down 3 \(StatusCode.UNAVAILABLE\) \[a\]$"
    with pytest.raises(UnavailableError, match=last):
        io.run(planner.call(clock() + 10.0, 10.0))
    assert io.trace == [("attempt", "a", 10.0), ("sleep", 0.01), ("attempt", "a", 9.99), ("sleep", 0.02),
                        ("attempt", "a", 9.97), ("sleep", 0.04), ("attempt", "a", 9.93)]
    assert (planner.stats.attempts, planner.stats.retries, planner.stats.failovers) == (4, 3, 0)


def test_the_deadline_clips_the_backoff_and_ends_the_call_with_the_last_error():
    planner, clock = _planner(("a",), policy=RetryPolicy(max_attempts=50, initial_backoff_s=0.08, multiplier=1.0,
                                                         jitter=0.0))
    io = FakeIO(clock, outcomes={"a": [_down("refused")] * 50}, attempt_s=0.01)
    with pytest.raises(DeadlineExceededError, match=r"deadline of 0.2s passed .*; last error: refused"):
        io.run(planner.call(clock() + 0.2, 0.2))
    # 0.01 per attempt: attempts at 0, 0.09 and 0.18 s; the last wait is cut to the 0.01 s left.
    assert io.trace == [("attempt", "a", 0.2), ("sleep", 0.08), ("attempt", "a", 0.11), ("sleep", 0.08),
                        ("attempt", "a", 0.02), ("sleep", 0.01)]


def test_a_call_past_its_deadline_makes_no_attempt():
    planner, clock = _planner()
    with pytest.raises(DeadlineExceededError, match="deadline of 0.5s passed before the ranking request completed$"):
        next(planner.call(clock(), 0.5))
    assert planner.stats.attempts == 0


def test_a_down_endpoint_is_probed_when_due_and_rejoins_when_ready():
    planner, clock = _planner(("a", "b"), recheck_s=1.0, health_timeout_s=2.0)
    a = planner.pool.endpoints[0]
    planner.pool.mark_down(a)
    clock.now += 0.5
    assert next(planner.call(clock() + 5.0, 5.0)).endpoint.url == "b", "not due for a check yet"
    clock.now += 0.5
    plan = planner.call(clock() + 5.0, 5.0)
    assert next(plan) == Probe(a, 2.0)  # due: probed before the attempt, within the health timeout
    step = plan.send(True)
    assert step == Attempt(a, 5.0) and a.down_since is None and planner.stats.health_checks == 1


def test_a_probe_that_fails_keeps_the_endpoint_out_until_the_next_check():
    planner, clock = _planner(("a", "b"), recheck_s=1.0)
    a = planner.pool.endpoints[0]
    planner.pool.mark_down(a)
    clock.now += 1.0
    plan = planner.call(clock() + 0.01, 0.01)
    assert next(plan) == Probe(a, 0.05)  # floored: a probe gets at least 50 ms, even just before the deadline
    assert plan.send(False).endpoint.url == "b"
    assert a.down_since is not None and a.last_check == clock()
    assert next(planner.call(clock() + 5.0, 5.0)).endpoint.url == "b", "checked just now: not probed again"


def test_with_every_endpoint_down_it_backs_off_and_tries_the_longest_failed_one():
    planner, clock = _planner(("a", "b"), recheck_s=100.0)
    io = FakeIO(clock, outcomes={"a": [_down()], "b": [_down(url="b")]})
    assert io.run(planner.call(clock() + 5.0, 5.0)) == "ok"
    # a fails: fail over to b at once; b fails too: nothing is up, so back off and retry a, down the longest.
    assert io.trace == [("attempt", "a", 5.0), ("attempt", "b", 5.0), ("sleep", 0.02), ("attempt", "a", 4.98)]
    assert planner.stats.failovers == 1 and planner.stats.retries == 2


def test_the_pool_falls_back_to_the_endpoint_that_failed_longest_ago():
    clock = FakeClock()
    pool = EndpointPool(["a", "b"], recheck_s=100, clock=clock)
    a, b = pool.endpoints
    pool.mark_down(a)
    clock.now += 0.01
    pool.mark_down(b)
    assert pool.plan() == [] and pool.fallback() is a and not pool.any_up()
    clock.now += 100
    assert pool.plan() == [(a, True)], "each endpoint is due for a check recheck_s after its own last one"


def test_readiness_probes_every_endpoint_until_enough_are_ready():
    planner, clock = _planner(("a", "b"))
    io = FakeIO(clock, ready={"a": True, "b": False})
    assert io.run(planner.readiness("rank", 10.0)) == ["a"]
    a, b = planner.pool.endpoints
    plan = planner.readiness("rank", 10.0, all_endpoints=True)
    assert [next(plan), plan.send(True)] == [Probe(a, 2.0), Probe(b, 2.0)]
    assert plan.send(False) == Sleep(0.25) and b.down_since is not None
    clock.now += 0.25
    next(plan)
    plan.send(True)
    with pytest.raises(StopIteration) as done:
        plan.send(True)
    assert done.value.value == ["a", "b"] and b.down_since is None


def test_readiness_gives_up_after_its_timeout_naming_the_model():
    planner, clock = _planner(("a", "b"), health_timeout_s=0.5)
    io = FakeIO(clock, ready={"a": False, "b": False})
    with pytest.raises(UnavailableError, match=r"model 'rank' not ready within 1s on a, b \(ready: none\)"):
        io.run(planner.readiness("rank", 1.0))
    assert io.trace[:3] == [("probe", "a", 0.5), ("probe", "b", 0.5), ("sleep", 0.25)]
    assert io.trace.count(("sleep", 0.25)) == 4 and planner.stats.health_checks == 10


# --- the I/O loops and the policy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["sync", "async"])
def test_both_loops_carry_out_the_same_steps(loop):
    planner, clock = _planner(("a", "b"), recheck_s=0.01)
    io = FakeIO(clock, outcomes={"a": [_down(), {"scores": [1]}], "b": [_down(url="b")]})
    drive = io.run if loop == "sync" else io.run_async
    assert drive(planner.call(clock() + 1.0, 1.0)) == {"scores": [1]}
    assert io.trace == [("attempt", "a", 1.0), ("attempt", "b", 1.0), ("sleep", 0.02), ("probe", "a", 0.98),
                        ("attempt", "a", 0.98)]
    assert drive(planner.readiness("rank", 1.0)) == ["a", "b"]


def test_backoff_grows_is_capped_and_jitters_within_bounds():
    policy = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.3, multiplier=2.0, jitter=0.2)
    assert [policy.backoff(k) for k in range(1, 6)] == [0.05, 0.1, 0.2, 0.3, 0.3]
    rng = random.Random(0)
    waits = [policy.backoff(2, rng) for _ in range(200)]
    assert 0.08 <= min(waits) < 0.09 and 0.11 < max(waits) <= 0.12
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.0)
