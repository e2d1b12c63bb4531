"""Is this node's NVIDIA driver new enough for the CUDA of the TensorRT that builds and serves the engines?

A TensorRT wheel is built for one CUDA major (`tensorrt-cu12`, `tensorrt-cu13`) and runs only on a driver that
supports that CUDA major (CUDA's minor-version compatibility: any driver of the major's first release runs every
minor release of it). The minimum driver of each major is in the CUDA Toolkit release notes, table "CUDA Toolkit and
Minimum Required Driver Version for CUDA Minor Version Compatibility" (docs.nvidia.com/cuda/cuda-toolkit-release-notes):
CUDA 12.x needs >= 525.60.13, CUDA 13.x >= 580.65.06. On an older driver (R535, R550, R570 are common on H100 fleets)
`tensorrt.Builder(logger)` raises pybind11's `TypeError` ("factory returned nullptr") instead of an error naming the
driver, so the GPU check compares the versions first and skips the TensorRT steps with the reason.

Only the standard library is used: `deploy/gpu-check.sh` runs `python3 -m export.node.cuda_driver` on a bare node,
before anything is installed, to decide whether installing TensorRT is worth its download.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# CUDA major -> the oldest Linux driver that runs it (CUDA Toolkit release notes, minor version compatibility).
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
RELEASE_FILE = Path("deploy") / "triton-release.yaml"


def _parts(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def cuda_major(cuda: str) -> int:
    """'13.0.2' -> 13; 'cu12' -> 12."""
    digits = re.findall(r"\d+", cuda)
    if not digits:
        raise ValueError(f"CUDA version {cuda!r}: expected e.g. '13.0.2' or 'cu13'")
    return int(digits[0])


def driver_problem(driver_version: str | None, cuda: str, what: str = "") -> str | None:
    """Why a node with `driver_version` cannot run CUDA `cuda` (None: it can, or there is no driver to judge)."""
    if not driver_version:
        return None
    major = cuda_major(cuda)
    needed = MIN_DRIVER.get(major)
    if needed is None:
        return f"no known minimum driver for CUDA {major} (known: {', '.join(map(str, MIN_DRIVER))})"
    if _parts(driver_version) >= _parts(needed):
        return None
    for_what = f" ({what})" if what else ""
    return (f"driver {driver_version} is older than {needed} (R{needed.split('.')[0]}), the minimum for CUDA {major}"
            f"{for_what}: upgrade the driver to R{needed.split('.')[0]} or newer, or build with a TensorRT for an "
            "older CUDA (docs/gpu.md, 'Old driver')")


def release_cuda(root: Path) -> str | None:
    """The CUDA version of the NGC release named in `<root>/deploy/triton-release.yaml` (read without PyYAML)."""
    path = Path(root) / RELEASE_FILE
    if not path.is_file():
        return None
    match = re.search(r'^cuda:\s*"?([\d.]+)"?\s*$', path.read_text(), flags=re.M)
    return match.group(1) if match else None


def tensorrt_cuda_flavour() -> str | None:
    """'cu13' / 'cu12': the CUDA the installed TensorRT wheel is built for (None: no pip-installed TensorRT wheel)."""
    for major in sorted(MIN_DRIVER, reverse=True):
        for name in (f"tensorrt-cu{major}-libs", f"tensorrt-cu{major}", f"tensorrt_cu{major}_libs"):
            try:
                metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
            return f"cu{major}"
    return None


def smi_driver_version() -> str | None:
    """The driver version nvidia-smi reports for the first GPU (None: no nvidia-smi, or it failed)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[0] if lines else None


def main(argv: list[str] | None = None) -> int:
    """Exit 0: the driver runs the release's CUDA; 2: too old; 3: no driver found; 4: the release names no CUDA."""
    parser = argparse.ArgumentParser(prog="python3 -m export.node.cuda_driver", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="checkout whose deploy/triton-release.yaml names the CUDA")
    parser.add_argument("--driver", default=None, help="driver version to judge (default: nvidia-smi's)")
    args = parser.parse_args(argv)
    cuda = release_cuda(Path(args.root))
    if cuda is None:
        sys.stdout.write(f"{Path(args.root) / RELEASE_FILE}: no 'cuda:' version\n")
        return 4
    driver = args.driver or smi_driver_version()
    if driver is None:
        sys.stdout.write("no NVIDIA driver found (nvidia-smi missing or failing)\n")
        return 3
    problem = driver_problem(driver, cuda, f"TensorRT of the release, CUDA {cuda}")
    sys.stdout.write((problem or f"driver {driver} runs CUDA {cuda}") + "\n")
    return 2 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
