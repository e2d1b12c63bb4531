"""Deadline-aware load shedding: refuse at once a request that cannot be answered within its deadline.

Past capacity, a CPU server shares its cores among everything it admitted, so every request slows down together
and, with callers' deadlines, most finish after their callers left: goodput collapses although the server is busy.
The route therefore keeps a running estimate of how long a request with payloads to decode takes from admission to
its answer, here and now (an exponentially weighted mean of recent executes), and refuses `UNAVAILABLE` a request
whose remaining deadline is shorter: its caller can retry on another server instead of waiting for a late answer,
and the cores go to requests that can still make it. Each refusal decays the estimate, so after a burst the route
admits again even when no request completed meanwhile (the estimate cannot stay stuck above every deadline).
"""

from __future__ import annotations

import threading

WEIGHT = 0.2  # weight of the newest execute in the running mean
DECAY = 0.9  # factor applied to the estimate by each refusal


class ServiceTime:
    """Running estimate (seconds) of a cold request's time from admission to its answer; 0 until one is seen."""

    def __init__(self, weight: float = WEIGHT, decay: float = DECAY):
        self.weight, self.decay = weight, decay
        self.seconds = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.seconds = seconds if not self.seconds else (1 - self.weight) * self.seconds + self.weight * seconds

    def too_late(self, remaining: float | None) -> bool:
        """True (and the estimate decays) when `remaining` seconds cannot hold a request; None: no deadline."""
        with self._lock:
            if remaining is None or remaining <= 0 or remaining >= self.seconds:  # past: the route's late check
                return False
            self.seconds *= self.decay
            return True
