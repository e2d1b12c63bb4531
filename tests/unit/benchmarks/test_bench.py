"""`fusionrank bench serve`: its candidate stream (Zipf popularity, never-seen items that stay valid), its goals and
report, and its phases against the session's real Triton (a short run)."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest

from benchmarks.latency import LatencyStats
from benchmarks.lib.memory import CpuShare, cpu_by_label
from benchmarks.serve import goals, render, write_chart
from benchmarks.serve_phases import BenchConfig, BenchError, BenchResult, Phase
from fusionrank.contract.spec import Modality
from fusionrank.request.scenario import RequestFactory, Scenario, novel_payload, zipf_weights
from fusionrank.request.validation import RequestPreprocessor


@pytest.fixture(scope="module")
def bench(ci_spec):
    from fusionrank.model.synthetic_data import load_benchmark

    return load_benchmark(ci_spec)


def test_zipf_stream_favours_the_same_items_for_every_caller_and_never_repeats_one_in_a_request(ci_spec, bench):
    scenario = Scenario(name="z", candidates={16: 1.0}, zipf_exponent=1.1)
    counts = [Counter(), Counter()]
    for seed, counter in enumerate(counts):
        factory = RequestFactory(ci_spec, bench, scenario, seed=seed)
        for _ in range(150):
            ids = factory.candidate_ids()
            assert len(set(ids.tolist())) == len(ids) == 16, "a candidate list holds distinct items"
            counter.update(ids.tolist())
    ranks = factory.by_rank.tolist()  # the same popularity order for every seed
    for counter in counts:
        means = [np.mean([counter[i] for i in ranks[a:b]]) for a, b in ((0, 10), (10, 50), (50, 200))]
        assert means[0] > means[1] > means[2], f"drawn more often the more popular: {means}"
    weights = zipf_weights(200, 1.1)
    assert weights[0] / weights[9] == pytest.approx(10 ** 1.1)


def test_never_seen_items_are_valid_distinct_and_at_the_requested_share(ci_spec, bench):
    scenario = Scenario(name="n", candidates={16: 1.0}, zipf_exponent=1.1, novel_share=0.25)
    factory = RequestFactory(ci_spec, bench, scenario, seed=4)
    preparer = RequestPreprocessor(ci_spec)
    ids = range(1, bench.num_items + 1)
    catalogue = {m: {bench.item(i).payload(m) for i in ids} for m in ci_spec.modalities.enabled}
    seen: dict[Modality, set] = {m: set() for m in ci_spec.modalities.enabled}
    for _ in range(12):
        request = factory.next()
        preparer(request.arrays())  # every payload decodes and passes the spec's limits
        for m, rows in request.items.items():
            seen[m].update(p for p in rows if p is not None and p not in catalogue[m])
    share = factory.novel_candidates / (12 * 16)
    assert 0.1 < share < 0.4
    assert all(len(payloads) == factory.novel_candidates for payloads in seen.values()), "each one distinct"
    image = bench.item(1).payload(Modality.IMAGE)
    assert novel_payload(Modality.IMAGE, image, 1) != novel_payload(Modality.IMAGE, image, 2)
    from PIL import Image

    formats = {Image.open(io.BytesIO(p)).format for p in (image, novel_payload(Modality.IMAGE, image, 1))}
    assert len(formats) == 1, "the same format as the catalogue item"


def test_bench_flags_are_checked():
    with pytest.raises(BenchError, match="--novel-share 1.5"):
        BenchConfig(novel_share=1.5)
    with pytest.raises(BenchError, match="--callers 0"):
        BenchConfig(callers=0)


def _phase(role: str, cps: float, p99: float, errors: int = 0) -> Phase:
    return Phase(role, role, LatencyStats(p99 / 2, p99 * 0.9, p99, p99 / 2, cps, 10), 10, errors)


def test_goals_say_met_or_missed_with_the_measured_ratio(tmp_path):
    config = BenchConfig()
    phases = [_phase("inprocess_request", 80, 300), _phase("inprocess_batch", 120, 2000),
              _phase("ensemble", 100, 1500), _phase("route_cold", 300, 900), _phase("route_warm", 1200, 200)]
    result = BenchResult(config, "spec.yaml", phases, 2)
    assert [(g.met, g.measured.split()[0]) for g in goals(result)] == [(True, "12.0x"), (True, "200"),
                                                                       (True, "1.25x")]
    result.phases[4] = _phase("route_warm", 900, 1600)
    result.phases[0] = _phase("inprocess_request", 120, 300)
    assert [g.met for g in goals(result)] == [False, False, False]
    result.phases[3].cpu = CpuShare({"stub:text_encoder": 1.0, "callers": 0.25, "tritonserver": 0.75, "idle": 0.0},
                                    2.0, 2)
    text = render(result)
    assert "MISSED warm cached route >= 10x the plain ensemble's candidates/s: 9.0x" in text
    # 10 requests answered: 2 s of CPU is 200 ms a request, over 2 s on 2 cores: half of them busy.
    assert ("route_cold: 200.0 CPU ms per request (stub:text_encoder 100.00, tritonserver 75.00, callers 25.00); "
            "50 % of 2 cores busy over 2.0 s") in text
    assert write_chart(result, tmp_path / "bench.png").stat().st_size > 10_000




def test_cpu_is_counted_per_process_label_across_a_tree():
    import os
    import subprocess
    import sys
    import time

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    before = cpu_by_label(os.getpid(), "callers")
    child = subprocess.Popen([sys.executable, "-c", burn])
    started, spent = time.monotonic(), 0.0
    while child.poll() is None and time.monotonic() < started + 30:  # read while it runs: an exited child is gone
        seconds = CpuShare.between(before, cpu_by_label(os.getpid(), "callers"), 1.0, 2).seconds
        spent = max(spent, sum(v for k, v in seconds.items() if k != "callers"))
        time.sleep(0.02)
    child.wait(timeout=30)
    assert spent >= 0.05, "the child's CPU, under its own label"
    share = CpuShare.between(before, cpu_by_label(os.getpid(), "callers"), 1.0, 2)
    assert share.seconds["callers"] >= 0.0 and "callers" in share.per_unit_ms(1)


def test_a_renewed_payload_is_a_new_cache_key_with_the_same_decoded_content(ci_spec, bench):
    """The benchmarks' never-seen items (`RequestFactory(renew_novel=True)`, `bench traffic`'s renewed requests) are
    made without building new items on the cores they measure: new bytes, the same decoding work."""
    from fusionrank.request.scenario import renewed_payload

    scenario = Scenario(name="n", candidates={4: 1.0}, novel_share=1.0)
    arrays = RequestFactory(ci_spec, bench, Scenario(name="n", candidates={4: 1.0}), seed=2).next().arrays()
    fresh = RequestFactory(ci_spec, bench, scenario, seed=2, renew_novel=True).next().arrays()
    preparer = RequestPreprocessor(ci_spec)
    before, after = preparer(arrays), preparer(fresh)  # still valid for every modality
    for name in ("item_image", "item_audio", "item_text"):
        assert all(x != y for x, y in zip(arrays[name][:, 0], fresh[name][:, 0])), name
    for m in (Modality.IMAGE, Modality.AUDIO):  # the same pixels and samples: only the cache key changes
        assert before.encoder_inputs[m], m
        for name, values in before.encoder_inputs[m].items():
            np.testing.assert_array_equal(values, after.encoder_inputs[m][name])
    again = RequestFactory(ci_spec, bench, scenario, seed=2, renew_novel=True)
    again.next()
    assert not set(again.next().arrays()["item_image"][:, 0]) & set(fresh["item_image"][:, 0]), "never seen twice"
    assert renewed_payload(fresh["item_image"][0, 0], 8) != renewed_payload(fresh["item_image"][0, 0], 9)


def test_traffic_callers_send_the_deadline_count_each_outcome_and_back_off_off_the_clock(monkeypatch):
    """`fusionrank bench traffic` drives load through the measurement core as the fusionrank client calls: the
    deadline as gRPC deadline, Triton timeout and DEADLINE_PARAMETER, a refused caller's backoff not in any latency."""
    import threading
    import time

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from benchmarks import traffic
    from fusionrank.contract.tensors import DEADLINE_PARAMETER

    sent, lock = [], threading.Lock()

    class Client:  # tritonclient's gRPC client as the server past capacity answers it
        def __init__(self, url):
            self.url = url

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

        def close(self):
            pass

        def infer(self, model, inputs, client_timeout=None, timeout=None, parameters=None):
            with lock:  # the open loop's workers call at once
                sent.append((model, [i.name() for i in inputs], client_timeout, timeout, parameters, time.time()))
                n = len(sent)
            if n <= 3:
                raise InferenceServerException("gate full", status="StatusCode.UNAVAILABLE")
            if n == 4:
                raise InferenceServerException("bad input", status="StatusCode.INVALID_ARGUMENT")

    monkeypatch.setattr(grpcclient, "InferenceServerClient", Client)
    arrays = {"candidate_ids": np.arange(4, dtype=np.int64).reshape(1, 4)}
    run = traffic.closed_loop("localhost:1", "route", [lambda: arrays], None, 1.0, requests=6)
    assert (len(run.answered), len(run.refused), len(run.failed)) == (2, 3, 1)
    assert run.first_refusal == "StatusCode.UNAVAILABLE: [StatusCode.UNAVAILABLE] gate full"
    assert run.first_error == "StatusCode.INVALID_ARGUMENT: [StatusCode.INVALID_ARGUMENT] bad input"
    for model, names, client_timeout, timeout, parameters, at in sent:
        assert (model, names, client_timeout, timeout) == ("route", ["candidate_ids"], 1.0, 1_000_000)
        assert abs(parameters[DEADLINE_PARAMETER] / 1e6 - (at + 1.0)) < 0.1
    # three refusals in a row: 50 + 100 + 200 ms of backoff (jittered +-20 %), in the run but in no latency
    assert run.wall_s >= 0.28 and max(run.answered + run.refused + run.failed) < 0.1

    sent.clear()
    burst = traffic.open_loop("localhost:1", "route", lambda: arrays, rate=40, seconds=0.5, seed=3)
    assert (len(burst.refused), len(burst.failed), burst.dropped) == (3, 1, 0)
    assert len(burst.answered) == len(sent) - 4 > 5
    assert all(s[2:5] == (30.0, None, None) for s in sent), "the backlog's requests carry no deadline"
