"""The in-process yardstick of `fusionrank bench serve`: the served pipeline's pieces composed in one process, one
caller, no server: the request validation and preprocessing the servers run (`RequestPreprocessor`, a request padded to
one text bucket as the ensemble pads it) and the four exported ONNX models on ONNX Runtime (`benchmarks.latency.
OnnxRuntimeRunner`, the CPU profile's runtime).

Two ways to feed it: one ranking request at a time (the request's batch), or as many requests as fill the
encoders' largest batch, preprocessed per request and encoded together (what a batch job would do).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.latency import OnnxRuntimeRunner, run_batched
from fusionrank.contract.names import ENCODERS_AND_RANKER, RANKER, Modality, encoder_modality, encoder_name
from fusionrank.contract.paths import tokenizer_dir
from fusionrank.contract.spec import PipelineSpec
from fusionrank.contract.tensors import MODALITY_MASK, embedding_name
from fusionrank.request.candidates import pool_rows
from fusionrank.request.scenario import ScenarioRequest
from fusionrank.request.validation import PreparedRequest, RequestPreprocessor

# The next ranking request, as `RequestFactory.next` makes it.
NextRequest = Callable[[], ScenarioRequest]


class InProcessPipeline:
    """Preprocessing + the four ONNX models in this process."""

    def __init__(self, spec: PipelineSpec, repo: Path, intra_op_threads: int = 0):
        self.spec = spec
        self.preparer = RequestPreprocessor(spec, tokenizer_dir=tokenizer_dir(repo))
        # The graphs the CPU profile serves (optimised or INT8 per `export.cpu`), so both sides run the same models.
        self.runners = {m: OnnxRuntimeRunner(repo / m / "1" / spec.export.cpu.onnx_file(m),
                                             intra_op_threads=intra_op_threads) for m in ENCODERS_AND_RANKER
                        if m == RANKER or encoder_modality(m) in spec.modalities.enabled}
        self.max_batch = spec.serving.batching(encoder_name(Modality.IMAGE)).max_batch_size

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()

    def _embed(self, prepared: list[PreparedRequest]) -> dict[str, np.ndarray]:
        """Every modality's embeddings of the requests' rows, in order; requests whose encoder inputs share a shape
        are encoded together (text of different buckets cannot be); each request's encoded rows (only those that
        have the modality, a video's frames among them) pooled per candidate as the route does."""
        out = {}
        for modality in self.spec.modalities.enabled:
            model, name = encoder_name(modality), embedding_name(modality)
            rows = [np.zeros((p.rows, self.spec.modalities.embedding_dim(modality)), np.float32) for p in prepared]
            groups: dict[tuple, list[int]] = {}
            for i, p in enumerate(prepared):
                if not len(p.owners[modality]):
                    continue
                shapes = tuple((n, a.shape[1:]) for n, a in sorted(p.encoder_inputs[modality].items()))
                groups.setdefault(shapes, []).append(i)
            for members in groups.values():
                inputs = {n: np.concatenate([prepared[i].encoder_inputs[modality][n] for i in members])
                          for n in prepared[members[0]].encoder_inputs[modality]}
                result = run_batched(self.runners[model], inputs, self.max_batch)[name]
                offsets = np.cumsum([0] + [len(prepared[i].owners[modality]) for i in members])
                for i, start, stop in zip(members, offsets[:-1], offsets[1:]):
                    rows[i] = pool_rows(result[start:stop], prepared[i].owners[modality], prepared[i].rows)
            out[name] = np.concatenate(rows)
        return out

    def rank(self, requests: list[ScenarioRequest]) -> np.ndarray:
        """Click probabilities of the requests' candidates, encoded together and ranked together."""
        prepared = [self.preparer(request.arrays()) for request in requests]
        inputs = {**self._embed(prepared), "history": np.concatenate([p.history for p in prepared]),
                  MODALITY_MASK: np.concatenate([p.modality_mask() for p in prepared])}
        return run_batched(self.runners[RANKER], inputs, self.max_batch)["click_probability"]


def run_inprocess(pipeline: InProcessPipeline, next_request: NextRequest, seconds: float,
                  batch_rows: int | None = None) -> tuple[list[float], int]:
    """Call the pipeline for `seconds` (at least twice): one request per call, or (`batch_rows`) as many requests as
    fill that many rows. Returns the latency of every call and the candidates scored."""
    latencies, candidates = [], 0
    pipeline.rank([next_request()])  # warm-up: sessions allocate on their first call
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(latencies) < 2:
        requests = [next_request()]
        while batch_rows and sum(len(r) for r in requests) + len(requests[0]) <= batch_rows:
            requests.append(next_request())
        started = time.perf_counter()
        scores = pipeline.rank(requests)
        latencies.append(time.perf_counter() - started)
        candidates += len(scores)
    return latencies, candidates
