"""The CPU profile's graphs (issue 13): spec checks, optimised FP32 graphs built by export, INT8 graphs gated against
the FP32 PyTorch chain, a failing gate refusing the export, and the per-model comparison."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import onnx
import pytest

from benchmarks.cpu_models import compare_models, kernel_profile, model_variants, speed_table
from benchmarks.cpu_served import ServedVariant, prepare_repository
from export.convert.onnx2cpu import export_cpu_profile
from export.verify.cpu_gates import REPORT_FILE, CpuGateError
from export.verify.golden import load_golden
from fusionrank.contract.spec import INT8_FILE, OPTIMIZED_FILE, Precision, ServingProfile
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


@pytest.mark.slow
def test_int8_graphs_run_int8_kernels(int8_repository):
    spec, repo, _ = int8_repository
    text = _ops(repo / "text_encoder" / "1" / INT8_FILE)
    assert text["DynamicQuantizeMatMul"] > 0 and text["QAttention"] == 6 and text["MatMul"] == 0
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


