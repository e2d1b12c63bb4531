"""One item-embedding cache per server (issue 19): a `redis-server` on a Unix socket, started beside Triton and
stopped with it, that every route instance (each a Python-backend process of its own) reads and writes.

Before, each route instance held its own in-process LRU: warming through one instance warmed none of the others,
and each pinned whichever value it computed first, so one fully cached request could get a different answer per
instance. With one tier per server, a stored embedding is the one every instance answers with.

- Bounded by `maxmemory` = `serving.cache.lru_bytes` (the bytes the spec gives the cache) with the `allkeys-lru`
  policy: Redis evicts the least recently used keys, as the in-process LRU did.
- A Unix socket in a private folder (mode 0700): nothing outside the machine, and no other user, can reach it; no
  persistence (`save ""`, no AOF): a restarted server starts cold, like the in-process LRU.
- The route finds it through `$FUSIONRANK_LOCAL_CACHE` (`unix://<socket>`), which `TritonServer` sets for the
  tritonserver process and its Python-backend stubs; without it (a server started by other means) the route keeps
  the in-process LRU.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from fusionrank.contract.errors import FusionRankError

MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux (104 on macOS)
MIN_BYTES = 4 * 2**20  # below this, Redis's own footprint (about 1 MB) leaves no room for embeddings


class LocalCacheError(FusionRankError):
    """redis-server is missing, the bound is too small, or the server did not start."""


class RedisProcess:
    """One `redis-server` process without persistence (Debian package `redis-server`), started and stopped by its
    owner: `command()` says where it listens; `start()` waits for PING; `stop()` may be followed by `start()` again."""

    error: type[FusionRankError] = FusionRankError
    missing = "redis-server not found: install the Debian package redis-server (`make system-deps` does)"

    def __init__(self, folder: Path | None, prefix: str):
        binary = shutil.which("redis-server")
        if binary is None:
            raise self.error(self.missing)
        self.binary = binary
        self._own_folder = folder is None
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix=prefix))
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def client(self, timeout: float = 2.0):
        raise NotImplementedError

    def where(self) -> str:
        raise NotImplementedError

    def start(self, timeout: float = 10.0):
        """Start the server and wait until it answers PING."""
        import redis  # the `serve` extra's client; only a server with a cache needs it

        log_file = self.folder / "redis.log"
        with log_file.open("a") as log:
            self.process = subprocess.Popen([*self.command(), "--save", "", "--appendonly", "no",
                                             "--dir", str(self.folder)],
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client, deadline = self.client(1.0), time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return self
                except (redis.ConnectionError, FileNotFoundError):
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise self.error(f"redis-server did not start on {self.where()}:\n"
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

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalCacheServer(RedisProcess):
    """A redis-server on a Unix socket in its own folder, bounded to `max_bytes` with LRU eviction."""

    error = LocalCacheError
    missing = ("redis-server not found: the server-wide embedding cache needs the Debian package redis-server "
               "(`make system-deps` installs it), or set serving.cache.lru_bytes: 0")

    def __init__(self, max_bytes: int, folder: Path | None = None):
        if max_bytes < MIN_BYTES:
            raise LocalCacheError(f"serving.cache.lru_bytes = {max_bytes}: the server-wide cache needs at least "
                                  f"{MIN_BYTES} bytes (redis-server's own footprint is about 1 MB), or 0 for none")
        super().__init__(folder, "fusionrank-cache-")
        self.max_bytes = max_bytes
        self.socket = self.folder / "redis.sock"
        if len(str(self.socket)) > MAX_SOCKET_PATH:
            raise LocalCacheError(f"{self.socket}: a Unix socket path has at most {MAX_SOCKET_PATH} characters")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)

    @property
    def url(self) -> str:
        """What the route's Redis client connects to."""
        return f"unix://{self.socket}"

    def where(self) -> str:
        return str(self.socket)

    def command(self) -> list[str]:
        return [self.binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                "--maxmemory", str(self.max_bytes), "--maxmemory-policy", "allkeys-lru"]

    def client(self, timeout: float = 2.0):
        """A redis-py client of this server."""
        import redis

        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def stop(self) -> None:
        """Stop the server; the folder goes too when this object made it."""
        super().stop()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
