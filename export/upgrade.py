"""`fusionrank upgrade-report`: will accuracy and latency still hold on the new node / release?

A platform team runs it on the new node (or with the new Triton/TensorRT release) against the baseline JSON saved
on the previous one. It
1. (gpu) checks every engine against the node and rebuilds the ones that do not fit (`export.preflight`,
   `export.onnx2trt`);
2. checks accuracy: each model's runtime (cpu: ONNX Runtime, gpu: TensorRT) on the golden inputs stored at export
   time against the PyTorch golden outputs, per output within the profile's tolerances (`export.tolerances`, or
   `export.tensorrt.tolerances` for engines), plus ranking parity of the ranker on the frozen candidate set;
3. measures latency: each model at the spec's batch sizes, and the ensemble end to end on a Triton server started
   with the profile, with the load test's request scenario;
4. compares with the baseline: accuracy may not drift by more than `upgrade.max_accuracy_delta`, p95 latency may
   not grow and throughput may not drop by more than `upgrade.max_latency_regression` /
   `upgrade.max_throughput_regression`; engine manifests old vs new are listed;
5. writes `report.md` + `report.json`, and exits non-zero naming every regression.

The report JSON is also the baseline format (`--save-baseline` writes the measured part of it).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from export.latency import (
    BenchmarkError,
    benchmark_ensemble,
    benchmark_model,
    load_golden,
    make_runner,
    model_batch_sizes,
    run_batched,
    scenario_requests,
)
from export.manifest import compare_manifests, find_manifest, probe_node
from export.profiles import engine_models
from fusionrank.errors import FusionRankError
from fusionrank.spec import PipelineSpec, ServingProfile, Tolerance
from fusionrank.tensors import CLICK_PROBABILITY

log = logging.getLogger(__name__)

SCHEMA = "fusionrank-upgrade-report/1"
UPGRADE_PROFILES = (ServingProfile.CPU, ServingProfile.GPU)  # what the report can measure: ORT or TensorRT
DEFAULT_REQUESTS = 100
# Sub-millisecond timings jitter by more than any sensible relative threshold on a shared machine: a latency change
# smaller than this is never called a regression, however large it is relative to its baseline.
NOISE_FLOOR_MS = 1.0
MEASURED_KEYS = ("schema", "created_utc", "profile", "spec_digest", "node", "engines", "manifests", "accuracy",
                 "latency")


class ReportError(FusionRankError):
    """A baseline or report file is unreadable or of another schema."""


@dataclass(frozen=True)
class Regression:
    """One check that failed, named by its dotted path in the report JSON."""

    metric: str  # dotted path into the report, e.g. latency.ensemble.p95_ms
    detail: str

    def __str__(self) -> str:
        return f"{self.metric}: {self.detail}"

    def as_dict(self) -> dict:
        return {"metric": self.metric, "detail": self.detail}


@dataclass
class Comparison:
    """Regressions, notes and manifest changes of one report against its baseline."""

    regressions: list[Regression] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest_changes: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.regressions


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _finite(value):
    """JSON-safe numbers: NaN/inf (e.g. AUC of a one-class set, a missing output) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def tolerance_for(spec: PipelineSpec, profile: str):
    """Per-output tolerance of a profile: ONNX Runtime's for cpu, the engines' (FP16/INT8) for gpu."""
    if profile == "gpu":
        engine = spec.export.tensorrt.tolerances
        return lambda output: engine.get(output, spec.export.tolerance(output))
    return spec.export.tolerance


# --- measuring ----------------------------------------------------------------------------------------------------


