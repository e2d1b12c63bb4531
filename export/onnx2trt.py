"""onnx2trt: TensorRT engines from the exported ONNX models (GPU nodes only; `pip install '.[gpu]'`).

For each engine model this parses `<repo>/<model>/1/model.onnx` with TensorRT's ONNX parser, adds the optimisation
profiles derived from the spec (`export.profiles`), builds with the spec's precision (FP16 by default; FP32; INT8
with entropy calibration over catalogue samples), a reused timing cache, a workspace limit, the builder
optimisation level and optional hardware/version compatibility, and writes `<repo>/<model>/1/model.plan` plus
`manifest.json` (`export.manifest`). Parser and builder errors are collected from the parser and the logger and
raised in full as `EngineBuildError`.

Written against the TensorRT 10.13 Python API pinned in the `[gpu]` extra (`tensorrt-cu12==10.13.3.9`):
`Builder.create_network(0)` (explicit batch is the only mode in TensorRT 10), `OnnxParser.parse_from_file` +
`get_error`, `IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)`, `builder_optimization_level`,
`set_flag(BuilderFlag.FP16 / INT8 / VERSION_COMPATIBLE)`, `hardware_compatibility_level`,
`create_timing_cache`/`set_timing_cache`/`get_timing_cache().serialize()`, `create_optimization_profile` +
`set_shape`, `set_calibration_profile` + `int8_calibrator` (implicit INT8 calibration: deprecated since 10.1, still
supported in 10.x, removed in TensorRT 11), `build_serialized_network`; at run time `Runtime.deserialize_cuda_engine`,
`IExecutionContext.set_optimization_profile_async`, `set_input_shape`, `set_tensor_address`, `execute_async_v3`.
Device memory and streams come from cuda-python (`cuda.bindings.runtime`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.manifest import (
    NodeInfo,
    NodeProbe,
    create_manifest,
    manifest_path,
    onnx_path,
    plan_path,
    probe_node,
    sha256_file,
    version_dir,
)
from export.profiles import OptimizationProfile, engine_models, model_profiles, validate_profiles
from fusionrank.errors import FusionRankError
from fusionrank.spec import Modality, PipelineSpec, Precision
from fusionrank.tensors import model_io

log = logging.getLogger(__name__)

INSTALL_HINT = ("TensorRT is not installed in this environment. Engines are built on a GPU node: there run\n"
                "    pip install '.[gpu]'        (tensorrt-cu12==10.13.3.9 and cuda-python, see pyproject.toml)\n"
                "or use the NGC Triton image, then run `fusionrank build-engines` again.")


class EngineBuildError(FusionRankError):
    """TensorRT could not parse, build, load or run an engine; the message holds TensorRT's own errors."""


def import_tensorrt():
    """The `tensorrt` module, or None when the `[gpu]` extra is not installed."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


def require_tensorrt():
    """The `tensorrt` module, or EngineBuildError saying what to install."""
    trt = import_tensorrt()
    if trt is None:
        raise EngineBuildError(INSTALL_HINT)
    return trt


# --- CUDA memory through cuda-python ------------------------------------------------------------------------------


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 layout
        except ImportError as exc:
            raise EngineBuildError("cuda-python is not installed; pip install '.[gpu]'") from exc
    return cudart


def _cuda(result, what: str):
    """Unpack a cuda-python `(err, *values)` result, raising EngineBuildError on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineBuildError(f"CUDA error in {what}: {err}")
    return values[0] if len(values) == 1 else (values or None)


