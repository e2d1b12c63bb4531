"""The model-level steps of the GPU check (`fusionrank gpu-check`), and what a node lacks for each of them.

`gpu_readiness` says, once, why this node cannot run each GPU step (no CUDA GPU; no TensorRT or cuda-python; no
TensorRT backend in the Triton `fusionrank serve` would start; no CUDA provider in ONNX Runtime): the GPU check
reports it and tests/integration/test_gpu.py skips with it. Each step runs only where the node allows it (the check
decides) and returns a `StepResult`: ran (with its figures) or failed (with the error); the check adds the skipped ones
with their reasons, so one missing piece never hides the steps that could run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.latency import OnnxRuntimeRunner, make_runner
from export.convert.onnx2trt import build_engines
from export.manifest import onnx_path
from export.node.cuda_memory import cudart
from export.node.facts import NodeInfo, probe_node
from export.node.trt_api import EngineBuildError, import_tensorrt
from export.profiles import engine_models
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.names import encoder_name
from fusionrank.contract.spec import PipelineSpec, ServingProfile
from fusionrank.server.backends import locate_triton, missing_backends
from release.upgrade_measure import measure_accuracy, measure_model_latency

RAN, SKIPPED, FAILED = "ran", "skipped", "failed"


@dataclass
class StepResult:
    """One step of the GPU check: what happened, why, and its figures."""

    name: str
    status: str
    reason: str = ""
    data: dict = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "reason": self.reason, "seconds": round(self.seconds, 1),
                "data": self.data}


@dataclass(frozen=True)
class GpuReadiness:
    """This node, and why each kind of GPU work cannot run on it (None: it can)."""

    node: NodeInfo
    no_cuda: str | None
    no_tensorrt: str | None
    no_triton_tensorrt: str | None
    no_onnxruntime_cuda: str | None


def _onnxruntime_cuda_missing() -> str | None:
    import onnxruntime as ort  # the serving extra's runtime; only its provider list is read here

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        return None
    return (f"onnxruntime {ort.__version__} has no CUDA provider (providers: {', '.join(providers)}); install "
            "onnxruntime-gpu in its place")


def _tensorrt_missing() -> str | None:
    if import_tensorrt() is None:
        return "the TensorRT Python package is not installed (pip install '.[gpu]')"
    try:
        cudart()
    except EngineBuildError as exc:
        return str(exc)
    return None


def gpu_readiness(repository: Path, probe=None) -> GpuReadiness:
    """Probe this node once and say what it lacks for each GPU step (serving judged on `repository`'s configs)."""
    node = probe() if probe else probe_node()
    # Without a GPU, the probe's first note is why (nvidia-smi missing or failing, CUDA_VISIBLE_DEVICES hiding all).
    no_cuda = None if node.has_gpu else "no CUDA GPU: " + (node.notes[0] if node.notes else "none found")
    location = locate_triton()
    if location is None:
        no_triton = "no tritonserver found (not on PATH, no nvidia-pytriton)"
    else:
        lacking = missing_backends(Path(repository), ServingProfile.GPU, location.backend_dir)
        no_triton = f"{location.binary} ({location.source}): {lacking}" if lacking else None
    return GpuReadiness(node, no_cuda, _tensorrt_missing(), no_triton, _onnxruntime_cuda_missing())


def encoder_models(spec: PipelineSpec) -> tuple[str, ...]:
    """The encoders of the enabled modalities (what the ONNX Runtime CUDA step measures)."""
    return tuple(encoder_name(m) for m in spec.modalities.enabled)


# Strict FP32 (TF32 off), so the CUDA provider's parity is judged on the FP32 export tolerances.
ORT_CUDA = (("CUDAExecutionProvider", {"use_tf32": 0}),)


def _parity_latency_step(name: str, spec: PipelineSpec, repo: Path, profile: ServingProfile, models, open_runner,
                         budget_s: float) -> StepResult:
    """Parity of each model's runner with the golden outputs (the profile's tolerances) and its latency."""
    started = time.monotonic()
    runners = {}
    try:
        for model in models:
            runners[model] = open_runner(model)
        accuracy = measure_accuracy(spec, repo, profile, runners)
        latency = measure_model_latency(spec, repo, runners, 3, budget_s)
    except FusionRankError as exc:
        return StepResult(name, FAILED, str(exc), seconds=time.monotonic() - started)
    finally:
        for runner in runners.values():
            runner.close()
    passed = all(a["passed"] for a in accuracy.values())
    return StepResult(name, RAN if passed else FAILED, "" if passed else "parity failed",
                      {"accuracy": accuracy, "latency": latency}, time.monotonic() - started)


def onnxruntime_cuda_step(spec: PipelineSpec, repo: Path, budget_s: float) -> StepResult:
    """Parity with the golden outputs and throughput of each encoder on ONNX Runtime's CUDA provider."""
    return _parity_latency_step("onnxruntime-cuda", spec, repo, ServingProfile.CPU, encoder_models(spec),
                                lambda m: OnnxRuntimeRunner(onnx_path(repo, m), providers=ORT_CUDA), budget_s)


def tensorrt_build_step(spec: PipelineSpec, repo: Path, node: NodeInfo, timing_cache: Path) -> StepResult:
    """Build every engine of the spec into `repo` with the spec's precision."""
    started = time.monotonic()
    try:
        results = build_engines(spec, repo, timing_cache=timing_cache, probe=lambda: node)
    except FusionRankError as exc:
        return StepResult("tensorrt-build", FAILED, str(exc), seconds=time.monotonic() - started)
    data = {r.model: {"precision": r.precision, "seconds": r.seconds, "size_mib": round(r.size_bytes / 2 ** 20, 1),
                      "profiles": len(r.profiles)} for r in results}
    return StepResult("tensorrt-build", RAN, "", data, time.monotonic() - started)


def tensorrt_runtime_step(spec: PipelineSpec, repo: Path, budget_s: float) -> StepResult:
    """Parity of each engine with the golden outputs (the spec's TensorRT tolerances) and its latency."""
    return _parity_latency_step("tensorrt-parity-latency", spec, repo, ServingProfile.GPU, engine_models(spec),
                                lambda m: make_runner("gpu", repo, m), budget_s)
