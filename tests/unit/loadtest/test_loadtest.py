"""Load test: scenarios, SLO files and verdicts, metrics diffs, report files; then Locust against the real server."""

from __future__ import annotations

import io
import subprocess
import sys
import time
import types

import numpy as np
import psutil
import pytest
from PIL import Image

from benchmarks import server_metrics as metrics
from fusionrank.contract.spec import Modality, PipelineSpec, load_spec
from fusionrank.contract.tensors import MODALITY_PRESENT
from fusionrank.request.scenario import (
    SCENARIO_DIR,
    RequestFactory,
    Scenario,
    ScenarioError,
    load_scenario,
    parse_duration,
)
from loadtest.report import (
    Samples,
    Verdict,
    evaluate_slo,
    read_samples,
    summarize_samples,
    write_plots,
    write_summary,
)
from loadtest.runner import run_locust
from loadtest.slo import CI_SLO, Slo, load_slo
from tests.paths import REPO_ROOT

# --- scenarios and SLO files ---------------------------------------------------------------------------------------


def test_shipped_scenarios_load():
    default, ci = load_scenario(), load_scenario("ci")
    assert default.name == "default" and default.run_seconds == 30 and default.pacing.mode == "target_rps"
    assert ci.name == "ci" and ci.pacing.mode == "target_rps" and ci.run_seconds <= 15
    assert ci.source == str(SCENARIO_DIR / "ci.yaml")
    assert default.max_candidates <= PipelineSpec().serving.max_candidates
    heavy = load_scenario("heavy")
    assert heavy.users > default.users and heavy.max_candidates <= PipelineSpec().serving.max_candidates
    for scenario in (default, ci, heavy):  # a real catalogue's mix: items without audio, video items as clips
        assert scenario.audio_presence < 1 and scenario.video_share > 0, scenario.name


@pytest.mark.parametrize("text,field", [
    ("name: x\nusers: 0\n", "users"),
    ("name: x\ncandidates: {0: 1}\n", "candidates"),
    ("name: x\npacing: {mode: open_loop}\n", "pacing.mode"),
    ("name: x\npacing: {mode: target_rps}\n", "pacing.target_rps"),
    ("name: x\nrun_time: soon\n", "run_time"),
    ("name: x\nrepeat_share: 1.5\n", "repeat_share"),
    ("name: x\nthink_time: 1\n", "think_time"),
])
def test_bad_scenario_fields_are_named(tmp_path, text, field):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=f"field '{field}'"):
        load_scenario(path)


def test_release_gate_comes_from_the_spec_with_its_scenario_overrides():
    spec = load_spec()
    gate, ci = load_slo(spec, "default"), load_slo(spec, "ci")
    assert gate.targets() == {k: float(getattr(spec.slo, k)) for k in gate.targets()} and len(gate.targets()) == 5
    assert ci.min_throughput_rps == spec.slo.scenarios["ci"].min_throughput_rps != gate.min_throughput_rps
    assert ci.p95_ms == gate.p95_ms


def test_slo_layers_spec_file_and_scenario(tmp_path):
    path = tmp_path / "slo.yaml"
    path.write_text("p95_ms: 900\nmin_throughput_rps: null\nscenarios:\n  fast: {p50_ms: 100}\n")
    spec = PipelineSpec()
    plain, fast = load_slo(spec, path=path), load_slo(spec, scenario="fast", path=path)
    assert plain.p50_ms == spec.slo.p50_ms and plain.p95_ms == 900 and plain.min_throughput_rps is None
    assert fast.p50_ms == 100 and "min_throughput_rps" not in fast.targets()
    path.write_text("p95_ms: -1\n")
    with pytest.raises(ScenarioError, match="p95_ms"):
        load_slo(spec, path=path)
    path.write_text("p96_ms: 1\n")
    with pytest.raises(ScenarioError, match="p96_ms"):
        load_slo(spec, path=path)
    ci = load_slo(spec, path=CI_SLO)
    assert ci.p50_ms >= 10 * spec.slo.p50_ms / 2 and ci.p95_ms is None and ci.p99_ms is None


def test_parse_duration():
    assert [parse_duration(x) for x in ("30s", "2m", "1h30m", "1m30s", "45", 12)] == [30, 120, 5400, 90, 45, 12]
    with pytest.raises(ValueError):
        parse_duration("soon")


# --- SLO verdict and summary ---------------------------------------------------------------------------------------


