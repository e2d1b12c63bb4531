"""`make gpu-check`: everything this node allows on the GPU path, in one run that ends by itself.

Steps, each run where the node allows it and otherwise reported as skipped with the reason (`release.gpu_steps`):
1. cuda-driver: GPU, compute capability, driver and CUDA versions (the GPU CUDA uses, `CUDA_VISIBLE_DEVICES`
   honoured), the TensorRT Triton loads plans with, the pinned NGC release;
2. prepare-repository: a scratch copy of the model repository, exported (and the ranker trained) when it lacks
   ONNX models or golden outputs; only when a later step needs models;
3. onnxruntime-cuda: each encoder on ONNX Runtime's CUDA provider, parity with the golden outputs and rows/s;
4. tensorrt-build, 5. tensorrt-parity-latency: engines built with the spec's precision, parity with the golden
   outputs and latency per model;
6. serve-gpu-profile: Triton with the gpu profile on those engines, a short load test and the batch each member
   achieved (from Triton's metrics).
Results go to `<out>/<date>-<gpu>/gpu-check.{md,json}` (tracebacks in `gpu-check.log`). A time budget (default
540 s) skips the steps that could no longer finish in it, so the run ends in under 10 minutes; an engine build
already started is not interrupted. Any exception a step raises (TensorRT's pybind11 `TypeError` on an old driver
included) is that step's failure: the report is always written. The TensorRT timing cache persists under the
project cache (`<cache>/tensorrt/timing.cache`), so a second run builds warm.

`deploy/gpu-check.sh` (what `make gpu-check` runs) installs the lean environment this needs; docs/gpu.md is the
runbook.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.latency import benchmark_ensemble, scenario_requests
from benchmarks.server_metrics import breakdown, scrape
from export.manifest import golden_path, onnx_path
from export.node.cuda_driver import release_cuda
from export.node.facts import NodeInfo
from export.node.tensorrt_release import ReleaseError, load_release, release_pin_problems
from export.profiles import engine_models
from export.verify.preflight import preflight, triton_backend_config
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.paths import cache_dir
from fusionrank.contract.spec import PipelineSpec, ServingProfile, member_models
from fusionrank.server.launcher import TritonServer
from fusionrank.triton.render import render_repository
from release.gpu_report import render_markdown
from release.gpu_steps import (
    FAILED,
    RAN,
    SKIPPED,
    GpuReadiness,
    StepResult,
    gpu_readiness,
    onnxruntime_cuda_step,
    tensorrt_build_step,
    tensorrt_runtime_step,
)
from release.upgrade_measure import json_safe

SCHEMA = "fusionrank-gpu-check/1"
DEFAULT_BUDGET_S = 540.0
# Rough lower bounds of what each step needs, to skip it rather than overrun the budget.
MIN_SECONDS = {"prepare-repository": 240, "onnxruntime-cuda": 30, "tensorrt-build": 120,
               "tensorrt-parity-latency": 30, "serve-gpu-profile": 90}


class Budget:
    """Seconds left of the run's time budget."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def skip(self, step: str) -> StepResult | None:
        """A skipped result when `step` could no longer finish within the budget, else None."""
        left = self.end - time.monotonic()
        if left < MIN_SECONDS[step]:
            return StepResult(step, SKIPPED, f"time budget: {left:.0f} s of {self.seconds:.0f} s left, the step "
                                             f"needs about {MIN_SECONDS[step]} s")
        return None


def cuda_step(readiness: GpuReadiness) -> StepResult:
    """The GPU and driver this node offers (skipped, with why, without a CUDA GPU); a driver too old for the
    TensorRT's CUDA is this step's failure (the TensorRT steps are skipped with the same reason)."""
    if readiness.no_cuda:
        return StepResult("cuda-driver", SKIPPED, readiness.no_cuda)
    data = {k: v for k, v in readiness.node.as_dict().items() if k != "notes"}
    data["driver_runs_tensorrt_cuda"] = readiness.old_driver is None
    if readiness.old_driver:
        return StepResult("cuda-driver", FAILED, readiness.old_driver, data)
    return StepResult("cuda-driver", RAN, "", data)


