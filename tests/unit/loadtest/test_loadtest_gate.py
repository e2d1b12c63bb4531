"""Load test as its users expect it, without a server: Locust's custom arguments, open-loop pacing without
lockstep, a refused endpoint failing fast, the Markdown summary, the baseline comparison, the capacity steps."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from loadtest import locust_setup
from loadtest.analysis import compare_runs, pacing_summary, window_medians
from loadtest.capacity import CapacityError, CapacityPlan, capacity_of, judge_steps, render_capacity
from loadtest.report import Samples, Verdict, evaluate_slo, summarize_samples, write_summary
from loadtest.slo import Slo
from tests.paths import REPO_ROOT  # noqa: E402


def _samples(start, lat, ok=None) -> Samples:
    start, lat = np.asarray(start, float), np.asarray(lat, float)
    return Samples(start, lat, np.full(len(lat), 5, dtype=np.int64),
                   np.ones(len(lat), bool) if ok is None else np.asarray(ok, bool))


def test_custom_arguments_are_locust_arguments_with_their_help():
    # Locust parses them (an unknown one would be refused) ...
    proc = subprocess.run([sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--rate", "3",
                           "--slo-gate", "off", "--seed", "4", "--list"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "RankingUser" in proc.stdout, proc.stderr
    # ... and their help is Locust's help with them in it (Locust's own --help is printed before the file loads)
    proc = subprocess.run([sys.executable, "-m", "loadtest.locust_setup"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--endpoints", "--spec", "--scenario", "--rate", "--slo", "--slo-gate", "--samples-dir", "--seed",
                 "--attempts", "--progress-s", "--run-time"):
        assert flag in proc.stdout, flag
    assert "FUSIONRANK_LOADTEST_RATE" in proc.stdout  # the environment variables stay as defaults


def _options(**kw):
    base = dict(rate=0.0, seed=0)
    return types.SimpleNamespace(**{**base, **kw})


def _scenario(mode="closed_loop", think=0.0, rps=None):
    return types.SimpleNamespace(pacing=types.SimpleNamespace(mode=mode, think_time_s=think, target_rps=rps))


def test_open_loop_pacing_shares_one_poisson_schedule_per_process():
    pacing = locust_setup.pacing_for(_options(rate=40.0), _scenario(), workers=2, worker_index=0)
    assert pacing.open_loop and pacing.rate == 20.0  # split over the workers
    waits = [pacing.wait() for _ in range(2000)]
    # arrivals are scheduled ahead on one timeline: the waits grow; their gaps are exponential at the rate
    gaps = np.diff(waits)
    assert abs(gaps.mean() - 1 / 20.0) < 0.005 and abs(gaps.std() / gaps.mean() - 1.0) < 0.1


def test_scenario_target_rate_is_open_loop_and_closed_loop_think_time_is_jittered():
    assert locust_setup.pacing_for(_options(), _scenario("target_rps", rps=4.0), 1, 0).rate == 4.0
    closed = locust_setup.pacing_for(_options(), _scenario(think=1.0), 1, 0)
    assert not closed.open_loop
    firsts = [closed.first_wait() for _ in range(200)]
    waits = [closed.wait() for _ in range(200)]
    assert 0 <= min(firsts) and max(firsts) <= 1.0 and np.std(firsts) > 0.2  # users start spread, not together
    assert 0.5 <= min(waits) and max(waits) <= 1.5 and np.std(waits) > 0.2
    with pytest.raises(ValueError, match="--rate -1"):
        locust_setup.Pacing(rate=-1.0)


def test_refused_endpoint_is_reported_within_two_seconds():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        started = time.monotonic()
        problem = locust_setup.probe(f"127.0.0.1:{port}")
    assert problem and f"127.0.0.1:{port}" in problem and time.monotonic() - started < 2.0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert locust_setup.probe(f"127.0.0.1:{s.getsockname()[1]}") is None


def test_runner_fails_fast_on_a_refused_endpoint(ci_spec):
    from fusionrank.request.scenario import load_scenario
    from loadtest.runner import LoadTestError, warm_up

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(LoadTestError, match="refused"):
            warm_up(ci_spec, f"127.0.0.1:{port}", load_scenario("ci"))
    assert time.monotonic() - started < 2.5


class _Total:
    def __init__(self, n, failures, latencies, start):
        self.num_requests, self.num_failures, self.start_time = n, failures, start
        self.last_request_timestamp = start + 10.0
        self._lat = latencies

    def get_response_time_percentile(self, q):
        return float(np.percentile(self._lat, 100 * q))


def test_gate_from_locust_statistics_and_progress_line():
    total = _Total(40, 0, np.linspace(10, 50, 40), start=1000.0)
    summary = locust_setup.summary_from_stats(total, users=2)
    assert summary["latency_samples"] == 40 and summary["throughput_rps"] == pytest.approx(4.0)
    checks = {c.name: c for c in evaluate_slo(Slo(p50_ms=100, p99_ms=100, max_error_rate=0.01), summary)}
    assert checks["p50_ms"].passed and checks["max_error_rate"].passed and not checks["p99_ms"].supported
    line = locust_setup.progress_line(total, 10.0, 2, 4.0)
    assert line.startswith("progress 10s: 40 requests (4.0/s of 4/s), p50 30 ms") and "0 errors (0.0%)" in line


def test_summary_markdown_has_tables_and_the_verdict_once(tmp_path):
    rng = np.random.default_rng(0)
    samples = _samples(np.cumsum(rng.exponential(0.25, 400)), rng.uniform(20, 80, 400))
    summary = summarize_samples(samples)
    summary.update(users=4, spawn_rate=4, url="localhost:8001",
                   pacing=pacing_summary(tmp_path, samples))
    verdict = Verdict(evaluate_slo(Slo(p50_ms=100, p99_ms=100), summary), summary, scenario="t", slo_source="s.yaml",
                      provenance={"commit": "abc", "spec_digest": "d1", "machine": {"flags": ["avx2"],
                                                                                   "load_average": [1.0, 0.5, 0.2]},
                                  "model_digests": {"text_encoder/1/model.int8.onnx": "0085"}})
    _, md_path = write_summary(verdict, tmp_path)
    md = md_path.read_text()
    assert md.count("SLO verdict:") == 1 and "```" not in md
    assert "| SLO | measured | target | samples (needed) | result |" in md and "| p99_ms |" in md
    assert "| p99_ms | " in md and "| 400 (368) | pass |" in md
    assert "| delivered rate |" in md and "| CPU flags | avx2 |" in md and "| model file text_encoder/1/model" in md
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["provenance"]["commit"] == "abc" and data["slo"][0]["needed"] == 6
    assert 0.9 < summary["pacing"]["gap_cv"] < 1.1 and summary["pacing"]["exponential_ks_p"] > 0.01


def _run_folder(tmp_path: Path, name: str, lat: np.ndarray) -> Path:
    folder = tmp_path / name / "samples"
    folder.mkdir(parents=True)
    lines = [f"{1000 + i * 0.1:.6f},{v:.3f},5,1" for i, v in enumerate(lat)]
    (folder / "samples-1.csv").write_text("\n".join(lines) + "\n")
    return folder.parent


def test_baseline_comparison_passes_noise_and_fails_a_slowdown(tmp_path):
    rng = np.random.default_rng(3)
    base = _run_folder(tmp_path, "base", rng.lognormal(np.log(50), 0.3, 400))
    same = _samples(1000 + np.arange(400) * 0.1, rng.lognormal(np.log(50), 0.3, 400))
    slower = _samples(1000 + np.arange(400) * 0.1, rng.lognormal(np.log(70), 0.3, 400))
    assert len(window_medians(same)) == 10
    assert not compare_runs(base, same, noise_floor=0.25)["worse"]
    result = compare_runs(base, slower, noise_floor=0.25)
    assert result["worse"] and result["change"] > 0.25
    verdict = Verdict(evaluate_slo(Slo(p50_ms=1000), summarize_samples(slower)), summarize_samples(slower),
                      baseline=result)
    assert not verdict.passed and "against baseline" in verdict.render()
    short = compare_runs(base, _samples([1.0, 2.0], [5.0, 6.0]), noise_floor=0.25)
    assert "not compared" in short["note"]


def test_capacity_steps_are_judged_on_their_own_samples():
    rng = np.random.default_rng(4)
    starts, lats, steps = [], [], []
    for k, (rate, served, latency) in enumerate([(2, 2, 40), (4, 4, 50), (8, 5, 900)]):
        t0 = 1000 + 20 * k
        steps.append({"rate": rate, "start": t0})
        n = int(served * 20)
        starts += list(t0 + np.sort(rng.uniform(0, 20, n)))
        lats += list(rng.normal(latency, 5, n))
    steps_out = judge_steps(_samples(starts, lats), steps, 20.0, Slo(p50_ms=500, max_error_rate=0.01))
    assert [s["passed"] for s in steps_out] == [True, True, False]
    assert not steps_out[2]["sustained"]  # 5 of 8 req/s delivered: saturated
    assert capacity_of(steps_out) == 4
    text = render_capacity(steps_out, 4, {"users": 8, "seconds": 20, "throughput_rps": 4.2})
    assert "capacity: 4 req/s meets every SLO" in text and "capacity / saturation = 0.95" in text
    with pytest.raises(CapacityError, match="ascending"):
        CapacityPlan((4.0, 2.0))