def _samples(latencies, ok=None, candidates=5, spacing=0.1) -> Samples:
    lat = np.asarray(latencies, dtype=float)
    return Samples(start=1000.0 + spacing * np.arange(len(lat)), latency_ms=lat,
                   candidates=np.full(len(lat), candidates, dtype=np.int64),
                   ok=np.ones(len(lat), bool) if ok is None else np.asarray(ok, bool))


def test_summary_percentiles_error_rate_and_throughput():
    lat = np.arange(1, 101, dtype=float)  # 1..100 ms
    ok = np.ones(100, bool)
    ok[:2] = False
    s = summarize_samples(_samples(lat, ok, spacing=0.1))
    assert s["requests"] == 100 and s["failures"] == 2 and s["error_rate"] == pytest.approx(0.02)
    assert s["p50_ms"] == pytest.approx(np.percentile(lat[2:], 50))
    assert s["p99_ms"] == pytest.approx(np.percentile(lat[2:], 99))
    duration = 99 * 0.1 + 0.1  # last request starts at 9.9 s and takes 100 ms
    assert s["duration_s"] == pytest.approx(duration) and s["throughput_rps"] == pytest.approx(98 / duration)


def test_slo_evaluation_names_what_was_missed():
    slo = Slo(p50_ms=50, p95_ms=90, p99_ms=None, max_error_rate=0.01, min_throughput_rps=20)
    summary = {"p50_ms": 40.0, "p95_ms": 95.0, "p99_ms": 99.0, "error_rate": 0.0, "throughput_rps": 10.0,
               "latency_samples": 500}
    checks = {c.name: c for c in evaluate_slo(slo, summary)}
    assert set(checks) == {"p50_ms", "p95_ms", "max_error_rate", "min_throughput_rps"}
    assert checks["p50_ms"].passed and checks["max_error_rate"].passed
    assert not checks["p95_ms"].passed and not checks["min_throughput_rps"].passed
    verdict = Verdict(list(checks.values()), {**summary, "requests": 10, "duration_s": 1.0}, scenario="t",
                      slo_source="slo.yaml")
    text = verdict.render()
    assert not verdict.passed
    assert "SLO p95_ms MISSED: measured 95.0, target <= 90.0" in text
    assert "SLO min_throughput_rps MISSED: measured 10.0, target >= 20.0" in text
    assert "SLO verdict: FAIL" in text
    nan_check = evaluate_slo(Slo(p50_ms=1e9), {"p50_ms": float("nan"), "latency_samples": 500})[0]
    assert not nan_check.passed  # nothing measured never passes
    assert Verdict(evaluate_slo(Slo(p50_ms=50), summary), summary).passed


def test_a_percentile_with_too_few_samples_never_passes_and_says_how_many_it_needs():
    # A 6-s run at 6 req/s: 36 requests. Its "p99" is its maximum; the gate refuses it instead of passing it.
    summary = {"p50_ms": 40.0, "p95_ms": 60.0, "p99_ms": 61.0, "error_rate": 0.0, "throughput_rps": 6.0,
               "latency_samples": 36, "requests": 36, "duration_s": 6.0}
    checks = {c.name: c for c in evaluate_slo(Slo(p50_ms=1000, p95_ms=1000, p99_ms=1000), summary)}
    assert checks["p50_ms"].passed and checks["p50_ms"].supported
    assert not checks["p95_ms"].passed and checks["p95_ms"].needed == 72
    assert not checks["p99_ms"].passed and checks["p99_ms"].needed == 368
    verdict = Verdict(list(checks.values()), summary, scenario="t", slo_source="s.yaml")
    text = verdict.render()
    assert not verdict.passed and "SLO verdict: FAIL" in text
    assert "SLO p99_ms NOT SUPPORTED: 36 successful requests, p99 needs >= 368" in text
    assert "36/368" in text and "TOO FEW" in text
    # a summary without a sample count cannot support any percentile either
    assert not evaluate_slo(Slo(p50_ms=1000), {"p50_ms": 1.0})[0].passed


