"""Served side by side: the CPU profile with FP32, optimised FP32 and INT8 graphs, end to end (issue 13).

Each variant is the spec with other `export.cpu` settings (and optionally another intra-op thread count), rendered
into its own scratch repository over the same exported graphs (symlinks), so only the graph each member loads
differs. All servers start first; then bursts of the scenario's requests (the same requests for every variant in a
round) go to each server in turn, round by round, so a busy machine slows every variant alike. Per variant:
candidates/s and p50/p99 per request (median over rounds), the per-member breakdown from Triton's metrics, and the
server's CPU time per candidate: the CPU seconds its process group (tritonserver and every Python-backend stub) used
during the bursts, from /proc. Other work on a shared machine stretches latency but not that cost, so it shows what a
variant saves even where the wall-clock figures are noisy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from benchmarks import server_metrics as triton_metrics
from benchmarks.latency import EnsembleStats, benchmark_ensemble
from export.manifest import version_dir
from fusionrank.contract.names import ENCODERS_AND_RANKER, encoder_name
from fusionrank.contract.spec import (
    CacheSpec,
    Modality,
    PipelineSpec,
    Precision,
    ServingProfile,
    member_models,
    served_models,
)
from fusionrank.model.synthetic_data import load_benchmark
from fusionrank.request.scenario import RequestFactory, load_scenario
from fusionrank.server.launcher import TritonServer
from fusionrank.triton.render import HEADER, load_config, render_repository

INT8_ENCODERS = {encoder_name(m): Precision.INT8 for m in Modality}


@dataclass(frozen=True)
class ServedVariant:
    """One way to serve the CPU profile: which graphs (export.cpu) and how many intra-op threads per session."""

    name: str
    optimize: bool
    precision: dict[str, Precision] = field(default_factory=dict)
    threads: int = 1


def _graphs(variant: ServedVariant) -> tuple[bool, frozenset[str]]:
    return variant.optimize, frozenset(m for m, p in variant.precision.items() if p is Precision.INT8)


def default_variants(spec: PipelineSpec, threads: tuple[int, ...] = ()) -> list[ServedVariant]:
    """FP32 `model.onnx` (the profile before issue 13), optimised FP32, INT8 encoders, the spec's own choice when it
    is none of those, and the spec's choice again at each of `threads` intra-op threads."""
    variants = [ServedVariant("fp32 model.onnx", False), ServedVariant("optimised fp32", True),
                ServedVariant("int8 encoders", True, dict(INT8_ENCODERS))]
    cpu = spec.export.cpu
    mine = ServedVariant("spec (pipeline.yaml)", cpu.optimize, dict(cpu.precision))
    if _graphs(mine) not in {_graphs(v) for v in variants}:
        variants.append(mine)
    variants += [dataclasses.replace(mine, name=f"spec, {t} threads", threads=t) for t in threads if t != 1]
    return variants


def variant_spec(spec: PipelineSpec, variant: ServedVariant) -> PipelineSpec:
    """The spec with the variant's export.cpu settings and the route's item-embedding cache off: the rounds repeat
    the same catalogue items, and a warm cache would answer them without the encoders this comparison is about."""
    cpu = dataclasses.replace(spec.export.cpu, optimize=variant.optimize, precision=dict(variant.precision))
    serving = dataclasses.replace(spec.serving, cache=CacheSpec(lru_bytes=0, redis_url=None))
    return spec.with_overrides(export=dataclasses.replace(spec.export, cpu=cpu), serving=serving)


