"""Accuracy gates of the CPU profile's chain (`export.cpu`), at the level users notice, checked before it is served.

The catalogue goes once through each served encoder (batches of 32 items, as a busy server's dynamic batcher forms
them); the gates then read that table.
1. Per output: each served encoder on the frozen candidate set against the PyTorch embeddings, and the served
   ranker on the PyTorch embeddings against PyTorch's outputs. Tolerance: `export.cpu.tolerances` for an INT8
   model, the FP32 export tolerances otherwise (an optimised FP32 graph must match PyTorch as tightly as
   `model.onnx`).
2. Ranking parity of the whole served chain against the FP32 PyTorch chain on the frozen candidate set (top-10
   overlap, Kendall tau, AUC difference; `export.cpu.ranking`).
3. Test-split AUC: every test session through the served encoders' table and the served ranker, beside the FP32
   reference chain's AUC (PyTorch encoders, FP32 ranker); |difference| <= `export.cpu.max_test_auc_drop`.
Every gate is measured and written to `cpu_parity.json` before the first failure raises `CpuGateError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from export.manifest import onnx_path, sha256_file
from export.verify.golden import load_golden
from export.verify.parity import OutputParity, RankingParity, check_outputs, ranking_parity
from fusionrank.contract.errors import DataError, FusionRankError
from fusionrank.contract.names import RANKER, encoder_name
from fusionrank.contract.spec import Modality, PipelineSpec, Precision
from fusionrank.contract.tensors import CLICK_PROBABILITY, MODALITY_MASK, model_io
from fusionrank.model.embeddings import catalogue_embeddings, catalogue_payloads, encode_items
from fusionrank.model.synthetic_data import TEST, Benchmark
from fusionrank.model.train import split_rows
from fusionrank.request.candidates import CandidatePreparer

REPORT_FILE = "cpu_parity.json"
RANKER_CHUNK = 128  # the ranker's max batch in serving


class CpuGateError(FusionRankError):
    """The CPU profile's chain failed an accuracy gate; names the model, the metric, the value and the limit."""

    def __init__(self, model: str, metric: str, value: float, limit: str, message: str | None = None):
        self.model, self.metric, self.value, self.limit = model, metric, value, limit
        super().__init__(message or f"CPU profile gate failed for {model}: {metric} = {value:.6g}, limit {limit} "
                         f"(see {REPORT_FILE}; loosen export.cpu in pipeline.yaml or serve that model as fp32)")


@dataclass(frozen=True)
class Gate:
    model: str
    metric: str
    value: float
    limit: str
    passed: bool


@dataclass
class CpuGateReport:
    """What the CPU profile serves and how close it stays to the FP32 PyTorch chain."""

    files: dict[str, str]
    precision: dict[str, str]
    sha256: dict[str, str] = field(default_factory=dict)  # first 16 hex digits per gated file (`check --profile cpu`)
    outputs: list[OutputParity] = field(default_factory=list)
    ranking: RankingParity | None = None
    test_auc: dict[str, float] = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def as_dict(self) -> dict:
        return {"files": self.files, "precision": self.precision, "sha256": self.sha256,
                "outputs": [o.as_dict() for o in self.outputs],
                "ranking": self.ranking.as_dict() if self.ranking else None, "test_auc": self.test_auc,
                "gates": [g.__dict__ for g in self.gates], "passed": self.passed, "seconds": self.seconds}

    def write(self, repo: Path) -> Path:
        path = Path(repo) / REPORT_FILE
        path.write_text(json.dumps(self.as_dict(), indent=2))
        return path

    def raise_on_failure(self) -> None:
        failed = next((g for g in self.gates if not g.passed), None)
        if failed:
            raise CpuGateError(failed.model, failed.metric, failed.value, failed.limit)

    def table(self) -> str:
        lines = ["| model | served file | metric | value | limit | gate |", "|---|---|---|---|---|---|"]
        for g in self.gates:
            file = self.files.get(g.model, "")
            limit = g.limit.replace("|", "\\|")  # markdown: |reference| inside a cell
            lines.append(f"| {g.model} | {file} | {g.metric} | {g.value:.4g} | {limit} | "
                         f"{'ok' if g.passed else 'FAIL'} |")
        return "\n".join(lines)


