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
- The image's entrypoint has no Python process beside Triton to own the cache: `exec_with_local_cache`
  (`fusionrank local-cache -- tritonserver ...`) starts the same server, then becomes tritonserver, and the cache
  stops when Triton's process ends (`PR_SET_PDEATHSIG`).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from fusionrank.contract.errors import FusionRankError
from fusionrank.route.cache import LOCAL_CACHE_ENV

MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux (104 on macOS)
MIN_BYTES = 4 * 2**20  # below this, Redis's own footprint (about 1 MB) leaves no room for embeddings
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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

    @property
    def log_file(self) -> Path:
        return self.folder / "redis.log"

    def start(self, timeout: float = 10.0, die_with_parent: bool | None = None):
        """Start the server and wait until it answers PING. `die_with_parent`: the server gets SIGTERM when the
        thread calling this exits, or the program it execs (Linux only; never from a thread that ends first). None:
        when called from the main thread (`dies_with_this_process`), so a killed owner leaves no server behind."""
        if die_with_parent is None:
            arm = dies_with_this_process()
        else:
            arm = sigterm_when_parent_exits() if die_with_parent else None
        import redis  # the `serve` extra's client; only a server with a cache needs it
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        with self.log_file.open("a") as log:
            self.process = subprocess.Popen([*self.command(), "--save", "", "--appendonly", "no",
                                             "--dir", str(self.folder)],
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=arm)
        client, deadline = self.client(1.0), time.monotonic() + timeout
        # This loop is the retry: redis-py's own (10 tries with backoff since 6.0) would spend seconds per ping.
        client.set_retry(Retry(NoBackoff(), 0))
        try:
            while True:
                try:
                    client.ping()
                    return self
                except (redis.ConnectionError, FileNotFoundError):
                    returncode = self.process.poll()
                    if returncode is not None or time.monotonic() > deadline:
                        why = (f"it exited with status {returncode}" if returncode is not None
                               else f"no answer to PING in {timeout:g} s")
                        tail = self.log_file.read_text()[-2000:]  # before stop(), which may remove the folder
                        self.stop()
                        raise self.error(f"redis-server did not start on {self.where()} ({why}); its log:\n"
                                         f"{tail}") from None
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
               "(`make system-deps` installs it, the image has it), or set serving.cache.server_wide: false "
               "(an in-process LRU per route instance)")

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


def dies_with_this_process() -> Callable[[], None] | None:
    """The `preexec_fn` of a child that must not outlive this process (`sigterm_when_parent_exits`), when called from
    the main thread, whose end is the process's; None from another thread, which may end before the child should."""
    if threading.current_thread() is not threading.main_thread() or not sys.platform.startswith("linux"):
        return None
    return sigterm_when_parent_exits()


def sigterm_when_parent_exits() -> Callable[[], None]:
    """A `preexec_fn`: the child gets SIGTERM when the thread that forked it exits. An exec is no exit: after the
    parent execs a program, that program's end stops the child (whatever ends it, SIGKILL included)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    parent = os.getpid()

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def exec_with_local_cache(max_bytes: int, command: Sequence[str], timeout: float = 10.0, err=None) -> NoReturn:
    """Replace this process with `command`, the server-wide cache (`LocalCacheServer(max_bytes)`, none when 0)
    started beside it and named in its `$FUSIONRANK_LOCAL_CACHE`: what `TritonServer` does, for a launcher that must
    become tritonserver (the image's entrypoint, where Triton is the container's PID 1 and takes the signals itself).
    The cache is a child of this process and gets SIGTERM when it, then `command`, exits: it serves while Triton
    drains and never outlives it. Raises `LocalCacheError` (nothing run) when redis-server is missing or does not
    answer within `timeout` seconds: falling back to in-process LRUs would let route instances answer differently."""
    err = err or sys.stderr
    if not command:
        raise LocalCacheError("no command to run with the server-wide cache")
    binary = shutil.which(command[0])
    if binary is None:
        raise LocalCacheError(f"{command[0]}: command not found")
    env = dict(os.environ)
    if max_bytes:
        cache = LocalCacheServer(max_bytes).start(timeout, die_with_parent=True)
        env[LOCAL_CACHE_ENV] = cache.url
        err.write(f"server-wide embedding cache: redis-server (pid {cache.process.pid}, maxmemory {max_bytes} bytes, "
                  f"allkeys-lru) on {cache.url}, log {cache.log_file}\n")
    else:
        env.pop(LOCAL_CACHE_ENV, None)  # a tier this process did not start is not the spec's
        err.write("no server-wide embedding cache (serving.cache.server_wide false or lru_bytes 0): each route "
                  "instance keeps its own in-process LRU\n")
    err.flush()
    os.execve(binary, list(command), env)
