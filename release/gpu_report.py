"""The Markdown page of a GPU check (`fusionrank gpu-check`): the node, what it lacks, every step with its status
and reason, then the figures of the steps that ran."""

from __future__ import annotations


def _table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("-" if v is None or v == "" else str(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _node(report: dict) -> list[str]:
    node, release = report["node"], report["release"]
    rows = [[k, node.get(k)] for k in ("gpu_name", "compute_capability", "driver_version", "cuda_version",
                                        "tensorrt_version", "tensorrt_source")]
    rows += [["note", n] for n in node.get("notes", [])]
    if "error" in release:
        rows.append(["release", release["error"]])
    else:
        rows.append(["release", f"{release['image']} (Triton {release['triton']}, TensorRT {release['tensorrt']}, "
                                f"CUDA {release['cuda']})"])
        rows += [["release pin problem", p] for p in release["pin_problems"]]
    rows += [[f"lacks {k}", v] for k, v in report["lacks"].items() if v]
    return ["## Node", ""] + _table(["fact", "value"], rows)


def _accuracy_and_latency(title: str, data: dict) -> list[str]:
    rows = []
    for model, entry in data["accuracy"].items():
        # A missing or non-finite output is stored as None: the worst of all.
        worst = max(entry["outputs"].values(), key=lambda o: float("inf") if o["max_abs_diff"] is None
                    else o["max_abs_diff"])
        diff = "not finite or missing" if worst["max_abs_diff"] is None else f"{worst['max_abs_diff']:.3g}"
        latency = data["latency"].get(model, {})
        per_batch = ", ".join(f"b{b}: {s['p50_ms']:.2f} ms, {s['throughput']:.0f} rows/s" for b, s in latency.items())
        rows.append([model, "pass" if entry["passed"] else "FAIL", f"{worst['output']} {diff} "
                     f"(atol {worst['atol']}, rtol {worst['rtol']})", per_batch])
    return [f"## {title}", ""] + _table(["model", "parity", "largest difference", "p50 latency and throughput"], rows)


def _build(data: dict) -> list[str]:
    rows = [[m, d["precision"], d["profiles"], d["size_mib"], d["seconds"]] for m, d in data.items()]
    return ["## TensorRT build", ""] + _table(["model", "precision", "profiles", "MiB", "seconds"], rows)


def _serve(data: dict) -> list[str]:
    e = data["ensemble"]
    lines = ["## Served (gpu profile)", "",
             f"{e['requests']} requests, {e['users']} users, scenario {data['scenario']}: p50 {e.get('p50_ms', 0):.1f} "
             f"ms, p99 {e.get('p99_ms', 0):.1f} ms, {e.get('throughput_rps', 0):.1f} requests/s, {e['errors']} errors.",
             ""]
    rows = [[m["model"], m["requests"], m["executions"], f"{m['avg_batch']:.2f}", f"{m['queue_ms']:.2f}",
             f"{m['compute_ms']:.2f}"] for m in data["members"]]
    return lines + _table(["member", "requests", "executions", "achieved batch", "queue ms", "compute ms"], rows)


def render_markdown(report: dict) -> str:
    """The report as a Markdown page."""
    lines = [f"# GPU check, {report['created_utc']}", "",
             "Written by `make gpu-check` (`fusionrank gpu-check`); the same figures are in gpu-check.json.", ""]
    lines += _node(report)
    steps = [[s["name"], s["status"], s["seconds"], s["reason"]] for s in report["steps"]]
    lines += ["## Steps", ""] + _table(["step", "status", "seconds", "reason"], steps)
    by_name = {s["name"]: s for s in report["steps"] if s["status"] != "skipped" and s["data"]}
    if "onnxruntime-cuda" in by_name and "accuracy" in by_name["onnxruntime-cuda"]["data"]:
        lines += _accuracy_and_latency("ONNX Runtime CUDA (FP32, TF32 off)", by_name["onnxruntime-cuda"]["data"])
    if "tensorrt-build" in by_name:
        lines += _build(by_name["tensorrt-build"]["data"])
    if "tensorrt-parity-latency" in by_name and "accuracy" in by_name["tensorrt-parity-latency"]["data"]:
        lines += _accuracy_and_latency("TensorRT engines", by_name["tensorrt-parity-latency"]["data"])
    if "serve-gpu-profile" in by_name:
        lines += _serve(by_name["serve-gpu-profile"]["data"])
    return "\n".join(lines).rstrip() + "\n"
