"""`fusionrank tune`'s search without a server: a fake measure function with a known optimum."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml

from benchmarks.server_metrics import breakdown
from benchmarks.tune.knobs import default_knobs
from benchmarks.tune.measure import busy_shares
from benchmarks.tune.report import merged_spec, write_report
from benchmarks.tune.search import (
    Budget,
    Knob,
    Trial,
    TuneError,
    after_confirmation,
    apply,
    best_trial,
    bottleneck_first,
    coordinate_descent,
    handset,
    overlay,
    pareto_front,
)
from tests.paths import CI_SPEC

KNOBS = [Knob("a", ("rank",), "instances", (1, 2, 3, 4, 5, 6)),
         Knob("b", ("image_encoder",), "intra_op_threads", (1, 2, 3, 4))]


def fake_measure(calls: list, slo_p99: float = 1000.0):
    """Capacity peaks at a=4, b=2; p99 grows with a; a=6 breaks the SLO."""

    def measure(config):
        calls.append(dict(config))
        a, b = config["a"], config["b"]
        capacity = 100.0 - 5 * (a - 4) ** 2 - 8 * (b - 2) ** 2
        p99 = 200.0 * a
        return Trial(dict(config), capacity, p99, p99 <= slo_p99, "")

    return measure


class Clock:
    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_descent_finds_the_optimum_from_the_handset_start_without_a_full_grid():
    calls = []
    trials = coordinate_descent(KNOBS, {"a": 1, "b": 1}, fake_measure(calls), Budget(evaluations=50))
    assert trials[0].config == {"a": 1, "b": 1}
    assert best_trial(trials).config == {"a": 4, "b": 2}
    assert len(calls) == len({tuple(sorted(c.items())) for c in calls})  # never measures a config twice
    assert len(calls) < 6 * 4  # fewer than the grid


def test_descent_never_steps_into_an_slo_violation():
    trials = coordinate_descent(KNOBS, {"a": 5, "b": 2}, fake_measure([], slo_p99=1000.0), Budget(evaluations=50))
    best = best_trial(trials)
    assert best.feasible and best.config["a"] <= 5
    assert any(not t.feasible for t in trials)  # a=6 was tried and refused


def test_budget_bounds_evaluations_and_seconds():
    calls = []
    coordinate_descent(KNOBS, {"a": 1, "b": 1}, fake_measure(calls), Budget(evaluations=3))
    assert len(calls) == 3
    calls = []
    # each measurement takes 10 s on this clock; 35 s leave room for 2, never a third that would overrun
    coordinate_descent(KNOBS, {"a": 1, "b": 1}, fake_measure(calls), Budget(evaluations=50, seconds=35,
                                                                          clock=Clock(5.0)))
    assert 1 <= len(calls) <= 3
    with pytest.raises(TuneError, match="budget"):
        Budget(evaluations=0)


def test_min_gain_keeps_the_handset_when_steps_are_noise():
    flat = [Trial({"a": 1, "b": 1}, 0, 0, True)]

    def measure(config):
        return Trial(dict(config), 100.0 + config["a"] * 0.5, 100.0, True)

    trials = coordinate_descent(KNOBS, {"a": 1, "b": 1}, measure, Budget(evaluations=50), min_gain=0.03)
    assert best_trial(trials[:1]).config == {"a": 1, "b": 1}
    assert len(trials) <= 4 and flat  # one step per direction of each knob, none taken


def test_best_trial_refuses_when_nothing_met_the_slo():
    with pytest.raises(TuneError, match="none of the 1"):
        best_trial([Trial({"a": 1}, 50.0, 9e9, False, "p99 9e9 ms > 3000 ms")])


def test_after_an_unconfirmed_gain_the_handset_stays_only_where_it_met_the_slo_and_budget_in_every_run():
    def runs(*feasible):
        return [Trial({}, 150.0, 900.0, ok, note="" if ok else "RSS 1638 MiB > 1536 MiB") for ok in feasible]

    handset_runs, tuned_runs = runs(True, True), runs(True, True)
    assert after_confirmation(handset_runs, tuned_runs, gained=True) == (tuned_runs[0], None)
    kept, why = after_confirmation(handset_runs, tuned_runs, gained=False)
    assert kept is handset_runs[0] and "did not survive" in why
    # The tune of this round: the hand-set over the memory budget in its search run, within it in the confirmation;
    # the tuned configuration within it in both. No gain beyond noise, yet only the tuned one is safe to serve.
    handset_runs = runs(False, True)
    kept, why = after_confirmation(handset_runs, tuned_runs, gained=False)
    assert kept is tuned_runs[0] and "1 of 2 runs" in why and "RSS 1638 MiB" in why
    # Neither safe in every run: the hand-set, which the caller then refuses (it is outside the SLO or budget).
    kept, _ = after_confirmation(handset_runs, runs(True, False), gained=False)
    assert kept is handset_runs[0]


def test_pareto_front():
    trials = [Trial({}, 100, 500, True), Trial({}, 120, 400, True), Trial({}, 150, 900, True),
              Trial({}, 90, 300, True), Trial({}, 10, math.inf, False)]
    assert [(t.candidates_per_s, t.p99_ms) for t in pareto_front(trials)] == [(90, 300), (120, 400), (150, 900)]


def test_knobs_apply_and_overlay_on_the_ci_spec(ci_spec, tmp_path):
    knobs = default_knobs(ci_spec, cores=2)
    start, knobs = handset(ci_spec, knobs)
    assert start["route.instances"] == ci_spec.serving.batching("rank").instances
    assert overlay(ci_spec, apply(ci_spec, knobs, start)) == {}
    tuned = apply(ci_spec, knobs, {**start, "encoders.max_batch_size": 64, "image_encoder.intra_op_threads": 2})
    ov = overlay(ci_spec, tuned)
    image = ov["serving"]["models"]["image_encoder"]
    assert (image["intra_op_threads"], image["max_batch_size"], image["preferred_batch_sizes"]) == (2, 64, [32, 64])
    assert ov["serving"]["models"]["text_encoder"]["max_batch_size"] == 64
    assert set(ov["serving"]["models"]) == set(ci_spec.serving.models)  # the mapping is replaced whole
    merged = merged_spec(CI_SPEC, ov, tmp_path)
    assert merged.serving.batching("image_encoder").intra_op_threads == 2
    assert merged.serving.batching("rank") == ci_spec.serving.batching("rank")
    # The gate's slots are a serving.admission field: the overlay holds only it, merged into the section.
    slots = apply(ci_spec, knobs, {**start, "route.max_decoding_requests": 3})
    assert overlay(ci_spec, slots) == {"serving": {"admission": {"max_decoding_requests": 3}}}
    merged = merged_spec(CI_SPEC, overlay(ci_spec, slots), tmp_path)
    assert merged.serving.admission == dataclasses.replace(ci_spec.serving.admission, max_decoding_requests=3)


def test_a_memory_arena_is_searched_as_0_or_1_and_written_as_a_switch(ci_spec, tmp_path):
    knobs = default_knobs(ci_spec, cores=2)
    start, knobs = handset(ci_spec, knobs)
    assert start["text_encoder.memory_arena"] == int(ci_spec.serving.batching("text_encoder").memory_arena)
    flipped = 1 - start["text_encoder.memory_arena"]
    tuned = apply(ci_spec, knobs, {**start, "text_encoder.memory_arena": flipped})
    assert tuned.serving.batching("text_encoder").memory_arena is bool(flipped)
    assert tuned.serving.batching("image_encoder") == ci_spec.serving.batching("image_encoder")
    ov = overlay(ci_spec, tuned)
    assert ov["serving"]["models"]["text_encoder"]["memory_arena"] is bool(flipped)
    assert merged_spec(CI_SPEC, ov, tmp_path).serving.batching("text_encoder").memory_arena is bool(flipped)


def test_fewer_route_instances_keep_the_servers_waiting_room(ci_spec, tmp_path):
    # Each route instance's gate holds route_queue.max_queue_size waiting requests: a configuration with fewer
    # instances gets a larger queue per instance, so the server queues what the hand-set one queued.
    knobs = default_knobs(ci_spec, cores=2)
    start, knobs = handset(ci_spec, knobs)
    handset_instances = ci_spec.serving.batching("rank").instances
    per_instance = ci_spec.serving.admission.route_queue.max_queue_size
    assert handset_instances >= 2 and per_instance > 0
    for instances in knobs[0].values:
        tuned = apply(ci_spec, knobs, {**start, "route.instances": instances})
        size = tuned.serving.admission.route_queue.max_queue_size
        assert size * instances >= per_instance * handset_instances > (size - 1) * instances
        assert tuned.serving.admission.route_queue.timeout_us == ci_spec.serving.admission.route_queue.timeout_us
    one = apply(ci_spec, knobs, {**start, "route.instances": 1})
    ov = overlay(ci_spec, one)
    assert ov["serving"]["admission"] == {"route_queue": {"max_queue_size": per_instance * handset_instances}}
    merged = merged_spec(CI_SPEC, ov, tmp_path)
    assert merged.serving.admission.route_queue == one.serving.admission.route_queue
    assert merged.serving.batching("rank").instances == 1
    # An unbounded queue (0) stays unbounded.
    unbounded = ci_spec.with_overrides(serving=dataclasses.replace(ci_spec.serving, admission=dataclasses.replace(
        ci_spec.serving.admission, route_queue=dataclasses.replace(ci_spec.serving.admission.route_queue,
                                                                   max_queue_size=0))))
    assert apply(unbounded, knobs, {**start, "route.instances": 1}).serving.admission.route_queue.max_queue_size == 0


def test_rendered_config_carries_intra_op_threads(ci_spec):
    from fusionrank.triton.render import rendered_files

    tuned = apply(ci_spec, [Knob("t", ("image_encoder",), "intra_op_threads", (1, 2))], {"t": 2})
    config = {f.path: f.content for f in rendered_files(tuned)}["image_encoder/configs/cpu.pbtxt"]
    assert b'key: "intra_op_threads"\n  value {\n    string_value: "2"' in config


def test_rendered_config_carries_concurrent_batches_only_where_above_one(ci_spec):
    from fusionrank.triton.render import rendered_files

    tuned = apply(ci_spec, [Knob("c", ("text_encoder",), "concurrent_batches", (1, 2))], {"c": 2})
    files = {f.path: f.content for f in rendered_files(tuned)}
    assert b'key: "concurrent_batches"\n  value {\n    string_value: "2"' in files["text_encoder/configs/cpu.pbtxt"]
    assert b"concurrent_batches" not in files["image_encoder/configs/cpu.pbtxt"]
    assert b"concurrent_batches" not in files["text_encoder/config.pbtxt"], "only the CPU profile's class reads it"


def _scrape(model: str, executions: int, compute_us: float, batch_compute_us: float | None = None) -> str:
    lines = [f'nv_inference_request_success{{model="{model}",version="1"}} {executions}',
             f'nv_inference_exec_count{{model="{model}",version="1"}} {executions}',
             f'nv_inference_compute_infer_duration_us{{model="{model}",version="1"}} {compute_us}']
    if batch_compute_us is not None:
        lines += ["# TYPE fusionrank_batch_compute_us counter",
                  f'fusionrank_batch_compute_us{{model="{model}",instance="{model}_0_0"}} {batch_compute_us}']
    return "\n".join(lines) + "\n"


def test_a_member_running_concurrent_batches_is_timed_by_its_own_count_not_tritons_hand_off(ci_spec):
    """10 batches of one request, 100 ms each, over 1 s. One at a time: Triton's compute time is the batch. Two at
    once: Triton times only the hand-off (1 ms); the member's own counter holds the batches, shared by two slots."""
    concurrent = apply(ci_spec, [Knob("c", ("text_encoder",), "concurrent_batches", (1, 2))], {"c": 2})
    after = _scrape("text_encoder", 10, 10 * 1e3, 10 * 100e3) + _scrape("image_encoder", 10, 10 * 100e3)
    busy = busy_shares(concurrent, "", after, seconds=1.0)
    assert busy["text_encoder"] == pytest.approx(0.5)
    assert busy["image_encoder"] == pytest.approx(1.0)
    # The per-member table (`bench serve`) shows the member's own batch time as a request's compute time.
    text, image = breakdown("", after, ["text_encoder", "image_encoder"])
    assert (text.compute_ms, text.request_ms, image.compute_ms) == pytest.approx((100.0, 100.0, 100.0))


