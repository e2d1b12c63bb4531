"""The Python backend's side shared by every Triton model class here: reading a request's inputs and the model's
`initialize` arguments, and the per-request loop of the members that batch across requests (`BatchedModel`)."""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from pathlib import Path

import numpy as np

from fusionrank.contract.errors import PreprocessError


def request_inputs(pb, request, names) -> dict:
    """A request's input arrays by name; an optional input the caller left out is None."""
    tensors = {n: pb.get_input_tensor_by_name(request, n) for n in names}
    return {n: None if t is None else t.as_numpy() for n, t in tensors.items()}


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


def pb_utils():
    # Only importable inside the Python backend's stub process; tests install a fake module under this name.
    return sys.modules.get("triton_python_backend_utils") or __import__("triton_python_backend_utils")


def model_args(args) -> tuple[dict, Path, dict[str, str]]:
    """The parsed model config, the version folder and the string parameters of a model's `initialize` args."""
    config = json.loads(args["model_config"])
    version_dir = Path(args["model_repository"]) / args["model_version"]
    return config, version_dir, {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


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
        prepared, errors = [], {}
        for i, request in enumerate(requests):
            try:
                prepared.append((i, self.prepare(request_inputs(pb, request, self.input_names))))
            except PreprocessError as exc:  # RequestValidationError included
                errors[i] = pb.TritonError(str(exc), pb.TritonError.INVALID_ARG)
            except Exception:  # any other failure is ours: log it, answer INTERNAL, keep serving
                self.logger.log_error(f"{self.name}: request {i} failed:\n{traceback.format_exc()}")
                errors[i] = pb.TritonError(f"{self.name}: internal error (see server log)", pb.TritonError.INTERNAL)
        outputs_by_request = self._run_grouped(prepared, errors)
        responses = []
        for i in range(len(requests)):
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
                    errors[i] = pb.TritonError(f"{self.name}: internal error (see server log)",
                                               pb.TritonError.INTERNAL)
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

    def finalize(self):
        pass
