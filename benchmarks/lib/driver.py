"""The one load driver: closed loop (N callers back to back) and open loop (Poisson arrivals at a target rate),
warm-up, and repeated windows until stable (perf_analyzer's stability windows).

A `call` is any callable that performs one request and raises on failure; the driver times it, and a `classify`
names each failure's kind (e.g. its gRPC status) in its sample. Every loop is bounded in count and in time, so a
measurement always ends by itself:
- closed loop: `users` threads call back to back until `requests` calls were made or `duration_s` passed; a caller
  may wait between calls, off the clock (`pause`: a client's backoff after a refusal);
- open loop: arrival times are drawn up front (exponential inter-arrival times at `rate`, seeded), a dispatcher
  builds each request before its time (`prepare`) and hands it to a pool of at most `max_outstanding` workers; an
  arrival that finds every worker busy is dropped (counted), one that starts more than `late_after_s` after its time
  is late (counted). Its latency is measured from the scheduled arrival, so queueing in the client counts (no
  coordinated omission);
- stability: windows of `window_s` repeat until the last `stable_windows` agree within `tolerance` of their mean on
  throughput, p50 and p99 (perf_analyzer's `--stability-percentage`), or `max_windows` were run.
"""

from __future__ import annotations

import bisect
import enum
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fusionrank.contract.errors import FusionRankError

Call = Callable[[], object]
# The deadline the benchmarks' closed-loop callers hold and send (a caller that will wait, as the fusionrank client
# sends its timeout): without one, the route admits a request to wait only within the SLO's median.
CALLER_TIMEOUT_S = 60.0
Classify = Callable[[Exception], str]  # a failed call's kind (e.g. its gRPC status), kept in its Sample


class DriverError(FusionRankError):
    """A load setting is out of range (no users, a rate <= 0, an unbounded run)."""


class LoopMode(str, enum.Enum):
    """Closed: N callers back to back (throughput follows the server). Open: arrivals at a rate (the server must
    keep up, or requests queue and drop)."""

    CLOSED = "closed"
    OPEN = "open"


@dataclass(frozen=True)
class Sample:
    """One request: scheduled start (monotonic s), latency (s, from the scheduled start), ok, first error line."""

    start: float
    latency_s: float
    ok: bool
    error: str | None = None
    service_s: float | None = None  # from the actual start (open loop: without the client's own queueing)
    cpu_s: float | None = None  # CPU time of the calling thread during the call (what neighbours' load does not
    #                             inflate when the work runs on that thread, e.g. ONNX Runtime with 1 intra-op thread)
    value: object = None  # what the call returned (e.g. the candidates it scored)
    status: str | None = None  # a failure's kind as the run's `classify` named it (e.g. a gRPC status code)


@dataclass
class LoadResult:
    """What one run of the driver saw."""

    mode: LoopMode
    samples: list[Sample]
    wall_s: float
    users: int = 0  # closed loop: callers; open loop: max outstanding
    offered_rate: float | None = None  # open loop: target arrivals per second
    arrivals: int = 0  # open loop: arrivals scheduled within the run
    dropped: int = 0  # open loop: arrivals that found every worker busy
    late: int = 0  # open loop: arrivals started more than late_after_s after their time

    @property
    def ok_latencies_s(self) -> np.ndarray:
        return np.array([s.latency_s for s in self.samples if s.ok], dtype=np.float64)

    @property
    def ok_cpu_s(self) -> np.ndarray:
        """CPU time of the calling thread per successful request."""
        return np.array([s.cpu_s for s in self.samples if s.ok and s.cpu_s is not None], dtype=np.float64)

    @property
    def errors(self) -> int:
        return sum(1 for s in self.samples if not s.ok)

    @property
    def first_error(self) -> str | None:
        return next((s.error for s in self.samples if not s.ok), None)

    @property
    def throughput(self) -> float:
        """Successful requests per second of wall time."""
        return len(self.ok_latencies_s) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def delivered_rate(self) -> float:
        """Requests started per second (open loop: compare with `offered_rate`)."""
        if len(self.samples) < 2:
            return 0.0
        starts = sorted(s.start for s in self.samples)
        return (len(starts) - 1) / (starts[-1] - starts[0]) if starts[-1] > starts[0] else 0.0

    def inter_arrival_s(self) -> np.ndarray:
        """Gaps between consecutive request starts (open loop: exponential at 1/rate when delivered as offered)."""
        return np.diff(np.sort([s.start for s in self.samples]))

    def summary(self) -> dict:
        """Counts, throughput and p50/p95/p99 (ms) of successful requests, plain numbers."""
        lat = self.ok_latencies_s * 1000.0
        pct = {f"p{q}_ms": float(np.percentile(lat, q)) if len(lat) else math.nan for q in (50, 95, 99)}
        return {"mode": self.mode.value, "requests": len(self.samples), "errors": self.errors,
                "wall_s": self.wall_s, "throughput_rps": self.throughput, "offered_rate": self.offered_rate,
                "delivered_rate": self.delivered_rate, "dropped": self.dropped, "late": self.late, **pct}


