"""`serving.admission`: what the server admits when it is past its capacity (issue 19).

- Queues: every model with a dynamic batcher gets Triton's `default_queue_policy` (a bounded queue, a default
  timeout with `timeout_action: REJECT`, and the caller's own timeout honoured when `allow_timeout_override`); a
  request past a full queue or its timeout is refused by Triton itself, fast, with UNAVAILABLE.
- Priorities: the route (the model callers use) has one priority level per traffic class, in order (level 1 is
  served first). Production outranks the catalogue warm-up (`embed-catalogue`) and load tests; each caller sets
  its class's level (`level()`), a request without one is served at `default_priority`'s level. BLS calls cannot
  carry a priority in Triton 2.51 (`pb_utils.InferenceRequest` has `timeout` but no priority), so members get
  queues, not levels.
- Cost: a per-request budget of the decoding work the route would do for the request's cache misses (decoded
  pixels, audio samples, video frames), read from the payloads' headers before anything is decoded; a request over
  it is answered INVALID_ARG naming the budget and the request's cost.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fusionrank.contract.spec.base import check_positive, fail


class Priority(str, enum.Enum):
    """A traffic class; `AdmissionSpec.priorities` orders them into Triton priority levels."""

    PRODUCTION = "production"
    WARMUP = "warmup"  # `fusionrank embed-catalogue`
    LOADTEST = "loadtest"  # `fusionrank loadtest` and `fusionrank bench`


@dataclass(frozen=True)
class QueuePolicySpec:
    """One Triton `ModelQueuePolicy` (`timeout_action` is always REJECT: a request nobody waits for is dropped)."""

    max_queue_size: int = 0  # requests waiting, per priority level; 0: unbounded
    timeout_us: int = 0  # `default_timeout_microseconds`: queued longer than this is refused; 0: no default
    allow_timeout_override: bool = True  # a request's own timeout (the caller's deadline) replaces the default

    def __post_init__(self):
        for name in ("max_queue_size", "timeout_us"):
            if getattr(self, name) < 0:
                fail(f"serving.admission.*.{name}", getattr(self, name), "an integer >= 0 (0: none)")


@dataclass(frozen=True)
class CostBudgetSpec:
    """Per-request decoding budget, summed over the rows the route must decode (cache hits cost nothing)."""

    max_pixels: int = 64_000_000  # stills' width x height: four 16-MP images, 64 of one megapixel; 0: no budget
    max_audio_samples: int = 0  # samples the WAV decoder reads (one clip at most per row); 0: no budget
    max_video_frames: int = 7_200  # frames the videos' containers declare (walked to sample K); 0: no budget

    def __post_init__(self):
        for name in ("max_pixels", "max_audio_samples", "max_video_frames"):
            if getattr(self, name) < 0:
                fail(f"serving.admission.cost.{name}", getattr(self, name), "an integer >= 0 (0: no budget)")


@dataclass(frozen=True)
class AdmissionSpec:
    priorities: tuple[Priority, ...] = (Priority.PRODUCTION, Priority.WARMUP, Priority.LOADTEST)
    default_priority: Priority = Priority.PRODUCTION
    # The route's queue, per instance: Triton's queue before the route (rarely used: the route's executes return at
    # once) and the route's own gate (`fusionrank.route.shedding.DecodeGate`), where requests with payloads to decode
    # wait for a slot: at most `max_queue_size` of them; a request without a deadline of its own is admitted to wait
    # only when the gate expects to answer it within 0.8 of the SLO's median (`slo.p50_ms`; `timeout_us` if shorter):
    # the gate refuses at once what it cannot answer within it.
    route_queue: QueuePolicySpec = field(default_factory=lambda: QueuePolicySpec(8, 2_000_000))
    # The members' queues (the route's BLS calls): unbounded, the route's gates bound what is in flight; the route's
    # deadline still applies (`allow_timeout_override`).
    default_queue: QueuePolicySpec = field(default_factory=QueuePolicySpec)
    queues: dict[str, QueuePolicySpec] = field(default_factory=dict)  # per model name, over the two above
    background_queue: QueuePolicySpec | None = None  # the route's levels below `default_priority`; null: as theirs
    cost: CostBudgetSpec = field(default_factory=CostBudgetSpec)
    decode_threads: int = 1  # the route instance's decoding pool: cached requests are ranked meanwhile
    # The most requests with payloads to decode one route instance serves at once (decoding, encoding, ranking); its
    # gate adapts from 1 up to this while the service time stays well under the callers' deadlines (requests admitted
    # together share the cores: more raise throughput, then only lengthen each); more wait in its gate or are refused
    # UNAVAILABLE at once when their deadline cannot hold the wait (docs/admission.md). Requests the cache answers
    # whole are never counted, never wait, never refused.
    max_decoding_requests: int = 4

    def __post_init__(self):
        if not self.priorities or len(set(self.priorities)) != len(self.priorities):
            fail("serving.admission.priorities", [p.value for p in self.priorities],
                 "a non-empty list of distinct classes among " + ", ".join(p.value for p in Priority))
        if self.default_priority not in self.priorities:
            fail("serving.admission.default_priority", self.default_priority.value,
                 "one of serving.admission.priorities: " + ", ".join(p.value for p in self.priorities))
        check_positive("serving.admission.decode_threads", self.decode_threads)
        check_positive("serving.admission.max_decoding_requests", self.max_decoding_requests)

    def level(self, priority: Priority | str) -> int:
        """The Triton priority level of a traffic class (1 is served first); a class not listed gets the lowest."""
        priority = Priority(priority)
        if priority in self.priorities:
            return self.priorities.index(priority) + 1
        return len(self.priorities)

    def queue(self, model: str, route: bool = False) -> QueuePolicySpec:
        """The queue policy of one model (`route`: it is the route callers use)."""
        return self.queues.get(model, self.route_queue if route else self.default_queue)
