"""`fusionrank bench cpu`: FP32 vs optimised FP32 vs INT8 on this node, per model and served, with the accuracy
gates, in one run (issue 13). Library pieces: `benchmarks.cpu_models` (per model, kernels), `export.verify.cpu_gates`
(accuracy, written by `fusionrank export` to cpu_parity.json), `benchmarks.cpu_served` (end to end)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import onnxruntime

from benchmarks._args import repository_of, spec_of
from benchmarks.cpu_models import BATCH_SIZES, compare_models, gemm_probe, kernel_profile, model_variants, speed_table
from benchmarks.cpu_served import compare_served, default_variants, goal_line, members_table, served_table
from export.verify.cpu_gates import REPORT_FILE
from export.verify.golden import load_golden
from fusionrank.contract.errors import DataError
from fusionrank.contract.spec import PipelineSpec

CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


def node_facts() -> dict:
    """Processor, cores and the vector/matrix features ONNX Runtime's INT8 kernels depend on (from /proc/cpuinfo)."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    return {"processor": model, "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
            "features": {f: f in flags for f in CPU_FEATURES}, "load_average": list(os.getloadavg())}


def _kernels(spec: PipelineSpec, repo: Path, variants: dict[str, dict[str, Path]]) -> dict:
    result = {}
    for model, files in variants.items():
        inputs = load_golden(repo, model).inputs
        result[model] = {v: [k.as_dict() for k in kernel_profile(files[v], inputs)] for v in ("opt", "int8")}
    return result


def _kernel_lines(kernels: dict) -> list[str]:
    lines = ["| model | graph | top kernels (share of node time, batch 16) |", "|---|---|---|"]
    for model, by_variant in kernels.items():
        for variant, shares in by_variant.items():
            cells = ", ".join(f"{k['op_type']} {100 * k['share']:.0f}%" for k in shares[:4])
            lines.append(f"| {model} | {variant} | {cells} |")
    return lines


def _accuracy(repo: Path) -> dict:
    path = Path(repo) / REPORT_FILE
    if not path.is_file():
        raise DataError(f"{path} not found; run `fusionrank export` (it gates the CPU profile and writes it)")
    return json.loads(path.read_text())


def _markdown(report: dict, accuracy_table: str) -> str:
    node, probe = report["node"], report["gemm_probe"]
    gemm = " x ".join(str(d) for d in probe["shape"])
    features = ", ".join(f for f, on in node["features"].items() if on) or "none of " + ", ".join(CPU_FEATURES)
    lines = [f"# CPU profile: FP32 vs optimised FP32 vs INT8 ({report['created_utc']})", "",
             f"Node: {node['processor']}, {node['cores']} cores, ONNX Runtime {node['onnxruntime']}; "
             f"features: {features}; load average (1 min) at start {node['load_average'][0]:.1f}, at the end "
             f"{report['load_average_end'][0]:.1f} (other work on the machine slows every variant alike).", "",
             f"INT8 vs FP32 on this processor, one [{gemm}] MatMul, one thread: FP32 {probe['fp32_gops']} GOPS, "
             f"INT8 {probe['int8_gops']} GOPS ({probe['int8_speedup']}x).", "",
             "## Per model (one intra-op thread, rows/s, best of interleaved rounds)", "", report["models_table"], "",
             "## Kernels ONNX Runtime runs", "", *_kernel_lines(report["kernels"]), "",
             "## Accuracy of the served chain (cpu_parity.json, gates of `fusionrank export`)", "", accuracy_table]
    if report.get("served"):
        lines += ["", "## Served end to end (CPU profile, median of interleaved rounds)", "", report["served_table"],
                  "", report["served_goal"], "", "Where the time goes (Triton metrics, ms per request):", "",
                  report["members_table"]]
    return "\n".join(lines) + "\n"


def _accuracy_table(acc: dict) -> str:
    lines = ["| model | served file | metric | value | limit | gate |", "|---|---|---|---|---|---|"]
    for g in acc["gates"]:
        limit = g["limit"].replace("|", "\\|")  # markdown: |reference| inside a cell
        lines.append(f"| {g['model']} | {acc['files'].get(g['model'], '')} | {g['metric']} | {g['value']:.4g} | "
                     f"{limit} | {'ok' if g['passed'] else 'FAIL'} |")
    auc = acc["test_auc"]
    lines.append(f"\nTest-split AUC ({auc['test_rows']} rows): FP32 reference chain {auc['fp32_reference']:.4f}, "
                 f"served CPU chain {auc['cpu_chain']:.4f}.")
    return "\n".join(lines)


def run_cpu_report(spec: PipelineSpec, repo: Path, out_dir: Path, rounds: int = 3, requests: int = 30,
                   users: int = 4, batch_sizes: tuple[int, ...] = BATCH_SIZES, served: bool = True,
                   threads: tuple[int, ...] = (), scenario: str | None = None, progress=None) -> dict:
    """Measure everything side by side and write `report.json` + `report.md` into `out_dir`; returns the report."""
    say = progress or (lambda msg: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    accuracy = _accuracy(repo)
    report: dict = {"created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "spec_digest": spec.digest(), "node": node_facts(), "accuracy": accuracy}
    say("INT8 vs FP32 matrix multiply on this processor")
    report["gemm_probe"] = gemm_probe()
    with tempfile.TemporaryDirectory(prefix="cpu-report-") as tmp:
        say("building or finding every model's fp32 / opt / int8 graphs")
        variants = model_variants(spec, repo, Path(tmp))
        speeds = compare_models(spec, repo, variants, batch_sizes, rounds, progress=say)
        report["models"] = [s.as_dict() for s in speeds]
        report["models_table"] = speed_table(speeds)
        say("per-node profiles")
        report["kernels"] = _kernels(spec, repo, variants)
        if served:  # inside: the served variants link graphs built in the scratch folder
            graphs = {m: {p.name: p for p in files.values()} for m, files in variants.items()}
            results = compare_served(spec, repo, default_variants(spec, threads), rounds, requests, users, scenario,
                                     log_dir=out_dir, progress=say, graphs=graphs)
            report["served"] = [r.as_dict() for r in results]
            report["served_table"], report["members_table"] = served_table(results), members_table(results)
            report["served_goal"] = goal_line(spec, results)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["load_average_end"] = list(os.getloadavg())
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(_markdown(report, _accuracy_table(accuracy)))
    return report


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="reports/cpu-int8", help="report folder")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement")
    parser.add_argument("--requests", type=int, default=30, help="served: requests per variant and round")
    parser.add_argument("--users", type=int, default=4, help="served: closed-loop callers")
    parser.add_argument("--batch-sizes", default="1,16,64", help="per model: batch sizes")
    parser.add_argument("--threads", default=None, help="served: also the spec's choice at these intra-op threads, "
                                                        "e.g. 2")
    parser.add_argument("--scenario", default=None, help="served: load-test scenario name or file (default: default)")
    parser.add_argument("--skip-served", action="store_true", help="per-model figures and accuracy only")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    report = run_cpu_report(spec_of(args), repository_of(args), out, rounds=args.rounds, requests=args.requests,
                            users=args.users, batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
                            served=not args.skip_served,
                            threads=tuple(int(t) for t in args.threads.split(",")) if args.threads else (),
                            scenario=args.scenario, progress=lambda msg: print(f"... {msg}", flush=True))
    print((out / "report.md").read_text())
    print(f"wrote {out / 'report.md'} and report.json ({report['seconds']} s)")
    return 0
