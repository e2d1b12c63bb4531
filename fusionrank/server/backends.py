"""Which Triton backends a serving profile needs, and which ones a Triton installation has.

Needed: read from the model repository itself (the profile's config of every model, as Triton will pick it with
`--model-config-name`): `backend: "python"`, or a `platform` such as `tensorrt_plan` (TensorRT backend) and
`onnxruntime_onnx` (ONNX Runtime backend); ensembles need none. Available: the backend folders holding their
`libtriton_<name>.so`. The NGC image has them all under /opt/tritonserver/backends; the `nvidia-pytriton` wheel
ships the Python backend only, so it serves the `cpu` profile and neither `gpu` nor `onnx_gpu`.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from fusionrank.contract.spec import ServingProfile

NGC_BACKEND_DIR = Path("/opt/tritonserver/backends")  # tritonserver's built-in default backend directory
PLATFORM_BACKENDS = {"tensorrt_plan": "tensorrt", "onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch",
                     "tensorflow_graphdef": "tensorflow", "tensorflow_savedmodel": "tensorflow", "ensemble": None}


@dataclass(frozen=True)
class TritonLocation:
    """A tritonserver binary and the backend folder it loads backends from (nothing is started or copied)."""

    binary: Path
    backend_dir: Path
    source: str  # "PATH" or "nvidia-pytriton"


def default_backend_dir(binary: Path) -> Path:
    """Where a tritonserver binary found on PATH looks for backends: `<prefix>/backends` beside its `bin/`, which
    is /opt/tritonserver/backends in the NGC image."""
    beside = Path(binary).resolve().parent.parent / "backends"
    return beside if beside.is_dir() else NGC_BACKEND_DIR


def locate_triton() -> TritonLocation | None:
    """The tritonserver `fusionrank serve` would start (PATH first, else the nvidia-pytriton wheel's), or None."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonLocation(Path(on_path), default_backend_dir(Path(on_path)), "PATH")
    found = importlib.util.find_spec("pytriton")
    if found is None or not found.origin:
        return None
    server = Path(found.origin).resolve().parent / "tritonserver"
    return TritonLocation(server / "bin" / "tritonserver", server / "backends", "nvidia-pytriton")


def available_backends(backend_dir: Path | None) -> set[str]:
    """Backend names with a `<name>/libtriton_<name>.so` in `backend_dir`."""
    if backend_dir is None or not Path(backend_dir).is_dir():
        return set()
    return {d.name for d in Path(backend_dir).iterdir() if (d / f"libtriton_{d.name}.so").is_file()}


def _config_backend(path: Path) -> str | None:
    # Imported here: tritonclient.grpc maps gRPC and protobuf (~40 MiB) into every process that imports it, and the
    # launcher (which imports this module) reads configs only when it checks the backends before starting Triton.
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    if config.backend:
        return config.backend
    return PLATFORM_BACKENDS.get(config.platform, config.platform or None)


def required_backends(repository: Path, profile: ServingProfile) -> dict[str, list[str]]:
    """Backend name -> the models of `repository` that need it under `profile`."""
    needed: dict[str, list[str]] = defaultdict(list)
    for model in sorted(p for p in Path(repository).iterdir() if p.is_dir()):
        config = profile.served_config(model)
        if config.is_file():
            backend = _config_backend(config)
            if backend:
                needed[backend].append(model.name)
    return dict(needed)


def missing_backends(repository: Path, profile: ServingProfile, backend_dir: Path | None) -> str | None:
    """Why this Triton cannot serve `profile` on `repository` (the backends it lacks and who needs them), or None."""
    have = available_backends(backend_dir)
    lacking = {b: models for b, models in required_backends(repository, profile).items() if b not in have}
    if not lacking:
        return None
    needs = "; ".join(f"{b} backend for {', '.join(models)}" for b, models in sorted(lacking.items()))
    return (f"the {profile.value} profile needs the {needs}, but this Triton's backend folder {backend_dir} has "
            f"only: {', '.join(sorted(have)) or 'none'}. The NGC Triton image (deploy/) has every backend; the "
            "nvidia-pytriton wheel has the Python backend only, which serves the cpu profile")
