"""The search of `fusionrank tune`, free of any server: knobs over the spec's serving section, a budgeted
coordinate descent from the hand-set spec, and the Pareto front of what it measured.

A configuration is a mapping knob name -> value. Each knob sets one field (`instances`, `concurrent_batches`,
`intra_op_threads`, `max_queue_delay_us`, `max_batch_size`, the switch `memory_arena`) of one or more models in
`serving.models`; a batch-size knob also keeps the preferred sizes that still fit (else the maximum alone). The search
measures the hand-set configuration first, then walks the knobs, the instance and concurrent-batch knobs of the
members the hand-set run found busiest first (`bottleneck_first`), the others in order of their expected effect: one
step up and one step down each; a step that raises capacity (candidates/s within the SLO) by more than `min_gain` is
taken and the walk goes on in that direction; a pass that takes no step ends the search, as does the budget
(evaluations or seconds, whichever ends first). A step that met the SLO and gained but was over the memory budget
(`--max-rss-mib`) is tried as a trade: with one instance fewer of each other model in turn (each instance is a process
holding its own runtime and graphs), the first trade that gains within the SLO and the budget taken. Like Triton Model
Analyzer's quick search, but over the whole pipeline's knobs, not one model's.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.spec import AdmissionSpec, BatchingSpec, PipelineSpec

FIELDS = ("instances", "concurrent_batches", "intra_op_threads", "max_queue_delay_us", "max_batch_size", "memory_arena")
SWITCHES = ("memory_arena",)  # on/off fields: searched as 0 and 1, set as false and true
PARALLEL_FIELDS = ("instances", "concurrent_batches")  # how many batches of a model run at once
ADMISSION_FIELDS = ("max_decoding_requests",)  # of `serving.admission`, not of a model (a knob naming no model)

Config = Mapping[str, int]
BUSY = 0.5  # a member whose instances computed at least this share of the run: its instance knob goes first


class TuneError(FusionRankError):
    """A knob, budget or overlay is invalid, or no configuration met the SLO."""


@dataclass(frozen=True)
class Knob:
    """One searched setting: `field` of every model in `models`, over `values` (ascending)."""

    name: str
    models: tuple[str, ...]
    field: str
    values: tuple[int, ...]

    def __post_init__(self):
        if self.field not in FIELDS + ADMISSION_FIELDS:
            known = ", ".join(FIELDS + ADMISSION_FIELDS)
            raise TuneError(f"knob {self.name}: field {self.field!r} is not one of {known}")
        if (self.field in ADMISSION_FIELDS) != (not self.models):
            raise TuneError(f"knob {self.name}: a serving.admission field names no model; a model field names some")
        if not self.values or list(self.values) != sorted(set(self.values)):
            raise TuneError(f"knob {self.name}: values {list(self.values)} must be ascending and distinct")

    def with_value(self, value: int) -> Knob:
        """The knob with `value` among its values (the hand-set value is always a candidate)."""
        return self if value in self.values else dataclasses.replace(self, values=tuple(sorted({*self.values, value})))


@dataclass(frozen=True)
class Trial:
    """One measured configuration: capacity in candidates/s, p99 in ms, whether it met the SLO, and why not."""

    config: dict[str, int]
    candidates_per_s: float
    p99_ms: float
    feasible: bool
    note: str = ""
    seconds: float = 0.0
    windows: tuple[float, ...] = ()  # candidates/s of each measured window (for the confirmation's test)
    busy: Mapping[str, float] = field(default_factory=dict)  # per member: share of the run its instances computed
    rss_mib: float | None = None  # resident memory of the server's processes at the end of the run
    over_memory: bool = False  # met the SLO, but held more than the memory budget

    @property
    def score(self) -> float:
        return self.candidates_per_s if self.feasible else -math.inf


@dataclass
class Budget:
    """At most `evaluations` measurements and `seconds` of wall time (a measurement is not started when the time
    left is below the mean measurement so far)."""

    evaluations: int = 12
    seconds: float = 900.0
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    spent: list[float] = field(default_factory=list)

    def __post_init__(self):
        if self.evaluations < 1 or not self.seconds > 0:
            raise TuneError(f"budget of {self.evaluations} evaluations and {self.seconds} s: both must be > 0")
        self.started = self.clock()

    def allows(self) -> bool:
        if len(self.spent) >= self.evaluations:
            return False
        left = self.seconds - (self.clock() - self.started)
        return left > (sum(self.spent) / len(self.spent) if self.spent else 0.0)


def handset(spec: PipelineSpec, knobs: Sequence[Knob]) -> tuple[dict[str, int], list[Knob]]:
    """The spec's own value of every knob (its first model's), each knob widened to hold it."""
    config, widened = {}, []
    for knob in knobs:
        owner = spec.serving.admission if knob.field in ADMISSION_FIELDS else spec.serving.batching(knob.models[0])
        value = int(getattr(owner, knob.field))  # a switch as 0 or 1
        config[knob.name] = value
        widened.append(knob.with_value(value))
    return config, widened


def _batching(current: BatchingSpec, knob_field: str, value: int) -> BatchingSpec:
    if knob_field in SWITCHES:
        return dataclasses.replace(current, **{knob_field: bool(value)})
    if knob_field != "max_batch_size":
        return dataclasses.replace(current, **{knob_field: value})
    preferred = tuple(b for b in current.preferred_batch_sizes if b <= value) or (value,)
    return dataclasses.replace(current, max_batch_size=value, preferred_batch_sizes=preferred)


def apply(spec: PipelineSpec, knobs: Sequence[Knob], config: Config) -> PipelineSpec:
    """The spec with `config`'s values set on every model each knob names (or on `serving.admission`); the route's
    waiting room follows its instance count (`_route_waiting_room`)."""
    models, admission = dict(spec.serving.models), spec.serving.admission
    for knob in knobs:
        if knob.name not in config:
            continue
        if knob.field in ADMISSION_FIELDS:
            admission = dataclasses.replace(admission, **{knob.field: config[knob.name]})
        for model in knob.models:
            models[model] = _batching(models.get(model, spec.serving.batching(model)), knob.field, config[knob.name])
    route = spec.serving.route
    admission = _route_waiting_room(admission, spec.serving.batching(route).instances,
                                    models.get(route, spec.serving.batching(route)).instances)
    return spec.with_overrides(serving=dataclasses.replace(spec.serving, models=models, admission=admission))


def _route_waiting_room(admission: AdmissionSpec, handset: int, instances: int) -> AdmissionSpec:
    """`admission` with the route's queue sized so that `instances` route instances hold as many waiting requests
    as the hand-set `handset` did: each instance's gate holds `route_queue.max_queue_size` of them, so one instance
    instead of two would halve the server's waiting room and refuse bursts the hand-set server queues (a tuned overlay
    with one route instance refused 3.2-5.2 % of open-loop arrivals at 0.8 of its capacity so, none with the room
    kept: docs/capacity.md). Throughput is searched; what the server admits is the spec's, whatever the count."""
    queue = admission.route_queue
    if instances == handset or queue.max_queue_size == 0:  # 0: unbounded
        return admission
    size = -(-queue.max_queue_size * handset // instances)  # rounded up: never less room than the hand-set's
    return dataclasses.replace(admission, route_queue=dataclasses.replace(queue, max_queue_size=size))


def overlay(spec: PipelineSpec, tuned: PipelineSpec) -> dict:
    """The spec overlay (YAML-ready) that turns `spec`'s serving models and searched admission fields into `tuned`'s;
    {} when they agree. An overlay replaces `serving.models` as a whole (a mapping keyed by name), so every model is
    written in full; `serving.admission` is a section, merged: only the fields that differ."""
    result: dict = {}
    models = {m: spec.serving.batching(m) for m in tuned.serving.models}
    if not (all(models[m] == b for m, b in tuned.serving.models.items()) and set(spec.serving.models) <= set(models)):
        result["models"] = {m: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(b).items()}
                            for m, b in tuned.serving.models.items()}
    admission = {f: getattr(tuned.serving.admission, f) for f in ADMISSION_FIELDS
                 if getattr(tuned.serving.admission, f) != getattr(spec.serving.admission, f)}
    size = tuned.serving.admission.route_queue.max_queue_size
    if size != spec.serving.admission.route_queue.max_queue_size:  # set by `apply` with the route's instances
        admission["route_queue"] = {"max_queue_size": size}
    if admission:
        result["admission"] = admission
    return {"serving": result} if result else {}


