"""Engine manifests: what a `model.plan` was built from, with what, and on which node.

A TensorRT plan only runs on the TensorRT version and GPU (compute capability) it was built for, and is only right
for the ONNX file and spec it was built from. `<repo>/<model>/1/manifest.json` records all of that beside the plan,
so `fusionrank check` can tell before serving whether an engine still fits the node and the repository.

Node facts come from `export.node.facts`. Files here are written atomically (a temporary file in the same folder, then
`os.replace`), so a crash or a full disk never leaves half a plan, cache or manifest for the next reader.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from export.node.facts import NodeInfo
from export.profiles import OptimizationProfile
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.spec import PipelineSpec
from fusionrank.contract.tensors import model_io

MANIFEST_FILE = "manifest.json"
PLAN_FILE = "model.plan"
ONNX_FILE = "model.onnx"
GOLDEN_FILE = "golden.npz"
SCHEMA_VERSION = 1


class ManifestError(FusionRankError):
    """A manifest is missing a field, unreadable or not JSON."""


def version_dir(repo: Path, model: str) -> Path:
    """`<repo>/<model>/1`: where the ONNX file, the plan and its manifest live."""
    return Path(repo) / model / "1"


def plan_path(repo: Path, model: str) -> Path:
    """The TensorRT plan Triton loads for `model` in the gpu profile."""
    return version_dir(repo, model) / PLAN_FILE


def onnx_path(repo: Path, model: str) -> Path:
    """The exported ONNX model an engine is built from."""
    return version_dir(repo, model) / ONNX_FILE


def manifest_path(repo: Path, model: str) -> Path:
    """The manifest beside the plan."""
    return version_dir(repo, model) / MANIFEST_FILE


def golden_path(repo: Path, model: str) -> Path:
    """PyTorch inputs and outputs stored at export time, for checking runtimes and engines later."""
    return version_dir(repo, model) / GOLDEN_FILE


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the serving user must read what the build user wrote
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- the manifest -------------------------------------------------------------------------------------------------


def engine_contract_digest(spec: PipelineSpec, model: str, profiles: tuple[OptimizationProfile, ...]) -> str:
    """Hash of what an engine must match in the spec: its tensor contract and its optimisation profiles.

    Deliberately narrower than `spec.digest()`: an SLO or training change does not make an engine wrong, a new max
    batch size or padding bucket does.
    """
    io_ = model_io(spec, model)
    payload = {
        "inputs": [[t.name, t.dtype, list(t.dims)] for t in io_.inputs],
        "outputs": [[t.name, t.dtype, list(t.dims)] for t in io_.outputs],
        "profiles": [p.as_dict() for p in profiles],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


REQUIRED_FIELDS = frozenset({"model", "precision", "tensorrt_version", "onnx_sha256", "spec_digest", "contract_digest",
                             "profiles", "build_flags", "created_utc"})


@dataclass(frozen=True)
class EngineManifest:
    """Everything one plan was built from and on; written as `manifest.json` beside it."""

    model: str
    precision: str
    tensorrt_version: str
    cuda_version: str | None
    driver_version: str | None
    gpu_name: str | None
    compute_capability: str | None
    profiles: list[dict]
    build_flags: dict
    onnx_sha256: str
    plan_sha256: str
    spec_digest: str
    contract_digest: str
    created_utc: str
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)
    # "cu13": the CUDA the building TensorRT wheel is made for (tensorrt-cu13): the driver must run that CUDA.
    tensorrt_cuda: str | None = None
    mig_profile: str | None = None  # built on a MIG slice of gpu_name ("3g.40gb"); None: the whole GPU

    @property
    def hardware_compatibility(self) -> str:
        return str(self.build_flags.get("hardware_compatibility_level", "none"))

    @property
    def version_compatible(self) -> bool:
        return bool(self.build_flags.get("version_compatible", False))

    def as_dict(self) -> dict:
        return asdict(self)

    def write(self, path: Path) -> Path:
        return write_atomic(path, (json.dumps(self.as_dict(), indent=2, sort_keys=True) + "\n").encode())

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> EngineManifest:
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object, got {type(data).__name__}")
        missing = sorted(REQUIRED_FIELDS - set(data))
        if missing:
            raise ManifestError(f"{source}: missing field(s) {', '.join(missing)}; rebuild with "
                                "`fusionrank build-engines`")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for name in ("cuda_version", "driver_version", "gpu_name", "compute_capability"):
            values.setdefault(name, None)
        values.setdefault("plan_sha256", "")
        return cls(**values)


def create_manifest(spec: PipelineSpec, repo: Path, model: str, node: NodeInfo, precision: str,
                    profiles: tuple[OptimizationProfile, ...], build_flags: dict, plan: Path | None = None,
                    now: _dt.datetime | None = None, tensorrt_cuda: str | None = None,
                    extra: dict | None = None) -> EngineManifest:
    """The manifest of an engine just built for `model` from `<repo>/<model>/1/model.onnx` on `node`."""
    if node.tensorrt_version is None:
        raise ManifestError(f"{model}: cannot record an engine without the TensorRT version that built it")
    plan = plan or plan_path(repo, model)
    created = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return EngineManifest(
        model=model, precision=precision, tensorrt_version=node.tensorrt_version, cuda_version=node.cuda_version,
        driver_version=node.driver_version, gpu_name=node.gpu_name, compute_capability=node.compute_capability,
        profiles=[p.as_dict() for p in profiles], build_flags=dict(build_flags),
        onnx_sha256=sha256_file(onnx_path(repo, model)),
        plan_sha256=sha256_file(plan) if plan.is_file() else "",
        spec_digest=spec.digest(), contract_digest=engine_contract_digest(spec, model, profiles), created_utc=created,
        tensorrt_cuda=tensorrt_cuda or _cuda_flavour(node.cuda_version), mig_profile=node.mig_profile,
        extra=dict(extra or {}))


def _cuda_flavour(cuda_version: str | None) -> str | None:
    """'13.0' -> 'cu13' (the builder's CUDA runtime, when the TensorRT wheel's flavour is not known)."""
    return f"cu{cuda_version.split('.')[0]}" if cuda_version else None


def load_manifest(path: Path) -> EngineManifest:
    """Read one manifest.json (ManifestError when unreadable or incomplete)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    return EngineManifest.from_dict(data, source=str(path))


def find_manifest(repo: Path, model: str) -> EngineManifest | None:
    """The manifest beside `<repo>/<model>/1/model.plan`, or None when there is none."""
    path = manifest_path(repo, model)
    return load_manifest(path) if path.is_file() else None


# Fields a platform team compares when moving engines between nodes or releases, in report order.
COMPARED_FIELDS = ("tensorrt_version", "tensorrt_cuda", "cuda_version", "driver_version", "gpu_name", "mig_profile",
                   "compute_capability", "precision", "build_flags", "profiles", "onnx_sha256", "contract_digest",
                   "spec_digest")


@dataclass(frozen=True)
class ManifestChange:
    """One manifest field that differs between the baseline and the current engine."""

    field: str
    old: object
    new: object


def compare_manifests(old: EngineManifest | dict | None, new: EngineManifest | dict | None) -> list[ManifestChange]:
    """Fields that differ between two manifests of one model (old: the baseline's, new: this node's)."""
    old_d = old.as_dict() if isinstance(old, EngineManifest) else (old or {})
    new_d = new.as_dict() if isinstance(new, EngineManifest) else (new or {})
    if not old_d and not new_d:
        return []
    return [ManifestChange(f, old_d.get(f), new_d.get(f)) for f in COMPARED_FIELDS if old_d.get(f) != new_d.get(f)]
