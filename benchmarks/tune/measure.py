"""Measuring one configuration of `fusionrank tune`: its spec rendered over the exported repository (configs
written, weights linked), a real tritonserver on loopback, and closed-loop callers of never-seen items through the
shared measurement core until the stability rule holds; the trial's capacity and p99 against the spec's SLO."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.lib import Stability, percentile
from benchmarks.lib.memory import MIB, process_tree, total_rss
from benchmarks.lib.repository import overlay_repository
from benchmarks.served import ServedLoad, Stream
from benchmarks.server_metrics import diff, parse_counters, scrape
from benchmarks.tune.search import Knob, Trial, apply
from fusionrank.contract.spec import PipelineSpec, ServingProfile

if TYPE_CHECKING:
    from fusionrank.server.launcher import TritonServer


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

    @contextlib.contextmanager
    def _served(self, config: dict[str, int]) -> Iterator[tuple[PipelineSpec, TritonServer, ServedLoad]]:
        """`config` applied, rendered over the exported repository and served afresh, with a load of never-seen
        items on it (its callers closed at the end)."""
        from fusionrank.server.launcher import TritonServer

        variant = apply(self.spec, self.knobs, config)
        self.calls += 1
        # A seed per measurement: never-seen items stay never seen across configurations (no server keeps a cache).
        stream = dataclasses.replace(self.settings.stream, seed=self.settings.stream.seed + 100 * self.calls)
        with overlay_repository(variant, self.repo) as repo, \
                TritonServer.for_spec(variant, repo, ServingProfile.CPU, log_name="tritonserver-tune") as server:
            load = ServedLoad(variant, self.bench, server.grpc_url, variant.serving.route, stream)
            try:
                yield variant, server, load
            finally:
                load.close()

    def __call__(self, config: dict[str, int]) -> Trial:
        with self._served(config) as (variant, server, load):
            before, began = scrape(server.metrics_url), time.monotonic()
            run = load.stable(self.settings.window_s, self.settings.rule)
            rss = total_rss(process_tree(server.process.pid)) / MIB  # under load, before the callers stop
            load.close()
            busy = busy_shares(variant, before, scrape(server.metrics_url), time.monotonic() - began)
            check = self.probe.check(server.grpc_url, variant.serving.route) if self.probe else None
        trial = within_memory(dataclasses.replace(judge(config, run, self.spec, load.stream.candidates), busy=busy),
                              rss, self.settings.max_rss_mib)
        if check is None:
            return trial
        return dataclasses.replace(trial, feasible=trial.feasible and check.passed,
                                   note=f"{trial.note}; {check.describe()}")

    def open_checks(self, config: dict[str, int], rates_rps: Sequence[float], seconds: float) -> list[OpenCheck]:
        """`config` served afresh under Poisson arrivals at each of `rates_rps` in turn for `seconds`, judged against
        the SLO, until one passes: the checks made."""
        checks: list[OpenCheck] = []
        with self._served(config) as (_, _, load):
            load.window(min(self.settings.window_s, 5.0))  # the first calls of a fresh server, untimed
            for rate in rates_rps:
                checks.append(judge_open(load.open_window(rate, seconds), self.spec))
                if checks[-1].passed:
                    break
        return checks


@dataclass(frozen=True)
class OpenCheck:
    """The chosen configuration under Poisson arrivals at a share of its closed-loop capacity: what the SLO says of
    it when callers do not wait for each other (a closed loop slows its own arrivals as the server slows)."""

    rate_rps: float
    arrivals: int
    answered: int
    failed: int  # errors, and arrivals dropped for want of a worker
    percentiles_ms: dict[str, float]  # p50/p95/p99 of the answered requests; a p99 from too few samples: the max
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v:.0f} ms" for k, v in self.percentiles_ms.items())
        verdict = "within the SLO" if self.passed else "OUTSIDE the SLO: " + "; ".join(self.problems)
        return (f"open loop at {self.rate_rps:.2f} req/s: {self.answered} of {self.arrivals} answered ({shown}), "
                f"{self.failed} failed; {verdict}")


def judge_open(result, spec: PipelineSpec) -> OpenCheck:
    """An open-loop run (`benchmarks.lib.LoadResult`) against the spec's SLO: p50, p95 and p99 of the answered
    requests, errors and drops against the error rate."""
    slo = spec.slo
    ok = [s.latency_s * 1000.0 for s in result.samples if s.ok]
    failed = result.errors + result.dropped
    arrivals = max(result.arrivals, len(result.samples) + result.dropped)
    problems, shown = [], {}
    if not ok:
        problems.append(f"no request answered ({result.first_error or 'none sent'})")
    for label, q, limit in (("p50", 0.5, slo.p50_ms), ("p95", 0.95, slo.p95_ms), ("p99", 0.99, slo.p99_ms)):
        if not ok:
            break
        estimate = percentile(ok, q)
        value = estimate.value if estimate.supported else max(ok)  # too few samples: the max held to the SLO
        shown[label] = value
        if value > limit:
            problems.append(f"{label} {value:.0f} ms > {limit:g} ms")
    if arrivals and failed / arrivals > slo.max_error_rate:
        problems.append(f"error rate {failed / arrivals:.3f} > {slo.max_error_rate:g} ({result.first_error})")
    return OpenCheck(result.offered_rate or 0.0, arrivals, len(ok), failed, shown, tuple(problems))


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
    """Per member model, the share of the run its instances spent computing: its compute time per execution (Triton
    adds a batch's time to each of its requests; a member running concurrent batches counts its own,
    `server_metrics.diff`) times the executions, over the run's wall time and the model's batches at once (instances
    x concurrent batches). Near 1, the model is the bottleneck and more of it may pay (`fusionrank tune` searches
    those knobs first)."""
    if seconds <= 0:
        return {}

    def share(s) -> float:
        batching = spec.serving.batching(s.model)
        return s.compute_ms * s.executions / (seconds * 1000.0 * batching.instances * batching.concurrent_batches)

    return {s.model: share(s) for s in diff(parse_counters(before), parse_counters(after))
            if s.model != spec.serving.route}


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
