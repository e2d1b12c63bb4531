"""`fusionrank check`: do the engines in a repository fit this node and the repository's current ONNX files?

For every engine model it compares `<model>/1/manifest.json` with
- the repository: the plan exists, the ONNX file it was built from is unchanged (sha256), the spec still asks for
  the same tensor contract and optimisation profiles;
- the node: a GPU of the compute capability (and model, whole or the same MIG slice) the engine was built on,
  unless it was built hardware-compatible (`same_compute_capability`: any GPU of its compute capability, e.g. H100
  and H200, both 9.0; `ampere_plus`); the TensorRT Triton loads plans with (`export.node.facts`: its TensorRT backend's
  libnvinfer and the image's $TRT_VERSION, never the `tensorrt` Python package that built them): exactly the
  builder's, or for a version-compatible plan the same or a newer one within TensorRT's documented range
  (`version_compatible_with`); a driver that runs the CUDA of the TensorRT that built the plan (`tensorrt_cuda`,
  `export.node.cuda_driver`);
- Triton's backend config: a version-compatible plan carries TensorRT's lean runtime and loads only when Triton runs
  with `--backend-config=tensorrt,version-compatible=true`; `fusionrank serve` and the image entrypoint add it
  from `triton_backend_config`, and a caller that says how Triton will run (`backend_config`) is checked for it.
`fusionrank serve --profile gpu` runs the same `preflight` first and refuses to start on any mismatch.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from export.manifest import (
    EngineManifest,
    ManifestError,
    engine_contract_digest,
    find_manifest,
    onnx_path,
    plan_path,
    sha256_file,
)
from export.node.cuda_driver import driver_problem
from export.node.facts import NodeInfo, NodeProbe, probe_node, same_version, version_parts
from export.profiles import engine_models, model_profiles
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.spec import PipelineSpec

log = logging.getLogger(__name__)


class MismatchKind(str, enum.Enum):
    """Why an engine cannot be served as it is."""

    MISSING_ENGINE = "missing engine"
    STALE_ENGINE = "stale engine"
    SPEC_CHANGED = "spec changed"
    WRONG_GPU = "wrong GPU"
    TENSORRT_MISMATCH = "TensorRT mismatch"
    OLD_DRIVER = "driver too old"
    BACKEND_CONFIG = "Triton backend config"


VERSION_COMPATIBLE_CONFIG = "tensorrt,version-compatible=true"


@dataclass(frozen=True)
class Mismatch:
    """One reason one engine does not fit this node or repository."""

    model: str
    kind: MismatchKind
    detail: str

    def __str__(self) -> str:
        return f"{self.model}: {self.kind.value}: {self.detail}"

    def as_dict(self) -> dict:
        return {"model": self.model, "kind": self.kind.value, "detail": self.detail}


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, _, minor = cc.partition(".")
    return int(major), int(minor or 0)


# Cross-major runtimes TensorRT documents for version-compatible plans (TensorRT 11.4 support matrix, "Engine
# Portability": "TensorRT 10 version-compatible engines can run with a TensorRT 11 runtime, and TensorRT 8
# version-compatible engines can run with a TensorRT 10 runtime. No other combination across major versions is
# supported"; the 10.x "Version Compatibility" page adds 8 -> 9). Within a major: the same or any later minor.
CROSS_MAJOR = {(8, 9), (8, 10), (10, 11)}
FIRST_VERSION_COMPATIBLE = (8, 6)  # "the plan must be built with a version at least 8.6"


def version_compatible_with(built: str, runtime: str) -> str | None:
    """Why a version-compatible plan built with TensorRT `built` cannot run on `runtime` (None: it can)."""
    b, r = version_parts(built), version_parts(runtime)
    if b[:2] < FIRST_VERSION_COMPATIBLE or r[:2] < FIRST_VERSION_COMPATIBLE:
        return f"version compatibility needs TensorRT 8.6 or newer on both sides ({built} -> {runtime})"
    if r[:len(b)] < b[:len(r)]:
        return f"built version-compatible with TensorRT {built}; this node has the older {runtime}"
    if r[0] != b[0] and (b[0], r[0]) not in CROSS_MAJOR:
        return (f"built version-compatible with TensorRT {built}; TensorRT {r[0]} does not run TensorRT {b[0]} "
                f"plans (only the same major or the next documented one: {sorted(CROSS_MAJOR)})")
    return None


def tensorrt_mismatch(manifest: EngineManifest, node_version: str | None) -> str | None:
    """Why this node's TensorRT cannot run the engine, or None when it can."""
    if node_version is None:
        return (f"built with TensorRT {manifest.tensorrt_version}; this node's TensorRT version is unknown "
                "(pass --tensorrt-version with the serving image's version)")
    if manifest.version_compatible:
        return version_compatible_with(manifest.tensorrt_version, node_version)
    # A plain plan needs exactly the TensorRT it was built with (major, minor, patch and build; a version read
    # without its build number matches on the other three).
    if not same_version(manifest.tensorrt_version, node_version):
        return f"built with TensorRT {manifest.tensorrt_version}, this node has {node_version}"
    return None