class DeviceBuffers:
    """Grow-only device allocations keyed by tensor name, freed on close()."""

    def __init__(self):
        self.cudart = _cudart()
        self.buffers: dict[str, tuple[int, int]] = {}

    def get(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _cuda(self.cudart.cudaFree(ptr), "cudaFree")
            ptr = int(_cuda(self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def upload(self, name: str, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        ptr = self.get(name, array.nbytes)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _cuda(self.cudart.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, kind), "cudaMemcpy H2D")
        return ptr

    def download(self, name: str, out: np.ndarray) -> np.ndarray:
        ptr, _ = self.buffers[name]
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda(self.cudart.cudaMemcpy(out.ctypes.data, ptr, out.nbytes, kind), "cudaMemcpy D2H")
        return out

    def close(self) -> None:
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.buffers.clear()


# --- logging and errors -------------------------------------------------------------------------------------------


def _make_logger(trt):
    """A TensorRT logger that forwards to `logging` and keeps every error for the exception message."""

    class CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return CapturingLogger()


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
    hardware_compatible: bool
    version_compatible: bool
    calibration_samples: int

    @classmethod
    def from_spec(cls, spec: PipelineSpec, precision: Precision | str | None = None) -> BuildOptions:
        trt_spec = spec.export.tensorrt
        return cls(Precision(precision) if precision else trt_spec.precision, trt_spec.workspace_mib,
                   trt_spec.builder_optimization_level, trt_spec.hardware_compatible, trt_spec.version_compatible,
                   trt_spec.calibration_samples)

    def flags(self) -> dict:
        """Build flags as recorded in the manifest (and compared by `check`)."""
        return {"precision": self.precision.value, "workspace_mib": self.workspace_mib,
                "builder_optimization_level": self.builder_optimization_level,
                "hardware_compatibility_level": "ampere_plus" if self.hardware_compatible else "none",
                "version_compatible": self.version_compatible,
                "calibration_samples": self.calibration_samples if self.precision is Precision.INT8 else 0}


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


# --- INT8 calibration ---------------------------------------------------------------------------------------------


def calibration_batches(spec: PipelineSpec, repo: Path, model: str, batch_size: int,
                        samples: int) -> list[dict[str, np.ndarray]]:
    """Fixed-shape calibration batches for `model` from catalogue items (and sessions, for the ranker).

    TensorRT calibrates at the calibration profile's shape, so every batch has `batch_size` rows and text is padded
    to max_length (the attention mask keeps padding out of the pooled embedding). The ranker's embeddings come
    from the exported encoders (ONNX Runtime) over the same items, as in serving.
    """
    from fusionrank.benchmark import load_benchmark

    bench = load_benchmark(spec)
    rng = np.random.default_rng(spec.data.seed)
    n = math.ceil(max(samples, 1) / batch_size) * batch_size
    items = rng.choice(np.arange(1, bench.num_items + 1), size=n, replace=n > bench.num_items)
    enabled = spec.modalities.enabled
    if model == "fusion_ranker":
        arrays = {}
        for modality in enabled:
            encoder = f"{modality.value}_encoder"
            inputs = _encoder_inputs(spec, repo, modality, bench, items)
            arrays.update(_onnx_run(onnx_path(repo, encoder), inputs))
        sessions = rng.integers(0, len(bench.sessions), size=n)
        arrays["history"] = bench.sessions.history[sessions].astype(np.int64)
    else:
        modality = next(m for m in enabled if f"{m.value}_encoder" == model)
        arrays = _encoder_inputs(spec, repo, modality, bench, items)
    return [{k: v[s:s + batch_size] for k, v in arrays.items()} for s in range(0, n, batch_size)]


def _encoder_inputs(spec: PipelineSpec, repo: Path, modality: Modality, bench, items: np.ndarray):
    from fusionrank.paths import tokenizer_dir
    from fusionrank.preprocess import build_preprocessor

    tokenizer = tokenizer_dir(repo) if modality is Modality.TEXT else None
    pre = build_preprocessor(spec, modality, tokenizer_dir=tokenizer)
    parts = [pre([bench.item(int(i)).payload(modality) for i in items[s:s + 64]]) for s in range(0, len(items), 64)]
    if modality is Modality.TEXT:
        width = spec.modalities.text.max_length
        parts = [{k: np.pad(v, ((0, 0), (0, width - v.shape[1]))) for k, v in p.items()} for p in parts]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _onnx_run(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in inputs.items() if k in wanted})))


def _make_calibrator(trt, batches: list[dict[str, np.ndarray]], cache_file: Path):
    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """Feeds the calibration batches to TensorRT; the calibration table is cached beside the timing cache."""

        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches, self.index, self.device = batches, 0, DeviceBuffers()

        def get_batch_size(self):
            return len(next(iter(self.batches[0].values())))

        def get_batch(self, names):
            if self.index >= len(self.batches):
                return None
            batch = self.batches[self.index]
            self.index += 1
            return [self.device.upload(n, batch[n]) for n in names]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_bytes(bytes(cache))

    return EntropyCalibrator()


# --- build --------------------------------------------------------------------------------------------------------


