"""The node an engine is built or served on: the GPU CUDA will use, the driver, and the TensorRT Triton will load.

- GPU: nvidia-smi lists every GPU in PCI order and ignores `CUDA_VISIBLE_DEVICES`; the GPU an engine runs on is
  the first one CUDA sees, so the list is filtered the way CUDA reads that variable (indices or UUIDs, up to the
  first entry that matches nothing; empty: no GPU).
- TensorRT: what matters is the libnvinfer Triton's TensorRT backend loads, not the `tensorrt` Python package that
  built the plan (the engine-builder image pins both equal; on any other node they may differ). It is read the way
  the NGC image exposes it: `<backends>/tensorrt/libtriton_tensorrt.so` links `libnvinfer.so.10`, whose version
  functions give major.minor.patch.build (`getInferLib{Major,Minor,Patch,Build}Version`, TensorRT 10; before 10
  only `getInferLibVersion`, encoded major*1000+minor*100+patch; from 10 on major*10000+minor*100+patch), and the
  image's `$TRT_VERSION` says the same with the build number. A Triton without a TensorRT backend has no version.

Every fact comes through a `NodeProbe` that tests replace with a fake, so the comparisons are tested without a GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from export.node.cuda_memory import cuda_runtime_version
from export.node.trt_api import import_tensorrt
from fusionrank.server.backends import available_backends, locate_triton

SMI_FIELDS = ("index", "uuid", "name", "compute_cap", "driver_version")


@dataclass(frozen=True)
class NodeInfo:
    """What a node offers an engine: GPU, compute capability, driver, CUDA and TensorRT versions (None: unknown)."""

    gpu_name: str | None = None
    compute_capability: str | None = None  # "9.0"
    driver_version: str | None = None  # "570.124.06"
    cuda_version: str | None = None  # "12.8"
    tensorrt_version: str | None = None  # "10.13.3.9": the TensorRT Triton loads plans with
    notes: tuple[str, ...] = ()  # why a fact is unknown, e.g. "nvidia-smi not found: no GPU on this node"
    tensorrt_source: str | None = None  # where tensorrt_version was read
    mig_profile: str | None = None  # "3g.40gb": CUDA's device is a MIG slice of gpu_name (None: the whole GPU)

    @property
    def has_gpu(self) -> bool:
        return self.gpu_name is not None

    def as_dict(self) -> dict:
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data


NodeProbe = Callable[[], NodeInfo]


# --- versions -----------------------------------------------------------------------------------------------------


def version_parts(version: str) -> tuple[int, ...]:
    """'10.13.3.9' -> (10, 13, 3, 9); '10.13.3.9.post1' -> (10, 13, 3, 9); '10.13.3' -> (10, 13, 3)."""
    return tuple(int(p) for p in re.findall(r"\d+", version.split(".post")[0])[:4])


def same_version(a: str, b: str) -> bool:
    """Equal TensorRT versions; a version read without its build number ('10.13.3') matches any build of it."""
    pa, pb = version_parts(a), version_parts(b)
    n = min(len(pa), len(pb))
    return n >= 3 and pa[:n] == pb[:n]


def decode_infer_lib_version(lib) -> str | None:
    """The version of a loaded libnvinfer (a ctypes library, or anything with its exported functions)."""
    try:
        return ".".join(str(int(getattr(lib, f"getInferLib{p}Version")())) for p in ("Major", "Minor", "Patch",
                                                                                       "Build"))
    except AttributeError:  # before TensorRT 10: only getInferLibVersion
        pass
    try:
        code = int(lib.getInferLibVersion())
    except AttributeError:
        return None
    major, rest = divmod(code, 10000) if code >= 10000 else divmod(code, 1000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


_READ_VERSION = ("import ctypes, sys\nfrom export.node.facts import decode_infer_lib_version\n"
                 "print(decode_infer_lib_version(ctypes.CDLL(sys.argv[1])) or '')")


def library_version(path: Path) -> str | None:
    """Version of the libnvinfer at `path`: from its version functions, else from its file name (no build)."""
    # Loaded in a child process: this one may hold another libnvinfer already (the tensorrt package's), and two
    # copies of TensorRT in one process would share its global state.
    try:
        done = subprocess.run([sys.executable, "-c", _READ_VERSION, str(path)], capture_output=True, text=True,
                              timeout=120)
        version = done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        version = None
    if not version:
        match = re.search(r"libnvinfer\.so\.(\d+\.\d+\.\d+)", Path(path).resolve().name)
        version = match.group(1) if match else None
    return version


def parse_ldd(text: str, soname: str) -> Path | None:
    """The path `ldd` resolved for the first library whose name starts with `soname` (None: absent or not found)."""
    for line in text.splitlines():
        name, _, target = line.strip().partition(" => ")
        if name.startswith(soname) and target and not target.startswith("not found"):
            return Path(target.split(" (")[0].strip())
    return None


def linked_library(binary: Path, soname: str) -> Path | None:
    """The library `binary` loads for `soname`, as the dynamic loader resolves it (`ldd`)."""
    if shutil.which("ldd") is None:
        return None
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_ldd(out, soname)


@dataclass(frozen=True)
class TensorRTRuntime:
    """The TensorRT a Triton installation loads plans with (version None: it cannot load plans)."""

    version: str | None
    source: str | None
    notes: tuple[str, ...] = ()


def triton_tensorrt(backend_dir: Path | None, env: Mapping[str, str] | None = None) -> TensorRTRuntime:
    """The TensorRT of the Triton whose backends are in `backend_dir` (None: no Triton found)."""
    env = os.environ if env is None else env
    if backend_dir is None:
        return TensorRTRuntime(None, None, ("no tritonserver found (not on PATH, no nvidia-pytriton)",))
    backend = Path(backend_dir) / "tensorrt" / "libtriton_tensorrt.so"
    if not backend.is_file():
        have = ", ".join(sorted(available_backends(backend_dir))) or "none"
        return TensorRTRuntime(None, None, (f"this Triton has no TensorRT backend (backends in {backend_dir}: {have}); "
                                            "TensorRT plans are served by the NGC Triton image",))
    lib = linked_library(backend, "libnvinfer.so")
    found = library_version(lib) if lib else None
    declared = env.get("TRT_VERSION") or None
    if found is None:
        why = f"cannot read the version of the libnvinfer {backend.name} links ({lib or 'not resolved by ldd'})"
        return TensorRTRuntime(declared, "$TRT_VERSION" if declared else None, (why,))
    if declared is None or version_parts(declared) == version_parts(found):
        return TensorRTRuntime(found, str(lib))
    if same_version(found, declared):  # the library lacks the build number the image declares
        return TensorRTRuntime(max(found, declared, key=lambda v: len(version_parts(v))), f"{lib} + $TRT_VERSION")
    return TensorRTRuntime(found, str(lib), (f"$TRT_VERSION says {declared}, but Triton's TensorRT backend loads "
                                             f"{lib} ({found}); using {found}",))


def builder_tensorrt_version() -> str | None:
    """Version of the `tensorrt` Python package (the one that builds plans here), or None when absent."""
    trt = import_tensorrt()
    return trt.__version__ if trt is not None else None


# --- GPUs ---------------------------------------------------------------------------------------------------------


def nvidia_smi_gpus() -> tuple[list[dict[str, str]], list[str]]:
    """Every GPU nvidia-smi lists (PCI order), and notes on why none could be read."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return [], ["nvidia-smi not found: no NVIDIA GPU or driver on this node"]
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        header = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return [], [f"nvidia-smi failed: {exc}"]
    rows = [dict(zip(SMI_FIELDS, (p.strip() for p in line.split(",")))) for line in out.splitlines() if line.strip()]
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    for row in rows:
        row["driver_cuda"] = cuda.group(1) if cuda else ""
    return rows, [] if rows else ["nvidia-smi lists no GPU"]