def _timed(call: Call, scheduled: float, classify: Classify | None = None) -> Sample:
    began, cpu = time.perf_counter(), time.thread_time()
    try:
        value = call()
    except Exception as exc:  # every failure is a failed request of the run, named by its first line
        end = time.perf_counter()
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Sample(scheduled, end - scheduled, False, text, end - began, time.thread_time() - cpu,
                      status=classify(exc) if classify is not None else None)
    end = time.perf_counter()
    return Sample(scheduled, end - scheduled, True, None, end - began, time.thread_time() - cpu, value)


def _check_bounds(requests: int | None, duration_s: float | None) -> None:
    if requests is None and duration_s is None:
        raise DriverError("a run needs a bound: pass requests, duration_s or both")
    if requests is not None and requests < 0:
        raise DriverError(f"requests {requests} is negative")
    if duration_s is not None and not duration_s > 0:
        raise DriverError(f"duration_s {duration_s} must be > 0")


def closed_loop(make_call: Callable[[int], Call], users: int, requests: int | None = None,
                duration_s: float | None = None, warmup: int = 0,
                prepare: Callable[[int], object] | None = None, classify: Classify | None = None,
                pause: Callable[[int, Sample], float] | None = None) -> LoadResult:
    """`users` callers (thread k calls `make_call(k)()` back to back) until `requests` calls in total or
    `duration_s`, whichever first; `warmup` untimed calls per caller first. With `prepare`, caller k's call is
    `make_call(k)(prepare(k))` and only the call is timed (building a request stays off the clock). With `pause`,
    caller k waits `pause(k, sample)` seconds after each call (e.g. a client's backoff after a refusal), off the
    clock and cut at `duration_s`."""
    if users < 1:
        raise DriverError(f"users {users} must be >= 1")
    _check_bounds(requests, duration_s)
    calls = [make_call(k) for k in range(users)]
    if prepare is not None:
        calls = [_Prepared(call, prepare, k) for k, call in enumerate(calls)]
    for call in calls:
        for _ in range(warmup):
            if isinstance(call, _Prepared):
                call.ready()
            call()
    lock = threading.Lock()
    samples: list[Sample] = []
    budget = [requests if requests is not None else math.inf]
    deadline = time.perf_counter() + (duration_s if duration_s is not None else math.inf)

    def user(k: int, call) -> None:
        while time.perf_counter() < deadline:
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            if isinstance(call, _Prepared):
                call.ready()
            sample = _timed(call, time.perf_counter(), classify)
            with lock:
                samples.append(sample)
            wait = pause(k, sample) if pause is not None else 0.0
            if wait > 0:
                time.sleep(min(wait, max(0.0, deadline - time.perf_counter())))

    started = time.perf_counter()
    threads = [threading.Thread(target=user, args=(k, call), daemon=True) for k, call in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return LoadResult(LoopMode.CLOSED, sorted(samples, key=lambda s: s.start), time.perf_counter() - started,
                      users=users)


class _Prepared:
    """A caller whose next request is built (`ready`, untimed) before the timed call sends it."""

    def __init__(self, call, prepare: Callable[[int], object], caller: int):
        self.call, self.prepare, self.caller, self.payload = call, prepare, caller, None

    def ready(self) -> None:
        self.payload = self.prepare(self.caller)

    def __call__(self):
        return self.call(self.payload)


def poisson_arrivals(rate: float, duration_s: float, seed: int = 0, max_arrivals: int = 10_000_000) -> np.ndarray:
    """Arrival offsets (s) of a Poisson process at `rate` per second over `duration_s`: exponential gaps."""
    if not rate > 0:
        raise DriverError(f"rate {rate} must be > 0 requests per second")
    if not duration_s > 0:
        raise DriverError(f"duration_s {duration_s} must be > 0")
    expected = rate * duration_s
    if expected > max_arrivals:
        raise DriverError(f"rate {rate} x {duration_s}s = {expected:.0f} arrivals exceeds {max_arrivals}")
    rng = np.random.default_rng(seed)
    n = int(expected + 6 * math.sqrt(expected) + 10)
    times = np.cumsum(rng.exponential(1.0 / rate, size=n))
    return times[times < duration_s]


def workers_for(rate: float, duration_s: float) -> int:
    """A `max_outstanding` for `open_loop` that no Poisson run at `rate` for `duration_s` exceeds in practice (the
    expected arrivals plus six standard deviations, plus 10), so no arrival is dropped for want of a worker."""
    expected = rate * duration_s
    return int(expected + 6 * math.sqrt(expected) + 10)


def open_loop(call: Call, rate: float, duration_s: float, max_outstanding: int = 64, seed: int = 0,
              late_after_s: float = 0.010, warmup: int = 0, prepare: Callable[[int], object] | None = None,
              classify: Classify | None = None) -> LoadResult:
    """Poisson arrivals at `rate` for `duration_s`, each served by one of at most `max_outstanding` workers; an
    arrival with every worker busy is dropped. `call` must be thread-safe. With `prepare`, request i (warm-ups
    first) is `call(prepare(i))`, built by the dispatcher before its arrival time, so off the clock unless building
    overruns the gap (then the arrival is late and the overrun counts in its latency)."""
    if max_outstanding < 1:
        raise DriverError(f"max_outstanding {max_outstanding} must be >= 1")
    offsets = poisson_arrivals(rate, duration_s, seed)
    for i in range(warmup):
        if prepare is None:
            call()
        else:
            call(prepare(i))
    lock = threading.Lock()
    samples: list[Sample] = []
    outstanding = [0]
    dropped = late = 0

    def serve(scheduled: float, payload: object) -> None:
        sample = _timed(call if prepare is None else lambda: call(payload), scheduled, classify)
        with lock:
            samples.append(sample)
            outstanding[0] -= 1

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max_outstanding) as pool:
        for i, offset in enumerate(offsets, start=warmup):
            scheduled = started + float(offset)
            payload = prepare(i) if prepare is not None else None
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            with lock:
                if outstanding[0] >= max_outstanding:
                    dropped += 1
                    continue
                outstanding[0] += 1
            if time.perf_counter() - scheduled > late_after_s:
                late += 1
            pool.submit(serve, scheduled, payload)
    wall = max(time.perf_counter() - started, duration_s)
    return LoadResult(LoopMode.OPEN, sorted(samples, key=lambda s: s.start), wall, users=max_outstanding,
                      offered_rate=rate, arrivals=len(offsets), dropped=dropped, late=late)


