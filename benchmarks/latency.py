"""Latency benchmarks for the upgrade report: each model on its own runtime, and the ensemble end to end.

- Per model: the profile's runtime (cpu: ONNX Runtime on `model.onnx`; gpu: the TensorRT engine `model.plan`) runs
  the golden inputs tiled to each batch size the spec's dynamic batcher forms (1 and every preferred batch size);
  p50/p95/p99 per call and rows per second.
- Ensemble: ranking requests from the load test's scenario (`fusionrank.request.scenario.RequestFactory`) sent over
  gRPC to a running Triton server by `users` closed-loop clients; p50/p95/p99 per request, requests per second,
  errors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from benchmarks.lib import LoadResult, closed_loop, percentiles
from export.manifest import find_manifest, onnx_path, plan_path
from export.node.trt_runner import TensorRTRunner
from export.verify.served_files import served_file
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.spec import PipelineSpec
from fusionrank.contract.tensors import CLICK_PROBABILITY, deadline_arguments, infer_inputs, request_arrays
from fusionrank.model.synthetic_data import load_benchmark
from fusionrank.request.scenario import RequestFactory, ScenarioRequest, load_scenario


class BenchmarkError(FusionRankError):
    """A latency benchmark could not run (missing model file, server unreachable, every request failed)."""


# --- statistics ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    """Percentiles of per-call latency and the throughput of one benchmark."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # rows/s for a model, requests/s for the ensemble
    samples: int

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def summarize(latencies_s: list[float], wall_s: float, units: int) -> LatencyStats:
    """Percentiles of per-call latencies (the measurement core's, `benchmarks.lib.stats`) and throughput (`units`
    processed over `wall_s` seconds)."""
    if not latencies_s:
        raise BenchmarkError("no successful calls to summarize")
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    est = percentiles(ms, (0.5, 0.95, 0.99))
    return LatencyStats(est["p50"].value, est["p95"].value, est["p99"].value, float(ms.mean()),
                        units / max(wall_s, 1e-9), len(ms))


# --- runtimes -----------------------------------------------------------------------------------------------------


