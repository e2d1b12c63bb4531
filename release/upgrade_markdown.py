"""Upgrade report, step 3: the report a person reads (`report.md`): verdict, regressions, accuracy, latency per
model, the route end to end, engine manifests."""

from __future__ import annotations

import json

import numpy as np

from fusionrank.contract.spec import ServingProfile
from release.upgrade_compare import MIN_CHANGE_MS, latency_comparison


def fmt(value, spec: str = ".3g") -> str:
    """A number formatted with `spec`, any other value as text, None as "-"."""
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def render_markdown(report: dict, baseline: dict | None) -> str:
    """The human-readable report: verdict, regressions, accuracy, latency, the route, manifests."""
    cmp_ = report["comparison"]
    lines = [f"# Upgrade report ({report['profile']} profile)", "",
             f"**{'PASS' if cmp_['passed'] else 'FAIL'}**: {len(cmp_['regressions'])} regression(s)", "",
             f"- measured: {report['created_utc']} on {report['node'].get('gpu_name') or report['node']['processor']}"
             f" ({report['node']['cpu_count']} CPUs)",
             f"- baseline: {cmp_['baseline_file'] or 'none'}"
             + (f", measured {baseline['created_utc']} ({baseline['profile']} profile)" if baseline else ""),
             f"- spec digest: {report['spec_digest']}; commit {(report.get('provenance') or {}).get('commit')}",
             f"- CPU flags: {' '.join(report['node'].get('cpu_flags') or []) or '-'}; load average at start "
             f"{report['node'].get('load_average')}",
             "- served files: " + ", ".join(f"{m} `{f.get('path', '').rsplit('/', 1)[-1]}` ({f.get('sha256')})"
                                           for m, f in (report.get("served") or {}).items()),
             ""]
    if report.get("slowdown"):
        lines += [f"**Deliberately slowed** (`--inject-slowdown`): {report['slowdown']}", ""]
    if cmp_["regressions"]:
        lines += ["## Regressions", ""] + [f"- `{r['metric']}`: {r['detail']}" for r in cmp_["regressions"]] + [""]
    base_acc = (baseline or {}).get("accuracy", {})
    lines += ["## Accuracy vs golden PyTorch outputs", "",
              "| model | output | max abs diff | tolerance | baseline | delta | ok |", "|---|---|---|---|---|---|---|"]
    for model, entry in report["accuracy"].items():
        for output, o in entry["outputs"].items():
            old = base_acc.get(model, {}).get("outputs", {}).get(output, {}).get("max_abs_diff")
            delta = None if old is None or o["max_abs_diff"] is None else o["max_abs_diff"] - old
            lines.append(f"| {model} | {output} | {fmt(o['max_abs_diff'])} | atol {o['atol']:g} rtol {o['rtol']:g} "
                         f"| {fmt(old)} | {fmt(delta, '+.2g')} | {'yes' if o['passed'] else 'NO'} |")
        ranking = entry.get("ranking")
        if ranking:
            lines.append(f"| {model} | ranking | top-10 {ranking['top10_overlap']:.3f}, tau "
                         f"{fmt(ranking['kendall_tau'], '.4f')}, AUC diff {fmt(ranking['auc_diff'], '.4f')} | "
                         f"spec gate | | | {'yes' if ranking['passed'] else 'NO'} |")
    lines += _latency_tables(report, baseline)
    lines += ["", "## Engine manifests (baseline vs current)", ""]
    if report["profile"] != ServingProfile.GPU.value:
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


def _ci(entry: dict, label: str) -> str:
    value, ci = entry.get(f"{label}_ms"), entry.get(f"{label}_ci_ms") or [None, None]
    flag = "" if entry.get(f"{label}_supported", True) else " (too few samples)"
    return f"{fmt(value, '.3g')} [{fmt(ci[0], '.3g')}, {fmt(ci[1], '.3g')}]{flag}"


