"""`fusionrank bench` on the real server: the served routes and the in-process pipeline measured side by side."""

from __future__ import annotations

import pytest

from benchmarks.serve_phases import BenchConfig


@pytest.mark.e2e
def test_bench_phases_measure_the_served_routes_and_the_in_process_pipeline(triton_server, ci_spec, bench,
                                                                            built_repository):
    from benchmarks.serve_phases import _factories, inprocess_phases, served_phase

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
    # CPU per process over the timed run: the callers, the server and its route's stubs all worked for it.
    assert route.cpu.seconds["callers"] > 0 and route.cpu.seconds["stub:rank"] > 0
    assert route.cpu.seconds["tritonserver"] > 0 and 0 < route.cpu.busy
    print(f"\nbench phases: in-process {alone.candidates_per_s:.1f} / {batched.candidates_per_s:.1f} candidates/s, "
          f"route {route.candidates_per_s:.1f} candidates/s, {route.cache.describe()}")
