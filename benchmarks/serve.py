"""`fusionrank bench serve`: runs the phases (`benchmarks.serve_phases`), then prints and saves the table of phases,
the goals with the measured ratios, the batch each member achieved per served phase, `bench.json` and `bench.png`
(candidates/s and latency per phase)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks._args import repository_of, spec_of
from benchmarks.lib.memory import describe as describe_memory
from benchmarks.serve_phases import BenchConfig, BenchResult, Phase, run_bench
from benchmarks.server_metrics import format_table as format_members
from fusionrank.contract.project import reports_dir
from fusionrank.contract.spec import PipelineSpec

SPEEDUP_GOAL = 10.0  # warm cached route vs plain ensemble, candidates/s
ROOF_GOAL = 0.9  # cold route vs the in-process roof (one pipeline per core), candidates/s


@dataclass(frozen=True)
class Goal:
    name: str
    measured: str
    met: bool


def _by_role(result: BenchResult) -> dict[str, Phase]:
    return {p.role: p for p in result.phases}


def goals(result: BenchResult) -> list[Goal]:
    """The issue's goals, each with what was measured (a missing phase misses its goals)."""
    phases = _by_role(result)
    warm, plain, alone = phases.get("route_warm"), phases.get("ensemble"), phases.get("inprocess_request")
    out = []
    if warm and plain and plain.candidates_per_s:
        ratio = warm.candidates_per_s / plain.candidates_per_s
        out.append(Goal(f"warm cached route >= {SPEEDUP_GOAL:g}x the plain ensemble's candidates/s",
                        f"{ratio:.1f}x ({warm.candidates_per_s:.0f} vs {plain.candidates_per_s:.0f})",
                        ratio >= SPEEDUP_GOAL and not warm.errors))
    if warm and plain and warm.latency and plain.latency:
        out.append(Goal("warm cached route p99 below the plain ensemble's",
                        f"{warm.latency.p99_ms:.0f} ms vs {plain.latency.p99_ms:.0f} ms",
                        warm.latency.p99_ms < plain.latency.p99_ms))
    cold, roof = phases.get("route_cold"), phases.get("inprocess_roof")
    if cold and roof and roof.candidates_per_s:
        ratio = cold.candidates_per_s / roof.candidates_per_s
        out.append(Goal(f"cold route >= {ROOF_GOAL:g}x the in-process roof's candidates/s",
                        f"{ratio:.2f}x ({cold.candidates_per_s:.0f} vs {roof.candidates_per_s:.0f})",
                        ratio >= ROOF_GOAL and not cold.errors))
    if plain and alone and alone.candidates_per_s:
        ratio = plain.candidates_per_s / alone.candidates_per_s
        out.append(Goal("plain ensemble at least as fast as the in-process pipeline at the request's batch",
                        f"{ratio:.2f}x ({plain.candidates_per_s:.0f} vs {alone.candidates_per_s:.0f})",
                        ratio >= 1.0 and not plain.errors))
    return out


def _fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def phase_table(result: BenchResult) -> str:
    """One row per phase: candidates/s, latency percentiles, requests, errors, cache hit ratio, load average."""
    header = (f"{'phase':<44} {'cand/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'requests':>8} "
              f"{'errors':>6} {'hits':>6} {'new':>5} {'load':>9}")
    lines = [header, "-" * len(header)]
    for p in result.phases:
        lat = p.latency
        hits = f"{100 * p.cache.hit_ratio:.0f}%" if p.cache else "-"
        lines.append(f"{p.name:<44} {p.candidates_per_s:>8.1f} {_fmt(lat and lat.p50_ms):>8} "
                     f"{_fmt(lat and lat.p95_ms):>8} {_fmt(lat and lat.p99_ms):>8} {p.requests:>8} {p.errors:>6} "
                     f"{hits:>6} {100 * p.novel_share:>4.1f}% {p.load[0]:>4.1f}>{p.load[1]:<4.1f}")
    return "\n".join(lines)


def render(result: BenchResult) -> str:
    """Everything a person reads after a run."""
    c = result.config
    lines = [f"fusionrank bench serve ({result.spec_source}): {c.candidates} candidates per request, "
             f"{c.callers} callers, Zipf exponent {c.zipf_exponent:g}, {100 * c.novel_share:g}% never-seen items, "
             f"{c.seconds:g} s per served phase, {c.inprocess_seconds:g} s per in-process phase; {result.cores} cores "
             f"(load = 1-minute load average before>after each phase: other processes share the machine)", "",
             phase_table(result), ""]
    if result.embed_seconds is not None:
        lines.append(f"embed-catalogue (whole catalogue into the shared tier, before the warm phase): "
                     f"{result.embed_seconds:.1f} s")
    for p in result.phases:
        if p.first_error:
            lines.append(f"{p.name}: {p.errors} errors, first: {p.first_error}")
        if p.cache:
            lines.append(p.cache.describe())
    measured = [p for p in result.phases if p.cpu]
    if measured:
        lines += ["", "CPU per answered request over each served phase's timed run (user + system of every process: "
                  "the callers,", "tritonserver, the stubs of each model, the cache's redis-servers) and the share of "
                  "the cores they kept busy:"]
        lines += [f"  {p.name}: {p.cpu.describe(p.requests - p.errors)}" for p in measured]
    lines += ["", "memory (RSS per process, at the end of each served phase):"]
    if result.idle_memory:
        lines.append(f"  idle, after start-up: {describe_memory(result.idle_memory)}")
    lines += [f"  {p.name}: {describe_memory(p.memory)}" for p in result.phases if p.memory]
    for p in result.phases:
        if p.members:
            lines += ["", f"{p.name}: per member (Triton metrics of the phase; batch = rows per execution)",
                      format_members([m for m in p.members if m.requests])]
    lines += ["", "goals:"]
    lines += [f"  {'met   ' if g.met else 'MISSED'} {g.name}: {g.measured}" for g in goals(result)]
    return "\n".join(lines)


