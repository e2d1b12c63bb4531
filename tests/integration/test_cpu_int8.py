"""The CPU profile's graphs (issue 13): spec checks, optimised FP32 graphs built by export, INT8 graphs gated against
the FP32 PyTorch chain, a failing gate refusing the export, and the per-model comparison."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from benchmarks.cpu_models import compare_models, kernel_profile, model_variants, speed_table
from benchmarks.cpu_served import ServedVariant, prepare_repository
from export.convert.onnx2cpu import (
    CatalogueCalibration,
    export_cpu_profile,
    quantize_dynamic_graph,
    quantizer_sandbox,
)
from export.verify.batch_invariance import (
    INVARIANCE_METRIC,
    BatchInvarianceError,
    check_served_graphs,
)
from export.verify.cpu_gates import REPORT_FILE, CpuGateError
from export.verify.golden import load_golden
from fusionrank.contract.spec import INT8_FILE, OPTIMIZED_FILE, Modality, Precision, ServingProfile
from tests.unit.export.test_cpu_precision import INT8_ENCODERS, _with_cpu

MODELS = ("text_encoder", "image_encoder", "audio_encoder", "fusion_ranker")


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


# --- spec and rendering (no model needed) -------------------------------------------------------------------------


# --- export: optimised FP32 graphs for the CI spec (built by the session fixture) ---------------------------------


@pytest.mark.slow
def test_export_writes_optimised_graphs_and_gates_them(built_repository, ci_spec):
    text = _ops(built_repository / "text_encoder" / "1" / OPTIMIZED_FILE)
    # The transformer optimizer's fusions: 6 layers of MiniLM, one attention node each, embeddings fused.
    assert text["Attention"] == 6 and text["EmbedLayerNormalization"] == 1 and text["SkipLayerNormalization"] >= 6
    assert text["Softmax"] == 0 and "Attention" not in _ops(built_repository / "text_encoder" / "1" / "model.onnx")
    for model in MODELS:
        assert (built_repository / model / "1" / OPTIMIZED_FILE).is_file()
    report = json.loads((built_repository / REPORT_FILE).read_text())
    assert report["passed"] and set(report["files"].values()) == {OPTIMIZED_FILE}
    # Optimised FP32 graphs are held to the FP32 tolerances and rank exactly like PyTorch.
    assert max(o["max_abs_diff"] for o in report["outputs"]) < 1e-4
    assert report["ranking"]["top10_overlap"] == 1.0 and report["test_auc"]["diff"] < 1e-4


# --- INT8: the CI spec's encoders quantized and gated -------------------------------------------------------------


def _linked_copy(source: Path, target: Path) -> Path:
    """`source`'s weights, goldens and tokenizer as links under `target` (reports and configs are not shared)."""
    for path in source.rglob("*"):
        if path.is_file() and path.name != REPORT_FILE and not path.name.endswith(".pbtxt"):
            link = target / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
    return target


@pytest.fixture(scope="module")
def int8_repository(built_repository, ci_spec, tmp_path_factory):
    """A copy of the CI repository whose encoders are quantized and gated: (int8 spec, repository, gate report)."""
    repo = _linked_copy(built_repository, tmp_path_factory.mktemp("int8") / "model_repository")
    spec = _with_cpu(ci_spec, precision=dict(INT8_ENCODERS))
    started = time.monotonic()
    report = export_cpu_profile(spec, repo, models=list(INT8_ENCODERS))
    seconds = time.monotonic() - started
    print(f"INT8 build + gates for the CI spec: {seconds:.1f} s {report.seconds}")
    return spec, repo, report


@pytest.mark.slow
def test_int8_encoders_pass_the_ranking_gates(int8_repository):
    spec, repo, report = int8_repository
    assert report.passed, report.table()
    assert report.files == {"text_encoder": INT8_FILE, "image_encoder": INT8_FILE, "audio_encoder": INT8_FILE,
                            "fusion_ranker": OPTIMIZED_FILE}
    gate = spec.export.cpu.ranking
    assert report.ranking.top10_overlap >= gate.min_top10_overlap and report.ranking.kendall_tau >= 0.9
    assert report.test_auc["diff"] <= 0.003
    # INT8 is not FP32: the embeddings moved, within the INT8 tolerances only.
    text = next(o for o in report.outputs if o.model == "text_encoder")
    assert 1e-3 < text.max_abs_diff <= 0.1
    saved = json.loads((repo / REPORT_FILE).read_text())
    assert saved["passed"] and saved["precision"]["image_encoder"] == "int8"
    invariance = {g.model: g.value for g in report.gates if g.metric == INVARIANCE_METRIC}
    assert set(invariance) == set(MODELS) and max(invariance.values()) <= spec.export.cpu.batch_invariance_atol


