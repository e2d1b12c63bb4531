"""`fusionrank bench serve`: the pipeline's ways of serving, one after the other, in one run on one machine.

On one candidate stream (`fusionrank.request.scenario.RequestFactory`: N candidates per request, item popularity a Zipf
law over the benchmark catalogue, a share of never-seen items made by renewing catalogue payloads' bytes, so they miss
every cache yet decode as the catalogue's), it measures
1. the in-process pipeline (`benchmarks.inprocess`: preprocessing + ONNX Runtime, one caller), one request
   per call and at the encoders' largest batch;
2. the served plain ensemble (`serving.reference_ensemble`), C closed-loop callers;
3. the served route cold: every candidate never seen (each one a cache miss: what the route serves against the
   in-process roof);
4. `embed-catalogue` into the shared tier (a local redis-server; without one, an untimed pass of the stream), then
   the route warm on the stream.
Each served phase is measured after an untimed warm-up of its own callers (`SERVED_WARMUP_S`): a fresh route's gate
admits one request to decode at a time and adds a slot every few served requests (`fusionrank.route.shedding`), a
ramp the steady state the phase reports does not include (as `bench roof` and `tune` measure after a warm-up window).
Per phase: candidates/s, p50/p95/p99 per call, errors, the batch each member achieved and the route's cache share
(Triton metrics scraped before and after), and the machine's load average. Everything it starts it stops; every
phase is bounded in time, so it ends by itself. Reporting (table, JSON, PNG, goals): `benchmarks.serve`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import server_metrics as triton_metrics
from benchmarks.inprocess import InProcessPipeline, run_inprocess
from benchmarks.inprocess_roof import run_roof
from benchmarks.latency import LatencyStats, summarize
from benchmarks.lib import CALLER_TIMEOUT_S
from benchmarks.lib import closed_loop as drive_closed_loop
from benchmarks.lib.memory import CpuShare, cpu_by_label, process_tree
from benchmarks.lib.memory import describe as describe_memory
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.names import PREPROCESS
from fusionrank.contract.spec import PipelineSpec, ServingProfile, member_models
from fusionrank.contract.tensors import CLICK_PROBABILITY, deadline_arguments, infer_inputs
from fusionrank.model.synthetic_data import load_benchmark
from fusionrank.request.scenario import RequestFactory, Scenario
from fusionrank.server.launcher import TritonServer
from fusionrank.server.local_redis import LocalRedis
from fusionrank.triton.render import rendered_files

SERVED_WARMUP_S = 5.0  # untimed, before each served phase (at most a quarter of its seconds)
ROLES = ("inprocess_request", "inprocess_batch", "ensemble", "route_cold", "route_warm", "inprocess_roof")
CALLERS = "callers"  # the benchmark's own process in a served phase's CPU shares: its closed-loop callers


class BenchError(FusionRankError):
    """A bench setting is out of range, or a phase could not run."""


@dataclass(frozen=True)
class BenchConfig:
    """What `fusionrank bench serve` runs (its flags)."""

    candidates: int = 16  # per request
    callers: int = 8  # concurrent closed-loop callers of the served phases
    zipf_exponent: float = 1.1
    novel_share: float = 0.05  # share of never-seen candidates
    seconds: float = 30.0  # per served phase
    inprocess_seconds: float = 15.0  # per in-process phase
    shared_tier: bool = True  # a local redis-server as the route's shared tier, warmed by embed-catalogue
    seed: int = 0

    def __post_init__(self):
        checks = {"candidates": self.candidates >= 1, "callers": self.callers >= 1,
                  "zipf_exponent": self.zipf_exponent > 0, "novel_share": 0 <= self.novel_share <= 1,
                  "seconds": self.seconds > 0, "inprocess_seconds": self.inprocess_seconds > 0}
        for name, ok in checks.items():
            if not ok:
                raise BenchError(f"--{name.replace('_', '-')} {getattr(self, name)} is out of range")

    def scenario(self) -> Scenario:
        return Scenario(name="bench", users=self.callers, candidates={self.candidates: 1.0},
                        zipf_exponent=self.zipf_exponent, novel_share=self.novel_share, source="fusionrank bench")


@dataclass
class Phase:
    """One measured way of serving."""

    name: str
    role: str  # one of ROLES
    latency: LatencyStats | None  # per call; throughput = candidates/s
    requests: int
    errors: int = 0
    first_error: str | None = None
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after
    members: list[triton_metrics.MemberStats] = field(default_factory=list)
    cache: triton_metrics.CacheShare | None = None
    novel_share: float = 0.0  # measured share of never-seen candidates
    note: str = ""
    memory: list = field(default_factory=list)  # served phases: benchmarks.lib.memory.ProcessMemory at its end
    cpu: CpuShare | None = None  # served phases: CPU per process over the timed run

    @property
    def candidates_per_s(self) -> float:
        return self.latency.throughput if self.latency else 0.0

    def as_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "candidates_per_s": round(self.candidates_per_s, 2),
                "latency_ms": self.latency.as_dict() if self.latency else None, "requests": self.requests,
                "errors": self.errors, "first_error": self.first_error, "load_average": list(self.load),
                "novel_share": round(self.novel_share, 4), "note": self.note,
                "members": [m.as_dict() for m in self.members],
                "memory": [m.as_dict() for m in self.memory],
                "cpu": self.cpu.as_dict(self.requests - self.errors) if self.cpu else None,
                "cache": self.cache.as_dict() if self.cache else None}


@dataclass
class BenchResult:
    config: BenchConfig
    spec_source: str
    phases: list[Phase]
    cores: int
    embed_seconds: float | None = None  # embed-catalogue of the whole catalogue into the shared tier
    idle_memory: list = field(default_factory=list)  # the server's processes once ready, before any phase


def _factories(spec: PipelineSpec, bench, config: BenchConfig, phase: int, count: int,
               novel_share: float | None = None) -> list[RequestFactory]:
    """One request factory per caller, seeded apart (never-seen items stay never-seen across callers and phases);
    `novel_share` in place of the stream's (1.0: every candidate never seen)."""
    scenario = config.scenario()
    if novel_share is not None:
        scenario = dataclasses.replace(scenario, novel_share=novel_share)
    return [RequestFactory(spec, bench, scenario, seed=config.seed * 10_000 + phase * 100 + caller, renew_novel=True)
            for caller in range(count)]


