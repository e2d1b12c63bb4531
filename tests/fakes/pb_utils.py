"""A fake `triton_python_backend_utils` made of small dataclasses, for Python-backend models tested without a server.

`install(monkeypatch, members, gpu_members)` puts it in `sys.modules`; `members` maps a model name to a function that
answers a BLS call (`dict of input arrays -> dict of output arrays`, or a `FakeMemberError`), and records every call
in `calls` as (model, rows) and its `preferred_memory` in `memories`.

GPU-resident members (`gpu_members`, e.g. the gpu profile's TensorRT engines) answer as the Python backend does
(python_backend `src/pb_tensor.cc`, `src/request_executor.cc`): their output tensors stay in GPU memory unless the
request asked for `preferred_memory=PreferredMemory(TRITONSERVER_MEMORY_CPU, 0)`; `as_numpy()` of a GPU tensor raises
"Tensor is stored in GPU and cannot be converted to NumPy.", `is_cpu()` says where it is, `to_dlpack()` hands a
capsule of the tensor's device.
"""

from __future__ import annotations

import json
import sys
import threading
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

# TRITONSERVER_MemoryType (tritonserver.h): the values pb_utils exposes as TRITONSERVER_MEMORY_*.
MEMORY_CPU, MEMORY_CPU_PINNED, MEMORY_GPU = 0, 1, 2


class FakeTritonModelException(Exception):
    """pb_utils.TritonModelException: what the stub raises for a PythonBackendException."""


@dataclass(frozen=True)
class FakePreferredMemory:
    """pb_utils.PreferredMemory(preferred_memory_type, preferred_device_id=0)."""

    preferred_memory_type: int
    preferred_device_id: int = 0


@dataclass
class _GpuCapsule:
    """What `to_dlpack()` of a GPU tensor hands over: a DLPack capsule on a CUDA device (kDLCUDA = 2)."""

    array: np.ndarray
    device: tuple[int, int] = (2, 0)


@dataclass
class FakeTensor:
    name: str
    array: np.ndarray
    gpu: bool = False  # in GPU memory: as the output of a GPU-resident member read without CPU preferred_memory

    def as_numpy(self):
        if self.gpu:
            raise FakeTritonModelException("Tensor is stored in GPU and cannot be converted to NumPy.")
        return self.array

    def is_cpu(self) -> bool:
        return not self.gpu

    def to_dlpack(self):
        return _GpuCapsule(self.array) if self.gpu else self.array.__dlpack__()


@dataclass
class FakeError:
    message: str
    code: int = 0
    INVALID_ARG = 3
    INTERNAL = 13
    NOT_FOUND = 5
    UNAVAILABLE = 14
    CANCELLED = 1

    def __str__(self):
        return self.message


@dataclass
class FakeResponse:
    output_tensors: list = field(default_factory=list)
    error: FakeError | None = None


@dataclass
class FakeRequest:
    inputs: dict
    cancelled: bool = False
    timeout_us: int = 0  # the caller's timeout as Triton passes it on (0: none)
    params: dict = field(default_factory=dict)  # the request's parameters (`parameters()` answers them as JSON)
    sent: list = field(default_factory=list)  # responses sent through its response sender
    final: bool = False

    def is_cancelled(self) -> bool:
        return self.cancelled

    def timeout(self) -> int:
        return self.timeout_us

    def parameters(self) -> str:
        return json.dumps(self.params)

    def get_response_sender(self):
        return FakeResponseSender(self)


RESPONSE_COMPLETE_FINAL = 1


class FakeResponseSender:
    """Like the Python backend's sender in a non-decoupled model: one response, sent with the final flag."""

    def __init__(self, request: FakeRequest):
        self.request = request

    def is_cancelled(self) -> bool:
        return self.request.cancelled

    def send(self, response=None, flags: int = 0) -> None:
        if self.request.final or (self.request.sent and response is not None):
            raise RuntimeError("Unable to send response. Non-decoupled model cannot send more than one response.")
        if flags != RESPONSE_COMPLETE_FINAL or response is None:
            raise RuntimeError("Unable to send response. Non-decoupled model must send one response with the final "
                               "flag.")
        self.request.sent.append(response)
        self.request.final = True


def route_responses(model, requests: list[FakeRequest]) -> list:
    """Run the route shell's async execute: it returns None at once and a task of the loop answers every request
    through its sender."""
    import asyncio

    async def run():
        returned = await model.execute(requests)
        await asyncio.gather(*model.pending)
        return returned

    if asyncio.run(run()) is not None:
        raise AssertionError("the route answers through response senders; execute must return None")
    if not all(r.final and len(r.sent) == 1 for r in requests):
        raise AssertionError(f"one final response per request, got {[len(r.sent) for r in requests]}")
    return [r.sent[0] for r in requests]