@pytest.mark.slow
def test_a_batch_variant_graph_fails_the_invariance_gate(int8_repository, built_repository, tmp_path):
    """The text encoder quantized dynamically (its activation scale computed over the whole batch) moves a row with
    its batch-mates: the gate names the model, the difference and the tolerance; the served static graph passes."""
    spec, repo, _ = int8_repository
    dynamic = tmp_path / "text_encoder.dynamic.onnx"
    with quantizer_sandbox(tmp_path):
        quantize_dynamic_graph(spec, "text_encoder", built_repository / "text_encoder" / "1" / OPTIMIZED_FILE,
                               dynamic, tmp_path)
    variant, served = check_served_graphs(spec, repo, {"text_encoder": dynamic,
                                                       "image_encoder": repo / "image_encoder" / "1" / INT8_FILE})
    assert variant.max_abs_diff > 1e-3 and not variant.passed and served.passed
    with pytest.raises(BatchInvarianceError) as info:
        variant.raise_on_failure()
    error = info.value
    assert isinstance(error, CpuGateError) and error.model == "text_encoder" and error.tolerance == 1e-6
    assert str(error).startswith(f"text_encoder: a row's output changes with its batch-mates by up to "
                                 f"{variant.max_abs_diff:.3g} (output text_embedding, ")
    assert "tolerance 1e-06" in str(error)


@pytest.mark.slow
def test_export_refuses_a_batch_variant_ranker(int8_repository, tmp_path):
    """An INT8 ranker (dynamic: ONNX Runtime quantizes an LSTM dynamically only) passes the accuracy gates but not
    the batch-invariance gate: the export is refused and leaves no INT8 ranker beside model.onnx."""
    spec, shared, _ = int8_repository
    repo = _linked_copy(shared, tmp_path / "model_repository")
    with pytest.raises(BatchInvarianceError) as info:
        export_cpu_profile(_with_cpu(spec, precision={**INT8_ENCODERS, "fusion_ranker": Precision.INT8}), repo,
                           models=["fusion_ranker"])
    assert info.value.model == "fusion_ranker" and info.value.value > 1e-6
    assert not (repo / "fusion_ranker" / "1" / INT8_FILE).exists()
    saved = json.loads((repo / REPORT_FILE).read_text())
    assert saved["passed"] is False and [g["model"] for g in saved["gates"] if not g["passed"]] == ["fusion_ranker"]


@pytest.mark.slow
def test_int8_graphs_run_int8_kernels(int8_repository):
    spec, repo, _ = int8_repository
    text = repo / "text_encoder" / "1" / INT8_FILE
    # Static QDQ: no per-batch scale anywhere (issue 19); the weight MatMuls run as QLinearMatMul.
    assert _ops(text)["QuantizeLinear"] > 0 and not {"DynamicQuantizeLinear", "DynamicQuantizeMatMul"} & set(_ops(text))
    kernels = {k.op_type for k in kernel_profile(text, load_golden(repo, "text_encoder").inputs, batch=4, runs=2)}
    assert "QLinearMatMul" in kernels and not {"DynamicQuantizeMatMul", "DynamicQuantizeLinear"} & kernels
    image = repo / "image_encoder" / "1" / INT8_FILE
    assert _ops(image)["QuantizeLinear"] > 0  # saved as QDQ; ONNX Runtime picks the kernels at load
    kernels = {k.op_type: k for k in kernel_profile(image, load_golden(repo, "image_encoder").inputs, batch=4,
                                                    runs=2)}
    assert "QLinearConv" in kernels and "Conv" not in kernels and kernels["QLinearConv"].share > 0.5


