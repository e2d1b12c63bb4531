"""Upgrade report, step 3: the report a person reads (`report.md`): verdict, regressions, accuracy, latency per
model, the route end to end, engine manifests."""

from __future__ import annotations

import json

from fusionrank.contract.spec import ServingProfile


def fmt(value, spec: str = ".3g") -> str:
    """A number formatted with `spec`, any other value as text, None as "-"."""
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _change(new, old) -> str:
    if new is None or old is None or not old:
        return "-"
    return f"{(new - old) / old:+.0%}"


def render_markdown(report: dict, baseline: dict | None) -> str:
    """The human-readable report: verdict, regressions, accuracy, latency, the route, manifests."""
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
            lines.append(f"| {model} | {output} | {fmt(o['max_abs_diff'])} | atol {o['atol']:g} rtol {o['rtol']:g} "
                         f"| {fmt(old)} | {fmt(delta, '+.2g')} | {'yes' if o['passed'] else 'NO'} |")
        ranking = entry.get("ranking")
        if ranking:
            lines.append(f"| {model} | ranking | top-10 {ranking['top10_overlap']:.3f}, tau "
                         f"{fmt(ranking['kendall_tau'], '.4f')}, AUC diff {fmt(ranking['auc_diff'], '.4f')} | "
                         f"spec gate | | | {'yes' if ranking['passed'] else 'NO'} |")
    base_lat = (baseline or {}).get("latency", {}).get("models", {})
    lines += ["", "## Latency per model (runtime only)", "",
              "| model | batch | p50 ms | p95 ms | baseline p50 | change | rows/s | baseline rows/s | change |",
              "|---|---|---|---|---|---|---|---|---|"]
    for model, batches in report["latency"]["models"].items():
        for batch, s in batches.items():
            old = base_lat.get(model, {}).get(batch, {})
            lines.append(f"| {model} | {batch} | {s['p50_ms']:.2f} | {s['p95_ms']:.2f} | "
                         f"{fmt(old.get('p50_ms'), '.2f')} | {_change(s['p50_ms'], old.get('p50_ms'))} | "
                         f"{s['throughput']:.0f} | "
                         f"{fmt(old.get('throughput'), '.0f')} | {_change(s['throughput'], old.get('throughput'))} |")
    ens, old_ens = report["latency"]["ensemble"], (baseline or {}).get("latency", {}).get("ensemble", {})
    lines += ["", f"## Route end to end (scenario {ens.get('scenario')}, {ens['requests']} requests, "
              f"{ens['users']} users, {ens['candidates_per_request']} candidates/request)", "",
              "| metric | current | baseline | change |", "|---|---|---|---|"]
    for key in ("p50_ms", "p95_ms", "p99_ms", "throughput_rps", "error_rate"):
        lines.append(f"| {key} | {fmt(ens.get(key), '.4g')} | {fmt(old_ens.get(key), '.4g')} | "
                     f"{_change(ens.get(key), old_ens.get(key))} |")
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


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
