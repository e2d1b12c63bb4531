"""Upgrade report: threshold logic on synthetic reports, and the CPU workflow end to end on a built repository."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.latency import LatencyStats, benchmark_model, summarize, tile_rows
from fusionrank.contract.spec import ServingProfile
from release.upgrade import build_report, save_baseline
from release.upgrade_compare import compare, load_report
from release.upgrade_markdown import render_markdown
from release.upgrade_measure import SCHEMA, ReportError

# Window medians of 8 interleaved rounds: +-3 % jitter around the median, as on a quiet node.
JITTER = (1.0, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97, 1.0)


def _stats(p50: float, p95: float, throughput: float, repeats: list[float] | None = None) -> dict:
    return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p95 * 1.1, "mean_ms": p50, "throughput": throughput,
            "samples": 400, "clock": "cpu", "repeats_ms": repeats if repeats is not None else [p50 * j for j in JITTER]}


def _report(profile: str = "cpu", ranker_diff: float = 2e-6, ens_p95: float = 120.0, ens_rps: float = 10.0,
            encoder_p95: float = 40.0, encoder_p50: float = 30.0, errors: int = 0) -> dict:
    """A measured report as `release.upgrade_measure.measure` returns it, with numbers chosen by the test."""
    out = {"max_abs_diff": ranker_diff, "atol": 1e-5, "rtol": 1e-4, "passed": ranker_diff <= 1e-5, "samples": 160}
    return {
        "schema": SCHEMA, "created_utc": "2026-11-23T10:00:00Z", "profile": profile, "spec_digest": "abc",
        "node": {"processor": "x86_64", "cpu_count": 2, "hostname": "node-a"}, "engines": {}, "manifests": {},
        "accuracy": {
            "image_encoder": {"samples": 16, "passed": True, "outputs": {"image_embedding": {
                "max_abs_diff": 3e-6, "atol": 1e-4, "rtol": 1e-3, "passed": True, "samples": 16}}},
            "fusion_ranker": {"samples": 160, "passed": out["passed"], "outputs": {"click_probability": out},
                              "ranking": {"top10_overlap": 1.0, "kendall_tau": 0.999, "auc_reference": 0.7,
                                          "auc_actual": 0.7, "auc_diff": 0.0, "passed": True, "candidates": 160}}},
        "latency": {
            "models": {"image_encoder": {"1": _stats(0.3, 0.4, 3000.0),
                                         "64": _stats(encoder_p50, encoder_p95, 2000.0)}},
            "ensemble": {"scenario": "ci", "requests": 20, "errors": errors, "error_rate": errors / 20, "users": 2,
                         "candidates_per_request": 10.0, "first_error": "boom" if errors else None,
                         "p50_ms": ens_p95 * 0.8, "p95_ms": ens_p95, "p99_ms": ens_p95 * 1.2, "mean_ms": ens_p95 * 0.8,
                         "throughput_rps": ens_rps, "samples": 20 - errors,
                         "clock": "wall", "repeats_ms": [ens_p95 * 0.8 * j for j in JITTER]}},
    }


def _metrics(comparison) -> set[str]:
    return {r.metric for r in comparison.regressions}


def test_same_numbers_pass(ci_spec):
    result = compare(ci_spec, _report(), _report())
    assert result.passed and result.regressions == []


def test_latency_within_threshold_passes_and_beyond_fails(ci_spec):
    allowed = ci_spec.upgrade.max_latency_regression
    # consistently slower, but by less than the noise floor: significant to the test, not a regression
    assert compare(ci_spec, _report(ens_p95=120.0 * (1 + allowed * 0.9)), _report()).passed
    result = compare(ci_spec, _report(ens_p95=120.0 * (1 + allowed * 1.5)), _report())
    assert _metrics(result) == {"latency.ensemble.median_ms"}
    assert f"allowed +{allowed:.0%}" in str(result.regressions[0]) and "significant" in str(result.regressions[0])


def test_per_model_latency_regression_names_model_and_batch(ci_spec):
    # A model's runtime is judged on its window medians: the whole distribution moved.
    result = compare(ci_spec, _report(encoder_p50=60.0, encoder_p95=80.0), _report())
    assert _metrics(result) == {"latency.models.image_encoder.batch64.median_ms"}


def test_per_model_tail_jitter_alone_is_not_a_regression(ci_spec):
    # p95 of a short micro-benchmark doubled with the median unchanged: a scheduler hiccup, not a slower engine.
    assert compare(ci_spec, _report(encoder_p95=80.0), _report()).passed


def test_one_slow_window_is_noise_not_a_regression(ci_spec):
    # A neighbour's burst made two of eight windows 3x slower: the median barely moves, the test does not reject.
    current, baseline = _report(), _report()
    noisy = [30.0 * j for j in JITTER]
    noisy[2] *= 3
    noisy[5] *= 3
    current["latency"]["models"]["image_encoder"]["64"] = _stats(31.0, 90.0, 1900.0, noisy)
    assert compare(ci_spec, current, baseline).passed


def test_sub_quarter_millisecond_changes_are_never_regressions(ci_spec):
    # measured on a loaded node: +32 % of a 0.38-ms call with nothing changed
    current, baseline = _report(), _report()
    current["latency"]["models"]["image_encoder"]["1"] = _stats(0.5, 0.6, 2000.0)
    baseline["latency"]["models"]["image_encoder"]["1"] = _stats(0.38, 0.45, 2600.0)
    assert compare(ci_spec, current, baseline).passed
    current["latency"]["models"]["image_encoder"]["1"] = _stats(0.75, 0.9, 1300.0)  # +0.37 ms, +97 %
    assert _metrics(compare(ci_spec, current, baseline)) == {"latency.models.image_encoder.batch1.median_ms"}


def test_too_few_repeats_are_not_compared_and_say_so(ci_spec):
    current, baseline = _report(encoder_p50=90.0), _report()
    current["latency"]["models"]["image_encoder"]["64"]["repeats_ms"] = [90.0, 91.0]
    result = compare(ci_spec, current, baseline)
    assert result.passed
    assert any("fewer than 4 repeats" in n and "image_encoder.batch64" in n for n in result.notes)


def test_throughput_drop_fails(ci_spec):
    result = compare(ci_spec, _report(ens_rps=5.0, ens_p95=240.0), _report(ens_rps=10.0))
    assert _metrics(result) == {"latency.ensemble.throughput_rps", "latency.ensemble.median_ms"}
    assert "-50%" in next(str(r) for r in result.regressions if "throughput" in r.metric)
    assert compare(ci_spec, _report(ens_rps=9.0), _report(ens_rps=10.0)).passed


def test_a_baseline_on_another_clock_is_not_compared(ci_spec):
    current, baseline = _report(encoder_p50=90.0), _report()
    baseline["latency"]["models"]["image_encoder"]["64"]["clock"] = "wall"
    result = compare(ci_spec, current, baseline)
    assert result.passed and any("measured as cpu time, the baseline as wall" in n for n in result.notes)


def test_interleaved_baseline_repository_is_what_models_are_compared_with(ci_spec):
    # Side by side: this run's models against the old files timed in the same rounds; the stored baseline's model
    # figures (measured at another time, under other load) are not used for them.
    current = _report(encoder_p50=45.0)
    current["latency"]["interleaved_baseline"] = {"image_encoder": {"1": _stats(0.3, 0.4, 3000.0),
                                                                    "64": _stats(30.0, 40.0, 2000.0)}}
    current["latency"]["interleaved_baseline_repository"] = "/old/repo"
    stale = _report(encoder_p50=10.0)  # the stored baseline says the encoder was 3x faster back then
    result = compare(ci_spec, current, stale)
    assert _metrics(result) == {"latency.models.image_encoder.batch64.median_ms"}
    assert "+50.0%" in str(result.regressions[0])
    assert any("/old/repo" in n and "side by side" in n for n in result.notes)
    # no stored baseline needed for the side-by-side part
    assert _metrics(compare(ci_spec, current, None)) == {"latency.models.image_encoder.batch64.median_ms"}


def test_served_file_change_is_noted(ci_spec):
    current, baseline = _report(), _report()
    current["served_digests"], baseline["served_digests"] = {"text_encoder": "bbb"}, {"text_encoder": "aaa"}
    assert any("text_encoder: the served file changed" in n for n in compare(ci_spec, current, baseline).notes)


def test_accuracy_drift_beyond_delta_fails_even_within_tolerance(ci_spec):
    spec = ci_spec.with_overrides(upgrade=type(ci_spec.upgrade)(max_accuracy_delta=1e-6))
    result = compare(spec, _report(ranker_diff=8e-6), _report(ranker_diff=1e-6))
    assert _metrics(result) == {"accuracy.fusion_ranker.click_probability"}
    assert compare(ci_spec, _report(ranker_diff=8e-6), _report(ranker_diff=1e-6)).passed


def test_parity_failure_needs_no_baseline(ci_spec):
    result = compare(ci_spec, _report(ranker_diff=1e-3), None)
    assert _metrics(result) == {"accuracy.fusion_ranker.click_probability"}
    assert "exceeds atol=1e-05" in str(result.regressions[0])
    assert any("no baseline" in n for n in result.notes)


def test_ranking_parity_failure_and_error_rate(ci_spec):
    current = _report(errors=5)
    current["accuracy"]["fusion_ranker"]["ranking"].update(kendall_tau=0.5, passed=False)
    assert _metrics(compare(ci_spec, current, None)) == {"accuracy.fusion_ranker.ranking",
                                                         "latency.ensemble.error_rate"}


def test_engine_mismatch_left_after_rebuild_is_a_regression(ci_spec):
    current = _report(profile="gpu")
    current["engines"] = {"rebuilt": ["text_encoder"], "preflight_after": [
        {"model": "text_encoder", "kind": "wrong GPU", "detail": "built for 9.0"}]}
    assert _metrics(compare(ci_spec, current, None)) == {"engines.text_encoder"}


def test_manifest_changes_are_listed_not_failed(ci_spec):
    old, new = _report(profile="gpu"), _report(profile="gpu")
    old["manifests"] = {"text_encoder": {"tensorrt_version": "10.13.3.9", "gpu_name": "NVIDIA A100"}}
    new["manifests"] = {"text_encoder": {"tensorrt_version": "10.14.1.48", "gpu_name": "NVIDIA H100"}}
    result = compare(ci_spec, new, old)
    assert result.passed
    assert {c["field"] for c in result.manifest_changes["text_encoder"]} == {"tensorrt_version", "gpu_name"}
    md = render_markdown(build_report(ci_spec, new, old, "old.json"), old)
    assert "| text_encoder | tensorrt_version | 10.13.3.9 | 10.14.1.48 |" in md


def test_notes_on_profile_and_spec_changes(ci_spec):
    baseline = _report(profile="gpu")
    baseline["spec_digest"] = "old"
    result = compare(ci_spec, _report(), baseline)
    assert any("gpu profile" in n for n in result.notes) and any("spec changed" in n for n in result.notes)


def test_markdown_report_has_verdict_regressions_and_tables(ci_spec):
    baseline = _report()
    report = build_report(ci_spec, _report(ens_p95=400.0), baseline, "base.json")
    md = render_markdown(report, baseline)
    assert md.startswith("# Upgrade report (cpu profile)")
    assert "**FAIL**: 1 regression(s)" in md
    assert "`latency.ensemble.median_ms`" in md
    assert "| fusion_ranker | click_probability |" in md and "| image_encoder | 64 | 8 | 400 |" in md
    # the noise it saw and the verdict per row: repeats, calls, medians with CIs, baseline median, change, p
    ens_row = next(line for line in md.splitlines() if line.startswith("| 8 | 20 |"))
    assert "| 96 | +233.3% |" in ens_row and ens_row.endswith("| SLOWER |")
    assert "| same (noise) |" in md


def test_baseline_round_trip_and_schema_check(tmp_path, ci_spec):
    report = build_report(ci_spec, _report(), None, None)
    path = save_baseline(report, tmp_path / "b" / "baseline.json")
    loaded = load_report(path)
    assert "comparison" not in loaded and loaded["latency"] == report["latency"]
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(ReportError, match="schema"):
        load_report(tmp_path / "other.json")
    with pytest.raises(ReportError, match="cannot read"):
        load_report(tmp_path / "missing.json")


def test_summarize_and_tile_rows():
    stats = summarize([0.010] * 19 + [0.100], wall_s=0.29, units=20 * 8)
    assert stats.p50_ms == pytest.approx(10.0) and stats.p99_ms > stats.p95_ms > stats.p50_ms
    assert stats.throughput == pytest.approx(160 / 0.29)
    rows = tile_rows({"x": np.arange(3)[:, None]}, 7)["x"][:, 0]
    assert rows.tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_benchmark_model_runs_every_batch_size():
    calls = []

    class Echo:
        def run(self, inputs):
            calls.append(len(inputs["x"]))
            return {"y": inputs["x"] * 2}

    stats = benchmark_model(Echo(), {"x": np.ones((4, 3), np.float32)}, (1, 8), min_iterations=5, budget_s=0.0)
    assert set(stats) == {1, 8} and all(isinstance(s, LatencyStats) and s.samples == 5 for s in stats.values())
    assert calls.count(8) == 5 + 1  # timed + warm-up
    # Fast calls keep going until the time budget is spent (many samples, a stable p95), up to the cap.
    stats = benchmark_model(Echo(), {"x": np.ones((4, 3), np.float32)}, (2,), min_iterations=3, budget_s=0.05,
                            max_iterations=40)
    assert stats[2].samples == 40


def test_command_exit_code_names_regressions_and_saves_baseline(ci_spec, tmp_path, monkeypatch, capsys):
    """The CLI handler on a fake measurement: exit 0 against itself, 1 naming the metric against a faster one."""
    import release.upgrade as upgrade

    monkeypatch.setattr(upgrade, "measure", lambda *a, **k: _report(ens_p95=300.0))
    args = dict(profile="cpu", out_dir=tmp_path / "r1", requests=5, baseline=None, save_baseline=tmp_path / "base.json")
    assert upgrade.upgrade_report_command(ci_spec, tmp_path, **args) == 0
    out = capsys.readouterr().out
    assert "PASS: 0 regression(s)" in out and "baseline saved to" in out
    assert (tmp_path / "r1" / "report.md").is_file() and (tmp_path / "base.json").is_file()

    args.update(out_dir=tmp_path / "r2", baseline=tmp_path / "base.json", save_baseline=None)
    assert upgrade.upgrade_report_command(ci_spec, tmp_path, **args) == 0

    faster = load_report(tmp_path / "base.json")
    faster["latency"]["ensemble"]["repeats_ms"] = [r / 10 for r in faster["latency"]["ensemble"]["repeats_ms"]]
    (tmp_path / "faster.json").write_text(json.dumps(faster))
    capsys.readouterr()
    args.update(out_dir=tmp_path / "r3", baseline=tmp_path / "faster.json")
    assert upgrade.upgrade_report_command(ci_spec, tmp_path, **args) == 1
    out = capsys.readouterr().out
    assert "REGRESSION latency.ensemble.median_ms: wall time 24 -> 240 (+900.0%" in out
    assert "FAIL: 1 regression(s)" in out
    saved = json.loads((tmp_path / "r3" / "report.json").read_text())
    assert saved["comparison"]["regressions"][0]["metric"] == "latency.ensemble.median_ms"


def test_profile_is_named_by_its_value_in_the_default_report_folder(ci_spec, tmp_path, monkeypatch):
    """The CLI passes a ServingProfile: the report folder says `cpu`; a profile the report cannot measure is refused."""
    import release.upgrade as upgrade

    monkeypatch.setattr(upgrade, "measure", lambda *a, **k: _report())
    monkeypatch.setenv("FUSIONRANK_HOME", str(tmp_path))
    report = upgrade.upgrade_report(ci_spec, tmp_path, ServingProfile.CPU)
    folder = Path(report["files"]["markdown"]).parent
    assert folder.parent == tmp_path / "reports" and folder.name.startswith("upgrade-cpu-")
    with pytest.raises(ReportError, match="unknown profile 'onnx_gpu'; allowed: cpu, gpu"):
        upgrade.upgrade_report(ci_spec, tmp_path, ServingProfile.ONNX_GPU)


def test_bad_baseline_fails_before_measuring(ci_spec, tmp_path, monkeypatch):
    import release.upgrade as upgrade

    monkeypatch.setattr(upgrade, "measure", lambda *a, **k: pytest.fail("measured despite a bad baseline"))
    with pytest.raises(ReportError):
        upgrade.upgrade_report(ci_spec, tmp_path, baseline=tmp_path / "nope.json", out=tmp_path / "out")

