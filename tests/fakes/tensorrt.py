"""A fake `tensorrt` module for unit tests of the engine builder and runner (no GPU here).

TensorRT needs a GPU, so this fake stands in for the documented API surface (names checked against the
tensorrt_cu12_bindings 10.13.3.9 wheel) and refuses what the real library refuses, the way it refuses it (return
value, exception or log line as in the Python bindings, NVIDIA/TensorRT `python/src/infer/pyCore.cpp`, release/10.x,
and the 10.13 Python API docs; messages paraphrased where the exact text was not at hand):
- the ONNX parser reads the graph's inputs, outputs and ops: an op without an importer fails the parse with an entry
  in the parser's error list (`num_errors`, `get_error(i)`), as nvonnxparser does;
- `IOptimizationProfile.set_shape` raises RuntimeError ("Shape provided for opt is inconsistent with other shapes.")
  when the ranks differ or a dim is negative (pyCore.cpp `opt_profile_set_shape`); `add_optimization_profile`
  returns -1 for a profile that is not valid, e.g. not min <= opt <= max (IBuilderConfig::addOptimizationProfile);
  the build fails when a network input has no shape in a profile, or one of another rank or fixed dim;
- precision flags (FP16, INT8, BF16, FP8) on a STRONGLY_TYPED network fail the build (the 10.x docs on strong
  typing: "the builder flags ... are not allowed");
- INT8 calibration follows IInt8Calibrator's protocol: `get_batch_size()`, `read_calibration_cache()` (a table
  returned there is used and no batch is read), `get_batch(names)` until None, `write_calibration_cache(table)`;
- timing caches carry the TensorRT version: a blob that is not a cache gives None from `create_timing_cache`, one of
  another version is refused by `set_timing_cache(cache, ignore_mismatch=False)` (False);
- plans carry the TensorRT version and build flags: `deserialize_cuda_engine` returns None (error logged) for a plan
  of another version unless built VERSION_COMPATIBLE (same major and newer, or the next major), and for a
  version-compatible plan unless `engine_host_code_allowed` is set; engines have the network's inputs and outputs;
- `set_optimization_profile_async` raises RuntimeError("Error in set optimization profile async.") on failure
  (pyCore.cpp `context_set_optimization_profile_async`); `execute_async_v3` returns False (error logged) when a
  tensor has no address (IExecutionContext::enqueueV3).
It runs engines on the fake CUDA stream of tests/fakes/cuda.py; tests/integration/test_gpu.py runs the real thing on a
GPU node.
`install_tensorrt` puts it into `sys.modules` (the `fake_trt` fixture in conftest.py) and resets what it recorded.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np

from tests.fakes.cuda import FakeCudart

FAKE_TENSORRT_VERSION = "10.13.3.9"


class FakeTRT:
    """Attributes of the fake `tensorrt` module (copied onto a module by `install_tensorrt`)."""

    __version__ = FAKE_TENSORRT_VERSION

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class BuilderFlag:
        FP16, INT8, BF16, FP8, VERSION_COMPATIBLE = "FP16", "INT8", "BF16", "FP8", "VERSION_COMPATIBLE"

    class HardwareCompatibilityLevel:
        AMPERE_PLUS, SAME_COMPUTE_CAPABILITY = "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    int64, float32, float16, bfloat16, fp8 = "int64", "float32", "float16", "bfloat16", "fp8"
    builds: list = []  # every builder config passed to build_serialized_network, in order
    loggers: list = []  # the logger passed to every Builder, OnnxParser and Runtime, in order

    @staticmethod
    def nptype(dtype):
        if dtype in ("bfloat16", "fp8"):  # as tensorrt.nptype: no numpy equivalent
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return np.dtype(dtype).type


# --- building -----------------------------------------------------------------------------------------------------

PRECISION_FLAGS = {"FP16", "INT8", "BF16", "FP8"}
ONNX_TYPES = {1: "float32", 7: "int64", 10: "float16", 16: "bfloat16"}
PLAN_MAGIC = b"FAKEPLAN"
CACHE_MAGIC = b"FAKETIMINGCACHE:"


def _log_error(logger, message: str) -> None:
    logger.log(FakeTRT.ILogger.Severity.ERROR, message)


class Tensor:
    def __init__(self, name, dtype="float32", shape=()):
        self.name, self.dtype, self.shape = name, dtype, tuple(shape)


class Network:
    def __init__(self, flags=0):
        self.inputs, self.outputs, self.flags = [], [], flags

    @property
    def num_inputs(self):
        return len(self.inputs)

    @property
    def num_outputs(self):
        return len(self.outputs)

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]

    @property
    def strongly_typed(self) -> bool:
        return bool(self.flags & (1 << FakeTRT.NetworkDefinitionCreationFlag.STRONGLY_TYPED))


def parser_error(desc="no importer for op FancyOp", node=7, func="importFancyOp") -> types.SimpleNamespace:
    """One error of the ONNX parser, with the accessors of TensorRT's `ParserError`."""
    return types.SimpleNamespace(code=lambda: "UNSUPPORTED_NODE", node=lambda: node, desc=lambda: desc,
                                 file=lambda: "onnxOpImporters.cpp", line=lambda: 42, func=lambda: func)


