"""One TensorRT from build to serving: the `[gpu]` extra and the Dockerfile agree with the NGC Triton release named
in deploy/triton-release.yaml (a plan loads only on the TensorRT that built it)."""

from __future__ import annotations

import pytest

from export.node.tensorrt_release import (
    DOCKERFILE,
    PYPROJECT,
    RELEASE_FILE,
    ReleaseError,
    load_release,
    pinned_packages,
    release_pin_problems,
)
from tests.paths import REPO_ROOT

RELEASE = """image: nvcr.io/nvidia/tritonserver
tag: 25.10-py3
digest: ""
triton: 2.62.0
tensorrt: 10.13.3.9
cuda: 13.0.2
"""
PYPROJECT_GPU = 'gpu = ["tensorrt-cu13==10.13.3.9", "cuda-python>=13,<14"]\n'
DOCKER = "ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.10-py3\nFROM ${TRITON_IMAGE}\n"


def test_the_committed_image_builder_and_release_agree():
    assert release_pin_problems(REPO_ROOT) == []


def _checkout(tmp_path, release=RELEASE, pyproject=PYPROJECT_GPU, dockerfile=DOCKER):
    for rel, text in ((RELEASE_FILE, release), (PYPROJECT, pyproject), (DOCKERFILE, dockerfile)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_a_consistent_checkout_has_no_problem(tmp_path):
    root = _checkout(tmp_path)
    assert release_pin_problems(root) == []
    assert load_release(root).reference == "nvcr.io/nvidia/tritonserver:25.10-py3"


@pytest.mark.parametrize("changes, fragment", [
    ({"pyproject": PYPROJECT_GPU.replace("10.13.3.9", "10.14.1.48")}, "must pin exactly tensorrt-cu13==10.13.3.9"),
    ({"pyproject": PYPROJECT_GPU.replace("cu13", "cu12")}, "must pin exactly tensorrt-cu13"),
    ({"pyproject": PYPROJECT_GPU.replace("==10.13.3.9", ">=10.13")}, "must pin exactly"),
    ({"pyproject": PYPROJECT_GPU.replace(">=13,<14", ">=12.6,<13")}, "cuda-python>=12.6,<13; it must stay within"),
    ({"dockerfile": DOCKER.replace("25.10", "24.10")}, "ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3"),
    ({"release": RELEASE.replace("tensorrt: 10.13.3.9", "tensorrt: 10.5.0.18")}, "tensorrt-cu13==10.5.0.18"),
])
def test_every_disagreement_is_named(tmp_path, changes, fragment):
    problems = release_pin_problems(_checkout(tmp_path, **changes))
    assert len(problems) == 1 and fragment in problems[0]


def test_an_incomplete_or_missing_release_is_an_error(tmp_path):
    with pytest.raises(ReleaseError, match="not found"):
        load_release(tmp_path)
    with pytest.raises(ReleaseError, match="missing tensorrt"):
        load_release(_checkout(tmp_path, release=RELEASE.replace("tensorrt: 10.13.3.9\n", "")))


def test_pins_are_read_from_multi_line_extras():
    text = 'gpu = [\n    "tensorrt-cu13==10.13.3.9",\n    "cuda-python >= 13, < 14",\n]\ndev = ["pytest>=8"]\n'
    assert pinned_packages(text) == {"tensorrt-cu13": "==10.13.3.9", "cuda-python": ">=13,<14"}