def _novel(factories: list[RequestFactory]) -> float:
    """The measured share of never-seen candidates the factories made (every request has the same size)."""
    made = sum(f.requests for f in factories) * factories[0].scenario.max_candidates
    return sum(f.novel_candidates for f in factories) / max(1, made)


def inprocess_phases(spec: PipelineSpec, repo: Path, bench, config: BenchConfig) -> list[Phase]:
    """The in-process pipeline at the request's batch and at the encoders' largest batch."""
    pipeline = InProcessPipeline(spec, repo)
    phases = []
    try:
        for index, rows in enumerate((None, pipeline.max_batch)):
            (factory,) = _factories(spec, bench, config, phase=index, count=1)
            load = os.getloadavg()[0]
            latencies, candidates = run_inprocess(pipeline, factory.next, config.inprocess_seconds, rows)
            name = f"in-process ONNX Runtime, batch {rows or config.candidates}"
            phases.append(Phase(name, ROLES[index], summarize(latencies, sum(latencies), candidates), factory.requests,
                                load=(load, os.getloadavg()[0]), novel_share=_novel([factory]),
                                note=f"1 caller; {len(latencies)} calls of {candidates / len(latencies):.0f} "
                                     "candidates; latency per call"))
    finally:
        pipeline.close()
    (factory,) = _factories(spec, bench, config, phase=5, count=1)
    load = os.getloadavg()[0]
    roof = run_roof(spec, repo, factory.scenario, config.inprocess_seconds, seed=config.seed)
    stats = summarize(roof.latencies, roof.candidates / roof.candidates_per_s if roof.candidates_per_s else 1.0,
                      roof.candidates)
    phases.append(Phase(f"in-process roof, {roof.workers} pipelines, batch {config.candidates}", "inprocess_roof",
                        stats, len(roof.latencies), load=(load, os.getloadavg()[0]),
                        note=f"{roof.workers} processes, one per core, 1 ONNX Runtime thread each; candidates/s "
                             f"summed; {roof.cpu_ms_per_candidate:.1f} CPU ms per candidate"))
    return phases


