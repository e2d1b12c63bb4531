"""The Python backend's side shared by every Triton model class here: reading a request's inputs and the model's
`initialize` arguments, the per-request loop of the members that batch across requests (`BatchedModel`), and the
running of several of their batches at once in one instance (`ConcurrentBatches`)."""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fusionrank.contract.errors import PreprocessError
from fusionrank.contract.names import BATCH_COMPUTE_METRIC


def request_inputs(pb, request, names, copy: bool = False) -> dict:
    """A request's input arrays by name; an optional input the caller left out is None. `copy`: arrays of their own,
    for work that outlives `execute` (Triton frees a request's input buffers when execute returns)."""
    tensors = {n: pb.get_input_tensor_by_name(request, n) for n in names}
    return {n: None if t is None else np.array(t.as_numpy()) if copy else t.as_numpy() for n, t in tensors.items()}


def send_final(pb, sender, response, who: str, index: int) -> None:
    """`response` as its request's one final response, through `sender`; one that cannot leave (its caller went) is
    logged and never stops the others."""
    try:
        sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception:
        pb.Logger.log_error(f"{who}: sending response {index} failed:\n{traceback.format_exc()}")


# Batch work (decoding and encoding never-seen items) runs at this niceness, Linux's per-thread CPU priority, so the
# route's event loop (admitting, refusing, answering cached requests) and the ranker every request needs are not
# queued behind it on a busy core; with nothing else to run, batch work still gets every idle cycle.
BATCH_WORK_NICENESS = 10


def lower_priority() -> None:
    """Run the calling thread (and the threads it starts later) at `BATCH_WORK_NICENESS`; idempotent. Where that is
    not permitted the thread keeps its priority: the work is bounded elsewhere, only less promptly pre-empted."""
    thread = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, thread) < BATCH_WORK_NICENESS:
            os.setpriority(os.PRIO_PROCESS, thread, BATCH_WORK_NICENESS)
    except OSError:
        pass


M_ARENA_MAX = -8  # glibc's mallopt(3) parameter


def one_malloc_arena() -> None:
    """glibc gives each thread that allocates its own malloc arena, and an arena keeps the peak of what its thread
    ran; workers running concurrent batches held a peak each. One arena for the process (before the workers start)
    keeps one. Without glibc, nothing changes."""
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


def pb_utils():
    # Only importable inside the Python backend's stub process; tests install a fake module under this name.
    return sys.modules.get("triton_python_backend_utils") or __import__("triton_python_backend_utils")