def test_refusal(ci_spec, tmp_path):
    bad = Trial({"a": 1}, 10.0, 5000.0, False, "p99 5000 ms > 3000 ms")
    with pytest.raises(TuneError, match="refusing the overlay"):
        write_report(tmp_path / "r", CI_SPEC, [bad], bad, {}, {}, "1 evaluation")
    assert not (tmp_path / "r").exists()
    knob = [Knob("t", ("image_encoder",), "intra_op_threads", (1, 2))]
    broken = overlay(ci_spec, apply(ci_spec, knob, {"t": 2}))
    broken["serving"]["models"]["image_encoder"]["intra_op_threads"] = -1
    good = Trial({"t": 2}, 10.0, 500.0, True)
    with pytest.raises(Exception, match="intra_op_threads"):
        write_report(tmp_path / "s", CI_SPEC, [good], good, broken, {}, "1 evaluation")
    assert not (tmp_path / "s" / "tune.overlay.yaml").exists()


def test_report_files(ci_spec, tmp_path):
    from fusionrank.contract.spec import load_spec

    trials = [Trial({"a": 1}, 100.0, 800.0, True, "p99 ok"), Trial({"a": 2}, 130.0, 900.0, True, "p99 ok"),
              Trial({"a": 3}, 140.0, 4000.0, False, "p99 4000 ms > 3000 ms")]
    ov = overlay(ci_spec, apply(ci_spec, [Knob("r", ("rank",), "instances", (2, 3))], {"r": 2}))
    facts = {"machine": "cpu (2 cores; avx2; load 1)", "load_before": [1], "load_after": [1], "stream": "s",
             "slo": "p99 <= 3000 ms"}
    paths = write_report(tmp_path, CI_SPEC, trials, trials[1], ov, facts, "3 evaluations")
    assert "1.30x" in paths["report"].read_text()
    assert yaml.safe_load(paths["overlay"].read_text())["base"] == str(CI_SPEC.resolve())
    tuned = load_spec(paths["overlay"])  # usable as --spec as it is
    assert tuned.serving.batching("rank").instances == 2
    assert tuned.serving.batching("image_encoder") == ci_spec.serving.batching("image_encoder")
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_overlay_repository_writes_configs_and_links_weights(ci_spec, tmp_path):
    from benchmarks.lib.repository import overlay_repository
    from fusionrank.triton.render import render_repository

    repo = tmp_path / "repo"
    render_repository(ci_spec, repo)
    weights = repo / "image_encoder" / "1" / "model.opt.onnx"
    weights.write_bytes(b"not really a graph")
    tuned = apply(ci_spec, [Knob("t", ("image_encoder",), "intra_op_threads", (1, 2))], {"t": 2})
    with overlay_repository(tuned, repo) as root:
        linked = root / "image_encoder" / "1" / "model.opt.onnx"
        assert linked.is_symlink() and linked.read_bytes() == b"not really a graph"
        config = (root / "image_encoder" / "configs" / "cpu.pbtxt").read_text()
        assert 'string_value: "2"' in config and not (root / "image_encoder" / "configs" / "cpu.pbtxt").is_symlink()
    assert not root.exists()
    assert 'string_value: "2"' not in (repo / "image_encoder" / "configs" / "cpu.pbtxt").read_text()


