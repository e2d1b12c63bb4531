"""The GPU check (`make gpu-check`): on this GPU-less machine every GPU step is skipped with its reason and the
report is written; with the fake TensorRT on a pretend GPU node the steps that node allows run; the Markdown page
renders the figures of steps that cannot run here."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.latency import BenchmarkError, OnnxRuntimeRunner
from export.node.facts import NodeInfo
from release.gpu_check import run_gpu_check
from release.gpu_report import render_markdown
from release.gpu_steps import ORT_CUDA
from tests.paths import REPO_ROOT

NO_GPU = NodeInfo(notes=("nvidia-smi not found: no NVIDIA GPU or driver on this node",))
GPU = NodeInfo(gpu_name="Fake GPU X1", compute_capability="9.0", driver_version="580.82.07", cuda_version="13.0")
# R570: common on H100 fleets; it cannot run the CUDA 13 of tensorrt-cu13 (CUDA 13 needs R580).
OLD_DRIVER = NodeInfo(gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", driver_version="570.124.06",
                      cuda_version="12.8")
NOW = dt.datetime(2030, 1, 2, tzinfo=dt.timezone.utc)


def _statuses(report):
    return {s["name"]: (s["status"], s["reason"]) for s in report["steps"]}


def test_without_a_gpu_every_gpu_step_is_skipped_with_its_reason(ci_spec, tmp_path):
    folder, report = run_gpu_check(ci_spec, tmp_path / "absent", tmp_path / "out", root=REPO_ROOT,
                                   probe=lambda: NO_GPU, now=NOW)
    assert folder == tmp_path / "out" / "2030-01-02-no-gpu"
    steps = _statuses(report)
    assert list(steps) == ["cuda-driver", "prepare-repository", "onnxruntime-cuda", "tensorrt-build",
                           "tensorrt-parity-latency", "serve-gpu-profile"]
    assert all(status == "skipped" for status, _ in steps.values())
    for name in ("cuda-driver", "onnxruntime-cuda", "tensorrt-build"):
        assert steps[name][1] == "no CUDA GPU: nvidia-smi not found: no NVIDIA GPU or driver on this node"
    assert steps["serve-gpu-profile"][1].startswith("no engines: tensorrt-build skipped")
    assert json.loads((folder / "gpu-check.json").read_text()) == report
    page = (folder / "gpu-check.md").read_text()
    assert "| tensorrt-build | skipped | 0.0 | no CUDA GPU: nvidia-smi not found" in page


def test_steps_that_cannot_finish_in_the_budget_are_skipped(ci_spec, tmp_path, fake_trt, fake_cuda):
    _, report = run_gpu_check(ci_spec, tmp_path / "absent", tmp_path / "out", budget_s=60, root=REPO_ROOT,
                              probe=lambda: GPU, now=NOW)
    status, reason = _statuses(report)["prepare-repository"]
    assert status == "skipped" and reason.startswith("time budget:")
    assert _statuses(report)["tensorrt-build"] == ("skipped", "no models: prepare-repository skipped")


def test_onnxruntime_falling_back_to_the_cpu_is_an_error(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "m.onnx"))
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(BenchmarkError, match=r"runs on \['CPUExecutionProvider'\] instead of CUDAExecutionProvider"):
        OnnxRuntimeRunner(tmp_path / "m.onnx", providers=ORT_CUDA)
    runner = OnnxRuntimeRunner(tmp_path / "m.onnx")
    assert runner.run({"x": np.ones((1, 2), np.float32)})["y"].tolist() == [[1.0, 1.0]]


def test_the_page_shows_the_figures_of_steps_that_ran():
    stats = {"p50_ms": 1.5, "p95_ms": 2.0, "p99_ms": 2.5, "mean_ms": 1.6, "throughput": 640.0, "samples": 30}
    accuracy = {"text_encoder": {"passed": True, "outputs": {"text_embedding": {
        "output": "text_embedding", "max_abs_diff": 0.004, "atol": 0.02, "rtol": 0.02}}},
        "fusion_ranker": {"passed": False, "outputs": {"click_probability": {
            "output": "click_probability", "max_abs_diff": None, "atol": 0.005, "rtol": 0.01}}}}
    latency = {"text_encoder": {"1": stats, "64": stats}, "fusion_ranker": {"1": stats}}
    member = {"model": "text_encoder", "requests": 40, "executions": 8, "avg_batch": 5.0, "queue_ms": 0.4,
              "compute_ms": 1.1}
    report = {"created_utc": "2030-01-02T00:00:00Z", "release": {"error": "no release file"}, "lacks": {},
              "node": {"gpu_name": "NVIDIA H100", "notes": []},
              "steps": [{"name": "tensorrt-build", "status": "ran", "reason": "", "seconds": 80.0, "data": {
                  "text_encoder": {"precision": "fp16", "profiles": 1, "size_mib": 45.2, "seconds": 61.0}}},
                  {"name": "tensorrt-parity-latency", "status": "failed", "reason": "parity failed", "seconds": 9.0,
                   "data": {"accuracy": accuracy, "latency": latency}},
                  {"name": "serve-gpu-profile", "status": "ran", "reason": "", "seconds": 30.0, "data": {
                      "scenario": "default", "members": [member], "ensemble": {
                          "requests": 200, "users": 8, "errors": 0, "p50_ms": 12.0, "p99_ms": 30.0,
                          "throughput_rps": 400.0}}}]}
    page = render_markdown(report)
    assert "| text_encoder | fp16 | 1 | 45.2 | 61.0 |" in page
    assert "| text_encoder | pass | text_embedding 0.004 (atol 0.02, rtol 0.02) | b1: 1.50 ms, 640 rows/s" in page
    assert "| fusion_ranker | FAIL | click_probability not finite or missing" in page
    assert "p50 12.0 ms, p99 30.0 ms, 400.0 requests/s, 0 errors" in page
    assert "| text_encoder | 40 | 8 | 5.00 | 0.40 | 1.10 |" in page


def test_make_gpu_check_never_builds_the_dev_environment():
    # Under `make test` the recursion variables would make this make print "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    dry = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60, env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.split() == ["bash", "deploy/gpu-check.sh"], "no .venv, no [dev] before the check"
    script = (REPO_ROOT / "deploy" / "gpu-check.sh").read_text()
    code = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    extras = [line for line in code if "extras=" in line]
    installs = [line.replace("/dev/null", "") for line in code if "pip_install" in line or "extras=" in line]
    assert extras and not any(re.search(r"\bdev\b", line) for line in installs), "only the serve, gpu, export extras"
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck not found: `make test` installs the Debian package")
    result = subprocess.run([shellcheck, str(REPO_ROOT / "deploy" / "gpu-check.sh")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout


def test_the_one_command_ends_by_itself_with_a_report_naming_each_skipped_step(tmp_path):
    # A node without nvidia-smi: only the tools the script runs are on PATH; the interpreter is given, so nothing is
    # installed (GPU_CHECK_PYTHON), and the check runs with the time left of its limit.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "timeout", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHONPATH": str(REPO_ROOT),
           "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "out"),
           "GPU_CHECK_ENV": str(tmp_path / "venv-gpu"), "FUSIONRANK_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(["bash", str(REPO_ROOT / "deploy" / "gpu-check.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no NVIDIA driver found" in done.stdout
    (folder,) = (tmp_path / "out").iterdir()
    assert folder.name.endswith("-no-gpu")
    report = json.loads((folder / "gpu-check.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["skipped"] * 6
    page = (folder / "gpu-check.md").read_text()
    for step in ("cuda-driver", "prepare-repository", "onnxruntime-cuda", "tensorrt-build", "tensorrt-parity-latency",
                 "serve-gpu-profile"):
        assert f"| {step} | skipped |" in page
    assert not (tmp_path / "venv-gpu").exists()
