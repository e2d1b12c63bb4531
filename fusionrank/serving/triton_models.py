"""Triton Python-backend models. Each rendered `model.py` imports one of these classes as `TritonPythonModel`.

`execute` batches across requests: every request's rows are validated on their own (a bad request gets its own
INVALID_ARG error, its neighbours in the dynamic batch are unaffected), the good rows are concatenated, run once
and split back, and the row count of every response is checked against its request.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import numpy as np

from fusionrank.errors import PreprocessError
from fusionrank.preprocess.request import RequestPreprocessor
from fusionrank.spec import from_dict


def _pb():
    # Only importable inside the Python backend's stub process; tests install a fake module under this name.
    return sys.modules.get("triton_python_backend_utils") or __import__("triton_python_backend_utils")


class _BatchedModel:
    """Shared request loop: per-request prepare, one batched run, per-request split and response."""

    def initialize(self, args):
        pb = _pb()
        self.model_config = json.loads(args["model_config"])
        self.name = self.model_config["name"]
        self.version_dir = Path(args["model_repository"]) / args["model_version"]
        self.params = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}
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

    def execute(self, requests):
        pb = _pb()
        prepared, errors = [], {}
        for i, request in enumerate(requests):
            try:
                inputs = {n: pb.get_input_tensor_by_name(request, n).as_numpy() for n in self.input_names}
                prepared.append((i, self.prepare(inputs)))
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
        pb = _pb()
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
                else:
                    results[i] = part
        return results

    def finalize(self):
        pass


class PreprocessModel(_BatchedModel):
    """preprocess: one request's raw payloads and history -> every encoder's input tensors and the checked history.

    Every input of a request is validated here, in the ensemble's first step, so a bad request fails before any
    other step of it runs (see `fusionrank.spec.member_models`)."""

    def setup(self):
        self.spec = from_dict(json.loads(self.params["spec"]))
        # Triton's max_batch_size is this route's candidate limit (the spec parameter carries no serving section).
        self.preprocess = RequestPreprocessor(self.spec, tokenizer_dir=self.version_dir / "tokenizer",
                                              max_candidates=int(self.model_config["max_batch_size"]))

    def prepare(self, inputs):
        # Per request (text is padded to the request's own bucket), so it runs here, not in run().
        return self.preprocess(inputs)

    def run(self, batch):
        return batch


class OnnxRuntimeModel(_BatchedModel):
    """Encoders and ranker in the CPU profile: one ONNX Runtime session over `1/model.onnx`."""

    def setup(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        threads = int(self.params.get("intra_op_threads", "0"))
        if threads:
            options.intra_op_num_threads = threads
        path = self.version_dir / self.params.get("onnx_file", "model.onnx")
        if not path.is_file():
            raise FileNotFoundError(f"{self.name}: {path} not found; run `fusionrank export` first")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.dtypes = {i.name: np.int64 if "int64" in i.type else np.float32 for i in self.session.get_inputs()}

    def prepare(self, inputs):
        # Triton already checked names, dtypes and shapes against the config; only the ONNX dtypes are enforced.
        return {n: np.ascontiguousarray(a, dtype=self.dtypes[n]) for n, a in inputs.items()}

    def run(self, batch):
        values = self.session.run(self.output_names, batch)
        return dict(zip(self.output_names, values))