class FakeLogger:
    errors: list = []
    infos: list = []

    @classmethod
    def log_error(cls, msg):
        cls.errors.append(msg)

    @classmethod
    def log_info(cls, msg):
        cls.infos.append(msg)


@dataclass
class FakeMetric:
    family: FakeMetricFamily
    labels: dict
    value: float = 0.0
    updating: threading.Lock = field(default_factory=threading.Lock)

    def increment(self, value: float) -> None:
        # Triton 2.51 crashed (SIGSEGV in Metric::Increment) when two threads updated one metric at once: refused.
        if not self.updating.acquire(blocking=False):
            raise RuntimeError("two threads updated one metric at once (tritonserver 2.51 crashes)")
        try:
            if self.family.kind == FakeMetricFamily.COUNTER and value < 0:
                raise ValueError("a counter cannot decrease")
            self.value += value
        finally:
            self.updating.release()

    def set(self, value: float) -> None:
        if self.family.kind != FakeMetricFamily.GAUGE:
            raise ValueError("set() is for gauges only")
        self.value = value


@dataclass
class FakeMetricFamily:
    """pb_utils.MetricFamily: every family made is kept in `families` by name, as Triton keeps them."""

    name: str
    description: str
    kind: int
    COUNTER = 0
    GAUGE = 1
    families = {}

    def __post_init__(self):
        self.metrics: list[FakeMetric] = []
        FakeMetricFamily.families[self.name] = self

    def Metric(self, labels=None):
        metric = FakeMetric(self, dict(labels or {}))
        self.metrics.append(metric)
        return metric

    def total(self, **labels) -> float:
        """Sum over the metrics whose labels include `labels`."""
        return sum(m.value for m in self.metrics if labels.items() <= m.labels.items())


@dataclass
class FakeMemberError:
    """What `response.error()` of a failed BLS call gives: methods, as in pb_utils."""

    text: str
    status: int = FakeError.INTERNAL

    def message(self) -> str:
        return self.text

    def code(self) -> int:
        return self.status


@dataclass
class FakeBlsResponse:
    outputs: dict
    failure: FakeMemberError | None = None
    on_gpu: bool = False  # its output tensors are in GPU memory

    def has_error(self) -> bool:
        return self.failure is not None

    def error(self) -> FakeMemberError | None:
        return self.failure


def install(monkeypatch, members: dict[str, Callable] | None = None,
            gpu_members: Iterable[str] = ()) -> types.SimpleNamespace:
    """The fake module, installed as `triton_python_backend_utils` for the test; `gpu_members` answer in GPU memory."""
    FakeMetricFamily.families = {}
    module = types.SimpleNamespace(
        Tensor=FakeTensor, InferenceResponse=FakeResponse, TritonError=FakeError, Logger=FakeLogger,
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=RESPONSE_COMPLETE_FINAL,
        MetricFamily=FakeMetricFamily, PreferredMemory=FakePreferredMemory,
        TritonModelException=FakeTritonModelException, TRITONSERVER_MEMORY_CPU=MEMORY_CPU,
        TRITONSERVER_MEMORY_GPU=MEMORY_GPU,
        members=dict(members or {}), gpu_members=set(gpu_members), calls=[], memories=[], timeouts=[],
        # Like the Python backend: None for an input the request does not carry (an optional one left out).
        get_input_tensor_by_name=lambda request, name: (FakeTensor(name, request.inputs[name])
                                                        if name in request.inputs else None),
        get_output_tensor_by_name=lambda response, name: FakeTensor(name, response.outputs[name], response.on_gpu))

    @dataclass
    class InferenceRequest:
        model_name: str
        inputs: list
        requested_output_names: list
        timeout: int = 0  # microseconds, as `pb_utils.InferenceRequest(timeout=...)` takes it; 0: none
        preferred_memory: FakePreferredMemory | None = None  # None: the backend's default, the member's own memory

        async def async_exec(self):
            arrays = {t.name: t.array for t in self.inputs}
            module.calls.append((self.model_name, len(next(iter(arrays.values())))))
            module.timeouts.append(self.timeout)
            module.memories.append(self.preferred_memory)
            answer = module.members[self.model_name](arrays)
            if isinstance(answer, FakeMemberError):
                return FakeBlsResponse({}, answer)
            wants_cpu = self.preferred_memory is not None and \
                self.preferred_memory.preferred_memory_type in (MEMORY_CPU, MEMORY_CPU_PINNED)
            on_gpu = self.model_name in module.gpu_members and not wants_cpu
            return FakeBlsResponse({n: answer[n] for n in self.requested_output_names}, on_gpu=on_gpu)

    module.InferenceRequest = InferenceRequest
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module
