"""Runs a built TensorRT plan on numpy inputs (parity and latency on GPU nodes; `pip install '.[gpu]'`).

Written against the TensorRT 10.13 Python API pinned in the `[gpu]` extra: `Runtime.deserialize_cuda_engine`,
`ICudaEngine.create_execution_context` (None when out of memory), `IExecutionContext.set_optimization_profile_async`,
`set_input_shape`, `set_tensor_address` (each returns False on failure, with the reason in the log) and
`execute_async_v3`. One call is: inputs into pinned host buffers, asynchronous copies to the device, execution and
copies back, all on the runner's own stream, then one `cudaStreamSynchronize` (`export.node.cuda_memory`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.node.cuda_memory import DeviceBuffers, PinnedHostBuffers, check_cuda, copy_async, cuda_error, cudart
from export.node.trt_api import EngineBuildError, describe, process_logger, require_tensorrt
from export.node.trt_dtypes import HostType, host_type


class TensorRTRunner:
    """Runs one `model.plan` on numpy inputs: picks the profile that fits, splits batches over its max batch.

    A context manager; `close()` releases the stream, the buffers, the execution context, the engine and the runtime
    (in that order) and may be called more than once.
    """

    def __init__(self, plan: Path, allow_host_code: bool = False):
        trt = require_tensorrt()
        self.trt, self.cudart, self.plan = trt, cudart(), Path(plan)
        self.logger = process_logger(trt)
        self.stream = self.context = self.engine = self.runtime = None
        self.device, self.host = DeviceBuffers(), PinnedHostBuffers()
        try:
            self._load(allow_host_code)
        except BaseException:
            self.close()
            raise

    def _load(self, allow_host_code: bool) -> None:
        trt = self.trt
        with self.logger.capture() as errors:
            self.runtime = trt.Runtime(self.logger)
            if allow_host_code:
                # Version-compatible plans carry the lean runtime (host code); only load plans built here.
                self.runtime.engine_host_code_allowed = True
            self.engine = self.runtime.deserialize_cuda_engine(self.plan.read_bytes())
            if self.engine is None:
                raise EngineBuildError(f"cannot load {self.plan}: {describe(errors)}")
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise EngineBuildError(f"cannot create an execution context for {self.plan} (out of GPU memory?): "
                                       f"{describe(errors)}")
        self.stream = check_cuda(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = int(self.stream)  # TensorRT takes the stream as an integer handle
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.types = {n: host_type(trt, self.engine.get_tensor_dtype(n), n) for n in names}
        self.profile = 0

    def __enter__(self) -> TensorRTRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ranges(self, index: int) -> dict[str, tuple]:
        return {n: self.engine.get_tensor_profile_shape(n, index) for n in self.inputs}

    def _fits(self, index: int, shapes: dict[str, tuple[int, ...]], skip_batch: bool = False) -> bool:
        """Profile `index` takes `shapes` (with `skip_batch`, shapes without their batch dim)."""
        ranges = self._ranges(index)
        first = 1 if skip_batch else 0
        return all(all(lo <= d <= hi for lo, d, hi in zip(ranges[n][0][first:], s, ranges[n][2][first:]))
                   for n, s in shapes.items())

    def _pick(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for i in range(self.engine.num_optimization_profiles):
            if self._fits(i, shapes):
                return i
        raise EngineBuildError(f"{self.plan}: input shapes {shapes} fit no optimisation profile of the engine")

    def _rows(self, inputs: dict[str, np.ndarray]) -> int:
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise EngineBuildError(f"{self.plan}: missing input(s) {missing}; the engine takes {self.inputs}")
        rows = {n: len(inputs[n]) for n in self.inputs}
        if len(set(rows.values())) > 1:
            raise EngineBuildError(f"{self.plan}: inputs have different row counts {rows}")
        return next(iter(rows.values()))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for any number of rows (chunks of at most the chosen profile's max batch; 0 rows: empty)."""
        if self.context is None:
            raise EngineBuildError(f"{self.plan}: the runner is closed")
        rows = self._rows(inputs)
        if rows == 0:
            return self._empty_outputs()
        # Chunks as large as the largest profile that takes these rows' shape allows (an engine may have a small and
        # a large batch profile); each chunk then runs on the first profile that fits it.
        inner = {n: tuple(inputs[n].shape[1:]) for n in self.inputs}
        taking = [i for i in range(self.engine.num_optimization_profiles) if self._fits(i, inner, skip_batch=True)]
        if not taking:
            self._pick({n: (1, *s) for n, s in inner.items()})  # raises, naming the shapes
        max_batch = max(int(self._ranges(i)[self.inputs[0]][2][0]) for i in taking)
        parts = [self._run_once({n: inputs[n][s:s + max_batch] for n in self.inputs})
                 for s in range(0, rows, max_batch)]
        return {n: np.concatenate([p[n] for p in parts]) for n in self.outputs}

    def _empty_outputs(self) -> dict[str, np.ndarray]:
        out = {}
        for name in self.outputs:
            dims = tuple(self.engine.get_tensor_shape(name))[1:]
            if any(d < 0 for d in dims):
                raise EngineBuildError(f"{self.plan}: no rows given, and output {name!r} has dynamic dims {dims}")
            out[name] = np.empty((0, *dims), dtype=self.types[name].numpy_out)
        return out

    def _switch_profile(self, index: int, errors: list[str]) -> None:
        if index != self.profile:
            # The Python binding raises RuntimeError("Error in set optimization profile async.") where the C++ call
            # returns false (pyCore.cpp); an older binding returned False: both are the same failure.
            try:
                switched = self.context.set_optimization_profile_async(index, self.stream_handle)
            except RuntimeError as exc:
                errors = [*errors, str(exc)]
                switched = False
            if not switched:
                raise EngineBuildError(f"{self.plan}: switching to optimisation profile {index} failed: "
                                       f"{describe(errors)}")
            self.profile = index

    def _stage_inputs(self, inputs: dict[str, np.ndarray], errors: list[str]) -> None:
        for name in self.inputs:
            kind: HostType = self.types[name]
            array = kind.to_host(inputs[name])
            if not self.context.set_input_shape(name, array.shape):
                raise EngineBuildError(f"{self.plan}: input {name!r} shape {array.shape} refused for profile "
                                       f"{self.profile}: {describe(errors)}")
            staged = self.host.array(name, array.shape, array.dtype)
            staged[...] = array
            ptr = self.device.get(name, array.nbytes)
            copy_async(self.cudart, ptr, staged.ctypes.data, array.nbytes, True, self.stream)
            self._address(name, ptr, errors)

    def _address(self, name: str, ptr: int, errors: list[str]) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise EngineBuildError(f"{self.plan}: set_tensor_address({name!r}) failed: {describe(errors)}")

    def _run_once(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.logger.capture() as errors:
            self._switch_profile(self._pick({n: tuple(a.shape) for n, a in inputs.items()}), errors)
            self._stage_inputs(inputs, errors)
            staged = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                staged[name] = self.host.array(name, shape, self.types[name].numpy_host)
                self._address(name, self.device.get(name, staged[name].nbytes), errors)
            if not self.context.execute_async_v3(self.stream_handle):
                raise EngineBuildError(f"{self.plan}: execute_async_v3 failed: {describe(errors)}")
            for name, host in staged.items():
                copy_async(self.cudart, host.ctypes.data, self.device.buffers[name][0], host.nbytes, False,
                           self.stream)
            check_cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        # Copied out of the pinned buffers, which the next call reuses.
        return {n: self.types[n].from_host(host) for n, host in staged.items()}

    def close(self) -> None:
        """Release everything the runner holds; EngineBuildError listing the CUDA errors met (after releasing all)."""
        errors = []
        if self.stream is not None:
            errors.append(cuda_error(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize"))
            errors.append(cuda_error(self.cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy"))
            self.stream = None
        errors += self.device.close() + self.host.close()
        # Context before engine before runtime: each may only be destroyed after what was created from it.
        self.context = None
        self.engine = None
        self.runtime = None
        errors = [e for e in errors if e]
        if errors:
            raise EngineBuildError(f"{self.plan}: releasing CUDA resources failed: {'; '.join(errors)}")
