"""`fusionrank tune`: the config search, from its flags to its report (see `benchmarks.tune.search`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget-seconds", type=float, default=900.0, help="wall-time budget of the search")
    parser.add_argument("--budget-evaluations", type=int, default=12, help="most configurations measured")
    parser.add_argument("--window", type=float, default=10.0, help="seconds per measurement window")
    parser.add_argument("--max-windows", type=int, default=5, help="most windows per configuration (3 must agree)")
    parser.add_argument("--callers", type=int, default=8, help="closed-loop callers")
    parser.add_argument("--candidates", type=int, default=16, help="candidates per request")
    parser.add_argument("--novel-share", type=float, default=1.0,
                        help="share of never-seen candidates (1.0: every candidate a cache miss, the cold route)")
    parser.add_argument("--knobs", default=None, help="comma-separated knob names to search (default: all)")
    parser.add_argument("--min-gain", type=float, default=0.03, help="smallest relative gain a step must bring")
    parser.add_argument("--confirm-rounds", type=int, default=1,
                        help="after the search, measure hand-set and tuned again this many times each, interleaved, "
                             "and test the difference (0: no confirmation)")
    parser.add_argument("--max-rss-mib", type=float, default=None,
                        help="memory budget: a configuration whose server processes hold more resident memory under "
                             "load is outside it, as one outside the SLO (default: none; the server-wide cache's "
                             "redis-server is not counted: it is bounded by serving.cache.lru_bytes)")
    parser.add_argument("--open-loop-share", type=float, default=0.8,
                        help="after the search, serve the chosen configuration under Poisson arrivals at this share "
                             "of its closed-loop capacity, then 0.75 and 0.5 of it until the SLO (p50, p95, p99, "
                             "errors) holds; a tuned overlay that holds it at none is refused (0: no check)")
    parser.add_argument("--open-loop-seconds", type=float, default=30.0, help="length of the open-loop check")
    parser.add_argument("--no-ranking-check", action="store_true", help="skip the ranking gates (not recommended)")
    parser.add_argument("--out", default=None, help="report folder (default: reports/tune-<time>)")


OPEN_LOOP_STEPS = (1.0, 0.75, 0.5)  # of --open-loop-share: the rates tried in turn until the SLO holds


def _open_check(args, measurer, best, is_handset: bool, facts: dict, out) -> None:
    """The chosen configuration under open-loop arrivals, from `--open-loop-share` of its capacity down by
    `OPEN_LOOP_STEPS` until the SLO holds, into `facts`; TuneError when a tuned configuration holds it at none (the
    hand-set spec is reported, not refused)."""
    from benchmarks.tune.search import TuneError

    if args.open_loop_share <= 0:
        return
    shares = [args.open_loop_share * step for step in OPEN_LOOP_STEPS]
    checks = measurer.open_checks(best.config, [s * best.candidates_per_s / args.candidates for s in shares],
                                  args.open_loop_seconds)
    which = "hand-set" if is_handset else "tuned"
    facts["open_loop"] = "; ".join(f"{share:.3g} x the {which} configuration's capacity for "
                                   f"{args.open_loop_seconds:g} s: {check.describe()}"
                                   for share, check in zip(shares, checks))
    out.write(f"{facts['open_loop']}\n")
    if not checks[-1].passed and not is_handset:
        raise TuneError(f"the tuned configuration fails the SLO under open-loop arrivals down to {shares[-1]:.3g} of "
                        f"its capacity, no overlay written: {checks[-1].describe()}")


def _knobs(spec, names: str | None):
    from benchmarks.tune.knobs import default_knobs
    from benchmarks.tune.search import TuneError

    knobs = default_knobs(spec)
    if not names:
        return knobs
    wanted = names.split(",")
    unknown = sorted(set(wanted) - {k.name for k in knobs})
    if unknown:
        raise TuneError(f"--knobs: unknown {', '.join(unknown)}; known: {', '.join(k.name for k in knobs)}")
    return [k for k in knobs if k.name in wanted]


def main(args: argparse.Namespace, out=sys.stdout) -> int:
    """Search, report, and refuse an overlay that fails the SLO or the ranking gates (exit 1)."""
    from benchmarks._args import repository_of, spec_of

    spec, repo = spec_of(args), repository_of(args)
    from benchmarks.lib import Stability, describe_machine, load_average
    from benchmarks.served import Stream
    from benchmarks.tune.measure import ConfigMeasurer, MeasureSettings
    from benchmarks.tune.report import write_report
    from benchmarks.tune.search import (
        Budget,
        TuneError,
        after_confirmation,
        apply,
        best_trial,
        bottleneck_first,
        confirm,
        coordinate_descent,
        handset,
        overlay,
    )
    from fusionrank.contract.project import default_spec_path, project_dir

    knobs = _knobs(spec, args.knobs)
    start, knobs = handset(spec, knobs)
    stream = Stream(candidates=args.candidates, callers=args.callers, novel_share=args.novel_share)
    settings = MeasureSettings(stream, args.window, Stability(3, 0.15, max(3, args.max_windows)),
                               max_rss_mib=args.max_rss_mib)
    facts = {"machine": describe_machine(), "load_before": load_average(),
             "stream": f"{args.callers} closed-loop callers, {args.candidates} candidates per request, "
                       f"{100 * args.novel_share:g}% never-seen, windows of {args.window:g} s",
             "slo": f"p99 <= {spec.slo.p99_ms:g} ms, error rate <= {spec.slo.max_error_rate:g}"
                    + ("" if args.max_rss_mib is None else f"; memory <= {args.max_rss_mib:g} MiB RSS")}
    out.write(f"fusionrank tune: {len(knobs)} knobs ({', '.join(k.name for k in knobs)}); {facts['machine']}\n")
    measurer = ConfigMeasurer(spec, repo, knobs, settings, ranking=not args.no_ranking_check)
    budget = Budget(args.budget_evaluations, args.budget_seconds)

    count = [0]

    def measure(config):
        began = time.monotonic()
        trial = measurer(config)
        trial = dataclasses.replace(trial, seconds=time.monotonic() - began)
        count[0] += 1
        out.write(f"  [{count[0]}] {trial.candidates_per_s:7.1f} candidates/s  p99 {trial.p99_ms:6.0f} ms  "
                  f"{trial.rss_mib or 0:5.0f} MiB  {'ok ' if trial.feasible else 'OUT'}  {config}  ({trial.note})\n")
        out.flush()
        return trial

    trials = coordinate_descent(knobs, start, measure, budget, args.min_gain, order=bottleneck_first)
    facts["load_after"] = load_average()
    budget_text = (f"{args.budget_evaluations} evaluations / {args.budget_seconds:g} s; used {len(trials)} in "
                   f"{time.monotonic() - budget.started:.0f} s")
    try:
        best = best_trial(trials)
        if args.confirm_rounds and best is not trials[0]:
            comparison, extra = confirm(trials[0], best, measure, args.confirm_rounds)
            facts["confirmation"] = (f"hand-set vs tuned candidates/s per window over {1 + args.confirm_rounds} "
                                     f"interleaved runs each: {comparison.describe()}")
            out.write(f"confirmation: {facts['confirmation']}\n")
            handset_runs, tuned_runs = [trials[0], *extra[0::2]], [best, *extra[1::2]]
            trials += extra
            # No gain beyond noise: the hand-set spec stays (an empty overlay) unless it broke the SLO or the memory
            # budget where the tuned one did not; the report says why.
            best, why = after_confirmation(handset_runs, tuned_runs, comparison.significant and comparison.change > 0)
            if why is not None:
                facts["kept_handset" if best is handset_runs[0] else "kept_tuned"] = why
        _open_check(args, measurer, best, best is trials[0], facts, out)
        tuned_overlay = overlay(spec, apply(spec, knobs, best.config))
        out_dir = Path(args.out) if args.out else project_dir() / "reports" / f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
        paths = write_report(out_dir, Path(args.spec) if args.spec else default_spec_path(), trials, best,
                             tuned_overlay, facts, budget_text)
    except TuneError as exc:
        out.write(f"fusionrank tune: {exc}\n")
        return 1
    ratio = best.candidates_per_s / trials[0].candidates_per_s if trials[0].candidates_per_s else float("nan")
    out.write(f"tuned {best.candidates_per_s:.1f} vs hand-set {trials[0].candidates_per_s:.1f} candidates/s "
              f"({ratio:.2f}x) within the SLO; {budget_text}\n")
    for name, path in paths.items():
        out.write(f"  {name}: {path}\n")
    return 0