def gpu_mismatch(manifest: EngineManifest, node: NodeInfo) -> str | None:
    """Why this node's GPU cannot (or should not) run the engine, or None when it fits."""
    if not node.has_gpu:
        why = "; ".join(node.notes) or "no GPU found"
        return f"built on {manifest.gpu_name} (compute capability {manifest.compute_capability}); {why}"
    if manifest.compute_capability is None or node.compute_capability is None:
        return (f"cannot compare compute capability (engine: {manifest.compute_capability}, "
                f"node: {node.compute_capability})")
    level = manifest.hardware_compatibility.lower()
    built, here = _cc_tuple(manifest.compute_capability), _cc_tuple(node.compute_capability)
    if level == "ampere_plus":
        if here < (8, 0):
            return (f"built hardware-compatible (Ampere and newer); {node.gpu_name} has compute capability "
                    f"{node.compute_capability} < 8.0")
        return None
    if here != built:
        return (f"built for compute capability {manifest.compute_capability} ({manifest.gpu_name}); "
                f"this node's {node.gpu_name} has {node.compute_capability}")
    if level == "same_compute_capability":
        return None
    if node.mig_profile != manifest.mig_profile:
        # nvidia-smi names a MIG slice by its parent GPU: the name check alone would pass a plan timed on the whole
        # GPU (all SMs, all memory) on a slice, or the other way round.
        def where(mig):
            return f"a MIG {mig} slice of" if mig else "a whole"
        return (f"built on {where(manifest.mig_profile)} {manifest.gpu_name}, this node is {where(node.mig_profile)} "
                f"{node.gpu_name}: tactics were timed on other hardware (rebuild here, or build "
                "same_compute_capability)")
    if node.gpu_name != manifest.gpu_name:
        # Same compute capability, different GPU model: TensorRT loads the plan but its tactics were timed on
        # another device (TensorRT warns; latency and even correctness are not guaranteed).
        return (f"built on {manifest.gpu_name}, this node has {node.gpu_name} (same compute capability "
                f"{node.compute_capability}; tactics were timed on another GPU model)")
    return None


def driver_mismatch(manifest: EngineManifest, node: NodeInfo) -> str | None:
    """Why this node's driver cannot run the CUDA of the TensorRT that built the plan (None: it can, or unknown)."""
    cuda = manifest.tensorrt_cuda or (manifest.cuda_version and f"cu{manifest.cuda_version.split('.')[0]}")
    if not node.has_gpu or not cuda:
        return None
    return driver_problem(node.driver_version, cuda, f"the plan was built by TensorRT {manifest.tensorrt_version} "
                                                     f"for {cuda}")


def backend_config_mismatch(manifest: EngineManifest, backend_config: Sequence[str] | None) -> str | None:
    """Why Triton started with `backend_config` cannot load this plan (None: it can, or fusionrank starts Triton)."""
    if not manifest.version_compatible or backend_config is None:
        return None
    if any(VERSION_COMPATIBLE_CONFIG == value.replace(" ", "") for value in backend_config):
        return None
    return (f"built version-compatible: Triton must run with --backend-config={VERSION_COMPATIBLE_CONFIG} "
            "(fusionrank serve and the image entrypoint add it)")


