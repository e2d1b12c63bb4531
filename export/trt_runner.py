"""Runs a built TensorRT plan on numpy inputs (parity and latency on GPU nodes; `pip install '.[gpu]'`).

Written against the TensorRT 10.13 Python API pinned in the `[gpu]` extra: `Runtime.deserialize_cuda_engine`,
`IExecutionContext.set_optimization_profile_async`, `set_input_shape`, `set_tensor_address`, `execute_async_v3`.
Device memory and the stream come from cuda-python (`export.cuda_memory`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.cuda_memory import DeviceBuffers, check_cuda, cudart
from export.trt_api import EngineBuildError, make_logger, require_tensorrt


class TensorRTRunner:
    """Runs one `model.plan` on numpy inputs: picks the profile that fits, splits batches over its max batch."""

    def __init__(self, plan: Path, allow_host_code: bool = False):
        trt = require_tensorrt()
        self.trt, self.cudart = trt, cudart()
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        if allow_host_code:
            # Version-compatible plans carry the lean runtime (host code); only load plans built here.
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"cannot load {plan}: " + ("; ".join(self.logger.errors) or "unknown error"))
        self.context = self.engine.create_execution_context()
        self.stream = check_cuda(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
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
        check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return {n: self.device.download(n, a).astype(np.float32, copy=False) if a.dtype == np.float16 else
                self.device.download(n, a) for n, a in results.items()}

    def close(self) -> None:
        """Free the device buffers and destroy the stream."""
        self.device.close()
        self.cudart.cudaStreamDestroy(self.stream)
