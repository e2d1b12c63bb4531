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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from export.manifest import find_manifest, onnx_path, plan_path
from export.node.trt_runner import TensorRTRunner
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.spec import PipelineSpec
from fusionrank.contract.tensors import CLICK_PROBABILITY, infer_inputs, request_arrays
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
    """Percentiles of per-call latencies and throughput (`units` processed over `wall_s` seconds)."""
    if not latencies_s:
        raise BenchmarkError("no successful calls to summarize")
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return LatencyStats(float(p50), float(p95), float(p99), float(ms.mean()), units / max(wall_s, 1e-9), len(ms))


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
        if intra_op_threads:  # 0: ONNX Runtime's default, one thread per core
            options.intra_op_num_threads = intra_op_threads
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


def make_runner(profile: str, repo: Path, model: str) -> Runner:
    """cpu: ONNX Runtime over model.onnx; gpu: the TensorRT engine (needs the `[gpu]` extra and a GPU)."""
    if profile == "cpu":
        return OnnxRuntimeRunner(onnx_path(repo, model))
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


def benchmark_model(runner: Runner, inputs: dict[str, np.ndarray], batch_sizes: tuple[int, ...],
                    min_iterations: int = 3, budget_s: float = 1.0, max_iterations: int = 500,
                    warmup: int = 1) -> dict[int, LatencyStats]:
    """Latency per batch size: `warmup` untimed calls, then timed calls until `budget_s` has passed (at least
    `min_iterations`, at most `max_iterations`). Fast calls thus get hundreds of samples, so one scheduler hiccup
    cannot move their p95; slow ones (a large batch on a CPU) still give a few."""
    results = {}
    for batch in batch_sizes:
        feed = tile_rows(inputs, batch)
        for _ in range(warmup):
            runner.run(feed)
        times = []
        started = time.perf_counter()
        while len(times) < max_iterations and (len(times) < min_iterations
                                               or time.perf_counter() - started < budget_s):
            t0 = time.perf_counter()
            runner.run(feed)
            times.append(time.perf_counter() - t0)
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


def benchmark_ensemble(spec: PipelineSpec, url: str, source: RequestSource, requests: int, users: int = 1,
                       warmup: int = 2, timeout_s: float = 60.0) -> EnsembleStats:
    """Send `requests` ranking requests with `users` closed-loop clients; latency per request and errors."""
    import tritonclient.grpc as grpcclient

    lock = threading.Lock()
    prepared = [source() for _ in range(requests + warmup)]
    payloads = [infer_inputs(grpcclient, request.arrays()) for request in prepared]
    candidates = float(np.mean([len(request) for request in prepared[warmup:]])) if requests else 0.0
    times: list[float] = []
    errors: list[str] = []
    queue = iter(payloads[warmup:])

    def call(client, inputs) -> float:
        t0 = time.perf_counter()
        result = client.infer(spec.serving.route, inputs, client_timeout=timeout_s)
        elapsed = time.perf_counter() - t0
        if result.as_numpy(CLICK_PROBABILITY) is None:
            raise BenchmarkError("response without click_probability")
        return elapsed

    def user() -> None:
        with grpcclient.InferenceServerClient(url) as client:
            while True:
                with lock:
                    inputs = next(queue, None)
                if inputs is None:
                    return
                try:
                    elapsed = call(client, inputs)
                except Exception as exc:  # every failure counts as an error of the run
                    with lock:
                        errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                    continue
                with lock:
                    times.append(elapsed)

    try:
        with grpcclient.InferenceServerClient(url) as client:
            for inputs in payloads[:warmup]:
                call(client, inputs)
    except Exception as exc:  # a server that cannot answer the warm-up cannot be measured
        raise BenchmarkError(f"route {spec.serving.route!r} at {url} failed its warm-up request: "
                             f"{exc}") from exc
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, users)) as pool:
        for future in [pool.submit(user) for _ in range(max(1, users))]:
            future.result()
    wall = time.perf_counter() - started
    latency = summarize(times, wall, len(times)) if times else None
    return EnsembleStats(latency, requests, len(errors), users, candidates, errors[0] if errors else None)
