"""Admission of requests with payloads to decode, deadline-aware: refuse at once what cannot be answered in time.

Past capacity, a CPU server shares its cores among everything it admitted, so every request slows down together
and, with callers' deadlines, most finish after their callers left: goodput collapses although the server is busy.
A route instance therefore serves at most `slots` requests with payloads to decode at a time (`DecodeGate`); the
others wait their turn in arrival order, at most `max_waiting` of them. The gate estimates how long such a request
takes from admission to its answer, here and now (`ServiceTime`: the 90th percentile of the last ones served), and
refuses `UNAVAILABLE` at once a request whose remaining deadline is shorter than its expected wait plus that time:
its caller can retry on another server instead of waiting for a late answer, and the cores go to requests that can
still make it. A waiting request whose caller set a deadline is refused as soon as what is left of it no longer
holds the service time. Requests the cache answers whole never pass the gate.

Each refusal by an idle gate decays the estimate, so after a burst the route admits again even when no request
completed meanwhile (the estimate cannot stay stuck above every deadline).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

WINDOW = 16  # served requests the estimate is taken over
QUANTILE = 0.9  # at the third quartile, one admitted request in four near its deadline finished after it
ADAPT_EVERY = 8  # served requests between two changes of the gate's slots
TARGET_SHARE = 0.5  # the service time the slots aim under, as a share of the callers' deadline budgets
GROW_BELOW = 0.7  # one more slot only while the service time is under this share of that target
DECAY = 0.9  # factor applied to the estimate by each refusal of an idle gate
# A request without a deadline is admitted to wait only when the gate expects to answer it within this share of the
# default deadline: the estimate comes from requests served before the ones now arriving, and past capacity the
# requests admitted together slow each other (aimed at the whole SLO median, the admitted medians of `bench traffic`'s
# 2x burst were 8-13 % over it).
DEFAULT_AIM = 0.8

SHED = "the server is over capacity: a request with payloads to decode takes about {need:.0f} ms here now and its " \
       "deadline leaves {left:.0f} ms; retry on another server or later"
FULL = "the server is over capacity: {n} requests with payloads to decode already wait for this route instance " \
       "(serving.admission.route_queue.max_queue_size); retry later or on another server"


class ServiceTime:
    """Running estimate (seconds) of a cold request's time from admission to its answer, by its work: `units`, the
    candidates it decodes and encodes (a request with one never-seen candidate among cached ones is not charged a
    flood's time). Over the last `window` served requests, t ~ a + b x units is fitted by least squares (a, b >= 0;
    proportional to the units when the recent ones all had the same), and the fit is scaled by the `quantile`
    (nearest rank) of their measured / fitted ratios: high enough that admitted requests rarely finish late, robust
    to one slow outlier (it does not shut the gate). Each refusal of an idle gate since the last served request
    scales it by `decay`. 0 until one is seen."""

    def __init__(self, window: int = WINDOW, quantile: float = QUANTILE, decay: float = DECAY):
        self.quantile, self.decay = quantile, decay
        self.recent: deque[tuple[float, int]] = deque(maxlen=window)  # (seconds, units) of served requests
        self.scale = 1.0
        self._lock = threading.Lock()

    def _fit(self) -> tuple[float, float, float]:
        """(a, b, margin): the estimate for u units is (a + b u) x margin (before the decay's scale)."""
        times = [t for t, _ in self.recent]
        units = [u for _, u in self.recent]
        mean_t, mean_u = statistics.fmean(times), statistics.fmean(units)
        spread = sum((u - mean_u) ** 2 for u in units)
        b = sum((u - mean_u) * (t - mean_t) for t, u in self.recent) / spread if spread else mean_t / mean_u
        a = mean_t - b * mean_u
        if b < 0:  # bigger requests were not slower lately: one cost per request
            a, b = mean_t, 0.0
        elif a < 0:  # no fixed part to see: proportional
            a, b = 0.0, mean_t / mean_u
        ratios = sorted(t / max(a + b * u, 1e-9) for t, u in self.recent)
        return a, b, ratios[max(0, math.ceil(self.quantile * len(ratios)) - 1)]

    def estimate(self, units: int | None = None) -> float:
        """Seconds for a request of `units` (None: a typical recent one, the median of their units)."""
        with self._lock:
            if not self.recent:
                return 0.0
            a, b, margin = self._fit()
            if units is None:
                units = statistics.median_low(u for _, u in self.recent)
            return (a + b * max(1, units)) * margin * self.scale

    @property
    def seconds(self) -> float:
        """The estimate for a typical recent request."""
        return self.estimate()

    def observe(self, seconds: float, units: int = 1) -> None:
        with self._lock:
            self.recent.append((seconds, max(1, units)))
            self.scale = 1.0

    def too_late(self, remaining: float | None, units: int | None = None) -> bool:
        """True (and the estimate decays) when `remaining` seconds cannot hold a request of `units`; None: no
        deadline."""
        estimate = self.estimate(units)
        if remaining is None or remaining <= 0 or remaining >= estimate:  # past: the route's late check
            return False
        with self._lock:
            self.scale *= self.decay
        return True


@dataclass(eq=False)
class Slot:
    """A request's place among the gate's `slots`, from its admission (`since`, the gate's clock) to `leave`."""

    since: float
    units: int = 1  # its request's work: the candidates it decodes and encodes


@dataclass(eq=False)
class _Waiter:
    level: int  # Triton priority level of its traffic class: 1 is served first
    seq: int  # arrival order within a level
    units: int
    turn: asyncio.Future  # set to its Slot when a leaving request hands it over, or to a refusal when it is evicted

    def __lt__(self, other: _Waiter) -> bool:
        return (self.level, self.seq) < (other.level, other.seq)


class DecodeGate:
    """One route instance's admission of requests with payloads to decode (one asyncio loop; not thread-safe).
    Waiters are served by priority level (production before warm-up before load tests), then in arrival order; a
    request finding the waiting room full takes the place of the newest waiter of a lower-priority class, if any.

    How many are served at once (`slots`) adapts between 1 and `max_slots`: requests admitted together share the
    cores, so more at once raise throughput until the cores are busy and then only lengthen each one. Every
    `ADAPT_EVERY` served requests the gate compares the service time with the deadlines its callers bring (the
    median of the recent ones' budgets; a request without one of its own brings the default deadline, the SLO's
    median; with neither, throughput alone decides): above `TARGET_SHARE` of it, one slot fewer; under
    `GROW_BELOW` x that while requests wait or were refused meanwhile, one more."""

    def __init__(self, max_slots: int, max_waiting: int, default_deadline_s: float | None = None,
                 service: ServiceTime | None = None, clock: Callable[[], float] = time.monotonic):
        """`default_deadline_s`: the deadline, from its arrival, of a request that brings none (None: it waits its
        turn however long that takes)."""
        self.max_slots, self.max_waiting, self.default_deadline_s = max_slots, max_waiting, default_deadline_s
        self.slots = 1  # the adaptive limit; grows while the deadlines allow
        self.service = service or ServiceTime()
        self.clock = clock
        self.budgets: deque[float] = deque(maxlen=WINDOW)  # seconds from arrival to deadline, recent requests
        self._served_since_change = 0
        self._turned_away = 0  # refusals since the last change: demand the slots did not meet
        self.held: set[Slot] = set()
        self.waiting: list[_Waiter] = []  # a heap: the next one served first
        self._arrivals = itertools.count()

    @property
    def busy(self) -> int:
        return len(self.held)

    def _live(self) -> list[_Waiter]:
        return [w for w in self.waiting if not w.turn.done()]

    def expected(self, units: int = 1, ahead: list[int] | None = None) -> float:
        """Seconds from now to the answer of a request of `units` that waits behind requests of `ahead` units with
        every slot busy: each slot frees when its request has had its service time S(its units) (or now, if it
        already has), each request ahead then holds the first free slot for its S, and this one takes S(units) once
        its turn comes."""
        service, now = self.service.estimate, self.clock()
        frees = sorted(max(0.0, service(slot.units) - (now - slot.since)) for slot in self.held) or [0.0]
        for work in ahead or ():
            heapq.heapreplace(frees, frees[0] + service(work))
        return frees[0] + service(units)

    def _deadline(self, deadline: float | None, arrived: float | None = None) -> float | None:
        """The caller's deadline, else what admission aims at within the default one (`DEFAULT_AIM`), counted from
        the request's arrival at the route (`arrived`, the gate's clock; None: now): the time it already spent in
        validation and the cache lookup counts."""
        if deadline is None and self.default_deadline_s:
            return (self.clock() if arrived is None else arrived) + DEFAULT_AIM * self.default_deadline_s
        return deadline

    def _refusal(self, need: float, remaining: float) -> str:
        return SHED.format(need=1000 * need, left=1000 * max(0.0, remaining))

    def _take(self, units: int) -> Slot:
        slot = Slot(self.clock(), units)
        self.held.add(slot)
        return slot

    def try_enter(self, deadline: float | None, units: int = 1) -> Slot | str | None:
        """Without waiting: a Slot once the caller holds one (it calls `leave` when done, answered or not); None when
        it must wait its turn (`enter`); else the message of an UNAVAILABLE refusal. `units`: the request's work
        (the candidates it decodes and encodes)."""
        self._note_budget(deadline)
        return self._try(deadline, units)

    def _note_budget(self, deadline: float | None) -> None:
        """What the slots adapt to: a caller's own deadline, else the default one (the SLO's median), so requests
        without a deadline are served few enough at once to answer within it; with neither, throughput decides."""
        if deadline is not None:
            self.budgets.append(deadline - self.clock())
        elif self.default_deadline_s:
            self.budgets.append(self.default_deadline_s)

    def _try(self, deadline: float | None, units: int) -> Slot | str | None:
        """A free slot (nobody waiting) is taken at once, unless the caller's own deadline cannot hold the service
        time: a request without one waits for nothing here (the default deadline applies once it would have to wait,
        `enter`), so an estimate left high by earlier, heavier requests never refuses it on an idle gate."""
        remaining = None if deadline is None else deadline - self.clock()
        if self.busy < self.slots and not self._live():
            if self.service.too_late(remaining, units):  # decays: an idle gate cannot stay stuck above every deadline
                return self._refusal(self.service.estimate(units) / self.service.decay, remaining)
            return self._take(units)
        return None

    def _adapt(self) -> None:
        """After a served request: one slot more or fewer (see the class)."""
        self._served_since_change += 1
        if self._served_since_change < ADAPT_EVERY:
            return
        # No deadline lately, own or default: nothing to keep the service time under, throughput decides.
        target = TARGET_SHARE * statistics.median(self.budgets) if self.budgets else math.inf
        seconds = self.service.seconds
        if seconds > target and self.slots > 1:
            self.slots -= 1
        elif (seconds < GROW_BELOW * target and self.slots < self.max_slots
              and (self._live() or self._turned_away)):
            self.slots += 1
        else:
            return
        self._served_since_change = self._turned_away = 0

    def _room_for(self, level: int) -> str | None:
        """None when a waiter of `level` may join; else the refusal (the room is full of classes as important)."""
        live = self._live()
        if len(live) < self.max_waiting:
            return None
        worst = max(live, key=lambda w: (w.level, w.seq))
        if worst.level <= level:
            return FULL.format(n=len(live))
        worst.turn.set_result(FULL.format(n=len(live)) + " (a request of a higher-priority class took its place)")
        return None

    async def enter(self, deadline: float | None, level: int = 1, units: int = 1,
                    arrived: float | None = None) -> Slot | str:
        """Wait for a slot: the Slot once the caller holds one (it calls `leave` when done, answered or not), else the
        message of an UNAVAILABLE refusal (its deadline cannot hold the wait and the work, or the queue is full).
        `arrived`: when the request reached the route (the default deadline counts from then; None: now)."""
        self._note_budget(deadline)
        return await self.wait(deadline, level, units, arrived)

    async def wait(self, deadline: float | None, level: int = 1, units: int = 1,
                   arrived: float | None = None) -> Slot | str:
        """`enter` for a request `try_enter` already saw (its deadline budget counted once)."""
        own = deadline is not None
        entered = self._try(deadline, units)
        deadline = self._deadline(deadline, arrived)
        remaining = None if deadline is None else deadline - self.clock()
        if entered is not None:
            return entered
        need = self.expected(units, [w.units for w in self._live() if w.level <= level])
        if remaining is not None and remaining < need:
            self._turned_away += 1
            return self._refusal(need, remaining)
        full = self._room_for(level)
        if full is not None:
            self._turned_away += 1
            return full
        waiter = _Waiter(level, next(self._arrivals), units, asyncio.get_running_loop().create_future())
        heapq.heappush(self.waiting, waiter)
        # A caller's own deadline: refused while waiting once what is left no longer holds the service time (its
        # caller would be gone before the answer). The default deadline only decides admission: a caller without one
        # waits for its answer, and refusing it now, after it waited, would be a slow refusal.
        patience = None if remaining is None or not own else max(0.0, remaining - self.service.estimate(units))
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.turn), patience)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            if waiter.turn.done() and not waiter.turn.cancelled():
                if isinstance(waiter.turn.result(), Slot):
                    self.leave(waiter.turn.result())  # the slot arrived as the wait ended: pass it on
            else:
                waiter.turn.cancel()
            left = 0.0 if deadline is None else deadline - self.clock()
            return self._refusal(self.service.estimate(units), left)

    def leave(self, slot: Slot, served: bool = False) -> None:
        """Give `slot` back (`served`: its request was answered with outputs; its admission-to-answer time then feeds
        the estimate and the slots' adaptation) to the first waiters still waiting, as many as the slots now allow."""
        self.held.discard(slot)
        if served:
            self.service.observe(self.clock() - slot.since, slot.units)
            self._adapt()
        while self.waiting and self.busy < self.slots:
            waiter = heapq.heappop(self.waiting)
            if not waiter.turn.done():
                waiter.turn.set_result(self._take(waiter.units))
