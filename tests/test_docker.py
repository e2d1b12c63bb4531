"""Deployment files: no Docker engine here, so check what can be checked without one."""

from __future__ import annotations

import re
import subprocess

import yaml

from fusionrank.serving.render import PROFILES

from .conftest import REPO_ROOT

DOCKER = REPO_ROOT / "docker"


def test_dockerfile_copies_paths_that_exist():
    sources = re.findall(r"^COPY (?!--from)(.+) \S+$", (DOCKER / "Dockerfile").read_text(), flags=re.M)
    assert sources, "no COPY lines found"
    for line in sources:
        for src in line.split():
            assert (REPO_ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"


def test_entrypoint_is_valid_bash_and_knows_every_profile():
    subprocess.run(["bash", "-n", str(DOCKER / "entrypoint.sh")], check=True)
    text = (DOCKER / "entrypoint.sh").read_text()
    for profile in PROFILES:
        assert profile in text, f"entrypoint does not handle the {profile} profile"


def test_compose_and_kubernetes_manifests_parse():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    assert compose["services"]["fusionrank"]["build"]["dockerfile"] == "docker/Dockerfile"
    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "deployment.yaml").read_text()))
    kinds = {d["kind"] for d in docs}
    assert kinds == {"Deployment", "Service"}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    ports = {p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {8000, 8001, 8002}