# --- stability windows ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stability:
    """perf_analyzer's stability rule: `windows` consecutive windows whose throughput, p50 and p99 each lie within
    `tolerance` of their mean; at most `max_windows` windows are run."""

    windows: int = 3
    tolerance: float = 0.10
    max_windows: int = 10

    def __post_init__(self):
        if self.windows < 1:
            raise DriverError(f"stability windows {self.windows} must be >= 1")
        if not 0 < self.tolerance < 1:
            raise DriverError(f"stability tolerance {self.tolerance} must be in (0, 1)")
        if self.max_windows < self.windows:
            raise DriverError(f"max_windows {self.max_windows} is below windows {self.windows}")


@dataclass(frozen=True)
class Window:
    """One measurement window: its throughput and latency percentiles (any unit, compared relatively)."""

    throughput: float
    p50: float
    p99: float
    result: LoadResult | None = None

    @classmethod
    def of(cls, result: LoadResult) -> Window:
        lat = result.ok_latencies_s
        if not len(lat):
            return cls(result.throughput, math.nan, math.nan, result)
        p50, p99 = np.percentile(lat, [50, 99])
        return cls(result.throughput, float(p50), float(p99), result)


@dataclass
class StableRun:
    """Every window run, whether the last ones were stable, and the stable ones merged."""

    windows: list[Window] = field(default_factory=list)
    stable: bool = False
    rule: Stability = field(default_factory=Stability)

    @property
    def measured(self) -> list[Window]:
        """The windows the figures come from: the stable tail, else the last `rule.windows`."""
        return self.windows[-self.rule.windows:]

    def samples(self) -> list[Sample]:
        return [s for w in self.measured if w.result for s in w.result.samples]


