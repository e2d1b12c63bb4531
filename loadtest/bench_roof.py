"""The in-process roof of `fusionrank bench`: one in-process pipeline (`loadtest.bench_inprocess`, one ONNX Runtime
thread per session) per core, each in its own process, all started together behind a barrier, each calling with
one request at a time for the same number of seconds. The sum of their candidates/s is what the served graphs can
do on these cores with no server, no BLS, no copies between processes: the roof the served route is measured
against."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from fusionrank.spec import PipelineSpec


def _worker(spec: PipelineSpec, repo: str, scenario, seed: int, seconds: float, barrier, results) -> None:
    from fusionrank.benchmark import load_benchmark
    from fusionrank.scenario import RequestFactory
    from loadtest.bench_inprocess import InProcessPipeline, run_inprocess

    factory = RequestFactory(spec, load_benchmark(spec), scenario, seed=seed)
    pipeline = InProcessPipeline(spec, Path(repo), intra_op_threads=1)
    try:
        pipeline.rank([factory.next()])  # sessions allocate on their first call
        barrier.wait()
        started = time.perf_counter()
        latencies, candidates = run_inprocess(pipeline, factory.next, seconds)
        results.put((latencies, candidates, time.perf_counter() - started))
    except Exception as exc:  # reported by the parent, which would otherwise wait for a result forever
        results.put(exc)
    finally:
        pipeline.close()


def run_roof(spec: PipelineSpec, repo: Path, scenario, seconds: float, workers: int | None = None,
             seed: int = 0) -> tuple[list[float], int, float, int]:
    """Every worker's call latencies, the candidates they scored, summed candidates/s and the worker count."""
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
    latencies = [x for lat, _, _ in got for x in lat]
    return latencies, sum(c for _, c, _ in got), sum(c / wall for _, c, wall in got), workers