def test_an_open_loops_throughput_is_judged_at_its_offered_rate():
    # `make demo`'s run: 1.2 arrivals/s for 30 s drew 29 due arrivals, every one answered, 29 s first to last: 1.0/s
    # of successful requests, which judged the draw, not the server.
    slo = Slo(min_throughput_rps=1.0)
    summary = {"throughput_rps": 0.97, "requests": 29, "failures": 0, "latency_samples": 29,
               "pacing": {"mode": "open", "offered_rate": 1.2, "arrivals": 29, "late": 0}}
    (check,) = evaluate_slo(slo, summary)
    assert check.passed and check.measured == pytest.approx(1.2)
    # A server that answered 24 of 30 due arrivals (the rest failed, or were never sent while every user waited)
    # sustained 0.96/s of the offered 1.2.
    behind = {**summary, "requests": 27, "failures": 3, "pacing": {**summary["pacing"], "arrivals": 30}}
    (check,) = evaluate_slo(slo, behind)
    assert not check.passed and check.measured == pytest.approx(1.2 * 24 / 30)
    # A closed loop, or a schedule not counted, keeps successful requests per second.
    for pacing in ({"mode": "closed"}, {"mode": "open", "offered_rate": 1.2, "arrivals": 0}):
        (check,) = evaluate_slo(slo, {**summary, "pacing": pacing})
        assert not check.passed and check.measured == pytest.approx(0.97)


def test_the_demo_gates_its_30_s_load_test_on_the_slos_it_has_the_samples_for():
    from fusionrank_cli.demo import demo_gate

    # What `make demo`'s 30-s run sends: about 30 requests, too few for a p95 or a p99.
    summary = {"p50_ms": 300.0, "p95_ms": 560.0, "p99_ms": 610.0, "error_rate": 0.0, "throughput_rps": 1.0,
               "latency_samples": 29, "requests": 29, "duration_s": 29.0}
    slo = Slo(p50_ms=800, p95_ms=2000, p99_ms=3000, max_error_rate=0.01)
    verdict = Verdict(evaluate_slo(slo, summary), summary)
    passed, line = demo_gate(verdict)
    assert not verdict.passed and passed  # the load test's own gate refuses; the demo judges what it can
    assert line.startswith("demo gate: PASS") and "p50_ms" in line and "p99_ms: too few requests for a verdict" in line
    slow = Verdict(evaluate_slo(slo, {**summary, "p50_ms": 900.0}), summary)
    assert demo_gate(slow)[0] is False and demo_gate(slow)[1].startswith("demo gate: FAIL")
    failing = Verdict(evaluate_slo(slo, {**summary, "error_rate": 0.2}), summary)
    assert demo_gate(failing)[0] is False


# --- Triton metrics ------------------------------------------------------------------------------------------------

_SCRAPE = """# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="text_encoder",version="1"}} {ok_t}
nv_inference_request_success{{model="fusion_ranker",version="1"}} {ok_f}
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{{model="text_encoder",version="1"}} {n_t}
nv_inference_count{{model="fusion_ranker",version="1"}} {n_f}
# HELP nv_inference_exec_count Number of model executions performed (does not include cached requests)
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{{model="text_encoder",version="1"}} {e_t}
nv_inference_exec_count{{model="fusion_ranker",version="1"}} {e_f}
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{{model="text_encoder",version="1"}} {q_t}
nv_inference_queue_duration_us{{model="fusion_ranker",version="1"}} {q_f}
# HELP nv_inference_compute_infer_duration_us Cumulative compute inference duration in microseconds
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{{model="text_encoder",version="1"}} {c_t}
nv_inference_compute_infer_duration_us{{model="fusion_ranker",version="1"}} {c_f}
# HELP nv_inference_compute_input_duration_us Cumulative compute input duration in microseconds
# TYPE nv_inference_compute_input_duration_us counter
nv_inference_compute_input_duration_us{{model="text_encoder",version="1"}} {i_t}
nv_inference_compute_input_duration_us{{model="fusion_ranker",version="1"}} 0
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.5
"""


def test_metrics_diff_per_member():
    before = _SCRAPE.format(ok_t=10, ok_f=10, n_t=50, n_f=50, e_t=20, e_f=10, q_t=1000, q_f=0, c_t=20000, c_f=5000,
                            i_t=1000)
    after = _SCRAPE.format(ok_t=30, ok_f=30, n_t=250, n_f=250, e_t=40, e_f=30, q_t=41000, q_f=2000, c_t=120000,
                           c_f=25000, i_t=21000)
    stats = {s.model: s for s in metrics.breakdown(before, after, ["text_encoder", "fusion_ranker", "absent"])}
    text = stats["text_encoder"]
    assert (text.requests, text.inferences, text.executions) == (20, 200, 20)
    assert text.avg_batch == pytest.approx(10.0)
    assert text.queue_ms == pytest.approx(40000 / 20 / 1000)  # 2 ms queued per request
    assert text.compute_ms == pytest.approx((100000 + 20000) / 20 / 1000)  # infer + input, 6 ms per request
    assert stats["fusion_ranker"].avg_batch == pytest.approx(200 / 20)
    assert stats["absent"].requests == 0 and stats["absent"].avg_batch == 0.0
    table = metrics.format_table(list(stats.values()))
    assert "text_encoder" in table and "10.00" in table


