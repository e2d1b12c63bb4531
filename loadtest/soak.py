"""Soak test: steady load for a set time, then the memory of every Triton process at the start and the end; the run
fails when a process grew beyond a bound, a process died or appeared, or a request failed.

    fusionrank soak --serve --minutes 10
    fusionrank soak --url host:8001 --pid <tritonserver pid> --minutes 60

Memory is read with psutil for tritonserver and each of its Python-backend stubs (one per model instance, named by
the model from the stub's command line): RSS, and PSS, which splits pages shared between processes (the stubs map
the same libraries and shared-memory regions), so the PSS column adds up to what the group costs. The start is
taken after a warm-up (the first requests size allocator arenas, ONNX Runtime's buffers and the tokenizers'
caches), the end after the load stops. Callers are threads of one `RankingClient` without retries, sending the
scenario's requests back to back; the command ends by itself (warm-up + run + one request timeout at most).

The bound, 64 MiB per process by default (`--max-growth-mb`): after warm-up the processes should hold steady, and
the noise measured here (docs/loadtest.md#soak) stays well under it, while a leak of a request's payload (tens to
hundreds of KiB per request, e.g. a shared-memory region or a response kept alive) crosses it within a few thousand
requests. The route's stubs may grow by their item-embedding cache's size (`serving.cache.lru_bytes`) on top: the
cache fills as new items arrive and is bounded by it.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.lib import closed_loop, percentiles
from clients import NO_RETRY, RankingClient
from clients.errors import ClientError
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.spec import PipelineSpec, ServingProfile
from fusionrank.model.synthetic_data import load_benchmark
from fusionrank.request.scenario import RequestFactory, Scenario, load_scenario
from fusionrank.server.launcher import TritonServer

MAX_GROWTH_MB = 64.0
MIB = 1024 * 1024


class SoakError(FusionRankError):
    """The soak test could not run (no server process to measure, endpoint not ready)."""


@dataclass(frozen=True)
class Memory:
    """One process's memory at one moment, in MiB."""

    name: str
    rss: float
    pss: float


@dataclass
class Load:
    """What the callers did: request latencies and the failures, with their first messages."""

    latencies_ms: list[float] = field(default_factory=list)
    failures: int = 0
    messages: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, latency_ms: float, error: Exception | str | None) -> None:
        with self.lock:
            if error is None:
                self.latencies_ms.append(latency_ms)
            else:
                self.failures += 1
                if len(self.messages) < 3:
                    self.messages.append(error if isinstance(error, str) else f"{type(error).__name__}: {error}")


@dataclass
class SoakResult:
    start: dict[int, Memory]
    end: dict[int, Memory]
    load: Load
    seconds: float
    max_growth_mb: float
    # MiB a process may grow beyond the bound, by name: the route's item-embedding cache fills up to its size.
    allowance_mb: dict[str, float] = field(default_factory=dict)

    def growth(self, pid: int) -> float:
        """PSS growth of one process from start to end, in MiB."""
        return self.end[pid].pss - self.start[pid].pss

    def bound(self, pid: int) -> float:
        """How much one process may grow, in MiB."""
        return self.max_growth_mb + self.allowance_mb.get(self.start[pid].name, 0.0)

    @property
    def problems(self) -> list[str]:
        """Why the soak failed (empty: it passed)."""
        out = [f"{self.start[p].name} (pid {p}) ended during the run" for p in self.start if p not in self.end]
        out += [f"{self.end[p].name} (pid {p}) appeared during the run" for p in self.end if p not in self.start]
        out += [f"{self.start[p].name} (pid {p}) grew {self.growth(p):+.1f} MiB (PSS), bound {self.bound(p):g}"
                for p in self.start if p in self.end and self.growth(p) > self.bound(p)]
        if self.load.failures:
            out.append(f"{self.load.failures} request(s) failed, e.g. {self.load.messages[0]}")
        if not self.load.latencies_ms:
            out.append("no request succeeded")
        return out

    def render(self) -> str:
        """The memory table and the verdict, as a person reads them."""
        head = f"{'process':<26} {'pid':>7} {'RSS start':>10} {'RSS end':>9} {'PSS start':>10} {'PSS end':>9} " \
               f"{'PSS growth':>11}"
        lines = [head, "-" * len(head)]
        for pid in sorted(set(self.start) | set(self.end)):
            s, e = self.start.get(pid), self.end.get(pid)
            growth = f"{e.pss - s.pss:+.1f}" if s and e else "-"
            lines.append(f"{(s or e).name:<26} {pid:>7} {_mib(s, 'rss'):>10} {_mib(e, 'rss'):>9} "
                         f"{_mib(s, 'pss'):>10} {_mib(e, 'pss'):>9} {growth:>11}")
        rss_start, rss_end, pss_start, pss_end = (sum(getattr(m, k) for m in snap.values())
                                                  for k in ("rss", "pss") for snap in (self.start, self.end))
        lines.append(f"{'total (MiB)':<26} {'':>7} {rss_start:>10.1f} {rss_end:>9.1f} {pss_start:>10.1f} "
                     f"{pss_end:>9.1f} {pss_end - pss_start:>+11.1f}")
        served = len(self.load.latencies_ms)
        if served:
            est = percentiles(self.load.latencies_ms, (0.5, 0.99))
            lat = f"{est['p50'].describe()}, {est['p99'].describe()}"
        else:
            lat = "no latency"
        lines.append(f"{served} requests served in {self.seconds:.0f}s ({served / max(self.seconds, 1e-9):.2f} "
                     f"req/s; {lat}), {self.load.failures} failed")
        problems = self.problems
        lines += [f"FAIL: {p}" for p in problems]
        extra = "".join(f", {name} +{mb:g} MiB (its cache)" for name, mb in self.allowance_mb.items() if mb)
        lines.append(f"soak verdict: {'FAIL' if problems else 'PASS'} (bound {self.max_growth_mb:g} MiB PSS growth "
                     f"per process{extra})")
        return "\n".join(lines)


