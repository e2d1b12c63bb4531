"""Upgrade report, step 1: everything the report compares, measured on this node (`measure`).

(gpu) every engine is checked against the node and the ones that do not fit are rebuilt (`export.verify.preflight`,
`export.convert.onnx2trt`); accuracy: each model's runtime (cpu: ONNX Runtime, gpu: TensorRT) on the golden inputs
stored at export time against the PyTorch golden outputs, per output within the profile's tolerances, plus ranking
parity of the ranker on the frozen candidate set; latency: each model at the spec's batch sizes, and the route end to
end on a Triton server started with the profile, with the load test's request scenario. The result is the report JSON
without its comparison, which is also the baseline format (`SCHEMA`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import platform
import time
from pathlib import Path

from benchmarks.latency import (
    benchmark_ensemble,
    benchmark_model,
    make_runner,
    model_batch_sizes,
    run_batched,
    scenario_requests,
)
from export.convert.onnx2trt import build_engines
from export.manifest import find_manifest
from export.node.facts import probe_node
from export.profiles import engine_models
from export.verify.golden import load_golden
from export.verify.parity import check_outputs, ranking_parity
from export.verify.preflight import preflight, triton_backend_config
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.spec import PipelineSpec, ServingProfile
from fusionrank.contract.tensors import CLICK_PROBABILITY
from fusionrank.server.launcher import TritonServer

log = logging.getLogger(__name__)

SCHEMA = "fusionrank-upgrade-report/1"
UPGRADE_PROFILES = (ServingProfile.CPU, ServingProfile.GPU)  # what the report can measure: ORT or TensorRT
DEFAULT_REQUESTS = 100


class ReportError(FusionRankError):
    """A report cannot be measured for that profile, or a baseline or report file is unreadable or of another
    schema."""


def upgrade_profile(profile: ServingProfile | str) -> ServingProfile:
    """`profile` as a ServingProfile the report can measure; ReportError naming the allowed ones otherwise."""
    name = profile.value if isinstance(profile, ServingProfile) else profile
    if name not in {p.value for p in UPGRADE_PROFILES}:
        raise ReportError(f"unknown profile {name!r}; allowed: {', '.join(p.value for p in UPGRADE_PROFILES)}")
    return ServingProfile(name)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def json_safe(value):
    """JSON-safe numbers: NaN/inf (e.g. AUC of a one-class set, a missing output) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def tolerance_for(spec: PipelineSpec, profile: ServingProfile | str):
    """Per-output tolerance of a profile: ONNX Runtime's for cpu, the engines' (FP16/INT8) for gpu."""
    if ServingProfile(profile) is ServingProfile.GPU:
        engine = spec.export.tensorrt.tolerances
        return lambda output: engine.get(output, spec.export.tolerance(output))
    return spec.export.tolerance


