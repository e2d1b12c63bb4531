"""Upgrade report, latency: repeated, interleaved windows per model and batch size (and the ensemble), so that a
comparison with the baseline can tell a regression from the neighbours' noise.

One round times every (model, batch) once for `window_s` (and, when given, one window of ensemble requests); the
rounds repeat `rounds` times, each starting one position later in the list, so a burst of load on a shared node
falls on different measurements instead of on one of them. Each window gives one repeat (its median latency);
`release.upgrade_compare` compares the repeats of this run with the baseline's by the measurement core's
significance test with a noise floor (`benchmarks.lib.stats.compare_samples`). The pooled calls of every window
give the reported percentiles with their confidence intervals and sample counts, and the load average before and
after is recorded beside them: the report shows the noise it saw. A model's repeats measure `TimingPlan.clock`
(see `CLOCKS`); the ensemble's are always wall-clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from benchmarks.latency import BenchmarkError, Runner, tile_rows
from benchmarks.lib import LoadResult, closed_loop, load_average, min_repeats, percentile
from fusionrank.contract.errors import FusionRankError

# "cpu": the calling thread's CPU time per call. The CPU profile runs ONNX Runtime with one intra-op thread, on the
# caller's thread, so this is the served file's compute cost on this node; neighbours' load does not inflate it
# (measured at load average 10 on 2 cores: window medians spread 17 % in CPU time, 124 % in wall time, for the same
# INT8 text encoder at batch 1). "wall": elapsed time per call, for runtimes that work off the caller's thread
# (TensorRT on a GPU) and for the ensemble, whose latency is what its callers wait.
CLOCKS = ("cpu", "wall")


class TimingError(FusionRankError):
    """A timing plan is out of range (too few rounds for the significance test, a window <= 0)."""


@dataclass(frozen=True)
class TimingPlan:
    """How long and how often each measurement is repeated."""

    rounds: int = 8  # repeats per measurement; the U test needs >= min_repeats() (4 at alpha 0.05)
    clock: str = "cpu"  # what a repeat measures: "cpu" (the calling thread's CPU time) or "wall"
    window_s: float = 0.2  # per model window
    min_calls: int = 3  # per model window, even past window_s
    max_calls: int = 500  # per model window

    def __post_init__(self):
        if self.rounds < min_repeats():
            raise TimingError(f"rounds {self.rounds}: the significance test needs >= {min_repeats()} repeats per "
                              "side to reject at alpha 0.05")
        if self.clock not in CLOCKS:
            raise TimingError(f"clock {self.clock!r}: allowed {', '.join(CLOCKS)}")
        if not self.window_s > 0 or self.min_calls < 1 or self.max_calls < self.min_calls:
            raise TimingError(f"window_s {self.window_s} must be > 0 and 1 <= min_calls {self.min_calls} <= "
                              f"max_calls {self.max_calls}")


def _call_of(runner: Runner, feed: dict[str, np.ndarray], _caller: int):
    return lambda: runner.run(feed)


def model_window(runner: Runner, feed: dict[str, np.ndarray], plan: TimingPlan, warmup: int) -> LoadResult:
    """One window of back-to-back calls (at least `min_calls`, at most `max_calls`, about `window_s`)."""
    make_call = partial(_call_of, runner, feed)
    result = closed_loop(make_call, users=1, requests=plan.max_calls, duration_s=plan.window_s, warmup=warmup)
    if len(result.samples) < plan.min_calls:
        more = closed_loop(make_call, users=1, requests=plan.min_calls - len(result.samples))
        result.samples.extend(more.samples)
        result.wall_s += more.wall_s
    if result.errors:
        raise BenchmarkError(f"the runtime failed: {result.first_error}")
    return result


def summarize_windows(windows: list[LoadResult], units_per_call: int, load: tuple[list, list],
                      clock: str = "wall") -> dict:
    """Repeats (window medians of `clock`), pooled wall-clock percentiles with confidence intervals and counts,
    CPU time, throughput, load."""
    ms = np.concatenate([w.ok_latencies_s for w in windows]) * 1000.0
    if not len(ms):
        return {"repeats_ms": [], "samples": 0, "errors": sum(w.errors for w in windows), "clock": clock,
                "first_error": next((w.first_error for w in windows if w.errors), None)}
    per_window = [w.ok_cpu_s if clock == "cpu" else w.ok_latencies_s for w in windows]
    repeats = [float(np.median(x) * 1000.0) for x in per_window if len(x)]
    cpu_ms = np.concatenate([w.ok_cpu_s for w in windows]) * 1000.0
    wall = sum(w.wall_s for w in windows)
    entry = {"clock": clock, "repeats_ms": [round(r, 4) for r in repeats], "samples": int(len(ms)),
             "cpu_p50_ms": float(np.median(cpu_ms)) if len(cpu_ms) else None,
             "errors": sum(w.errors for w in windows), "mean_ms": float(ms.mean()),
             "throughput": units_per_call * len(ms) / wall if wall > 0 else 0.0,
             "repeat_spread": float((max(repeats) - min(repeats)) / np.median(repeats)) if repeats else None,
             "load_average": {"before": load[0], "after": load[1]}}
    for q in (0.5, 0.95, 0.99):
        est = percentile(ms, q)
        entry[f"{est.label}_ms"] = est.value
        entry[f"{est.label}_ci_ms"] = [est.low, est.high]
        entry[f"{est.label}_supported"] = est.supported
    entry["first_error"] = next((w.first_error for w in windows if w.errors), None)
    return entry


def time_interleaved(runners: dict[str, Runner], inputs: dict[str, dict[str, np.ndarray]],
                     batch_sizes: Callable[[str], tuple[int, ...]], plan: TimingPlan,
                     extra: dict[str, Callable[[], LoadResult]] | None = None,
                     progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """{model: {batch: entry}} and, for each `extra` window source (e.g. "ensemble"), {name: entry}."""
    keys = [(m, b) for m in runners for b in batch_sizes(m)] + [(name, None) for name in (extra or {})]
    feeds = {(m, b): tile_rows(inputs[m], b) for m, b in keys if b is not None}
    windows: dict[tuple, list[LoadResult]] = {k: [] for k in keys}
    load_before = load_average()
    for r in range(plan.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            model, batch = key
            if batch is None:
                windows[key].append(extra[model]())
            else:
                windows[key].append(model_window(runners[model], feeds[key], plan, warmup=2 if r == 0 else 0))
        if progress:
            progress(f"round {r + 1}/{plan.rounds} (load average {load_average()[:1]})")
    load_after = load_average()
    out: dict[str, dict] = {}
    for (model, batch), ws in windows.items():
        if batch is None:
            out[model] = summarize_windows(ws, 1, (load_before, load_after), "wall")
        else:
            out.setdefault(model, {})[str(batch)] = summarize_windows(ws, batch, (load_before, load_after),
                                                                      plan.clock)
    return out