def _mib(mem: Memory | None, attr: str) -> str:
    return f"{getattr(mem, attr):.1f}" if mem else "-"


def _name(proc) -> str:
    """tritonserver, or `stub <model>` from a Python-backend stub's first argument (<repo>/<model>/<v>/model.py)."""
    cmd = proc.cmdline()
    if "python_backend_stub" in proc.name() and len(cmd) > 1:
        return f"stub {Path(cmd[1]).parent.parent.name}"
    return proc.name()


def memory(server_pid: int) -> dict[int, Memory]:
    """RSS and PSS (MiB) of the server and every process below it, by pid."""
    # psutil comes with the loadtest extra; imported here so the command line (which lists `soak`) still imports in
    # the serving image, which has only the serve extra.
    import psutil

    try:
        root = psutil.Process(server_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for proc in procs:
        try:
            info = proc.memory_full_info()
            out[proc.pid] = Memory(_name(proc), info.rss / MIB, getattr(info, "pss", info.rss) / MIB)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return out


def _drive(spec: PipelineSpec, client: RankingClient, scenario: Scenario, users: int, seconds: float,
           load: Load) -> None:
    """`users` callers sending back to back for `seconds` (the measurement core's closed loop; each finishes its
    request in flight), recorded into `load`."""
    bench = load_benchmark(spec)
    factories = [RequestFactory(spec, bench, scenario, seed=k) for k in range(users)]

    def make_call(_k: int):
        def call(request) -> None:
            client.rank_payloads(request.items, request.history, videos=request.videos)
        return call

    result = closed_loop(make_call, users, duration_s=seconds, prepare=lambda k: factories[k].next())
    for sample in result.samples:
        load.record(sample.latency_s * 1000.0, None if sample.ok else sample.error)


def run_soak(spec: PipelineSpec, url: str, server_pid: int, seconds: float, users: int | None = None,
             scenario: str | Path | Scenario | None = None, warmup_s: float | None = None,
             max_growth_mb: float = MAX_GROWTH_MB) -> SoakResult:
    """Warm up, measure memory, load `url` for `seconds`, measure again."""
    scen = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    users = users or scen.users
    warmup_s = min(30.0, max(5.0, 0.1 * seconds)) if warmup_s is None else warmup_s
    if not memory(server_pid):
        raise SoakError(f"no process {server_pid} on this host: the soak measures the server's own processes")
    with RankingClient(spec, url, timeout=scen.timeout_s, retry=NO_RETRY) as client:
        try:
            client.wait_ready(60)
        except ClientError as exc:
            raise SoakError(f"endpoint {url} not ready: {exc}") from exc
        _drive(spec, client, scen, users, warmup_s, Load())
        start = memory(server_pid)
        load = Load()
        began = time.monotonic()
        _drive(spec, client, scen, users, seconds, load)
        elapsed = time.monotonic() - began
    cache_mb = {f"stub {spec.serving.route}": spec.serving.cache.lru_bytes / MIB}
    return SoakResult(start, memory(server_pid), load, elapsed, max_growth_mb, cache_mb)


def run_soak_command(spec: PipelineSpec, minutes: float, url: str | None = None, pid: int | None = None,
                     serve_repository: Path | None = None, users: int | None = None, scenario: str | None = None,
                     max_growth_mb: float = MAX_GROWTH_MB, out=None) -> int:
    """`soak`: against `url` + `pid`, or a CPU server started on `serve_repository`; print the table; exit 1 on a
    failed soak."""
    out = out or sys.stdout
    seconds = minutes * 60.0
    if serve_repository is not None:
        with TritonServer.for_spec(spec, serve_repository, ServingProfile.CPU, log_name="tritonserver-soak") as srv:
            out.write(f"Triton ready: gRPC {srv.grpc_url}, pid {srv.process.pid}; soaking for {seconds:.0f}s\n")
            out.flush()
            result = run_soak(spec, srv.grpc_url, srv.process.pid, seconds, users, scenario,
                              max_growth_mb=max_growth_mb)
    else:
        if not url or pid is None:
            raise SoakError("pass --serve, or --url HOST:PORT with --pid of that tritonserver (on this host)")
        result = run_soak(spec, url, pid, seconds, users, scenario, max_growth_mb=max_growth_mb)
    out.write(result.render() + "\n")
    return 1 if result.problems else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fusionrank soak`."""
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the measured load runs (default 10)")
    parser.add_argument("--serve", action="store_true", help="start the local server (CPU profile) for the run")
    parser.add_argument("--url", default=None, help="gRPC endpoint of a running server (with --pid)")
    parser.add_argument("--pid", type=int, default=None, help="pid of that tritonserver, on this host")
    parser.add_argument("--users", type=int, default=None, help="concurrent callers (default: the scenario's)")
    parser.add_argument("--scenario", default=None, help="scenario name or YAML (default: default)")
    parser.add_argument("--max-growth-mb", type=float, default=MAX_GROWTH_MB,
                        help=f"fail when a process's PSS grows more than this (MiB, default {MAX_GROWTH_MB:g})")
