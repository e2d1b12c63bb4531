"""`fusionrank bench memory`: resident memory of a served CPU pipeline, idle and under a stream of never-seen
items, per process (tritonserver and each Python backend stub), beside the stream's throughput.

The server is started on the spec's repository (the route and its members), left idle for `--settle` seconds and
read; then `--callers` closed-loop callers send `--candidates`-candidate requests of never-seen items (every
candidate a cache miss: the route encodes everything and its cache fills) for `--seconds`, the process tree read
every second; the peak and the last reading are reported with the cache's configured bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

MIB = 1 << 20


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the never-seen stream (s)")
    parser.add_argument("--settle", type=float, default=5.0, help="idle seconds after readiness before reading")
    parser.add_argument("--callers", type=int, default=8, help="closed-loop callers")
    parser.add_argument("--candidates", type=int, default=16, help="candidates per request")
    parser.add_argument("--out", default=None, help="write the readings to this JSON file")


def _sampler(pid: int, stop: threading.Event, readings: list) -> None:
    from benchmarks.lib.memory import process_tree

    while not stop.wait(1.0):
        readings.append(process_tree(pid))


def measure(spec, repo: Path, seconds: float, settle: float, callers: int, candidates: int, out=sys.stdout) -> dict:
    """Idle, peak and final RSS of the served pipeline's processes and the stream's throughput."""
    from benchmarks.lib import describe_machine, load_average
    from benchmarks.lib.memory import describe, process_tree, total_rss
    from benchmarks.served import ServedLoad, Stream
    from fusionrank.contract.spec import ServingProfile
    from fusionrank.model.synthetic_data import load_benchmark
    from fusionrank.server.launcher import TritonServer

    bench = load_benchmark(spec)
    with TritonServer.for_spec(spec, repo, ServingProfile.CPU, log_name="tritonserver-memory") as server:
        time.sleep(settle)
        idle = process_tree(server.process.pid)
        out.write(f"idle: {describe(idle)}\n")
        load = ServedLoad(spec, bench, server.grpc_url, spec.serving.route,
                          Stream(candidates=candidates, callers=callers, novel_share=1.0))
        stop, readings = threading.Event(), []
        sampler = threading.Thread(target=_sampler, args=(server.process.pid, stop, readings), daemon=True)
        sampler.start()
        try:
            result = load.window(seconds)
        finally:
            stop.set()
            sampler.join()
            load.close()
        final = process_tree(server.process.pid)
    peak = max(readings or [final], key=total_rss)
    out.write(f"peak under load: {describe(peak)}\nend of stream: {describe(final)}\n")
    out.write(f"stream: {result.throughput * candidates:.1f} candidates/s, {result.errors} errors, "
              f"load average {load_average()}; {describe_machine()}\n")
    return {"idle": [p.as_dict() for p in idle], "peak": [p.as_dict() for p in peak],
            "final": [p.as_dict() for p in final], "idle_total_mib": total_rss(idle) / MIB,
            "peak_total_mib": total_rss(peak) / MIB, "final_total_mib": total_rss(final) / MIB,
            "cache_lru_bytes_per_route_instance": spec.serving.cache.lru_bytes,
            "candidates_per_s": result.throughput * candidates, "errors": result.errors,
            "load_average": load_average()}


def main(args: argparse.Namespace, out=sys.stdout) -> int:
    """Run `measure` for the CLI and write the JSON when asked."""
    from benchmarks._args import repository_of, spec_of

    spec, repo = spec_of(args), repository_of(args)
    report = measure(spec, repo, args.seconds, args.settle, args.callers, args.candidates)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0
