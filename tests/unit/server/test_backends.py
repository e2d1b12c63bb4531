"""Serving TensorRT plans needs a Triton that has the TensorRT backend and, for version-compatible plans, its backend
config: which backends a profile needs (read from the repository's configs), the early refusal of a Triton that
lacks them (the nvidia-pytriton server found here), and `--backend-config` reaching tritonserver."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from fusionrank.contract.spec import ServingProfile
from fusionrank.server.backends import available_backends, missing_backends, required_backends
from fusionrank.server.launcher import LaunchError, TritonInstall, TritonServer, find_triton
from tests.paths import CI_SPEC, REPO_ROOT

COMMITTED = REPO_ROOT / "model_repository"


def test_each_profile_needs_the_backends_its_configs_name():
    gpu = required_backends(COMMITTED, ServingProfile.GPU)
    assert set(gpu["tensorrt"]) == {"text_encoder", "image_encoder", "audio_encoder", "fusion_ranker"}
    assert "onnxruntime" not in gpu
    onnx_gpu = required_backends(COMMITTED, ServingProfile.ONNX_GPU)
    assert set(onnx_gpu["onnxruntime"]) == set(gpu["tensorrt"]) and "tensorrt" not in onnx_gpu
    assert set(required_backends(COMMITTED, ServingProfile.CPU)) == {"python"}


def _backends(root, *names):
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / f"libtriton_{name}.so").write_bytes(b"")
    return root


def test_missing_backends_name_the_backend_and_the_models(tmp_path):
    python_only = _backends(tmp_path / "pytriton", "python")
    assert available_backends(python_only) == {"python"}
    why = missing_backends(COMMITTED, ServingProfile.GPU, python_only)
    assert "tensorrt backend for audio_encoder, fusion_ranker, image_encoder, text_encoder" in why
    assert "has only: python" in why
    assert missing_backends(COMMITTED, ServingProfile.CPU, python_only) is None
    ngc = _backends(tmp_path / "ngc", "python", "tensorrt", "onnxruntime")
    assert missing_backends(COMMITTED, ServingProfile.GPU, ngc) is None
    assert missing_backends(COMMITTED, ServingProfile.ONNX_GPU, ngc) is None


@pytest.mark.parametrize("profile", [ServingProfile.GPU, ServingProfile.ONNX_GPU])
def test_the_pytriton_server_refuses_gpu_profiles_before_starting(tmp_path, profile, monkeypatch):
    if find_triton(tmp_path / "cache").backend_dir is None:
        pytest.skip("a tritonserver with its own backend folder is on PATH (the NGC image)")
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    server = TritonServer(COMMITTED, profile=profile, cache=tmp_path / "cache", log_file=tmp_path / "log")
    backend = "tensorrt" if profile is ServingProfile.GPU else "onnxruntime"
    with pytest.raises(LaunchError, match=f"needs the {backend} backend for .*has only: python"):
        server.start(timeout=5)
    assert started == []


def test_backend_config_reaches_tritonserver(tmp_path):
    install = TritonInstall(tmp_path / "tritonserver", tmp_path / "backends", None, {})
    server = TritonServer(COMMITTED, profile="gpu", log_file=tmp_path / "log",
                          backend_config=["tensorrt,version-compatible=true"])
    assert "--backend-config=tensorrt,version-compatible=true" in server.command(install)
    plain = TritonServer(COMMITTED, profile="gpu", log_file=tmp_path / "log")
    assert not [a for a in plain.command(install) if a.startswith("--backend-config")]


def test_serve_gpu_passes_the_backend_config_its_engines_need(monkeypatch, tmp_path):
    from fusionrank_cli import commands
    from fusionrank_cli.main import main

    seen = {}
    monkeypatch.setattr(commands, "triton_backend_config", lambda spec, repo: ["tensorrt,version-compatible=true"])
    monkeypatch.setattr(commands, "refuse_on_mismatch", lambda spec, repo, force, backend_config: seen.update(
        preflight=backend_config))
    monkeypatch.setattr(commands, "serve_forever", lambda *a, **k: seen.update(serve=k["backend_config"]) or 0)
    assert main(["serve", "--profile", "gpu", "--repository", str(COMMITTED),
                 "--spec", str(CI_SPEC)]) == 0
    assert seen == {"preflight": ["tensorrt,version-compatible=true"], "serve": ["tensorrt,version-compatible=true"]}


def _fake_bin(folder, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("printed", ["tensorrt,version-compatible=true", ""])
def test_entrypoint_passes_the_backend_config_check_prints(tmp_path, printed):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "tritonserver", 'printf "%s\\n" "$@"')
    # `local-cache` runs what follows its `--` (as for a spec without the server-wide cache: no redis-server here).
    _fake_bin(bin_dir, "fusionrank", f'[[ " $* " == *" --print-backend-config "* ]] && printf "%s" "{printed}"\n'
                                     '[ "$1" = local-cache ] && { while [ "$1" != -- ]; do shift; done; shift; '
                                     'exec "$@"; }\n'
                                     "exit 0")
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "1" / "model.plan").write_bytes(b"")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FUSIONRANK_REPOSITORY": str(repo)}
    result = subprocess.run(["bash", str(REPO_ROOT / "deploy" / "entrypoint.sh"), "gpu"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    args = result.stdout.split()
    assert [a for a in args if a.startswith("--backend-config")] == ([f"--backend-config={printed}"] if printed
                                                                       else [])
