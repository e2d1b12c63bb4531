"""Deployment files: no Docker engine here, so check what can be checked without one."""

from __future__ import annotations

import os
import re
import stat
import subprocess

import pytest
import yaml

from fusionrank.spec import ServingProfile

from .conftest import REPO_ROOT

DOCKER = REPO_ROOT / "docker"


def test_dockerfile_copies_paths_that_exist():
    sources = re.findall(r"^COPY (?!--from)(.+) \S+$", (DOCKER / "Dockerfile").read_text(), flags=re.M)
    assert sources, "no COPY lines found"
    for line in sources:
        for src in line.split():
            assert (REPO_ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"


def _fake_bin(tmp_path, name: str, body: str):
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run_entrypoint(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """The entrypoint with stand-ins for tritonserver (prints its arguments) and fusionrank (succeeds)."""
    _fake_bin(tmp_path, "tritonserver", 'printf "%s\\n" "$@"')
    _fake_bin(tmp_path, "fusionrank", "exit 0")
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True, exist_ok=True)
    (repo / "m" / "1" / "model.plan").write_bytes(b"")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FUSIONRANK_REPOSITORY": str(repo)}
    return subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("profile", list(ServingProfile))
def test_entrypoint_starts_triton_with_each_profile_config(tmp_path, profile):
    result = _run_entrypoint(tmp_path, profile.value)
    assert result.returncode == 0, result.stderr
    names = [a.split("=", 1)[1] for a in result.stdout.split() if a.startswith("--model-config-name=")]
    assert names == ([profile.config_name] if profile.config_name else [])
    assert f"--model-repository={tmp_path / 'repo'}" in result.stdout.split()


def test_entrypoint_refuses_an_unknown_profile(tmp_path):
    result = _run_entrypoint(tmp_path, "tpu")
    assert result.returncode == 2 and "unknown profile 'tpu'" in result.stderr


def test_compose_and_kubernetes_manifests_parse():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    assert compose["services"]["fusionrank"]["build"]["dockerfile"] == "docker/Dockerfile"
    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "deployment.yaml").read_text()))
    kinds = {d["kind"] for d in docs}
    assert kinds == {"Deployment", "Service"}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    ports = {p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {8000, 8001, 8002}
