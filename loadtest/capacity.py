"""`fusionrank loadtest --find-capacity`: the highest open-loop arrival rate that meets every SLO.

Locust runs `loadtest/capacity_locustfile.py`, whose `LoadTestShape` steps the Poisson arrival rate through the
given rates (`step_s` each, the users bounding the requests in flight). Each step is judged on its own samples
(the first `SETTLE_S` after a change left out): every SLO of the load test (a percentile with too few samples for
its gate does not pass), and the load must be sustained: the requests sent in the step within `MAX_RATE_SHORTFALL`
of the arrivals its Poisson schedule made due (past saturation arrivals wait for a free user and fall behind). The
capacity is the highest rate of the run of passing steps from the lowest one. `capacity.png` plots p50, p99 and the
error rate against the offered rate; `capacity.json` has every step.

For comparison the closed-loop driver of the measurement core (`benchmarks.lib.closed_loop`: the same number of
callers, back to back) measures the saturation throughput right after: a capacity set by saturation lies near it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.lib import closed_loop
from clients import NO_RETRY, RankingClient
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.project import reports_dir
from fusionrank.contract.spec import PipelineSpec
from fusionrank.model.synthetic_data import load_benchmark
from fusionrank.request.scenario import RequestFactory, Scenario, load_scenario
from loadtest.report import Samples, evaluate_slo, read_samples, summarize_samples
from loadtest.runner import (
    DONE_MARKER,
    GRACE_S,
    STOP_TIMEOUT_S,
    endpoint,
    locust_command,
    printer,
    run_locust,
    warm_up,
)
from loadtest.slo import Slo, load_slo

CAPACITY_LOCUSTFILE = Path(__file__).resolve().parent / "capacity_locustfile.py"
SETTLE_S = 2.0
MAX_RATE_SHORTFALL = 0.05


class CapacityError(FusionRankError):
    """A capacity search setting is out of range, or its run gave no steps."""


@dataclass(frozen=True)
class CapacityPlan:
    """Rates to step through (ascending), seconds per step, users bounding the requests in flight."""

    rates: tuple[float, ...]
    step_s: float = 20.0
    users: int = 16

    def __post_init__(self):
        if not self.rates or any(not r > 0 for r in self.rates) or list(self.rates) != sorted(self.rates):
            raise CapacityError(f"--capacity-rates {','.join(f'{r:g}' for r in self.rates)}: expected ascending "
                                "rates > 0, e.g. 2,4,6,8")
        if not self.step_s > 2 * SETTLE_S:
            raise CapacityError(f"--step-time {self.step_s:g}s: must exceed {2 * SETTLE_S:g}s")
        if self.users < 1:
            raise CapacityError(f"--users {self.users}: must be >= 1")

    @property
    def run_s(self) -> float:
        return self.step_s * len(self.rates)

    def settings(self) -> dict[str, str]:
        return {"capacity_rates": ",".join(f"{r:g}" for r in self.rates), "capacity_step_s": f"{self.step_s:g}"}


def _subset(samples: Samples, mask: np.ndarray) -> Samples:
    return Samples(samples.start[mask], samples.latency_ms[mask], samples.candidates[mask], samples.ok[mask])


def judge_steps(samples: Samples, steps: list[dict], step_s: float, slo: Slo) -> list[dict]:
    """Per step: offered and delivered rate, p50/p95/p99, error rate, every SLO check, sustained or not, passed."""
    out = []
    for step in steps:
        stop = step.get("end", step["start"] + step_s)
        begin = step["start"] + SETTLE_S
        part = _subset(samples, (samples.start >= begin) & (samples.start < stop))
        summary = summarize_samples(part) if len(part) else {"requests": 0, "latency_samples": 0}
        delivered = len(part) / (stop - begin)
        checks = evaluate_slo(slo, summary) if len(part) else []
        # sustained: the client sent what its drawn Poisson schedule made due in the step (past saturation the
        # arrivals wait for a free user and fall behind); against the nominal rate a step of n arrivals would
        # also miss by the count's own 1/sqrt(n) spread
        sent = int(((samples.start >= step["start"]) & (samples.start < stop)).sum())
        due = step.get("due")
        sustained = sent >= (1.0 - MAX_RATE_SHORTFALL) * due if due else \
            delivered >= (1.0 - MAX_RATE_SHORTFALL) * step["rate"]
        out.append({"rate": step["rate"], "delivered_rate": delivered, "requests": len(part), "sent": sent, "due": due,
                    "p50_ms": summary.get("p50_ms"), "p95_ms": summary.get("p95_ms"),
                    "p99_ms": summary.get("p99_ms"), "error_rate": summary.get("error_rate", 1.0),
                    "sustained": sustained, "slo": [{"name": c.name, "passed": c.passed, "detail": c.describe()}
                                                    for c in checks],
                    "passed": bool(checks) and all(c.passed for c in checks) and sustained})
    return out


def capacity_of(steps: list[dict]) -> float | None:
    """The highest rate of the run of passing steps from the lowest; None when the lowest step fails."""
    best = None
    for step in steps:
        if not step["passed"]:
            break
        best = step["rate"]
    return best


def closed_loop_saturation(spec: PipelineSpec, url: str, scenario: Scenario, users: int, seconds: float) -> dict:
    """Throughput of `users` closed-loop callers sending back to back for `seconds` (the measurement core's
    driver): the rate at which the server saturates."""
    bench = load_benchmark(spec)
    clients = [RankingClient(spec, url, timeout=scenario.timeout_s, retry=NO_RETRY) for _ in range(users)]
    factories = [RequestFactory(spec, bench, scenario, seed=900 + k) for k in range(users)]

    def make_call(k: int):
        def call() -> None:
            request = factories[k].next()
            clients[k].rank_payloads(request.items, request.history, videos=request.videos)
        return call

    try:
        result = closed_loop(make_call, users, duration_s=seconds, warmup=1)
    finally:
        for client in clients:
            client.close()
    return {"users": users, "seconds": round(result.wall_s, 1), "requests": len(result.samples),
            "errors": result.errors, "throughput_rps": result.throughput, **{
                k: v for k, v in result.summary().items() if k in ("p50_ms", "p95_ms", "p99_ms")}}


def write_capacity_report(folder: Path, steps: list[dict], capacity: float | None, saturation: dict | None) -> list:
    """`capacity.json` and `capacity.png` (p50, p99 and error rate against the offered rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    (folder / "capacity.json").write_text(json.dumps({"capacity_rps": capacity, "steps": steps,
                                                      "closed_loop_saturation": saturation}, indent=2) + "\n")
    rates = [s["rate"] for s in steps]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
        ax.plot(rates, [s[key] if s[key] is not None else np.nan for s in steps], style, label=key[:-3])
    ax.set(xlabel="offered arrival rate (req/s, Poisson)", ylabel="latency (ms)", yscale="log",
           title="Capacity search" + (f": {capacity:g} req/s meets every SLO" if capacity else ": no step passed"))
    errors = ax.twinx()
    errors.plot(rates, [100 * (s["error_rate"] or 0) for s in steps], "r^:", label="errors %")
    errors.set_ylabel("errors (%)")
    if capacity:
        ax.axvline(capacity, color="green", alpha=0.5, label="capacity")
    if saturation:
        ax.axvline(saturation["throughput_rps"], color="grey", linestyle="--", label="closed-loop saturation")
    handles = ax.get_legend_handles_labels()[0] + errors.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left")
    fig.tight_layout()
    path = folder / "capacity.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def render_capacity(steps: list[dict], capacity: float | None, saturation: dict | None) -> str:
    """The steps as a Markdown table, the capacity and the closed-loop saturation beside it."""
    lines = ["| offered req/s | delivered req/s | sent / due | p50 ms | p99 ms | errors | sustained | SLOs |",
             "|---|---|---|---|---|---|---|---|"]
    for s in steps:
        missed = [c["name"] for c in s["slo"] if not c["passed"]]
        lines.append(f"| {s['rate']:g} | {s['delivered_rate']:.2f} | {s.get('sent')} / {s.get('due')} | "
                     f"{_ms(s['p50_ms'])} | "
                     f"{_ms(s['p99_ms'])} | {100 * (s['error_rate'] or 0):.1f}% | {'yes' if s['sustained'] else 'NO'} "
                     f"| {'met' if not missed else 'missed: ' + ', '.join(missed)} |")
    lines.append("")
    lines.append(f"capacity: {capacity:g} req/s meets every SLO" if capacity else
                 "capacity: no step met every SLO (lower the first rate, or see the missed SLOs)")
    if saturation:
        lines.append(f"closed-loop saturation ({saturation['users']} callers back to back, "
                     f"{saturation['seconds']}s): {saturation['throughput_rps']:.2f} req/s"
                     + (f"; capacity / saturation = {capacity / saturation['throughput_rps']:.2f}"
                        if capacity and saturation["throughput_rps"] else ""))
    return "\n".join(lines)


def _ms(x) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.0f}"