def closed_loop(url: str, model: str, factories: list[RequestFactory], seconds: float,
                timeout_s: float = CALLER_TIMEOUT_S) -> tuple[list[float], int, list[str], float]:
    """One caller per factory, each sending its next request when the previous one returns, until `seconds` have
    passed (the measurement core's driver; building a request stays off the clock). Returns the latency of each
    answered call, the candidates they scored, the errors and the wall time. Each request carries its caller's
    deadline (`timeout_s`), as the fusionrank client sends it."""
    import tritonclient.grpc as grpcclient

    clients = [grpcclient.InferenceServerClient(url) for _ in factories]

    def prepare(k: int):
        request = factories[k].next()
        return len(request), infer_inputs(grpcclient, request.arrays())

    def make_call(k: int):
        def call(payload) -> int:
            candidates, inputs = payload
            answer = clients[k].infer(model, inputs, client_timeout=timeout_s, **deadline_arguments(timeout_s))
            if answer.as_numpy(CLICK_PROBABILITY) is None:
                raise BenchError("no click_probability")
            return candidates
        return call

    try:
        result = drive_closed_loop(make_call, len(factories), duration_s=seconds, prepare=prepare)
    finally:
        for client in clients:
            client.close()
    ok = [s for s in result.samples if s.ok]
    return ([s.latency_s for s in ok], sum(s.value for s in ok), [s.error for s in result.samples if not s.ok],
            result.wall_s)


def served_phase(name: str, role: str, server: TritonServer, model: str, factories: list[RequestFactory],
                 seconds: float, members: tuple[str, ...], cache_model: str | None = None) -> Phase:
    """`model` under the factories' callers for `seconds` after an untimed warm-up of theirs, with the Triton
    metrics of the phase."""
    closed_loop(server.grpc_url, model, factories, min(SERVED_WARMUP_S, seconds / 4))
    load = os.getloadavg()[0]
    before = triton_metrics.scrape(server.metrics_url)
    # This process and its children: the callers, the server's processes and the cache's redis-servers.
    cpu_before = cpu_by_label(os.getpid(), CALLERS)
    latencies, candidates, errors, wall = closed_loop(server.grpc_url, model, factories, seconds)
    cpu = CpuShare.between(cpu_before, cpu_by_label(os.getpid(), CALLERS), wall, os.cpu_count() or 1)
    after = triton_metrics.settled_scrape(server.metrics_url, before, model, len(latencies))
    stats = summarize(latencies, wall, candidates) if latencies else None
    return Phase(name, role, stats, len(latencies) + len(errors), len(errors), errors[0] if errors else None,
                 (load, os.getloadavg()[0]),
                 triton_metrics.breakdown(before, after, [model, *members]),
                 triton_metrics.cache_share(before, after, cache_model) if cache_model else None,
                 _novel(factories),
                 f"{len(factories)} closed-loop callers", process_tree(server.process.pid), cpu)


@contextlib.contextmanager
def serving_repository(spec: PipelineSpec, repo: Path, redis_url: str | None) -> Iterator[tuple[PipelineSpec, Path]]:
    """The repository to serve and its spec: `repo` itself without a shared tier; with one, a temporary copy made of
    links to `repo`'s models and the route rendered again with `serving.cache.redis_url` set."""
    if redis_url is None:
        yield spec, repo
        return
    cache = dataclasses.replace(spec.serving.cache, redis_url=redis_url)
    variant = dataclasses.replace(spec, serving=dataclasses.replace(spec.serving, cache=cache))
    route = spec.serving.route
    with tempfile.TemporaryDirectory(prefix="fusionrank-bench-repo-") as folder:
        overlay = Path(folder)
        for child in Path(repo).resolve().iterdir():
            if child.name != route:
                (overlay / child.name).symlink_to(child)
        for f in rendered_files(variant):
            if f.path.startswith(f"{route}/"):
                (overlay / f.path).parent.mkdir(parents=True, exist_ok=True)
                (overlay / f.path).write_bytes(f.content)
        yield variant, overlay


