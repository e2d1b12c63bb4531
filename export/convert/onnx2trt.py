"""onnx2trt: TensorRT engines from the exported ONNX models (GPU nodes only; `pip install '.[gpu]'`).

For each engine model this parses `<repo>/<model>/1/model.onnx` with TensorRT's ONNX parser, adds the optimisation
profiles derived from the spec (`export.profiles`), builds with the spec's precision (`export.convert.trt_precision`: a
strongly typed network for an explicitly quantized graph, else FP16 by default, FP32, or INT8 with entropy
calibration over catalogue samples, `export.convert.trt_calibration`), a reused timing cache, a workspace limit, the
builder optimisation level and optional hardware/version compatibility, and writes `<repo>/<model>/1/model.plan` plus
`manifest.json` (`export.manifest`), each atomically: the old manifest is removed before the new plan replaces the
old one, so a reader never sees a plan with the manifest of another. Parser and builder errors are collected from
the parser and the process's TensorRT logger and raised in full as `EngineBuildError`. `export.node.trt_runner` runs the
built plans.

Written against the TensorRT 10.13 Python API pinned in the `[gpu]` extra: `Builder.create_network(flags)`,
`OnnxParser.parse_from_file` + `get_error`, `IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)`,
`builder_optimization_level`, `set_flag(BuilderFlag.FP16 / INT8 / VERSION_COMPATIBLE)`,
`hardware_compatibility_level`, `create_timing_cache`/`set_timing_cache`/`get_timing_cache().serialize()`,
`create_optimization_profile` + `set_shape`, `set_calibration_profile` + `int8_calibrator`,
`build_serialized_network`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from export.convert.trt_calibration import calibration_batches, calibration_table, make_calibrator
from export.convert.trt_precision import explicitly_quantized, network_flags, weak_typing_flags
from export.manifest import (
    create_manifest,
    manifest_path,
    onnx_path,
    plan_path,
    version_dir,
    write_atomic,
)
from export.node.cuda_driver import tensorrt_cuda_flavour
from export.node.facts import NodeInfo, NodeProbe, probe_node, same_version
from export.node.trt_api import (
    INSTALL_HINT,
    EngineBuildError,
    describe,
    import_tensorrt,
    process_logger,
    require_tensorrt,
)
from export.profiles import OptimizationProfile, engine_models, model_profiles, validate_profiles
from fusionrank.contract.paths import cache_dir
from fusionrank.contract.spec import HardwareCompatibility, PipelineSpec, Precision
from fusionrank.contract.tensors import model_io

log = logging.getLogger(__name__)


def _parser_errors(parser) -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        errors.append(f"[{err.code()}] node {err.node()}: {err.desc()} ({err.file()}:{err.line()} {err.func()})")
    return errors


# --- build options ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings of one run: the spec's `export.tensorrt`, precision optionally overridden."""

    precision: Precision
    workspace_mib: int
    builder_optimization_level: int
    hardware_compatibility: HardwareCompatibility
    version_compatible: bool
    calibration_samples: int

    @classmethod
    def from_spec(cls, spec: PipelineSpec, precision: Precision | str | None = None) -> BuildOptions:
        trt_spec = spec.export.tensorrt
        return cls(Precision(precision) if precision else trt_spec.precision, trt_spec.workspace_mib,
                   trt_spec.builder_optimization_level, trt_spec.hardware_compatibility, trt_spec.version_compatible,
                   trt_spec.calibration_samples)

    def flags(self, strongly_typed: bool = False) -> dict:
        """Build flags as recorded in the manifest (and compared by `check`)."""
        calibrated = self.precision is Precision.INT8 and not strongly_typed
        return {"precision": self.precision.value, "workspace_mib": self.workspace_mib,
                "builder_optimization_level": self.builder_optimization_level,
                "hardware_compatibility_level": self.hardware_compatibility.value,
                "version_compatible": self.version_compatible, "strongly_typed": strongly_typed,
                "calibration_samples": self.calibration_samples if calibrated else 0}


@dataclass
class BuildResult:
    """One built engine: where its plan and manifest are, how long it took."""

    model: str
    plan: Path
    manifest: Path
    seconds: float
    size_bytes: int
    precision: str
    profiles: tuple[OptimizationProfile, ...] = field(default=())


# --- build --------------------------------------------------------------------------------------------------------


def _check_network_io(network, spec: PipelineSpec, model: str) -> None:
    """The parsed network's inputs and outputs are the tensor contract's (Triton binds them by name)."""
    io_ = model_io(spec, model)
    for kind, count, get, contract in (("inputs", network.num_inputs, network.get_input, io_.inputs),
                                       ("outputs", network.num_outputs, network.get_output, io_.outputs)):
        found = sorted(get(i).name for i in range(count))
        expected = sorted(t.name for t in contract)
        if found != expected:
            raise EngineBuildError(f"{model}: ONNX {kind} {found} differ from the tensor contract {expected}; "
                                   "re-export with `fusionrank export`")


