"""The package as a user gets it: a wheel installed with only the `serve` extra into a fresh virtual environment
serves the CPU profile and ranks a request, with no checkout, no torch, no Locust on the path.

The server binary comes from outside the serving extra, as in the image (where NGC provides it): here the
`nvidia-pytriton` wheel installed without its dependencies, so nothing it would pull in can stand in for a missing
serving dependency. PYTHONPATH is removed, so the Python-backend stubs import fusionrank from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from fusionrank.server.launcher import free_port
from tests.paths import CI_SPEC, REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PACKAGING_INPUTS = ("pyproject.toml", "README.md", "fusionrank", "fusionrank_cli", "export", "clients", "loadtest",
                    "benchmarks", "release")
ABSENT_FROM_SERVING = ("torch", "locust", "matplotlib", "onnx", "sklearn")


def _pip(target_python: Path, *args: str) -> str:
    # The test environment's pip installs into the fresh one (`--python`): the new venv needs no pip of its own. It
    # runs outside the checkout and without PYTHONPATH, and ignores what it may think is installed: in two clean-clone
    # runs the fresh venv got the wheel's dependencies but not fusionrank itself (cause not found).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(target_python), "install", "--no-compile",
                           "--disable-pip-version-check", "--ignore-installed", *args], cwd=target_python.parent,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _build_wheel(out: Path, work: Path) -> Path:
    """The wheel, built from a copy of the packaging inputs (an in-tree build would leave build/ in the checkout)."""
    src = work / "src"
    for name in PACKAGING_INPUTS:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, timeout=300)
    (wheel,) = out.glob("fusionrank-*.whl")
    return wheel


def _candidates(folder: Path) -> Path:
    """A candidates file with two items (JPEG/PNG images, a WAV clip) for `fusionrank rank --items`."""
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "a.jpg")
    Image.new("RGB", (48, 80), (20, 90, 200)).save(folder / "b.png")
    sf.write(folder / "a.wav", 0.1 * np.sin(np.linspace(0, 2000, 16000)).astype("float32"), 16000)
    path = folder / "cands.json"
    path.write_text(json.dumps({"history": [3, 5, 7], "candidates": [
        {"id": "a", "text": "red wireless headphones", "image": "a.jpg", "audio": "a.wav"},
        {"id": "b", "text": "blue film camera", "image": "b.png", "audio": "a.wav"}]}))
    return path


def _wait_ready(http_port: int, proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fusionrank serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"server from the wheel not ready after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def test_wheel_with_serve_extra_serves_a_ranking_request(built_repository, tmp_path):
    started = time.monotonic()
    wheel = _build_wheel(tmp_path / "dist", tmp_path)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python, fusionrank = env_dir / "bin" / "python", env_dir / "bin" / "fusionrank"
    log = _pip(python, f"{wheel}[serve]")
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    assert (site / "fusionrank" / "__init__.py").is_file(), f"fusionrank not installed from {wheel}:\n{log[-3000:]}"
    _pip(python, "--no-deps", "nvidia-pytriton==0.7.0")
    installed_s = time.monotonic() - started

    project = tmp_path / "project"  # an empty project folder: nothing from the checkout but the files named below
    project.mkdir()
    shutil.copy2(CI_SPEC, project / "pipeline.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(FUSIONRANK_HOME=str(project), FUSIONRANK_CACHE=str(tmp_path / "cache"))

    probe = subprocess.run([str(python), "-c", (
        "import importlib.util, json; from fusionrank.contract.spec import load_spec; "
        "from fusionrank.request.scenario import load_scenario; from loadtest.slo import CI_SLO; import fusionrank; "
        "print(json.dumps({'absent': [m for m in "
        f"{ABSENT_FROM_SERVING!r} if importlib.util.find_spec(m) is None], 'package': fusionrank.__file__, "
        "'spec': load_spec().source, 'scenario': load_scenario('ci').source, 'slo': CI_SLO.is_file()}))")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    facts = json.loads(probe.stdout)
    assert sorted(facts["absent"]) == sorted(ABSENT_FROM_SERVING), facts
    assert facts["package"].startswith(str(env_dir)), facts  # the wheel, not the checkout
    assert facts["spec"] == str(project / "pipeline.yaml")  # the project folder from $FUSIONRANK_HOME
    assert facts["scenario"].startswith(str(env_dir)) and facts["slo"], facts  # package data shipped

    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(fusionrank), "serve", "--profile", "cpu", "--repository", str(built_repository),
                                   "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                                   "--metrics-port", str(metrics_port)],
                                  env=env, cwd=project, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(http_port, server, log)
        ready_s = time.monotonic() - started
        ranked = subprocess.run([str(fusionrank), "rank", "--url", f"127.0.0.1:{grpc_port}", "--items",
                                 str(_candidates(project)), "--json"], env=env, cwd=project, capture_output=True,
                                text=True, timeout=120)
        assert ranked.returncode == 0, ranked.stderr
        rows = json.loads(ranked.stdout)["ranking"]
        assert sorted(r["item_id"] for r in rows) == ["a", "b"]
        assert all(0.0 < r["score"] < 1.0 for r in rows)
        assert all(abs(sum(r["modality_weights"].values()) - 1.0) < 1e-4 for r in rows)
    finally:
        server.send_signal(signal.SIGTERM)  # `fusionrank serve` stops Triton and its stubs on SIGTERM
        try:
            server.wait(timeout=60)
        finally:
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    print(f"\nwheel test: wheel built and installed in {installed_s:.1f}s, server ready at {ready_s:.1f}s, "
          f"total {time.monotonic() - started:.1f}s")
