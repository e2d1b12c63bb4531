"""The capacity tools' pieces that need no server: judging a measured run against the SLO, sorting profile samples
into categories, reading a process tree's memory and CPU time."""

from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.lib import LoadResult, LoopMode, Sample, StableRun, Window
from benchmarks.lib.memory import by_label, cpu_seconds, describe, process_tree, total_rss
from benchmarks.profile_route import categorise, read_raw
from benchmarks.tune.measure import judge


def _run(latencies_ms: list[float], errors: int = 0, wall_s: float = 10.0) -> StableRun:
    samples = [Sample(float(i), ms / 1000.0, True) for i, ms in enumerate(latencies_ms)]
    samples += [Sample(100.0 + i, 0.1, False, "UNAVAILABLE: over capacity") for i in range(errors)]
    result = LoadResult(LoopMode.CLOSED, samples, wall_s, users=2)
    return StableRun([Window.of(result)], stable=True)


def test_judge_holds_p99_or_the_max_of_a_small_sample_to_the_slo(ci_spec):
    slo = ci_spec.slo.p99_ms
    many = [100.0] * 980 + [slo + 500.0] * 20  # supported p99 above the SLO
    trial = judge({"a": 1}, _run(many), ci_spec, candidates=16)
    assert not trial.feasible and "p99" in trial.note
    assert trial.candidates_per_s == 1000 * 16 / 10.0
    few = [100.0] * 20 + [slo + 1.0]  # 21 samples: p99 unsupported, the max (over the SLO) decides
    trial = judge({"a": 1}, _run(few), ci_spec, candidates=16)
    assert not trial.feasible and "max of a sample" in trial.note
    trial = judge({"a": 1}, _run([100.0] * 21), ci_spec, candidates=16)
    assert trial.feasible and trial.p99_ms == 100.0
    trial = judge({"a": 1}, _run([100.0] * 500, errors=50), ci_spec, candidates=16)
    assert not trial.feasible and "error rate" in trial.note
    trial = judge({"a": 1}, _run([], errors=3), ci_spec, candidates=16)
    assert not trial.feasible and "UNAVAILABLE" in trial.note


def test_profile_categories(tmp_path):
    stack = ["Thread.run (threading.py:982)", "RouteModel.execute (fusionrank/triton/route.py:311)",
             "AudioPreprocessor.log_mel (fusionrank/preprocess/audio.py:125)", "rfft (numpy/fft/_pocketfft.py:409)"]
    assert categorise(stack) == "decode audio"
    assert categorise(["_worker (concurrent/futures/thread.py:58)", "pthread_cond_wait (libc.so.6)"]) \
        == "idle (waiting for work)"
    assert categorise(["OnnxRuntimeModel.run (fusionrank/triton/exported.py:221)",
                       "run (onnxruntime/capi/onnxruntime_inference_collection.py:220)"]) == "ONNX Runtime"
    assert categorise(["main (x.py:1)"]) == "other"
    raw = tmp_path / "p.txt"
    raw.write_text(";".join(stack) + " 30\n" + "main (x.py:1) 10\n")
    assert read_raw(raw) == {"decode audio": 30, "other": 10}


def test_process_tree_memory_and_cpu():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(50 << 20); time.sleep(30)"])
    try:
        import time

        time.sleep(1.0)
        procs = process_tree(os.getpid())
        mine = {p.pid: p for p in procs}
        assert os.getpid() in mine and child.pid in mine
        assert mine[child.pid].rss > 50 << 20  # the child's 50 MiB are resident
        assert total_rss(procs) >= mine[child.pid].rss + mine[os.getpid()].rss
        assert sum(n for n, _ in by_label(procs).values()) == len(procs)
        assert "MiB RSS" in describe(procs)
        assert cpu_seconds(os.getpid()) > 0
    finally:
        child.kill()
        child.wait()