def _load_timing_cache(config, path: Path | None):
    if path is None:
        return None
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    if blob:
        # A cache from another TensorRT version or GPU is refused (ignore_mismatch=False): never reuse timings
        # measured elsewhere, start a new cache instead.
        log.warning("timing cache %s is from another TensorRT version or GPU; starting a new one", path)
        cache = config.create_timing_cache(b"")
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
    log.warning("TensorRT refused a timing cache; building without one")
    return None


def _configure(trt, builder, config, spec: PipelineSpec, model: str, options: BuildOptions,
               profiles: tuple[OptimizationProfile, ...], repo: Path, strongly_typed: bool, calibration_dir: Path):
    """Apply the build options and profiles; returns the INT8 calibrator (keep it alive until the build ends)."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.builder_optimization_level = options.builder_optimization_level
    # A strongly typed network takes its precision from the graph: TensorRT refuses precision flags on it.
    for flag in [] if strongly_typed else weak_typing_flags(trt, options.precision.value):
        config.set_flag(flag)
    if options.hardware_compatibility is not HardwareCompatibility.NONE:
        # AMPERE_PLUS or SAME_COMPUTE_CAPABILITY (TensorRT 10.13 `HardwareCompatibilityLevel`, NvInferRuntime.h).
        level = options.hardware_compatibility.value.upper()
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    for profile in profiles:
        p = builder.create_optimization_profile()
        for name, r in profile.inputs:
            try:
                p.set_shape(name, r.min, r.opt, r.max)
            except RuntimeError as exc:  # the Python binding raises where setDimensions returns false
                raise EngineBuildError(f"{model}: TensorRT refused the shapes of {name!r} in optimisation profile "
                                       f"{profile.name} ({r.describe()}): {exc}") from exc
        if config.add_optimization_profile(p) < 0:
            raise EngineBuildError(f"{model}: TensorRT rejected optimisation profile {profile.as_dict()}")
    if options.precision is Precision.INT8 and not strongly_typed:
        # Calibrated at the largest batch profile's opt (fewer, fuller batches; every profile's shapes hold it).
        batch = max(p.ranges()[p.inputs[0][0]].opt[0] for p in profiles)
        batches = calibration_batches(spec, repo, model, batch, options.calibration_samples)
        calib = builder.create_optimization_profile()
        for name, array in batches[0].items():
            try:
                calib.set_shape(name, array.shape, array.shape, array.shape)
            except RuntimeError as exc:
                raise EngineBuildError(f"{model}: TensorRT refused calibration shape {array.shape} of {name!r}: "
                                       f"{exc}") from exc
        config.set_calibration_profile(calib)
        table = calibration_table(calibration_dir, spec, model, onnx_path(repo, model), batches[0], trt.__version__)
        calibrator = make_calibrator(trt, batches, table)
        config.int8_calibrator = calibrator
        return calibrator
    return None


def _strongly_typed(source: Path, model: str, options: BuildOptions) -> bool:
    if not explicitly_quantized(source):
        return False
    if options.precision is not Precision.INT8:
        raise EngineBuildError(f"{model}: {source} is explicitly quantized (Q/DQ nodes); build it with precision "
                               f"int8 (a strongly typed engine, no calibration), not {options.precision.value}")
    return True


def _serialize(trt, spec: PipelineSpec, repo: Path, model: str, options: BuildOptions,
               profiles: tuple[OptimizationProfile, ...], timing_cache: Path | None, strongly_typed: bool):
    """Parse, configure and build; (serialized plan, the timing cache to save or None)."""
    source = onnx_path(repo, model)
    logger = process_logger(trt)
    with logger.capture() as errors:
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt, strongly_typed))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(source)):
            details = "\n  ".join(_parser_errors(parser) + errors) or "(no details)"
            raise EngineBuildError(f"{model}: TensorRT could not parse {source}:\n  {details}")
        _check_network_io(network, spec, model)
        config = builder.create_builder_config()
        calibration_dir = timing_cache.parent if timing_cache else version_dir(repo, model)
        calibrator = _configure(trt, builder, config, spec, model, options, profiles, repo, strongly_typed,
                                calibration_dir)
    # Outside any capture: a refused timing cache is logged by TensorRT as an error, but it is handled (a new cache)
    # and must not appear in the message of a build that fails later for another reason.
    cache = _load_timing_cache(config, timing_cache)
    with logger.capture() as errors:
        try:
            serialized = builder.build_serialized_network(network, config)
        finally:
            if calibrator is not None:
                for problem in calibrator.device.close():
                    log.warning("%s: calibration buffers: %s", model, problem)
        if serialized is None:
            raise EngineBuildError(f"{model}: TensorRT failed to build the engine:\n  "
                                   + describe(errors, "(no error logged; run with -v for the builder log)"))
    return bytes(serialized), (config.get_timing_cache() if cache is not None and timing_cache else None)


def build_engine(spec: PipelineSpec, repo: Path, model: str, options: BuildOptions, node: NodeInfo,
                 timing_cache: Path | None = None) -> BuildResult:
    """Build `<repo>/<model>/1/model.plan` (+ manifest.json) from its model.onnx; EngineBuildError on failure."""
    trt = require_tensorrt()
    repo = Path(repo)
    source = onnx_path(repo, model)
    if not source.is_file():
        raise EngineBuildError(f"{model}: {source} not found; run `fusionrank export` first")
    profiles = model_profiles(spec, model)
    validate_profiles(spec, model, profiles)
    strongly_typed = _strongly_typed(source, model, options)
    started = time.monotonic()
    plan_bytes, cache = _serialize(trt, spec, repo, model, options, profiles, timing_cache, strongly_typed)
    # The old manifest goes first: until the new one is written the plan has none, which `check` refuses, instead
    # of a new plan beside the manifest of the old one.
    manifest_path(repo, model).unlink(missing_ok=True)
    plan = write_atomic(plan_path(repo, model), plan_bytes)
    if cache is not None:
        write_atomic(timing_cache, bytes(cache.serialize()))
    built_on = dataclasses.replace(node, tensorrt_version=trt.__version__)
    manifest = create_manifest(spec, repo, model, built_on, options.precision.value, profiles,
                               options.flags(strongly_typed), plan, tensorrt_cuda=tensorrt_cuda_flavour())
    manifest.write(manifest_path(repo, model))
    return BuildResult(model, plan, manifest_path(repo, model), round(time.monotonic() - started, 1),
                       plan.stat().st_size, options.precision.value, profiles)


def build_engines(spec: PipelineSpec, repo: Path, precision: Precision | str | None = None,
                  models: list[str] | None = None, timing_cache: Path | None = None,
                  probe: NodeProbe | None = None, progress=None) -> list[BuildResult]:
    """Build every engine model (or `models`), reusing one timing cache across the builds."""
    wanted = engine_models(spec)
    models = list(models or wanted)
    unknown = [m for m in models if m not in wanted]
    if unknown:
        raise EngineBuildError(f"cannot build {unknown}: engine models are {', '.join(wanted)}")
    node = probe() if probe else probe_node()
    if not node.has_gpu:
        raise EngineBuildError("no GPU on this node (" + "; ".join(node.notes) + "); engines must be built on "
                               "the GPU model they will serve on")
    builder_version = require_tensorrt().__version__
    if node.tensorrt_version and not same_version(builder_version, node.tensorrt_version):
        log.warning("building with TensorRT %s, but this node's Triton loads TensorRT %s: these plans will not load "
                    "in it (install the [gpu] extra's pinned TensorRT)", builder_version, node.tensorrt_version)
    options = BuildOptions.from_spec(spec, precision)
    if timing_cache is None:
        timing_cache = cache_dir(spec) / "tensorrt" / "timing.cache"
    results = []
    for model in models:
        log.info("building %s (%s) ...", model, options.precision.value)
        results.append(build_engine(spec, repo, model, options, node, timing_cache))
        if progress:
            progress(results[-1])
    return results


def build_engines_command(spec: PipelineSpec, repo: Path, precision: Precision | None = None,
                          models: list[str] | None = None, timing_cache: Path | None = None, out=None) -> int:
    """`fusionrank build-engines`: build, print a table; without TensorRT say what to install and exit 1."""
    out = out or sys.stdout
    if import_tensorrt() is None:
        out.write(INSTALL_HINT + "\n")
        return 1
    with tqdm(total=len(models or engine_models(spec)), desc="engines", unit="model", file=sys.stderr) as bar:
        results = build_engines(spec, repo, precision, models, timing_cache, progress=lambda result: bar.update(1))
    out.write(f"{'model':<16} {'precision':<9} {'profiles':>8} {'size MiB':>9} {'seconds':>8}  plan\n")
    for r in results:
        out.write(f"{r.model:<16} {r.precision:<9} {len(r.profiles):>8} {r.size_bytes / 2**20:>9.1f} "
                  f"{r.seconds:>8.1f}  {r.plan}\n")
    return 0