def prepare_repository(spec: PipelineSpec, source: Path, scratch: Path) -> StepResult:
    """A scratch copy of `source` with every engine model's ONNX file and golden outputs (exported if missing)."""
    started = time.monotonic()
    try:
        exported = _copy_or_export(spec, source, scratch)
    except FusionRankError as exc:
        return StepResult("prepare-repository", FAILED, str(exc), seconds=time.monotonic() - started)
    return StepResult("prepare-repository", RAN, "", {"source": str(source), "exported": exported},
                      time.monotonic() - started)


def _copy_or_export(spec: PipelineSpec, source: Path, scratch: Path) -> list[str]:
    if source.is_dir():
        shutil.copytree(source, scratch, ignore=shutil.ignore_patterns("model.plan", "manifest.json"))
    else:
        render_repository(spec, scratch)
    missing = [m for m in engine_models(spec) if not (onnx_path(scratch, m).is_file()
                                                      and golden_path(scratch, m).is_file())]
    exported = []
    if missing:
        from export.convert.torch2onnx import export_all  # torch: only when the models must be exported
        from fusionrank.model.train import checkpoint_path, train_ranker  # torch

        checkpoint = checkpoint_path(spec, spec.ranker.fusion.value)
        checkpoint = checkpoint if checkpoint.is_file() else train_ranker(spec)
        export_all(spec, scratch, checkpoint=checkpoint)
        exported = missing
    return exported


def serve_step(spec: PipelineSpec, repo: Path, readiness: GpuReadiness, requests: int, users: int,
               log_dir: Path) -> StepResult:
    """The gpu profile served on the built engines: a short load test and each member's achieved batch."""
    started = time.monotonic()
    backend_config = triton_backend_config(spec, repo)
    mismatches = preflight(spec, repo, probe=lambda: readiness.node, backend_config=backend_config)
    if mismatches:
        return StepResult("serve-gpu-profile", FAILED, "pre-flight: " + "; ".join(map(str, mismatches)))
    factory, scenario = scenario_requests(spec)
    try:
        with TritonServer.for_spec(spec, repo, ServingProfile.GPU, log_file=log_dir / "tritonserver.log",
                                   backend_config=backend_config) as server:
            before = scrape(server.metrics_url)
            stats = benchmark_ensemble(spec, server.grpc_url, factory.next, requests, users,
                                       scenario.warmup_requests, scenario.timeout_s)
            members = breakdown(before, scrape(server.metrics_url), [*member_models(spec),
                                                                     spec.serving.route])
    except FusionRankError as exc:
        return StepResult("serve-gpu-profile", FAILED, str(exc), seconds=time.monotonic() - started)
    data = {"ensemble": stats.as_dict(), "members": [m.as_dict() for m in members], "scenario": scenario.name}
    ok = stats.errors == 0
    return StepResult("serve-gpu-profile", RAN if ok else FAILED, "" if ok else f"{stats.errors} failed requests: "
                      f"{stats.first_error}", data, time.monotonic() - started)


def release_facts(root: Path) -> dict:
    """The pinned NGC release and whether the image, the builder and CUDA agree with it (a checkout's files)."""
    try:
        release = load_release(root)
    except (ReleaseError, OSError) as exc:
        return {"error": str(exc)}
    return {"image": release.reference, "triton": release.triton, "tensorrt": release.tensorrt,
            "cuda": release.cuda, "pin_problems": release_pin_problems(root)}


def _folder_name(readiness: GpuReadiness, now: _dt.datetime) -> str:
    gpu = re.sub(r"[^a-z0-9]+", "-", (readiness.node.gpu_name or "no-gpu").lower()).strip("-")
    return f"{now:%Y-%m-%d}-{gpu}"


def _guarded(name: str, run, log_file: Path) -> StepResult:
    """`run()`; any exception is the step's failure (type and message; the traceback goes to `log_file`)."""
    started = time.monotonic()
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - e.g. pybind11's TypeError from trt.Builder on an old driver
        with open(log_file, "a") as log:
            log.write(f"--- {name}\n{traceback.format_exc()}\n")
        return StepResult(name, FAILED, f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started)