def visible_gpus(rows: list[dict[str, str]], cuda_visible: str | None) -> tuple[list[dict[str, str]], list[str]]:
    """The GPUs CUDA sees, in CUDA's order, given nvidia-smi's `rows` and `CUDA_VISIBLE_DEVICES` (None: unset)."""
    if cuda_visible is None:
        return rows, []
    if cuda_visible.strip().startswith("MIG-"):
        return rows, [f"CUDA_VISIBLE_DEVICES={cuda_visible!r} names MIG instances: GPU facts are those of the GPUs "
                      "nvidia-smi lists"]
    picked: list[dict[str, str]] = []
    for entry in (e.strip() for e in cuda_visible.split(",")):
        match = [r for r in rows if (entry.isdigit() and r["index"] == entry) or
                 (entry.startswith("GPU-") and r["uuid"].startswith(entry))]
        if len(match) != 1 or match[0] in picked:
            break  # CUDA ignores this entry and every one after it
        picked.append(match[0])
    notes = [] if picked else [f"CUDA_VISIBLE_DEVICES={cuda_visible!r} makes no GPU visible to CUDA"]
    return picked, notes


_GPU_LINE = re.compile(r"GPU (\d+): .*\(UUID: (GPU-[^)]+)\)")
_MIG_LINE = re.compile(r"MIG (\S+)\s+Device\s+\d+: \(UUID: (MIG-[^)]+)\)")


