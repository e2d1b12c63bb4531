"""The endpoints a client spreads its calls over, and which of them are believed up."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


@dataclass
class Endpoint:
    url: str
    down_since: float | None = None  # None: believed healthy
    last_check: float = 0.0
    last_error: str | None = None  # why its last health check failed

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

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints]

    def plan(self) -> list[tuple[Endpoint, bool]]:
        """Endpoints to try for the next attempt, in order, each with whether it needs a health check first: those
        due for a check (at most one probe per endpoint per `recheck_s`, so a recovered endpoint rejoins even while
        others serve), then the healthy ones in round-robin order (so calls spread evenly over them)."""
        now = self.clock()
        up = [e for e in self.endpoints if e.down_since is None]
        with self._lock:  # threads sharing a sync client take turns
            start = self._next % len(up) if up else 0
            self._next += 1
        due = [(e, True) for e in self.endpoints if e.down_since is not None and now - e.last_check >= self.recheck_s]
        return due + [(e, False) for e in up[start:] + up[:start]]

    def fallback(self) -> Endpoint:
        """Every endpoint is down and none is due for a check: the one that failed longest ago."""
        return min(self.endpoints, key=lambda e: e.down_since if e.down_since is not None else float("-inf"))

    def any_up(self) -> bool:
        """Whether some endpoint is believed healthy."""
        return any(e.down_since is None for e in self.endpoints)

    def mark_down(self, endpoint: Endpoint) -> None:
        """A call or a health check failed on `endpoint`."""
        now = self.clock()
        if endpoint.down_since is None:
            log.warning("endpoint %s marked down", endpoint.url)
            endpoint.down_since = now
        endpoint.last_check = now

    def mark_checked(self, endpoint: Endpoint) -> None:
        """A down endpoint was probed and is still not ready."""
        endpoint.last_check = self.clock()

    def mark_up(self, endpoint: Endpoint) -> None:
        """A health check found `endpoint` ready."""
        if endpoint.down_since is not None:
            log.info("endpoint %s is back", endpoint.url)
        endpoint.down_since = None
        endpoint.last_error = None