def triton_backend_config(spec: PipelineSpec, repo: Path) -> list[str]:
    """`--backend-config` values Triton needs for the engines in `repo` (version-compatible plans need one)."""
    for model in engine_models(spec):
        try:
            manifest = find_manifest(repo, model)
        except ManifestError:
            continue
        if manifest is not None and manifest.version_compatible:
            return [VERSION_COMPATIBLE_CONFIG]
    return []


def check_model(spec: PipelineSpec, repo: Path, model: str, node: NodeInfo,
                backend_config: Sequence[str] | None = None) -> list[Mismatch]:
    """Every mismatch of one engine model with the repository and the node."""
    plan = plan_path(repo, model)
    if not plan.is_file():
        return [Mismatch(model, MismatchKind.MISSING_ENGINE, f"no {plan.relative_to(repo)}; run "
                                                            "`fusionrank build-engines`")]
    try:
        manifest = find_manifest(repo, model)
    except ManifestError as exc:
        return [Mismatch(model, MismatchKind.MISSING_ENGINE, f"unreadable manifest: {exc}")]
    if manifest is None:
        return [Mismatch(model, MismatchKind.MISSING_ENGINE, "model.plan has no manifest.json beside it, so it cannot "
                         "be verified; rebuild with `fusionrank build-engines`")]
    found = []
    onnx = onnx_path(repo, model)
    if not onnx.is_file():
        found.append(Mismatch(model, MismatchKind.STALE_ENGINE, f"its source {onnx.relative_to(repo)} is missing"))
    elif sha256_file(onnx) != manifest.onnx_sha256:
        found.append(Mismatch(model, MismatchKind.STALE_ENGINE, "model.onnx changed since the engine was built "
                              f"(sha256 {manifest.onnx_sha256[:12]}… -> {sha256_file(onnx)[:12]}…)"))
    if manifest.plan_sha256 and sha256_file(plan) != manifest.plan_sha256:
        found.append(Mismatch(model, MismatchKind.STALE_ENGINE, "model.plan is not the file its manifest describes"))
    expected = engine_contract_digest(spec, model, model_profiles(spec, model))
    if expected != manifest.contract_digest:
        found.append(Mismatch(model, MismatchKind.SPEC_CHANGED, "the spec's tensor contract or optimisation profiles "
                              f"changed since the build (max batch, padding buckets, dims); engine "
                              f"{manifest.contract_digest}, spec now {expected}"))
    why = gpu_mismatch(manifest, node)
    if why:
        found.append(Mismatch(model, MismatchKind.WRONG_GPU, why))
    why = driver_mismatch(manifest, node)
    if why:
        found.append(Mismatch(model, MismatchKind.OLD_DRIVER, why))
    why = tensorrt_mismatch(manifest, node.tensorrt_version)
    if why:
        found.append(Mismatch(model, MismatchKind.TENSORRT_MISMATCH, why))
    why = backend_config_mismatch(manifest, backend_config)
    if why:
        found.append(Mismatch(model, MismatchKind.BACKEND_CONFIG, why))
    return found


def preflight(spec: PipelineSpec, repo: Path, tensorrt_version: str | None = None,
              probe: NodeProbe | None = None, backend_config: Sequence[str] | None = None) -> list[Mismatch]:
    """Mismatches of every engine in `repo` with this node and the repository (empty: safe to serve).

    `backend_config`: the `--backend-config` values Triton will run with; None when fusionrank starts it (it adds
    `triton_backend_config`)."""
    node = probe() if probe else probe_node(tensorrt_version)
    if tensorrt_version and node.tensorrt_version != tensorrt_version:
        node = dataclasses.replace(node, tensorrt_version=tensorrt_version, tensorrt_source="--tensorrt-version")
    return [m for model in engine_models(spec) for m in check_model(spec, Path(repo), model, node, backend_config)]


class PreflightError(FusionRankError):
    """The engines in the repository do not match this node (the GPU profile would fail to load or run them)."""


