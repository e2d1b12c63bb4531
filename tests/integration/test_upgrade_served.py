"""The upgrade report's CPU workflow end to end on a built repository and the real server."""

from __future__ import annotations

import copy
import json

import pytest

from fusionrank.contract.spec import ServingProfile
from release.upgrade import build_report
from release.upgrade_compare import load_report
from release.upgrade_timing import TimingPlan


@pytest.mark.e2e
def test_cpu_upgrade_report_end_to_end(ci_spec, built_repository, triton_server, tmp_path):
    """Real measurements on the built repository: ONNX Runtime vs golden outputs, per-model latency, the ensemble
    on the session's Triton server (CPU profile). The first run saves a baseline, the second compares and passes,
    a doctored baseline with a 1000x faster ensemble fails naming the metrics.

    The threshold arithmetic is tested exactly in tests/unit/release/test_upgrade.py; here the latency thresholds
    are widened to 50x because a shared 2-core CI machine's run-to-run timing noise (other processes, the session's
    server) far exceeds the production 25%, and this test is about the workflow, not this machine's speed.
    """
    from fusionrank.contract.spec import UpgradeSpec
    from release.upgrade import upgrade_report

    spec = ci_spec.with_overrides(upgrade=UpgradeSpec(max_latency_regression=49.0, max_throughput_regression=0.98,
                                                      max_accuracy_delta=ci_spec.upgrade.max_accuracy_delta))
    quick = dict(url=triton_server.grpc_url, requests=8, scenario="ci", batch_sizes=(1, 32),
                 plan=TimingPlan(rounds=4, window_s=0.05))
    base = tmp_path / "baseline.json"
    # The profile as the CLI passes it (an enum): the report names it by its value.
    first = upgrade_report(spec, built_repository, ServingProfile.CPU, out=tmp_path / "first", save_baseline_to=base,
                           **quick)
    assert first["comparison"]["passed"], first["comparison"]["regressions"]
    assert first["profile"] == "cpu" and base.is_file()
    assert (tmp_path / "first" / "report.md").read_text().startswith("# Upgrade report (cpu profile)")
    assert set(first["accuracy"]) == {"text_encoder", "image_encoder", "audio_encoder", "fusion_ranker"}
    assert all(entry["passed"] for entry in first["accuracy"].values())
    assert first["accuracy"]["fusion_ranker"]["ranking"]["passed"]
    assert set(first["latency"]["models"]["image_encoder"]) == {"1", "32"}
    entry = first["latency"]["models"]["image_encoder"]["32"]
    assert len(entry["repeats_ms"]) == 4 and entry["samples"] >= 4 * 3 and entry["load_average"]["before"]
    # the served files are what was measured: the CI spec serves the optimised FP32 graphs
    assert {m: f["path"].rsplit("/", 1)[-1] for m, f in first["served"].items()} == dict.fromkeys(
        ("text_encoder", "image_encoder", "audio_encoder", "fusion_ranker"), "model.opt.onnx")
    assert first["provenance"]["machine"]["cores"] >= 1 and first["provenance"]["spec_digest"] == spec.digest()
    ens = first["latency"]["ensemble"]
    assert ens["errors"] == 0 and ens["requests"] == 8 and len(ens["repeats_ms"]) == 4
    assert ens["p95_ms"] >= ens["p50_ms"] > 0 and ens["p95_supported"] is False  # 8 requests cannot support a p95

    second = upgrade_report(spec, built_repository, "cpu", baseline=base, out=tmp_path / "second", **quick)
    assert second["comparison"]["passed"], second["comparison"]["regressions"]
    assert second["comparison"]["baseline_file"] == str(base)
    md = (tmp_path / "second" / "report.md").read_text()
    assert "**PASS**" in md and "| image_encoder | 32 |" in md

    doctored = copy.deepcopy(load_report(base))
    doctored["latency"]["ensemble"]["repeats_ms"] = [r / 1000 for r in doctored["latency"]["ensemble"]["repeats_ms"]]
    doctored["latency"]["ensemble"]["throughput_rps"] *= 1000
    doctored_path = tmp_path / "doctored.json"
    doctored_path.write_text(json.dumps(doctored))
    measured = {k: v for k, v in second.items() if k not in ("comparison", "files")}
    third = build_report(spec, measured, load_report(doctored_path), str(doctored_path))
    assert not third["comparison"]["passed"]
    assert {r["metric"] for r in third["comparison"]["regressions"]} == {"latency.ensemble.median_ms",
                                                                        "latency.ensemble.throughput_rps"}
