"""Render `model_repository/` from the spec: Triton `ModelConfig` messages written with protobuf `text_format`.

Three serving profiles, chosen at start-up with Triton's `--model-config-name`:
- `config.pbtxt` (gpu): encoders and ranker as TensorRT plans on the GPU; the production profile.
- `configs/cpu.pbtxt` (cpu): encoders and ranker as ONNX Runtime sessions inside Python-backend models.
- `configs/onnx_gpu.pbtxt` (onnx_gpu): Triton's onnxruntime backend on the GPU (no engine build needed).
A profile's file is written only where it differs from `config.pbtxt` (Triton falls back to `config.pbtxt`): the
reference ensemble, `preprocess` and `pool_embeddings` are the same in every profile; the route callers use (a BLS
Python model) differs only in the files its members serve. Each kind of model is one unit in this package (its
Python class beside its config function, `fusionrank.triton.<unit>`); rendering loops over `UNITS`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from fusionrank.contract.spec import PipelineSpec, ServingProfile
from fusionrank.contract.tensors import ITEM_INPUT
from fusionrank.preprocess.samples import warmup_samples
from fusionrank.triton import ensemble, exported, pool, preprocess, route
from fusionrank.triton._config import Configs, TritonUnit

HEADER = "# Rendered by `fusionrank render` from pipeline.yaml: do not edit by hand.\n"

# Every kind of Triton model, in the order their configs are built (the route's reads the encoders').
UNITS: tuple[TritonUnit, ...] = (preprocess.UNIT, exported.UNIT, pool.UNIT, ensemble.UNIT, route.UNIT)

# Python-backend shells: the logic lives in fusionrank.triton and is unit-tested without a server.
_PYTHON_SHELL = '''"""Triton Python model `{model}`: a thin shell over {module} ({cls})."""

from {module} import {cls} as TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class RenderedFile:
    path: str  # relative to the repository root
    content: bytes


def _rendered_units(spec: PipelineSpec) -> dict[str, tuple[TritonUnit, Configs]]:
    """Every model of the spec: the unit that serves it and its config per profile."""
    units: dict[str, tuple[TritonUnit, Configs]] = {}
    for unit in UNITS:
        for model in unit.models(spec):
            units[model] = (unit, unit.configs(spec, model, {m: c for m, (_, c) in units.items()}))
    return units


def model_configs(spec: PipelineSpec) -> dict[str, dict[ServingProfile, mc.ModelConfig]]:
    """Every model's config per profile: {model: {profile: ModelConfig}}."""
    return {model: configs for model, (_, configs) in _rendered_units(spec).items()}


def _length_prefixed(data: bytes) -> bytes:
    """Triton's raw layout of one BYTES element (4-byte little-endian length, then the bytes)."""
    return struct.pack("<I", len(data)) + data


def rendered_files(spec: PipelineSpec) -> list[RenderedFile]:
    """Everything `render` writes, in memory: `config.pbtxt` and each profile's config where it differs, Python
    shells, warm-up samples, .gitkeep."""
    files = []
    for model, (unit, profiles) in _rendered_units(spec).items():
        default = text_format.MessageToString(profiles[ServingProfile.GPU])  # config.pbtxt
        for profile, config in profiles.items():
            text = text_format.MessageToString(config)
            if profile.config_name is None or text != default:  # Triton falls back to config.pbtxt
                files.append(RenderedFile(f"{model}/{profile.config_file}", (HEADER + text).encode()))
        if unit.python_class is None:
            files.append(RenderedFile(f"{model}/1/.gitkeep", b""))
        else:
            shell = _PYTHON_SHELL.format(model=model, module=unit.module, cls=unit.python_class)
            files.append(RenderedFile(f"{model}/1/model.py", shell.encode()))
    samples = warmup_samples(spec)
    for modality in spec.modalities.enabled:
        files.append(RenderedFile(f"preprocess/warmup/{ITEM_INPUT[modality]}",
                                  _length_prefixed(samples[modality])))
    return sorted(files, key=lambda f: f.path)


def _stale_profile_configs(expected: dict[str, bytes], repo: Path) -> list[Path]:
    """Profile configs in `repo` the spec no longer renders (the profile now equals `config.pbtxt`): Triton would
    read them instead of `config.pbtxt`."""
    models = {rel.split("/")[0] for rel in expected}
    return [path for path in sorted(repo.glob("*/configs/*.pbtxt"))
            if path.parent.parent.name in models and path.relative_to(repo).as_posix() not in expected]


def render_repository(spec: PipelineSpec, repo: Path) -> list[Path]:
    """Write the rendered repository under `repo` and remove the profile configs it no longer renders; generated
    weights already there are left alone. Returns the files written."""
    written = []
    files = rendered_files(spec)
    for f in files:
        path = repo / f.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != f.content:
            path.write_bytes(f.content)
            written.append(path)
    for path in _stale_profile_configs({f.path: f.content for f in files}, repo):
        path.unlink()
    return written


def check_repository(spec: PipelineSpec, repo: Path) -> list[str]:
    """Differences between `repo` and what the spec renders (empty when they agree)."""
    expected = {f.path: f.content for f in rendered_files(spec)}
    problems = []
    for rel, content in expected.items():
        path = repo / rel
        if not path.exists():
            problems.append(f"missing: {rel} (run `fusionrank render`)")
        elif path.read_bytes() != content:
            problems.append(f"differs from the spec: {rel} (run `fusionrank render`)")
    rendered_models = {rel.split("/")[0] for rel in expected}
    for path in sorted(repo.glob("*/config.pbtxt")):
        if path.parent.name not in rendered_models:
            problems.append(f"not in the spec: {path.parent.name}/ (a model the spec no longer declares)")
    for path in _stale_profile_configs(expected, repo):
        problems.append(f"not rendered: {path.relative_to(repo).as_posix()} (the profile equals config.pbtxt; run "
                        "`fusionrank render`)")
    return problems


def load_config(path: Path) -> mc.ModelConfig:
    """Parse a config.pbtxt into a `ModelConfig` (raises text_format.ParseError on a malformed file)."""
    return text_format.Parse(path.read_text(), mc.ModelConfig())
