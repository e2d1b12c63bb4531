"""Session fixtures shared by more than one test tier (unit/, integration/, deploy/, robustness/).

- `ci_spec`: the small test spec (tests/specs/ci.yaml, an overlay of the default); `per_bucket_spec`: the same with
  one TensorRT profile per text padding bucket; `default_spec`: the packaged one; `bench`: the CI spec's synthetic
  data set; `clip`: a four-frame video for the ragged-candidate tests.
- `ci_checkpoint`, `built_repository`: the CI spec's ranker, trained, and a temporary model repository rendered and
  exported for it (integration and deploy tests; tests/unit/conftest.py keeps them out of the unit tier).
- `triton_server`: a real tritonserver (CPU profile) on that repository, started once per session (the route, its
  members and the reference ensemble loaded).
- `fake_trt`, `fake_cuda`: fake `tensorrt` / cuda-python modules (tests/fakes/) for one test.

Fixtures one tier alone uses live in that tier's conftest.py (integration/: the reference pipeline, redis-server).
In CI the server must be found (it installs with the project), so e2e tests fail rather than silently skip there.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tests.fakes import cuda as fake_cuda_module
from tests.fakes import tensorrt as fake_tensorrt
from tests.paths import CI_SPEC, REPO_ROOT

# One cache for the whole test session (benchmark, embeddings, checkpoints are keyed by the spec's digest, so a
# developer's second run reuses them; CI starts from a fresh clone).
os.environ.setdefault("FUSIONRANK_CACHE", str(REPO_ROOT / ".cache" / "fusionrank-tests"))


@pytest.fixture(scope="session")
def clip():
    """A four-frame video (blue, green, red, near-black) for the ragged-candidate tests."""
    from PIL import Image  # Pillow and PyAV only for the tests that take a clip

    from fusionrank.preprocess.video import encode_video

    return encode_video([Image.new("RGB", (32, 32), c) for c in ((0, 0, 255), (0, 255, 0), (255, 0, 0), (9, 9, 9))])


@pytest.fixture(scope="session")
def ci_spec():
    from fusionrank.contract.spec import load_spec

    return load_spec(CI_SPEC)


@pytest.fixture(scope="session")
def per_bucket_spec(ci_spec):
    """`ci_spec` with one TensorRT optimisation profile per text padding bucket."""
    trt = dataclasses.replace(ci_spec.export.tensorrt, profile_per_bucket=True)
    return ci_spec.with_overrides(export=dataclasses.replace(ci_spec.export, tensorrt=trt))


@pytest.fixture(scope="session")
def default_spec():
    from fusionrank.contract.spec import load_spec

    return load_spec()


@pytest.fixture(scope="session")
def bench(ci_spec):
    """The CI spec's synthetic data set (catalogue, users, sessions)."""
    from fusionrank.model.synthetic_data import load_benchmark

    return load_benchmark(ci_spec)


@pytest.fixture(scope="session")
def ci_checkpoint(ci_spec) -> Path:
    """The CI spec's ranker, trained once (reused from the cache when it exists)."""
    from fusionrank.model.train import checkpoint_path, train_ranker

    path = checkpoint_path(ci_spec, ci_spec.ranker.fusion.value)
    return path if path.is_file() else train_ranker(ci_spec)


@pytest.fixture(scope="session")
def built_repository(ci_spec, ci_checkpoint, tmp_path_factory) -> Path:
    """A model repository for the CI spec: rendered configs, ONNX models, tokenizer, golden outputs."""
    from export.convert.torch2onnx import export_all
    from fusionrank.triton.render import render_repository

    repo = tmp_path_factory.mktemp("built") / "model_repository"
    render_repository(ci_spec, repo)
    export_all(ci_spec, repo, checkpoint=ci_checkpoint)
    return repo


@pytest.fixture(scope="session")
def triton_server(ci_spec, built_repository, tmp_path_factory):
    """A started tritonserver (CPU profile) on `built_repository`, with the route callers use, its members and the
    reference ensemble (for the tests that compare with it); stopped at the end of the session."""
    from fusionrank.contract.spec import served_models
    from fusionrank.server.launcher import TritonServer

    log_file = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    server = TritonServer(built_repository, profile="cpu", log_file=log_file,
                          cache=tmp_path_factory.mktemp("triton-backend"),
                          models=served_models(ci_spec, reference_ensemble=True))
    server.start(timeout=300)
    yield server
    server.stop()


@pytest.fixture
def fake_trt(monkeypatch):
    """The fake `tensorrt` module in sys.modules for this test; `fake_tensorrt.FakeTRT.builds` records builds."""
    return fake_tensorrt.install_tensorrt(monkeypatch)


@pytest.fixture
def fake_cuda(monkeypatch):
    """The fake cuda-python runtime (host memory) in sys.modules for this test."""
    return fake_cuda_module.install_cuda(monkeypatch)


@pytest.fixture(autouse=True)
def _gil_switch_interval():
    """The route's Triton shell sets its stub's GIL switch interval (`GIL_SWITCH_S`) in `initialize`: a test that
    initialises it in this process gets Python's interval back afterwards."""
    import sys

    interval = sys.getswitchinterval()
    yield
    sys.setswitchinterval(interval)
