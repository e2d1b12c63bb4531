"""The route callers use (`serving.route`, BLS) against the plain reference ensemble, on one server, side by side.

    fusionrank bench routes --spec tests/specs/ci.yaml --repository /tmp/repo --candidates 16 --users 8

Starts a CPU server with both routes loaded (or uses `--url`), sends the same requests (N catalogue candidates each,
C closed-loop callers) to each route in turn, `--rounds` times, and prints per route and round: candidates/s,
p50/p99 latency, errors, then where the time went per model (Triton metrics of that run). Ends by itself.
"""

from __future__ import annotations

import argparse
import sys
import threading

import numpy as np

from benchmarks import server_metrics as triton_metrics
from benchmarks._args import repository_of, spec_of
from benchmarks.lib import closed_loop as drive_closed_loop
from benchmarks.lib import percentiles
from fusionrank.contract.spec import PipelineSpec, ServingProfile, member_models
from fusionrank.contract.tensors import CLICK_PROBABILITY, infer_inputs, request_arrays
from fusionrank.model.synthetic_data import load_benchmark
from fusionrank.server.launcher import TritonServer


def build_requests(spec: PipelineSpec, count: int, candidates: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` requests of `candidates` random catalogue items each, with a benchmark user's history."""
    bench = load_benchmark(spec)
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        ids = rng.integers(1, bench.num_items + 1, candidates)
        session = int(rng.integers(0, len(bench.sessions.history)))
        items = {m: [bench.item(int(i)).payload(m) for i in ids] for m in spec.modalities.enabled}
        history = np.repeat(bench.sessions.history[session][None], candidates, axis=0).astype(np.int64)
        requests.append(request_arrays(items, history))
    return requests


def closed_loop(url: str, model: str, requests: list[dict[str, np.ndarray]], users: int) -> dict:
    """Every request once, `users` callers each sending its next request when the previous one returns (the
    measurement core's driver)."""
    import tritonclient.grpc as grpcclient

    pending, lock = iter(requests), threading.Lock()
    clients = [grpcclient.InferenceServerClient(url) for _ in range(users)]

    def prepare(_k: int):
        with lock:
            return infer_inputs(grpcclient, next(pending))

    def make_call(k: int):
        def call(inputs) -> None:
            if clients[k].infer(model, inputs, client_timeout=120).as_numpy(CLICK_PROBABILITY) is None:
                raise ValueError("no click_probability")
        return call

    try:
        result = drive_closed_loop(make_call, users, requests=len(requests), prepare=prepare)
    finally:
        for client in clients:
            client.close()
    rows = sum(len(r["user_history"]) for r in requests)
    ok = result.ok_latencies_s
    est = percentiles(ok * 1000 if len(ok) else [0.0], (0.5, 0.99))
    return {"model": model, "requests": len(requests), "errors": result.errors, "wall_s": result.wall_s,
            "candidates_per_s": rows * len(ok) / len(requests) / result.wall_s, "p50_ms": est["p50"].value,
            "p99_ms": est["p99"].value, "p99_supported": est["p99"].supported, "first_error": result.first_error}


def compare(spec: PipelineSpec, url: str, metrics_url: str | None, requests: list, users: int, rounds: int,
            out=sys.stdout) -> list[dict]:
    """Warm both routes, then measure each in turn for `rounds` rounds; prints and returns the results."""
    routes = (spec.serving.route, spec.serving.reference_ensemble)
    for model in routes:
        closed_loop(url, model, requests[:users], users)
    results = []
    for round_ in range(1, rounds + 1):
        for model in routes:
            before = triton_metrics.scrape(metrics_url) if metrics_url else None
            result = {"round": round_, **closed_loop(url, model, requests, users)}
            if before is not None:
                after = triton_metrics.settled_scrape(metrics_url, before, model, len(requests) - result["errors"])
                result["members"] = triton_metrics.breakdown(before, after, [model, *member_models(spec)])
            results.append(result)
            out.write(f"round {round_} {model:<14} {result['candidates_per_s']:7.1f} candidates/s  "
                      f"p50 {result['p50_ms']:7.1f} ms  p99 {result['p99_ms']:7.1f} ms  errors {result['errors']}"
                      f"{'  first: ' + result['first_error'] if result['first_error'] else ''}\n")
            if "members" in result:
                out.write(triton_metrics.format_table([m for m in result["members"] if m.requests]) + "\n\n")
            out.flush()
    return results


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="gRPC endpoint of a running server with both routes loaded "
                                                    "(default: start the local CPU server for the run)")
    parser.add_argument("--metrics-url", default=None, help="its Triton metrics URL (with --url)")
    parser.add_argument("--candidates", type=int, default=16, help="candidates per request")
    parser.add_argument("--users", type=int, default=8, help="concurrent closed-loop callers")
    parser.add_argument("--requests", type=int, default=120, help="requests per route and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (each measures both routes, route first)")


def main(args: argparse.Namespace) -> int:
    spec = spec_of(args)
    requests = build_requests(spec, args.requests, args.candidates)
    print(f"{args.requests} requests x {args.candidates} candidates, {args.users} callers, {args.rounds} rounds")
    if args.url:
        results = compare(spec, args.url, args.metrics_url, requests, args.users, args.rounds)
    else:
        with TritonServer.for_spec(spec, repository_of(args), ServingProfile.CPU, log_name="tritonserver-compare",
                                   reference_ensemble=True) as server:
            results = compare(spec, server.grpc_url, server.metrics_url, requests, args.users, args.rounds)
    return 1 if any(r["errors"] for r in results) else 0
