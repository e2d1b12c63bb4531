"""Triton Python-backend models. Each rendered `model.py` imports one of these classes as `TritonPythonModel`.

Members (`PreprocessModel`, `OnnxRuntimeModel`, `PoolModel`): `execute` batches across requests: every request's
rows are validated on their own (a bad request gets its own INVALID_ARG error, its neighbours in the dynamic batch
are unaffected), the good rows are concatenated, run once and split back, and the row count of every response is
checked against its request (`preprocess` and `pool_embeddings` work per request: their outputs' row counts are
not their inputs'). The route (`RouteModel`) is a shell over `fusionrank.route.stages`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fusionrank.contract.errors import PreprocessError
from fusionrank.contract.names import encoder_name
from fusionrank.contract.paths import tokenizer_dir
from fusionrank.contract.spec import Modality, from_dict
from fusionrank.contract.tensors import (
    ITEM_INPUT,
    ITEM_VIDEO,
    MODALITY_MASK,
    embedding_name,
    owner_name,
    request_arrays,
    rows_name,
)
from fusionrank.preprocess.samples import warmup_samples
from fusionrank.request.candidates import pool_rows
from fusionrank.request.validation import RequestPreprocessor, non_finite_row
from fusionrank.route.cache import EmbeddingCache
from fusionrank.route.item_keys import MEMBER_FILES, encoder_identities
from fusionrank.route.metrics import CacheMetrics, ResponseMetrics
from fusionrank.route.stages import MemberCallError, RankingRoute, RouteError, RouteRequest, Status


def _inputs(pb, request, names) -> dict:
    """A request's input arrays by name; an optional input the caller left out is None."""
    tensors = {n: pb.get_input_tensor_by_name(request, n) for n in names}
    return {n: None if t is None else t.as_numpy() for n, t in tensors.items()}


def _pb():
    # Only importable inside the Python backend's stub process; tests install a fake module under this name.
    return sys.modules.get("triton_python_backend_utils") or __import__("triton_python_backend_utils")