class OrtChain:
    """The CPU profile's chain offline: the shared preprocessing, then ONNX Runtime on the served graph per model."""

    def __init__(self, spec: PipelineSpec, files: dict[str, Path], threads: int = 0):
        # Only the models in `files` get a session (the test-AUC reference runs the FP32 ranker alone).
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.spec = spec
        self.sessions = {m: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                         for m, p in files.items()}
        self.preparer = CandidatePreparer(spec)

    def run(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        io = model_io(self.spec, model)
        values = self.sessions[model].run([t.name for t in io.outputs], {t.name: inputs[t.name] for t in io.inputs})
        return dict(zip((t.name for t in io.outputs), values))

    def embed(self, modality: Modality, payloads: list[bytes], videos: list[bytes | None] | None = None) -> np.ndarray:
        """Embeddings of items through the same candidate preparation as training and serving (a clip's frames
        pooled with the still) and this chain's encoder."""
        model = encoder_name(modality)
        return encode_items(self.spec, modality, payloads, videos, preparer=self.preparer,
                            run=lambda _, inputs: next(iter(self.run(model, inputs).values())))

    def catalogue(self, bench: Benchmark, modality: Modality) -> np.ndarray:
        """[num_items + 1, D] embeddings of the whole catalogue as training embedded it (row 0, the padding id, all
        zeros; a video item from its clip)."""
        emb = self.embed(modality, *catalogue_payloads(self.spec, bench, modality))
        return np.concatenate([np.zeros((1, emb.shape[1]), np.float32), emb])

    def rank(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ranker outputs over any number of rows, in chunks of the ranker's max batch; rows without a
        `modality_mask` are complete candidates (the benchmark's catalogue items carry every modality)."""
        rows = len(inputs["history"])
        inputs = {MODALITY_MASK: np.ones((rows, len(self.spec.modalities.enabled)), np.float32), **inputs}
        parts = [self.run(RANKER, {k: v[s:s + RANKER_CHUNK] for k, v in inputs.items()})
                 for s in range(0, rows, RANKER_CHUNK)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _tolerance_for(spec: PipelineSpec, model: str):
    cpu = spec.export.cpu
    if cpu.precision_of(model) is Precision.INT8:
        return lambda output: cpu.tolerances.get(output, spec.export.tolerance(output))
    return spec.export.tolerance


def _output_gates(results: list[OutputParity]) -> list[Gate]:
    return [Gate(o.model, f"{o.output} max abs diff", o.max_abs_diff, o.tolerance.describe(), o.passed)
            for o in results]


def chain_name(spec: PipelineSpec) -> str:
    """How the gates name the served chain, e.g. `cpu chain (int8: text_encoder, image_encoder)`."""
    quantized = spec.export.cpu.quantized()
    return f"cpu chain (int8: {', '.join(quantized)})" if quantized else "cpu chain (fp32)"


def _frozen_set(spec: PipelineSpec, bench: Benchmark, repo: Path):
    """(candidate ids [sessions, per], PyTorch golden of the ranker) of the frozen candidate set used at export."""
    sessions = bench.frozen_sessions(spec.export.parity_samples)
    candidates = bench.sessions.candidates[sessions]
    golden = load_golden(repo, RANKER)
    if golden.rows != candidates.size or golden.labels is None:
        raise DataError(f"{RANKER} golden outputs do not hold the frozen candidate set ({golden.rows} rows, "
                        f"expected {candidates.size}); re-run `fusionrank export`")
    return candidates, golden


def _test_auc(spec: PipelineSpec, repo: Path, bench: Benchmark, chain: OrtChain,
              tables: dict[Modality, np.ndarray]) -> dict[str, float]:
    """Test-split AUC of the FP32 reference chain and of the served chain (its encoders' catalogue `tables`). The
    reference: PyTorch encoders (the catalogue embeddings training cached) and the FP32 `model.onnx` ranker, which
    export proved equal to the PyTorch ranker within the FP32 tolerance (no checkpoint needed here)."""
    enabled = spec.modalities.enabled
    names = [t.name for t in model_io(spec, RANKER).inputs]
    fp32 = OrtChain(spec, {RANKER: onnx_path(repo, RANKER)})
    aucs = []
    for runner, table in ((fp32, catalogue_embeddings(spec, bench)), (chain, tables)):
        rows = split_rows(bench, table, enabled, TEST)
        scores = runner.rank(dict(zip(names, [*rows.embeddings, rows.history])))[CLICK_PROBABILITY][:, 0]
        aucs.append(float(roc_auc_score(rows.labels, scores)))
    auc_fp32, auc_cpu = aucs
    return {"fp32_reference": auc_fp32, "cpu_chain": auc_cpu, "diff": abs(auc_fp32 - auc_cpu),
            "test_rows": int(len(rows.labels))}


def check_cpu_chain(spec: PipelineSpec, repo: Path, files: dict[str, Path], bench: Benchmark) -> CpuGateReport:
    """Run every gate on the chain of `files` ({model: served graph}); the report says which passed."""
    missing = [str(p) for p in files.values() if not Path(p).is_file()]
    if missing:
        raise DataError(f"CPU profile graphs not found: {', '.join(missing)}; run `fusionrank export`")
    cpu = spec.export.cpu
    report = CpuGateReport({m: Path(p).name for m, p in files.items()},
                           {m: cpu.precision_of(m).value for m in files},
                           {m: sha256_file(Path(p))[:16] for m, p in files.items()})
    candidates, golden = _frozen_set(spec, bench, repo)
    chain = OrtChain(spec, files)
    tables, embeddings = {}, {}
    for modality in spec.modalities.enabled:
        model = encoder_name(modality)
        (name,) = (t.name for t in model_io(spec, model).outputs)
        tables[modality] = chain.catalogue(bench, modality)
        # Export's golden data embeds every frozen candidate from its own payload (a video item by its still).
        embeddings[name] = chain.embed(modality, [bench.item(int(i)).payload(modality) for i in candidates.ravel()])
        report.outputs += check_outputs(model, {name: golden.inputs[name]}, {name: embeddings[name]},
                                        _tolerance_for(spec, model), raise_on_fail=False)
    report.outputs += check_outputs(RANKER, golden.outputs, chain.rank(golden.inputs), _tolerance_for(spec, RANKER),
                                    raise_on_fail=False)
    report.gates += _output_gates(report.outputs)
    scores = chain.rank({**golden.inputs, **embeddings})[CLICK_PROBABILITY]  # the golden's history and presence
    r = report.ranking = ranking_parity(golden.outputs[CLICK_PROBABILITY], scores, golden.labels, golden.groups,
                                        cpu.ranking)
    name = chain_name(spec)
    report.gates += [Gate(name, "top-10 overlap", r.top10_overlap, f">= {cpu.ranking.min_top10_overlap}",
                          r.top10_overlap >= cpu.ranking.min_top10_overlap),
                     Gate(name, "Kendall tau", r.kendall_tau, f">= {cpu.ranking.min_kendall_tau}",
                          r.kendall_tau >= cpu.ranking.min_kendall_tau),
                     Gate(name, "frozen-set AUC diff", r.auc_diff, f"<= {cpu.ranking.max_auc_diff}",
                          r.auc_diff <= cpu.ranking.max_auc_diff)]
    report.test_auc = _test_auc(spec, repo, bench, chain, tables)
    report.gates.append(Gate(name, "test AUC diff vs FP32", report.test_auc["diff"],
                             f"<= {cpu.max_test_auc_drop}", report.test_auc["diff"] <= cpu.max_test_auc_drop))
    return report

