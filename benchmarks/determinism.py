"""`fusionrank bench determinism`: one request's scores in every situation a production caller meets (issue 19).

Against one real Triton server (CPU profile, the spec's graphs, the server-wide cache `TritonServer` starts), the
same request of N benchmark candidates is scored:
- alone, cold (every row encoded, nothing else running): the reference;
- replayed from the cache (every row a hit, several sends, so every route instance answers);
- cold from several callers at once (each route instance may encode it, concurrently);
- cold amid other callers' traffic (never-seen items, so its rows share encoder batches with other requests');
- through the reference ensemble `rank_ensemble` (no cache, the request padded to one text bucket), alone and amid
  traffic.
It prints, per situation, the largest |score - reference| and the candidate pairs whose order differs, and the
spread over all of them; `determinism.json` keeps the scores. The goal: spread <= 1e-6.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks._args import repository_of, spec_of
from fusionrank.contract.errors import FusionRankError

GOAL = 1e-6
REPLAYS = 9
CALLERS = 3


@dataclass
class DeterminismReport:
    """Scores of one request per situation (each a list of sends), against the first send alone."""

    candidates: int
    scores: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @property
    def reference(self) -> np.ndarray:
        return self.scores["route alone, cold"][0]

    def diff(self, situation: str) -> float:
        return max(float(np.abs(s - self.reference).max()) for s in self.scores[situation])

    def swapped(self, situation: str) -> int:
        """The most candidate pairs any send of `situation` orders differently from the reference."""
        ref = np.sign(self.reference[:, None] - self.reference[None, :])
        return max(int((np.sign(s[:, None] - s[None, :]) != ref).sum() // 2) for s in self.scores[situation])

    @property
    def spread(self) -> float:
        return max(self.diff(s) for s in self.scores)

    def table(self) -> str:
        lines = ["| situation | sends | max abs diff vs alone | swapped pairs |", "|---|---:|---:|---:|"]
        lines += [f"| {s} | {len(v)} | {self.diff(s):.3g} | {self.swapped(s)} |" for s, v in self.scores.items()]
        verdict = "met" if self.spread <= GOAL else "MISSED"
        lo, hi = float(self.reference.min()), float(self.reference.max())
        lines.append(f"\nSpread over every situation: {self.spread:.3g} (goal <= {GOAL:g}: {verdict}); "
                     f"{self.candidates} candidates, scores {lo:.3f} to {hi:.3f}.")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"candidates": self.candidates, "spread": self.spread, "goal": GOAL,
                "situations": {s: {"max_abs_diff": self.diff(s), "swapped_pairs": self.swapped(s),
                                   "scores": [v.tolist() for v in sends]} for s, sends in self.scores.items()}}


def benchmark_request(spec, bench, candidates: int, nonce: int | None = None, start: int = 0):
    """(items {modality: payloads}, history [N, H]) of `candidates` items from consecutive benchmark sessions;
    never-seen variants of them (valid, missing every cache) with a `nonce`."""
    from fusionrank.request.scenario import novel_payload

    ids: list[int] = []
    session = start
    while len(ids) < candidates:
        ids += [int(i) for i in bench.sessions.candidates[session % len(bench.sessions.candidates)]]
        session += 1
    ids = ids[:candidates]
    items = {m: [bench.item(i).payload(m) for i in ids] for m in spec.modalities.enabled}
    if nonce is not None:
        items = {m: [novel_payload(m, p, nonce * 1000 + r) for r, p in enumerate(rows)] for m, rows in items.items()}
    history = np.repeat(bench.sessions.history[start][None], len(ids), axis=0).astype(np.int64)
    return items, history


class _Caller:
    """Scores of (items, history) from one model of the server."""

    def __init__(self, url: str, timeout_s: float = 300.0):
        import tritonclient.grpc as grpcclient

        self.grpc, self.url, self.timeout_s = grpcclient, url, timeout_s

    def __call__(self, model: str, request) -> np.ndarray:
        """The scores; a refusal because the server is over capacity (the neighbours' traffic) is retried with the
        fusionrank client's backoff, as a production caller would, until `timeout_s` has passed."""
        import random
        import time

        from tritonclient.utils import InferenceServerException

        from clients import RetryPolicy
        from fusionrank.contract.tensors import CLICK_PROBABILITY, infer_inputs, request_arrays

        policy, rng, deadline = RetryPolicy(), random.Random(0), time.monotonic() + self.timeout_s
        with self.grpc.InferenceServerClient(self.url) as client:
            for attempt in itertools.count(1):
                try:
                    result = client.infer(model, infer_inputs(self.grpc, request_arrays(*request)),
                                          client_timeout=max(1.0, deadline - time.monotonic()))
                    return result.as_numpy(CLICK_PROBABILITY)[:, 0].astype(np.float64)
                except InferenceServerException as exc:
                    if str(exc.status()) != "StatusCode.UNAVAILABLE" or time.monotonic() >= deadline:
                        raise
                    time.sleep(policy.backoff(min(attempt, 8), rng))


def _amid_traffic(send: Callable[[], np.ndarray], neighbour: Callable[[int], None], flush: Callable[[], None],
                  sends: int, callers: int) -> list[np.ndarray]:
    """`sends` cold sends (cache flushed before each) while `callers` threads send never-seen neighbours."""
    stop = threading.Event()

    def loop(caller: int) -> None:
        nonce = caller
        while not stop.is_set():
            neighbour(nonce)
            nonce += callers

    with ThreadPoolExecutor(callers) as pool:
        loops = [pool.submit(loop, c) for c in range(callers)]
        try:
            results = []
            for _ in range(sends):
                flush()
                results.append(send())
        finally:
            stop.set()
        for f in loops:
            f.result()
    return results


def measure_determinism(spec, url: str, route: str, ensemble: str, flush: Callable[[], None], bench,
                        candidates: int = 16, callers: int = CALLERS, replays: int = REPLAYS) -> DeterminismReport:
    """Score one request of `candidates` benchmark items in every situation (module docstring) on the server at
    `url`; `flush` empties the server's embedding cache."""
    call = _Caller(url)
    request = benchmark_request(spec, bench, candidates)

    def neighbour(nonce: int) -> None:
        call(route, benchmark_request(spec, bench, candidates, 1 + nonce, start=1 + nonce))

    report = DeterminismReport(candidates)
    flush()
    report.scores["route alone, cold"] = [call(route, request)]
    report.scores["route replayed from the cache"] = [call(route, request) for _ in range(replays)]
    flush()
    with ThreadPoolExecutor(callers) as pool:
        report.scores["route, several callers at once, cold"] = list(pool.map(lambda _: call(route, request),
                                                                               range(callers)))
    report.scores["route amid other callers' traffic, cold"] = _amid_traffic(
        lambda: call(route, request), neighbour, flush, sends=3, callers=callers)
    report.scores[f"{ensemble} alone"] = [call(ensemble, request)]
    report.scores[f"{ensemble} amid other callers' traffic"] = _amid_traffic(
        lambda: call(ensemble, request), neighbour, lambda: None, sends=2, callers=callers)
    return report


def run_determinism(spec, repo: Path, out_dir: Path | None = None, candidates: int = 16, callers: int = CALLERS,
                    replays: int = REPLAYS) -> DeterminismReport:
    """Start a server for `spec` on `repo` (CPU profile, route + reference ensemble, server-wide cache), measure,
    print the table, write `determinism.json` under `out_dir`; everything started is stopped."""
    from fusionrank.contract.spec import ServingProfile
    from fusionrank.model.synthetic_data import load_benchmark
    from fusionrank.server.launcher import TritonServer

    with TritonServer.for_spec(spec, repo, ServingProfile.CPU, log_name="tritonserver-determinism",
                               reference_ensemble=True) as server:
        if server.local_cache is None:
            raise FusionRankError("serving.cache.lru_bytes is 0: the determinism bench needs the server-wide cache")
        cache = server.local_cache.client()
        try:
            report = measure_determinism(spec, server.grpc_url, spec.serving.route, spec.serving.reference_ensemble,
                                         cache.flushall, load_benchmark(spec), candidates, callers, replays)
        finally:
            cache.close()
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "determinism.json").write_text(json.dumps(report.as_dict(), indent=2))
    return report


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidates", type=int, default=16, help="candidates in the request scored everywhere")
    parser.add_argument("--callers", type=int, default=CALLERS,
                        help="callers sending at once, and neighbours' threads amid traffic")
    parser.add_argument("--replays", type=int, default=REPLAYS,
                        help="cached replays of the request (spread over the route instances)")
    parser.add_argument("--gate", action="store_true", help="exit 1 when the spread is above the goal")
    parser.add_argument("--out", default=None, help="folder for determinism.json (none: not written)")


def main(args: argparse.Namespace) -> int:
    """`fusionrank bench determinism`: 0 when the spread meets the goal (or without --gate)."""
    spec, repo = spec_of(args), repository_of(args)
    report = run_determinism(spec, repo, Path(args.out) if args.out else None, candidates=args.candidates,
                             callers=args.callers, replays=args.replays)
    print(f"## One request's scores in every situation (spec {spec.source}, repository {repo})\n")
    print(report.table())
    return 1 if args.gate and report.spread > GOAL else 0