def _step(budget: Budget, name: str, cannot: str | None, run, log_file: Path) -> StepResult:
    """`run()`, unless this node cannot (`cannot` says why) or the time left is too short."""
    if cannot:
        return StepResult(name, SKIPPED, cannot)
    return budget.skip(name) or _guarded(name, run, log_file)


def timing_cache_path(spec: PipelineSpec) -> Path:
    """The TensorRT timing cache every run reuses (TensorRT refuses, and the build replaces, one from another GPU
    or TensorRT version)."""
    return cache_dir(spec) / "tensorrt" / "timing.cache"


def run_steps(spec: PipelineSpec, source: Path, scratch: Path, readiness: GpuReadiness, budget: Budget,
              requests: int, users: int, log_dir: Path) -> list[StepResult]:
    """Every step in order, each skipped with its reason where this node (or the time left) does not allow it."""
    log_file = log_dir / "gpu-check.log"
    cuda = _guarded("cuda-driver", lambda: cuda_step(readiness), log_file)
    no_ort = readiness.no_cuda or readiness.no_onnxruntime_cuda
    no_trt = readiness.no_cuda or readiness.no_tensorrt
    prepared = _step(budget, "prepare-repository", no_ort and no_trt and "no step on this node needs the models",
                     lambda: prepare_repository(spec, source, scratch), log_file)
    no_models = None if prepared.status == RAN else f"no models: prepare-repository {prepared.status}"
    ort = _step(budget, "onnxruntime-cuda", no_ort or no_models,
                lambda: onnxruntime_cuda_step(spec, scratch, budget_s=1.0), log_file)
    build = _step(budget, "tensorrt-build", no_trt or no_models,
                  lambda: tensorrt_build_step(spec, scratch, readiness.node, timing_cache_path(spec)), log_file)
    no_engines = None if build.status == RAN else f"no engines: tensorrt-build {build.status}"
    runtime = _step(budget, "tensorrt-parity-latency", no_engines,
                    lambda: tensorrt_runtime_step(spec, scratch, budget_s=1.0), log_file)
    serve = _step(budget, "serve-gpu-profile", "; ".join(filter(None, (no_engines, readiness.no_triton_tensorrt))),
                  lambda: serve_step(spec, scratch, readiness, requests, users, log_dir), log_file)
    return [cuda, prepared, ort, build, runtime, serve]


def _readiness(repository: Path, root: Path, probe) -> GpuReadiness:
    """`gpu_readiness`, or, when probing the node itself fails, a node without GPU that says why."""
    try:
        return gpu_readiness(repository, probe, release_cuda(root))
    except Exception as exc:  # noqa: BLE001 - the report must be written whatever the probe meets
        why = f"probing the node failed: {type(exc).__name__}: {exc}"
        return GpuReadiness(NodeInfo(notes=(why,)), f"no CUDA GPU: {why}", why, why, why)


def run_gpu_check(spec: PipelineSpec, repository: Path, out_root: Path, budget_s: float = DEFAULT_BUDGET_S,
                  requests: int = 200, users: int = 8, root: Path = Path("."), probe=None,
                  now: _dt.datetime | None = None) -> tuple[Path, dict]:
    """Run every step this node allows; write `<out_root>/<date>-<gpu>/gpu-check.{md,json}`; (folder, report)."""
    budget = Budget(budget_s)
    readiness = _readiness(repository if Path(repository).is_dir() else root / "model_repository", root, probe)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    folder = Path(out_root) / _folder_name(readiness, now)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fusionrank-gpu-check-") as work:
        steps = run_steps(spec, Path(repository), Path(work) / "model_repository", readiness, budget, requests,
                          users, folder)
    report = json_safe({
        "schema": SCHEMA, "created_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "spec_digest": spec.digest(),
        "budget_s": budget_s, "node": readiness.node.as_dict(), "release": release_facts(root),
        "lacks": {"cuda": readiness.no_cuda, "driver": readiness.old_driver, "tensorrt": readiness.no_tensorrt,
                  "triton_tensorrt_backend": readiness.no_triton_tensorrt,
                  "onnxruntime_cuda": readiness.no_onnxruntime_cuda},
        "steps": [s.as_dict() for s in steps]})
    (folder / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "gpu-check.md").write_text(render_markdown(report))
    return folder, report
