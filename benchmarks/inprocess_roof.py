"""The in-process roof of `fusionrank bench`: one in-process pipeline (`benchmarks.inprocess`, one ONNX Runtime
thread per session) per core, each in its own process, all started together behind a barrier, each calling with
one request at a time for the same number of seconds. The sum of their candidates/s is what the served graphs can
do on these cores with no server, no BLS, no copies between processes: the roof the served route is measured
against."""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fusionrank.contract.spec import PipelineSpec


def _worker(spec: PipelineSpec, repo: str, scenario, seed: int, seconds: float, barrier, results) -> None:
    from benchmarks.inprocess import InProcessPipeline, run_inprocess
    from fusionrank.model.synthetic_data import load_benchmark
    from fusionrank.request.scenario import RequestFactory

    factory = RequestFactory(spec, load_benchmark(spec), scenario, seed=seed, renew_novel=True)
    pipeline = InProcessPipeline(spec, Path(repo), intra_op_threads=1)
    try:
        pipeline.rank([factory.next()])  # sessions allocate on their first call
        barrier.wait()
        started, cpu = time.perf_counter(), time.process_time()
        latencies, candidates = run_inprocess(pipeline, factory.next, seconds)
        results.put((latencies, candidates, time.perf_counter() - started, time.process_time() - cpu))
    except Exception as exc:  # reported by the parent, which would otherwise wait for a result forever
        results.put(exc)
    finally:
        pipeline.close()


@dataclass(frozen=True)
class RoofResult:
    """Every worker's call latencies, the candidates they scored, their summed candidates/s, the worker count and
    the CPU seconds they used (all threads) while measured."""

    latencies: list[float]
    candidates: int
    candidates_per_s: float
    workers: int
    cpu_s: float

    @property
    def cpu_ms_per_candidate(self) -> float:
        return 1000.0 * self.cpu_s / max(self.candidates, 1)


def run_roof(spec: PipelineSpec, repo: Path, scenario, seconds: float, workers: int | None = None,
             seed: int = 0) -> RoofResult:
    """The roof: one pipeline per core (or `workers`), measured together for `seconds`."""
    workers = workers or os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads and sessions
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(spec, str(repo), scenario, seed * 1000 + 900 + k, seconds, barrier,
                                               results), daemon=True) for k in range(workers)]
    for proc in procs:
        proc.start()
    try:
        got = [results.get(timeout=seconds + 300) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    failed = [g for g in got if isinstance(g, Exception)]
    if failed:
        raise failed[0]
    return RoofResult([x for g in got for x in g[0]], sum(g[1] for g in got), sum(g[1] / g[2] for g in got), workers,
                      sum(g[3] for g in got))