def test_confirm_interleaves_and_tests_the_windows():
    from benchmarks.tune.search import confirm

    order = []

    def measure(config):
        order.append(config["a"])
        rate = 130.0 if config["a"] == 2 else 100.0
        return Trial(dict(config), rate, 500.0, True, windows=(rate - 1, rate, rate + 1))

    base = Trial({"a": 1}, 100.0, 500.0, True, windows=(99.0, 100.0, 101.0))
    best = Trial({"a": 2}, 130.0, 500.0, True, windows=(129.0, 130.0, 131.0))
    comparison, extra = confirm(base, best, measure, rounds=2)
    assert order == [1, 2, 1, 2] and len(extra) == 4
    assert comparison.significant and comparison.change > 0.25 and comparison.baseline_n == 9
    noisy = Trial({"a": 2}, 101.0, 500.0, True, windows=(98.0, 101.0, 103.0))
    comparison, _ = confirm(base, noisy, lambda c: Trial(dict(c), 100.0, 500.0, True, windows=(99.0, 101.0)), 1)
    assert not comparison.significant


def test_the_busiest_members_parallel_knobs_are_searched_first(ci_spec):
    """Concurrent batches (threads on one session) before instances (a process each): the cheaper step first."""
    knobs = default_knobs(ci_spec, cores=2)
    start = Trial({}, 100.0, 500.0, True, busy={"text_encoder": 0.93, "image_encoder": 0.6, "audio_encoder": 0.1})
    ordered = bottleneck_first(knobs, start)
    assert [k.name for k in ordered[:4]] == ["other_encoders.concurrent_batches", "other_encoders.instances",
                                             "image_encoder.concurrent_batches", "image_encoder.instances"]
    assert sorted(k.name for k in ordered) == sorted(k.name for k in knobs)
    first = {k.name for k in ordered[:4]}
    assert [k.name for k in ordered[4:]] == [k.name for k in knobs if k.name not in first], "the others keep order"
    idle = Trial({}, 100.0, 500.0, True, busy={"text_encoder": 0.2})
    assert bottleneck_first(knobs, idle) == knobs, "no busy member: the expected-effect order"


