"""Seeded fuzzing of a running server with plain tritonclient: hostile requests mixed with valid neighbours.

Every case is one request to the ensemble: first the hand-made bad inputs of `tests.robustness.mutations.catalogue()`,
then requests with a mutated payload (blind byte edits and header fields set to extremes), random bytes, a bad
history (ids out of range, rows that differ, wrong dtype or length) or a bad structure (rows that disagree, zero
or too many candidates, a missing input, two elements per row). Valid requests for benchmark sessions are sent
between them, concurrently. The run fails when any answer is neither OK nor INVALID_ARGUMENT, an error names no
input, an output holds a NaN or an infinity, a valid neighbour's scores differ from a clean run beyond the ranker's
parity tolerance (not bit for bit: the route's embedding cache may serve an embedding computed in a batch of another
size, and ONNX Runtime's one-row path of the text encoder differs from its batched path in the last bits), or the
server stops answering. No call is cancelled: every client deadline is long (a cancelled ensemble call crashes
Triton 2.51, a separate issue).

    python -m tests.robustness.fuzz_server --serve --cases 5000            # starts the local CPU server, stops it after
    python -m tests.robustness.fuzz_server --url localhost:8001 --cases 5000
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from fusionrank.contract.project import model_repository_dir
from fusionrank.contract.spec import PipelineSpec, ServingProfile, load_spec
from fusionrank.contract.tensors import (
    CLICK_PROBABILITY,
    ITEM_INPUT,
    MODALITY_WEIGHTS,
    USER_HISTORY,
    deadline_arguments,
    infer_inputs,
    request_arrays,
)
from fusionrank.model.synthetic_data import Benchmark, load_benchmark
from fusionrank.server.launcher import TritonServer
from tests.robustness.mutations import catalogue, mutate, random_ops, seeds

OK, INVALID = "OK", "StatusCode.INVALID_ARGUMENT"
CALL_TIMEOUT_S = 300.0  # long on purpose: nothing is cancelled
NEIGHBOUR_EVERY = 3  # one valid neighbour per this many fuzz cases


@dataclass
class ServerFuzzReport:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    neighbours: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    max_diff: float = 0.0  # largest |difference| of a neighbour's click probability from its clean run

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        """What a person reads at the end of a run."""
        statuses = ", ".join(f"{s.replace('StatusCode.', '')} {n}" for s, n in sorted(self.statuses.items()))
        lines = [f"{self.cases} fuzz cases ({statuses}) and {self.neighbours} valid neighbours in {self.seconds:.0f} s",
                 *self.failures[:20]]
        lines.append("no failure: every bad request got INVALID_ARGUMENT naming an input, every output was finite, "
                     f"every neighbour within the ranker's parity tolerance (max |diff| {self.max_diff:.2g}), the "
                     "server alive" if self.ok else f"{len(self.failures)} failures")
        return "\n".join(lines)


@dataclass(frozen=True)
class Case:
    name: str
    arrays: dict[str, np.ndarray]
    expect: str | None = None  # a known-bad case: INVALID_ARGUMENT whose message contains this, e.g. "item_image[1]"


def _session_items(spec: PipelineSpec, bench: Benchmark, session: int, n: int):
    ids = [int(i) for i in bench.sessions.candidates[session][:n]]
    items = {m: [bench.item(i).payload(m) for i in ids] for m in spec.modalities.enabled}
    history = np.repeat(bench.sessions.history[session][None, :].astype(np.int64), len(ids), axis=0)
    return items, history


def _structural(rng: np.random.Generator, spec: PipelineSpec, arrays: dict[str, np.ndarray]) -> tuple[str, dict]:
    names = list(arrays)
    name = str(rng.choice(names))
    kind = str(rng.choice(["drop_row", "extra_row", "zero", "too_many", "missing", "two_columns", "negative_id",
                           "unknown_id", "rows_differ", "float_history", "short_history"]))
    out = dict(arrays)
    history = arrays[USER_HISTORY].copy()
    if kind == "drop_row":
        out[name] = arrays[name][1:]
    elif kind == "extra_row":
        out[name] = np.concatenate([arrays[name], arrays[name][:1]])
    elif kind == "zero":
        out = {k: v[:0] for k, v in arrays.items()}
    elif kind == "too_many":
        out = {k: np.concatenate([v] * (spec.serving.max_candidates // len(v) + 1)) for k, v in arrays.items()}
    elif kind == "missing":
        out.pop(name)
    elif kind == "two_columns" and name != USER_HISTORY:
        out[name] = np.concatenate([arrays[name], arrays[name]], axis=1)
    elif kind in ("negative_id", "unknown_id", "rows_differ"):
        value = {"negative_id": -int(rng.integers(1, 1 << 40)), "unknown_id": spec.ranker.history.vocab_size +
                 int(rng.integers(0, 1 << 40)), "rows_differ": 1 + int(history[-1, -1]) % (spec.num_items - 1)}[kind]
        history[-1, int(rng.integers(0, history.shape[1]))] = value
        out[USER_HISTORY] = history
    elif kind == "float_history":
        out[USER_HISTORY] = history.astype(np.float32)
    else:
        out[USER_HISTORY] = history[:, 1:]
    return f"{kind} ({name})", out


def build_cases(spec: PipelineSpec, bench: Benchmark, count: int, seed: int) -> list[Case]:
    """`count` seeded cases: the catalogue of bad inputs first, then random mutations of 2-candidate requests."""
    rng = np.random.default_rng(seed)
    valid = seeds()
    sessions = [int(s) for s in bench.frozen_sessions(16)]
    cases = []
    for name, modality, raw in catalogue():
        if modality in spec.modalities.enabled:
            items, history = _session_items(spec, bench, sessions[len(cases) % len(sessions)], 2)
            items[modality][1] = raw
            cases.append(Case(name, request_arrays(items, history), expect=f"{ITEM_INPUT[modality]}[1]"))
    while len(cases) < count:
        items, history = _session_items(spec, bench, sessions[int(rng.integers(len(sessions)))], 2)
        kind = rng.random()
        if kind < 0.6:
            modality = spec.modalities.enabled[int(rng.integers(len(spec.modalities.enabled)))]
            pool = items[modality] + valid[modality]
            base, other = pool[int(rng.integers(len(pool)))], pool[int(rng.integers(len(pool)))]
            items[modality][1] = mutate(base, random_ops(rng, int(rng.integers(1, 5))), other)
            cases.append(Case(f"mutated {modality.value}", request_arrays(items, history)))
        elif kind < 0.7:
            modality = spec.modalities.enabled[int(rng.integers(len(spec.modalities.enabled)))]
            items[modality][1] = rng.bytes(int(rng.integers(0, 2048)))
            cases.append(Case(f"random bytes as {modality.value}", request_arrays(items, history)))
        else:
            name, arrays = _structural(rng, spec, request_arrays(items, history))
            cases.append(Case(name, arrays))
    return cases[:count]


class _Caller:
    """One gRPC client per worker thread; returns (status, message, outputs)."""

    def __init__(self, url: str, model: str):
        self.url, self.model = url, model
        self.local = threading.local()
        self.clients: list = []

    def __call__(self, arrays: dict[str, np.ndarray]):
        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = grpcclient.InferenceServerClient(self.url)
            self.clients.append(client)
        try:
            # The deadline stated, as the client sends it: a call without one is admitted only within the SLO's
            # median, so a loaded machine (CI beside other work) would refuse some UNAVAILABLE, not the fuzz's concern.
            result = client.infer(self.model, infer_inputs(grpcclient, arrays), client_timeout=CALL_TIMEOUT_S,
                                  **deadline_arguments(CALL_TIMEOUT_S))
        except InferenceServerException as exc:
            return str(exc.status()), exc.message() or "", None
        return OK, "", (result.as_numpy(CLICK_PROBABILITY), result.as_numpy(MODALITY_WEIGHTS))

    def close(self) -> None:
        for client in self.clients:
            client.close()


def _judge(report: ServerFuzzReport, case: Case, answer, names: tuple[str, ...]) -> None:
    status, message, outputs = answer
    report.statuses[status] += 1
    where = f"case {case.name!r}"
    if case.expect is not None and (status != INVALID or case.expect not in message):
        report.failures.append(f"{where}: expected INVALID_ARGUMENT naming {case.expect}, got {status} {message}")
    elif status == INVALID:
        if not any(n in message for n in names) and "batch-size" not in message:
            report.failures.append(f"{where}: INVALID_ARGUMENT names no input: {message}")
    elif status != OK:
        report.failures.append(f"{where}: {status} {message}")
    elif not all(np.isfinite(o).all() for o in outputs):
        report.failures.append(f"{where}: OK with a non-finite output")


def _same(spec: PipelineSpec, report: ServerFuzzReport, answer, clean) -> bool:
    """An OK answer whose outputs equal the clean run's within the ranker's parity tolerance (spec.export)."""
    if answer[0] != OK:
        return False
    report.max_diff = max(report.max_diff, float(np.max(np.abs(answer[2][0] - clean[2][0]))))
    return all(np.allclose(a, b, atol=spec.export.tolerance(n).atol, rtol=spec.export.tolerance(n).rtol)
               for n, a, b in zip((CLICK_PROBABILITY, MODALITY_WEIGHTS), answer[2], clean[2]))


def run_server_fuzz(url: str, spec: PipelineSpec, bench: Benchmark, cases: int, seed: int = 0,
                    concurrency: int = 8) -> ServerFuzzReport:
    """Send `cases` fuzz cases with valid neighbours between them, `concurrency` calls at a time; see the module."""
    started = time.monotonic()
    report = ServerFuzzReport()
    names = (*(ITEM_INPUT[m] for m in spec.modalities.enabled), USER_HISTORY)
    neighbours = [request_arrays(*_session_items(spec, bench, int(s), 3)) for s in bench.frozen_sessions(4)]
    call = _Caller(url, spec.serving.route)
    try:
        clean = [call(arrays) for arrays in neighbours]
        if any(status != OK for status, _, _ in clean):
            report.failures.append(f"a valid neighbour failed before fuzzing: {[c[:2] for c in clean]}")
            return report
        jobs = []
        for i, case in enumerate(build_cases(spec, bench, cases, seed)):
            jobs.append(("case", case))
            if i % NEIGHBOUR_EVERY == 0:
                jobs.append(("neighbour", i // NEIGHBOUR_EVERY % len(neighbours)))
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            answers = list(pool.map(lambda job: call(job[1].arrays if job[0] == "case" else neighbours[job[1]]),
                                    jobs))
        for (kind, what), answer in zip(jobs, answers):
            if kind == "case":
                report.cases += 1
                _judge(report, what, answer, names)
                continue
            report.neighbours += 1
            if not _same(spec, report, answer, clean[what]):
                report.failures.append(f"valid neighbour {what} changed: {answer[:2]}")
        final = call(neighbours[0])
        if not _same(spec, report, final, clean[0]):
            report.failures.append(f"the server stopped serving correctly after the run: {final[:2]}")
    finally:
        call.close()
        report.seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line: fuzz a running server (--url) or a local one started for the run (--serve)."""
    p = argparse.ArgumentParser(prog="python -m tests.robustness.fuzz_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=None, help="pipeline spec (default: pipeline.yaml)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="gRPC endpoint of a running server")
    where.add_argument("--serve", action="store_true", help="start the local CPU server on --repository")
    p.add_argument("--repository", default=str(model_repository_dir()), help="model repository for --serve")
    p.add_argument("--cases", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args(argv)
    spec = load_spec(args.spec)
    bench = load_benchmark(spec)
    if args.url:
        report = run_server_fuzz(args.url, spec, bench, args.cases, args.seed, args.concurrency)
    else:
        with TritonServer.for_spec(spec, Path(args.repository), ServingProfile.CPU,
                                   log_name="tritonserver-fuzz") as server:
            report = run_server_fuzz(server.grpc_url, spec, bench, args.cases, args.seed, args.concurrency)
            if server.process.poll() is not None:
                report.failures.append(f"tritonserver exited with code {server.process.returncode}; "
                                       f"log: {server.log_file}")
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
