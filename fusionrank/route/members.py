"""The route's calls to its member models (`fusionrank.route.stages`): the statuses a request is answered with, and
`MemberCalls`, which sends rows to a member through BLS, concatenated where their shapes agree and cut at the
member's max batch, and hands each part its own outputs or the error of the call that held its rows."""

from __future__ import annotations

import asyncio
import enum
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.spec import PipelineSpec


class Status(enum.Enum):
    """The status a request is answered with when it is not answered with outputs."""

    INVALID_ARG = "invalid_arg"  # the request's own input: retrying it cannot help
    CANCELLED = "cancelled"  # the caller cancelled it (a deadline passed)
    UNAVAILABLE = "unavailable"  # a member is not loaded or the server is stopping: another server may serve it
    INTERNAL = "internal"  # our fault; the details are in the server log


@dataclass(frozen=True)
class RouteError:
    status: Status
    message: str


class MemberCallError(FusionRankError):
    """A member model answered a BLS call with an error."""

    def __init__(self, model: str, message: str, status: Status = Status.INTERNAL):
        self.model, self.message, self.status = model, message, status
        super().__init__(f"{model}: {message}")


RouteResult = dict[str, np.ndarray] | RouteError
# (member model, input arrays by name, output names, deadline) -> output arrays by name; raises MemberCallError.
# The deadline (`time.monotonic()`, or None) is the latest of the requests whose rows the call holds: the member's
# queue refuses the call past it instead of running work nobody waits for.
Infer = Callable[[str, dict[str, np.ndarray], tuple[str, ...], float | None], Awaitable[dict[str, np.ndarray]]]


class MemberCalls:
    """Calls to the member models through `infer`; a failed call is logged and answered as a RouteError."""

    def __init__(self, spec: PipelineSpec, infer: Infer, log_error: Callable[[str], None]):
        self.spec, self.infer, self.log_error = spec, infer, log_error

    async def __call__(self, model: str, parts: Sequence[dict[str, np.ndarray]], outputs: tuple[str, ...],
                          concatenate: bool = True, deadline: float | None = None) -> list[RouteResult]:
        """Run every part (input arrays of some rows) through `model`: parts whose shapes agree are concatenated
        (unless `concatenate` is False), cut at the model's max batch and sent concurrently. Returns each part's
        outputs, or the error of a call that held some of its rows."""
        groups: dict[tuple, list[int]] = {}
        for i, arrays in enumerate(parts):
            key = tuple((n, a.shape[1:]) for n, a in sorted(arrays.items())) if concatenate else i
            groups.setdefault(key, []).append(i)
        results: list[RouteResult] = [RouteError(Status.INTERNAL, "unreached")] * len(parts)
        answered = await asyncio.gather(*(self._call_group(model, [parts[i] for i in members], outputs, deadline)
                                          for members in groups.values()))
        for members, group_results in zip(groups.values(), answered):
            for i, result in zip(members, group_results):
                results[i] = result
        return results

    async def _call_group(self, model: str, parts: list[dict[str, np.ndarray]], outputs: tuple[str, ...],
                          deadline: float | None) -> list[RouteResult]:
        names = list(parts[0])
        batch = {n: parts[0][n] if len(parts) == 1 else np.concatenate([p[n] for p in parts]) for n in names}
        total, step = len(batch[names[0]]), self.spec.serving.batching(model).max_batch_size
        starts = list(range(0, total, step))
        own = len(parts) == 1 and len(starts) == 1  # the call holds exactly one part's rows, in order
        chunks = await asyncio.gather(*(self._call_chunk(model, {n: a[s:s + step] for n, a in batch.items()}, outputs,
                                                         own, deadline) for s in starts))
        results, lo = [], 0
        for part in parts:
            hi = lo + len(part[names[0]])
            pieces = [(c, max(lo, s) - s, min(hi, s + step) - s)
                      for s, c in zip(starts, chunks) if s < hi and lo < s + step]
            failed = next((c for c, _, _ in pieces if isinstance(c, RouteError)), None)
            results.append(failed or {n: np.concatenate([c[n][a:b] for c, a, b in pieces]) for n in outputs})
            lo = hi
        return results

    async def _call_chunk(self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...],
                          own: bool, deadline: float | None) -> RouteResult:
        rows = len(next(iter(inputs.values())))
        try:
            result = await self.infer(model, {n: np.ascontiguousarray(a) for n, a in inputs.items()}, outputs,
                                      deadline)
        except MemberCallError as exc:
            if exc.status is Status.INVALID_ARG and own:
                return RouteError(Status.INVALID_ARG, exc.message)  # names a row of this request: pass it on
            self.log_error(f"route: {exc}")
            if exc.status is Status.UNAVAILABLE:
                return RouteError(Status.UNAVAILABLE, f"{model} is unavailable: {exc.message}")
            return RouteError(Status.INTERNAL, f"route: {model} failed (see server log)")
        except Exception:
            self.log_error(f"route: call to {model} failed:\n{traceback.format_exc()}")
            return RouteError(Status.INTERNAL, f"route: call to {model} failed (see server log)")
        if any(n not in result or len(result[n]) != rows for n in outputs):
            self.log_error(f"route: {model} answered {rows} input rows with other row counts or outputs")
            return RouteError(Status.INTERNAL, f"route: {model} output rows do not match its input rows")
        return result