_ROUTE_SCRAPE = """# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="rank",version="1"}} {ok}
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{{model="rank",reason="REJECTED",version="1"}} {rejected}
# TYPE nv_inference_request_duration_us counter
nv_inference_request_duration_us{{model="rank",version="1"}} {us}
# HELP fusionrank_route_responses Responses of the route by the gRPC status the caller sees
# TYPE fusionrank_route_responses counter
fusionrank_route_responses{{code="OK",instance="rank_0_0",model="rank"}} {route_ok}
fusionrank_route_responses{{code="INVALID_ARGUMENT",instance="rank_0_0",model="rank"}} {invalid}
fusionrank_route_responses{{code="CANCELLED",instance="rank_0_1",model="rank"}} {cancelled}
"""


def test_metrics_take_the_routes_failures_from_its_own_counter():
    # Triton 2.51 counts the route's 3 error answers (2 INVALID_ARGUMENT, 1 CANCELLED) among its 13 successes.
    before = _ROUTE_SCRAPE.format(ok=5, rejected=0, us=5000, route_ok=5, invalid=0, cancelled=0)
    after = _ROUTE_SCRAPE.format(ok=18, rejected=1, us=31000, route_ok=15, invalid=2, cancelled=1)
    (route,) = metrics.breakdown(before, after, ["rank"])
    assert (route.requests, route.failures) == (10, 4)
    assert route.request_ms == pytest.approx(26000 / 13 / 1000)  # Triton times every answer it counted


# --- requests ------------------------------------------------------------------------------------------------------


def _png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size + 10), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


class _FakeBench:
    """The Benchmark surface RequestFactory uses: items and session histories; every third item has a video."""

    def __init__(self, n_items=50, length=20):
        self.num_items = n_items
        image = _png(40)
        self._items = {i: types.SimpleNamespace(item_id=i, title=f"title of item {i}", image_bytes=lambda: image,
                                                audio_bytes=lambda i=i: b"RIFF-audio-%d" % i,
                                                video_path="v.mp4" if i % 3 == 0 else None,
                                                video_bytes=lambda i=i: b"video-%d" % i)
                       for i in range(1, n_items + 1)}
        history = np.zeros((6, length), np.int64)
        history[:, -3:] = [[1, 2, 3]] * 6
        self.sessions = types.SimpleNamespace(history=history)

    def item(self, item_id):
        return self._items[int(item_id)]


def test_request_factory_follows_the_scenario():
    spec = PipelineSpec()
    scenario = Scenario(name="t", candidates={2: 1.0, 6: 3.0}, text_words=(2, 2), image_sizes=(24,),
                        audio_presence=0.0, repeat_share=1.0, hot_items=4)
    bench = _FakeBench()
    factory = RequestFactory(spec, bench, scenario, seed=3)
    sizes = []
    for _ in range(40):
        request = factory.next()
        items, history, n = request.items, request.history, len(request)
        sizes.append(n)
        assert set(items) == set(spec.modalities.enabled) and all(len(v) == n for v in items.values())
        assert history.shape == (n, spec.ranker.history.length) and history.dtype == np.int64
        assert all(len(t.split()) == 2 for t in items[Modality.TEXT])
        assert all(Image.open(io.BytesIO(b)).size == (24, 24) for b in items[Modality.IMAGE])
        assert items[Modality.AUDIO] == [None] * n and request.videos is None  # audio absent, not a silent WAV
        assert request.arrays()[MODALITY_PRESENT][:, 2].tolist() == [False] * n
    assert set(sizes) == {2, 6} and sizes.count(6) > sizes.count(2)
    titles = {t for _ in range(10) for t in factory.next().items[Modality.TEXT]}
    assert len(titles) <= 4  # every candidate from the 4 hot items
    again = RequestFactory(spec, bench, scenario, seed=3)
    assert [len(again.next()) for _ in range(40)] == sizes  # deterministic per seed


