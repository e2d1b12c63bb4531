"""Batch-invariance gate: a served graph's answer for a row must not depend on the rows batched with it (issue 19).

Triton's dynamic batcher (and the route, which concatenates its requests' misses) puts one caller's rows beside
other callers' rows, so a graph whose output for a row moves with its batch-mates gives the same request different
scores depending on traffic, cache state and route. ONNX Runtime's dynamic quantization is such a graph: it
computes the activation scale over the whole batch (DynamicQuantizeLinear), and the text encoder's embedding moved
by up to 2.8e-2 with its batch-mates (CI spec). FP32 graphs and statically quantized ones (fixed, calibrated scales)
compute each row on its own.

The gate runs a graph on a batch of its golden inputs, then on every row alone, the batch reversed, and pairs of
rows, and compares each row's outputs with the row alone: the largest difference must be within
`export.cpu.batch_invariance_atol`, else `BatchInvarianceError` names the model, the output, the mix, the
difference and the tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.verify.cpu_gates import CpuGateError, Gate, OrtChain
from export.verify.golden import load_golden
from fusionrank.contract.spec import PipelineSpec

INVARIANCE_METRIC = "batch invariance max abs diff"
MAX_ROWS = 16  # rows of the golden inputs the gate mixes (each also runs alone)

Runner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


class BatchInvarianceError(CpuGateError):
    """A served graph's output for a row changes with its batch-mates by more than the spec's tolerance."""

    def __init__(self, model: str, value: float, tolerance: float, detail: str = ""):
        self.tolerance, self.detail = tolerance, detail
        super().__init__(model, INVARIANCE_METRIC, value, f"<= {tolerance:g}",
                         f"{model}: a row's output changes with its batch-mates by up to {value:.3g} "
                         f"({detail or 'see cpu_parity.json'}), tolerance {tolerance:g} "
                         "(export.cpu.batch_invariance_atol); the CPU profile serves only batch-invariant graphs: "
                         "quantize with calibrated (static) scales, not per-batch dynamic ones")


@dataclass(frozen=True)
class InvarianceResult:
    """The largest change of any output row between its row alone and one of the batch mixes."""

    model: str
    max_abs_diff: float
    tolerance: float
    output: str
    mix: str
    rows: int

    @property
    def passed(self) -> bool:
        return bool(self.max_abs_diff <= self.tolerance)

    @property
    def detail(self) -> str:
        return f"output {self.output}, {self.mix}, {self.rows} golden rows"

    def raise_on_failure(self) -> None:
        if not self.passed:
            raise BatchInvarianceError(self.model, self.max_abs_diff, self.tolerance, self.detail)


def batch_mixes(rows: int) -> list[tuple[str, np.ndarray]]:
    """(name, row indices) of the batches each row is compared across: all rows, all reversed, and each row with
    the next one before it."""
    order = np.arange(rows)
    mixes = [("the whole batch", order), ("the batch reversed", order[::-1].copy())]
    if rows > 2:
        mixes.append(("pairs of rows", np.stack([np.roll(order, 1), order], axis=1).ravel()))
    return mixes


def _take(inputs: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(value[index]) for name, value in inputs.items()}


def _alone(run: Runner, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Each output for each row run in a batch of one."""
    parts = [run(_take(inputs, np.array([row]))) for row in range(rows)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def check_batch_invariance(model: str, run: Runner, inputs: Mapping[str, np.ndarray],
                           tolerance: float) -> InvarianceResult:
    """Run `model` (through `run`: batch-first inputs -> batch-first outputs) on batch mixes of the first
    `MAX_ROWS` rows of `inputs` and compare every row with its row alone."""
    rows = min(MAX_ROWS, *(len(v) for v in inputs.values()))
    alone = _alone(run, inputs, rows)
    worst = (0.0, next(iter(alone)), "every mix")
    for mix, index in batch_mixes(rows):
        outputs = run(_take(inputs, index))
        for name, expected in alone.items():
            diff = np.abs(np.asarray(outputs[name], dtype=np.float64) - expected[index]).max(initial=0.0)
            if not diff <= worst[0]:  # NaN counts as the worst
                worst = (float(diff), name, mix)
    return InvarianceResult(model, worst[0], tolerance, worst[1], worst[2], rows)


def check_served_graphs(spec: PipelineSpec, repo: Path, files: Mapping[str, Path]) -> list[InvarianceResult]:
    """The gate on every served graph of `files` ({model: graph}), on its export golden inputs, with ONNX Runtime
    as the CPU profile runs it (one intra-op thread)."""
    chain = OrtChain(spec, dict(files), threads=1)
    tolerance = spec.export.cpu.batch_invariance_atol
    return [check_batch_invariance(model, lambda inputs, m=model: chain.run(m, inputs),
                                   load_golden(repo, model).inputs, tolerance) for model in files]


def invariance_gates(results: list[InvarianceResult]) -> list[Gate]:
    """The results as gates of the CPU report (`cpu_parity.json`)."""
    return [Gate(r.model, INVARIANCE_METRIC, r.max_abs_diff, f"<= {r.tolerance:g}", r.passed) for r in results]