def node_facts(profile: str) -> dict:
    """The node a report was measured on (GPU facts for gpu; processor and core count always)."""
    facts = {"hostname": platform.node(), "processor": platform.processor() or platform.machine(),
             "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        import onnxruntime

        facts["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if profile == "gpu":
        facts.update({k: v for k, v in probe_node().as_dict().items() if k != "notes"})
    return facts


def prepare_engines(spec: PipelineSpec, repo: Path) -> dict:
    """gpu: pre-flight every engine, rebuild the ones that do not fit this node, pre-flight again."""
    from export.onnx2trt import build_engines
    from export.preflight import preflight

    before = preflight(spec, repo)
    stale = sorted({m.model for m in before})
    if stale:
        log.info("rebuilding engines that do not fit this node: %s", ", ".join(stale))
        build_engines(spec, repo, models=stale)
    after = preflight(spec, repo)
    return {"rebuilt": stale, "preflight_before": [m.as_dict() for m in before],
            "preflight_after": [m.as_dict() for m in after]}


def measure_accuracy(spec: PipelineSpec, repo: Path, profile: str, runners: dict) -> dict:
    """Per model: output parity vs golden PyTorch outputs; for the ranker also ranking parity."""
    from export.parity import check_outputs, ranking_parity

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
                                     golden.groups, spec.export.ranking, model=f"{profile} {model}")
            entry["ranking"] = ranking.as_dict()
            entry["passed"] = entry["passed"] and ranking.passed
        results[model] = entry
    return _finite(results)


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


def measure_ensemble(spec: PipelineSpec, repo: Path, profile: str, requests: int, url: str | None,
                     scenario: str | Path | None, out: Path | None) -> dict:
    """End-to-end latency of the ensemble: on `url` when given, else on a Triton server started for the run."""
    from fusionrank.serving.server import TritonServer

    factory, sc = scenario_requests(spec, scenario)
    source = factory.next
    if url:
        stats = benchmark_ensemble(spec, url, source, requests, sc.users, sc.warmup_requests, sc.timeout_s)
    else:
        log_file = None
        if out:
            out.mkdir(parents=True, exist_ok=True)
            log_file = out / "tritonserver.log"
        with TritonServer.for_spec(spec, repo, profile, log_file=log_file) as server:
            stats = benchmark_ensemble(spec, server.grpc_url, source, requests, sc.users, sc.warmup_requests,
                                       sc.timeout_s)
    return {"scenario": sc.name, **stats.as_dict()}


def measure(spec: PipelineSpec, repo: Path, profile: str = "cpu", requests: int = DEFAULT_REQUESTS,
            url: str | None = None, scenario: str | Path | None = None, out: Path | None = None,
            min_iterations: int = 3, budget_s: float = 1.0, progress=None,
            batch_sizes: tuple[int, ...] | None = None) -> dict:
    """Everything the report compares, measured on this node: the report JSON without its comparison."""
    if profile not in UPGRADE_PROFILES:
        raise ReportError(f"unknown profile {profile!r}; allowed: {', '.join(p.value for p in UPGRADE_PROFILES)}")
    repo = Path(repo)
    say = progress or (lambda msg: log.info("%s", msg))
    engines = {}
    if profile == "gpu":
        say("checking engines against this node")
        engines = prepare_engines(spec, repo)
    models = engine_models(spec)
    seconds = {}
    runners = {m: make_runner(profile, repo, m) for m in models}
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
    if profile == "gpu":
        for m in models:
            manifest = find_manifest(repo, m)
            manifests[m] = manifest.as_dict() if manifest else None
    return {"schema": SCHEMA, "created_utc": _utc_now(), "profile": profile, "spec_digest": spec.digest(),
            "node": node_facts(profile), "engines": engines, "manifests": manifests, "accuracy": accuracy,
            "latency": {"models": model_latency, "ensemble": ensemble},
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}


# --- comparing ----------------------------------------------------------------------------------------------------


def load_report(path: str | Path) -> dict:
    """A baseline (or report) JSON of this schema."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ReportError(f"baseline {path}: cannot read ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ReportError(f"baseline {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ReportError(f"baseline {path}: schema {found!r}, expected {SCHEMA!r} (save one with --save-baseline)")
    return data


def _relative(new: float, old: float) -> float:
    return (new - old) / old if old else (math.inf if new > old else 0.0)


def _own_checks(spec: PipelineSpec, current: dict) -> list[Regression]:
    """Failures that need no baseline: parity vs golden, ranking parity, engines that still mismatch, errors."""
    found = []
    for model, entry in current["accuracy"].items():
        for output, o in entry["outputs"].items():
            if not o["passed"]:
                diff = "missing or non-finite" if o["max_abs_diff"] is None else f"{o['max_abs_diff']:.3g}"
                found.append(Regression(f"accuracy.{model}.{output}", f"max |diff| vs golden {diff} exceeds "
                                        f"{Tolerance(o['atol'], o['rtol']).describe()}"))
        ranking = entry.get("ranking")
        if ranking and not ranking["passed"]:
            gate = spec.export.ranking
            found.append(Regression(f"accuracy.{model}.ranking", f"top-10 overlap {ranking['top10_overlap']:.3f} "
                                    f"(>= {gate.min_top10_overlap}), Kendall tau {ranking['kendall_tau']:.4f} "
                                    f"(>= {gate.min_kendall_tau}), AUC diff {ranking['auc_diff']:.4f} "
                                    f"(<= {gate.max_auc_diff})"))
    for m in current.get("engines", {}).get("preflight_after", []):
        found.append(Regression(f"engines.{m['model']}", f"{m['kind']}: {m['detail']}"))
    ens = current["latency"]["ensemble"]
    if ens.get("p95_ms") is None:
        found.append(Regression("latency.ensemble", f"no request succeeded ({ens.get('first_error')})"))
    elif ens["error_rate"] > spec.slo.max_error_rate:
        found.append(Regression("latency.ensemble.error_rate", f"{ens['error_rate']:.2%} of requests failed "
                                f"(allowed {spec.slo.max_error_rate:.2%}); first: {ens.get('first_error')}"))
    return found


def _latency_checks(spec: PipelineSpec, where: str, cur: dict, base: dict, throughput_key: str,
                    stat: str = "p95_ms") -> list[Regression]:
    """`stat` is p95 for the ensemble (the SLO's view) and p50 for a model's runtime micro-benchmark, whose p95 over
    a short run is one scheduler hiccup away from +50% on a shared machine (measured: a false +59% back to back)."""
    up = spec.upgrade
    found = []
    if cur.get(stat) is None or base.get(stat) is None:
        return found
    grew = _relative(cur[stat], base[stat])
    label = stat.removesuffix("_ms")
    if grew > up.max_latency_regression and cur[stat] - base[stat] > NOISE_FLOOR_MS:
        found.append(Regression(f"{where}.{stat}", f"{label} {cur[stat]:.2f} ms vs baseline {base[stat]:.2f} ms "
                                f"(+{grew:.0%}, allowed +{up.max_latency_regression:.0%})"))
    dropped = -_relative(cur[throughput_key], base[throughput_key])
    slower = cur["p50_ms"] - base["p50_ms"] > NOISE_FLOOR_MS or throughput_key == "throughput_rps"
    if dropped > up.max_throughput_regression and slower:
        found.append(Regression(f"{where}.{throughput_key}", f"throughput {cur[throughput_key]:.2f} vs baseline "
                                f"{base[throughput_key]:.2f} (-{dropped:.0%}, allowed "
                                f"-{up.max_throughput_regression:.0%})"))
    return found


def compare(spec: PipelineSpec, current: dict, baseline: dict | None) -> Comparison:
    """Regressions of `current` on its own and against `baseline` (thresholds from `spec.upgrade`)."""
    result = Comparison(regressions=_own_checks(spec, current))
    if baseline is None:
        result.notes.append("no baseline given: only parity and errors were checked (save one with "
                            "--save-baseline on the current node)")
        return result
    if baseline.get("profile") != current["profile"]:
        result.notes.append(f"baseline was measured with the {baseline.get('profile')} profile, this run with "
                            f"{current['profile']}")
    if baseline.get("spec_digest") != current["spec_digest"]:
        result.notes.append(f"the spec changed since the baseline ({baseline.get('spec_digest')} -> "
                            f"{current['spec_digest']})")
    limit = spec.upgrade.max_accuracy_delta
    for model, entry in current["accuracy"].items():
        old_entry = baseline.get("accuracy", {}).get(model)
        if old_entry is None:
            result.notes.append(f"accuracy.{model}: not in the baseline")
            continue
        for output, o in entry["outputs"].items():
            old = old_entry["outputs"].get(output)
            if old is None or o["max_abs_diff"] is None or old["max_abs_diff"] is None:
                continue
            delta = o["max_abs_diff"] - old["max_abs_diff"]
            if delta > limit:
                result.regressions.append(Regression(
                    f"accuracy.{model}.{output}", f"max |diff| vs golden {o['max_abs_diff']:.3g} vs baseline "
                    f"{old['max_abs_diff']:.3g} (+{delta:.3g}, allowed +{limit:g})"))
    base_models = baseline.get("latency", {}).get("models", {})
    for model, batches in current["latency"]["models"].items():
        for batch, stats in batches.items():
            old = base_models.get(model, {}).get(batch)
            if old is None:
                result.notes.append(f"latency.models.{model}.batch{batch}: not in the baseline")
                continue
            result.regressions += _latency_checks(spec, f"latency.models.{model}.batch{batch}", stats, old,
                                                  "throughput", stat="p50_ms")
    base_ens = baseline.get("latency", {}).get("ensemble", {})
    result.regressions += _latency_checks(spec, "latency.ensemble", current["latency"]["ensemble"], base_ens,
                                          "throughput_rps")
    for model in sorted(set(current.get("manifests", {})) | set(baseline.get("manifests", {}))):
        changes = compare_manifests(baseline.get("manifests", {}).get(model), current.get("manifests", {}).get(model))
        if changes:
            result.manifest_changes[model] = [{"field": c.field, "baseline": c.old, "current": c.new}
                                              for c in changes]
    return result


# --- writing ------------------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _change(new, old) -> str:
    if new is None or old is None or not old:
        return "-"
    return f"{(new - old) / old:+.0%}"


def render_markdown(report: dict, baseline: dict | None) -> str:
    """The human-readable report: verdict, regressions, accuracy, latency, ensemble, manifests."""
    cmp_ = report["comparison"]
    lines = [f"# Upgrade report ({report['profile']} profile)", "",
             f"**{'PASS' if cmp_['passed'] else 'FAIL'}**: {len(cmp_['regressions'])} regression(s)", "",
             f"- measured: {report['created_utc']} on {report['node'].get('gpu_name') or report['node']['processor']}"
             f" ({report['node']['cpu_count']} CPUs)",
             f"- baseline: {cmp_['baseline_file'] or 'none'}"
             + (f", measured {baseline['created_utc']} ({baseline['profile']} profile)" if baseline else ""),
             f"- spec digest: {report['spec_digest']}", ""]
    if cmp_["regressions"]:
        lines += ["## Regressions", ""] + [f"- `{r['metric']}`: {r['detail']}" for r in cmp_["regressions"]] + [""]
    base_acc = (baseline or {}).get("accuracy", {})
    lines += ["## Accuracy vs golden PyTorch outputs", "",
              "| model | output | max abs diff | tolerance | baseline | delta | ok |", "|---|---|---|---|---|---|---|"]
    for model, entry in report["accuracy"].items():
        for output, o in entry["outputs"].items():
            old = base_acc.get(model, {}).get("outputs", {}).get(output, {}).get("max_abs_diff")
            delta = None if old is None or o["max_abs_diff"] is None else o["max_abs_diff"] - old
            lines.append(f"| {model} | {output} | {_fmt(o['max_abs_diff'])} | atol {o['atol']:g} rtol {o['rtol']:g} "
                         f"| {_fmt(old)} | {_fmt(delta, '+.2g')} | {'yes' if o['passed'] else 'NO'} |")
        ranking = entry.get("ranking")
        if ranking:
            lines.append(f"| {model} | ranking | top-10 {ranking['top10_overlap']:.3f}, tau "
                         f"{_fmt(ranking['kendall_tau'], '.4f')}, AUC diff {_fmt(ranking['auc_diff'], '.4f')} | "
                         f"spec gate | | | {'yes' if ranking['passed'] else 'NO'} |")
    base_lat = (baseline or {}).get("latency", {}).get("models", {})
    lines += ["", "## Latency per model (runtime only)", "",
              "| model | batch | p50 ms | p95 ms | baseline p50 | change | rows/s | baseline rows/s | change |",
              "|---|---|---|---|---|---|---|---|---|"]
    for model, batches in report["latency"]["models"].items():
        for batch, s in batches.items():
            old = base_lat.get(model, {}).get(batch, {})
            lines.append(f"| {model} | {batch} | {s['p50_ms']:.2f} | {s['p95_ms']:.2f} | "
                         f"{_fmt(old.get('p50_ms'), '.2f')} | {_change(s['p50_ms'], old.get('p50_ms'))} | "
                         f"{s['throughput']:.0f} | "
                         f"{_fmt(old.get('throughput'), '.0f')} | {_change(s['throughput'], old.get('throughput'))} |")
    ens, old_ens = report["latency"]["ensemble"], (baseline or {}).get("latency", {}).get("ensemble", {})
    lines += ["", f"## Ensemble end to end (scenario {ens.get('scenario')}, {ens['requests']} requests, "
              f"{ens['users']} users, {ens['candidates_per_request']} candidates/request)", "",
              "| metric | current | baseline | change |", "|---|---|---|---|"]
    for key in ("p50_ms", "p95_ms", "p99_ms", "throughput_rps", "error_rate"):
        lines.append(f"| {key} | {_fmt(ens.get(key), '.4g')} | {_fmt(old_ens.get(key), '.4g')} | "
                     f"{_change(ens.get(key), old_ens.get(key))} |")
    lines += ["", "## Engine manifests (baseline vs current)", ""]
    if report["profile"] != "gpu":
        lines.append("The cpu profile runs ONNX Runtime: no TensorRT engines, no manifests.")
    elif not cmp_["manifest_changes"]:
        lines.append("No manifest field changed." if baseline else "No baseline to compare manifests with.")
    else:
        lines += ["| model | field | baseline | current |", "|---|---|---|---|"]
        for model, changes in cmp_["manifest_changes"].items():
            lines += [f"| {model} | {c['field']} | {_short(c['baseline'])} | {_short(c['current'])} |" for c in changes]
    engines = report.get("engines") or {}
    if engines.get("rebuilt"):
        lines += ["", f"Rebuilt for this node: {', '.join(engines['rebuilt'])}."]
    if cmp_["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in cmp_["notes"]]
    return "\n".join(lines) + "\n"


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def build_report(spec: PipelineSpec, measured: dict, baseline: dict | None, baseline_file: str | None) -> dict:
    """The measured report plus its comparison with the baseline (thresholds recorded alongside)."""
    comparison = compare(spec, measured, baseline)
    return {**measured, "comparison": {
        "baseline_file": baseline_file, "passed": comparison.passed,
        "thresholds": {"max_latency_regression": spec.upgrade.max_latency_regression,
                       "max_throughput_regression": spec.upgrade.max_throughput_regression,
                       "max_accuracy_delta": spec.upgrade.max_accuracy_delta, "noise_floor_ms": NOISE_FLOOR_MS},
        "regressions": [r.as_dict() for r in comparison.regressions], "notes": comparison.notes,
        "manifest_changes": comparison.manifest_changes}}


def write_report(report: dict, baseline: dict | None, out: Path) -> tuple[Path, Path]:
    """Write report.md and report.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "report.md", out / "report.json"
    md.write_text(render_markdown(report, baseline))
    js.write_text(json.dumps(_finite(report), indent=2, sort_keys=False) + "\n")
    return md, js


def save_baseline(report: dict, path: Path) -> Path:
    """The measured part of a report, as the next run's baseline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite({k: report[k] for k in MEASURED_KEYS}), indent=2) + "\n")
    return path


def upgrade_report(spec: PipelineSpec, repo: Path, profile: str = "cpu", baseline: str | Path | None = None,
                   out: str | Path | None = None, save_baseline_to: str | Path | None = None,
                   requests: int | None = None, url: str | None = None, scenario: str | Path | None = None,
                   min_iterations: int = 3, budget_s: float = 1.0, progress=None,
                   batch_sizes: tuple[int, ...] | None = None) -> dict:
    """Measure, compare with `baseline`, write report.md/report.json to `out`; returns the report dict.

    `url` measures the ensemble on a running server instead of starting one; `batch_sizes` replaces the spec's
    per-model batch sizes (a quick check; baseline batch sizes not measured are skipped in the comparison).
    """
    from fusionrank.project import REPO_ROOT

    base = load_report(baseline) if baseline else None  # fail before measuring on a bad baseline path
    out = Path(out) if out else REPO_ROOT / "reports" / f"upgrade-{profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    measured = measure(spec, repo, profile, requests or DEFAULT_REQUESTS, url, scenario, out, min_iterations,
                       budget_s, progress, batch_sizes)
    report = build_report(spec, measured, base, str(baseline) if baseline else None)
    report["files"] = {k: str(p) for k, p in zip(("markdown", "json"), write_report(report, base, out))}
    if save_baseline_to:
        report["files"]["baseline"] = str(save_baseline(report, Path(save_baseline_to)))
    return report


def upgrade_report_command(spec: PipelineSpec, repo: Path, profile: str = "cpu", baseline: Path | None = None,
                           out_dir: Path | None = None, save_baseline: Path | None = None,
                           requests: int | None = None, out=None) -> int:
    """`fusionrank upgrade-report`: print the verdict and every regression; exit 1 on any regression."""
    out = out or sys.stdout
    try:
        report = upgrade_report(spec, repo, profile, baseline=baseline, out=out_dir, save_baseline_to=save_baseline,
                                requests=requests,
                                progress=lambda msg: out.write(f"upgrade-report: {msg} ...\n") or out.flush())
    except BenchmarkError as exc:
        raise ReportError(f"latency benchmark failed: {exc}") from exc
    cmp_ = report["comparison"]
    ens = report["latency"]["ensemble"]
    out.write(f"ensemble: p50 {_fmt(ens.get('p50_ms'), '.1f')} ms, p95 {_fmt(ens.get('p95_ms'), '.1f')} ms, "
              f"{_fmt(ens.get('throughput_rps'), '.2f')} req/s, errors {ens['error_rate']:.1%}\n")
    for note in cmp_["notes"]:
        out.write(f"note: {note}\n")
    for r in cmp_["regressions"]:
        out.write(f"REGRESSION {r['metric']}: {r['detail']}\n")
    out.write(f"{'PASS' if cmp_['passed'] else 'FAIL'}: {len(cmp_['regressions'])} regression(s); report "
              f"{report['files']['markdown']}\n")
    if "baseline" in report["files"]:
        out.write(f"baseline saved to {report['files']['baseline']}\n")
    return 0 if cmp_["passed"] else 1
