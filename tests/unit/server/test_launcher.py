"""The launcher's readiness: a server is ready for its callers when its HTTP health says so and its metrics answer
(Triton starts the metrics service after the HTTP one; a scrape made at once was refused)."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest

from fusionrank.server.launcher import LaunchError, TritonServer, free_port
from tests.paths import REPO_ROOT


class _Running:
    """Stands in for the server's Popen: a process that has not exited."""

    returncode = None

    def poll(self):
        return None


class _Answers(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the stdlib's name)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def _serve(port: int) -> http.server.HTTPServer:
    server = http.server.HTTPServer(("127.0.0.1", port), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _server(tmp_path: Path) -> TritonServer:
    server = TritonServer(REPO_ROOT / "model_repository", log_file=tmp_path / "log",
                          http_port=free_port(), metrics_port=free_port())
    server.process = _Running()
    return server


def test_ready_waits_for_the_metrics_service_that_starts_after_http(tmp_path):
    server = _server(tmp_path)
    health, started = _serve(server.http_port), []

    def metrics_later():
        time.sleep(1.2)
        started.append(_serve(server.metrics_port))

    later = threading.Thread(target=metrics_later)
    begin = time.monotonic()
    later.start()
    try:
        server.wait_ready(timeout=10)
        assert started, "ready was answered before the metrics endpoint listened"
        assert time.monotonic() - begin < 5
    finally:
        later.join()
        health.shutdown()
        for s in started:
            s.shutdown()


def test_a_server_whose_metrics_never_answer_is_not_ready(tmp_path):
    server = _server(tmp_path)
    health = _serve(server.http_port)
    try:
        with pytest.raises(LaunchError, match="not ready after"):
            server.wait_ready(timeout=1.5)
    finally:
        health.shutdown()