def prepare_repository(spec: PipelineSpec, variant: ServedVariant, source: Path, target: Path,
                       graphs: dict[str, dict[str, Path]] | None = None) -> Path:
    """Render the variant's repository at `target`, link the exported graphs and tokenizer from `source` (and the
    `graphs` built elsewhere, {model: {file name: path}}, e.g. an INT8 graph the spec does not serve), and set the
    intra-op threads of the ONNX Runtime members."""
    vspec = variant_spec(spec, variant)
    render_repository(vspec, target)
    for model in member_models(vspec):
        files = {p.name: p for p in version_dir(source, model).iterdir()
                 if p.suffix == ".onnx" or p.name == "tokenizer"}
        files.update((graphs or {}).get(model, {}))
        for name, path in files.items():
            link = version_dir(target, model) / name
            link.unlink(missing_ok=True)
            link.symlink_to(Path(path).resolve())
    if variant.threads != 1:
        for model in ENCODERS_AND_RANKER:
            path = target / model / ServingProfile.CPU.config_file
            if path.is_file():
                config = load_config(path)
                config.parameters["intra_op_threads"].string_value = str(variant.threads)
                path.write_text(HEADER + text_format.MessageToString(config))
    return target


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group `pgid` (Linux /proc; NaN elsewhere)."""
    if not os.path.isdir("/proc"):
        return float("nan")
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[2]) == pgid:  # fields after "(comm)": state, ppid, pgrp, ..., utime (12), stime (13)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class ServedResult:
    variant: ServedVariant
    rounds: list[EnsembleStats]
    members: list[triton_metrics.MemberStats]
    cpu_seconds: float = float("nan")  # the server's process group, over every measured burst

    def _median(self, key) -> float:
        values = [key(r) for r in self.rounds if r.latency]
        return statistics.median(values) if values else float("nan")

    @property
    def candidates_per_s(self) -> float:
        return self._median(lambda r: r.latency.throughput * r.candidates_per_request)

    @property
    def p50_ms(self) -> float:
        return self._median(lambda r: r.latency.p50_ms)

    @property
    def p99_ms(self) -> float:
        return self._median(lambda r: r.latency.p99_ms)

    @property
    def cpu_ms_per_candidate(self) -> float:
        candidates = sum(r.latency.samples * r.candidates_per_request for r in self.rounds if r.latency)
        return 1000.0 * self.cpu_seconds / candidates if candidates else float("nan")

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.rounds)

    def as_dict(self) -> dict:
        return {"variant": dataclasses.asdict(self.variant), "candidates_per_s": round(self.candidates_per_s, 2),
                "p50_ms": round(self.p50_ms, 1), "p99_ms": round(self.p99_ms, 1), "errors": self.errors,
                "cpu_seconds": round(self.cpu_seconds, 2), "cpu_ms_per_candidate": round(self.cpu_ms_per_candidate, 2),
                "rounds": [r.as_dict() for r in self.rounds], "members": [m.as_dict() for m in self.members]}


def compare_served(spec: PipelineSpec, repo: Path, variants: list[ServedVariant], rounds: int = 3,
                   requests: int = 30, users: int = 4, scenario: str | Path | None = None,
                   log_dir: Path | None = None, progress=None,
                   graphs: dict[str, dict[str, Path]] | None = None) -> list[ServedResult]:
    """Serve every variant, then interleave request bursts round by round; one result per variant."""
    say = progress or (lambda msg: None)
    sc = load_scenario(scenario)
    bench = load_benchmark(spec)
    with tempfile.TemporaryDirectory(prefix="cpu-served-") as tmp, contextlib.ExitStack() as stack:
        servers = []
        for i, variant in enumerate(variants):
            say(f"starting the server for {variant.name}")
            vspec = variant_spec(spec, variant)
            vrepo = prepare_repository(spec, variant, Path(repo), Path(tmp) / f"v{i}", graphs)
            log_file = log_dir / f"tritonserver-v{i}.log" if log_dir else None
            server = TritonServer.for_spec(vspec, vrepo, ServingProfile.CPU, log_name=f"cpu-served-v{i}",
                                           log_file=log_file)
            servers.append((variant, vspec, stack.enter_context(server)))
        before = {id(s): triton_metrics.scrape(s.metrics_url) for _, _, s in servers}
        stats: dict[int, list[EnsembleStats]] = {id(s): [] for _, _, s in servers}
        cpu = dict.fromkeys(stats, 0.0)
        for r in range(rounds):
            for variant, vspec, server in servers:
                say(f"round {r + 1}/{rounds}: {variant.name}")
                source = RequestFactory(vspec, bench, sc, seed=r, renew_novel=True).next
                # Warm-up requests outside the CPU count (benchmark_ensemble's own warm-up would fall inside it).
                benchmark_ensemble(vspec, server.grpc_url, source, sc.warmup_requests, users, warmup=0,
                                   timeout_s=sc.timeout_s)
                started = group_cpu_seconds(server.process.pid)
                stats[id(server)].append(benchmark_ensemble(vspec, server.grpc_url, source, requests, users,
                                                            warmup=0, timeout_s=sc.timeout_s))
                cpu[id(server)] += group_cpu_seconds(server.process.pid) - started
        return [ServedResult(variant, stats[id(server)],
                             triton_metrics.breakdown(before[id(server)], triton_metrics.scrape(server.metrics_url),
                                                      served_models(vspec)), cpu[id(server)])
                for variant, vspec, server in servers]


def served_table(results: list[ServedResult]) -> str:
    """Markdown: candidates/s and p50/p99 per variant, with the speed-up over the first (the FP32 baseline)."""
    base = results[0].candidates_per_s if results else float("nan")
    lines = ["| variant | graphs (export.cpu) | threads | candidates/s | vs first | p50 ms | p99 ms | errors "
             "| server CPU ms / candidate | vs first |", "|---|---|---|---|---|---|---|---|---|---|"]
    base_cpu = results[0].cpu_ms_per_candidate if results else float("nan")
    for res in results:
        v = res.variant
        graphs = ", ".join(f"{m.removesuffix('_encoder')}: int8" for m, p in v.precision.items()
                           if p is Precision.INT8) or ("optimised" if v.optimize else "model.onnx")
        lines.append(f"| {v.name} | {graphs} | {v.threads} | {res.candidates_per_s:.1f} | "
                     f"{res.candidates_per_s / base:.2f}x | {res.p50_ms:.0f} | {res.p99_ms:.0f} | {res.errors} | "
                     f"{res.cpu_ms_per_candidate:.1f} | {res.cpu_ms_per_candidate / base_cpu:.2f}x |")
    return "\n".join(lines)


def goal_line(spec: PipelineSpec, results: list[ServedResult], speedup: float = 2.0) -> str:
    """The spec's served choice against the first variant (FP32 model.onnx): candidates/s ratio and p99, against the
    goal of issue 13 (`speedup` times the candidates/s at equal or lower p99)."""
    mine = _graphs(ServedVariant("spec", spec.export.cpu.optimize, dict(spec.export.cpu.precision)))
    chosen = next((r for r in results if _graphs(r.variant) == mine and r.variant.threads == 1), None)
    if not results or chosen is None:
        return "Goal: no served variant with the spec's graphs was measured."
    base = results[0]
    ratio = chosen.candidates_per_s / base.candidates_per_s
    met = ratio >= speedup and chosen.p99_ms <= base.p99_ms
    return (f"Goal ({speedup:g}x the candidates/s of {base.variant.name} at equal or lower p99): "
            f"{chosen.variant.name} {ratio:.2f}x, p99 {chosen.p99_ms:.0f} ms vs {base.p99_ms:.0f} ms: "
            f"{'met' if met else 'MISSED'}.")


def members_table(results: list[ServedResult]) -> str:
    """Markdown: where the time goes per variant, per member (ms per request from Triton's metrics)."""
    lines = ["| variant | member | rows/exec | queue ms | compute ms | total ms |", "|---|---|---|---|---|---|"]
    for res in results:
        for m in res.members:
            lines.append(f"| {res.variant.name} | {m.model} | {m.avg_batch:.1f} | {m.queue_ms:.1f} | "
                         f"{m.compute_ms:.1f} | {m.request_ms:.1f} |")
    return "\n".join(lines)