def model_args(args) -> tuple[dict, Path, dict[str, str]]:
    """The parsed model config, the version folder and the string parameters of a model's `initialize` args."""
    config = json.loads(args["model_config"])
    version_dir = Path(args["model_repository"]) / args["model_version"]
    return config, version_dir, {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


class ConcurrentBatches:
    """A model instance running up to `slots` batches at once on worker threads sharing what its setup built (an
    ONNX Runtime session runs concurrent calls, each releasing the GIL). Its execute hands each batch over and
    answers through response senders (Triton >= 24.06 allows it in a non-decoupled model), and returns to Triton only
    with a slot free: Triton's dynamic batcher goes on filling the next batch while every slot is busy, instead of
    handing over one request at a time (the eager batching Triton's docs warn of). Triton's compute and request
    durations stop at the hand-off, so the batches' time is counted in `BATCH_COMPUTE_METRIC`."""

    def __init__(self, pb, model: str, args, slots: int):
        one_malloc_arena()  # before the workers start
        self.free = threading.BoundedSemaphore(slots)
        self.workers = ThreadPoolExecutor(slots, thread_name_prefix=model)
        # Kept: a MetricFamily object that is garbage-collected deletes the family and its metrics in the server.
        self.family = pb.MetricFamily(name=BATCH_COMPUTE_METRIC, kind=pb.MetricFamily.COUNTER,
                                      description="Microseconds a member's concurrent batches computed")
        self.compute_us = self.family.Metric(labels={"model": model,
                                                     "instance": args.get("model_instance_name", model)})
        # One update at a time: the stub rewrites a metric's shared memory with the GIL released, and two workers
        # incrementing at once handed Triton a freed metric (SIGSEGV in triton::core::Metric::Increment, 2.51).
        self.metric_lock = threading.Lock()

    def hand_over(self, work, *args) -> None:
        """Run `work(*args)` on a worker; back once a slot is free for the next batch."""
        self.free.acquire()
        self.workers.submit(self._run, work, args)
        self.free.acquire()
        self.free.release()

    def _run(self, work, args) -> None:
        try:
            work(*args)
        finally:
            self.free.release()

    def count(self, computed_us: float) -> None:
        with self.metric_lock:
            self.compute_us.increment(computed_us)

    def close(self) -> None:
        self.workers.shutdown(wait=True)
        self.compute_us = self.family = None  # freed while the stub still talks to the server (the route's finalize)


class BatchedModel:
    """Shared request loop: per-request prepare, one batched run, per-request split and response."""

    per_request = False  # True: all the work is in prepare() and its outputs are the response as they are

    def initialize(self, args):
        pb = pb_utils()
        self.model_config, self.version_dir, self.params = model_args(args)
        self.name = self.model_config["name"]
        self.output_names = [o["name"] for o in self.model_config["output"]]
        self.input_names = [i["name"] for i in self.model_config["input"]]
        self.logger = pb.Logger
        concurrent = int(self.params.get("concurrent_batches", "1"))
        self.concurrent = ConcurrentBatches(pb, self.name, args, concurrent) if concurrent > 1 else None
        self.setup()

    def setup(self) -> None:
        raise NotImplementedError

    def prepare(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate and transform one request's inputs; raise PreprocessError on bad input."""
        return inputs

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def check(self, outputs: dict[str, np.ndarray]) -> None:
        """Check one request's outputs before they leave; raise PreprocessError to answer it INVALID_ARG."""

    def execute(self, requests):
        pb = pb_utils()
        if self.concurrent is None:
            return self._responses(pb, [request_inputs(pb, r, self.input_names) for r in requests])
        senders = [r.get_response_sender() for r in requests]
        inputs = [request_inputs(pb, r, self.input_names, copy=True) for r in requests]
        self.concurrent.hand_over(self._answer, pb, inputs, senders)
        return None

    def _answer(self, pb, inputs: list[dict], senders: list) -> None:
        """A concurrent batch, on a worker thread: one final response per request through its sender, whatever
        fails, then its compute time counted."""
        began = time.perf_counter()
        try:
            responses = self._responses(pb, inputs)
        except Exception:  # every request still gets its answer
            self.logger.log_error(f"{self.name}: batch failed:\n{traceback.format_exc()}")
            responses = [pb.InferenceResponse(output_tensors=[], error=self._internal(pb)) for _ in senders]
        computed_us = (time.perf_counter() - began) * 1e6
        for i, (sender, response) in enumerate(zip(senders, responses)):
            send_final(pb, sender, response, self.name, i)
        try:
            self.concurrent.count(computed_us)
        except Exception:  # metrics are for operators: a failed update never fails the requests
            self.logger.log_error(f"{self.name}: counting a batch's time failed:\n{traceback.format_exc()}")

    def _responses(self, pb, inputs: list[dict]) -> list:
        """One response per request's inputs, in order: its outputs, or the error that request alone gets."""
        prepared, errors = [], {}
        for i, arrays in enumerate(inputs):
            try:
                prepared.append((i, self.prepare(arrays)))
            except PreprocessError as exc:  # RequestValidationError included
                errors[i] = pb.TritonError(str(exc), pb.TritonError.INVALID_ARG)
            except Exception:  # any other failure is ours: log it, answer INTERNAL, keep serving
                self.logger.log_error(f"{self.name}: request {i} failed:\n{traceback.format_exc()}")
                errors[i] = self._internal(pb)
        outputs_by_request = self._run_grouped(prepared, errors)
        responses = []
        for i in range(len(inputs)):
            if i in errors:
                responses.append(pb.InferenceResponse(output_tensors=[], error=errors[i]))
            else:
                tensors = [pb.Tensor(n, outputs_by_request[i][n]) for n in self.output_names]
                responses.append(pb.InferenceResponse(output_tensors=tensors))
        return responses

    def _run_grouped(self, prepared, errors) -> dict[int, dict[str, np.ndarray]]:
        """Concatenate rows of requests whose shapes agree, run each group once, split back by row counts."""
        if self.per_request:
            return dict(prepared)
        pb = pb_utils()
        groups: dict[tuple, list[tuple[int, dict]]] = {}
        for i, arrays in prepared:
            key = tuple((n, a.shape[1:]) for n, a in sorted(arrays.items()))
            groups.setdefault(key, []).append((i, arrays))
        results = {}
        for members in groups.values():
            names = list(members[0][1])
            batch = {n: np.concatenate([arrays[n] for _, arrays in members]) for n in names}
            counts = [len(arrays[names[0]]) for _, arrays in members]
            try:
                out = self.run(batch)
            except Exception:  # a failed batch is ours: log it, answer INTERNAL to its requests
                self.logger.log_error(f"{self.name}: batch failed:\n{traceback.format_exc()}")
                for i, _ in members:
                    errors[i] = self._internal(pb)
                continue
            offsets = np.cumsum([0, *counts])
            for (i, _), start, stop in zip(members, offsets[:-1], offsets[1:]):
                part = {n: out[n][start:stop] for n in self.output_names}
                if any(len(v) != stop - start for v in part.values()):
                    errors[i] = pb.TritonError(f"{self.name}: output rows do not match input rows",
                                               pb.TritonError.INTERNAL)
                    continue
                try:
                    self.check(part)
                except PreprocessError as exc:
                    errors[i] = pb.TritonError(str(exc), pb.TritonError.INVALID_ARG)
                    continue
                results[i] = part
        return results

    def _internal(self, pb):
        """The error a request gets for a failure of ours (logged beside it)."""
        return pb.TritonError(f"{self.name}: internal error (see server log)", pb.TritonError.INTERNAL)

    def finalize(self):
        if self.concurrent is not None:
            self.concurrent.close()
