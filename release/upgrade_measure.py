"""Upgrade report, step 1: everything the report compares, measured on this node (`measure`).

(gpu) every engine is checked against the node and the ones that do not fit are rebuilt (`export.verify.preflight`,
`export.convert.onnx2trt`); accuracy: each model's runtime (cpu: ONNX Runtime, gpu: TensorRT) on the golden inputs
stored at export time against the PyTorch golden outputs, per output within the profile's tolerances, plus ranking
parity of the ranker on the frozen candidate set; latency: each model at the spec's batch sizes, and the route end to
end on a Triton server started with the profile, with the load test's request scenario. The result is the report JSON
without its comparison, which is also the baseline format (`SCHEMA`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.latency import (
    EnsembleCaller,
    SlowedRunner,
    benchmark_model,
    make_runner,
    model_batch_sizes,
    run_batched,
    scenario_requests,
)
from benchmarks.lib import machine_facts, provenance
from export.convert.onnx2trt import build_engines
from export.manifest import find_manifest, plan_path
from export.node.facts import probe_node
from export.profiles import engine_models
from export.verify.golden import load_golden
from export.verify.parity import check_outputs, ranking_parity
from export.verify.preflight import preflight, triton_backend_config
from export.verify.served_files import served_file
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.spec import PipelineSpec, Precision, ServingProfile
from fusionrank.contract.tensors import CLICK_PROBABILITY
from fusionrank.server.launcher import TritonServer
from release.upgrade_timing import TimingPlan, time_interleaved

log = logging.getLogger(__name__)

SCHEMA = "fusionrank-upgrade-report/2"  # 2: repeated interleaved windows, served files, provenance
UPGRADE_PROFILES = (ServingProfile.CPU, ServingProfile.GPU)  # what the report can measure: ORT or TensorRT
DEFAULT_REQUESTS = 100
BASELINE_PREFIX = "baseline:"  # runners of --baseline-repository, timed beside this repository's


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


def tolerance_for(spec: PipelineSpec, profile: ServingProfile | str, model: str | None = None):
    """Per-output tolerance of a profile: the engines' (FP16/INT8) for gpu; for cpu `export.cpu.tolerances` when
    the profile serves `model` as INT8 (as the export's gates judge it), ONNX Runtime's FP32 ones otherwise."""
    if ServingProfile(profile) is ServingProfile.GPU:
        engine = spec.export.tensorrt.tolerances
        return lambda output: engine.get(output, spec.export.tolerance(output))
    if model is not None and spec.export.cpu.precision_of(model) is Precision.INT8:
        cpu = spec.export.cpu.tolerances
        return lambda output: cpu.get(output, spec.export.tolerance(output))
    return spec.export.tolerance


def ranking_gate(spec: PipelineSpec, profile: ServingProfile, model: str):
    """The ranking-parity gate of the served ranker: `export.cpu.ranking` for an INT8 ranker on the CPU profile."""
    if profile is ServingProfile.CPU and spec.export.cpu.precision_of(model) is Precision.INT8:
        return spec.export.cpu.ranking
    return spec.export.ranking


def node_facts(profile: ServingProfile) -> dict:
    """The node a report was measured on (GPU facts for gpu; processor and core count always)."""
    machine = machine_facts()
    facts = {"hostname": platform.node(), "processor": machine["model"], "cpu_flags": machine["flags"],
             "cpu_count": os.cpu_count(), "load_average": machine["load_average"],
             "python": platform.python_version()}
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
    results = {}
    for model, runner in runners.items():
        tol = tolerance_for(spec, profile, model)
        golden = load_golden(repo, model)
        actual = run_batched(runner, golden.inputs, spec.serving.batching(model).max_batch_size)
        outputs = check_outputs(model, golden.outputs, actual, tol, raise_on_fail=False)
        entry = {"samples": golden.rows, "outputs": {o.output: o.as_dict() for o in outputs},
                 "passed": all(o.passed for o in outputs)}
        if golden.labels is not None and CLICK_PROBABILITY in actual:
            ranking = ranking_parity(golden.outputs[CLICK_PROBABILITY], actual[CLICK_PROBABILITY], golden.labels,
                                     golden.groups, ranking_gate(spec, profile, model),
                                     model=f"{profile.value} {model}")
            entry["ranking"] = ranking.as_dict()
            entry["passed"] = entry["passed"] and ranking.passed
        results[model] = entry
    return json_safe(results)


def measure_model_latency(spec: PipelineSpec, repo: Path, runners: dict, min_iterations: int, budget_s: float,
                          batch_sizes: tuple[int, ...] | None = None) -> dict:
    """Per model and batch size (the spec's, or `batch_sizes`): one closed-loop run each (the measurement core's
    driver), latency and rows/s; the GPU check's quick step (the upgrade report itself uses interleaved rounds)."""
    results = {}
    for model, runner in runners.items():
        golden = load_golden(repo, model)
        sizes = batch_sizes or model_batch_sizes(spec, model)
        stats = benchmark_model(runner, golden.inputs, sizes, min_iterations, budget_s)
        results[model] = {str(batch): s.as_dict() for batch, s in stats.items()}
    return results


def measure_latency(spec: PipelineSpec, repo: Path, profile: ServingProfile, runners: dict, plan: TimingPlan,
                    batch_sizes: tuple[int, ...] | None, requests: int, url: str | None,
                    scenario: str | Path | None, out: Path | None, say) -> dict:
    """Per model and batch size (the spec's, or `batch_sizes`), and the ensemble end to end (on `url`, else on a
    Triton server started for the run; `requests` 0 skips it), in interleaved rounds (`release.upgrade_timing`)."""
    inputs = {m: load_golden(repo, m.removeprefix(BASELINE_PREFIX)).inputs for m in runners}

    def sizes(model: str) -> tuple[int, ...]:
        return batch_sizes or model_batch_sizes(spec, model.removeprefix(BASELINE_PREFIX))

    if not requests:
        return {**_split_baseline(time_interleaved(runners, inputs, sizes, plan, progress=say)), "ensemble": None}
    factory, sc = scenario_requests(spec, scenario)
    per_window = max(1, requests // plan.rounds)
    with contextlib.ExitStack() as stack:
        if not url:
            backend_config = triton_backend_config(spec, repo) if profile is ServingProfile.GPU else []
            server = stack.enter_context(TritonServer.for_spec(
                spec, repo, profile, log_name="upgrade", backend_config=backend_config,
                log_file=out / "tritonserver.log" if out else None))
            url = server.grpc_url
        caller = stack.enter_context(EnsembleCaller(spec, url, factory.next, sc.users, sc.timeout_s))
        caller.warm_up(sc.warmup_requests)
        caller.candidates.clear()
        timed = time_interleaved(runners, inputs, sizes, plan, {"ensemble": lambda: caller.window(per_window)},
                                 progress=say)
        candidates = float(np.mean(caller.candidates)) if caller.candidates else 0.0
    ensemble = timed.pop("ensemble")
    timed = _split_baseline(timed)
    requests_sent = per_window * plan.rounds
    ensemble.update(scenario=sc.name, requests=requests_sent, users=sc.users,
                    candidates_per_request=round(candidates, 2),
                    error_rate=round(ensemble["errors"] / requests_sent, 4) if requests_sent else 1.0)
    if "throughput" in ensemble:
        ensemble["throughput_rps"] = ensemble.pop("throughput")
    return {**timed, "ensemble": ensemble}


def _split_baseline(timed: dict) -> dict:
    """{"models": ...} and, when baseline runners were timed beside them, {"interleaved_baseline": ...}."""
    out = {"models": {m: v for m, v in timed.items() if not m.startswith(BASELINE_PREFIX)}}
    base = {m.removeprefix(BASELINE_PREFIX): v for m, v in timed.items() if m.startswith(BASELINE_PREFIX)}
    if base:
        out["interleaved_baseline"] = base
    return out


def make_runners(spec: PipelineSpec, repo: Path, profile: ServingProfile,
                 slowdown: dict[str, float] | None = None) -> dict:
    """One runner per model over the files the profile serves; `slowdown` {model: fraction} makes some slower on
    purpose (`--inject-slowdown`, to prove the gate)."""
    unknown = sorted(set(slowdown or {}) - set(engine_models(spec)))
    if unknown:
        raise ReportError(f"--inject-slowdown {', '.join(unknown)}: not a model of this spec; allowed: "
                          f"{', '.join(engine_models(spec))}")
    runners = {m: make_runner(profile.value, Path(repo), m, spec) for m in engine_models(spec)}
    for model, fraction in (slowdown or {}).items():
        runners[model] = SlowedRunner(runners[model], fraction)
    return runners


def served_facts(spec: PipelineSpec, repo: Path, profile: ServingProfile, runners: dict) -> dict:
    """What was measured: per model the served file, its digest and threads (cpu); the plan files (gpu)."""
    if profile is not ServingProfile.CPU:
        return {m: {"path": str(plan_path(repo, m))} for m in runners}
    return {m: served_file(spec, repo, m).as_dict() for m in runners}


def measure(spec: PipelineSpec, repo: Path, profile: ServingProfile | str = ServingProfile.CPU,
            requests: int = DEFAULT_REQUESTS, url: str | None = None, scenario: str | Path | None = None,
            out: Path | None = None, plan: TimingPlan | None = None, progress=None,
            batch_sizes: tuple[int, ...] | None = None, slowdown: dict[str, float] | None = None,
            baseline_repository: Path | None = None) -> dict:
    """Everything the report compares, measured on this node: the report JSON without its comparison.
    `baseline_repository`: the files served before (another model repository), timed in the same interleaved
    rounds as this one's, so the comparison is side by side (pyperf's way) and the neighbours' load falls on both."""
    profile = upgrade_profile(profile)
    repo = Path(repo)
    # TensorRT works off the calling thread (CPU time says nothing of the GPU's): wall-clock repeats there.
    plan = plan or TimingPlan(clock="cpu" if profile is ServingProfile.CPU else "wall")
    if profile is not ServingProfile.CPU and plan.clock == "cpu":
        plan = dataclasses.replace(plan, clock="wall")
    say = progress or (lambda msg: log.info("%s", msg))
    engines = {}
    if profile is ServingProfile.GPU:
        say("checking engines against this node")
        engines = prepare_engines(spec, repo)
    models = engine_models(spec)
    seconds = {}
    runners = make_runners(spec, repo, profile, slowdown)
    baseline_runners = make_runners(spec, Path(baseline_repository), profile) if baseline_repository else {}
    try:
        served = served_facts(spec, repo, profile, runners)
        say("accuracy vs golden outputs (the served files)")
        started = time.monotonic()
        accuracy = measure_accuracy(spec, repo, profile, runners)
        seconds["accuracy"] = time.monotonic() - started
        say(f"latency: {plan.rounds} interleaved rounds of every model and batch"
            + (f" and {max(1, requests // plan.rounds)} ensemble requests" if requests else ""))
        started = time.monotonic()
        timed = {**runners, **{BASELINE_PREFIX + m: r for m, r in baseline_runners.items()}}
        latency = measure_latency(spec, repo, profile, timed, plan, batch_sizes, requests, url, scenario, out, say)
        seconds["latency"] = time.monotonic() - started
    finally:
        for runner in [*runners.values(), *baseline_runners.values()]:
            runner.close()
    if baseline_runners:
        latency["interleaved_baseline_repository"] = str(baseline_repository)
        latency["interleaved_baseline_digests"] = {m: f.get("sha256") for m, f in served_facts(
            spec, Path(baseline_repository), profile, baseline_runners).items()}
    manifests = {}
    if profile is ServingProfile.GPU:
        for m in models:
            manifest = find_manifest(repo, m)
            manifests[m] = manifest.as_dict() if manifest else None
    digests = {m: f.get("sha256") for m, f in served.items()}
    return {"schema": SCHEMA, "created_utc": _utc_now(), "profile": profile.value, "spec_digest": spec.digest(),
            "node": node_facts(profile), "provenance": provenance(spec.digest()), "served": served,
            "served_digests": digests, "timing": asdict(plan), "slowdown": slowdown or {}, "engines": engines,
            "manifests": manifests, "accuracy": accuracy, "latency": latency,
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}
