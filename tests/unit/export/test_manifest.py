"""Engine manifests and the pre-flight check, with a fake node probe (no GPU, no TensorRT needed)."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest

from export import manifest as manifest_mod
from export.manifest import (
    EngineManifest,
    ManifestError,
    compare_manifests,
    create_manifest,
    find_manifest,
    load_manifest,
    manifest_path,
    plan_path,
)
from export.node.facts import NodeInfo, probe_node
from export.profiles import engine_models, model_profiles
from export.verify.preflight import MismatchKind, check_command, preflight
from fusionrank.contract.spec import BatchingSpec
from tests.paths import CI_SPEC

# A GPU no real node has, so tests that use the real probe always see a mismatch.
BUILD_NODE = NodeInfo(gpu_name="Fake GPU X1", compute_capability="9.0", driver_version="570.124.06",
                      cuda_version="12.8", tensorrt_version="10.13.3.9")
FLAGS = {"precision": "fp16", "workspace_mib": 2048, "builder_optimization_level": 3,
         "hardware_compatibility_level": "none", "version_compatible": False, "calibration_samples": 0}


def _node(**changes) -> NodeInfo:
    return dataclasses.replace(BUILD_NODE, **changes)


def _engine_repo(spec, root: Path, flags: dict | None = None) -> Path:
    """A repository whose every engine model has model.onnx, a (fake) model.plan and its manifest."""
    repo = root / "repo"
    for model in engine_models(spec):
        (repo / model / "1").mkdir(parents=True)
        (repo / model / "1" / "model.onnx").write_bytes(f"onnx graph of {model}".encode())
        plan_path(repo, model).write_bytes(f"serialized engine of {model}".encode())
        m = create_manifest(spec, repo, model, BUILD_NODE, "fp16", model_profiles(spec, model), flags or FLAGS)
        m.write(manifest_path(repo, model))
    return repo


@pytest.fixture
def repo(ci_spec, tmp_path):
    return _engine_repo(ci_spec, tmp_path)


def _kinds(mismatches, model=None):
    return {m.kind for m in mismatches if model is None or m.model == model}


def test_manifest_records_what_the_engine_was_built_from(ci_spec, repo):
    m = find_manifest(repo, "text_encoder")
    assert m.tensorrt_version == "10.13.3.9" and m.gpu_name == "Fake GPU X1" and m.compute_capability == "9.0"
    assert m.cuda_version == "12.8" and m.driver_version == "570.124.06" and m.precision == "fp16"
    assert m.spec_digest == ci_spec.digest()
    assert m.onnx_sha256 == manifest_mod.sha256_file(repo / "text_encoder" / "1" / "model.onnx")
    assert m.plan_sha256 == manifest_mod.sha256_file(plan_path(repo, "text_encoder"))
    assert m.profiles == [p.as_dict() for p in model_profiles(ci_spec, "text_encoder")]
    assert m.build_flags == FLAGS
    assert m.created_utc.endswith("Z")
    assert load_manifest(manifest_path(repo, "text_encoder")) == m


def test_matching_node_has_no_mismatch(ci_spec, repo):
    assert preflight(ci_spec, repo, probe=lambda: BUILD_NODE) == []


def test_missing_plan_and_missing_manifest_are_missing_engines(ci_spec, repo):
    plan_path(repo, "audio_encoder").unlink()
    manifest_path(repo, "image_encoder").unlink()
    found = preflight(ci_spec, repo, probe=lambda: BUILD_NODE)
    assert _kinds(found, "audio_encoder") == {MismatchKind.MISSING_ENGINE}
    assert _kinds(found, "image_encoder") == {MismatchKind.MISSING_ENGINE}
    assert "no manifest.json" in str(next(m for m in found if m.model == "image_encoder"))
    assert _kinds(found, "text_encoder") == set()


def test_changed_onnx_makes_the_engine_stale(ci_spec, repo):
    (repo / "fusion_ranker" / "1" / "model.onnx").write_bytes(b"re-exported ranker")
    found = preflight(ci_spec, repo, probe=lambda: BUILD_NODE)
    assert [(m.model, m.kind) for m in found] == [("fusion_ranker", MismatchKind.STALE_ENGINE)]
    assert "model.onnx changed" in str(found[0])


def test_replaced_plan_is_stale(ci_spec, repo):
    plan_path(repo, "image_encoder").write_bytes(b"some other engine")
    found = preflight(ci_spec, repo, probe=lambda: BUILD_NODE)
    assert _kinds(found) == {MismatchKind.STALE_ENGINE}


def test_spec_change_that_moves_profiles_is_detected(ci_spec, repo):
    models = dict(ci_spec.serving.models)
    models["text_encoder"] = BatchingSpec(max_batch_size=256, preferred_batch_sizes=(64, 128))
    bigger = ci_spec.with_overrides(serving=dataclasses.replace(ci_spec.serving, models=models))
    found = preflight(bigger, repo, probe=lambda: BUILD_NODE)
    assert [(m.model, m.kind) for m in found] == [("text_encoder", MismatchKind.SPEC_CHANGED)]


def test_spec_change_that_does_not_touch_engines_is_not_a_mismatch(ci_spec, repo):
    looser = ci_spec.with_overrides(slo=dataclasses.replace(ci_spec.slo, p99_ms=9000.0))
    assert looser.digest() != ci_spec.digest()
    assert preflight(looser, repo, probe=lambda: BUILD_NODE) == []


@pytest.mark.parametrize("node, fragment", [
    (_node(gpu_name="NVIDIA A100", compute_capability="8.0"), "compute capability 9.0"),
    (_node(gpu_name="NVIDIA H200"), "tactics were timed on another GPU model"),
    (NodeInfo(tensorrt_version="10.13.3.9", notes=("nvidia-smi not found: no NVIDIA GPU",)), "nvidia-smi not found"),
])
def test_wrong_gpu_is_detected(ci_spec, repo, node, fragment):
    found = preflight(ci_spec, repo, probe=lambda: node)
    assert _kinds(found) == {MismatchKind.WRONG_GPU}
    assert len(found) == len(engine_models(ci_spec))
    assert fragment in found[0].detail


@pytest.mark.parametrize("node_version, compatible, ok", [
    ("10.13.3.9", False, True),
    ("10.13.3.9.post1", False, True),
    ("10.13.3", False, True),     # read from libnvinfer, which has no build number
    ("10.13.2", False, False),
    ("10.13.2.6", False, False),
    ("10.14.1.48", False, False),
    (None, False, False),
    ("10.14.1.48", True, True),   # version-compatible plans run on later TensorRT
    ("10.13.0.35", True, False),  # ... never on older
    ("11.0.0.1", True, True),     # the next major (TensorRT 10 plans on an 11 runtime, documented)
    ("12.0.0.1", True, False),    # ... but not two majors on
])
def test_tensorrt_version_rules(ci_spec, tmp_path, node_version, compatible, ok):
    repo = _engine_repo(ci_spec, tmp_path, {**FLAGS, "version_compatible": compatible})
    found = preflight(ci_spec, repo, probe=lambda: _node(tensorrt_version=node_version))
    assert _kinds(found) == (set() if ok else {MismatchKind.TENSORRT_MISMATCH})


def test_version_compatible_plans_need_the_backend_config_triton_runs_with(ci_spec, tmp_path):
    from export.verify.preflight import VERSION_COMPATIBLE_CONFIG, triton_backend_config

    repo = _engine_repo(ci_spec, tmp_path, {**FLAGS, "version_compatible": True})
    newer = _node(tensorrt_version="10.14.1.48")
    found = preflight(ci_spec, repo, probe=lambda: newer, backend_config=[])
    assert _kinds(found) == {MismatchKind.BACKEND_CONFIG} and len(found) == len(engine_models(ci_spec))
    assert f"--backend-config={VERSION_COMPATIBLE_CONFIG}" in found[0].detail
    assert preflight(ci_spec, repo, probe=lambda: newer, backend_config=[VERSION_COMPATIBLE_CONFIG]) == []
    assert triton_backend_config(ci_spec, repo) == [VERSION_COMPATIBLE_CONFIG]
    out = io.StringIO()
    assert check_command(ci_spec, repo, probe=lambda: newer, out=out, print_backend_config=True) == 0
    assert out.getvalue() == f"{VERSION_COMPATIBLE_CONFIG}\n"


def test_plain_plans_need_no_backend_config(ci_spec, repo):
    from export.verify.preflight import triton_backend_config

    assert triton_backend_config(ci_spec, repo) == []
    assert preflight(ci_spec, repo, probe=lambda: BUILD_NODE, backend_config=[]) == []


def test_tensorrt_version_argument_overrides_the_probe(ci_spec, repo):
    found = preflight(ci_spec, repo, tensorrt_version="10.16.1.11", probe=lambda: BUILD_NODE)
    assert _kinds(found) == {MismatchKind.TENSORRT_MISMATCH}
    assert "10.16.1.11" in found[0].detail


@pytest.mark.parametrize("cc, ok", [("8.6", True), ("9.0", True), ("12.0", True), ("7.5", False)])
def test_hardware_compatible_engines_run_on_ampere_and_newer(ci_spec, tmp_path, cc, ok):
    repo = _engine_repo(ci_spec, tmp_path, {**FLAGS, "hardware_compatibility_level": "ampere_plus"})
    found = preflight(ci_spec, repo, probe=lambda: _node(gpu_name="Other GPU", compute_capability=cc))
    assert _kinds(found) == (set() if ok else {MismatchKind.WRONG_GPU})


def test_unreadable_or_incomplete_manifest(ci_spec, repo):
    manifest_path(repo, "text_encoder").write_text("{not json")
    data = json.loads(manifest_path(repo, "image_encoder").read_text())
    del data["onnx_sha256"]
    manifest_path(repo, "image_encoder").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(manifest_path(repo, "text_encoder"))
    with pytest.raises(ManifestError, match="missing field.*onnx_sha256"):
        load_manifest(manifest_path(repo, "image_encoder"))
    found = preflight(ci_spec, repo, probe=lambda: BUILD_NODE)
    assert {(m.model, m.kind) for m in found} == {("text_encoder", MismatchKind.MISSING_ENGINE),
                                                 ("image_encoder", MismatchKind.MISSING_ENGINE)}


def test_compare_manifests_names_changed_fields(repo):
    old = find_manifest(repo, "image_encoder")
    new = dataclasses.replace(old, tensorrt_version="10.14.1.48", gpu_name="NVIDIA H200",
                              created_utc="2030-01-01T00:00:00Z")
    changes = {c.field: (c.old, c.new) for c in compare_manifests(old, new)}
    assert changes == {"tensorrt_version": ("10.13.3.9", "10.14.1.48"), "gpu_name": ("Fake GPU X1", "NVIDIA H200")}
    assert compare_manifests(old, old) == []
    assert {c.field for c in compare_manifests(None, new)} >= {"tensorrt_version", "onnx_sha256"}
    assert compare_manifests(None, None) == []


def test_check_command_prints_a_table_and_names_each_mismatch(ci_spec, repo):
    (repo / "text_encoder" / "1" / "model.onnx").write_bytes(b"changed")
    out = io.StringIO()
    rc = check_command(ci_spec, repo,
                       probe=lambda: _node(gpu_name="NVIDIA L4", compute_capability="8.9"), out=out)
    text = out.getvalue()
    assert rc == 1
    header = next(line for line in text.splitlines() if line.startswith("model"))
    assert header.split() == ["model", "precision", "built_on", "tensorrt", "built", "status"]
    rows = {line.split()[0]: line for line in text.splitlines() if line.split() and line.split()[0] in
            engine_models(ci_spec)}
    assert set(rows) == set(engine_models(ci_spec))
    assert "stale engine" in rows["text_encoder"] and "Fake GPU X1" in rows["text_encoder"]
    assert "MISMATCH text_encoder: stale engine" in text
    for model in engine_models(ci_spec):
        assert f"MISMATCH {model}: wrong GPU" in text


def test_check_command_json_and_success(ci_spec, repo):
    out = io.StringIO()
    assert check_command(ci_spec, repo, as_json=True, probe=lambda: BUILD_NODE,
                         out=out) == 0
    data = json.loads(out.getvalue())
    assert data["mismatches"] == []
    assert [e["model"] for e in data["engines"]] == list(engine_models(ci_spec))
    assert all(e["status"] == "ok" and e["tensorrt"] == "10.13.3.9" for e in data["engines"])


def test_cli_check_exits_non_zero_on_this_gpu_less_node(ci_spec, repo, capsys):
    from fusionrank_cli.main import main

    node = probe_node()
    if node.has_gpu and node.gpu_name == BUILD_NODE.gpu_name:  # pragma: no cover - no such GPU exists
        pytest.skip("a node with the fake build GPU")
    rc = main(["check", "--spec", str(CI_SPEC), "--repository", str(repo)])
    assert rc == 1
    assert "MISMATCH text_encoder: wrong GPU" in capsys.readouterr().out


def test_serve_gpu_profile_refuses_on_mismatch_unless_forced(ci_spec, repo):
    from export.verify.preflight import PreflightError, refuse_on_mismatch

    (repo / "audio_encoder" / "1" / "model.onnx").write_bytes(b"changed")
    with pytest.raises(PreflightError, match=r"\d+ engine mismatch\(es\) with this node"):
        refuse_on_mismatch(ci_spec, repo, force=False)
    forced = refuse_on_mismatch(ci_spec, repo, force=True)
    assert any(m.model == "audio_encoder" and "stale engine" in str(m) for m in forced)


def test_manifest_needs_the_tensorrt_version(ci_spec, repo):
    with pytest.raises(ManifestError, match="TensorRT version"):
        create_manifest(ci_spec, repo, "text_encoder", _node(tensorrt_version=None), "fp16",
                        model_profiles(ci_spec, "text_encoder"), FLAGS)


def test_manifest_round_trips_through_json(repo):
    m = find_manifest(repo, "fusion_ranker")
    assert EngineManifest.from_dict(json.loads(json.dumps(m.as_dict()))) == m


def test_build_engines_without_tensorrt_says_what_to_install(ci_spec, tmp_path, capsys):
    from export.convert.onnx2trt import build_engines_command
    from export.node.trt_api import import_tensorrt

    if import_tensorrt() is not None:
        pytest.skip("TensorRT is installed here")
    rc = build_engines_command(ci_spec, tmp_path)
    assert rc != 0
    assert "pip install '.[gpu]'" in capsys.readouterr().out


def test_manifest_records_the_cuda_flavour_of_the_tensorrt_that_built_it(ci_spec, repo):
    assert find_manifest(repo, "text_encoder").tensorrt_cuda == "cu12"  # BUILD_NODE's CUDA 12.8 runtime
    m = create_manifest(ci_spec, repo, "text_encoder", BUILD_NODE, "fp16", model_profiles(ci_spec, "text_encoder"),
                        FLAGS, tensorrt_cuda="cu13")
    assert m.tensorrt_cuda == "cu13"
    assert EngineManifest.from_dict({k: v for k, v in m.as_dict().items() if k != "tensorrt_cuda"}).tensorrt_cuda \
        is None, "manifests written before the field still load"


def test_a_driver_too_old_for_the_plans_cuda_is_a_mismatch(ci_spec, tmp_path):
    repo = _engine_repo(ci_spec, tmp_path)
    for model in engine_models(ci_spec):  # built by tensorrt-cu13 (CUDA 13 needs R580)
        m = dataclasses.replace(find_manifest(repo, model), tensorrt_cuda="cu13")
        m.write(manifest_path(repo, model))
    found = preflight(ci_spec, repo, probe=lambda: _node(driver_version="570.124.06"))
    assert _kinds(found) == {MismatchKind.OLD_DRIVER}
    assert "570.124.06 is older than 580.65.06" in found[0].detail
    assert preflight(ci_spec, repo, probe=lambda: _node(driver_version="580.82.07")) == []


MIG_LISTING = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5b3c1a2e-0000-0000-0000-000000000000)
  MIG 3g.40gb     Device  0: (UUID: MIG-aaaa0000-0000-0000-0000-000000000000)
  MIG 1g.10gb     Device  1: (UUID: MIG-bbbb0000-0000-0000-0000-000000000000)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-77777777-0000-0000-0000-000000000000)
"""


