"""Per-model precision chosen by the accuracy gate: an engine that fails it is rebuilt at the next precision up.

FP16 (and INT8) engines are fast but not always accurate enough: the ranker's LSTM, LayerNorm and sigmoid in FP16
must still pass the ranking gate ONNX Runtime passes (Kendall tau and top-10 overlap, `export.ranking`) and every
output its TensorRT tolerance (`export.tensorrt.tolerances`), both measured against the golden PyTorch outputs by
`export.upgrade_measure.measure_accuracy`. `build_engines_gated` builds each model at the spec's precision, runs the
gate on the engine, and on failure rebuilds at the next precision up (int8 -> fp16 -> fp32), so one model that needs
FP32 does not cost the others their speed. The manifest's `extra.precision_choice` says what was asked, what was
built and why each lower precision was rejected; a model that fails even at FP32 keeps its FP32 engine, recorded as
failing (the parity step then reports it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from export.convert.onnx2trt import BuildOptions, BuildResult, build_engine
from export.manifest import find_manifest, manifest_path
from export.node.facts import NodeInfo
from export.profiles import engine_models
from fusionrank.contract.spec import PipelineSpec, Precision, ServingProfile

log = logging.getLogger(__name__)

LADDER = (Precision.INT8, Precision.FP16, Precision.FP32)

# (model) -> (passed, why it failed): the gate on the engine just built in the repository.
GateCheck = Callable[[str], tuple[bool, str]]


def next_precision(precision: Precision) -> Precision | None:
    """The next precision up the ladder (None above FP32)."""
    index = LADDER.index(precision)
    return LADDER[index + 1] if index + 1 < len(LADDER) else None


def accuracy_gate(spec: PipelineSpec, repo: Path) -> GateCheck:
    """The gate on a built engine: golden-output tolerances and, for the ranker, ranking parity."""
    from benchmarks.latency import make_runner  # TensorRT and cuda-python: only where engines run
    from release.upgrade_measure import measure_accuracy

    def check(model: str) -> tuple[bool, str]:
        runner = make_runner("gpu", repo, model)
        try:
            entry = measure_accuracy(spec, repo, ServingProfile.GPU, {model: runner})[model]
        finally:
            runner.close()
        if entry["passed"]:
            return True, ""
        failed = [f"{o['output']} max |diff| {o['max_abs_diff']} (atol {o['atol']}, rtol {o['rtol']})"
                  for o in entry["outputs"].values() if not o["passed"]]
        ranking = entry.get("ranking")
        if ranking and not ranking.get("passed", True):
            failed.append(f"ranking parity {ranking}")
        return False, "; ".join(failed) or "failed the gate"

    return check


def build_engines_gated(spec: PipelineSpec, repo: Path, node: NodeInfo, timing_cache: Path | None = None,
                        models: list[str] | None = None, check: GateCheck | None = None) -> list[BuildResult]:
    """Build each engine at the lowest precision that passes the gate, from the spec's precision up."""
    check = check or accuracy_gate(spec, repo)
    results = []
    for model in models or engine_models(spec):
        asked = spec.export.tensorrt.precision
        precision, rejected = asked, []
        while True:
            result = build_engine(spec, repo, model, BuildOptions.from_spec(spec, precision), node, timing_cache)
            passed, why = check(model)
            up = next_precision(precision)
            if passed or up is None:
                break
            log.warning("%s: the %s engine fails the accuracy gate (%s); rebuilding at %s", model, precision.value,
                        why, up.value)
            rejected.append({"precision": precision.value, "why": why})
            precision = up
        choice = {"asked": asked.value, "built": precision.value, "rejected": rejected, "passed": passed}
        if not passed:
            choice["why"] = why
        manifest = find_manifest(repo, model)
        dataclasses.replace(manifest, extra={**manifest.extra, "precision_choice": choice}).write(
            manifest_path(repo, model))
        results.append(dataclasses.replace(result, precision=precision.value))
    return results
