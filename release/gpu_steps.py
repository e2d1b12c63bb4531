"""The model-level steps of the GPU check (`fusionrank gpu-check`), and what a node lacks for each of them.

`gpu_readiness` says, once, why this node cannot run each GPU step (no CUDA GPU; a driver too old for the CUDA of
the TensorRT (`export.node.cuda_driver`, compared first: on an old driver TensorRT fails with pybind11's "factory
returned nullptr" instead of naming the driver); no TensorRT or cuda-python; no TensorRT backend in the Triton
`fusionrank serve` would start; no CUDA provider in ONNX Runtime): the GPU check reports it and
tests/integration/test_gpu.py skips with it.
Each step runs only where the node allows it (the check decides) and returns a `StepResult`: ran (with its figures)
or failed (with the error); the check adds the skipped ones with their reasons, so one missing piece never hides the
steps that could run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.latency import OnnxRuntimeRunner, make_runner
from export.manifest import find_manifest, onnx_path
from export.node.cuda_driver import driver_problem, tensorrt_cuda_flavour
from export.node.cuda_memory import cudart
from export.node.facts import NodeInfo, probe_node
from export.node.trt_api import EngineBuildError, import_tensorrt
from export.profiles import engine_models
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.names import encoder_name
from fusionrank.contract.spec import PipelineSpec, ServingProfile
from fusionrank.server.backends import locate_triton, missing_backends
from release.precision_gate import build_engines_gated
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
    old_driver: str | None = None  # the driver cannot run the CUDA of the TensorRT (the TensorRT steps are skipped)


def _onnxruntime_cuda_missing() -> str | None:
    try:
        import onnxruntime as ort  # the serving extra's runtime; only its provider list is read here

        providers = ort.get_available_providers()
    except Exception as exc:  # a broken install (a CUDA library missing) is a reason, never the end of the check
        return f"onnxruntime cannot be imported: {type(exc).__name__}: {exc}"
    if "CUDAExecutionProvider" in providers:
        return None
    return (f"onnxruntime {ort.__version__} has no CUDA provider (providers: {', '.join(providers)}); install "
            "onnxruntime-gpu in its place")


def _tensorrt_missing() -> str | None:
    try:
        if import_tensorrt() is None:
            return "the TensorRT Python package is not installed (pip install '.[gpu]')"
        cudart()
    except EngineBuildError as exc:
        return str(exc)
    except Exception as exc:  # e.g. OSError: a libnvinfer or CUDA library the wheel needs cannot be loaded
        return f"TensorRT cannot be imported: {type(exc).__name__}: {exc}"
    return None


def gpu_readiness(repository: Path, probe=None, cuda: str | None = None) -> GpuReadiness:
    """Probe this node once and say what it lacks for each GPU step (serving judged on `repository`'s configs).

    `cuda`: the CUDA of the TensorRT that will build (the release's; the installed wheel's flavour wins)."""
    node = probe() if probe else probe_node()
    # Without a GPU, the probe's first note is why (nvidia-smi missing or failing, CUDA_VISIBLE_DEVICES hiding all).
    no_cuda = None if node.has_gpu else "no CUDA GPU: " + (node.notes[0] if node.notes else "none found")
    flavour = tensorrt_cuda_flavour() or (f"cu{cuda.split('.')[0]}" if cuda else None)
    old_driver = driver_problem(node.driver_version, flavour, f"TensorRT tensorrt-{flavour}") \
        if node.has_gpu and flavour else None
    location = locate_triton()
    if location is None:
        no_triton = "no tritonserver found (not on PATH, no nvidia-pytriton)"
    else:
        lacking = missing_backends(Path(repository), ServingProfile.GPU, location.backend_dir)
        no_triton = f"{location.binary} ({location.source}): {lacking}" if lacking else None
    # The driver first: on an old one, importing TensorRT may work but every Builder fails without saying why.
    no_tensorrt = old_driver or _tensorrt_missing()
    return GpuReadiness(node, no_cuda, no_tensorrt, no_triton, _onnxruntime_cuda_missing(), old_driver)


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
    """Build every engine of the spec into `repo`, each at the lowest precision from the spec's up that passes the
    accuracy gate (`export.precision_gate`)."""
    started = time.monotonic()
    try:
        results = build_engines_gated(spec, repo, node, timing_cache)
    except FusionRankError as exc:
        return StepResult("tensorrt-build", FAILED, str(exc), seconds=time.monotonic() - started)
    data = {r.model: {"precision": r.precision, "seconds": r.seconds, "size_mib": round(r.size_bytes / 2 ** 20, 1),
                      "profiles": len(r.profiles),
                      "precision_choice": find_manifest(repo, r.model).extra.get("precision_choice")}
            for r in results}
    return StepResult("tensorrt-build", RAN, "", data, time.monotonic() - started)


def tensorrt_runtime_step(spec: PipelineSpec, repo: Path, budget_s: float) -> StepResult:
    """Parity of each engine with the golden outputs (the spec's TensorRT tolerances) and its latency."""
    return _parity_latency_step("tensorrt-parity-latency", spec, repo, ServingProfile.GPU, engine_models(spec),
                                lambda m: make_runner("gpu", repo, m), budget_s)