def refuse_on_mismatch(spec: PipelineSpec, repo: Path, force: bool = False,
                       backend_config: Sequence[str] | None = None) -> list[Mismatch]:
    """Gate before serving the GPU profile: log every mismatch and raise `PreflightError` unless `force`."""
    mismatches = preflight(spec, repo, backend_config=backend_config)
    for m in mismatches:
        log.error("pre-flight: %s", m)
    if mismatches and not force:
        raise PreflightError(f"{len(mismatches)} engine mismatch(es) with this node; rebuild with "
                             "`fusionrank build-engines`, or pass --force to serve anyway")
    return mismatches


def status_rows(spec: PipelineSpec, repo: Path, mismatches: list[Mismatch]) -> list[dict]:
    """One row per engine model for the table / JSON: what the manifest says and the verdict."""
    rows = []
    for model in engine_models(spec):
        try:
            manifest = find_manifest(repo, model)
        except ManifestError:
            manifest = None
        problems = [m for m in mismatches if m.model == model]
        rows.append({
            "model": model,
            "precision": manifest.precision if manifest else "-",
            "built_on": f"{manifest.gpu_name} (cc {manifest.compute_capability})" if manifest else "-",
            "tensorrt": manifest.tensorrt_version if manifest else "-",
            "built": manifest.created_utc if manifest else "-",
            "status": "ok" if not problems else "; ".join(m.kind.value for m in problems),
        })
    return rows


def render_table(rows: list[dict]) -> str:
    """Fixed-width text table of `status_rows`."""
    headers = ["model", "precision", "built_on", "tensorrt", "built", "status"]
    widths = {h: max(len(h), *(len(str(r[h])) for r in rows)) for h in headers}
    lines = ["  ".join(h.ljust(widths[h]) for h in headers), "  ".join("-" * widths[h] for h in headers)]
    lines += ["  ".join(str(r[h]).ljust(widths[h]) for h in headers) for r in rows]
    lines = [line.rstrip() for line in lines]
    return "\n".join(lines)


def check_command(spec: PipelineSpec, repo: Path, tensorrt_version: str | None = None, as_json: bool = False,
                  probe: NodeProbe | None = None, out=None, backend_config: Sequence[str] | None = None,
                  print_backend_config: bool = False) -> int:
    """`fusionrank check`: print a table (or JSON) of every engine; exit 1 naming each mismatch.

    `print_backend_config`: print only the `--backend-config` values Triton needs for these engines, one per line
    (the image entrypoint passes them on), and exit 0."""
    out = out or sys.stdout
    needed = triton_backend_config(spec, repo)
    if print_backend_config:
        out.write("".join(f"{value}\n" for value in needed))
        return 0
    node = probe() if probe else probe_node(tensorrt_version)
    mismatches = preflight(spec, repo, tensorrt_version=tensorrt_version, probe=lambda: node,
                           backend_config=backend_config)
    rows = status_rows(spec, repo, mismatches)
    if as_json:
        out.write(json.dumps({"node": node.as_dict(), "engines": rows, "triton_backend_config": needed,
                              "mismatches": [m.as_dict() for m in mismatches]}, indent=2) + "\n")
        return 1 if mismatches else 0
    gpu = f"{node.gpu_name} (cc {node.compute_capability})" if node.has_gpu else "no GPU"
    source = f" from {node.tensorrt_source}" if node.tensorrt_source else ""
    out.write(f"node: {gpu}, driver {node.driver_version or '-'}, CUDA {node.cuda_version or '-'}, "
              f"Triton's TensorRT {node.tensorrt_version or 'unknown'}{source}\n")
    for note in node.notes:
        out.write(f"  note: {note}\n")
    out.write(render_table(rows) + "\n")
    for value in needed:
        out.write(f"Triton needs --backend-config={value} for these engines (fusionrank serve and the image "
                  "entrypoint add it)\n")
    for m in mismatches:
        out.write(f"MISMATCH {m}\n")
    out.write(f"{len(mismatches)} mismatch(es)\n" if mismatches else "all engines match this node\n")
    return 1 if mismatches else 0
