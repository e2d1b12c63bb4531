"""`fusionrank bench roof`: the cold route against the in-process roof, side by side in one run.

The roof (`benchmarks.inprocess_roof`: one in-process pipeline per core, the served graphs, no server) is measured
before and after the route, and their mean taken, so a change of the machine's load during the run shows. The route is
served on the spec's repository and loaded by closed-loop callers of never-seen items (every candidate a cache
miss). Both are given as candidates/s (wall) and as CPU milliseconds per candidate (all their processes and
threads): on a machine other work shares, the CPU figure still compares the work each does per candidate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase (s)")
    parser.add_argument("--callers", type=int, default=8, help="closed-loop callers of the route")
    parser.add_argument("--candidates", type=int, default=16, help="candidates per request")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")


def _route(spec, repo: Path, bench, seconds: float, callers: int, candidates: int) -> dict:
    from benchmarks.lib import percentile
    from benchmarks.lib.memory import cpu_seconds
    from benchmarks.served import ServedLoad, Stream
    from fusionrank.contract.spec import ServingProfile
    from fusionrank.server.launcher import TritonServer

    with TritonServer.for_spec(spec, repo, ServingProfile.CPU, log_name="tritonserver-roof") as server:
        load = ServedLoad(spec, bench, server.grpc_url, spec.serving.route,
                          Stream(candidates=candidates, callers=callers, novel_share=1.0))
        try:
            load.window(min(5.0, seconds))  # warm-up window: first calls, allocators
            cpu = cpu_seconds(server.process.pid)
            result = load.window(seconds)
            cpu = cpu_seconds(server.process.pid) - cpu
        finally:
            load.close()
    scored = len(result.ok_latencies_s) * candidates
    p99 = percentile(result.ok_latencies_s * 1000.0, 0.99)
    return {"candidates_per_s": scored / result.wall_s, "cpu_ms_per_candidate": 1000.0 * cpu / max(scored, 1),
            "p99": p99.describe(), "errors": result.errors}


def main(args: argparse.Namespace, out=sys.stdout) -> int:
    """Roof, route, roof; the ratios of the route to the roof's mean."""
    from benchmarks._args import repository_of, spec_of

    spec, repo = spec_of(args), repository_of(args)
    from benchmarks.inprocess_roof import run_roof
    from benchmarks.lib import describe_machine, load_average
    from benchmarks.served import Stream
    from fusionrank.model.synthetic_data import load_benchmark

    bench = load_benchmark(spec)
    scenario = Stream(candidates=args.candidates, novel_share=1.0).scenario()
    figures: dict = {"machine": describe_machine(), "load_before": load_average()}
    roofs = []
    for index, phase in enumerate(("roof", "route", "roof")):
        if phase == "roof":
            roof = run_roof(spec, repo, scenario, args.seconds, seed=index)
            roofs.append({"candidates_per_s": roof.candidates_per_s, "cpu_ms_per_candidate": roof.cpu_ms_per_candidate,
                          "workers": roof.workers})
            out.write(f"  roof ({roof.workers} pipelines): {roof.candidates_per_s:.1f} candidates/s, "
                      f"{roof.cpu_ms_per_candidate:.1f} CPU ms per candidate (load {load_average()})\n")
        else:
            figures["route"] = _route(spec, repo, bench, args.seconds, args.callers, args.candidates)
            r = figures["route"]
            out.write(f"  cold route: {r['candidates_per_s']:.1f} candidates/s, {r['cpu_ms_per_candidate']:.1f} CPU "
                      f"ms per candidate, {r['p99']}, {r['errors']} errors (load {load_average()})\n")
    figures["roof"] = roofs
    roof_rate = sum(r["candidates_per_s"] for r in roofs) / len(roofs)
    roof_cpu = sum(r["cpu_ms_per_candidate"] for r in roofs) / len(roofs)
    route = figures["route"]
    figures["ratio_throughput"] = route["candidates_per_s"] / roof_rate
    figures["ratio_cpu_efficiency"] = roof_cpu / route["cpu_ms_per_candidate"]
    figures["load_after"] = load_average()
    out.write(f"cold route / roof: {figures['ratio_throughput']:.2f}x candidates/s, "
              f"{figures['ratio_cpu_efficiency']:.2f}x CPU efficiency (roof CPU ms / route CPU ms per candidate); "
              f"{figures['machine']}; load {figures['load_before']} -> {figures['load_after']}\n")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0 if not route["errors"] else 1


