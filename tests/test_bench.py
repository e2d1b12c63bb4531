"""`fusionrank bench`: its candidate stream (Zipf popularity, never-seen items that stay valid), its goals and
report, and its phases against the session's real Triton (a short run)."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest

from export.latency import LatencyStats
from fusionrank.preprocess.request import RequestPreprocessor
from fusionrank.scenario import RequestFactory, Scenario, novel_payload, zipf_weights
from fusionrank.spec import Modality
from loadtest.bench import BenchConfig, BenchError, BenchResult, Phase
from loadtest.bench_report import goals, render, write_chart


@pytest.fixture(scope="module")
def bench(ci_spec):
    from fusionrank.benchmark import load_benchmark

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
    text = render(result)
    assert "MISSED warm cached route >= 10x the plain ensemble's candidates/s: 9.0x" in text
    assert write_chart(result, tmp_path / "bench.png").stat().st_size > 10_000


@pytest.mark.e2e
def test_bench_phases_measure_the_served_routes_and_the_in_process_pipeline(triton_server, ci_spec, bench,
                                                                            built_repository):
    from loadtest.bench import _factories, inprocess_phases, served_phase

    config = BenchConfig(candidates=6, callers=2, seconds=2.0, inprocess_seconds=0.5, novel_share=0.2)
    alone, batched, roof = inprocess_phases(ci_spec, built_repository, bench, config)
    assert alone.latency.samples >= 2 and alone.candidates_per_s > 0 and batched.candidates_per_s > 0
    assert roof.role == "inprocess_roof" and roof.candidates_per_s > 0 and "one per core" in roof.note
    assert "calls of 6 candidates" in alone.note and "calls of 126 candidates" in batched.note
    members = ("text_encoder", "image_encoder", "audio_encoder", "fusion_ranker")
    route = served_phase("route", "route_warm", triton_server, ci_spec.serving.route,
                         _factories(ci_spec, bench, config, 7, 2), config.seconds, members, ci_spec.serving.route)
    assert route.errors == 0 and route.requests >= 2 and route.latency.p50_ms <= route.latency.p99_ms
    by_model = {m.model: m for m in route.members}
    assert by_model["rank"].inferences == 6 * route.requests
    assert route.cache.hits + route.cache.misses == 3 * 6 * route.requests
    assert 0 < by_model["image_encoder"].inferences <= route.cache.misses, "only misses are encoded"
    assert 0 < route.novel_share < 0.5
    labels = [m.label for m in route.memory]  # RSS per process of the server's tree, beside the throughput
    assert labels.count("stub:rank") == ci_spec.serving.batching("rank").instances and "tritonserver" in labels
    assert all(m.rss > 0 for m in route.memory)
    print(f"\nbench phases: in-process {alone.candidates_per_s:.1f} / {batched.candidates_per_s:.1f} candidates/s, "
          f"route {route.candidates_per_s:.1f} candidates/s, {route.cache.describe()}")