def within(values: list[float], tolerance: float) -> bool:
    """Every value within `tolerance` (relative) of their mean; NaN never is."""
    arr = np.asarray(values, dtype=np.float64)
    if not len(arr) or np.isnan(arr).any():
        return False
    mean = arr.mean()
    if mean == 0:
        return bool(np.all(arr == 0))
    return bool(np.all(np.abs(arr - mean) <= tolerance * abs(mean)))


def until_stable(run_window: Callable[[], Window | LoadResult], rule: Stability = Stability(),
                 on_window: Callable[[int, Window], None] | None = None) -> StableRun:
    """Run windows until `rule` holds over the last `rule.windows` of them, at most `rule.max_windows`."""
    run = StableRun(rule=rule)
    while len(run.windows) < rule.max_windows:
        got = run_window()
        window = got if isinstance(got, Window) else Window.of(got)
        run.windows.append(window)
        if on_window:
            on_window(len(run.windows), window)
        tail = run.windows[-rule.windows:]
        if len(tail) == rule.windows and all(within([getattr(w, k) for w in tail], rule.tolerance)
                                             for k in ("throughput", "p50", "p99")):
            run.stable = True
            break
    return run


class PoissonPacer:
    """Pacing of one open-loop caller that can only send when its previous request ended (a Locust user): its
    arrivals are a Poisson process at `rate` (exponential gaps from its own schedule, not from when it got free), so
    N such callers at rate/N each add up to Poisson arrivals at the total rate. An arrival whose time passed while
    the caller was busy is sent at once and counted late."""

    def __init__(self, rate: float, seed: int = 0, clock: Callable[[], float] = time.monotonic):
        if not rate > 0:
            raise DriverError(f"rate {rate} must be > 0 requests per second")
        self.rate = rate
        self._rng = np.random.default_rng(seed)
        self._clock = clock
        self._next: float | None = None
        self.late = 0
        self.arrivals = 0
        self.scheduled: list[float] = []  # every arrival time handed out (clock units), in order

    def delay(self) -> float:
        """Seconds to wait before the next arrival (0 when it is already due)."""
        now = self._clock()
        if self._next is None:
            self._next = now
        self._next += float(self._rng.exponential(1.0 / self.rate))
        self.arrivals += 1
        self.scheduled.append(self._next)
        wait = self._next - now
        if wait < 0:
            self.late += 1
            return 0.0
        return wait

    def due(self, until: float | None = None) -> int:
        """Arrivals due at or before `until` (default: now): what should have been sent by then. Arrivals are drawn
        when a caller asks for the next one, so past saturation the drawn schedule falls behind the clock; the
        arrivals not drawn yet are counted at the rate (their expected number)."""
        until = self._clock() if until is None else until
        drawn = bisect.bisect_right(self.scheduled, until)
        behind = until - self._next if self._next is not None and self._next < until else 0.0
        return drawn + int(round(behind * self.rate))
