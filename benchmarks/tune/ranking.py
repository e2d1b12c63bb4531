"""The ranking gates of a tuned configuration: a configuration changes no graph, yet batching and instances may
change what a candidate's score is computed with (batch-mates, padding), so each configuration's served scores on a
fixed request set are compared with the same graphs run in process (`benchmarks.inprocess`), with the spec's
CPU ranking gates (Kendall tau, top-10 overlap per request)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusionrank.contract.spec import PipelineSpec


@dataclass(frozen=True)
class RankingCheck:
    """Worst Kendall tau and top-10 overlap over the requests, the largest score difference, and the verdict."""

    kendall_tau: float
    top10_overlap: float
    max_abs_diff: float
    passed: bool

    def describe(self) -> str:
        return (f"ranking {'ok' if self.passed else 'FAILED'}: Kendall tau >= {self.kendall_tau:.3f}, top-10 "
                f"overlap >= {self.top10_overlap:.2f}, max |score diff| {self.max_abs_diff:.2e}")


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Share of the top-k candidates (k at most the list's length) two score lists agree on."""
    k = min(k, len(a))
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def compare(served: list[np.ndarray], expected: list[np.ndarray], spec: PipelineSpec) -> RankingCheck:
    """Served scores of each request against the expected ones, judged by `export.cpu.ranking`."""
    from scipy.stats import kendalltau  # scipy only where a ranking is compared

    gates = spec.export.cpu.ranking
    taus = [1.0 if np.array_equal(np.argsort(s), np.argsort(e)) else float(kendalltau(s, e).statistic)
            for s, e in zip(served, expected)]
    overlaps = [top_overlap(s, e) for s, e in zip(served, expected)]
    diff = max(float(np.max(np.abs(s - e))) for s, e in zip(served, expected))
    tau, overlap = min(taus), min(overlaps)
    return RankingCheck(tau, overlap, diff, tau >= gates.min_kendall_tau and overlap >= gates.min_top10_overlap)


class RankingProbe:
    """A fixed request set (catalogue items, seed 0) and its in-process scores, computed once per tune."""

    def __init__(self, spec: PipelineSpec, repo: Path, bench, requests: int = 8, candidates: int = 16):
        from benchmarks.inprocess import InProcessPipeline
        from benchmarks.served import Stream
        from fusionrank.request.scenario import RequestFactory

        factory = RequestFactory(spec, bench, Stream(candidates=candidates, novel_share=0.0).scenario(), seed=7)
        self.requests = [factory.next() for _ in range(requests)]
        pipeline = InProcessPipeline(spec, Path(repo))
        try:
            self.expected = [np.asarray(pipeline.rank([r])).reshape(-1) for r in self.requests]
        finally:
            pipeline.close()
        self.spec = spec

    def check(self, url: str, model: str) -> RankingCheck:
        """Send the request set to `model` at `url` and compare."""
        import tritonclient.grpc as grpcclient

        from fusionrank.contract.tensors import CLICK_PROBABILITY, infer_inputs

        with grpcclient.InferenceServerClient(url) as client:
            served = [client.infer(model, infer_inputs(grpcclient, r.arrays()), client_timeout=60)
                      .as_numpy(CLICK_PROBABILITY).reshape(-1) for r in self.requests]
        return compare(served, self.expected, self.spec)
