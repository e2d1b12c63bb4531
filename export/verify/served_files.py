"""What the CPU profile serves, read from the rendered repository: per model the ONNX file its config names and the
session options it runs with (`configs/cpu.pbtxt`: `onnx_file`, `intra_op_threads`), their digests, and
`fusionrank check --profile cpu`, which lists them beside the golden outputs export stored.

The upgrade report times and checks these files (not `model.onnx`, which the GPU profiles build from), with the
same ONNX Runtime session options, so its figures are the served models' figures.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from google.protobuf import text_format

from export.manifest import golden_path, sha256_file, version_dir
from export.profiles import engine_models
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.spec import PipelineSpec, ServingProfile
from fusionrank.triton.render import load_config


class ServedFileError(FusionRankError):
    """A CPU model's served file cannot be determined or is missing."""


@dataclass(frozen=True)
class ServedFile:
    """One model's served graph in the CPU profile."""

    model: str
    path: Path
    precision: str  # fp32 | int8, from export.cpu
    intra_op_threads: int  # 0: ONNX Runtime's default
    config: str  # the config file that named it ("spec" when the repository has none)
    sha256: str | None  # None: the file is missing
    golden: bool  # golden outputs stored at export time beside it

    @property
    def present(self) -> bool:
        return self.sha256 is not None

    def as_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def served_file(spec: PipelineSpec, repo: Path, model: str) -> ServedFile:
    """The file and thread count the CPU profile's rendered config gives `model` (the spec's when not rendered)."""
    repo = Path(repo)
    config_path = repo / model / ServingProfile.CPU.config_file
    name, threads, source = spec.export.cpu.onnx_file(model), 0, "spec"
    if config_path.is_file():
        try:
            params = load_config(config_path).parameters
        except text_format.ParseError as exc:
            raise ServedFileError(f"{config_path}: not a ModelConfig ({exc}); run `fusionrank render`") from exc
        if "onnx_file" in params:
            name = params["onnx_file"].string_value
        if "intra_op_threads" in params:
            threads = int(params["intra_op_threads"].string_value or 0)
        source = str(config_path.relative_to(repo))
    path = version_dir(repo, model) / name
    return ServedFile(model, path, spec.export.cpu.precision_of(model).value, threads, source,
                      sha256_file(path)[:16] if path.is_file() else None, golden_path(repo, model).is_file())


def served_files(spec: PipelineSpec, repo: Path) -> dict[str, ServedFile]:
    """Every CPU model's served file, in pipeline order."""
    return {m: served_file(spec, repo, m) for m in engine_models(spec)}


def check_cpu_command(spec: PipelineSpec, repo: Path, as_json: bool = False, out=None) -> int:
    """`fusionrank check --profile cpu`: the served file of every CPU model, its digest, whether golden outputs
    exist and whether the export's gate report (`cpu_parity.json`) saw the same files; exit 1 when one is missing."""
    out = out or sys.stdout
    files = served_files(spec, repo)
    parity = Path(repo) / "cpu_parity.json"
    gated = json.loads(parity.read_text()) if parity.is_file() else None
    problems = [f"{f.model}: {f.path} missing (run `fusionrank export`)" for f in files.values() if not f.present]
    problems += [f"{f.model}: no golden outputs at {golden_path(repo, f.model)}" for f in files.values()
                 if f.present and not f.golden]
    gated_digests = (gated or {}).get("sha256", {})
    if gated is None:
        problems.append(f"{parity} missing: the CPU profile's accuracy gates never ran on these files")
    else:
        problems += [f"{f.model}: {f.path.name} ({f.sha256}) is not the file the accuracy gates passed "
                     f"({gated_digests.get(f.model)}, {parity.name}); re-run `fusionrank export`"
                     for f in files.values() if f.present and gated_digests.get(f.model) != f.sha256]
    if as_json:
        out.write(json.dumps({"files": {m: f.as_dict() for m, f in files.items()}, "problems": problems}, indent=2)
                  + "\n")
        return 1 if problems else 0
    out.write("| model | served file | precision | intra-op threads | sha256 (16) | gated file | golden | config |\n"
              "|---|---|---|---|---|---|---|---|\n")
    for f in files.values():
        same = "yes" if f.sha256 and gated_digests.get(f.model) == f.sha256 else "NO"
        out.write(f"| {f.model} | {f.path.name} | {f.precision} | {f.intra_op_threads or 'default'} | "
                  f"{f.sha256 or 'MISSING'} | {same} | {'yes' if f.golden else 'no'} | {f.config} |\n")
    for p in problems:
        out.write(f"problem: {p}\n")
    out.write(f"{'OK' if not problems else 'FAIL'}: CPU profile files in {repo}\n")
    return 1 if problems else 0
