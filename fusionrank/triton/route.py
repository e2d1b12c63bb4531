"""The route callers use (`serving.route`): its Python-backend class, a thin shell over
`fusionrank.route.stages.RankingRoute`, and its config."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fusionrank.contract.names import encoder_name
from fusionrank.contract.paths import tokenizer_dir
from fusionrank.contract.spec import PipelineSpec, ServingProfile, from_dict
from fusionrank.contract.tensors import DEADLINE_PARAMETER, PRIORITY_PARAMETER, request_arrays
from fusionrank.preprocess.samples import warmup_samples
from fusionrank.request.validation import RequestPreprocessor
from fusionrank.route.cache import LOCAL_CACHE_ENV, EmbeddingCache
from fusionrank.route.item_keys import MEMBER_FILES, encoder_identities
from fusionrank.route.members import MemberCallError, RouteError, Status
from fusionrank.route.metrics import CacheMetrics, ResponseMetrics
from fusionrank.route.stages import RankingRoute, RouteRequest
from fusionrank.triton._batched import lower_priority, model_args, pb_utils, request_inputs, send_final
from fusionrank.triton._config import Configs, TritonUnit, add_instances, base_config, gpu_batching, spec_parameter
from fusionrank.triton.exported import served_file

if TYPE_CHECKING:  # imported inside the config functions: keeps gRPC out of the Triton stubs
    from tritonclient.grpc import model_config_pb2 as mc

# Triton's messages when a model cannot take a request (the server is stopping, the model is not loaded). The Python
# backend reports a BLS call it could not submit as "Model X - Error when running inference: <Triton's message>"
# without Triton's status code, so these are recognised by text (Triton 2.51).
_UNAVAILABLE_MESSAGES = ("server not ready", "server is stopping", "is not ready", "unknown model",
                         "has no available versions", "stopped accepting new inference requests",
                         "exceeds maximum queue size", "request timeout expired")
# The stub's GIL hand-over interval (Python's default: 5 ms): a decoding thread in Python code holds the GIL that
# long before the event loop, answering refusals and cached requests, gets it back.
GIL_SWITCH_S = 0.001


def _parameters(request) -> dict:
    try:
        parameters = json.loads(request.parameters() or "{}")
    except (AttributeError, ValueError, TypeError):
        return {}
    return parameters if isinstance(parameters, dict) else {}


def request_level(request, default: int, levels: int) -> int:
    """The Triton priority level the caller sent (`PRIORITY_PARAMETER`), else `default`; one outside 1..`levels` is
    the lowest, as Triton treats it."""
    level = _parameters(request).get(PRIORITY_PARAMETER)
    if not isinstance(level, int) or isinstance(level, bool) or level < 1:
        return default
    return min(level, levels)


def request_deadline(request, now: float) -> float | None:
    """The monotonic time past which the caller of a Triton request no longer waits: the caller's absolute deadline
    (`DEADLINE_PARAMETER`, which counts the time the request already waited in Triton's queue) where it sent one,
    else its `timeout` (microseconds; 0: none) counted from now. Triton already refused it if it expired queued."""
    timeout_us = request.timeout()
    deadline = now + timeout_us / 1e6 if timeout_us else None
    sent = _parameters(request).get(DEADLINE_PARAMETER)
    if isinstance(sent, int) and sent > 0:
        absolute = now + (sent / 1e6 - time.time())
        deadline = absolute if deadline is None else min(deadline, absolute)
    return deadline


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
    # Set by TritonServer when it started the server-wide tier; a route whose spec opts out keeps its own LRU.
    local = os.environ.get(LOCAL_CACHE_ENV) if settings.server_wide else None
    cache = EmbeddingCache.from_spec(settings, identities, dims, pb.Logger.log_error, local_url=local)
    where = f"server-wide {local}" if local else f"in-process {settings.lru_bytes} bytes"
    pb.Logger.log_info(f"route: embedding cache: {where}, shared tier "
                       f"{settings.redis_url or 'none'}; encoders " + ", ".join(
                           f"{i.model} v{i.version} ({i.digest})" for i in identities.values()))
    return cache, CacheMetrics(pb, *labels, spec.modalities.enabled)


class RouteModel:
    """The route callers use (`serving.route`): a thin shell over `fusionrank.route.stages.RankingRoute`, with its
    embedding cache (`fusionrank.route.cache`) and its metrics (`fusionrank.route.metrics`).

    Async `execute` on the stub's event loop: it returns at once and the requests are served by a task of that loop,
    whose member calls (`pb_utils.InferenceRequest.async_exec`) run concurrently with other executes' (see
    `execute`)."""

    def initialize(self, args):
        pb = pb_utils()
        sys.setswitchinterval(GIL_SWITCH_S)
        config, _, params = model_args(args)
        spec = from_dict(json.loads(params["spec"]))
        # The tokenizer export writes for `preprocess` (a folder of the same repository).
        preparer = RequestPreprocessor(spec, tokenizer_dir=tokenizer_dir(Path(args["model_repository"]).parent))
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        name = args.get("model_name") or config["name"]
        labels = (name, args.get("model_instance_name", name))
        self.cache, self.metrics = _route_cache(pb, spec, args, params, labels)
        self.responses = ResponseMetrics(pb, *labels)
        admission = spec.serving.admission
        self.levels = (admission.level(admission.default_priority), len(admission.priorities))
        self.pending: set[asyncio.Task] = set()  # requests still being served after their execute returned
        self.pool = ThreadPoolExecutor(spec.serving.admission.decode_threads, thread_name_prefix="decode",
                                       initializer=lower_priority)
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
        pb = pb_utils()
        # The member's queue refuses the call once the callers' deadline has passed (`allow_timeout_override`).
        timeout = {} if deadline is None else {"timeout": max(1, int((deadline - time.monotonic()) * 1e6))}
        # TensorRT members (the gpu profile) answer in GPU memory, where `as_numpy()` raises "Tensor is stored in GPU
        # and cannot be converted to NumPy" (server#3944, #6137): ask Triton to hand every output over in CPU memory.
        request = pb.InferenceRequest(model_name=model, inputs=[pb.Tensor(n, a) for n, a in inputs.items()],
                                      requested_output_names=list(outputs),
                                      preferred_memory=pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0), **timeout)
        response = await request.async_exec()
        if response.has_error():
            error = response.error()
            raise MemberCallError(model, error.message(), member_status(pb, error.code(), error.message()))
        # Copied: the arrays outlive the response whose buffers they view.
        return {n: np.array(pb.get_output_tensor_by_name(response, n).as_numpy()) for n in outputs}

    async def execute(self, requests):
        """Takes the requests and returns at once (None): each is answered through its response sender as soon as its
        result is known (Triton 2.51 allows one final response per request in a non-decoupled model), by a task on
        the stub's event loop, which outlives this call. Triton hands this instance its next batch meanwhile, so
        a request the cache answers whole never waits for another's decoding; the route's gate
        (`fusionrank.route.shedding.DecodeGate`), not Triton's queue, bounds the work in flight."""
        pb = pb_utils()
        now = time.monotonic()
        senders = [r.get_response_sender() for r in requests]
        # Copied: the work outlives execute. Cancellation is asked of the sender, which outlives the request.
        plain = [RouteRequest(request_inputs(pb, r, self.input_names, copy=True), s.is_cancelled,
                              request_deadline(r, now), request_level(r, *self.levels), now)
                 for r, s in zip(requests, senders)]
        task = asyncio.ensure_future(self._serve(pb, plain, senders))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return None

    async def _serve(self, pb, plain: list[RouteRequest], senders: list) -> None:
        codes: dict[int, int | None] = {}

        def answer(i: int, result) -> None:
            if isinstance(result, RouteError):
                codes[i] = self.codes[result.status]
                response = pb.InferenceResponse(output_tensors=[], error=pb.TritonError(result.message, codes[i]))
            else:
                codes[i] = None
                response = pb.InferenceResponse(output_tensors=[pb.Tensor(n, result[n]) for n in self.output_names])
            # Counted before it leaves: a caller that reads the metrics once answered finds its request in them.
            self._publish(pb, [codes[i]])
            send_final(pb, senders[i], response, "route", i)

        try:
            await self.route.rank(plain, answer)
        except Exception:  # ours: every request still unanswered gets INTERNAL, never silence
            pb.Logger.log_error(f"route: execute failed:\n{traceback.format_exc()}")
            for i in range(len(plain)):
                if i not in codes:
                    answer(i, RouteError(Status.INTERNAL, "route: internal error (see server log)"))

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
        # Dropped while the stub still talks to the server: a metric family freed at the stub's exit, after its
        # shared memory is gone, crashed the stub (SIGSEGV in Metric::SaveToSharedMemory from ~MetricFamily).
        self.metrics = self.responses = None