def run_capacity_search(spec: PipelineSpec, url: str, plan: CapacityPlan, scenario: Scenario, slo: Slo,
                        out: Path, progress=None, saturation_s: float | None = None) -> dict:
    """Step the open-loop rate through `plan` against `url`, judge every step, measure closed-loop saturation;
    writes capacity.json, capacity.png and capacity.md into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    samples_dir = out / "samples"
    samples_dir.mkdir(exist_ok=True)
    for old in [*samples_dir.glob("*.csv"), *samples_dir.glob("*.json"), samples_dir / DONE_MARKER]:
        old.unlink(missing_ok=True)
    warm_up(spec, url, scenario)
    settings = {"endpoints": url, "spec": spec.source if Path(spec.source).is_file() else "",
                "scenario": scenario.source, "samples_dir": samples_dir, "done_file": samples_dir / DONE_MARKER,
                "slo_gate": "off", **plan.settings()}
    cmd = locust_command(out, plan.users, plan.users, f"{plan.run_s:g}s", url, settings,
                         locustfile=CAPACITY_LOCUSTFILE)
    run = run_locust(cmd, None, timeout=plan.run_s + STOP_TIMEOUT_S + GRACE_S, log_file=out / "locust.log",
                     done_marker=samples_dir / DONE_MARKER, echo=progress)
    steps_file = samples_dir / "steps.json"
    if not steps_file.is_file():
        raise CapacityError(f"the capacity run wrote no steps (Locust exit {run.returncode}); log {run.log_file}")
    steps = judge_steps(read_samples(samples_dir), json.loads(steps_file.read_text()), plan.step_s, slo)
    capacity = capacity_of(steps)
    if progress:
        progress(f"capacity search done: {capacity} req/s; closed-loop saturation with {plan.users} callers next")
    saturation = closed_loop_saturation(spec, url, scenario, plan.users, saturation_s or plan.step_s)
    write_capacity_report(out, steps, capacity, saturation)
    text = render_capacity(steps, capacity, saturation)
    (out / "capacity.md").write_text(f"# Capacity search ({scenario.name}, SLOs {slo.source})\n\n{text}\n\n"
                                     "![capacity](capacity.png)\n")
    return {"capacity_rps": capacity, "steps": steps, "closed_loop_saturation": saturation, "text": text}


def run_capacity_command(spec: PipelineSpec, plan: CapacityPlan, url: str | None = None,
                         serve_repository: Path | None = None, scenario: str | Path | None = None,
                         slo: str | Path | None = None, out_dir: Path | None = None, out=None) -> int:
    """`fusionrank loadtest --find-capacity`: print the steps, the capacity and the closed-loop saturation; exit 1
    when no step met every SLO."""
    out = out or sys.stdout
    scen = load_scenario(scenario)
    targets = load_slo(spec, scen.name, slo)
    folder = Path(out_dir) if out_dir else reports_dir() / f"capacity-{time.strftime('%Y%m%d-%H%M%S')}"
    with endpoint(spec, url, serve_repository, None, out) as (grpc_url, _metrics):
        result = run_capacity_search(spec, grpc_url, plan, scen, targets, folder, progress=printer(out))
    out.write(result["text"] + f"\nreport: {folder}/capacity.md\n")
    return 0 if result["capacity_rps"] else 1
