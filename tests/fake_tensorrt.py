"""Fake `tensorrt` and cuda-python modules for unit tests of the engine builder and runner (no GPU here).

TensorRT needs a GPU, so these fakes stand in for the documented API surface (names checked against the
tensorrt_cu12_bindings 10.13.3.9 wheel): they record what `export.onnx2trt` and `export.trt_runner` ask for, so the
wiring of profiles, precision, timing cache, error reporting and the runner's profile choice and chunking is tested
without one; tests/test_gpu.py runs the real thing on a GPU node. `install_tensorrt` / `install_cuda` put them into
`sys.modules` (the `fake_trt` / `fake_cuda` fixtures in conftest.py) and reset what they recorded.
"""

from __future__ import annotations

import ctypes
import json
import sys
import types
from pathlib import Path

import numpy as np

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

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    int64, float32 = "int64", "float32"
    builds: list = []  # every builder config passed to build_serialized_network, in order

    @staticmethod
    def nptype(dtype):
        return np.dtype(dtype).type


# --- building -----------------------------------------------------------------------------------------------------


class Tensor:
    def __init__(self, name):
        self.name = name


class Network:
    def __init__(self):
        self.inputs = []

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

    def create_network(self, flags):
        return Network()

    def create_builder_config(self):
        return Config()

    def create_optimization_profile(self):
        return Profile()

    def build_serialized_network(self, network, config):
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


class FakeCudart:
    """cuda-python's runtime module over host memory: enough for the runner's malloc/memcpy/stream calls."""

    memory: dict[int, bytearray] = {}
    allocations = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    @classmethod
    def cudaMalloc(cls, n):
        cls.allocations += 1
        ptr = 0x1000 * cls.allocations
        cls.memory[ptr] = bytearray(n)
        return 0, ptr

    @classmethod
    def cudaFree(cls, ptr):
        cls.memory.pop(ptr)
        return (0,)

    @classmethod
    def cudaMemcpy(cls, dst, src, n, kind):
        if kind == cls.cudaMemcpyKind.cudaMemcpyHostToDevice:
            cls.memory[dst][:n] = ctypes.string_at(src, n)
        else:
            ctypes.memmove(dst, bytes(cls.memory[src][:n]), n)
        return (0,)

    @staticmethod
    def cudaStreamCreate():
        return 0, 99

    @staticmethod
    def cudaStreamSynchronize(stream):
        return (0,)

    @staticmethod
    def cudaStreamDestroy(stream):
        return (0,)


class FakeEngine:
    """A text encoder engine with the given profiles; output row = (sum of input_ids, profile index)."""

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
        return "float32" if name == "text_embedding" else "int64"

    def get_tensor_profile_shape(self, name, index):
        r = self.profiles[index].ranges()[name]
        return [r.min, r.opt, r.max]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    calls: list = []  # (profile, rows, sequence length) of every execute_async_v3

    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        r = self.engine.profiles[self.profile].ranges()[name]
        assert r.contains(tuple(shape)), f"{name} {shape} outside profile {self.profile}"
        self.shapes[name] = tuple(shape)

    def get_tensor_shape(self, name):
        return (self.shapes["input_ids"][0], 2)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        rows, seq = self.shapes["input_ids"]
        ids = np.frombuffer(bytes(FakeCudart.memory[self.addresses["input_ids"]][:rows * seq * 8]), np.int64)
        out = np.stack([ids.reshape(rows, seq).sum(1), np.full(rows, self.profile)], 1).astype(np.float32)
        FakeCudart.memory[self.addresses["text_embedding"]][:out.nbytes] = out.tobytes()
        FakeContext.calls.append((self.profile, rows, seq))
        return True


class FakeRuntime:
    """Deserializes `GARBAGE` as a failure and anything else as a FakeEngine over `FakeRuntime.profiles`."""

    profiles: tuple = ()

    def __init__(self, logger):
        self.logger, self.engine_host_code_allowed = logger, False

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
    monkeypatch.setattr(Builder, "fail", False)
    monkeypatch.setattr(FakeContext, "calls", [])
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def install_cuda(monkeypatch) -> type[FakeCudart]:
    """Put the fake `cuda.bindings.runtime` into sys.modules (undone by `monkeypatch`), with no memory allocated."""
    monkeypatch.setattr(FakeCudart, "memory", {})
    cuda, bindings, runtime = (types.ModuleType(n) for n in ("cuda", "cuda.bindings", "cuda.bindings.runtime"))
    for name in ("cudaMemcpyKind", "cudaMalloc", "cudaFree", "cudaMemcpy", "cudaStreamCreate",
                 "cudaStreamSynchronize", "cudaStreamDestroy"):
        setattr(runtime, name, getattr(FakeCudart, name))
    bindings.runtime, cuda.bindings = runtime, bindings
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    return FakeCudart
