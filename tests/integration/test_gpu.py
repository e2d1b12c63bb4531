"""GPU node only (`make test-gpu`): build TensorRT engines for the built repository, prove them against the golden
PyTorch outputs, serve the gpu profile and rank.

What a node lacks is said once, by `release.gpu_steps.gpu_readiness` (the same reasons `make gpu-check` reports):
without a CUDA GPU, or without TensorRT and cuda-python, the whole module is skipped with that reason; without a
TensorRT backend in the Triton `fusionrank serve` would start (the nvidia-pytriton server has only the Python
backend; the NGC image has it), the engines are still built and checked and the serving tests are skipped with it.
"""

from __future__ import annotations

import numpy as np
import pytest

from export.node.cuda_driver import release_cuda
from release.gpu_steps import gpu_readiness
from tests.paths import REPO_ROOT

pytestmark = pytest.mark.gpu

# Decided at import, before any session fixture (export, training) is built for tests that cannot run here.
# The driver is judged against the release's CUDA (tensorrt-cu13: R580+): an older one skips with its reason.
READINESS = gpu_readiness(REPO_ROOT / "model_repository", cuda=release_cuda(REPO_ROOT))
if READINESS.no_cuda or READINESS.no_tensorrt:
    pytest.skip(READINESS.no_cuda or READINESS.no_tensorrt, allow_module_level=True)

trt = pytest.importorskip("tensorrt")  # installed: the skip above did not apply


def _needs_triton_tensorrt() -> None:
    if READINESS.no_triton_tensorrt:
        pytest.skip(READINESS.no_triton_tensorrt)


@pytest.fixture(scope="module")
def engines(ci_spec, built_repository, tmp_path_factory):
    """FP16 engines (the spec's precision) for every engine model of the built repository."""
    from export.convert.onnx2trt import build_engines

    timing = tmp_path_factory.mktemp("trt") / "timing.cache"
    results = build_engines(ci_spec, built_repository, timing_cache=timing)
    assert timing.is_file(), "the timing cache is written for the next build"
    return {r.model: r for r in results}


def test_engines_and_manifests_are_written(ci_spec, built_repository, engines):
    from export.manifest import find_manifest
    from export.profiles import engine_models

    assert set(engines) == set(engine_models(ci_spec))
    for model in engines:
        manifest = find_manifest(built_repository, model)
        assert (built_repository / model / "1" / "model.plan").stat().st_size > 0
        assert manifest.tensorrt_version == trt.__version__
        assert manifest.precision == ci_spec.export.tensorrt.precision.value


def test_preflight_passes_on_the_build_node(ci_spec, built_repository, engines):
    """Triton's own TensorRT (its backend's libnvinfer) must be the one that built the plans: the [gpu] pin."""
    from export.verify.preflight import preflight

    _needs_triton_tensorrt()
    assert preflight(ci_spec, built_repository) == []


def test_engine_parity_with_golden_outputs(ci_spec, built_repository, engines):
    """Engines vs PyTorch golden outputs within the spec's TensorRT tolerances (ParityError otherwise)."""
    from benchmarks.latency import make_runner, run_batched
    from export.verify.golden import load_golden
    from export.verify.parity import check_outputs, ranking_parity
    from release.upgrade_measure import tolerance_for

    for model in engines:
        golden = load_golden(built_repository, model)
        runner = make_runner("gpu", built_repository, model)
        try:
            actual = run_batched(runner, golden.inputs, ci_spec.serving.batching(model).max_batch_size)
        finally:
            runner.close()
        results = check_outputs(model, golden.outputs, actual, tolerance_for(ci_spec, "gpu"))
        assert all(r.passed for r in results)
        if golden.labels is not None:
            ranking = ranking_parity(golden.outputs["click_probability"], actual["click_probability"],
                                     golden.labels, golden.groups, ci_spec.export.ranking, model="engine",
                                     raise_on_fail=True)
            assert ranking.passed


def test_every_text_bucket_runs_on_the_engine(ci_spec, built_repository, engines):
    from benchmarks.latency import make_runner

    runner = make_runner("gpu", built_repository, "text_encoder")
    try:
        max_batch = ci_spec.serving.batching("text_encoder").max_batch_size
        for bucket in ci_spec.modalities.text.buckets:
            for batch in (1, max_batch):
                ids = np.ones((batch, bucket), np.int64)
                out = runner.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
                assert out["text_embedding"].shape == (batch, ci_spec.modalities.text.encoder.output_dim)
                assert np.isfinite(out["text_embedding"]).all()
    finally:
        runner.close()


def test_serve_gpu_profile_and_rank(ci_spec, built_repository, engines, reference_pipeline, tmp_path):
    """The production profile: TensorRT members in Triton, scores close to the offline PyTorch pipeline."""
    import tritonclient.grpc as grpcclient

    from benchmarks.latency import ensemble_inputs
    from fusionrank.contract.spec import Modality, served_models
    from fusionrank.model.synthetic_data import load_benchmark
    from fusionrank.server.launcher import TritonServer

    _needs_triton_tensorrt()
    bench = load_benchmark(ci_spec)
    session = int(bench.frozen_sessions(1)[0])
    ids = bench.sessions.candidates[session]
    items = {Modality.TEXT: [bench.item(int(i)).text_bytes() for i in ids],
             Modality.IMAGE: [bench.item(int(i)).image_bytes() for i in ids],
             Modality.AUDIO: [bench.item(int(i)).audio_bytes() for i in ids]}
    history = np.repeat(bench.sessions.history[session][None, :], len(ids), axis=0)
    expected, _ = reference_pipeline.score(items, history)
    with TritonServer(built_repository, profile="gpu", log_file=tmp_path / "triton.log",
                      cache=tmp_path / "backend", models=served_models(ci_spec)) as server:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            result = client.infer(ci_spec.serving.route, ensemble_inputs(items, history),
                                  client_timeout=120)
    probs = result.as_numpy("click_probability")[:, 0]
    tol = ci_spec.export.tensorrt.tolerances.get("click_probability", ci_spec.export.tolerance("click_probability"))
    # Encoders and ranker are all FP16 engines here, so errors compound through the chain: 4x the per-model tolerance.
    np.testing.assert_allclose(probs, expected, atol=4 * tol.atol, rtol=4 * tol.rtol)
    assert np.argsort(-probs)[:3].tolist() == np.argsort(-np.asarray(expected))[:3].tolist()


def test_gpu_upgrade_report_passes_parity(ci_spec, built_repository, engines, tmp_path):
    from release.upgrade import upgrade_report

    _needs_triton_tensorrt()
    report = upgrade_report(ci_spec, built_repository, "gpu", out=tmp_path / "report", requests=20,
                            save_baseline_to=tmp_path / "baseline.json")
    assert report["engines"]["rebuilt"] == []
    assert report["comparison"]["passed"], report["comparison"]["regressions"]
    assert set(report["manifests"]) == set(engines)