def stand_in_onnx(inputs, outputs, ops=()) -> str:
    """A stand-in model file the fake parser reads: (name, dtype, dims) of each input and output, the op types."""
    return json.dumps({"inputs": [list(t) for t in inputs], "outputs": [list(t) for t in outputs], "ops": list(ops)})


def _onnx_graph(path) -> tuple[list, list, list]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}

    def tensors(values):
        return [(v.name, ONNX_TYPES.get(v.type.tensor_type.elem_type, "float32"),
                 [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])
                for v in values if v.name not in weights]

    ops = [(n.op_type, n.domain) for n in graph.node]
    return tensors(graph.input), tensors(graph.output), ops


def _has_importer(op: str, domain: str) -> bool:
    import onnx.defs

    return domain in ("", "ai.onnx") and onnx.defs.has(op)


class Parser:
    """Reads `BROKEN` as a failure, a stand-in (`stand_in_onnx`) or a real ONNX model: its inputs, outputs and ops.

    Any op without an importer fails the parse (one parser error per node), as nvonnxparser does."""

    def __init__(self, network, logger):
        self.network, self.logger, self.errors = network, logger, []
        FakeTRT.loggers.append(logger)

    @property
    def num_errors(self):
        return len(self.errors)

    def parse_from_file(self, path):
        blob = Path(path).read_bytes()
        if blob == b"BROKEN":
            self.errors.append(parser_error())
            _log_error(self.logger, "ModelImporter: failed to import node 7")
            return False
        if blob.startswith(b"{"):
            data = json.loads(blob)
            inputs, outputs = data["inputs"], data["outputs"]
            ops = [(op, "") if isinstance(op, str) else tuple(op) for op in data.get("ops", [])]
        else:
            inputs, outputs, ops = _onnx_graph(path)
        for i, (op, domain) in enumerate(ops):
            if not _has_importer(op, domain):
                self.errors.append(parser_error(f"No importer registered for op: {op}", i, f"import{op}"))
        if not outputs:
            self.errors.append(parser_error("the graph has no outputs", -1, "parseGraph"))
        if self.errors:
            _log_error(self.logger, f"ModelImporter: {len(self.errors)} node(s) could not be imported")
            return False
        self.network.inputs = [Tensor(n, t, d) for n, t, d in inputs]
        self.network.outputs = [Tensor(n, t, d) for n, t, d in outputs]
        return True

    def get_error(self, i):
        return self.errors[i]


class Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        lo, opt, hi = tuple(lo), tuple(opt), tuple(hi)
        for which, dims in (("min", lo), ("opt", opt), ("max", hi)):
            if len(dims) != len(lo) or any(d < 0 for d in dims):  # pyCore.cpp opt_profile_set_shape
                raise RuntimeError(f"Shape provided for {which} is inconsistent with other shapes.")
        self.shapes[name] = (lo, opt, hi)

    def is_valid(self) -> bool:
        return bool(self.shapes) and all(all(a <= b <= c for a, b, c in zip(*r)) for r in self.shapes.values())


class TimingCache:
    """Serialized as CACHE_MAGIC + version + newline + entries; each build adds `+timings`."""

    def __init__(self, version, entries=b""):
        self.version, self.entries = version, bytes(entries)

    @property
    def blob(self):
        return self.entries

    def serialize(self):
        return CACHE_MAGIC + self.version.encode() + b"\n" + self.entries


def timing_cache_blob(version=FAKE_TENSORRT_VERSION, entries=b"") -> bytes:
    return TimingCache(version, entries).serialize()