def _verdict_cells(current: dict, old: dict, comparison) -> str:
    if not old:
        return "- | - | - | - |"
    base = fmt(float(np.median(old["repeats_ms"])) if old.get("repeats_ms") else None, ".3g")
    if comparison is None:
        return f"{base} | - | - | not compared |"
    below = comparison.current_median - comparison.baseline_median <= MIN_CHANGE_MS
    if comparison.worse:
        verdict = f"slower by < {MIN_CHANGE_MS:g} ms (noise)" if below else "SLOWER"
    else:
        verdict = "faster" if comparison.significant else "same (noise)"
    return f"{base} | {comparison.change:+.1%} | {comparison.p_value:.3g} | {verdict} |"


def _latency_tables(report: dict, baseline: dict | None) -> list[str]:
    """Per model and batch, then the ensemble: the noise seen (repeats, samples, medians with confidence
    intervals, spread of the repeats, load average) and the comparison with the baseline."""
    floor = report["comparison"]["thresholds"]["max_latency_regression"]
    timing = report.get("timing") or {}
    lines = ["", "## Latency per model (the served files, runtime only)", "",
             f"{timing.get('rounds', '?')} interleaved rounds of {timing.get('window_s', '?')} s windows; "
             f"repeats = window medians of the calling thread's {timing.get('clock', 'wall')} time per call "
             "(`cpu`: ONNX Runtime's one intra-op thread runs on it, so neighbours' load does not inflate it), "
             "compared by Mann-Whitney U (alpha "
             f"{report['comparison']['thresholds'].get('alpha')}) with a noise floor of "
             f"+{floor:.0%} (and a change of at least {MIN_CHANGE_MS:g} ms per call). Wall-clock percentiles of "
             "all calls with their 95 % CIs; spread = (max - min) / median of "
             "the repeats.", "",
             "| model | batch | repeats | calls | wall p50 ms [CI] | wall p95 ms [CI] | CPU p50 ms | spread | "
             "load avg | rows/s | baseline median | change | p | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base_lat = report["latency"].get("interleaved_baseline") or (baseline or {}).get("latency", {}).get("models", {})
    if report["latency"].get("interleaved_baseline"):
        lines.insert(3, f"Baseline columns: `{report['latency'].get('interleaved_baseline_repository')}`, timed in "
                        "the same rounds (side by side).")
    for model, batches in report["latency"]["models"].items():
        for batch, s in batches.items():
            old = base_lat.get(model, {}).get(batch)
            cmp_ = latency_comparison(s, old, floor) if old else None
            load = (s.get("load_average") or {}).get("before") or []
            lines.append(f"| {model} | {batch} | {len(s.get('repeats_ms', []))} | {s.get('samples')} | "
                         f"{_ci(s, 'p50')} | {_ci(s, 'p95')} | {fmt(s.get('cpu_p50_ms'), '.3g')} | "
                         f"{fmt(s.get('repeat_spread'), '.0%')} | "
                         f"{fmt(load[0] if load else None, '.2f')} | {fmt(s.get('throughput'), '.0f')} | "
                         + _verdict_cells(s, old, cmp_))
    ens = report["latency"].get("ensemble")
    if not ens:
        return lines + ["", "Ensemble end to end: not measured (--requests 0)."]
    old_ens = (baseline or {}).get("latency", {}).get("ensemble") or {}
    cmp_ = latency_comparison(ens, old_ens, floor) if old_ens else None
    lines += ["", f"## Ensemble end to end (scenario {ens.get('scenario')}, {ens.get('requests')} requests, "
              f"{ens.get('users')} users, {ens.get('candidates_per_request')} candidates/request)", "",
              "| repeats | requests ok | p50 ms [CI] | p95 ms [CI] | p99 ms [CI] | req/s | errors | baseline median | "
              "change | p | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|",
              f"| {len(ens.get('repeats_ms', []))} | {ens.get('samples')} | {_ci(ens, 'p50')} | {_ci(ens, 'p95')} | "
              f"{_ci(ens, 'p99')} | {fmt(ens.get('throughput_rps'), '.3g')} | {fmt(ens.get('error_rate'), '.1%')} | "
              + _verdict_cells(ens, old_ens, cmp_)]
    return lines


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