def mig_profile(listing: str, gpu_index: str, cuda_visible: str | None) -> str | None:
    """The MIG profile ('3g.40gb') of the device CUDA uses, from `nvidia-smi -L`; None when it is a whole GPU.

    nvidia-smi names a MIG slice by its parent GPU ("NVIDIA H100 80GB HBM3"), so a plan timed on the whole GPU
    would pass a name check on a slice with a fraction of its SMs and memory. CUDA uses the MIG device that
    `CUDA_VISIBLE_DEVICES` names (MIG-<uuid>), else the first MIG device of a GPU in MIG mode."""
    migs: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in (raw.strip() for raw in listing.splitlines()):
        if match := _GPU_LINE.match(line):
            current = match.group(1)
            migs[current] = []
        elif (match := _MIG_LINE.match(line)) and current is not None:
            migs[current].append((match.group(1), match.group(2)))
    first = (cuda_visible or "").split(",")[0].strip()
    if first.startswith("MIG-"):
        found = [profile for slices in migs.values() for profile, uuid in slices if uuid.startswith(first)]
        return found[0] if found else "unknown"
    slices = migs.get(gpu_index, [])
    return slices[0][0] if slices else None


def _smi_listing() -> str:
    exe = shutil.which("nvidia-smi")
    try:
        return subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30).stdout if exe else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _gpu_facts(env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    rows, notes = nvidia_smi_gpus()
    gpus, more = visible_gpus(rows, env.get("CUDA_VISIBLE_DEVICES"))
    notes += more
    if not gpus:
        return {}, notes
    first = gpus[0]
    if len({(g["name"], g["compute_cap"]) for g in gpus}) > 1:
        order = env.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
        notes.append(f"CUDA sees GPUs of more than one model ({', '.join(sorted({g['name'] for g in gpus}))}); Triton "
                     f"places instances on each, engines are checked against GPU {first['index']} (nvidia-smi order; "
                     f"CUDA_DEVICE_ORDER={order}): set CUDA_VISIBLE_DEVICES to GPUs of one model")
    facts = {"gpu_name": first["name"], "compute_capability": first["compute_cap"],
             "driver_version": first["driver_version"]}
    mig = mig_profile(_smi_listing(), first["index"], env.get("CUDA_VISIBLE_DEVICES"))
    if mig:
        facts["mig_profile"] = mig
    if first.get("driver_cuda"):
        facts["cuda_version"] = first["driver_cuda"]
    return facts, notes


def probe_node(tensorrt_version: str | None = None, env: Mapping[str, str] | None = None) -> NodeInfo:
    """Facts of this node; `tensorrt_version` overrides Triton's TensorRT (e.g. the serving image's, given by hand)."""
    env = os.environ if env is None else env
    facts, notes = _gpu_facts(env)
    cuda = cuda_runtime_version()
    if cuda:
        facts["cuda_version"] = cuda
    if tensorrt_version:
        runtime = TensorRTRuntime(tensorrt_version, "--tensorrt-version")
    else:
        location = locate_triton()
        runtime = triton_tensorrt(location.backend_dir if location else None, env)
    notes += runtime.notes
    builder = builder_tensorrt_version()
    if builder and runtime.version and not same_version(builder, runtime.version):
        notes.append(f"the tensorrt Python package here is {builder} but Triton loads TensorRT {runtime.version}: "
                     "plans built here will not load in this Triton (install the [gpu] extra's pinned version)")
    if runtime.version is None:
        notes.append("pass --tensorrt-version with the serving image's TensorRT to check engines for it")
    return NodeInfo(tensorrt_version=runtime.version, tensorrt_source=runtime.source, notes=tuple(notes), **facts)