def _check_network_inputs(network, spec: PipelineSpec, model: str) -> None:
    found = sorted(network.get_input(i).name for i in range(network.num_inputs))
    expected = sorted(t.name for t in model_io(spec, model).inputs)
    if found != expected:
        raise EngineBuildError(f"{model}: ONNX inputs {found} differ from the tensor contract {expected}; "
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
               profiles: tuple[OptimizationProfile, ...], repo: Path, calibration_cache: Path):
    """Apply the build options and profiles; returns the INT8 calibrator (keep it alive until the build ends)."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.builder_optimization_level = options.builder_optimization_level
    if options.precision in (Precision.FP16, Precision.INT8):
        # For INT8, FP16 is the fallback of layers without an INT8 kernel (instead of FP32).
        config.set_flag(trt.BuilderFlag.FP16)
    if options.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    for profile in profiles:
        p = builder.create_optimization_profile()
        for name, r in profile.inputs:
            p.set_shape(name, r.min, r.opt, r.max)
        if config.add_optimization_profile(p) < 0:
            raise EngineBuildError(f"{model}: TensorRT rejected optimisation profile {profile.as_dict()}")
    if options.precision is Precision.INT8:
        batch = profiles[0].ranges()[profiles[0].inputs[0][0]].opt[0]
        batches = calibration_batches(spec, repo, model, batch, options.calibration_samples)
        calib = builder.create_optimization_profile()
        for name, array in batches[0].items():
            calib.set_shape(name, array.shape, array.shape, array.shape)
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_calibration_profile(calib)
        calibrator = _make_calibrator(trt, batches, calibration_cache)
        config.int8_calibrator = calibrator
        return calibrator
    return None


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
    started = time.monotonic()
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        details = "\n  ".join(_parser_errors(parser) + logger.errors) or "(no details)"
        raise EngineBuildError(f"{model}: TensorRT could not parse {source}:\n  {details}")
    _check_network_inputs(network, spec, model)
    config = builder.create_builder_config()
    # The calibration table is only valid for this exact ONNX graph: key it by the graph's hash.
    calib_name = f"{model}-{sha256_file(source)[:12]}.calib"
    calibration_cache = (timing_cache.parent if timing_cache else version_dir(repo, model)) / calib_name
    calibrator = _configure(trt, builder, config, spec, model, options, profiles, repo, calibration_cache)
    cache = _load_timing_cache(config, timing_cache)
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.device.close()
    if serialized is None:
        details = "\n  ".join(logger.errors) or "(no error logged; run with -v for the builder log)"
        raise EngineBuildError(f"{model}: TensorRT failed to build the engine:\n  {details}")
    plan = plan_path(repo, model)
    plan.write_bytes(bytes(serialized))
    if cache is not None and timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    built_on = dataclasses.replace(node, tensorrt_version=trt.__version__)
    manifest = create_manifest(spec, repo, model, built_on, options.precision.value, profiles, options.flags(), plan)
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
    options = BuildOptions.from_spec(spec, precision)
    if timing_cache is None:
        from fusionrank.paths import cache_dir

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
    from tqdm import tqdm

    with tqdm(total=len(models or engine_models(spec)), desc="engines", unit="model", file=sys.stderr) as bar:
        results = build_engines(spec, repo, precision, models, timing_cache, progress=lambda result: bar.update(1))
    out.write(f"{'model':<16} {'precision':<9} {'profiles':>8} {'size MiB':>9} {'seconds':>8}  plan\n")
    for r in results:
        out.write(f"{r.model:<16} {r.precision:<9} {len(r.profiles):>8} {r.size_bytes / 2**20:>9.1f} "
                  f"{r.seconds:>8.1f}  {r.plan}\n")
    return 0


# --- run an engine (parity and latency on GPU nodes) ----------------------------------------------------------------


class TensorRTRunner:
    """Runs one `model.plan` on numpy inputs: picks the profile that fits, splits batches over its max batch."""

    def __init__(self, plan: Path, allow_host_code: bool = False):
        trt = require_tensorrt()
        self.trt, self.cudart = trt, _cudart()
        self.logger = _make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        if allow_host_code:
            # Version-compatible plans carry the lean runtime (host code); only load plans built here.
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"cannot load {plan}: " + ("; ".join(self.logger.errors) or "unknown error"))
        self.context = self.engine.create_execution_context()
        self.stream = _cuda(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.profile = 0
        self.device = DeviceBuffers()

    def _ranges(self, index: int) -> dict[str, tuple]:
        return {n: self.engine.get_tensor_profile_shape(n, index) for n in self.inputs}

    def _pick(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for i in range(self.engine.num_optimization_profiles):
            ranges = self._ranges(i)
            if all(all(lo <= d <= hi for lo, d, hi in zip(ranges[n][0], s, ranges[n][2])) for n, s in shapes.items()):
                return i
        raise EngineBuildError(f"input shapes {shapes} fit no optimisation profile of the engine")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for any number of rows (chunks of at most the chosen profile's max batch)."""
        rows = len(next(iter(inputs.values())))
        first = {n: (min(rows, 1), *inputs[n].shape[1:]) for n in self.inputs}
        max_batch = int(self._ranges(self._pick(first))[self.inputs[0]][2][0])
        parts = [self._run_once({n: inputs[n][s:s + max_batch] for n in self.inputs})
                 for s in range(0, rows, max_batch)]
        return {n: np.concatenate([p[n] for p in parts]) for n in self.outputs}

    def _run_once(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, stream = self.trt, int(self.stream)
        index = self._pick({n: tuple(a.shape) for n, a in inputs.items()})
        if index != self.profile:
            self.context.set_optimization_profile_async(index, stream)
            self.profile = index
        for name in self.inputs:
            array = np.ascontiguousarray(inputs[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_input_shape(name, array.shape)
            self.context.set_tensor_address(name, self.device.upload(name, array))
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, self.device.get(name, results[name].nbytes))
        if not self.context.execute_async_v3(stream):
            raise EngineBuildError("execute_async_v3 failed: " + ("; ".join(self.logger.errors) or "unknown error"))
        _cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return {n: self.device.download(n, a).astype(np.float32, copy=False) if a.dtype == np.float16 else
                self.device.download(n, a) for n, a in results.items()}

    def close(self) -> None:
        self.device.close()
        self.cudart.cudaStreamDestroy(self.stream)
