"""The route callers use (`serving.route`): a BLS model that serves the ranking contract over the member models.

One `rank()` call serves one execute of the route model (a dynamic batch of requests), stage by stage:

1. validate each request as a whole (inputs, row counts, candidate limit, history, the presence rules of
   `modality_present` and `item_video`; nothing decoded): a bad request is answered INVALID_ARG alone, before any
   member runs for it;
2. look every present payload up in the embedding cache (`fusionrank.route.cache`, one key per payload and
   modality from `fusionrank.route.item_keys`; a candidate with a video is keyed by its still and its video,
   `fusionrank.request.candidates.image_cache_payload`): a hit skips both preprocessing and encoding of that row; an
   absent modality's row is neither looked up nor encoded (its embedding stays zeros, which the ranker's mask masks);
3. validate and preprocess the misses in process (`RequestPreprocessor.encoder_groups`): a bad payload answers its
   request INVALID_ARG naming the row, hits or not (a hit's bytes are bytes that passed the same checks, so they
   need no decoding; the request-level checks of stage 1 ran for every row);
4. answer cancelled requests CANCELLED, and requests past their deadline (the caller's Triton request timeout)
   UNAVAILABLE (over capacity), and leave them out of the next stage (checked before validating each request,
   before decoding, before encoding and before ranking); before decoding, a request with a miss whose payload
   fails a check that needs no decoding (format, declared sizes, UTF-8: the preprocessors' `header`), or whose
   misses cost more than `serving.admission.cost` (read from the same headers: `fusionrank.request.cost`), is
   answered INVALID_ARG naming the row or the budget, even when the gate would refuse it; requests the cache answered
   whole go straight to ranking (the fast path) while each other one passes the instance's deadline-aware gate
   (`fusionrank.route.shedding.DecodeGate`: a few at a time, the rest wait or are refused UNAVAILABLE at once when
   their deadline cannot hold the wait) and decodes in the route instance's bounded pool of low-priority threads;
   member calls carry the latest deadline of the requests whose rows they hold, so a member's queue refuses work
   nobody waits for;
5. encode: per modality, the missed rows of the request are concatenated (grouped by shape: text rows are
   padded to their own bucket; a video's K sampled frames are image rows of their candidate), cut at the
   encoder's max batch and sent to the encoder model through BLS, so its dynamic batcher still merges them with
   other route instances' calls; the modalities run concurrently; each candidate's rows are mean-pooled
   (`fusionrank.request.candidates.pool_rows`: frames and still); the fresh embeddings of requests that encoded cleanly
   are stored in the cache (only finite ones: nothing bad is ever cached);
6. rank all live rows through `fusion_ranker` and split the outputs back per request;
7. no NaN or infinity leaves the route: a non-finite embedding or output answers its request INVALID_ARG naming
   the candidate row.

Why a route instead of the Triton ensemble: Triton 2.51 crashes (SIGSEGV) when callers cancel requests to an ensemble
(server#7368, fixed by #7840); cancelled requests to a Python-backend model leave it alive. Member calls go through
an `Infer` callable, so this class is tested without a server (`fusionrank.triton.route.RouteModel` binds
it to `pb_utils.InferenceRequest.async_exec`).
"""

from __future__ import annotations

import asyncio
import math
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fusionrank.contract.errors import PreprocessError
from fusionrank.contract.names import RANKER, encoder_name
from fusionrank.contract.spec import Modality, PipelineSpec
from fusionrank.contract.tensors import ITEM_INPUT, MODALITY_MASK, embedding_name, model_io
from fusionrank.request.candidates import image_cache_payload, pool_rows
from fusionrank.request.cost import check_budget, request_cost
from fusionrank.request.validation import EncoderGroup, RequestPreprocessor, ValidRequest, non_finite_row
from fusionrank.route.cache import EmbeddingCache
from fusionrank.route.item_keys import PayloadKind
from fusionrank.route.members import Infer, MemberCalls, RouteError, RouteResult, Status
from fusionrank.route.shedding import DecodeGate, Slot