def route_config(spec: PipelineSpec, member_files: dict[str, str],
                 profile: ServingProfile = ServingProfile.CPU) -> mc.ModelConfig:
    """A BLS Python model (`fusionrank.route.stages`) with the contract's inputs and outputs, its own dynamic batcher
    and instance count from the spec. `member_files` (encoder -> the file it serves under this profile) lets the
    route's embedding cache key on the served models (`fusionrank.route.item_keys`).

    No `model_warmup`: its warm-up would call members that may not be loaded yet (Triton loads models in parallel);
    the members are warmed themselves and the route warms its in-process preprocessing in `initialize`."""
    from tritonclient.grpc import model_config_pb2 as mc  # here, not at the top: keeps gRPC out of the Triton stubs
    config = base_config(spec, spec.serving.route)
    config.backend = "python"
    add_instances(config, spec, mc.ModelInstanceGroup.KIND_CPU)
    if profile is ServingProfile.GPU:  # its members answer in under a millisecond: a short wait (serving.gpu)
        gpu_batching(config, spec)
    config.parameters["role"].string_value = "route"
    config.parameters["spec"].string_value = spec_parameter(spec)
    config.parameters[MEMBER_FILES].string_value = json.dumps(member_files, sort_keys=True)
    return config


def configs(spec: PipelineSpec, model: str, rendered: Mapping[str, Configs]) -> Configs:
    """Per profile: the file each encoder serves under it (from the encoders' configs in `rendered`)."""
    encoders = [encoder_name(m) for m in spec.modalities.enabled]
    return {profile: route_config(spec, {m: served_file(rendered[m][profile]) for m in encoders}, profile)
            for profile in ServingProfile}


UNIT = TritonUnit(lambda spec: (spec.serving.route,), configs, __name__, RouteModel.__name__)
