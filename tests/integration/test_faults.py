"""Faults under load against real servers, each a few seconds on top of one extra server start:

- a short soak of the session server: every Triton process's memory steady (the soak command, in small);
- a spare server started as production runs it (`fusionrank serve`, explicit model control, admin key from the
  environment, on its own copy of the repository): a new fusion_ranker version loaded under load and rolled back,
  no call failing, callers seeing each version's scores;
- then that spare killed (SIGKILL) during a Locust run over it and the session server: the clients fail over, no
  call fails, and `fusionrank serve` reports the death with a non-zero status.
Each prints its figures (`pytest tests/integration/test_faults.py -s`)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient

from clients import NO_RETRY, RankingClient
from fusionrank.contract.admin import grpc_admin_header
from fusionrank.contract.tensors import CLICK_PROBABILITY
from tests.paths import CI_SPEC, REPO_ROOT
from tests.processes import stop

from .test_doors import _request

CI_SLO = REPO_ROOT / "loadtest" / "slo.ci.yaml"
RANKER = "fusion_ranker"


@pytest.mark.e2e
def test_short_soak_keeps_every_triton_process_steady(triton_server, ci_spec):
    from loadtest.soak import run_soak

    result = run_soak(ci_spec, triton_server.grpc_url, triton_server.process.pid, seconds=8, users=2,
                      scenario="ci", warmup_s=2)
    print("\n" + result.render())
    names = {m.name for m in result.start.values()}
    assert {"tritonserver", f"stub {ci_spec.serving.route}", f"stub {RANKER}"} <= names
    assert not result.problems, result.render()
    assert len(result.load.latencies_ms) >= 5


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a model repository whose files are hard links (cheap); new files written into it stay its own."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:  # another file system
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)
    return dst


@dataclass
class SpareServer:
    """`fusionrank serve` as production runs it, on its own repository copy."""

    proc: subprocess.Popen
    url: str
    metrics_url: str
    triton_pid: int
    key: str
    repository: Path
    output: str

    def admin(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.url)


@pytest.fixture(scope="module")
def spare_server(built_repository, tmp_path_factory):
    """`fusionrank serve` (explicit model control, $FUSIONRANK_ADMIN_KEY) on a linked copy of the built repository.
    The last test that uses it kills it."""
    tmp = tmp_path_factory.mktemp("spare")
    repo = _linked_copy(built_repository, tmp / "model_repository")
    key = secrets.token_urlsafe(16)
    cmd = [sys.executable, "-m", "fusionrank_cli", "serve", "--spec", str(CI_SPEC), "--repository", str(repo),
           "--profile", "cpu", "--log-file", str(tmp / "triton.log")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "FUSIONRANK_ADMIN_KEY": key})
    try:
        lines = []
        for line in proc.stdout:  # up to "Ctrl-C ...", or the end of a server that failed to start
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        output = "".join(lines)
        found = [re.search(rf"{name}\s+(\S+)", output) for name in ("gRPC", "metrics", "pid")]
        if not all(found):
            pytest.fail(f"fusionrank serve did not start:\n{output}")
        url, metrics, pid = (m.group(1) for m in found)
        yield SpareServer(proc, url, metrics, int(pid), key, repo, output)
    finally:
        stop(proc, timeout=60)
    assert key not in (tmp / "triton.log").read_text(), "the admin key must not reach Triton's log"


def _stage_shifted_ranker(repo: Path, served_file: str, version: int, shift: float) -> Path:
    """`<repo>/fusion_ranker/<version>/`: version 1's served graph (`served_file`) with `shift` added to the logit
    before the sigmoid, so each score p becomes sigmoid(logit(p) + shift): a ranker callers can tell apart by its
    scores."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(repo / RANKER / "1" / served_file))
    (sigmoid,) = [n for n in model.graph.node if CLICK_PROBABILITY in n.output]
    if sigmoid.op_type != "Sigmoid":
        raise ValueError(f"{RANKER}: {CLICK_PROBABILITY} comes from {sigmoid.op_type}, not a Sigmoid")
    model.graph.initializer.append(numpy_helper.from_array(np.array([shift], np.float32), "version_shift"))
    add = helper.make_node("Add", [sigmoid.input[0], "version_shift"], ["shifted_logit"], name="version_shift")
    sigmoid.input[0] = "shifted_logit"
    nodes = [n for n in model.graph.node if n is not sigmoid]
    del model.graph.node[:]
    model.graph.node.extend([*nodes, add, sigmoid])  # still in topological order
    folder = repo / RANKER / str(version)
    folder.mkdir()
    os.link(repo / RANKER / "1" / "model.py", folder / "model.py")
    onnx.save(model, str(folder / served_file))  # a new file: version 1's stays untouched
    return folder


