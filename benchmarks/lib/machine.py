"""What produced a figure: the machine (CPU model, instruction-set flags, cores, load average) and the software
(commit, fusionrank version, spec digest, model file digests, Triton version). Recorded with every measurement.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

# Instruction-set flags that decide CPU inference speed (INT8 kernels: VNNI; AMX on Sapphire Rapids and later).
SPEED_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
               "amx_int8", "amx_bf16")


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """CPU model name and which of `SPEED_FLAGS` it has (Linux /proc/cpuinfo; the platform's name elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and value.strip():
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in SPEED_FLAGS if f in flags]}


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages ([] where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_facts() -> dict:
    """CPU model and flags, logical cores, usable cores, load average, host, Python; cheap enough for every figure."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {**cpu_info(), "cores": os.cpu_count(), "usable_cores": usable, "load_average": load_average(),
            "hostname": platform.node(), "python": platform.python_version(),
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def git_commit(where: Path | None = None) -> str | None:
    """The checkout's commit (with `+dirty` when tracked files changed), None outside a git checkout."""
    cwd = str(where or Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def fusionrank_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusionrank")
    except PackageNotFoundError:
        return None


def triton_version() -> str | None:
    """The local Triton server's version where known: the nvidia-pytriton wheel's bundled server (2.51 for 0.7.0)
    is named by the wheel; a server over the network reports its own (pass it in `provenance(triton=...)`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"nvidia-pytriton {version('nvidia-pytriton')}"
    except PackageNotFoundError:
        return None


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, first 16 hex digits (enough to tell two model files apart)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def model_digests(files: Iterable[Path], root: Path | None = None) -> dict[str, str | None]:
    """Digest per model file, keyed by its path under `root` (None for a file that is missing)."""
    out = {}
    for path in files:
        path = Path(path)
        key = str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)
        out[key] = file_digest(path) if path.is_file() else None
    return out


def provenance(spec_digest: str | None = None, model_files: Iterable[Path] = (), root: Path | None = None,
               triton: str | None = None) -> dict:
    """Everything a figure must carry: machine facts plus commit, version, spec digest, model digests, Triton."""
    return {"machine": machine_facts(), "commit": git_commit(), "fusionrank_version": fusionrank_version(),
            "spec_digest": spec_digest, "model_digests": model_digests(model_files, root),
            "triton_version": triton or triton_version()}


def describe_machine(facts: dict | None = None) -> str:
    """One line: `Intel Xeon ... (2 cores; avx2 fma avx512_vnni; load 1.2 0.9 0.5)`."""
    facts = facts or machine_facts()
    flags = " ".join(facts.get("flags") or []) or "no AVX flags"
    load = " ".join(f"{x:g}" for x in facts.get("load_average") or []) or "n/a"
    return f"{facts.get('model')} ({facts.get('cores')} cores; {flags}; load {load})"
