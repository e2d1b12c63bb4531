"""A fake `tensorrt` module for unit tests of the engine builder and runner (no GPU here).

TensorRT needs a GPU, so this fake stands in for the documented API surface (names checked against the
tensorrt_cu12_bindings 10.13.3.9 wheel): it records what `export.convert.onnx2trt` and `export.node.trt_runner` ask for
(the logger every Builder and Runtime gets, network flags, builder config), returns False / None where TensorRT does on
failure (refused shapes and profiles, no execution context), and runs the engine on the fake CUDA stream of
tests/fakes/cuda.py, so the wiring of profiles, precision, timing cache, error reporting and the runner's profile
choice, chunking and stream use is tested without one; tests/integration/test_gpu.py runs the real thing on a GPU node.
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
        FP16, INT8, VERSION_COMPATIBLE = "FP16", "INT8", "VERSION_COMPATIBLE"

    class HardwareCompatibilityLevel:
        AMPERE_PLUS = "AMPERE_PLUS"

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


class Tensor:
    def __init__(self, name):
        self.name = name


class Network:
    def __init__(self, flags=0):
        self.inputs, self.flags = [], flags

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


def parser_error() -> types.SimpleNamespace:
    """One error of the ONNX parser, with the accessors of TensorRT's `ParserError`."""
    return types.SimpleNamespace(code=lambda: "UNSUPPORTED_NODE", node=lambda: 7,
                                 desc=lambda: "no importer for op FancyOp", file=lambda: "onnxOpImporters.cpp",
                                 line=lambda: 42, func=lambda: "importFancyOp")


class Parser:
    """Parses a file reading `BROKEN` as a failure, a JSON list as the input names, anything else as real ONNX."""

    def __init__(self, network, logger):
        self.network, self.logger, self.num_errors = network, logger, 0
        FakeTRT.loggers.append(logger)

    def parse_from_file(self, path):
        blob = Path(path).read_bytes()
        if blob == b"BROKEN":
            self.num_errors = 1
            self.logger.log(FakeTRT.ILogger.Severity.ERROR, "ModelImporter: failed to import node 7")
            return False
        if blob.startswith(b"["):  # a stand-in file listing the input names
            names = json.loads(blob)
        else:  # a real exported model
            import onnx

            names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
        self.network.inputs = [Tensor(n) for n in names]
        return True

    def get_error(self, i):
        return parser_error()


class Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class TimingCache:
    def __init__(self, blob):
        self.blob = bytes(blob)

    def serialize(self):
        return self.blob + b"+timings"


class Config:
    def __init__(self):
        self.flags, self.profiles, self.pool, self.cache = set(), [], {}, None
        self.builder_optimization_level = None
        self.hardware_compatibility_level = None

    def set_memory_pool_limit(self, pool, size):
        self.pool[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob):
        return TimingCache(blob)

    def set_timing_cache(self, cache, ignore_mismatch):
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
        config = Config()
        config.logger = self.logger
        return config

    def create_optimization_profile(self):
        return Profile()

    def build_serialized_network(self, network, config):
        config.network_flags = network.flags
        FakeTRT.builds.append(config)
        if "INT8" in config.flags:  # TensorRT pulls calibration batches until the calibrator returns None
            names = list(config.calibration_profile.shapes)
            config.calibrated = []
            while (pointers := config.int8_calibrator.get_batch(names)) is not None:
                config.calibrated.append(pointers)
        if Builder.fail:
            self.logger.log(FakeTRT.ILogger.Severity.ERROR, "Skipping tactic: out of memory")
            return None
        return b"PLAN:" + ",".join(sorted(config.flags)).encode()


# --- running ------------------------------------------------------------------------------------------------------


class FakeEngine:
    """A text encoder engine with the given profiles; output row = (sum of input_ids, profile index).

    `dtypes` overrides tensor types (e.g. a bfloat16 output); `no_context` makes create_execution_context return
    None, as TensorRT does when the context's memory cannot be allocated."""

    dtypes: dict = {}
    no_context = False

    def __init__(self, profiles):
        self.profiles = profiles
        self.num_optimization_profiles = len(profiles)
        self.names = ["input_ids", "attention_mask", "text_embedding"]
        self.num_io_tensors = 3

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "OUTPUT" if name == "text_embedding" else "INPUT"

    def get_tensor_dtype(self, name):
        return FakeEngine.dtypes.get(name, "float32" if name == "text_embedding" else "int64")

    def get_tensor_shape(self, name):
        return (-1, 2) if name == "text_embedding" else (-1, -1)

    def get_tensor_profile_shape(self, name, index):
        r = self.profiles[index].ranges()[name]
        return [r.min, r.opt, r.max]

    def create_execution_context(self):
        return None if FakeEngine.no_context else FakeContext(self)


def _log_error(logger, message: str) -> None:
    logger.log(FakeTRT.ILogger.Severity.ERROR, message)


class FakeContext:
    """Returns False and logs an error where TensorRT does: a shape outside the profile, a `refused` profile, and
    every execution while `fail_execution` is set."""

    calls: list = []  # (profile, rows, sequence length) of every execute_async_v3, when it runs on the stream
    refused: set = set()  # profile indices set_optimization_profile_async refuses
    fail_execution = False
    executions = 0

    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}
        self.logger = FakeRuntime.last_logger

    def set_optimization_profile_async(self, index, stream):
        if index in FakeContext.refused:
            _log_error(self.logger, f"setOptimizationProfileAsync: profile {index} is in use by another context")
            return False
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
        return (self.shapes["input_ids"][0], 2)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        FakeContext.executions += 1
        if FakeContext.fail_execution:
            _log_error(self.logger, f"enqueue failed: illegal memory access (execution {FakeContext.executions})")
            return False
        rows, seq = self.shapes["input_ids"]
        profile, addresses, dtype = self.profile, dict(self.addresses), self.engine.get_tensor_dtype("text_embedding")

        def run():  # on the stream: reads what the copies before it put on the device
            ids = np.frombuffer(bytes(FakeCudart.memory[addresses["input_ids"]][:rows * seq * 8]), np.int64)
            out = np.stack([ids.reshape(rows, seq).sum(1), np.full(rows, profile)], 1).astype(np.float32)
            if dtype == "bfloat16":  # the upper half of each float32
                out = (out.view(np.uint32) >> 16).astype(np.uint16)
            FakeCudart.memory[addresses["text_embedding"]][:out.nbytes] = out.tobytes()
            FakeContext.calls.append((profile, rows, seq))

        FakeCudart.enqueue(stream, run)
        return True


class FakeRuntime:
    """Deserializes `GARBAGE` as a failure and anything else as a FakeEngine over `FakeRuntime.profiles`."""

    profiles: tuple = ()
    last_logger = None

    def __init__(self, logger):
        self.logger, self.engine_host_code_allowed = logger, False
        FakeTRT.loggers.append(logger)
        FakeRuntime.last_logger = logger

    def deserialize_cuda_engine(self, blob):
        if blob == b"GARBAGE":
            self.logger.log(FakeTRT.ILogger.Severity.ERROR, "Serialization assertion magicTagRead failed")
            return None
        return FakeEngine(FakeRuntime.profiles)


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