def _versions(admin, key: str) -> dict[str, str]:
    index = admin.get_model_repository_index(headers=grpc_admin_header(key), as_json=True)
    return {m.get("version", "?"): m.get("state", "") for m in index["models"] if m["name"] == RANKER}


def _settled_versions(admin, key: str, expected: dict[str, str], timeout: float = 60.0) -> dict[str, str]:
    """The ranker's version states once they equal `expected` or `timeout` has passed: the version swapped out
    stays UNLOADING until its last request has finished."""
    deadline = time.monotonic() + timeout
    while (states := _versions(admin, key)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return states


class _Callers:
    """Threads ranking the same request back to back through one client; every outcome kept with its times."""

    def __init__(self, client: RankingClient, items, history, threads: int = 3):
        self.calls: list[tuple[float, float, object]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(client, items, history)) for _ in range(threads)]

    def _run(self, client, items, history):
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                outcome = client.rank_payloads(items, history).scores
            except Exception as exc:  # every failure is collected and reported by the test
                outcome = exc
            self.calls.append((began, time.monotonic(), outcome))

    def wait_for(self, count: int, since: float, timeout: float = 60.0) -> None:
        """Until `count` calls that began after `since` have ended (bounded by `timeout`)."""
        deadline = time.monotonic() + timeout
        while sum(1 for b, _, _ in self.calls if b >= since) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} calls ended within {timeout:g}s")
            time.sleep(0.05)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


@pytest.mark.e2e
def test_new_ranker_version_loads_under_load_and_rolls_back(spare_server, ci_spec):
    items, history = _request(ci_spec, n=4)
    key = spare_server.key
    with RankingClient(ci_spec, spare_server.url, retry=NO_RETRY) as client, spare_server.admin() as admin:
        v1 = client.rank_payloads(items, history).scores
        v2 = 1.0 / (1.0 + np.exp(-(np.log(v1 / (1.0 - v1)) + 1.0)))
        with _Callers(client, items, history) as callers:
            callers.wait_for(3, since=0.0)
            staged = _stage_shifted_ranker(spare_server.repository, ci_spec.export.cpu.onnx_file(RANKER), 2, shift=1.0)
            load = (time.monotonic(), admin.load_model(RANKER, headers=grpc_admin_header(key)), time.monotonic())
            callers.wait_for(3, since=load[2])
            after_load = _settled_versions(admin, key, {"1": "UNAVAILABLE", "2": "READY"})
            shutil.rmtree(staged)
            rollback = (time.monotonic(), admin.load_model(RANKER, headers=grpc_admin_header(key)), time.monotonic())
            callers.wait_for(3, since=rollback[2])
            after_rollback = _settled_versions(admin, key, {"1": "READY", "2": "UNAVAILABLE"})
    calls = callers.calls
    failed = [c for c in calls if isinstance(c[2], Exception)]
    assert not failed, f"{len(failed)} of {len(calls)} calls failed, e.g. {failed[0][2]}"

    def served(began, ended):
        inside = [s for b, e, s in calls if b >= began and e <= ended]
        kinds = {"v1" if np.allclose(s, v1, atol=1e-5) else "v2" if np.allclose(s, v2, atol=1e-5) else "other"
                 for s in inside}
        return kinds, len(inside)

    assert after_load == {"1": "UNAVAILABLE", "2": "READY"}, after_load
    assert after_rollback == {"1": "READY", "2": "UNAVAILABLE"}, after_rollback
    before, during, after = served(0, load[0]), served(load[2], rollback[0]), served(rollback[2], float("inf"))
    assert before[0] == {"v1"} and during[0] == {"v2"} and after[0] == {"v1"}, (before, during, after)
    assert served(0, float("inf"))[0] <= {"v1", "v2"}, "every answer is one version's scores, never a mix"
    print(f"\nreload under load: {len(calls)} calls, 0 failed; load of version 2 took {load[2] - load[0]:.2f}s, "
          f"rollback {rollback[2] - rollback[0]:.2f}s; calls served by v1 / v2 / v1 again: {before[1]} / "
          f"{during[1]} / {after[1]}")


