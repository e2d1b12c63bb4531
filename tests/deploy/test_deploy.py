"""Kubernetes and compose files, checked by the tools that read them: the committed renderings equal `kubectl
kustomize` of each overlay, every rendered object passes kubernetes-validate (strict), the PrometheusRule's rules
pass promtool, and the properties a platform team relies on hold in what would be applied."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.paths import REPO_ROOT

DOCKER = REPO_ROOT / "deploy"
RENDERED = sorted((DOCKER / "k8s" / "rendered").glob("*.yaml"))
KUBERNETES_VERSION = "1.31.0"  # the oldest minor the manifests promise to work on
CRDS = {"PodMonitor", "PrometheusRule"}  # Prometheus Operator kinds: no schema in kubernetes-validate
RELEASE = yaml.safe_load((DOCKER / "triton-release.yaml").read_text())
ADAPTER = yaml.safe_load((DOCKER / "k8s" / "prometheus-adapter-values.yaml").read_text())


def _all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _docs(path: Path) -> dict[str, dict]:
    """Objects by kind (ConfigMaps, of which there are several, by `ConfigMap/<name>`)."""
    return {d["kind"] if d["kind"] != "ConfigMap" else f"ConfigMap/{d['metadata']['name']}": d for d in _all(path)}


@pytest.fixture(params=RENDERED, ids=lambda p: p.stem)
def overlay(request) -> tuple[str, dict[str, dict]]:
    return request.param.stem, _docs(request.param)


def test_both_overlays_are_rendered():
    assert [p.stem for p in RENDERED] == ["cpu", "gpu"]


def test_prometheus_rule_equals_the_rule_file():
    result = subprocess.run([sys.executable, "-m", "fusionrank_cli", "--project", str(REPO_ROOT), "deploy-render",
                             "--check", "--no-kustomize"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_committed_renderings_equal_kubectl_kustomize():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed; the renderings are still validated")
    result = subprocess.run([sys.executable, "-m", "fusionrank_cli", "--project", str(REPO_ROOT), "deploy-render",
                             "--check"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_object_passes_the_kubernetes_schema(overlay):
    name, docs = overlay
    assert CRDS <= set(docs), f"{name}: PodMonitor and PrometheusRule must be rendered"
    for kind, doc in docs.items():
        if kind not in CRDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises naming the field
    assert len(docs) == len(_all(RENDERED[0].parent / f"{name}.yaml")), "two objects of one kind and name"


def test_prometheus_rule_passes_promtool(overlay, tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(overlay[1]["PrometheusRule"]["spec"]))
    result = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _pod(docs: dict) -> dict:
    return docs["Deployment"]["spec"]["template"]


def _containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def test_pods_are_found_by_service_podmonitor_and_pdb(overlay):
    docs = overlay[1]
    labels = _pod(docs)["metadata"]["labels"]
    service = docs["Service"]["spec"]
    assert service["clusterIP"] == "None", "headless: DNS must return every pod for gRPC to spread"
    for selector in (service["selector"], docs["PodMonitor"]["spec"]["selector"]["matchLabels"],
                     docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    ports = {p["name"] for p in _pod(docs)["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= ports
    assert docs["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] in ports


def test_probes_shutdown_and_rollout_keep_capacity(overlay):
    docs = overlay[1]
    spec = _pod(docs)["spec"]
    triton = spec["containers"][0]
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    pre_stop = int(triton["lifecycle"]["preStop"]["exec"]["command"][-1])
    exit_timeout = int(next(e["value"] for e in triton["env"] if e["name"] == "FUSIONRANK_EXIT_TIMEOUT_S"))
    assert spec["terminationGracePeriodSeconds"] > pre_stop + exit_timeout
    assert docs["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def test_every_container_has_requests_limits_and_runs_as_non_root(overlay):
    name, docs = overlay
    pods = [_pod(docs)["spec"]] + ([docs["Job"]["spec"]["template"]["spec"]] if "Job" in docs else [])
    for spec in pods:
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
        for c in _containers(spec):
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name}: {c['name']} {kind}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
            assert "/" in c["image"] and ":" in c["image"].rsplit("/", 1)[1], f"{c['image']}: a registry reference"
            if name == "gpu":
                assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, c["name"]


def test_autoscaler_uses_the_adapters_queue_time_metric(overlay):
    hpa = overlay[1]["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "fusionrank"}
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == ADAPTER["rules"]["custom"][0]["name"]["as"]
    assert hpa["minReplicas"] >= 2, "one pod gone (drain, rollout) must leave one serving"


def test_gpu_engines_are_built_once_by_the_job_and_checked_by_the_init_container():
    docs = _docs(DOCKER / "k8s" / "rendered" / "gpu.yaml")
    spec = _pod(docs)["spec"]
    (init,) = spec["initContainers"]
    assert init["args"] == ["fetch-engines"] and spec["containers"][0]["args"] == ["gpu"]
    job = docs["Job"]["spec"]["template"]["spec"]
    assert job["containers"][0]["args"] == ["build-engines"]
    assert job["nodeSelector"] == spec["nodeSelector"], "engines must be built on the GPU type that serves them"
    claims = {v["persistentVolumeClaim"]["claimName"] for s in (spec, job) for v in s["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {docs["PersistentVolumeClaim"]["metadata"]["name"]}
    engine_set = next(d for k, d in docs.items() if k.startswith("ConfigMap/fusionrank-engines"))["data"]["ENGINE_SET"]
    assert f"trt-{RELEASE['tensorrt']}" in engine_set


def test_cpu_overlay_serves_the_cpu_profile_without_gpus():
    docs = _docs(DOCKER / "k8s" / "rendered" / "cpu.yaml")
    spec = _pod(docs)["spec"]
    assert spec["containers"][0]["args"] == ["cpu"] and "initContainers" not in spec and "Job" not in docs
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in _containers(spec))


def test_alert_thresholds_are_the_specs_slo(default_spec):
    alerts = {r["alert"]: r["expr"] for g in yaml.safe_load((DOCKER / "monitoring" / "rules.yml").read_text())
              ["groups"] for r in g["rules"] if "alert" in r}
    assert alerts["FusionrankRankP99High"].endswith(f"> {default_spec.slo.p99_ms:g}")
    assert alerts["FusionrankErrorRatioHigh"].endswith(f"> {default_spec.slo.max_error_rate:g}")


def test_compose_runs_gpu_and_cpu_triton_with_monitoring_and_locust():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    gpu, cpu = services["triton-gpu"], services["triton-cpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu and cpu["command"] == ["cpu"]
    for service in (gpu, cpu):
        assert "triton" in service["networks"]["default"]["aliases"] and service["restart"] == "unless-stopped"
    assert "engines:/engines:ro" in gpu["volumes"] and "engines:/engines" in services["engines"]["volumes"]
    assert gpu["depends_on"]["engines"]["condition"] == "service_completed_successfully"
    for name in ("prometheus", "grafana"):
        assert services[name]["restart"] == "unless-stopped"
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert not source.startswith(".") or (DOCKER / source).exists(), f"{name} mounts missing {source}"
    scrape = yaml.safe_load((DOCKER / "monitoring" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["triton:8002"]
    assert services["locust"]["build"]["target"] == "loadtest" and "triton:8001" in services["locust"]["command"]