def _model_args(args) -> tuple[dict, Path, dict[str, str]]:
    """The parsed model config, the version folder and the string parameters of a model's `initialize` args."""
    config = json.loads(args["model_config"])
    version_dir = Path(args["model_repository"]) / args["model_version"]
    return config, version_dir, {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


class _BatchedModel:
    """Shared request loop: per-request prepare, one batched run, per-request split and response."""

    per_request = False  # True: all the work is in prepare() and its outputs are the response as they are

    def initialize(self, args):
        pb = _pb()
        self.model_config, self.version_dir, self.params = _model_args(args)
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
        pb = _pb()
        prepared, errors = [], {}
        for i, request in enumerate(requests):
            try:
                prepared.append((i, self.prepare(_inputs(pb, request, self.input_names))))
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


class PreprocessModel(_BatchedModel):
    per_request = True  # its outputs hold one row per encoder row of each modality, not one per candidate

    """preprocess: one request's raw payloads and history -> every encoder's input tensors and the checked history.

    Every input of a request is validated here, in the ensemble's first step, so a bad request fails before any
    other step of it runs (see `fusionrank.contract.spec.member_models`)."""

    def setup(self):
        self.spec = from_dict(json.loads(self.params["spec"]))
        self.preprocess = RequestPreprocessor(self.spec, tokenizer_dir=self.version_dir / "tokenizer")

    def prepare(self, inputs):
        # Per request (text is padded to the request's own bucket), so it runs here, not in run().
        prepared = self.preprocess(inputs, placeholders=True)
        for m, owners in prepared.owners.items():
            # The ensemble sends a modality's rows to its encoder in one call: a request with more (its videos'
            # frames) than the encoder's batch is refused here, not by Triton after the preprocessing.
            limit = self.spec.serving.batching(encoder_name(m)).max_batch_size
            if len(owners) > limit:
                raise PreprocessError(ITEM_VIDEO if m is Modality.IMAGE else ITEM_INPUT[m],
                                      f"the request needs {len(owners)} {m.value} encoder rows (stills and "
                                      f"{self.spec.modalities.video.frames} frames per video) and the reference "
                                      f"ensemble sends at most {limit} in one call; send fewer videos per request "
                                      f"or use the route ({self.spec.serving.route})")
        return prepared.flat()


class PoolModel(_BatchedModel):
    """pool_embeddings (the reference ensemble's step after the encoders): each encoder's rows -> one embedding per
    candidate in candidate order (a video's frames and still mean-pooled, zeros where absent; placeholder rows,
    owner -1, dropped). The same `pool_rows` as the route and the PyTorch reference."""

    per_request = True  # no batching: inputs hold the encoded rows, outputs one row per candidate

    def setup(self):
        self.modalities = [m for m in Modality if embedding_name(m) in self.output_names]

    def prepare(self, inputs):
        rows = len(inputs[MODALITY_MASK])
        out = {}
        for m in self.modalities:
            values, owners = inputs[rows_name(m)], inputs[owner_name(m)].reshape(-1)
            keep = owners >= 0
            out[embedding_name(m)] = pool_rows(values[keep], owners[keep], rows)
        return out


class OnnxRuntimeModel(_BatchedModel):
    """Encoders and ranker in the CPU profile: one ONNX Runtime session over the graph `onnx_file` names."""

    def setup(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # No CPU memory arena: the arena keeps the peak of the largest batch ever run (the warm-up's) for the
        # process's life, about 200 MiB per encoder on the CI spec, and saved no CPU time (docs/capacity.md).
        options.enable_cpu_mem_arena = False
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

    def check(self, outputs):
        # The ranker's outputs are the reference ensemble's: no NaN or infinity may leave (a last guard; the GPU
        # profile's TensorRT ranker has none, the route checks in every profile).
        if self.params.get("check_finite_outputs") != "true":
            return
        for name, array in outputs.items():
            row = non_finite_row(array)
            if row is not None:
                self.logger.log_error(f"{self.name}: non-finite {name} at row {row} from finite inputs")
                raise PreprocessError(f"{name}[{row}]", f"{self.name} produced a non-finite value for candidate "
                                                        f"{row}; it cannot be scored")


# Triton's messages when a model cannot take a request (the server is stopping, the model is not loaded). The Python
# backend reports a BLS call it could not submit as "Model X - Error when running inference: <Triton's message>"
# without Triton's status code, so these are recognised by text (Triton 2.51).
_UNAVAILABLE_MESSAGES = ("server not ready", "server is stopping", "is not ready", "unknown model",
                         "has no available versions", "stopped accepting new inference requests",
                         "exceeds maximum queue size", "request timeout expired")
# Decoding threads run at this niceness (Linux: per thread), so a cached request's few milliseconds of CPU in
# another route instance are not queued behind a flood's decoding on a busy core.
DECODE_NICENESS = 10


def _lower_priority() -> None:
    try:
        os.nice(DECODE_NICENESS)
    except OSError:  # not permitted here: the pool still bounds the decoding, at normal priority
        pass


def request_deadline(request, now: float) -> float | None:
    """The monotonic time past which the caller of a Triton request no longer waits: its `timeout` (microseconds,
    the caller's own or none; 0: none) counted from now. Triton already refused it if it expired while queued."""
    timeout_us = request.timeout()
    return now + timeout_us / 1e6 if timeout_us else None


def member_status(pb, code: int, message: str) -> Status:
    """How the route answers a member's failed BLS call: INVALID_ARG names the caller's own row (the ranker's finite
    guard), UNAVAILABLE lets the caller retry on another server, anything else is INTERNAL."""
    if code == pb.TritonError.INVALID_ARG:
        return Status.INVALID_ARG
    if code in (pb.TritonError.UNAVAILABLE, pb.TritonError.NOT_FOUND) or any(
            m in message.lower() for m in _UNAVAILABLE_MESSAGES):
        return Status.UNAVAILABLE
    return Status.INTERNAL


def _route_cache(pb, spec, args, params: dict[str, str], labels: tuple[str, str]
                 ) -> tuple[EmbeddingCache | None, CacheMetrics | None]:
    """The route instance's embedding cache (None when the spec disables it) and its metrics."""
    settings = spec.serving.cache
    if not settings.enabled:
        return None, None
    repo = Path(args["model_repository"]).parent
    identities = encoder_identities(spec, repo, json.loads(params[MEMBER_FILES]))
    dims = {m: spec.modalities.embedding_dim(m) for m in spec.modalities.enabled}
    cache = EmbeddingCache.from_spec(settings, identities, dims, pb.Logger.log_error)
    pb.Logger.log_info(f"route: embedding cache: in-process {settings.lru_bytes} bytes, shared tier "
                       f"{settings.redis_url or 'none'}; encoders " + ", ".join(
                           f"{i.model} v{i.version} ({i.digest})" for i in identities.values()))
    return cache, CacheMetrics(pb, *labels, spec.modalities.enabled)


class RouteModel:
    """The route callers use (`serving.route`): a thin shell over `fusionrank.route.stages.RankingRoute`, with its
    embedding cache (`fusionrank.route.cache`) and its metrics (`fusionrank.route.metrics`).

    Async `execute`: the member calls of one execute (`pb_utils.InferenceRequest.async_exec`) run concurrently. Triton
    runs one execute per instance at a time for a model that is not decoupled, so the spec's instance count sets how
    many batches of requests are in flight."""

    def initialize(self, args):
        pb = _pb()
        config, _, params = _model_args(args)
        spec = from_dict(json.loads(params["spec"]))
        # The tokenizer export writes for `preprocess` (a folder of the same repository).
        preparer = RequestPreprocessor(spec, tokenizer_dir=tokenizer_dir(Path(args["model_repository"]).parent))
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        name = args.get("model_name") or config["name"]
        labels = (name, args.get("model_instance_name", name))
        self.cache, self.metrics = _route_cache(pb, spec, args, params, labels)
        self.responses = ResponseMetrics(pb, *labels)
        self.pool = ThreadPoolExecutor(spec.serving.admission.decode_threads, thread_name_prefix="decode",
                                       initializer=_lower_priority)
        self.route = RankingRoute(spec, preparer, self._infer, pb.Logger.log_error, cache=self.cache,
                                  decode=self._decode)
        self.codes = {Status.INVALID_ARG: pb.TritonError.INVALID_ARG, Status.CANCELLED: pb.TritonError.CANCELLED,
                      Status.UNAVAILABLE: pb.TritonError.UNAVAILABLE, Status.INTERNAL: pb.TritonError.INTERNAL}
        # Members are warmed by Triton; the in-process preprocessing is warmed here (first decode, tokenizer).
        samples = warmup_samples(spec)
        length = spec.ranker.history.length
        preparer(request_arrays({m: [samples[m]] for m in spec.modalities.enabled}, np.zeros((1, length), np.int64)))

    async def _decode(self, work) -> None:
        await asyncio.get_running_loop().run_in_executor(self.pool, work)

    async def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...],
                     deadline: float | None = None) -> dict:
        pb = _pb()
        # The member's queue refuses the call once the callers' deadline has passed (`allow_timeout_override`).
        timeout = {} if deadline is None else {"timeout": max(1, int((deadline - time.monotonic()) * 1e6))}
        request = pb.InferenceRequest(model_name=model, inputs=[pb.Tensor(n, a) for n, a in inputs.items()],
                                      requested_output_names=list(outputs), **timeout)
        response = await request.async_exec()
        if response.has_error():
            error = response.error()
            raise MemberCallError(model, error.message(), member_status(pb, error.code(), error.message()))
        # Copied: the arrays outlive the response whose buffers they view.
        return {n: np.array(pb.get_output_tensor_by_name(response, n).as_numpy()) for n in outputs}

    async def execute(self, requests):
        """Answers each request through its response sender as soon as its result is known (Triton 2.51 allows one
        final response per request in a non-decoupled model), so a request the cache answered whole leaves while
        its batch-mates still decode; returns None, as the Python backend then requires."""
        pb = _pb()
        now = time.monotonic()
        plain = [RouteRequest(_inputs(pb, r, self.input_names), r.is_cancelled, request_deadline(r, now))
                 for r in requests]
        senders = [r.get_response_sender() for r in requests]
        codes: dict[int, int | None] = {}

        def answer(i: int, result) -> None:
            if isinstance(result, RouteError):
                codes[i] = self.codes[result.status]
                response = pb.InferenceResponse(output_tensors=[], error=pb.TritonError(result.message, codes[i]))
            else:
                codes[i] = None
                response = pb.InferenceResponse(output_tensors=[pb.Tensor(n, result[n]) for n in self.output_names])
            try:
                senders[i].send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception:  # one response that cannot leave (its caller went) never stops the others
                pb.Logger.log_error(f"route: sending response {i} failed:\n{traceback.format_exc()}")

        try:
            await self.route.rank(plain, answer)
        except Exception:  # ours: every request still unanswered gets INTERNAL, never silence
            pb.Logger.log_error(f"route: execute failed:\n{traceback.format_exc()}")
            for i in range(len(requests)):
                if i not in codes:
                    answer(i, RouteError(Status.INTERNAL, "route: internal error (see server log)"))
        self._publish(pb, list(codes.values()))
        return None

    def _publish(self, pb, codes: list[int | None]) -> None:
        """The execute's response codes and the cache's counters to Triton's metrics."""
        updates = [("response", lambda: self.responses.count(codes))]
        if self.metrics is not None:
            updates.append(("cache", lambda: self.metrics.publish(self.cache.stats())))
        for what, update in updates:
            try:
                update()
            except Exception:  # metrics are for operators: a failed update never fails the requests
                pb.Logger.log_error(f"route: publishing {what} metrics failed:\n{traceback.format_exc()}")

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.cache is not None:
            self.cache.close()