def test_a_mig_slice_is_detected_and_does_not_pass_the_gpu_name_check(ci_spec, tmp_path):
    from export.node.facts import mig_profile

    assert mig_profile(MIG_LISTING, "0", None) == "3g.40gb"
    assert mig_profile(MIG_LISTING, "0", "MIG-bbbb0000-0000-0000-0000-000000000000") == "1g.10gb"
    assert mig_profile(MIG_LISTING, "1", "1") is None
    repo = _engine_repo(ci_spec, tmp_path)  # built on the whole GPU
    found = preflight(ci_spec, repo, probe=lambda: _node(mig_profile="1g.10gb"))
    assert _kinds(found) == {MismatchKind.WRONG_GPU} and "MIG 1g.10gb slice" in found[0].detail


def test_same_compute_capability_plans_run_on_h100_and_h200(ci_spec, tmp_path):
    repo = _engine_repo(ci_spec, tmp_path, {**FLAGS, "hardware_compatibility_level": "same_compute_capability"})
    assert preflight(ci_spec, repo, probe=lambda: _node(gpu_name="NVIDIA H200")) == []
    found = preflight(ci_spec, repo, probe=lambda: _node(gpu_name="NVIDIA A100", compute_capability="8.0"))
    assert _kinds(found) == {MismatchKind.WRONG_GPU}