class Runner(Protocol):
    """A model runtime: numpy inputs by tensor name in, numpy outputs by tensor name out."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class OnnxRuntimeRunner:
    """The CPU profile's runtime: ONNX Runtime on `<model>/1/model.onnx`, as the Python-backend model runs it."""

    def __init__(self, path: Path, providers: tuple = ("CPUExecutionProvider",), intra_op_threads: int = 0):
        import onnxruntime as ort

        if not Path(path).is_file():
            raise BenchmarkError(f"{path} not found; run `fusionrank export` first")
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads  # as the served model's config sets it
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        # ONNX Runtime falls back to the CPU when a provider cannot load (e.g. CUDA or cuDNN libraries missing).
        if self.session.get_providers()[0] != wanted:
            raise BenchmarkError(f"{path}: ONNX Runtime runs on {self.session.get_providers()} instead of {wanted} "
                                 "(are the libraries that provider needs installed?)")
        self.inputs = {i.name: np.int64 if "int64" in i.type else np.float32 for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {n: np.ascontiguousarray(inputs[n], dtype=t) for n, t in self.inputs.items()}
        return dict(zip(self.outputs, self.session.run(self.outputs, feed)))

    def close(self) -> None:
        self.session = None


class SlowedRunner:
    """A runner made deliberately slower by `fraction` of each call's own cost: after the call, the calling thread
    spins for `fraction` x the CPU time the call took (a busy loop, as a bigger graph would burn), so both its CPU
    time and its latency grow by that fraction. The knob that proves the latency gate catches a real slowdown
    (`upgrade-report --inject-slowdown MODEL=FRACTION`)."""

    def __init__(self, runner: Runner, fraction: float):
        if not fraction > 0:
            raise BenchmarkError(f"slowdown fraction {fraction} must be > 0 (e.g. 0.3 for 30 % slower)")
        self.runner, self.fraction = runner, fraction

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.thread_time()
        out = self.runner.run(inputs)
        until = time.thread_time() + self.fraction * (time.thread_time() - t0)
        while time.thread_time() < until:
            pass
        return out

    def close(self) -> None:
        self.runner.close()


def make_runner(profile: str, repo: Path, model: str, spec: PipelineSpec | None = None) -> Runner:
    """cpu: ONNX Runtime over the file the CPU profile serves and with its thread count (`export.served_files`;
    `model.onnx` when no spec is given); gpu: the TensorRT engine (needs the `[gpu]` extra and a GPU)."""
    if profile == "cpu":
        if spec is None:
            return OnnxRuntimeRunner(onnx_path(repo, model))
        served = served_file(spec, repo, model)
        return OnnxRuntimeRunner(served.path, intra_op_threads=served.intra_op_threads)
    if profile == "gpu":
        plan = plan_path(repo, model)
        if not plan.is_file():
            raise BenchmarkError(f"{plan} not found; run `fusionrank build-engines` first")
        manifest = find_manifest(repo, model)
        return TensorRTRunner(plan, allow_host_code=bool(manifest and manifest.version_compatible))
    raise BenchmarkError(f"unknown profile {profile!r}; allowed: cpu, gpu")


def tile_rows(inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Exactly `rows` rows, cycling through the given ones (a batch of any size from a small sample set)."""
    have = len(next(iter(inputs.values())))
    index = np.arange(rows) % have
    return {k: np.ascontiguousarray(v[index]) for k, v in inputs.items()}


def run_batched(runner: Runner, inputs: dict[str, np.ndarray], max_batch: int) -> dict[str, np.ndarray]:
    """Run `inputs` in chunks of at most `max_batch` rows (what Triton would send) and concatenate."""
    rows = len(next(iter(inputs.values())))
    parts = [runner.run({k: v[s:s + max_batch] for k, v in inputs.items()}) for s in range(0, rows, max_batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# --- per-model latency --------------------------------------------------------------------------------------------


def model_batch_sizes(spec: PipelineSpec, model: str) -> tuple[int, ...]:
    """Batch sizes a model sees in serving: 1 (a lone request) and every preferred batch size."""
    return tuple(sorted({1, *spec.serving.batching(model).preferred_batch_sizes}))


def _call_of(runner: Runner, feed: dict[str, np.ndarray], _caller: int):
    return lambda: runner.run(feed)


def benchmark_model(runner: Runner, inputs: dict[str, np.ndarray], batch_sizes: tuple[int, ...],
                    min_iterations: int = 3, budget_s: float = 1.0, max_iterations: int = 500,
                    warmup: int = 1) -> dict[int, LatencyStats]:
    """Latency per batch size with the measurement core's closed loop (one caller): `warmup` untimed calls, then
    timed calls for `budget_s` (at least `min_iterations`, at most `max_iterations`)."""
    results = {}
    for batch in batch_sizes:
        feed = tile_rows(inputs, batch)
        make_call = partial(_call_of, runner, feed)
        first = closed_loop(make_call, users=1, requests=max_iterations, duration_s=max(budget_s, 1e-6),
                            warmup=warmup)
        runs = [first]
        if len(first.samples) < min_iterations:
            runs.append(closed_loop(make_call, users=1, requests=min_iterations - len(first.samples)))
        times = [s.latency_s for r in runs for s in r.samples if s.ok]
        if len(times) < sum(len(r.samples) for r in runs):
            failed = next(r.first_error for r in runs if r.errors)
            raise BenchmarkError(f"batch {batch}: the runtime failed: {failed}")
        results[batch] = summarize(times, sum(times), batch * len(times))
    return results


# --- ensemble latency ---------------------------------------------------------------------------------------------


RequestSource = Callable[[], ScenarioRequest]


@dataclass(frozen=True)
class EnsembleStats:
    """End-to-end result of the ensemble benchmark."""

    latency: LatencyStats | None
    requests: int
    errors: int
    users: int
    candidates_per_request: float
    first_error: str | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 1.0

    def as_dict(self) -> dict:
        data = {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "users": self.users, "candidates_per_request": round(self.candidates_per_request, 2),
                "first_error": self.first_error}
        if self.latency:
            data.update(self.latency.as_dict())
            data["throughput_rps"] = data.pop("throughput")
        return data


def scenario_requests(spec: PipelineSpec, scenario_path: str | Path | None = None, seed: int = 0):
    """(RequestFactory, Scenario) of the load test's scenario over the spec's benchmark catalogue."""
    scenario = load_scenario(scenario_path)
    return RequestFactory(spec, load_benchmark(spec), scenario, seed=seed), scenario


def ensemble_inputs(items: dict, history: np.ndarray):
    """gRPC inputs of one ranking request (BYTES per enabled modality, INT64 history)."""
    import tritonclient.grpc as grpcclient

    return infer_inputs(grpcclient, request_arrays(items, np.asarray(history, dtype=np.int64)))


class EnsembleCaller:
    """`users` closed-loop gRPC callers of the route (one client each), sending requests drawn from `source`; one
    `window(requests)` is one run of the measurement core's driver. Close it (or use it as a context manager)."""

    def __init__(self, spec: PipelineSpec, url: str, source: RequestSource, users: int = 1, timeout_s: float = 60.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.spec, self.url, self.source, self.timeout_s = spec, url, source, timeout_s
        self.users = max(1, users)
        self.clients = [grpcclient.InferenceServerClient(url) for _ in range(self.users)]
        self.candidates: list[int] = []

    def _payloads(self, count: int) -> list:
        prepared = [self.source() for _ in range(count)]
        self.candidates += [len(request) for request in prepared]
        return [infer_inputs(self._grpc, request.arrays()) for request in prepared]

    def _call(self, client, inputs) -> None:
        # The deadline the caller holds travels with the request, as the fusionrank client sends it.
        result = client.infer(self.spec.serving.route, inputs, client_timeout=self.timeout_s,
                              **deadline_arguments(self.timeout_s))
        if result.as_numpy(CLICK_PROBABILITY) is None:
            raise BenchmarkError("response without click_probability")

    def warm_up(self, requests: int) -> None:
        """Untimed requests; BenchmarkError when the route cannot answer them."""
        for inputs in self._payloads(requests):
            try:
                self._call(self.clients[0], inputs)
            except Exception as exc:  # a server that cannot answer the warm-up cannot be measured
                raise BenchmarkError(f"route {self.spec.serving.route!r} at {self.url} failed its warm-up request: "
                                     f"{exc}") from exc

    def window(self, requests: int) -> LoadResult:
        """`requests` requests, prepared before the clock starts, sent by the callers back to back."""
        queue = iter(self._payloads(requests))
        lock = threading.Lock()

        def make_call(k: int):
            def call() -> None:
                with lock:
                    inputs = next(queue)
                self._call(self.clients[k], inputs)
            return call

        return closed_loop(make_call, self.users, requests=requests)

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def __enter__(self) -> EnsembleCaller:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def benchmark_ensemble(spec: PipelineSpec, url: str, source: RequestSource, requests: int, users: int = 1,
                       warmup: int = 2, timeout_s: float = 60.0) -> EnsembleStats:
    """Send `requests` ranking requests with `users` closed-loop callers (the measurement core's driver); latency
    per request and errors."""
    with EnsembleCaller(spec, url, source, users, timeout_s) as caller:
        caller.warm_up(warmup)
        caller.candidates.clear()
        result = caller.window(requests)
        candidates = float(np.mean(caller.candidates)) if caller.candidates else 0.0
    times = list(result.ok_latencies_s)
    latency = summarize(times, result.wall_s, len(times)) if times else None
    return EnsembleStats(latency, requests, result.errors, users, candidates, result.first_error)
