"""Upgrade report, step 2: a measured report against its baseline (`compare`), thresholds from `spec.upgrade`.

Accuracy may not drift by more than `upgrade.max_accuracy_delta`, p95 latency may not grow and throughput may not
drop by more than `upgrade.max_latency_regression` / `upgrade.max_throughput_regression`; failures that need no
baseline (parity vs golden, ranking parity, engines that still mismatch, failed requests) are found either way.
Engine manifests old vs new are listed, never failed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from export.manifest import compare_manifests
from fusionrank.contract.spec import PipelineSpec, Tolerance
from release.upgrade_measure import SCHEMA, ReportError

# Sub-millisecond timings jitter by more than any sensible relative threshold on a shared machine: a latency change
# smaller than this is never called a regression, however large it is relative to its baseline.
NOISE_FLOOR_MS = 1.0


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
