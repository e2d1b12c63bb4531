"""CUDA device memory through cuda-python (`cuda.bindings.runtime`): what the TensorRT runner and the INT8
calibrator copy their numpy arrays into. Importing this module never imports cuda-python; `cudart()` does."""

from __future__ import annotations

import numpy as np

from export.trt_api import EngineBuildError


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


def check_cuda(result, what: str):
    """Unpack a cuda-python `(err, *values)` result, raising EngineBuildError on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineBuildError(f"CUDA error in {what}: {err}")
    return values[0] if len(values) == 1 else (values or None)


class DeviceBuffers:
    """Grow-only device allocations keyed by tensor name, freed on close()."""

    def __init__(self):
        self.cudart = cudart()
        self.buffers: dict[str, tuple[int, int]] = {}

    def get(self, name: str, nbytes: int) -> int:
        """A device pointer for `name` with room for at least `nbytes` (reallocated only when it must grow)."""
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                check_cuda(self.cudart.cudaFree(ptr), "cudaFree")
            ptr = int(check_cuda(self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def upload(self, name: str, array: np.ndarray) -> int:
        """Copy `array` to the device buffer of `name`; returns its pointer."""
        array = np.ascontiguousarray(array)
        ptr = self.get(name, array.nbytes)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        check_cuda(self.cudart.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, kind), "cudaMemcpy H2D")
        return ptr

    def download(self, name: str, out: np.ndarray) -> np.ndarray:
        """Copy the device buffer of `name` into `out`."""
        ptr, _ = self.buffers[name]
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check_cuda(self.cudart.cudaMemcpy(out.ctypes.data, ptr, out.nbytes, kind), "cudaMemcpy D2H")
        return out

    def close(self) -> None:
        """Free every buffer."""
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.buffers.clear()
