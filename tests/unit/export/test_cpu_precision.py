"""CPU precision choices without quantizing: spec checks per model, the graph the CPU profile loads, chain gates,
calibration input, the GEMM probe, server CPU accounting, the served goal (tests/integration/test_cpu_int8.py
quantizes)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from export.convert.onnx2cpu import CatalogueCalibration
from export.verify.cpu_gates import CpuGateError, CpuGateReport, Gate, chain_name
from fusionrank.contract.errors import SpecError
from fusionrank.contract.spec import INT8_FILE, OPTIMIZED_FILE, Modality, Precision, ServingProfile, from_dict, to_dict
from fusionrank.triton.render import model_configs

INT8_ENCODERS = {"text_encoder": Precision.INT8, "image_encoder": Precision.INT8, "audio_encoder": Precision.INT8}


def _with_cpu(spec, **changes):
    cpu = dataclasses.replace(spec.export.cpu, **changes)
    return spec.with_overrides(export=dataclasses.replace(spec.export, cpu=cpu))


def test_cpu_precision_is_checked_per_model(default_spec):
    data = to_dict(default_spec, drop=("source",))
    data["export"]["cpu"]["precision"]["image_encoder"] = "fp16"
    with pytest.raises(SpecError) as info:
        from_dict(data)
    assert info.value.field == "export.cpu.precision.image_encoder" and "'fp32' or 'int8'" in str(info.value)
    data["export"]["cpu"]["precision"] = {"preprocess": "int8"}
    with pytest.raises(SpecError, match="export.cpu.precision.preprocess.*text_encoder, image_encoder"):
        from_dict(data)
    data["export"]["cpu"]["precision"], data["export"]["cpu"]["calibration_samples"] = {}, 0
    with pytest.raises(SpecError, match="export.cpu.calibration_samples"):
        from_dict(data)


def test_cpu_profile_loads_the_graph_the_spec_names(default_spec):
    mixed = _with_cpu(default_spec, optimize=True, precision={"text_encoder": Precision.INT8})
    plain = _with_cpu(default_spec, optimize=False, precision={})
    for spec, expected in ((mixed, {"text_encoder": INT8_FILE, "image_encoder": OPTIMIZED_FILE}),
                           (plain, {"text_encoder": "model.onnx", "image_encoder": "model.onnx"})):
        configs = model_configs(spec)
        for model, file in expected.items():
            assert configs[model][ServingProfile.CPU].parameters["onnx_file"].string_value == file
            # The GPU profiles keep the FP32 export (TensorRT builds from it).
            assert configs[model][ServingProfile.ONNX_GPU].default_model_filename == "model.onnx"
    assert default_spec.export.cpu.onnx_file("fusion_ranker") == OPTIMIZED_FILE
    assert default_spec.export.cpu.quantized() == ("text_encoder", "image_encoder")


def test_chain_gates_name_the_quantized_chain(ci_spec):
    spec = _with_cpu(ci_spec, precision=dict(INT8_ENCODERS))
    name = chain_name(spec)
    report = CpuGateReport({}, {}, gates=[Gate("text_encoder", "text_embedding max abs diff", 0.03, "atol=0.1", True),
                                          Gate(name, "Kendall tau", 0.9312, ">= 0.95", False)])
    with pytest.raises(CpuGateError, match=r"^CPU profile gate failed for cpu chain \(int8: text_encoder, "
                                           r"image_encoder, audio_encoder\): Kendall tau = 0\.9312, limit >= 0\.95"):
        report.raise_on_failure()
    assert chain_name(ci_spec) == "cpu chain (fp32)"


def test_calibration_reads_catalogue_items_through_the_shared_preprocessing(ci_spec):
    from fusionrank.model.synthetic_data import load_benchmark

    reader = CatalogueCalibration(ci_spec, load_benchmark(ci_spec), Modality.IMAGE, samples=20)
    batches = list(reader)
    assert reader.samples == 20 and [len(b["pixel_values"]) for b in batches] == [16, 4]
    size = ci_spec.modalities.image.size
    assert batches[0]["pixel_values"].shape[1:] == (3, size, size) and batches[0]["pixel_values"].dtype == np.float32
    reader.rewind()
    assert np.array_equal(reader.get_next()["pixel_values"], batches[0]["pixel_values"])


def test_gemm_probe_measures_both_precisions():
    from benchmarks.cpu_models import gemm_probe

    probe = gemm_probe(rows=16, inner=64, cols=64, budget_s=0.02, rounds=1)
    assert probe["shape"] == [16, 64, 64] and probe["fp32_gops"] > 0 and probe["int8_gops"] > 0
    assert probe["int8_speedup"] == pytest.approx(probe["int8_gops"] / probe["fp32_gops"], rel=0.05)


def test_server_cpu_is_counted_over_its_process_group():
    import subprocess
    import sys

    from benchmarks.cpu_served import group_cpu_seconds

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
    child = subprocess.Popen([sys.executable, "-c", burn], start_new_session=True)
    try:
        # Polled, not read once after a fixed sleep: on a loaded machine the child may get under 0.05 s of CPU in
        # its first 0.3 s of wall time (seen at load average 25 on 2 cores); it burns 0.4 s before it exits.
        seen, deadline = 0.0, time.monotonic() + 30
        while seen < 0.05 and child.poll() is None and time.monotonic() < deadline:
            seen = max(seen, group_cpu_seconds(child.pid))
            time.sleep(0.02)
        assert seen >= 0.05
    finally:
        child.wait(timeout=30)
    assert group_cpu_seconds(child.pid) == 0.0  # gone: nothing left to count


def test_served_goal_compares_the_spec_choice_with_fp32(default_spec):
    from benchmarks.cpu_served import ServedResult, default_variants, goal_line, variant_spec
    from benchmarks.latency import EnsembleStats, LatencyStats

    def served(variant, requests_per_s, p99_ms):
        stats = EnsembleStats(LatencyStats(p99_ms / 2, p99_ms, p99_ms, p99_ms / 2, requests_per_s, 20), 20, 0, 4, 10.0)
        return ServedResult(variant, [stats], [])

    fp32, opt, all_int8, mine = default_variants(default_spec)  # the spec serves text + image as INT8
    assert mine.precision == dict(default_spec.export.cpu.precision)
    # Served variants measure the encoders: the route's item-embedding cache is off in every one.
    assert default_spec.serving.cache.enabled and not variant_spec(default_spec, mine).serving.cache.enabled
    fast = [served(fp32, 1.0, 900), served(opt, 1.2, 800), served(all_int8, 3.0, 400), served(mine, 2.1, 700)]
    assert goal_line(default_spec, fast).endswith("spec (pipeline.yaml) 2.10x, p99 700 ms vs 900 ms: met.")
    slower_tail = [fast[0], served(mine, 2.5, 950)]
    assert goal_line(default_spec, slower_tail).endswith("2.50x, p99 950 ms vs 900 ms: MISSED.")
    assert "MISSED" in goal_line(default_spec, [fast[0], served(mine, 1.5, 500)])
