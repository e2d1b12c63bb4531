"""Cache-test helpers: a real redis-server on loopback (`fusionrank.server.local_redis.LocalRedis`) and a black-hole
port that accepts connections and never answers."""

from __future__ import annotations

import socket
from pathlib import Path

from fusionrank.server.local_redis import LocalRedis


def start_redis(folder: Path) -> LocalRedis:
    """A started redis-server keeping its files in `folder`."""
    return LocalRedis(folder).start()


class BlackHole:
    """A loopback port whose kernel completes connections (listen backlog) while nothing ever reads or answers: the
    shape of a hung store, where only a client timeout ends the wait."""

    def __init__(self):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.port = self.socket.getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.socket.close()