class Config:
    def __init__(self, logger):
        self.flags, self.profiles, self.pool, self.cache, self.logger = set(), [], {}, None, logger
        self.builder_optimization_level = None
        self.hardware_compatibility_level = None
        self.int8_calibrator = None

    def set_memory_pool_limit(self, pool, size):
        self.pool[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def add_optimization_profile(self, profile):
        if not profile.is_valid():  # IBuilderConfig::addOptimizationProfile: -1 for an invalid profile
            _log_error(self.logger, "IBuilderConfig::addOptimizationProfile: Error Code 3: API Usage Error "
                                    "(Parameter check failed, condition: profile->isValid())")
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob):
        blob = bytes(blob)
        if not blob:
            return TimingCache(FakeTRT.__version__)
        if not blob.startswith(CACHE_MAGIC):
            _log_error(self.logger, "ITimingCache: the serialized timing cache is corrupted")
            return None
        version, _, entries = blob[len(CACHE_MAGIC):].partition(b"\n")
        return TimingCache(version.decode(), entries)

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.version != FakeTRT.__version__ and not ignore_mismatch:
            _log_error(self.logger, f"IBuilderConfig::setTimingCache: the timing cache was created by TensorRT "
                                    f"{cache.version} (device or version mismatch)")
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache

    def set_calibration_profile(self, profile):
        self.calibration_profile = profile


class Builder:
    fail = False  # True: the next builds log an error and return None

    def __init__(self, logger):
        self.logger = logger
        FakeTRT.loggers.append(logger)

    def create_network(self, flags):
        self.network = Network(flags)
        return self.network

    def create_builder_config(self):
        return Config(self.logger)

    def create_optimization_profile(self):
        return Profile()

    def _refusal(self, network, config) -> str | None:
        """Why the build fails before any tactic runs (None: it goes on)."""
        if network.strongly_typed and config.flags & PRECISION_FLAGS:
            return (f"Error Code 4: API Usage Error (precision flags {sorted(config.flags & PRECISION_FLAGS)} are not "
                    "allowed on a strongly typed network)")
        dynamic = [t for t in network.inputs if any(d == -1 for d in t.shape)]
        if dynamic and not config.profiles:
            return f"Error Code 4: API Usage Error (Network has dynamic inputs ({dynamic[0].name}) but no profile)"
        for index, profile in enumerate(config.profiles):
            for t in network.inputs:
                if t.name not in profile.shapes:
                    return f"Error Code 4: API Usage Error ({t.name}: no dimensions in optimization profile {index})"
                for dims in profile.shapes[t.name]:
                    if len(dims) != len(t.shape) or any(f != -1 and f != d for f, d in zip(t.shape, dims)):
                        return (f"Error Code 4: API Usage Error ({t.name}: profile {index} dims {dims} do not match "
                                f"the network's {t.shape})")
        return None

    def _calibrate(self, config) -> None:
        """IInt8Calibrator's protocol: batch size, a cached table, else every batch, then the table is written."""
        calibrator = config.int8_calibrator
        batch = calibrator.get_batch_size()
        if not isinstance(batch, int) or batch < 1:
            raise TypeError(f"get_batch_size() returned {batch!r}; TensorRT expects a positive int")
        config.calibrated = []
        cached = calibrator.read_calibration_cache()
        config.used_cached_table = bool(cached)
        if cached:
            return
        names = list(config.calibration_profile.shapes)
        while (pointers := calibrator.get_batch(names)) is not None:
            config.calibrated.append(pointers)
        calibrator.write_calibration_cache(b"TRT-CALIBRATION-TABLE:" + str(len(config.calibrated)).encode())

    def build_serialized_network(self, network, config):
        config.network_flags = network.flags
        FakeTRT.builds.append(config)
        refusal = self._refusal(network, config)
        if refusal:
            _log_error(self.logger, refusal)
            return None
        if "INT8" in config.flags and not network.strongly_typed:
            self._calibrate(config)
        if Builder.fail:
            _log_error(self.logger, "Skipping tactic: out of memory")
            return None
        if config.cache is not None:
            config.cache.entries += b"+timings"
        return fake_plan(flags=config.flags, inputs=[(t.name, t.dtype, t.shape) for t in network.inputs],
                         outputs=[(t.name, t.dtype, t.shape) for t in network.outputs],
                         profiles=[p.shapes for p in config.profiles])


