"""`fusionrank demo`: the main job on the embedded default spec, end to end on CPU.

data -> train -> evaluate (every fusion vs single-modality baselines, oracle beside) -> export with parity ->
serve the CPU profile -> rank one request over gRPC, then the same user's candidates as a real catalogue has
them (some without audio, one title only, a video item as its clip) -> 30-second load test gated on the SLOs -> stop.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from export.convert.torch2onnx import export_all
from fusionrank.contract.spec import PipelineSpec, ServingProfile
from fusionrank.model.evaluate import evaluate_all
from fusionrank.model.synthetic_data import load_benchmark
from fusionrank.model.train import checkpoint_path, train_ranker
from fusionrank.server.launcher import TritonServer
from fusionrank.triton.render import render_repository
from fusionrank_cli.rank_command import rank_benchmark_request
from loadtest.runner import run_loadtest


def _banner(out, title: str) -> None:
    out.write(f"\n=== {title} {'=' * max(0, 100 - len(title))}\n")
    out.flush()


def demo_gate(verdict) -> tuple[bool, str]:
    """The demo's verdict on its 30-s load test: every SLO the run has the samples to judge. Its callers send about
    1 request a second, 30 in all; a p95 needs 72 successful requests and a p99 368 (`benchmarks.lib.stats`), so
    those are reported as unsupported, not failed: `fusionrank loadtest` gates them on a longer run."""
    judged = [c for c in verdict.checks if c.supported]
    unjudged = [c.name for c in verdict.checks if not c.supported]
    passed = bool(judged) and all(c.passed for c in judged)
    line = (f"demo gate: {'PASS' if passed else 'FAIL'} on the SLOs a 30-s run supports "
            f"({', '.join(c.name for c in judged) or 'none'})")
    if unjudged:
        line += (f"; {', '.join(unjudged)}: too few requests for a verdict (the load test's own FAIL above), "
                 "`fusionrank loadtest --serve --run-time 10m` gates them")
    return passed, line


def run_demo(spec: PipelineSpec, repo: Path, skip_loadtest: bool = False, out=sys.stdout) -> int:
    """Run every stage; returns non-zero when a gate (evaluation, parity, SLO) fails."""
    started = time.monotonic()
    _banner(out, "1. benchmark data")
    out.write(load_benchmark(spec).summary() + "\n")

    _banner(out, f"2. train the {spec.ranker.fusion.value} ranker and the single-modality baselines; evaluate")
    # The demo trains the spec's fusion and the baselines; `fusionrank evaluate` runs all six fusions.
    report = evaluate_all(spec, fusions=[spec.ranker.fusion.value])
    out.write(report.table() + "\n")
    status = 0 if report.fused_beats_baselines() else 1
    if status:
        out.write("GATE: a fused model does not beat every single-modality baseline (see table)\n")
    checkpoint = checkpoint_path(spec, spec.ranker.fusion.value)
    if not checkpoint.is_file():
        checkpoint = train_ranker(spec)

    _banner(out, "3. export to ONNX with parity (ONNX Runtime vs PyTorch)")
    render_repository(spec, repo)
    parity = export_all(spec, repo, checkpoint=checkpoint)
    out.write(parity.table() + "\n")

    _banner(out, "4. serve the CPU profile and rank one request over gRPC")
    with TritonServer.for_spec(spec, repo, ServingProfile.CPU, log_name="tritonserver-demo") as server:
        out.write(f"Triton ready: gRPC {server.grpc_url}, metrics {server.metrics_url}, log {server.log_file}\n")
        out.write(rank_benchmark_request(spec, server.grpc_url, user=0, candidates=10) + "\n\n")
        # A catalogue as it comes: candidates without audio, one with its title only, a video item as its clip.
        out.write(rank_benchmark_request(spec, server.grpc_url, user=0, candidates=10, ragged=True) + "\n")
        if not skip_loadtest:
            _banner(out, "5. 30-second load test of the default scenario, gated on the SLOs")
            verdict = run_loadtest(spec, url=server.grpc_url, run_time="30s", metrics_url=server.metrics_url)
            out.write(verdict.render() + "\n")
            passed, line = demo_gate(verdict)
            out.write(line + "\n")
            status = status or (0 if passed else 1)
    _banner(out, f"done in {time.monotonic() - started:.0f}s, exit status {status}")
    return status