def served_phases(spec: PipelineSpec, repo: Path, bench, config: BenchConfig, result: BenchResult, out) -> None:
    """The plain ensemble, the cached route cold, embed-catalogue, the cached route warm; appended to `result`."""
    from fusionrank.route.warming import benchmark_items, embed_catalogue

    members = tuple(m for m in member_models(spec) if m != PREPROCESS)
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(LocalRedis()) if config.shared_tier else None
        served_spec, served_repo = stack.enter_context(serving_repository(spec, repo, redis.url if redis else None))
        server = stack.enter_context(TritonServer.for_spec(served_spec, served_repo, ServingProfile.CPU,
                                                           log_name="tritonserver-bench", reference_ensemble=True))
        result.idle_memory = process_tree(server.process.pid)
        out.write(f"Triton ready (route, members, reference ensemble); shared tier: "
                  f"{redis.url if redis else 'none'}; idle: {describe_memory(result.idle_memory)}\n")
        plan = [(f"served plain ensemble ({spec.serving.reference_ensemble})", "ensemble",
                 spec.serving.reference_ensemble, (PREPROCESS, *members), None, None),
                (f"served route, never-seen items ({spec.serving.route})", "route_cold", spec.serving.route, members,
                 spec.serving.route, 1.0)]
        for index, (name, role, model, breakdown, cache_model, novel) in enumerate(plan, start=2):
            factories = _factories(spec, bench, config, index, config.callers, novel)
            result.phases.append(served_phase(name, role, server, model, factories, config.seconds, breakdown,
                                              cache_model))
            out.write(f"  {name}: {result.phases[-1].candidates_per_s:.1f} candidates/s\n")
        if redis is not None:
            started = time.perf_counter()
            report = embed_catalogue(served_spec, served_repo, server.grpc_url, redis.url, ServingProfile.CPU,
                                     benchmark_items(bench))
            result.embed_seconds = time.perf_counter() - started
            out.write(f"  {report.summary()}\n")
        else:  # the catalogue reaches the route's own caches through the stream itself, untimed
            closed_loop(server.grpc_url, spec.serving.route, _factories(spec, bench, config, 3, config.callers),
                        config.seconds)
        name = f"served cached route, warm ({spec.serving.route})"
        result.phases.append(served_phase(name, "route_warm", server, spec.serving.route,
                                          _factories(spec, bench, config, 4, config.callers), config.seconds,
                                          members, spec.serving.route))
        result.phases[-1].note += ("; after embed-catalogue" if redis
                                   else "; after an untimed pass of the stream (no shared tier)")
        out.write(f"  {name}: {result.phases[-1].candidates_per_s:.1f} candidates/s\n")


def run_bench(spec: PipelineSpec, repo: Path, config: BenchConfig, out) -> BenchResult:
    """Every phase in turn; returns the measurements (`benchmarks.serve` prints and saves them)."""
    bench = load_benchmark(spec)
    result = BenchResult(config, spec.source, [], os.cpu_count() or 0)
    out.write(f"fusionrank bench serve: {config.candidates} candidates per request, {config.callers} callers, Zipf "
              f"{config.zipf_exponent:g} over {bench.num_items} items, {100 * config.novel_share:g}% never-seen\n")
    result.phases += inprocess_phases(spec, Path(repo), bench, config)
    for phase in result.phases:
        out.write(f"  {phase.name}: {phase.candidates_per_s:.1f} candidates/s\n")
    served_phases(spec, Path(repo), bench, config, result, out)
    return result
