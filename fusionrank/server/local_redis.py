"""A local `redis-server` (Debian package `redis-server`) on a free loopback port, without persistence: the shared
cache tier of `fusionrank bench serve` and of the tests. A context manager that always stops it."""

from __future__ import annotations

from pathlib import Path

from fusionrank.contract.errors import FusionRankError
from fusionrank.server.launcher import free_port
from fusionrank.server.local_cache import RedisProcess


class RedisServerError(FusionRankError):
    """redis-server is not installed or did not start."""


class LocalRedis(RedisProcess):
    """One redis-server on a loopback port; `stop()` and `start()` may be called again (an outage), on the same port."""

    error = RedisServerError

    def __init__(self, folder: Path | None = None, port: int = 0):
        super().__init__(folder, "fusionrank-redis-")
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def where(self) -> str:
        return f"port {self.port}"

    def command(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]

    def client(self, timeout: float = 2.0):
        """A redis-py client of this server."""
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=timeout)