def _rank_successes(metrics_url: str, route: str) -> float:
    from benchmarks.server_metrics import REQUEST_SUCCESS, parse_counters, scrape

    return parse_counters(scrape(metrics_url)).get(route, {}).get(REQUEST_SUCCESS, 0.0)


FAILOVER_SCENARIO = """name: failover
description: closed loop, no think time, so every user always has a call in flight
users: 4
spawn_rate: 4
candidates: {3: 1.0}
timeout_s: 30
warmup_requests: 2
pacing: {mode: closed_loop, think_time_s: 0}
"""


def _locust_in_background(spec, url: str, tmp_path: Path) -> tuple[threading.Thread, dict]:
    """A 12-s Locust run over `url` whose users retry and fail over (4 attempts), in a thread."""
    from loadtest.runner import run_loadtest

    (tmp_path / "failover.yaml").write_text(FAILOVER_SCENARIO)
    outcome: dict = {}

    def locust():
        try:
            outcome["verdict"] = run_loadtest(spec, url, run_time="12s", scenario=tmp_path / "failover.yaml",
                                              slo=CI_SLO, out=tmp_path / "report", attempts=4)
        except Exception as exc:  # reported by the test's assertion
            outcome["error"] = exc

    return threading.Thread(target=locust), outcome


@pytest.mark.e2e
def test_killing_one_of_two_servers_during_a_locust_run_fails_no_call(triton_server, spare_server, ci_spec,
                                                                      tmp_path):
    from loadtest.report import read_samples

    route = ci_spec.serving.route
    run, outcome = _locust_in_background(ci_spec, f"{triton_server.grpc_url},{spare_server.url}", tmp_path)
    base = _rank_successes(spare_server.metrics_url, route)
    run.start()
    deadline = time.monotonic() + 120
    while _rank_successes(spare_server.metrics_url, route) < base + 6 and time.monotonic() < deadline:
        time.sleep(0.05)  # until Locust's users have been served by the spare a few times
    killed_at = time.time()
    psutil.Process(spare_server.triton_pid).send_signal(signal.SIGKILL)
    run.join(timeout=180)
    serve_status = spare_server.proc.wait(timeout=60)
    report = spare_server.proc.stdout.read()
    assert "verdict" in outcome, outcome.get("error")
    summary, samples = outcome["verdict"].summary, read_samples(tmp_path / "report" / "samples")
    ended = samples.start + samples.latency_ms / 1000.0
    in_flight = (samples.start < killed_at) & (ended > killed_at)
    later = samples.start > killed_at
    assert summary["failures"] == 0 and samples.ok.all(), summary
    assert in_flight.sum() >= 2, "calls must be in flight when the server dies"
    assert later.sum() >= 5, "the surviving server serves the rest of the run"
    client = summary["client"]
    assert client["retries"] >= 1 and client["failovers"] >= 1, f"calls on the killed server were retried: {client}"
    # The supervisor's view: `fusionrank serve` says how its server died and exits 128 + 9.
    assert serve_status == 137 and "tritonserver died: killed by signal 9 (SIGKILL)" in report, report
    print(f"\nSIGKILL during Locust: {summary['requests']} calls, {summary['failures']} failed, "
          f"{int(in_flight.sum())} in flight at the kill, {int(later.sum())} after it; client retries "
          f"{client['retries']}, failovers {client['failovers']}; p99 {summary['p99_ms']:.0f} ms over "
          f"{summary['duration_s']:.1f}s; fusionrank serve exited {serve_status}")
