"""`fusionrank serve` lifecycle with the real tritonserver: endpoints printed, SIGTERM stops everything, a dead
server is reported and ends the command with a non-zero status."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import tritonclient.grpc as grpcclient

pytestmark = pytest.mark.e2e

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 4
input { name: "x" data_type: TYPE_INT64 dims: [1] }
output { name: "y" data_type: TYPE_INT64 dims: [1] }
instance_group { kind: KIND_CPU count: 1 }
"""

ECHO_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
                for r in requests]
"""

HELPER_PROCESS = """
    def initialize(self, args):
        import subprocess

        self.helper = subprocess.Popen(["sleep", "600"])
"""


def _descendants_named(pid: int, name: str) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if name in p.name()]
    except psutil.NoSuchProcess:
        return []


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _alive_after(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still alive once all have ended or `timeout` seconds have passed (polled, not slept)."""
    deadline = time.monotonic() + timeout
    while _alive(processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _alive(processes)


def _echo_repository(tmp_path, model: str = ECHO_MODEL):
    repo = tmp_path / "repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(model)
    return repo


def _start_serve(repo, log_file, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`fusionrank serve` on the echo repository (with more `args`, in `env`), read up to its "Ctrl-C ..." line:
    (process, output so far)."""
    proc = subprocess.Popen([sys.executable, "-m", "fusionrank_cli", "serve", "--repository", str(repo),
                             "--profile", "cpu", "--log-file", str(log_file), "--model", "echo", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    return proc, "".join(lines)


def test_serve_prints_endpoints_and_stops_cleanly_on_sigterm(tmp_path):
    log_file = tmp_path / "triton.log"
    proc, output = _start_serve(_echo_repository(tmp_path), log_file)
    try:
        grpc_url = re.search(r"gRPC\s+(\S+)", output).group(1)
        assert re.search(r"metrics\s+http://127\.0\.0\.1:\d+/metrics", output)
        assert re.search(r"models\s+echo\n", output)
        assert str(log_file) in output
        with grpcclient.InferenceServerClient(grpc_url) as client:
            assert client.is_model_ready("echo")
        stubs = _descendants_named(proc.pid, "triton")
        assert stubs, "tritonserver should be running under `fusionrank serve`"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "server stopped" in proc.stdout.read()
        assert not _alive_after(stubs, timeout=10), "processes left behind after SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_reports_a_dead_server_and_exits_non_zero(tmp_path):
    """A crashed server (a segfault, as Triton 2.51's on cancelled ensemble requests) is reported with how it ended
    and the tails of its log and console, and `fusionrank serve` exits non-zero so a supervisor restarts it."""
    log_file = tmp_path / "triton.log"
    proc, _ = _start_serve(_echo_repository(tmp_path), log_file)
    try:
        (server,) = [p for p in psutil.Process(proc.pid).children() if p.name() == "tritonserver"]
        stubs = _descendants_named(server.pid, "triton")
        server.send_signal(signal.SIGSEGV)
        assert proc.wait(timeout=60) == 128 + signal.SIGSEGV
        report = proc.stdout.read()
        assert "tritonserver died: killed by signal 11 (SIGSEGV)" in report
        assert f"lines of its log ({log_file}):" in report
        last_logged = log_file.read_text().splitlines()[-1]
        assert last_logged in report, "the log tail is in the report"
        assert "lines of its console (" in report and "Signal (11) received" in report, "the crash trace is in it"
        assert "exits with status 139 so that a supervisor restarts it" in report
        assert "server stopped" not in report
        assert not _alive_after(stubs, timeout=10), "processes of the dead server left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_after_a_crash_leaves_nothing_of_the_server_behind(tmp_path):
    # After tritonserver dies (Triton 2.51 segfaults on cancelled ensemble requests), processes of its group can
    # outlive it: after a real crash, three Python-backend stubs of the CI repository were still running an hour
    # later. stop() must still clean up the group. Here the model starts a helper process to stand in for them.
    from fusionrank.server.launcher import TritonServer

    server = TritonServer(_echo_repository(tmp_path, ECHO_MODEL + HELPER_PROCESS), profile="cpu",
                          log_file=tmp_path / "triton.log", cache=tmp_path / "backend")
    server.start(timeout=120)
    try:
        left = _descendants_named(server.process.pid, "sleep")
        assert left, "the echo model should have started its helper"
        server.process.send_signal(signal.SIGSEGV)  # a crash
        server.process.wait(timeout=30)
        assert _alive(left) == left, "the helper outlives the crash"
    finally:
        server.stop()
    assert not _alive_after(left, timeout=10), "processes of the server's group left behind after stop()"