def test_a_configuration_over_the_memory_budget_is_outside_it_and_the_report_shows_each_trials_memory(ci_spec,
                                                                                                     tmp_path):
    from benchmarks.tune.measure import within_memory

    trial = Trial({"a": 2}, 130.0, 900.0, True, "p99 ok")
    assert within_memory(trial, 1200.0, None) == dataclasses.replace(trial, rss_mib=1200.0)
    assert within_memory(trial, 1200.0, 1500.0).feasible
    over = within_memory(trial, 1800.0, 1500.0)
    assert not over.feasible and over.score == -math.inf
    assert over.note == "RSS 1800 MiB > 1500 MiB (--max-rss-mib); p99 ok"
    assert over.over_memory, "met the SLO: memory alone keeps it out (the search may retry it)"
    assert not within_memory(dataclasses.replace(trial, feasible=False), 1800.0, 1500.0).over_memory
    handset = within_memory(Trial({"a": 1}, 100.0, 800.0, True, "p99 ok"), 1100.0, 1500.0)
    assert best_trial([handset, over]) is handset, "the faster configuration over the budget is not chosen"
    ov = overlay(ci_spec, apply(ci_spec, [Knob("r", ("rank",), "instances", (2, 3))], {"r": 2}))
    facts = {"machine": "cpu", "load_before": [1], "load_after": [1], "stream": "s", "slo": "p99 <= 3000 ms"}
    report = write_report(tmp_path, CI_SPEC, [handset, over], handset, ov, facts, "2 evaluations")["report"]
    rows = [line for line in report.read_text().splitlines() if line.startswith("| ") and "MiB (--max" in line]
    assert len(rows) == 1 and "| 1800 | no |" in rows[0]


