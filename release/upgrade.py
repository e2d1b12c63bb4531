"""`fusionrank upgrade-report`: will accuracy and latency still hold on the new node / release?

A platform team runs it on the new node (or with the new Triton/TensorRT release) against the baseline JSON saved
on the previous one. It
1. (gpu) checks every engine against the node and rebuilds the ones that do not fit (`export.verify.preflight`,
   `export.convert.onnx2trt`);
2. checks accuracy: each model's runtime (cpu: ONNX Runtime, gpu: TensorRT) on the golden inputs stored at export
   time against the PyTorch golden outputs, per output within the profile's tolerances (`export.tolerances`, or
   `export.tensorrt.tolerances` for engines), plus ranking parity of the ranker on the frozen candidate set;
3. measures latency of the files the profile serves (cpu: the `model.opt.onnx` / `model.int8.onnx` its configs
   name, with their thread counts): each model at the spec's batch sizes and the ensemble end to end on a Triton
   server started with the profile, in repeated interleaved windows (`release.upgrade_timing`);
4. compares with the baseline: accuracy may not drift by more than `upgrade.max_accuracy_delta`; latency fails
   only when significantly slower (Mann-Whitney U on the windows) by more than `upgrade.max_latency_regression`
   (`release.upgrade_compare`); engine manifests old vs new are listed;
5. writes `report.md` + `report.json`, and exits non-zero naming every regression.

The report JSON is also the baseline format (`--save-baseline` writes the measured part of it). Steps 1-3 live in
`release.upgrade_measure`, step 4 in `release.upgrade_compare`, the markdown of step 5 in `release.upgrade_markdown`;
this module ties them together.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks.latency import BenchmarkError
from benchmarks.lib import describe_machine
from fusionrank.contract.project import reports_dir
from fusionrank.contract.spec import PipelineSpec, ServingProfile
from release.upgrade_compare import ALPHA, compare, load_report
from release.upgrade_markdown import fmt, render_markdown
from release.upgrade_measure import DEFAULT_REQUESTS, ReportError, json_safe, measure, upgrade_profile
from release.upgrade_timing import TimingPlan

MEASURED_KEYS = ("schema", "created_utc", "profile", "spec_digest", "node", "provenance", "served", "served_digests",
                 "timing", "slowdown", "engines", "manifests", "accuracy", "latency")


def build_report(spec: PipelineSpec, measured: dict, baseline: dict | None, baseline_file: str | None) -> dict:
    """The measured report plus its comparison with the baseline (thresholds recorded alongside)."""
    comparison = compare(spec, measured, baseline)
    return {**measured, "comparison": {
        "baseline_file": baseline_file, "passed": comparison.passed,
        "thresholds": {"max_latency_regression": spec.upgrade.max_latency_regression,
                       "max_throughput_regression": spec.upgrade.max_throughput_regression,
                       "max_accuracy_delta": spec.upgrade.max_accuracy_delta, "alpha": ALPHA,
                       "test": "Mann-Whitney U on window medians; noise floor = max_latency_regression"},
        "regressions": [r.as_dict() for r in comparison.regressions], "notes": comparison.notes,
        "manifest_changes": comparison.manifest_changes}}


def write_report(report: dict, baseline: dict | None, out: Path) -> tuple[Path, Path]:
    """Write report.md and report.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "report.md", out / "report.json"
    md.write_text(render_markdown(report, baseline))
    js.write_text(json.dumps(json_safe(report), indent=2, sort_keys=False) + "\n")
    return md, js


