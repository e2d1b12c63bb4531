"""CUDA memory through cuda-python (`cuda.bindings.runtime`): device buffers for engine tensors, pinned host buffers
to stage them, and asynchronous copies on a stream. Importing this module never imports cuda-python; `cudart()` does.

Copies between host and device go through page-locked (pinned) host memory with `cudaMemcpyAsync` on the engine's
own stream, so the copies and `execute_async_v3` are ordered on one stream and the caller synchronises once; a copy
from pageable numpy memory would first be staged by the driver, and a plain `cudaMemcpy` runs on the legacy default
stream, which synchronises with every other stream of the device.
"""

from __future__ import annotations

import ctypes

import numpy as np

from export.node.trt_api import EngineBuildError


def cudart():
    """cuda-python's CUDA runtime module, or EngineBuildError saying what to install."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6 layout
        except ImportError as exc:
            raise EngineBuildError("cuda-python is not installed; pip install '.[gpu]'") from exc
    return runtime


def cuda_runtime_version() -> str | None:
    """The CUDA runtime version cuda-python links (e.g. '12.8'), or None without cuda-python or on a CUDA error."""
    try:
        runtime = cudart()
    except EngineBuildError:
        return None
    err, version = runtime.cudaRuntimeGetVersion()
    if int(err) != 0:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"


def check_cuda(result, what: str):
    """Unpack a cuda-python `(err, *values)` result, raising EngineBuildError on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineBuildError(f"CUDA error in {what}: {err}")
    return values[0] if len(values) == 1 else (values or None)


def cuda_error(result, what: str) -> str | None:
    """The CUDA error of a cuda-python result as text (for clean-up paths that must go on), or None."""
    err = result[0] if isinstance(result, tuple) else result
    return None if int(err) == 0 else f"{what}: {err}"


class _Allocations:
    """Grow-only allocations keyed by tensor name, released together by `close()`."""

    def __init__(self, allocate, free, what: str):
        self.cudart = cudart()
        self._allocate, self._free, self._what = allocate, free, what
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)

    def get(self, name: str, nbytes: int) -> int:
        """A pointer for `name` with room for at least `nbytes` (reallocated only when it must grow)."""
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes or not ptr:
            if ptr:
                del self.buffers[name]
                check_cuda(self._free(ptr), f"{self._what} free")
            ptr = int(check_cuda(self._allocate(max(nbytes, 1)), f"{self._what} allocation of {nbytes} bytes"))
            self.buffers[name] = (ptr, max(nbytes, 1))
        return ptr

    def close(self) -> list[str]:
        """Free every allocation; the CUDA errors met (all are attempted), empty when none."""
        errors = [cuda_error(self._free(ptr), f"{self._what} free of {name!r}") for name, (ptr, _) in
                  self.buffers.items()]
        self.buffers.clear()
        return [e for e in errors if e]


class DeviceBuffers(_Allocations):
    """Device allocations keyed by tensor name."""

    def __init__(self):
        runtime = cudart()
        super().__init__(runtime.cudaMalloc, runtime.cudaFree, "cudaMalloc")

    def upload_blocking(self, name: str, array: np.ndarray) -> int:
        """Copy `array` to the device buffer of `name` before returning (the INT8 calibrator must hand TensorRT
        device memory that already holds the batch); returns its pointer."""
        array = np.ascontiguousarray(array)
        ptr = self.get(name, array.nbytes)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        check_cuda(self.cudart.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, kind), "cudaMemcpy H2D")
        return ptr


class PinnedHostBuffers(_Allocations):
    """Page-locked host allocations keyed by tensor name, seen as numpy arrays."""

    def __init__(self):
        runtime = cudart()
        super().__init__(runtime.cudaMallocHost, runtime.cudaFreeHost, "cudaMallocHost")

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A numpy array over the pinned buffer of `name` (valid until the next call for `name` or close)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        ptr = self.get(name, nbytes)
        raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr)
        return np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)


def copy_async(runtime, dst: int, src: int, nbytes: int, to_device: bool, stream) -> None:
    """`cudaMemcpyAsync` of `nbytes` on `stream` (host memory must be pinned and stay alive until it completes)."""
    kind = (runtime.cudaMemcpyKind.cudaMemcpyHostToDevice if to_device
            else runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost)
    check_cuda(runtime.cudaMemcpyAsync(dst, src, nbytes, kind, stream),
               "cudaMemcpyAsync " + ("H2D" if to_device else "D2H"))
