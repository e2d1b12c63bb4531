"""A local `redis-server` (Debian package `redis-server`) on a free loopback port, without persistence: the shared
cache tier of `fusionrank bench serve` and of the tests. A context manager that always stops it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from fusionrank.contract.errors import FusionRankError
from fusionrank.server.launcher import free_port


class RedisServerError(FusionRankError):
    """redis-server is not installed or did not start."""


class LocalRedis:
    """One redis-server process; `stop()` and `start()` may be called again (an outage), on the same port."""

    def __init__(self, folder: Path | None = None, port: int = 0):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError("redis-server not found: install the Debian package redis-server "
                                   "(`make system-deps` does)")
        self.binary = binary
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="fusionrank-redis-"))
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, timeout: float = 2.0):
        """A redis-py client of this server."""
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=timeout)

    def start(self, timeout: float = 10.0) -> LocalRedis:
        """Start the server and wait until it answers PING."""
        import redis

        log_file = self.folder / "redis.log"
        with log_file.open("a") as log:
            self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                             "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client, deadline = self.client(1.0), time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RedisServerError(f"redis-server did not start on port {self.port}:\n"
                                               f"{log_file.read_text()[-2000:]}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> LocalRedis:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
