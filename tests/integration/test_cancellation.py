"""Callers that cancel, against the real server: a plain tritonclient caller whose calls miss a 5-ms deadline (gRPC
cancels them in flight), among normal callers, on the route callers use by default.

Triton 2.51 dies (SIGSEGV) within seconds of this load when the target is the plain ensemble (server#7368); the
route (a BLS Python model, `fusionrank.route.stages`) must survive it with nothing lost or altered.
"""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from fusionrank.contract.tensors import CLICK_PROBABILITY, MODALITY_WEIGHTS, infer_inputs, request_arrays
from fusionrank.server.launcher import describe_exit

pytestmark = pytest.mark.e2e

CANCELS = 100
DEADLINE_S = 0.005
NORMAL_CALLERS = 3


def _route_cancelled(url: str, route: str) -> float:
    """Requests the route answered CANCELLED so far, from its own counter (Triton's failure counter holds only the
    requests cancelled before they reached the route: it counts the route's error answers as successes,
    server#7713)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name.startswith("fusionrank_route_responses") and sample.labels.get("model") == route
               and sample.labels.get("code") == "CANCELLED")


class Run:
    """Counters shared by the callers of one run."""

    def __init__(self):
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.cancelled = self.normal_ok = 0
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)
        self.stop.set()


def _unaltered(spec, name: str, got: np.ndarray, want: np.ndarray) -> bool:
    """Equal within the ranker's parity tolerance, not bit for bit: each route instance has its own embedding cache,
    and an embedding computed in a batch of another size differs in the last bits (docs/cache.md)."""
    tolerance = spec.export.tolerance(name)
    return got.shape == want.shape and np.allclose(got, want, atol=tolerance.atol, rtol=tolerance.rtol)


def _normal_caller(run: Run, spec, url: str, model: str, inputs, expected: dict[str, np.ndarray]) -> None:
    with grpcclient.InferenceServerClient(url) as client:
        while not run.stop.is_set():
            try:
                result = client.infer(model, inputs, client_timeout=60)
            except InferenceServerException as exc:
                return run.problem(f"normal call failed: {exc.status()} {exc.message()[:200]}")
            for name, array in expected.items():
                if not _unaltered(spec, name, result.as_numpy(name), array):
                    return run.problem(f"normal call got altered {name}: {result.as_numpy(name)} vs {array}")
            with run.lock:
                run.normal_ok += 1


def _cancelling_caller(run: Run, url: str, model: str, inputs, deadline: float) -> None:
    with grpcclient.InferenceServerClient(url) as client:
        while not run.stop.is_set() and run.cancelled < CANCELS and time.monotonic() < deadline:
            try:
                client.infer(model, inputs, client_timeout=DEADLINE_S)
            except InferenceServerException as exc:
                if exc.status() != "StatusCode.DEADLINE_EXCEEDED":
                    return run.problem(f"cancelled call failed otherwise: {exc.status()} {exc.message()[:200]}")
                run.cancelled += 1
            time.sleep(0.02)  # the next one lands at another stage of the normal callers' requests


def test_route_survives_cancelled_calls_under_load_with_nothing_lost_or_altered(triton_server, ci_spec):
    from fusionrank.model.synthetic_data import load_benchmark

    bench = load_benchmark(ci_spec)
    session = int(bench.frozen_sessions(1)[0])
    ids = [int(i) for i in bench.sessions.candidates[session]][:8]
    items = {m: [bench.item(i).payload(m) for i in ids] for m in ci_spec.modalities.enabled}
    history = np.repeat(bench.sessions.history[session][None], len(ids), axis=0).astype(np.int64)
    inputs = infer_inputs(grpcclient, request_arrays(items, history))
    route, url = ci_spec.serving.route, triton_server.grpc_url
    with grpcclient.InferenceServerClient(url) as client:
        clean = client.infer(route, inputs, client_timeout=60)
    expected = {n: clean.as_numpy(n) for n in (CLICK_PROBABILITY, MODALITY_WEIGHTS)}
    cancelled_before = _route_cancelled(triton_server.metrics_url, route)

    run = Run()
    started = time.monotonic()
    callers = [threading.Thread(target=_normal_caller, args=(run, ci_spec, url, route, inputs, expected))
               for _ in range(NORMAL_CALLERS)]
    callers.append(threading.Thread(target=_cancelling_caller, args=(run, url, route, inputs, started + 120)))
    for t in callers:
        t.start()
    callers[-1].join()
    run.stop.set()
    for t in callers[:-1]:
        t.join(timeout=120)
    elapsed = time.monotonic() - started
    print(f"{run.cancelled} calls cancelled at {DEADLINE_S * 1000:.0f} ms, {run.normal_ok} normal calls from "
          f"{NORMAL_CALLERS} callers, {len(run.problems)} problems, {elapsed:.1f} s")
    if run.problems:  # a dying server fails its callers first: give it a moment to exit, to say how it ended
        try:
            triton_server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    returncode = triton_server.process.poll()
    assert returncode is None and not run.problems, (
        f"server {'alive' if returncode is None else describe_exit(returncode)} after {run.cancelled} cancelled "
        f"calls; problems: {run.problems[:3]}\n{triton_server.log_tail()}")
    reached = _route_cancelled(triton_server.metrics_url, route) - cancelled_before
    print(f"{reached:.0f} cancelled calls reached {route} and were answered with an error (CANCELLED)")
    assert run.cancelled >= CANCELS
    assert reached >= 1, "no cancelled call reached the route: the test did not exercise cancellation in the server"
    assert run.normal_ok >= NORMAL_CALLERS
    with grpcclient.InferenceServerClient(url) as client:
        after = client.infer(route, inputs, client_timeout=60)
        assert _unaltered(ci_spec, CLICK_PROBABILITY, after.as_numpy(CLICK_PROBABILITY), expected[CLICK_PROBABILITY])

