"""`fusionrank bench traffic`: the served route past its capacity (issue 19), on one server, in one run.

Cases, each printed with its sample counts, the CPU's INT8 features and the load average:
1. capacity: `--base-callers` closed-loop callers of never-seen items (every candidate misses the cache), no
   deadline: answered requests/s (the unloaded goodput);
2. overload: 1x/2x/4x/8x that many callers, each request with a `--deadline` (the Triton request timeout and the
   gRPC deadline): goodput = requests answered within their deadline per second, against case 1;
3. open-loop backlog: Poisson arrivals at 2x the measured capacity for `--backlog-seconds`: refusals (UNAVAILABLE)
   and their latency, admitted requests' latency, then one request right after the burst;
4. a cached caller (one request whose candidates are all in the cache) alone, then beside `--flood-callers`
   callers of distinct 16-MP PNGs (as many per request as the cost budget admits): its p99 against its quiet p50.
Production traffic (no priority set: the server's default level), driven by the measurement core
(`benchmarks.lib.driver`). Every phase is bounded in time; the server it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.lib import CALLER_TIMEOUT_S, RequestSets

CPU_FEATURES = ("avx512_vnni", "avx512f", "amx_int8", "avx_vnni", "avx2")


def status_of(error: Exception) -> str:
    """A failed call's kind: its gRPC status (`StatusCode.UNAVAILABLE`), else the error's type."""
    return str(error.status()) if callable(getattr(error, "status", None)) else type(error).__name__


def refusal(status: str | None) -> bool:
    """The server refused the call as over capacity (UNAVAILABLE or RESOURCE_EXHAUSTED): a caller backs off."""
    return status in ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED")


@dataclass
class Outcomes:
    """Latency (s) of each call of one driver run by outcome: answered, refused (`refusal`), other errors."""

    answered: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    failed: list[float] = field(default_factory=list)
    first_refusal: str | None = None
    first_error: str | None = None
    wall_s: float = 0.0
    dropped: int = 0  # open loop: arrivals the driver could not send (every worker busy)
    late: int = 0  # open loop: arrivals sent more than 10 ms after their time

    @classmethod
    def of(cls, result) -> Outcomes:
        """The outcomes of a `benchmarks.lib.LoadResult` whose failures `status_of` classified."""
        out = cls(wall_s=result.wall_s, dropped=result.dropped, late=result.late)
        for sample in result.samples:
            if sample.ok:
                out.answered.append(sample.latency_s)
                continue
            refused = refusal(sample.status)
            (out.refused if refused else out.failed).append(sample.latency_s)
            text = f"{sample.status}: {(sample.error or '')[:160]}"
            if refused and out.first_refusal is None:
                out.first_refusal = text
            elif not refused and out.first_error is None:
                out.first_error = text
        return out

    def within(self, deadline_s: float) -> int:
        return sum(1 for t in self.answered if t <= deadline_s)


def percentiles(values: list[float]) -> str:
    """p50/p95/p99 in ms with the sample count (percentiles of fewer than 20 samples are marked)."""
    if not values:
        return "n=0"
    p50, p95, p99 = (1000 * float(np.percentile(values, q)) for q in (50, 95, 99))
    few = " (few samples)" if len(values) < 20 else ""
    return f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms, n={len(values)}{few}"


def machine() -> str:
    """CPU model, the INT8-relevant flags (present or not) and the 1/5/15-min load average."""
    from benchmarks.lib.machine import cpu_info, load_average

    info = cpu_info()
    shown = " ".join(f"{f}{'+' if f in info['flags'] else '-'}" for f in CPU_FEATURES)
    load = " ".join(f"{x:.2f}" for x in load_average())
    return f"{info['model']}, {os.cpu_count()} cores, {shown}; load average {load}"


# --- callers -------------------------------------------------------------------------------------------------------


def _sender(client, model: str, deadline_s: float | None, timeout_s: float) -> Callable[[list], object]:
    """One ranking call of prepared inputs as the fusionrank client makes it: the deadline is the gRPC deadline, the
    Triton request timeout and the absolute DEADLINE_PARAMETER (so a server past capacity refuses the request
    instead of serving it late); without one, the gRPC deadline is `timeout_s`."""
    from fusionrank.contract.tensors import deadline_arguments

    def call(inputs: list):
        extra = {} if deadline_s is None else deadline_arguments(deadline_s)  # as the client sends it
        return client.infer(model, inputs, client_timeout=deadline_s or timeout_s, **extra)

    return call


def closed_loop(url: str, model: str, next_arrays: list[Callable[[], dict]], seconds: float | None,
                deadline_s: float | None, requests: int | None = None) -> Outcomes:
    """One caller per `next_arrays` on the measurement core (`benchmarks.lib.closed_loop`), each sending its next
    request (built off the clock) when the previous one returns, for `seconds` (or `requests` in all). A refused
    caller backs off as the fusionrank client does before its retry (`clients.RetryPolicy`: exponential, jittered),
    off the clock, so refusals do not turn into a loop that only loads the machine both share."""
    import random

    import tritonclient.grpc as grpcclient

    from benchmarks.lib import closed_loop as drive
    from clients import RetryPolicy
    from fusionrank.contract.tensors import infer_inputs

    users, policy = len(next_arrays), RetryPolicy()
    refusals, rngs = [0] * users, [random.Random(k) for k in range(users)]

    def pause(k: int, sample) -> float:
        refusals[k] = refusals[k] + 1 if refusal(sample.status) else 0
        return policy.backoff(refusals[k], rngs[k]) if refusals[k] else 0.0

    clients = [grpcclient.InferenceServerClient(url) for _ in range(users)]
    try:
        return Outcomes.of(drive(lambda k: _sender(clients[k], model, deadline_s, 120.0), users, requests=requests,
                                 duration_s=seconds, prepare=lambda k: infer_inputs(grpcclient, next_arrays[k]()),
                                 classify=status_of, pause=pause))
    finally:
        for client in clients:
            client.close()


def open_loop(url: str, model: str, make: Callable[[], dict], rate: float, seconds: float, seed: int,
              timeout_s: float = 30.0) -> Outcomes:
    """Poisson arrivals at `rate` per second for `seconds` on the measurement core (`benchmarks.lib.open_loop`), each
    request built before its time, sent without waiting for the others and timed from its scheduled arrival; returns
    when every sent request has been answered or timed out (`timeout_s`). It has a worker for every arrival it can
    draw, so none is dropped for want of one."""
    import tritonclient.grpc as grpcclient

    from benchmarks.lib import open_loop as drive
    from benchmarks.lib import workers_for
    from fusionrank.contract.tensors import infer_inputs

    with grpcclient.InferenceServerClient(url) as client:  # thread-safe for unary calls
        return Outcomes.of(drive(_sender(client, model, None, timeout_s), rate, seconds, seed=seed,
                                 max_outstanding=workers_for(rate, seconds),
                                 prepare=lambda _i: infer_inputs(grpcclient, make()), classify=status_of))


# --- the run -------------------------------------------------------------------------------------------------------


WARMUP_S = 4.0  # cold requests sent before the capacity is measured


@dataclass(frozen=True)
class TrafficConfig:
    candidates: int = 16
    base_callers: int = 4  # closed-loop callers that saturate the server (1x)
    multiples: tuple[int, ...] = (1, 2, 4, 8)
    deadline_s: float = 1.0
    seconds: float = 20.0  # per capacity/overload level
    backlog_seconds: float = 15.0
    flood_callers: int = 3
    flood_side: int = 4000
    cached_seconds: float = 15.0  # per cached-caller phase (quiet, flooded)
    seed: int = 0


def _say(out, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def run_traffic(spec, repo: Path, config: TrafficConfig, out) -> dict:
    """Every case against one server for `spec` on `repo` (CPU profile); prints and returns the figures."""
    from fusionrank.contract.spec import ServingProfile
    from fusionrank.model.synthetic_data import load_benchmark
    from fusionrank.server.launcher import TritonServer

    sets = RequestSets(spec, load_benchmark(spec), config.candidates, config.seed)
    model, figures = spec.serving.route, {"machine_before": machine()}
    _say(out, f"bench-traffic on {figures['machine_before']}")
    with TritonServer.for_spec(spec, repo, ServingProfile.CPU, log_name="tritonserver-traffic") as server:
        url = server.grpc_url
        figures["overload"] = _overload(url, model, sets, config, out)
        capacity = figures["overload"]["capacity_rps"]
        figures["backlog"] = _backlog(url, model, sets, config, capacity, out)
        figures["cached_beside_flood"] = _cached_beside_flood(url, model, sets, spec, config, out)
    figures["machine_after"] = machine()
    _say(out, f"done on {figures['machine_after']}")
    return figures


def _capacity(url, model, sets: RequestSets, config: TrafficConfig, phase: int, out, when: str) -> tuple[float, int]:
    # The callers that will wait (here, the warm-up, the floods and the cached caller) send the deadline the
    # benchmarks' callers hold: without one, the route would refuse part of this phase's own load.
    base = closed_loop(url, model, sets.cold(config.base_callers, phase), config.seconds, CALLER_TIMEOUT_S)
    capacity = len(base.answered) / base.wall_s
    _say(out, f"capacity {when}: {config.base_callers} callers, {CALLER_TIMEOUT_S:g}-s deadline: {capacity:.2f} req/s "
              f"answered ({percentiles(base.answered)}; errors {len(base.refused) + len(base.failed)})")
    return capacity, len(base.answered)


def _overload(url, model, sets: RequestSets, config: TrafficConfig, out) -> dict:
    # Not counted: the first requests of a fresh server pay ONNX Runtime's first runs and an empty estimate.
    closed_loop(url, model, sets.cold(config.base_callers, 99), WARMUP_S, CALLER_TIMEOUT_S)
    before, samples = _capacity(url, model, sets, config, 0, out, "before")
    levels = {}
    for i, k in enumerate(config.multiples, start=1):
        run = closed_loop(url, model, sets.cold(k * config.base_callers, i), config.seconds, config.deadline_s)
        levels[k] = {"callers": k * config.base_callers, "goodput_rps": run.within(config.deadline_s) / run.wall_s,
                     "answered": len(run.answered), "refused": len(run.refused), "failed": len(run.failed),
                     "first_error": run.first_error, "load": os.getloadavg()[0]}
        _say(out, f"overload {k}x ({k * config.base_callers} callers, {config.deadline_s:g}-s deadline): goodput "
                  f"{levels[k]['goodput_rps']:.2f} req/s; answered {percentiles(run.answered)}; refused "
                  f"n={len(run.refused)} ({run.first_refusal or 'none'}), other errors n={len(run.failed)} "
                  f"({run.first_error or 'none'}); load {levels[k]['load']:.2f}")
    # Measured again after the levels: a fresh server is still meeting new batch shapes for a while, so the first
    # figure alone can understate what it serves; goodput is set against the larger of the two.
    after, more = _capacity(url, model, sets, config, 9, out, "after")
    capacity = max(before, after)
    for level in levels.values():
        level["share_of_capacity"] = level["goodput_rps"] / capacity if capacity else 0.0
    _say(out, "goodput / capacity (the larger, " + f"{capacity:.2f} req/s): " + ", ".join(
        f"{k}x {100 * level['share_of_capacity']:.0f}%" for k, level in levels.items()))
    return {"capacity_rps": capacity, "capacity_before_rps": before, "capacity_after_rps": after,
            "capacity_samples": samples + more, "levels": levels}


def _backlog(url, model, sets: RequestSets, config: TrafficConfig, capacity: float, out) -> dict:
    (make,) = sets.cold(1, 50)
    rate = 2 * capacity
    run = open_loop(url, model, make, rate, config.backlog_seconds, config.seed)
    after = closed_loop(url, model, sets.cold(1, 51), None, None, requests=1)
    after_ms = 1000 * (after.answered + after.refused + after.failed)[0]
    error = after.first_refusal or after.first_error
    figures = {"rate_rps": rate, "sent": len(run.answered) + len(run.refused) + len(run.failed),
               "refused": len(run.refused), "refusal_p99_ms": 1000 * float(np.percentile(run.refused, 99))
               if run.refused else None, "admitted": len(run.answered), "dropped": run.dropped, "late": run.late,
               "after_burst_ms": after_ms, "after_burst_error": error}
    dropped = f"; {run.dropped} arrivals dropped (no free worker)" if run.dropped else ""
    _say(out, f"open loop at 2x capacity ({rate:.2f} req/s, {config.backlog_seconds:g} s): refusals "
              f"{percentiles(run.refused)} ({run.first_refusal or 'none'}); admitted {percentiles(run.answered)}; "
              f"other errors n={len(run.failed)} ({run.first_error or 'none'}){dropped}; request right after the "
              f"burst: {after_ms:.0f} ms{f' ({error})' if error else ''}")
    return figures


def _cached_beside_flood(url, model, sets: RequestSets, spec, config: TrafficConfig, out) -> dict:
    cached = sets.factory(77, novel=False).next().arrays()
    closed_loop(url, model, [lambda: cached], 1.0, CALLER_TIMEOUT_S)  # into the cache
    quiet = closed_loop(url, model, [lambda: cached], config.cached_seconds, CALLER_TIMEOUT_S)
    budget = spec.serving.admission.cost.max_pixels
    per_request = max(1, min(spec.serving.max_candidates, budget // config.flood_side ** 2 if budget else 64))
    flood_out: list[Outcomes] = []
    flooding = threading.Thread(target=lambda: flood_out.append(closed_loop(
        url, model, sets.flood(config.flood_callers, per_request, config.flood_side), config.cached_seconds + 2,
        CALLER_TIMEOUT_S)))
    flooding.start()
    time.sleep(2.0)  # the floods hold the route first
    beside = closed_loop(url, model, [lambda: cached], config.cached_seconds, CALLER_TIMEOUT_S)
    flooding.join()
    flood = flood_out[0]
    quiet_p50 = float(np.percentile(quiet.answered, 50)) if quiet.answered else float("nan")
    p99 = float(np.percentile(beside.answered, 99)) if beside.answered else float("nan")
    _say(out, f"cached caller quiet: {percentiles(quiet.answered)}; beside {config.flood_callers} callers of "
              f"{per_request} distinct {config.flood_side}x{config.flood_side} PNGs per request: "
              f"{percentiles(beside.answered)} = p99 {p99 / quiet_p50:.1f}x quiet p50; floods answered "
              f"{percentiles(flood.answered)}, refused n={len(flood.refused)}, other errors n={len(flood.failed)} "
              f"({flood.first_error or 'none'})")
    return {"quiet_p50_ms": 1000 * quiet_p50, "quiet_samples": len(quiet.answered), "beside_p99_ms": 1000 * p99,
            "beside_samples": len(beside.answered), "ratio": p99 / quiet_p50, "flood_per_request": per_request,
            "flood_answered": len(flood.answered), "flood_refused": len(flood.refused),
            "flood_failed": len(flood.failed), "flood_first_error": flood.first_error}


# --- command line --------------------------------------------------------------------------------------------------


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `fusionrank bench traffic`."""
    d = TrafficConfig()
    parser.add_argument("--candidates", type=int, default=d.candidates, help="candidates per request")
    parser.add_argument("--base-callers", type=int, default=d.base_callers,
                        help="closed-loop callers that saturate the server (1x)")
    parser.add_argument("--deadline", type=float, default=d.deadline_s, help="per-request deadline (s), overload")
    parser.add_argument("--seconds", type=float, default=d.seconds, help="length of each capacity/overload level")
    parser.add_argument("--backlog-seconds", type=float, default=d.backlog_seconds, help="open-loop burst length")
    parser.add_argument("--flood-callers", type=int, default=d.flood_callers)
    parser.add_argument("--flood-side", type=int, default=d.flood_side, help="flood images are side x side PNGs")
    parser.add_argument("--cached-seconds", type=float, default=d.cached_seconds)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")


def main(args: argparse.Namespace) -> int:
    """Run every case on the spec's repository and print the figures."""
    import json
    import sys

    from benchmarks._args import repository_of, spec_of

    config = TrafficConfig(candidates=args.candidates, base_callers=args.base_callers, deadline_s=args.deadline,
                           seconds=args.seconds, backlog_seconds=args.backlog_seconds,
                           flood_callers=args.flood_callers, flood_side=args.flood_side,
                           cached_seconds=args.cached_seconds, seed=args.seed)
    figures = run_traffic(spec_of(args), repository_of(args), config, sys.stdout)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return 0