def as_dict(result: BenchResult) -> dict:
    return {"config": asdict(result.config), "spec": result.spec_source, "cores": result.cores,
            "machine": platform.platform(), "embed_seconds": result.embed_seconds,
            "phases": [p.as_dict() for p in result.phases],
            "idle_memory": [m.as_dict() for m in result.idle_memory],
            "goals": [asdict(g) for g in goals(result)]}


def write_chart(result: BenchResult, path: Path) -> Path:
    """Candidates/s and p50/p95/p99 per phase, side by side (log scales: the phases differ by orders)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result.config
    short = {"inprocess_request": f"in-process\nbatch {c.candidates}", "inprocess_batch": "in-process\nlargest batch",
             "ensemble": "plain\nensemble", "route_cold": "route\nnever seen", "route_warm": "cached route\nwarm",
             "inprocess_roof": "in-process\nroof"}
    names = [short.get(p.role, p.name) for p in result.phases]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    bars = left.bar(range(len(names)), [p.candidates_per_s for p in result.phases], color="tab:blue")
    left.bar_label(bars, fmt="%.0f")
    left.set(yscale="log", ylabel="candidates per second", title="Throughput")
    width = 0.27
    for k, (q, colour) in enumerate((("p50_ms", "tab:green"), ("p95_ms", "tab:orange"), ("p99_ms", "tab:red"))):
        values = [getattr(p.latency, q) if p.latency else 0.0 for p in result.phases]
        right.bar([i + (k - 1) * width for i in range(len(names))], values, width, label=q[:3], color=colour)
    right.set(yscale="log", ylabel="ms per call", title="Latency per call (in-process: per batch)")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(range(len(names)), names, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"fusionrank bench serve: N={c.candidates}, C={c.callers}, Zipf {c.zipf_exponent:g}, "
                 f"{100 * c.novel_share:g}% never-seen")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bench_command(spec: PipelineSpec, repo: Path, config: BenchConfig, out_dir: Path | None = None, gate: bool = False,
                  out=None) -> int:
    """`fusionrank bench serve`: run every phase, print the table and goals, write bench.json and bench.png. Exit 1 when
    a phase had errors (or, with `gate`, when a goal was missed)."""
    out = out or sys.stdout
    out_dir = Path(out_dir) if out_dir else reports_dir() / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = run_bench(spec, repo, config, out)
    out.write("\n" + render(result) + "\n")
    (out_dir / "bench.json").write_text(json.dumps(as_dict(result), indent=2) + "\n")
    chart = write_chart(result, out_dir / "bench.png")
    out.write(f"\nwrote {out_dir / 'bench.json'} and {chart} (load average now {os.getloadavg()[0]:.1f})\n")
    failed = any(p.errors for p in result.phases) or (gate and not all(g.met for g in goals(result)))
    return 1 if failed else 0


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidates", type=int, default=16, help="candidates per request (N)")
    parser.add_argument("--callers", type=int, default=8, help="concurrent closed-loop callers (C)")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of item popularity")
    parser.add_argument("--novel-share", type=float, default=0.05, help="share of never-seen candidates")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each served phase")
    parser.add_argument("--inprocess-seconds", type=float, default=15.0, help="length of each in-process phase")
    parser.add_argument("--no-shared-tier", action="store_true",
                        help="no local redis-server: the route's own caches, warmed by an untimed pass of the stream")
    parser.add_argument("--seed", type=int, default=0, help="seed of the candidate stream")
    parser.add_argument("--gate", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--out", default=None, help="report folder (default: reports/bench-<time>)")


def main(args: argparse.Namespace) -> int:
    config = BenchConfig(candidates=args.candidates, callers=args.callers, zipf_exponent=args.zipf,
                         novel_share=args.novel_share, seconds=args.seconds, inprocess_seconds=args.inprocess_seconds,
                         shared_tier=not args.no_shared_tier, seed=args.seed)
    return bench_command(spec_of(args), repository_of(args), config, out_dir=Path(args.out) if args.out else None,
                         gate=args.gate)
