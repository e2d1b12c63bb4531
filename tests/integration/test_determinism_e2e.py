"""The same request, the same scores (issue 19), on a real Triton server serving the CI spec with INT8 text and image
encoders (the default spec's choice; the CI spec itself serves FP32 so the other e2e tests can compare with PyTorch
at FP32 tolerances), each encoder running two batches at once on its one session (`concurrent_batches: 2`, a
`fusionrank tune` knob), and the server-wide cache `TritonServer` starts: one request scored alone, replayed from the
cache, from several callers at once, amid other callers' never-seen traffic, and through `rank_ensemble`, within
1e-6 and in the same order; warming through one route instance warms them all."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fusionrank.contract.spec import INT8_FILE, Precision

pytestmark = pytest.mark.e2e

INT8 = {"text_encoder": Precision.INT8, "image_encoder": Precision.INT8}


@pytest.fixture(scope="module")
def int8_served(ci_spec, built_repository, tmp_path_factory):
    """(CI spec serving INT8 text and image encoders, two batches at once each, its repository): rendered for that
    spec, the CI export's files linked, the INT8 graphs built and gated by export."""
    from export.convert.onnx2cpu import export_cpu_profile
    from fusionrank.triton.render import render_repository

    cpu = dataclasses.replace(ci_spec.export.cpu, precision=dict(INT8))
    serving = ci_spec.serving
    models = {**serving.models, **{m: dataclasses.replace(serving.batching(m), concurrent_batches=2)
                                   for m in ("text_encoder", "image_encoder", "audio_encoder")}}
    spec = ci_spec.with_overrides(export=dataclasses.replace(ci_spec.export, cpu=cpu),
                                  serving=dataclasses.replace(serving, models=models))
    repo = tmp_path_factory.mktemp("int8-served") / "model_repository"
    render_repository(spec, repo)
    for version in built_repository.glob("*/1"):
        for path in version.iterdir():
            link = repo / version.relative_to(built_repository) / path.name
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(path.resolve())
    report = export_cpu_profile(spec, repo, models=list(INT8))
    assert report.passed and all((repo / m / "1" / INT8_FILE).is_file() for m in INT8)
    return spec, repo


def test_one_request_scores_the_same_in_every_situation(int8_served, tmp_path):
    from benchmarks.determinism import GOAL, run_determinism

    spec, repo = int8_served
    report = run_determinism(spec, repo, tmp_path, candidates=16)
    print(report.table())
    assert set(report.scores) == {"route alone, cold", "route replayed from the cache",
                                  "route, several callers at once, cold", "route amid other callers' traffic, cold",
                                  "rank_ensemble alone", "rank_ensemble amid other callers' traffic"}
    assert report.reference.shape == (16,) and np.ptp(report.reference) > 0.01, "scores that tell candidates apart"
    for situation in report.scores:
        assert report.diff(situation) <= GOAL, (situation, report.table())
        assert report.swapped(situation) == 0, (situation, report.table())
    assert (tmp_path / "determinism.json").is_file()


def test_warming_through_one_route_instance_warms_every_instance(int8_served):
    """Three route instances, one server-wide tier: after one request, the same request from three callers at once is
    answered from the cache by whichever instances take it (no encoder call), with the first answer."""
    from benchmarks.determinism import _Caller, benchmark_request
    from benchmarks.server_metrics import INFERENCE_COUNT, parse_counters, scrape
    from fusionrank.contract.spec import ServingProfile
    from fusionrank.model.synthetic_data import load_benchmark
    from fusionrank.server.launcher import TritonServer

    spec, repo = int8_served
    instances = spec.serving.batching(spec.serving.route).instances
    assert instances >= 2
    request = benchmark_request(spec, load_benchmark(spec), 8, nonce=77)
    with TritonServer.for_spec(spec, repo, ServingProfile.CPU, log_name="tritonserver-warm") as server:
        call = _Caller(server.grpc_url)
        first = call(spec.serving.route, request)

        def encoded_rows() -> float:
            counters = parse_counters(scrape(server.metrics_url))
            return sum(v.get(INFERENCE_COUNT, 0.0) for m, v in counters.items() if m.endswith("_encoder"))

        before = encoded_rows()
        assert before >= 8 * 2, "the first request was encoded (text, image and audio rows)"
        with ThreadPoolExecutor(instances) as pool:
            again = list(pool.map(lambda _: call(spec.serving.route, request), range(3 * instances)))
        assert encoded_rows() == before, "every replay, on every instance, answered from the server-wide cache"
        for scores in again:
            np.testing.assert_array_equal(scores, first)