def test_a_gaining_step_over_the_memory_budget_is_tried_as_a_trade_for_another_models_instance():
    """A third encoder instance gains but does not fit beside two route instances: the search tries it with one
    route instance fewer at once (a budget of 4 evaluations; stepping one knob at a time needs 7 to get there)."""
    knobs = [Knob("enc", ("text_encoder",), "instances", (1, 2, 3)), Knob("route", ("rank",), "instances", (1, 2, 3)),
             Knob("delay", ("rank",), "max_queue_delay_us", (500, 1000, 2000))]
    calls = []

    def measure(config):
        calls.append(dict(config))
        capacity = 100.0 + 30 * config["enc"] - 5 * config["route"]
        rss = 500.0 * config["route"] + 400.0 * config["enc"]
        over = rss > 1800.0
        return Trial(dict(config), capacity, 500.0, not over, "", rss_mib=rss, over_memory=over)

    trials = coordinate_descent(knobs, {"enc": 1, "route": 2, "delay": 1000}, measure, Budget(evaluations=4))
    assert [(c["enc"], c["route"]) for c in calls] == [(1, 2), (2, 2), (3, 2), (3, 1)]
    assert best_trial(trials).config == {"enc": 3, "route": 1, "delay": 1000}
    calls.clear()
    trials = coordinate_descent(knobs, {"enc": 1, "route": 2, "delay": 1000}, measure, Budget(evaluations=50))
    assert best_trial(trials).config == {"enc": 3, "route": 1, "delay": 1000}
    assert len(calls) == len({tuple(sorted(c.items())) for c in calls}), "never measures a config twice"