@pytest.mark.slow
def test_a_failing_gate_refuses_the_export_and_names_model_metric_value_limit(int8_repository, tmp_path):
    spec, shared, _ = int8_repository
    repo = _linked_copy(shared, tmp_path / "model_repository")  # a refused export deletes the ranker's CPU graphs
    tight = dataclasses.replace(spec.export.tolerances["click_probability"], atol=1e-6, rtol=0.0)
    strict = _with_cpu(spec, precision={**INT8_ENCODERS, "fusion_ranker": Precision.INT8},
                       tolerances={**spec.export.cpu.tolerances, "click_probability": tight})
    with pytest.raises(CpuGateError) as info:
        export_cpu_profile(strict, repo, models=["fusion_ranker"])
    error = info.value
    assert error.model == "fusion_ranker" and error.metric == "click_probability max abs diff"
    assert error.value > 1e-6 and error.limit == "atol=1e-06 + rtol=0*|reference|"
    assert str(error).startswith("CPU profile gate failed for fusion_ranker: click_probability max abs diff = ")
    # Refused: no INT8 ranker graph beside model.onnx, and the report on disk says why.
    assert not (repo / "fusion_ranker" / "1" / INT8_FILE).exists()
    assert json.loads((repo / REPORT_FILE).read_text())["passed"] is False


@pytest.mark.slow
def test_variants_compared_side_by_side(int8_repository, tmp_path):
    spec, repo, _ = int8_repository
    variants = model_variants(spec, repo, tmp_path, models=("audio_encoder",))
    assert {v: p.name for v, p in variants["audio_encoder"].items()} == {
        "fp32": "model.onnx", "opt": OPTIMIZED_FILE, "int8": INT8_FILE}
    speeds = compare_models(spec, repo, variants, batch_sizes=(1, 4), rounds=1, budget_s=0.05)
    assert {(s.variant, s.batch) for s in speeds} == {(v, b) for v in ("fp32", "opt", "int8") for b in (1, 4)}
    assert all(s.rows_per_s > 0 and s.cpu_rows_per_s > 0 for s in speeds)
    assert "| audio_encoder | 4 |" in speed_table(speeds)


@pytest.mark.slow
def test_served_variant_repository_links_graphs_and_sets_threads(int8_repository, tmp_path):
    from fusionrank.triton.render import load_config

    spec, repo, _ = int8_repository
    variant = ServedVariant("int8, 2 threads", True, dict(INT8_ENCODERS), threads=2)
    elsewhere = tmp_path / "scratch" / INT8_FILE  # a graph built outside the repository (cpu-report's scratch)
    elsewhere.parent.mkdir()
    elsewhere.symlink_to((repo / "audio_encoder" / "1" / INT8_FILE).resolve())
    target = prepare_repository(spec, variant, repo, tmp_path / "repo", {"audio_encoder": {INT8_FILE: elsewhere}})
    assert (target / "audio_encoder" / "1" / INT8_FILE).resolve() == elsewhere.resolve()
    config = load_config(target / "text_encoder" / ServingProfile.CPU.config_file)
    assert config.parameters["onnx_file"].string_value == INT8_FILE
    assert config.parameters["intra_op_threads"].string_value == "2"
    linked = target / "text_encoder" / "1" / INT8_FILE
    assert linked.is_symlink() and linked.resolve() == (repo / "text_encoder" / "1" / INT8_FILE).resolve()
    assert (target / "preprocess" / "1" / "tokenizer").is_symlink()




def test_text_calibration_pads_to_one_length_for_the_histogram_calibrators(ci_spec):
    from fusionrank.model.synthetic_data import load_benchmark

    longest = max(ci_spec.modalities.text.buckets)
    padded = list(CatalogueCalibration(ci_spec, load_benchmark(ci_spec), Modality.TEXT, samples=20, pad_to=longest))
    plain = list(CatalogueCalibration(ci_spec, load_benchmark(ci_spec), Modality.TEXT, samples=20))
    assert {v.shape[1] for b in padded for v in b.values()} == {longest}
    width = plain[0]["attention_mask"].shape[1]
    assert np.array_equal(padded[0]["attention_mask"][:, :width], plain[0]["attention_mask"])
    assert not padded[0]["attention_mask"][:, width:].any(), "the padding is masked out"


@pytest.mark.slow
def test_fp32_nodes_name_the_text_encoders_feed_forward_outputs(built_repository):
    from export.convert.onnx2cpu import CpuExportError, _fp32_nodes

    graph = built_repository / "text_encoder" / "1" / "model.onnx"
    kept = _fp32_nodes(graph, (r"layer\.\d+/output/dense/MatMul$",))
    assert len(kept) == 6 and not any("attention" in name for name in kept)
    with pytest.raises(CpuExportError, match=r"export.cpu.fp32_nodes: 'no such node' matches no node of .*model.onnx"):
        _fp32_nodes(graph, ("no such node",))