def fake_plan(version=FAKE_TENSORRT_VERSION, flags=(), inputs=None, outputs=None, profiles=None) -> bytes:
    """A serialized fake engine: the TensorRT version, build flags, IO tensors and profiles (None: a text encoder
    over `FakeRuntime.profiles`)."""
    return PLAN_MAGIC + json.dumps({"version": version, "flags": sorted(flags), "inputs": inputs,
                                    "outputs": outputs, "profiles": profiles}).encode()


def plan_flags(blob: bytes) -> list[str]:
    return json.loads(bytes(blob)[len(PLAN_MAGIC):])["flags"]


# --- running ------------------------------------------------------------------------------------------------------

TEXT_ENCODER_IO = ([("input_ids", "int64", (-1, -1)), ("attention_mask", "int64", (-1, -1))],
                   [("text_embedding", "float32", (-1, 2))])


class _Range:
    def __init__(self, lo, opt, hi):
        self.min, self.opt, self.max = tuple(lo), tuple(opt), tuple(hi)

    def contains(self, shape):
        return len(shape) == len(self.min) and all(a <= d <= b for a, d, b in zip(self.min, shape, self.max))


class _EngineProfile:
    def __init__(self, shapes):
        self.shapes = {n: _Range(*r) for n, r in shapes.items()}

    def ranges(self):
        return self.shapes


class FakeEngine:
    """An engine with the network's inputs and outputs (a text encoder by default); each output row is
    (sum of the first input's row, profile index), padded with zeros to the output's width.

    `dtypes` overrides tensor types (e.g. a bfloat16 output); `no_context` makes create_execution_context return
    None, as TensorRT does when the context's memory cannot be allocated."""

    dtypes: dict = {}
    no_context = False

    def __init__(self, profiles, inputs=None, outputs=None):
        self.profiles = [p if hasattr(p, "ranges") else _EngineProfile(p) for p in profiles]
        self.num_optimization_profiles = len(self.profiles)
        inputs, outputs = (inputs, outputs) if inputs is not None else TEXT_ENCODER_IO
        self.io = {n: (t, tuple(d), "INPUT") for n, t, d in inputs}
        self.io |= {n: (t, tuple(d), "OUTPUT") for n, t, d in outputs}
        self.names = list(self.io)
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.io[name][2]

    def get_tensor_dtype(self, name):
        return FakeEngine.dtypes.get(name, self.io[name][0])

    def get_tensor_shape(self, name):
        return self.io[name][1]

    def get_tensor_profile_shape(self, name, index):
        r = self.profiles[index].ranges()[name]
        return [r.min, r.opt, r.max]

    def create_execution_context(self):
        return None if FakeEngine.no_context else FakeContext(self)


class FakeContext:
    """Fails where TensorRT does: a shape outside the profile (False), a `refused` profile switch (RuntimeError, as
    the Python binding raises), a tensor without an address and every execution while `fail_execution` is set
    (False from execute_async_v3), each with the reason logged."""

    calls: list = []  # (profile, rows, inner dims of the first input) of every execute_async_v3, on the stream
    refused: set = set()  # profile indices set_optimization_profile_async refuses
    fail_execution = False
    executions = 0

    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}
        self.logger = FakeRuntime.last_logger
        self.inputs = [n for n in engine.names if engine.get_tensor_mode(n) == "INPUT"]
        self.outputs = [n for n in engine.names if n not in self.inputs]

    def set_optimization_profile_async(self, index, stream):
        if index in FakeContext.refused:
            _log_error(self.logger, f"setOptimizationProfileAsync: profile {index} is in use by another context")
            raise RuntimeError("Error in set optimization profile async.")
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        r = self.engine.profiles[self.profile].ranges()[name]
        if not r.contains(tuple(shape)):
            _log_error(self.logger, f"{name}: dimensions {tuple(shape)} outside profile {self.profile}")
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        # TensorRT infers an output dim the graph leaves symbolic from the network; the fake has no network to run
        # and takes 1 (its values are stand-ins anyway).
        rows = self.shapes[self.inputs[0]][0]
        return (rows, *(d if d >= 0 else 1 for d in self.engine.get_tensor_shape(name)[1:]))

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        FakeContext.executions += 1
        missing = [n for n in self.engine.names if n not in self.addresses]
        if missing:  # IExecutionContext::enqueueV3 checks every IO tensor's address first
            _log_error(self.logger, f"IExecutionContext::enqueueV3: Error Code 3: API Usage Error (Parameter check "
                                    f"failed, condition: tensor {missing[0]!r} has no address set)")
            return False
        if FakeContext.fail_execution:
            _log_error(self.logger, f"enqueue failed: illegal memory access (execution {FakeContext.executions})")
            return False
        first = self.inputs[0]
        shape, itype = self.shapes[first], np.dtype(FakeTRT.nptype(self.engine.get_tensor_dtype(first)))
        profile, addresses = self.profile, dict(self.addresses)
        outputs = {n: (self.get_tensor_shape(n), self.engine.get_tensor_dtype(n)) for n in self.outputs}

        def run():  # on the stream: reads what the copies before it put on the device
            size = int(np.prod(shape))
            values = np.frombuffer(bytes(FakeCudart.memory[addresses[first]][:size * itype.itemsize]), itype)
            sums = values.reshape(shape[0], -1).sum(1).astype(np.float32)
            for name, (out_shape, dtype) in outputs.items():
                width = int(np.prod(out_shape[1:]))
                out = np.zeros((shape[0], width), np.float32)
                out[:, 0] = sums
                if width > 1:
                    out[:, 1] = profile
                if dtype == "bfloat16":  # the upper half of each float32
                    out = (out.view(np.uint32) >> 16).astype(np.uint16)
                FakeCudart.memory[addresses[name]][:out.nbytes] = out.tobytes()
            FakeContext.calls.append((profile, shape[0], shape[1] if len(shape) > 1 else None))

        FakeCudart.enqueue(stream, run)
        return True


