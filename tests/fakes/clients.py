"""Fake tritonclient gRPC clients (sync and aio) and a fake clock for the ranking-client unit tests."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor, triton_to_np_dtype

from fusionrank.contract.spec import Modality
from fusionrank.contract.tensors import CLICK_PROBABILITY, ITEM_INPUT, MODALITY_WEIGHTS, USER_HISTORY


class FakeClock:
    """A clock that moves only when a test moves it (`clock.now += seconds`)."""

    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _decode(inputs) -> dict[str, np.ndarray]:
    out = {}
    for t in inputs:
        raw = t._get_content()
        if raw is None:  # sent through shared memory: only the shape is known here
            out[t.name()] = np.zeros(t.shape(), dtype=np.int64)
        elif t.datatype() == "BYTES":
            out[t.name()] = deserialize_bytes_tensor(raw).reshape(t.shape())
        else:
            out[t.name()] = np.frombuffer(raw, dtype=triton_to_np_dtype(t.datatype())).reshape(t.shape())
    return out


class _Result:
    def __init__(self, outputs):
        self.outputs = outputs

    def as_numpy(self, name):
        return self.outputs.get(name)


class FakeTriton:
    """A tritonclient stand-in: scores each candidate as int(title) / 1000; `failures` are raised first, in order."""

    def __init__(self, url: str, log: list, failures=(), ready=True, delay=0.0):
        self.url, self.log, self.failures, self.ready, self.delay = url, log, list(failures), ready, delay
        self.closed = False
        self.answered = 0
        self.requests: list[dict[str, np.ndarray]] = []  # every request's decoded inputs

    def _answer(self, model, inputs, client_timeout):
        arrays = _decode(inputs)
        self.requests.append(arrays)
        self.log.append((self.url, len(arrays[USER_HISTORY]), client_timeout))
        if self.failures:
            raise self.failures.pop(0)
        titles = arrays[ITEM_INPUT[Modality.TEXT]][:, 0]
        scores = np.array([[int(t) / 1000.0] for t in titles], dtype=np.float32)
        weights = np.tile(np.array([[0.5, 0.3, 0.2]], dtype=np.float32), (len(titles), 1))
        self.answered += 1
        return _Result({CLICK_PROBABILITY: scores, MODALITY_WEIGHTS: weights})

    def async_infer(self, model, inputs, callback, client_timeout=None, **_):
        def answer():
            try:
                result = self._answer(model, inputs, client_timeout)
            except InferenceServerException as exc:
                callback(result=None, error=exc)
            else:
                callback(result=result, error=None)

        if self.delay:
            threading.Timer(self.delay, answer).start()
        else:
            answer()

    def is_server_ready(self, client_timeout=None):
        return self.ready

    def is_model_ready(self, model, client_timeout=None):
        return self.ready

    def close(self):
        self.closed = True


class FakeAsyncTriton(FakeTriton):
    async def infer(self, model, inputs, client_timeout=None, **_):
        await asyncio.sleep(self.delay)
        return self._answer(model, inputs, client_timeout)

    async def is_server_ready(self, client_timeout=None):
        return self.ready

    async def is_model_ready(self, model, client_timeout=None):
        return self.ready

    async def close(self):
        self.closed = True