def _never() -> bool:
    return False


@dataclass(frozen=True)
class RouteRequest:
    inputs: Mapping[str, np.ndarray]  # the contract's input arrays, by name
    is_cancelled: Callable[[], bool] = _never
    deadline: float | None = None  # `time.monotonic()` past which nobody waits for the answer; None: no deadline
    level: int = 1  # Triton priority level of its traffic class (1 is served first): the gate's order
    arrived: float | None = None  # `time.monotonic()` when the route received it (None: unknown): a request without
    #                               a deadline of its own is admitted within the SLO's median counted from then

    def late(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


# (index of the request in the execute, its result): called once per request, as soon as its result is known.
Answer = Callable[[int, RouteResult], None]
LATE = "the request's deadline passed before its payloads were encoded: the server is over capacity; nothing more " \
       "was computed for it"


@dataclass(eq=False)
class _Flight:
    """One request on its way through the stages."""

    request: RouteRequest
    valid: ValidRequest | None = None
    keys: dict[Modality, list[str | None]] = field(default_factory=dict)  # per row, with a cache; None: absent
    misses: dict[Modality, list[int]] = field(default_factory=dict)  # rows the cache did not hold
    groups: dict[Modality, list[EncoderGroup]] = field(default_factory=dict)  # preprocessed misses, by shape
    embeddings: dict[Modality, np.ndarray] = field(default_factory=dict)
    error: RouteError | None = None
    outputs: dict[str, np.ndarray] | None = None
    answered: bool = False  # its result went to the `Answer` callback

    @property
    def rows(self) -> int:
        return len(self.valid.history)

    @property
    def work(self) -> int:
        """The candidates it decodes and encodes (its units of work at the gate)."""
        return len(set().union(*self.misses.values()))

    @property
    def all_hit(self) -> bool:
        """Every present payload came from the cache: nothing to decode or encode."""
        return not any(self.misses.values())

    def fail(self, error: RouteError) -> None:
        if self.error is None:  # the first error is the one the caller sees
            self.error = error

    def encode_rows(self, modality: Modality) -> np.ndarray:
        """The rows whose `modality` the encoder computes: the cache's misses among the rows that have it (every
        such row without a cache); the other present rows' `embeddings[modality]` come from the cache."""
        groups = self.groups.get(modality, [])
        return np.unique(np.concatenate([g.rows for g in groups])) if groups else np.zeros(0, dtype=np.int64)

    def present_rows(self, modality: Modality, index: int) -> list[int]:
        """The candidates that have `modality` (the `index`-th enabled one)."""
        return [int(r) for r in np.flatnonzero(self.valid.present[:, index])]


class RankingRoute:
    """Serves batches of ranking requests through the member models; each request is answered on its own."""

    def __init__(self, spec: PipelineSpec, preparer: RequestPreprocessor, infer: Infer,
                 log_error: Callable[[str], None] = lambda message: None, cache: EmbeddingCache | None = None,
                 decode: Callable[[Callable[[], None]], Awaitable[None]] | None = None):
        """`decode` runs one request's decoding (a callable) where it belongs, e.g. in a bounded pool of threads of
        low CPU priority (`fusionrank.triton.models`); None: inline."""
        self.spec = spec
        self.decode = decode
        admission = spec.serving.admission
        # Requests with payloads to decode, over every concurrent execute of this instance (route/shedding.py)
        # A request without a deadline of its own is admitted to wait only when the gate expects to answer it within
        # the SLO's median, with a margin (`DEFAULT_AIM`; the route queue's timeout if shorter): past capacity, what
        # it admits meets the SLO and the rest is refused at once, instead of every admitted request waiting seconds.
        queue = admission.route_queue  # the gate is the route's queue now: its size, and its timeout
        budget = min(spec.slo.p50_ms / 1e3, queue.timeout_us / 1e6 or math.inf)
        self.gate = DecodeGate(admission.max_decoding_requests, queue.max_queue_size or 1 << 30,
                               default_deadline_s=budget if math.isfinite(budget) else None)
        self.preparer = preparer
        self.members = MemberCalls(spec, infer, log_error)
        self.log_error = log_error
        self.cache = cache
        self.modalities = spec.modalities.enabled
        self.ranker_outputs = tuple(t.name for t in model_io(spec, RANKER).outputs)

    async def rank(self, requests: Sequence[RouteRequest], answer: Answer | None = None) -> list[RouteResult]:
        """Outputs by name, or a RouteError, per request and in the requests' order. `answer` gets each request's
        result as soon as it is known (an error at the stage that found it; a request the cache answered whole
        when it is ranked, while its batch-mates still decode), so no caller waits for another's work."""
        flights = [_Flight(r) for r in requests]

        def settle() -> None:
            for i, f in enumerate(flights):
                if answer is not None and not f.answered and (f.error is not None or f.outputs is not None):
                    f.answered = True
                    answer(i, f.error if f.error is not None else f.outputs)

        live = self._validate(flights)
        self._lookup(live)
        live = self._guarded(self._drop_cancelled(live), "header check", self._check_headers)
        settle()

        # Requests the cache answered whole are ranked (and answered) now, not after their batch-mates' decoding;
        # each other request passes the gate, then decodes, encodes and ranks on its own (its member calls still
        # meet other requests' in the members' dynamic batchers).
        # The cold requests the gate admits at once are decoded and encoded together (one call per encoder shape).
        cold, entered = [f for f in live if not f.all_hit], {}
        for f in cold:
            admitted = self.gate.try_enter(f.request.deadline, f.work)
            if isinstance(admitted, str):
                f.fail(RouteError(Status.UNAVAILABLE, admitted))
            elif admitted is not None:
                entered[f] = admitted
        settle()
        waiting = [f for f in cold if f.error is None and f not in entered]
        await asyncio.gather(self._serve_hits([f for f in live if f.all_hit], settle),
                             self._serve_cold(entered, settle), *(self._wait_and_serve(f, settle) for f in waiting))
        settle()
        return [f.error if f.error is not None else f.outputs for f in flights]

    async def _serve_hits(self, flights: list[_Flight], settle: Callable[[], None]) -> None:
        await self._rank(flights)
        settle()

    async def _wait_and_serve(self, flight: _Flight, settle: Callable[[], None]) -> None:
        slot = await self.gate.wait(flight.request.deadline, flight.request.level, flight.work,
                                    flight.request.arrived)
        if isinstance(slot, str):
            flight.fail(RouteError(Status.UNAVAILABLE, slot))
        elif not self._drop_cancelled([flight]):  # its caller went while it waited
            self.gate.leave(slot)
        else:
            await self._serve_cold({flight: slot}, settle)
        settle()

    async def _serve_cold(self, slots: dict[_Flight, Slot], settle: Callable[[], None]) -> None:
        """Requests with payloads to decode, each holding a slot of the gate: decoded in the bounded pool, encoded and
        ranked; every slot is given back whatever happens (a served request's time feeds the gate's estimate)."""
        if not slots:
            return
        try:
            work = self._drop_cancelled(await self._preprocess(list(slots)))
            settle()
            work = self._drop_cancelled(await self._encode(work))
            settle()
            await self._rank(work)
        finally:
            for f, slot in slots.items():
                self.gate.leave(slot, served=f.error is None and f.outputs is not None)
        settle()

    @staticmethod
    def _drop_cancelled(flights: list[_Flight]) -> list[_Flight]:
        """The flights whose caller still waits: a cancelled one is answered CANCELLED, one past its deadline
        UNAVAILABLE (over capacity: another server, or this one later, may serve it), and no more work is done."""
        live, now = [], time.monotonic()
        for f in flights:
            if f.request.is_cancelled():
                f.fail(RouteError(Status.CANCELLED, "request cancelled by the caller"))
            elif f.request.late(now):
                f.fail(RouteError(Status.UNAVAILABLE, LATE))
            else:
                live.append(f)
        return live

    def _check_headers(self, f: _Flight) -> None:
        """Refuse a request whose misses have a payload the preprocessing would refuse without decoding it, or cost
        more to decode than `serving.admission.cost` allows (headers only)."""
        check_budget(self.spec.serving.admission.cost, request_cost(self.preparer, f.valid, f.misses))

    def _guarded(self, flights: list[_Flight], stage: str, work: Callable[[_Flight], None]) -> list[_Flight]:
        """Run `work` on each flight: bad input answers its request INVALID_ARG, any other failure INTERNAL (logged);
        returns the flights that passed."""
        live = []
        for i, f in enumerate(flights):
            try:
                work(f)
            except PreprocessError as exc:  # RequestValidationError included
                f.fail(RouteError(Status.INVALID_ARG, str(exc)))
                continue
            except Exception:  # any other failure is ours: log it, answer INTERNAL, keep serving
                self.log_error(f"route: {stage} of request {i} failed:\n{traceback.format_exc()}")
                f.fail(RouteError(Status.INTERNAL, f"route: internal error in {stage} (see server log)"))
                continue
            live.append(f)
        return live

    def _validate(self, flights: list[_Flight]) -> list[_Flight]:
        for f in flights:
            if f.request.is_cancelled():  # before its CPU work: a caller that gave up costs nothing more
                f.fail(RouteError(Status.CANCELLED, "request cancelled by the caller"))

        def validate(f: _Flight) -> None:
            f.valid = self.preparer.validate(f.request.inputs)

        return self._guarded([f for f in flights if f.error is None], "validation", validate)

    def _lookup(self, flights: list[_Flight]) -> None:
        """Fill every row the cache holds; the rest are the misses (every row without a cache). A failing cache
        costs misses, never a request."""
        for f in flights:
            for j, m in enumerate(self.modalities):
                f.embeddings[m] = np.zeros((f.rows, self.spec.modalities.embedding_dim(m)), dtype=np.float32)
                f.misses[m] = f.present_rows(m, j)
        if self.cache is None or not flights:
            return
        try:
            wanted = []
            for f in flights:
                for m in self.modalities:
                    f.keys[m] = [None] * f.rows
                    for row in f.misses[m]:
                        f.keys[m][row] = self.cache.key(m, *self._cache_payload(f.valid, m, row))
                    wanted += [(m, f.keys[m][row]) for row in f.misses[m]]
            found = iter(self.cache.lookup(wanted))
        except Exception:
            self.log_error(f"route: embedding cache lookup failed; encoding every row:\n{traceback.format_exc()}")
            return
        for f in flights:
            for m in self.modalities:
                misses = []
                for row in f.misses[m]:
                    value = next(found)
                    if value is None:
                        misses.append(row)
                    else:
                        f.embeddings[m][row] = value
                f.misses[m] = misses

    def _cache_payload(self, valid: ValidRequest, modality: Modality, row: int) -> tuple[bytes, PayloadKind]:
        """What a row's cache key hashes and its namespace: its payload; for an image with a video, its still and
        its video, in the `frames` namespace (never a still's)."""
        payload = valid.rows[ITEM_INPUT[modality]][row]
        if modality is Modality.IMAGE and valid.videos is not None and valid.videos[row]:
            return image_cache_payload(self.spec, payload, valid.videos[row]), PayloadKind.FRAMES
        return payload, PayloadKind.of(modality)

    async def _preprocess(self, flights: list[_Flight]) -> list[_Flight]:
        def preprocess(f: _Flight) -> None:
            for m in self.modalities:
                f.groups[m] = self.preparer.encoder_groups(f.valid, m, f.misses[m])

        if self.decode is None or not flights:
            return self._guarded(flights, "preprocessing", preprocess)
        await self.decode(lambda: self._guarded(flights, "preprocessing", preprocess))
        return [f for f in flights if f.error is None]

    async def _encode(self, flights: list[_Flight]) -> list[_Flight]:
        await asyncio.gather(*(self._encode_modality(flights, m) for m in self.modalities))
        live = [f for f in flights if f.error is None]
        self._store(live)
        return live

    async def _encode_modality(self, flights: list[_Flight], modality: Modality) -> None:
        name = embedding_name(modality)
        parts = [(f, group) for f in flights for group in f.groups[modality]]
        results = await self.members(encoder_name(modality), [g.inputs for _, g in parts], (name,),
                                         deadline=_latest(flights))
        encoded: dict[_Flight, list[tuple[np.ndarray, np.ndarray]]] = {}
        for (f, group), result in zip(parts, results):
            if f.error is not None:
                continue
            if isinstance(result, RouteError):
                f.fail(result)
                continue
            bad = non_finite_row(result[name])
            if bad is not None:
                row = int(group.rows[bad])
                self._log_non_finite(name, row)
                f.fail(RouteError(Status.INVALID_ARG, f"{ITEM_INPUT[modality]}[{row}]: the {modality.value} encoder "
                                                      "produced a non-finite embedding; this candidate cannot be "
                                                      "scored"))
                continue
            encoded.setdefault(f, []).append((group.rows, result[name]))
        for f, pieces in encoded.items():
            if f.error is None:  # a candidate's rows (a video's frames and its still) pooled into one embedding
                owners = np.concatenate([rows for rows, _ in pieces])
                pooled = pool_rows(np.concatenate([values for _, values in pieces]), owners, f.rows)
                rows = np.unique(owners)
                f.embeddings[modality][rows] = pooled[rows]

    def _store(self, flights: list[_Flight]) -> None:
        """Cache the fresh embeddings of requests whose every row validated and encoded to finite values."""
        if self.cache is None:
            return
        try:
            self.cache.store([(m, f.keys[m][row], f.embeddings[m][row]) for f in flights for m in self.modalities
                              if m in f.keys for row in f.encode_rows(m)])
        except Exception:  # the requests are served all the same; the next ones miss
            self.log_error(f"route: storing embeddings failed:\n{traceback.format_exc()}")

    async def _rank(self, flights: list[_Flight]) -> None:
        if not flights:
            return
        parts = [{**{embedding_name(m): f.embeddings[m] for m in self.modalities}, "history": f.valid.history,
                  MODALITY_MASK: f.valid.present.astype(np.float32)} for f in flights]
        # One call per request (the ranker's dynamic batcher merges them): the ranker model answers a non-finite
        # output INVALID_ARG naming the row (the reference ensemble's guard), which then concerns this request alone.
        results = await self.members(RANKER, parts, self.ranker_outputs, concatenate=False,
                                         deadline=_latest(flights))
        for f, result in zip(flights, results):
            if isinstance(result, RouteError):
                f.fail(result)
                continue
            for name in self.ranker_outputs:
                row = non_finite_row(result[name])
                if row is not None:
                    self._log_non_finite(name, row)
                    f.fail(RouteError(Status.INVALID_ARG, f"{name}[{row}]: the ranker produced a non-finite value "
                                                          f"for candidate {row}; it cannot be scored"))
                    break
            else:
                f.outputs = result

    def _log_non_finite(self, name: str, row: int) -> None:
        # Answered INVALID_ARG (the payload passed validation but drives the model out of range; retrying cannot
        # help), and logged: a model that turns finite inputs into NaN for many requests is a defect to see.
        self.log_error(f"route: non-finite {name} at row {row} from finite inputs")


def _latest(flights: Sequence[_Flight]) -> float | None:
    """The deadline of a member call holding these flights' rows: the latest of theirs (None if one has none)."""
    deadlines = [f.request.deadline for f in flights]
    return None if not deadlines or None in deadlines else max(deadlines)