def test_request_factory_mixes_fresh_items_with_real_audio_and_video_clips():
    spec = PipelineSpec()
    scenario = Scenario(name="t", candidates={30: 1.0}, repeat_share=0.0, audio_presence=1.0, video_share=1.0)
    request = RequestFactory(spec, _FakeBench(n_items=500), scenario, seed=1).next()
    items = request.items
    assert len(set(items[Modality.TEXT])) > 20
    assert all(b.startswith(b"RIFF-audio-") for b in items[Modality.AUDIO])
    clips = [v is not None for v in request.videos]
    assert 0 < sum(clips) < len(clips)  # every video item (a third) sent as its clip, instead of its image
    assert all((img is None) == clip for img, clip in zip(items[Modality.IMAGE], clips))
    assert all(v.startswith(b"video-") for v in request.videos if v is not None)
    assert MODALITY_PRESENT not in request.arrays()  # a clip makes the image present: every candidate complete
    assert RequestFactory(spec, _FakeBench(), Scenario(name="t", video_share=0.0), seed=1).next().videos is None


# --- report files and process hygiene ------------------------------------------------------------------------------


def test_report_files_and_plots(tmp_path):
    samples_dir = tmp_path / "samples"
    samples_dir.mkdir()
    rng = np.random.default_rng(0)
    lines = [f"{1000 + i * 0.05:.6f},{rng.uniform(20, 80):.3f},{5},{int(i % 17 != 0)}" for i in range(200)]
    (samples_dir / "samples-1.csv").write_text("\n".join(lines) + "\n1001.0,12")  # last line cut short
    history = tmp_path / "locust_stats_history.csv"
    history.write_text('Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,95%,99%\n'
                       '1000,2,,Aggregated,0,0,N/A,N/A,N/A\n1001,2,,Aggregated,19.5,1.0,50,75,79\n'
                       '1002,2,,Aggregated,20.0,1.0,51,76,80\n')
    samples = read_samples(samples_dir)
    assert len(samples) == 200
    plots = write_plots(tmp_path, samples, history)
    assert [p.name for p in plots] == ["latency_percentiles.png", "latency_histogram.png", "throughput.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    summary = summarize_samples(samples)
    verdict = Verdict(evaluate_slo(Slo(p95_ms=1000, max_error_rate=0.01), summary), summary, report_dir=tmp_path,
                      scenario="t", slo_source="x.yaml")
    json_path, md_path = write_summary(verdict, tmp_path, plots)
    import json

    data = json.loads(json_path.read_text())
    assert data["passed"] is False and {c["name"] for c in data["slo"] if not c["passed"]} == {"max_error_rate"}
    assert "![throughput](throughput.png)" in md_path.read_text()


def test_outer_timeout_kills_the_whole_process_group(tmp_path):
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);" \
             " print('started', flush=True); time.sleep(120)"
    started = time.monotonic()
    run = run_locust([sys.executable, "-c", script], env=None, timeout=2.0, log_file=tmp_path / "log.txt")
    assert run.returncode is None and time.monotonic() - started < 15

    def leftovers() -> list:
        return [p for p in psutil.process_iter(["cmdline"]) if "time.sleep(120)" in " ".join(p.info["cmdline"] or [])
                and p.status() != psutil.STATUS_ZOMBIE]

    deadline = time.monotonic() + 10
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leftovers(), "processes left behind"


def test_a_locust_that_wrote_its_results_but_hangs_at_exit_is_killed_soon(tmp_path, monkeypatch):
    import loadtest.runner as runner

    monkeypatch.setattr(runner, "EXIT_GRACE_S", 0.5)
    marker = tmp_path / "done"
    script = f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(120)"
    started = time.monotonic()
    run = run_locust([sys.executable, "-c", script], env=None, timeout=60.0, log_file=tmp_path / "log.txt",
                     done_marker=marker)
    assert run.returncode is None and run.hung_at_exit and time.monotonic() - started < 15
    plain = run_locust([sys.executable, "-c", "pass"], env=None, timeout=60.0, log_file=tmp_path / "log2.txt",
                       done_marker=tmp_path / "never")
    assert plain.returncode == 0 and not plain.hung_at_exit


def test_locustfile_loads_without_a_server():
    """The Locust file imports cleanly (gevent gRPC init, scenario) and declares the ranking user."""
    proc = subprocess.run([sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--list"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "RankingUser" in proc.stdout


# --- end to end ----------------------------------------------------------------------------------------------------