def save_baseline(report: dict, path: Path) -> Path:
    """The measured part of a report, as the next run's baseline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe({k: report[k] for k in MEASURED_KEYS if k in report}), indent=2) + "\n")
    return path


def upgrade_report(spec: PipelineSpec, repo: Path, profile: ServingProfile | str = ServingProfile.CPU,
                   baseline: str | Path | None = None, out: str | Path | None = None,
                   save_baseline_to: str | Path | None = None, requests: int | None = None, url: str | None = None,
                   scenario: str | Path | None = None, plan: TimingPlan | None = None, progress=None,
                   batch_sizes: tuple[int, ...] | None = None, slowdown: dict[str, float] | None = None,
                   baseline_repository: Path | None = None) -> dict:
    """Measure, compare with `baseline`, write report.md/report.json to `out`; returns the report dict.

    `url` measures the ensemble on a running server instead of starting one (`requests` 0: no ensemble);
    `batch_sizes` replaces the spec's per-model batch sizes (a quick check; baseline batch sizes not measured are
    skipped); `plan` sets the interleaved rounds; `slowdown` {model: fraction} slows models on purpose;
    `baseline_repository` times the previously served files side by side with these (per-model comparison).
    """
    profile = upgrade_profile(profile)
    base = load_report(baseline) if baseline else None  # fail before measuring on a bad baseline path
    out = Path(out) if out else reports_dir() / f"upgrade-{profile.value}-{time.strftime('%Y%m%d-%H%M%S')}"
    measured = measure(spec, repo, profile, DEFAULT_REQUESTS if requests is None else requests, url, scenario, out,
                       plan, progress, batch_sizes, slowdown, baseline_repository)
    report = build_report(spec, measured, base, str(baseline) if baseline else None)
    report["files"] = {k: str(p) for k, p in zip(("markdown", "json"), write_report(report, base, out))}
    if save_baseline_to:
        report["files"]["baseline"] = str(save_baseline(report, Path(save_baseline_to)))
    return report


def parse_slowdown(values: list[str] | None) -> dict[str, float]:
    """`MODEL=FRACTION` items (e.g. text_encoder=0.3) as {model: fraction}; ReportError naming a bad one."""
    out = {}
    for item in values or []:
        model, _, fraction = item.partition("=")
        try:
            out[model.strip()] = float(fraction)
        except ValueError:
            raise ReportError(f"--inject-slowdown {item!r}: expected MODEL=FRACTION, e.g. text_encoder=0.3") from None
    return out


def upgrade_report_command(spec: PipelineSpec, repo: Path, profile: ServingProfile | str = ServingProfile.CPU,
                           baseline: Path | None = None, out_dir: Path | None = None, save_baseline: Path | None = None,
                           requests: int | None = None, out=None, url: str | None = None,
                           plan: TimingPlan | None = None, batch_sizes: tuple[int, ...] | None = None,
                           slowdown: dict[str, float] | None = None, baseline_repository: Path | None = None) -> int:
    """`fusionrank upgrade-report`: print the verdict and every regression; exit 1 on any regression."""
    out = out or sys.stdout
    try:
        report = upgrade_report(spec, repo, profile, baseline=baseline, out=out_dir, save_baseline_to=save_baseline,
                                requests=requests, url=url, plan=plan, batch_sizes=batch_sizes, slowdown=slowdown,
                                baseline_repository=baseline_repository,
                                progress=lambda msg: out.write(f"upgrade-report: {msg} ...\n") or out.flush())
    except BenchmarkError as exc:
        raise ReportError(f"latency benchmark failed: {exc}") from exc
    cmp_ = report["comparison"]
    ens = report["latency"].get("ensemble")
    machine = (report.get("provenance") or {}).get("machine")
    if machine:
        out.write(f"measured on {describe_machine(machine)}\n")
    if ens:
        out.write(f"ensemble: p50 {fmt(ens.get('p50_ms'), '.1f')} ms, p95 {fmt(ens.get('p95_ms'), '.1f')} ms "
                  f"(n={ens.get('samples')}), {fmt(ens.get('throughput_rps'), '.2f')} req/s, errors "
                  f"{ens['error_rate']:.1%}\n")
    for note in cmp_["notes"]:
        out.write(f"note: {note}\n")
    for r in cmp_["regressions"]:
        out.write(f"REGRESSION {r['metric']}: {r['detail']}\n")
    out.write(f"{'PASS' if cmp_['passed'] else 'FAIL'}: {len(cmp_['regressions'])} regression(s); report "
              f"{report['files']['markdown']}\n")
    if "baseline" in report["files"]:
        out.write(f"baseline saved to {report['files']['baseline']}\n")
    return 0 if cmp_["passed"] else 1