def _runs_on(built: str, here: str) -> bool:
    """A version-compatible plan built with `built` runs on `here`: the same major and not older, or the next major
    (TensorRT's "Version Compatibility" docs)."""
    b, h = [tuple(int(x) for x in v.split(".")[:3]) for v in (built, here)]
    return h >= b and h[0] - b[0] in (0, 1)


class FakeRuntime:
    """Deserializes what `fake_plan` serializes, refusing what TensorRT refuses (logged, None returned): bytes that
    are not a plan, a plan of another TensorRT version, a version-compatible plan without engine_host_code_allowed
    or on a TensorRT it does not run on. A plan without its own IO is a text encoder over `FakeRuntime.profiles`."""

    profiles: tuple = ()
    last_logger = None

    def __init__(self, logger):
        self.logger, self.engine_host_code_allowed = logger, False
        FakeTRT.loggers.append(logger)
        FakeRuntime.last_logger = logger

    def deserialize_cuda_engine(self, blob):
        blob = bytes(blob)
        if not blob.startswith(PLAN_MAGIC):
            _log_error(self.logger, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                                    "assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)")
            return None
        plan = json.loads(blob[len(PLAN_MAGIC):])
        here, built = FakeTRT.__version__, plan["version"]
        if "VERSION_COMPATIBLE" in plan["flags"]:
            if not self.engine_host_code_allowed:
                _log_error(self.logger, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (the plan is "
                                        "version compatible and holds host code; set engine_host_code_allowed)")
                return None
            if not _runs_on(built, here):
                _log_error(self.logger, f"Serialization: version-compatible plan of TensorRT {built} cannot run on "
                                        f"{here}")
                return None
        elif built != here:
            _log_error(self.logger, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                                    f"assertion stdVersionRead == kSERIALIZATION_VERSION failed.Version tag does not "
                                    f"match. Note: Current Version: {here}, Serialized Engine Version: {built})")
            return None
        if plan["inputs"] is None:
            return FakeEngine(FakeRuntime.profiles)
        return FakeEngine(plan["profiles"], plan["inputs"], plan["outputs"])


FakeTRT.Builder, FakeTRT.OnnxParser, FakeTRT.Runtime = Builder, Parser, FakeRuntime


def install_tensorrt(monkeypatch) -> types.ModuleType:
    """Put the fake `tensorrt` into sys.modules (undone by `monkeypatch`), with nothing recorded yet."""
    module = types.ModuleType("tensorrt")
    for name in dir(FakeTRT):
        if not name.startswith("__") or name == "__version__":
            setattr(module, name, getattr(FakeTRT, name))
    FakeTRT.builds.clear()
    FakeTRT.loggers.clear()
    monkeypatch.setattr(Builder, "fail", False)
    for name, value in (("calls", []), ("refused", set()), ("fail_execution", False), ("executions", 0)):
        monkeypatch.setattr(FakeContext, name, value)
    monkeypatch.setattr(FakeEngine, "dtypes", {})
    monkeypatch.setattr(FakeEngine, "no_context", False)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module