Measure = Callable[[dict[str, int]], Trial]


def bottleneck_first(knobs: Sequence[Knob], trial: Trial) -> list[Knob]:
    """The knobs with the instance and concurrent-batch knobs of the models `trial` found busiest first (by their
    busiest model's share), the others after them in their own order: on a machine whose bottleneck the hand-set
    spec did not expect, the budget goes to the step that can move it."""
    def busiest(knob: Knob) -> float:
        if knob.field not in PARALLEL_FIELDS:
            return 0.0
        return max((trial.busy.get(m, 0.0) for m in knob.models), default=0.0)

    return sorted(knobs, key=lambda k: -busiest(k) if busiest(k) >= BUSY else 0.0)


def coordinate_descent(knobs: Sequence[Knob], start: Config, measure: Measure, budget: Budget,
                       min_gain: float = 0.03, on_trial: Callable[[Trial], None] | None = None,
                       order: Callable[[Sequence[Knob], Trial], Sequence[Knob]] | None = None) -> list[Trial]:
    """Every trial measured, in order; the first is `start`. See the module docstring for the walk. `order` may
    reorder the knobs once the start is measured (`bottleneck_first`)."""
    trials: dict[tuple, Trial] = {}

    def run(config: dict[str, int]) -> Trial | None:
        key = tuple(sorted(config.items()))
        if key in trials:
            return trials[key]
        if not budget.allows():
            return None
        began = budget.clock()
        trial = measure(dict(config))
        budget.spent.append(budget.clock() - began)
        trials[key] = trial
        if on_trial:
            on_trial(trial)
        return trial

    best = run(dict(start))
    if best is None:
        return []
    if order is not None:
        knobs = list(order(knobs, best))
    improved = True
    while improved and budget.allows():
        improved = False
        for knob in knobs:
            for direction in (+1, -1):
                stepped = _walk(knob, direction, best, run, min_gain, knobs)
                improved = improved or stepped is not best
                best = stepped
    return list(trials.values())


