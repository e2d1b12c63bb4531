"""A fake cuda-python runtime (`cuda.bindings.runtime`) over host memory, for the runner and calibrator unit tests.

Device memory is a dict of bytearrays; pinned host memory is real process memory (ctypes buffers), so numpy arrays
over it behave as over `cudaMallocHost`. Streams are queues: `cudaMemcpyAsync` and the fake engine's
`execute_async_v3` enqueue work that runs only at `cudaStreamSynchronize`, so reading results before synchronising
gets stale data, as on a GPU; `cudaMemcpy` (legacy default stream) first drains every stream, then copies. Every call
is recorded in `calls` as (function, stream or None); `fail` names functions that return a CUDA error.
"""

from __future__ import annotations

import ctypes
import sys
import types
from collections import defaultdict

CUDA_ERROR = 2  # cudaErrorMemoryAllocation, what a failing call returns here


class FakeCudart:
    """The fake runtime's functions and state (copied onto a module by `install_cuda`)."""

    memory: dict[int, bytearray] = {}  # device pointer -> bytes
    host: dict[int, ctypes.Array] = {}  # pinned host pointer -> its buffer (kept alive)
    queues: dict[int, list] = defaultdict(list)
    calls: list[tuple[str, object]] = []
    fail: set[str] = set()
    allocations = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    @classmethod
    def _record(cls, name: str, stream=None) -> bool:
        cls.calls.append((name, stream))
        return name in cls.fail

    @classmethod
    def cudaMalloc(cls, n):
        if cls._record("cudaMalloc"):
            return CUDA_ERROR, 0
        cls.allocations += 1
        ptr = 0x1000 * cls.allocations
        cls.memory[ptr] = bytearray(n)
        return 0, ptr

    @classmethod
    def cudaFree(cls, ptr):
        cls.memory.pop(ptr)
        return (CUDA_ERROR,) if cls._record("cudaFree") else (0,)

    @classmethod
    def cudaMallocHost(cls, n):
        if cls._record("cudaMallocHost"):
            return CUDA_ERROR, 0
        buffer = (ctypes.c_uint8 * n)()
        ptr = ctypes.addressof(buffer)
        cls.host[ptr] = buffer
        return 0, ptr

    @classmethod
    def cudaFreeHost(cls, ptr):
        cls.host.pop(ptr)
        return (CUDA_ERROR,) if cls._record("cudaFreeHost") else (0,)

    @classmethod
    def _copy(cls, dst, src, n, kind):
        if kind == cls.cudaMemcpyKind.cudaMemcpyHostToDevice:
            cls.memory[dst][:n] = ctypes.string_at(src, n)
        else:
            ctypes.memmove(dst, bytes(cls.memory[src][:n]), n)

    @classmethod
    def cudaMemcpy(cls, dst, src, n, kind):
        cls._record("cudaMemcpy")
        for stream in list(cls.queues):
            cls.run_queue(stream)
        cls._copy(dst, src, n, kind)
        return (0,)

    @classmethod
    def cudaMemcpyAsync(cls, dst, src, n, kind, stream):
        if cls._record("cudaMemcpyAsync", int(stream)):
            return (CUDA_ERROR,)
        cls.queues[int(stream)].append(lambda: cls._copy(dst, src, n, kind))
        return (0,)

    @classmethod
    def enqueue(cls, stream, work) -> None:
        """Work a fake engine launches on `stream`."""
        cls.queues[int(stream)].append(work)

    @classmethod
    def run_queue(cls, stream) -> None:
        queue = cls.queues.pop(int(stream), [])
        for work in queue:
            work()

    @classmethod
    def cudaStreamCreate(cls):
        cls._record("cudaStreamCreate")
        return 0, 99

    @classmethod
    def cudaStreamSynchronize(cls, stream):
        cls._record("cudaStreamSynchronize", int(stream))
        cls.run_queue(stream)
        return (0,)

    @classmethod
    def cudaStreamDestroy(cls, stream):
        return (CUDA_ERROR,) if cls._record("cudaStreamDestroy", int(stream)) else (0,)

    @classmethod
    def cudaRuntimeGetVersion(cls):
        return 0, 12080


def install_cuda(monkeypatch) -> type[FakeCudart]:
    """Put the fake `cuda.bindings.runtime` into sys.modules (undone by `monkeypatch`), with no memory allocated."""
    for name, value in (("memory", {}), ("host", {}), ("queues", defaultdict(list)), ("calls", []), ("fail", set())):
        monkeypatch.setattr(FakeCudart, name, value)
    cuda, bindings, runtime = (types.ModuleType(n) for n in ("cuda", "cuda.bindings", "cuda.bindings.runtime"))
    for name in dir(FakeCudart):
        if name.startswith("cuda"):
            setattr(runtime, name, getattr(FakeCudart, name))
    bindings.runtime, cuda.bindings = runtime, bindings
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    return FakeCudart
