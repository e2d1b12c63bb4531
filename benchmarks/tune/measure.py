"""Measuring one configuration of `fusionrank tune`: its spec rendered over the exported repository (configs
written, weights linked), a real tritonserver on loopback, and closed-loop callers of never-seen items through the
shared measurement core until the stability rule holds; the trial's capacity and p99 against the spec's SLO."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.lib import Stability, percentile
from benchmarks.lib.memory import MIB, process_tree, total_rss
from benchmarks.lib.repository import overlay_repository
from benchmarks.served import ServedLoad, Stream
from benchmarks.server_metrics import diff, parse_counters, scrape
from benchmarks.tune.search import Knob, Trial, apply
from fusionrank.contract.spec import PipelineSpec, ServingProfile


@dataclass(frozen=True)
class MeasureSettings:
    """How each configuration is loaded and judged."""

    stream: Stream = Stream()
    window_s: float = 10.0
    rule: Stability = Stability(windows=3, tolerance=0.15, max_windows=5)
    start_timeout_s: float = 300.0
    max_rss_mib: float | None = None  # a configuration whose server holds more under load is outside the budget


class ConfigMeasurer:
    """`__call__(config) -> Trial`: serve the configuration and measure it (the search's measure function)."""

    def __init__(self, spec: PipelineSpec, repo: Path, knobs: Sequence[Knob], settings: MeasureSettings,
                 ranking: bool = True):
        from benchmarks.tune.ranking import RankingProbe
        from fusionrank.model.synthetic_data import load_benchmark

        self.spec, self.repo, self.knobs, self.settings = spec, Path(repo), list(knobs), settings
        self.bench = load_benchmark(spec)
        self.probe = RankingProbe(spec, self.repo, self.bench) if ranking else None
        self.calls = 0

    def __call__(self, config: dict[str, int]) -> Trial:
        from fusionrank.server.launcher import TritonServer

        variant = apply(self.spec, self.knobs, config)
        self.calls += 1
        # A seed per measurement: never-seen items stay never seen across configurations (no server keeps a cache).
        stream = dataclasses.replace(self.settings.stream, seed=self.settings.stream.seed + 100 * self.calls)
        with overlay_repository(variant, self.repo) as repo, \
                TritonServer.for_spec(variant, repo, ServingProfile.CPU, log_name="tritonserver-tune") as server:
            load = ServedLoad(variant, self.bench, server.grpc_url, variant.serving.route, stream)
            before, began = scrape(server.metrics_url), time.monotonic()
            try:
                run = load.stable(self.settings.window_s, self.settings.rule)
                rss = total_rss(process_tree(server.process.pid)) / MIB  # under load, before the callers stop
            finally:
                load.close()
            busy = busy_shares(variant, before, scrape(server.metrics_url), time.monotonic() - began)
            check = self.probe.check(server.grpc_url, variant.serving.route) if self.probe else None
        trial = within_memory(dataclasses.replace(judge(config, run, self.spec, stream.candidates), busy=busy),
                              rss, self.settings.max_rss_mib)
        if check is None:
            return trial
        return dataclasses.replace(trial, feasible=trial.feasible and check.passed,
                                   note=f"{trial.note}; {check.describe()}")


def within_memory(trial: Trial, rss_mib: float, limit_mib: float | None) -> Trial:
    """`trial` with the server's resident memory under load; outside the budget (not feasible, and why) when it
    holds more than `limit_mib` (None: no budget). Each instance is a process of its own (a Python-backend stub
    with its runtime and graphs), so a configuration that gains throughput by instances also costs memory."""
    trial = dataclasses.replace(trial, rss_mib=rss_mib)
    if limit_mib is None or rss_mib <= limit_mib:
        return trial
    over = f"RSS {rss_mib:.0f} MiB > {limit_mib:g} MiB (--max-rss-mib)"
    return dataclasses.replace(trial, feasible=False, over_memory=trial.feasible,
                               note=f"{over}; {trial.note}" if trial.note else over)


def busy_shares(spec: PipelineSpec, before: str, after: str, seconds: float) -> dict[str, float]:
    """Per member model, the share of the run its instances spent computing: Triton's compute time per execution
    (it adds a batch's time to each of its requests) times the executions, over the run's wall time and the model's
    instance count. Near 1, the model is the bottleneck and more instances of it may pay (`fusionrank tune` searches
    those knobs first)."""
    if seconds <= 0:
        return {}
    return {s.model: s.compute_ms * s.executions / (seconds * 1000.0 * spec.serving.batching(s.model).instances)
            for s in diff(parse_counters(before), parse_counters(after)) if s.model != spec.serving.route}


def judge(config: dict[str, int], run, spec: PipelineSpec, candidates: int) -> Trial:
    """The trial of a stable run: capacity (candidates/s over the measured windows), p99 and the SLO's verdict."""
    samples = run.samples()
    wall = sum(w.result.wall_s for w in run.measured if w.result)
    ok = [s.latency_s * 1000.0 for s in samples if s.ok]
    errors = len(samples) - len(ok)
    capacity = len(ok) * candidates / wall if wall > 0 else 0.0
    slo = spec.slo
    if not ok:
        first = next((s.error for s in samples if not s.ok), "no request answered")
        return Trial(config, 0.0, float("inf"), False, f"no answer: {first}")
    p99 = percentile(ok, 0.99)
    # Too few samples to estimate p99: the largest latency seen (never below the p99) is held to the SLO instead.
    bound = p99.value if p99.supported else max(ok)
    problems = []
    if bound > slo.p99_ms:
        problems.append(f"p99 {bound:.0f} ms > {slo.p99_ms:g} ms" + ("" if p99.supported else " (max of a sample "
                                                                      "too small for p99)"))
    if errors / len(samples) > slo.max_error_rate:
        problems.append(f"error rate {errors / len(samples):.3f} > {slo.max_error_rate:g}")
    feasible = not problems
    if not p99.supported:
        problems.append(f"p99 from {p99.samples} samples (needs >= {p99.needed}): the max held to the SLO")
    if not run.stable:
        problems.append("windows not stable")  # reported, not disqualifying: a noisy machine still gets a figure
    note = "; ".join(problems) or p99.describe()
    windows = tuple(w.throughput * candidates for w in run.measured)
    return Trial(config, capacity, bound, feasible, note, windows=windows)