def _walk(knob: Knob, direction: int, best: Trial, run: Callable[[dict[str, int]], Trial | None], min_gain: float,
          knobs: Sequence[Knob]) -> Trial:
    """`best` after stepping `knob` in `direction` while each step gains; a gaining step over the memory budget
    only is tried as a trade (`_trade`)."""
    while True:
        index = knob.values.index(best.config[knob.name]) + direction
        if not 0 <= index < len(knob.values):
            return best
        trial = run({**best.config, knob.name: knob.values[index]})
        if trial is not None and trial.over_memory and _gains(trial, best, min_gain):
            trial = _trade(trial, knob, best, run, min_gain, knobs)
        if trial is None or not _better(trial, best, min_gain):
            return best
        best = trial


def _trade(over: Trial, knob: Knob, best: Trial, run: Callable[[dict[str, int]], Trial | None], min_gain: float,
           knobs: Sequence[Knob]) -> Trial | None:
    """`over`'s configuration with one instance fewer of another model, the first that gains on `best` within the
    SLO and the memory budget; None when none does (or the budget ends)."""
    for other in knobs:
        if other is knob or other.field != "instances" or set(other.models) & set(knob.models):
            continue
        index = other.values.index(over.config[other.name]) - 1
        if index < 0:
            continue
        trial = run({**over.config, other.name: other.values[index]})
        if trial is None:
            return None
        if _better(trial, best, min_gain):
            return trial
    return None


def _gains(trial: Trial, best: Trial, min_gain: float) -> bool:
    return trial.candidates_per_s > best.candidates_per_s * (1 + min_gain)


def _better(trial: Trial, best: Trial, min_gain: float) -> bool:
    if not trial.feasible:
        return False
    if not best.feasible:
        return True
    return _gains(trial, best, min_gain)


def best_trial(trials: Sequence[Trial]) -> Trial:
    """The feasible trial of the most capacity; TuneError when none met the SLO."""
    feasible = [t for t in trials if t.feasible]
    if not feasible:
        raise TuneError(f"none of the {len(trials)} configurations measured met the SLO (and the memory budget, if "
                        f"one was given): " + "; ".join(t.note for t in trials[:3]))
    return max(feasible, key=lambda t: t.candidates_per_s)


def confirm(handset_trial: Trial, best: Trial, measure: Measure, rounds: int):
    """Hand-set and best measured again, interleaved, `rounds` times each; their windows' candidates/s (the search's
    own runs included) compared with a Mann-Whitney test and a noise floor (`benchmarks.lib.compare_samples`).
    Returns the comparison and the new trials."""
    from benchmarks.lib import compare_samples

    extra = []
    for _ in range(rounds):
        extra += [measure(dict(handset_trial.config)), measure(dict(best.config))]
    base = [w for t in (handset_trial, *extra[0::2]) for w in t.windows]
    tuned = [w for t in (best, *extra[1::2]) for w in t.windows]
    if not base or not tuned:
        raise TuneError("confirmation: a configuration gave no measured window")
    return compare_samples(base, tuned), extra


def after_confirmation(handset_runs: Sequence[Trial], tuned_runs: Sequence[Trial], gained: bool
                       ) -> tuple[Trial, str | None]:
    """The configuration to keep once the confirmation ran (each list: the search's run first, then the
    confirmation's) and, when it is not the tuned one for its gain, why. The tuned one when its gain survived the
    confirmation; else the hand-set when every run of it met the SLO and the memory budget; else the tuned one when
    every run of it did (the hand-set spec is then no safe default on this machine: a server that holds 1,638 MiB in
    one run and 1,496 in the next is over a 1,536-MiB budget half the time); else the hand-set (refused after)."""
    if gained:
        return tuned_runs[0], None
    out = [t.note for t in handset_runs if not t.feasible]
    if not out or not all(t.feasible for t in tuned_runs):
        return handset_runs[0], "the tuned configuration's gain did not survive the confirmation"
    return tuned_runs[0], (f"its gain did not survive the confirmation, but the hand-set configuration was outside "
                           f"the SLO or the memory budget in {len(out)} of {len(handset_runs)} runs "
                           f"({'; '.join(out)}) and the tuned one in none")


def pareto_front(trials: Sequence[Trial]) -> list[Trial]:
    """Trials no other trial beats on both throughput (higher) and p99 (lower), by throughput."""
    ok = [t for t in trials if math.isfinite(t.p99_ms) and t.candidates_per_s > 0]
    front = [t for t in ok if not any(o.candidates_per_s >= t.candidates_per_s and o.p99_ms <= t.p99_ms and
                                      (o.candidates_per_s > t.candidates_per_s or o.p99_ms < t.p99_ms) for o in ok)]
    return sorted(front, key=lambda t: t.candidates_per_s)