def _open_result(latencies_ms, errors=0, dropped=0):
    from benchmarks.lib.driver import LoadResult, LoopMode, Sample

    samples = [Sample(float(k), ms / 1000.0, True) for k, ms in enumerate(latencies_ms)]
    samples += [Sample(float(len(samples) + k), 0.01, False, "UNAVAILABLE: over capacity") for k in range(errors)]
    return LoadResult(LoopMode.OPEN, samples, 30.0, offered_rate=5.0, arrivals=len(samples) + dropped,
                      dropped=dropped)


def test_the_open_loop_check_holds_each_percentile_and_the_error_rate_to_the_slo(ci_spec):
    """`tune`'s last step: the chosen configuration under Poisson arrivals, judged on p50, p95, p99 and errors
    (drops included); a p99 from too few samples is the largest latency."""
    from benchmarks.tune.measure import judge_open

    slo = ci_spec.slo
    quiet = judge_open(_open_result([slo.p50_ms * 0.5] * 400), ci_spec)
    assert quiet.passed and quiet.answered == 400 and quiet.failed == 0
    assert "within the SLO" in quiet.describe() and "5.00 req/s" in quiet.describe()
    slow_median = judge_open(_open_result([slo.p50_ms * 1.2] * 400), ci_spec)
    assert not slow_median.passed and slow_median.problems[0].startswith("p50 ")
    tail = judge_open(_open_result([100.0] * 392 + [slo.p99_ms + 500.0] * 8), ci_spec)
    assert [p.split()[0] for p in tail.problems] == ["p99"]
    few = judge_open(_open_result([100.0] * 40 + [(slo.p95_ms + slo.p99_ms) / 2]), ci_spec)  # too few for p95, p99
    assert [p.split()[0] for p in few.problems] == ["p95"], "the largest latency is held to p95 and p99"
    refused = judge_open(_open_result([100.0] * 390, errors=6, dropped=4), ci_spec)
    assert refused.failed == 10 and refused.arrivals == 400
    assert any(p.startswith("error rate 0.025") for p in refused.problems), refused.problems
    assert not judge_open(_open_result([], errors=3), ci_spec).passed


def test_the_open_loop_check_steps_down_until_the_slo_holds_and_refuses_a_tuned_overlay_that_holds_it_nowhere():
    import argparse
    import io

    from benchmarks.tune.cli import _open_check
    from benchmarks.tune.measure import OpenCheck

    class Measurer:
        def __init__(self, passing_from: float):
            self.passing_from, self.rates = passing_from, []

        def open_checks(self, config, rates, seconds):
            checks = []
            for rate in rates:
                self.rates.append(rate)
                checks.append(OpenCheck(rate, 10, 10, 0, {"p50": 1.0}, () if rate <= self.passing_from else ("p50",)))
                if checks[-1].passed:
                    break
            return checks

    args = argparse.Namespace(open_loop_share=0.8, open_loop_seconds=20.0, candidates=16)
    best = Trial({"a": 2}, 160.0, 900.0, True)  # 10 requests/s
    facts, measurer = {}, Measurer(passing_from=6.5)
    _open_check(args, measurer, best, False, facts, io.StringIO())
    assert measurer.rates == pytest.approx([8.0, 6.0]) and facts["open_loop"].count("open loop at") == 2
    with pytest.raises(TuneError, match="down to 0.4 of its capacity"):
        _open_check(args, Measurer(passing_from=1.0), best, False, {}, io.StringIO())
    facts = {}
    _open_check(args, Measurer(passing_from=1.0), best, True, facts, io.StringIO())  # the hand-set: reported
    assert "OUTSIDE the SLO" in facts["open_loop"]