def node_facts(profile: ServingProfile) -> dict:
    """The node a report was measured on (GPU facts for gpu; processor and core count always)."""
    facts = {"hostname": platform.node(), "processor": platform.processor() or platform.machine(),
             "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        import onnxruntime

        facts["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if profile is ServingProfile.GPU:
        facts.update({k: v for k, v in probe_node().as_dict().items() if k != "notes"})
    return facts


def prepare_engines(spec: PipelineSpec, repo: Path) -> dict:
    """gpu: pre-flight every engine, rebuild the ones that do not fit this node, pre-flight again."""
    before = preflight(spec, repo)
    stale = sorted({m.model for m in before})
    if stale:
        log.info("rebuilding engines that do not fit this node: %s", ", ".join(stale))
        build_engines(spec, repo, models=stale)
    after = preflight(spec, repo)
    return {"rebuilt": stale, "preflight_before": [m.as_dict() for m in before],
            "preflight_after": [m.as_dict() for m in after]}


def measure_accuracy(spec: PipelineSpec, repo: Path, profile: ServingProfile, runners: dict) -> dict:
    """Per model: output parity vs golden PyTorch outputs; for the ranker also ranking parity."""
    tol = tolerance_for(spec, profile)
    results = {}
    for model, runner in runners.items():
        golden = load_golden(repo, model)
        actual = run_batched(runner, golden.inputs, spec.serving.batching(model).max_batch_size)
        outputs = check_outputs(model, golden.outputs, actual, tol, raise_on_fail=False)
        entry = {"samples": golden.rows, "outputs": {o.output: o.as_dict() for o in outputs},
                 "passed": all(o.passed for o in outputs)}
        if golden.labels is not None and CLICK_PROBABILITY in actual:
            ranking = ranking_parity(golden.outputs[CLICK_PROBABILITY], actual[CLICK_PROBABILITY], golden.labels,
                                     golden.groups, spec.export.ranking, model=f"{profile.value} {model}")
            entry["ranking"] = ranking.as_dict()
            entry["passed"] = entry["passed"] and ranking.passed
        results[model] = entry
    return json_safe(results)


def measure_model_latency(spec: PipelineSpec, repo: Path, runners: dict, min_iterations: int, budget_s: float,
                          batch_sizes: tuple[int, ...] | None = None) -> dict:
    """Per model and batch size (the spec's, or `batch_sizes` for a quick check): latency and rows/s."""
    results = {}
    for model, runner in runners.items():
        golden = load_golden(repo, model)
        sizes = batch_sizes or model_batch_sizes(spec, model)
        stats = benchmark_model(runner, golden.inputs, sizes, min_iterations, budget_s)
        results[model] = {str(batch): s.as_dict() for batch, s in stats.items()}
    return results


def measure_ensemble(spec: PipelineSpec, repo: Path, profile: ServingProfile, requests: int, url: str | None,
                     scenario: str | Path | None, out: Path | None) -> dict:
    """End-to-end latency of the route callers use (`serving.route`; the report keeps its key, `ensemble`): on
    `url` when given, else on a Triton server started for the run."""
    factory, sc = scenario_requests(spec, scenario)
    source = factory.next
    if url:
        stats = benchmark_ensemble(spec, url, source, requests, sc.users, sc.warmup_requests, sc.timeout_s)
    else:
        backend_config = triton_backend_config(spec, repo) if profile is ServingProfile.GPU else []
        with TritonServer.for_spec(spec, repo, profile, log_name="upgrade", backend_config=backend_config,
                                   log_file=out / "tritonserver.log" if out else None) as server:
            stats = benchmark_ensemble(spec, server.grpc_url, source, requests, sc.users, sc.warmup_requests,
                                       sc.timeout_s)
    return {"scenario": sc.name, **stats.as_dict()}


def measure(spec: PipelineSpec, repo: Path, profile: ServingProfile | str = ServingProfile.CPU,
            requests: int = DEFAULT_REQUESTS, url: str | None = None, scenario: str | Path | None = None,
            out: Path | None = None, min_iterations: int = 3, budget_s: float = 1.0, progress=None,
            batch_sizes: tuple[int, ...] | None = None) -> dict:
    """Everything the report compares, measured on this node: the report JSON without its comparison."""
    profile = upgrade_profile(profile)
    repo = Path(repo)
    say = progress or (lambda msg: log.info("%s", msg))
    engines = {}
    if profile is ServingProfile.GPU:
        say("checking engines against this node")
        engines = prepare_engines(spec, repo)
    models = engine_models(spec)
    seconds = {}
    runners = {m: make_runner(profile.value, repo, m) for m in models}
    try:
        say("accuracy vs golden outputs")
        started = time.monotonic()
        accuracy = measure_accuracy(spec, repo, profile, runners)
        seconds["accuracy"] = time.monotonic() - started
        say("per-model latency")
        started = time.monotonic()
        model_latency = measure_model_latency(spec, repo, runners, min_iterations, budget_s, batch_sizes)
        seconds["model_latency"] = time.monotonic() - started
    finally:
        for runner in runners.values():
            runner.close()
    say(f"ensemble latency ({requests} requests)")
    started = time.monotonic()
    ensemble = measure_ensemble(spec, repo, profile, requests, url, scenario, out)
    seconds["ensemble"] = time.monotonic() - started
    manifests = {}
    if profile is ServingProfile.GPU:
        for m in models:
            manifest = find_manifest(repo, m)
            manifests[m] = manifest.as_dict() if manifest else None
    return {"schema": SCHEMA, "created_utc": _utc_now(), "profile": profile.value, "spec_digest": spec.digest(),
            "node": node_facts(profile), "engines": engines, "manifests": manifests, "accuracy": accuracy,
            "latency": {"models": model_latency, "ensemble": ensemble},
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}
