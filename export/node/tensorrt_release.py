"""The NGC Triton release engines are served with, and the one TensorRT that may build them.

A plan loads only on the TensorRT that built it, so the `[gpu]` extra (the builder) must pin exactly the TensorRT
of the Triton image that serves (`tensorrt-cu<CUDA major>==<version>`, cuda-python of the same CUDA major). The
release is named once, in `deploy/triton-release.yaml` (image, tag, digest, Triton, TensorRT and CUDA versions);
`release_pin_problems` lists every place that disagrees with it: the Dockerfile's `TRITON_IMAGE` default and the
`[gpu]` extra in pyproject.toml (tests/unit/export/test_trt_release.py keeps them equal). These files exist in a
checkout, not in an installed wheel: everything here takes the checkout's root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from fusionrank.contract.errors import FusionRankError

RELEASE_FILE = Path("deploy") / "triton-release.yaml"
DOCKERFILE = Path("deploy") / "Dockerfile"
PYPROJECT = Path("pyproject.toml")


class ReleaseError(FusionRankError):
    """The release file is missing or incomplete."""


@dataclass(frozen=True)
class TritonRelease:
    """One NGC Triton release: where its image is and which TensorRT and CUDA it ships."""

    image: str
    tag: str
    triton: str
    tensorrt: str
    cuda: str
    digest: str = ""

    @property
    def reference(self) -> str:
        return f"{self.image}:{self.tag}"

    @property
    def cuda_major(self) -> str:
        return self.cuda.split(".")[0]


def load_release(root: Path) -> TritonRelease:
    """The release named in `<root>/docker/triton-release.yaml` (ReleaseError naming what is missing)."""
    path = Path(root) / RELEASE_FILE
    if not path.is_file():
        raise ReleaseError(f"{path} not found: the NGC Triton release is named there (a checkout file)")
    data = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in ("image", "tag", "triton", "tensorrt", "cuda") if not data.get(k)]
    if missing:
        raise ReleaseError(f"{path}: missing {', '.join(missing)}")
    return TritonRelease(str(data["image"]), str(data["tag"]), str(data["triton"]), str(data["tensorrt"]),
                         str(data["cuda"]), str(data.get("digest") or ""))


def pinned_packages(pyproject_text: str) -> dict[str, str]:
    """`name==version` pins of TensorRT and cuda-python wheels found in pyproject.toml's text (name -> spec)."""
    pins = re.findall(r'"((?:tensorrt[\w-]*|cuda-python))\s*([=<>!~][^";]*)"', pyproject_text)
    return {name: spec.replace(" ", "") for name, spec in pins}


def dockerfile_image(dockerfile_text: str) -> str | None:
    """The default of the Dockerfile's `ARG TRITON_IMAGE`."""
    match = re.search(r"^ARG\s+TRITON_IMAGE=(\S+)", dockerfile_text, flags=re.M)
    return match.group(1) if match else None


def release_pin_problems(root: Path) -> list[str]:
    """Every disagreement with the release file (empty when the image, the builder and CUDA agree)."""
    root = Path(root)
    release = load_release(root)
    problems = []
    image = dockerfile_image((root / DOCKERFILE).read_text())
    if image != release.reference:
        problems.append(f"{DOCKERFILE}: ARG TRITON_IMAGE={image}, the release is {release.reference}")
    pins = pinned_packages((root / PYPROJECT).read_text())
    wheel = f"tensorrt-cu{release.cuda_major}"
    trt = {name: spec for name, spec in pins.items() if name.startswith("tensorrt")}
    if trt != {wheel: f"=={release.tensorrt}"}:
        problems.append(f"{PYPROJECT}: TensorRT pins {trt or 'none'}; the [gpu] extra must pin exactly "
                        f"{wheel}=={release.tensorrt} (TensorRT {release.tensorrt} on CUDA {release.cuda} in "
                        f"{release.reference})")
    cuda_python = pins.get("cuda-python", "")
    if not re.search(rf">={release.cuda_major}(\.|,|$)", cuda_python) or f"<{int(release.cuda_major) + 1}" not in \
            cuda_python:
        problems.append(f"{PYPROJECT}: cuda-python{cuda_python or ' unpinned'}; it must stay within CUDA "
                        f"{release.cuda_major} (>={release.cuda_major},<{int(release.cuda_major) + 1})")
    return problems
