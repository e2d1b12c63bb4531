"""torch2onnx: each encoder and the ranker to ONNX, with parity against PyTorch proven right after export.

Tensor names and named dynamic axes come from `fusionrank.contract.tensors` (the same contract the Triton configs and
the TensorRT profiles use). For each model this writes into the repository:

- `<model>/1/model.onnx`;
- `<model>/1/golden.npz`: PyTorch inputs (`in.<name>`) and outputs (`out.<name>`) on real catalogue samples, for
  checking engines later (the ranker's also holds `labels` and `groups` of the frozen candidate set);
- `preprocess/1/tokenizer/`: the text encoder checkpoint's tokenizer, for the preprocessing model;
- `parity.json` at the repository root: the parity table.

Parity samples are real: catalogue items of frozen test sessions, with titles joined so every padding bucket is
exercised. The ranker is checked on complete candidates and on every presence pattern (`modality_mask` cycling
through every non-empty subset of modalities, down to text alone); its golden data holds the mixed patterns.
Ranking parity scores the frozen candidate set through the whole chain twice (PyTorch encoders + ranker vs ONNX
Runtime encoders + ranker).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from export.convert.fp16_constants import fp16_safe_constants
from export.convert.onnx2cpu import export_cpu_profile
from export.manifest import golden_path, onnx_path
from export.profiles import engine_models
from export.verify.cpu_gates import CpuGateReport
from export.verify.parity import OutputParity, RankingParity, check_outputs, ranking_parity
from fusionrank.contract.errors import CheckpointError, FusionRankError
from fusionrank.contract.names import RANKER, encoder_name
from fusionrank.contract.paths import resolve_text_checkpoint, tokenizer_dir
from fusionrank.contract.spec import Modality, PipelineSpec
from fusionrank.contract.tensors import CLICK_PROBABILITY, MODALITY_MASK, model_io
from fusionrank.model.encoders import TextEncoder, build_encoder
from fusionrank.model.fusion import load_ranker
from fusionrank.model.synthetic_data import Benchmark, load_benchmark
from fusionrank.model.train import checkpoint_path
from fusionrank.preprocess import build_preprocessor
from fusionrank.preprocess.text import load_tokenizer
from fusionrank.request.candidates import presence_patterns

log = logging.getLogger(__name__)


@dataclass
class ExportReport:
    outputs: list[OutputParity] = field(default_factory=list)
    ranking: RankingParity | None = None
    files: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # the CPU profile's graphs and gates (export/convert/onnx2cpu.py), in cpu_parity.json
    cpu: CpuGateReport | None = None

    def as_dict(self) -> dict:
        return {"outputs": [o.as_dict() for o in self.outputs],
                "ranking": self.ranking.as_dict() if self.ranking else None, "files": self.files,
                "seconds": self.seconds}

    def table(self) -> str:
        lines = ["| model | output | inputs | max abs diff | tolerance | parity |", "|---|---|---|---|---|---|"]
        for o in self.outputs:
            lines.append(f"| {o.model} | {o.output} | {o.inputs} | {o.max_abs_diff:.2e} | {o.tolerance.describe()} "
                         f"| {'ok' if o.passed else 'FAIL'} |")
        if self.ranking:
            r = self.ranking
            lines.append(f"\nranking parity on {r.candidates} frozen candidates (PyTorch chain vs ONNX Runtime chain):"
                         f" top-10 overlap {r.top10_overlap:.3f}, Kendall tau {r.kendall_tau:.5f}, "
                         f"AUC {r.auc_reference:.4f} vs {r.auc_actual:.4f} (diff {r.auc_diff:.2e}) -> "
                         f"{'ok' if r.passed else 'FAIL'}")
        if self.cpu:
            lines += ["", "CPU profile (export.cpu: served graph per model, gates against the FP32 PyTorch chain):",
                      self.cpu.table()]
        return "\n".join(lines)


def _describe(inputs: dict[str, np.ndarray]) -> str:
    hidden = ("attention_mask", "history", MODALITY_MASK)
    shapes = [f"{k} {list(v.shape)}" for k, v in inputs.items() if k not in hidden]
    if MODALITY_MASK in inputs:
        patterns = len(np.unique(inputs[MODALITY_MASK], axis=0))
        shapes.append("all present" if inputs[MODALITY_MASK].all() else f"{patterns} presence patterns")
    return ", ".join(shapes)


def _checked(model: str, reference, actual, spec: PipelineSpec, inputs) -> list[OutputParity]:
    return [dataclasses.replace(r, inputs=_describe(inputs))
            for r in check_outputs(model, reference, actual, spec.export.tolerance)]


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def export_onnx(module: torch.nn.Module, spec: PipelineSpec, model: str, sample: dict[str, np.ndarray],
                path: Path) -> Path:
    """torch.onnx.export with the contract's names and dynamic axes; returns the written path."""
    io = model_io(spec, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(torch.from_numpy(sample[t.name]) for t in io.inputs)
    axes = {t.name: t.dynamic_axes() for t in (*io.inputs, *io.outputs)}
    try:
        torch.onnx.export(module, args, str(path), input_names=[t.name for t in io.inputs],
                          output_names=[t.name for t in io.outputs], dynamic_axes=axes,
                          opset_version=spec.export.opset, dynamo=False)
    except Exception as exc:  # the exporter raises many types; name the model
        raise FusionRankError(f"torch.onnx.export failed for {model}: {exc}") from exc
    # transformers' -3.4e38 attention-mask constant would be -inf in an FP16 engine (export/convert/fp16_constants.py).
    fp16_safe_constants(path)
    return path


@contextlib.contextmanager
def _eager_attention(encoder: torch.nn.Module):
    """The text encoder with eager attention while it is exported: ONNX Runtime's transformer optimizer
    (export/convert/onnx2cpu.py) fuses the attention subgraph that exports, not the one transformers 5's SDPA path
    exports. Same arithmetic; parity is still checked against the module as PyTorch runs it."""
    model = encoder.model if isinstance(encoder, TextEncoder) else None
    previous = model.config._attn_implementation if model is not None else None
    if previous in (None, "eager"):
        yield encoder
        return
    model.set_attn_implementation("eager")
    try:
        yield encoder
    finally:
        model.set_attn_implementation(previous)


@torch.inference_mode()
def _torch_outputs(module, spec: PipelineSpec, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    io = model_io(spec, model)
    out = module(*(torch.from_numpy(inputs[t.name]) for t in io.inputs))
    out = out if isinstance(out, tuple) else (out,)
    return {t.name: o.numpy() for t, o in zip(io.outputs, out)}


def _ort_outputs(session, spec: PipelineSpec, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    io = model_io(spec, model)
    values = session.run([t.name for t in io.outputs], {t.name: inputs[t.name] for t in io.inputs})
    return dict(zip((t.name for t in io.outputs), values))


def _text_samples(bench: Benchmark, items: list[int], spec: PipelineSpec, tokenizer) -> list[list[bytes]]:
    """Real titles, alone and joined into longer texts, grouped by padding bucket: every bucket gets samples."""
    text = spec.modalities.text
    titles = [bench.item(i).title for i in items]
    by_bucket: dict[int, list[bytes]] = {b: [] for b in text.buckets}
    for joined in range(1, 12):
        for start in range(0, len(titles) - joined + 1, joined):
            sample = " ".join(titles[start:start + joined])
            tokens = len(tokenizer.encode(sample).ids)  # the preprocessor's tokenizer truncates at max_length
            by_bucket[text.bucket_for(tokens)].append(sample.encode())
    return [rows[: spec.export.parity_samples] for rows in by_bucket.values() if rows]


def _sample_items(bench: Benchmark, spec: PipelineSpec) -> tuple[np.ndarray, list[int]]:
    sessions = bench.frozen_sessions(spec.export.parity_samples)
    items = list(dict.fromkeys(bench.sessions.candidates[sessions].ravel().tolist()))[: spec.export.parity_samples]
    return sessions, items


def _models_to_export(spec: PipelineSpec, models: list[str] | None, checkpoint: Path | None) -> tuple[list[str], Path]:
    """The models asked for (all by default) and the ranker checkpoint; FusionRankError/CheckpointError when wrong."""
    wanted = engine_models(spec)
    models = list(models or wanted)
    unknown = [m for m in models if m not in wanted]
    if unknown:
        raise FusionRankError(f"cannot export {unknown}: exportable models are {', '.join(wanted)}")
    checkpoint = Path(checkpoint) if checkpoint else checkpoint_path(spec, spec.ranker.fusion.value)
    if RANKER in models and not checkpoint.is_file():
        raise CheckpointError(f"ranker checkpoint {checkpoint} does not exist; run `fusionrank train` first")
    return models, checkpoint


def _save_tokenizer(spec: PipelineSpec, repo: Path) -> Path | None:
    """The text encoder checkpoint's tokenizer, copied for the preprocessing model; None when text is disabled."""
    if not spec.modalities.text.enabled:
        return None
    text_dir = resolve_text_checkpoint(spec.modalities.text.encoder.checkpoint)
    load_tokenizer(text_dir).save_pretrained(str(tokenizer_dir(repo)))
    return text_dir


def _export_encoder(spec: PipelineSpec, repo: Path, modality: Modality, bench: Benchmark, items: list[int],
                    candidates: np.ndarray, text_dir: Path | None, write_onnx: bool, report: ExportReport,
                    ) -> tuple[str, np.ndarray, np.ndarray]:
    """Export one encoder (when asked), prove parity on samples, store golden outputs, and embed the frozen candidate
    set with both runtimes; returns (output name, PyTorch embeddings, ONNX Runtime embeddings)."""
    model = encoder_name(modality)
    started = time.monotonic()
    encoder = build_encoder(spec, modality)
    pre = build_preprocessor(spec, modality, tokenizer_dir=text_dir)
    if modality is Modality.TEXT:
        sample_groups = [pre(rows) for rows in _text_samples(bench, items, spec, pre.tokenizer)]
    else:
        sample_groups = [pre([bench.item(i).payload(modality) for i in items])]
    path = onnx_path(repo, model)
    if write_onnx:
        with _eager_attention(encoder):
            export_onnx(encoder, spec, model, sample_groups[0], path)
    session = _session(path)
    golden = None
    for group in sample_groups:
        reference = _torch_outputs(encoder, spec, model, group)
        report.outputs += _checked(model, reference, _ort_outputs(session, spec, model, group), spec, group)
        golden = golden or {**{f"in.{k}": v for k, v in group.items()}, **{f"out.{k}": v for k, v in reference.items()}}
    np.savez(golden_path(repo, model), **golden)
    # Whole candidate set through both runtimes, in request-sized chunks (one request = one bucket).
    t_parts, o_parts = [], []
    for row in candidates:
        arrays = pre([bench.item(int(i)).payload(modality) for i in row])
        t_parts.append(_torch_outputs(encoder, spec, model, arrays))
        o_parts.append(_ort_outputs(session, spec, model, arrays))
    name = model_io(spec, model).outputs[0].name
    report.files[model] = str(path)
    report.seconds[model] = round(time.monotonic() - started, 2)
    return name, np.concatenate([p[name] for p in t_parts]), np.concatenate([p[name] for p in o_parts])


def _export_ranker(spec: PipelineSpec, repo: Path, checkpoint: Path, bench: Benchmark, sessions: np.ndarray,
                   torch_emb: dict[str, np.ndarray], ort_emb: dict[str, np.ndarray], write_onnx: bool,
                   report: ExportReport) -> None:
    """Export the ranker (when asked), prove output parity on complete candidates and on every presence pattern,
    ranking parity of the whole chain, and store golden data (the mixed presence patterns)."""
    started = time.monotonic()
    ranker = load_ranker(checkpoint, spec=spec)
    per = bench.sessions.candidates.shape[1]
    history = np.repeat(bench.sessions.history[sessions], per, axis=0)
    rows, modalities = len(history), len(spec.modalities.enabled)
    complete = {**torch_emb, "history": history, MODALITY_MASK: np.ones((rows, modalities), dtype=np.float32)}
    mixed = {**complete, MODALITY_MASK: presence_patterns(modalities, rows).astype(np.float32)}
    path = onnx_path(repo, RANKER)
    if write_onnx:
        export_onnx(ranker, spec, RANKER, {k: v[:8] for k, v in mixed.items()}, path)
    session = _session(path)
    reference = _torch_outputs(ranker, spec, RANKER, complete)
    report.outputs += _checked(RANKER, reference, _ort_outputs(session, spec, RANKER, complete), spec, complete)
    golden = _torch_outputs(ranker, spec, RANKER, mixed)
    report.outputs += _checked(RANKER, golden, _ort_outputs(session, spec, RANKER, mixed), spec, mixed)
    onnx_chain = _ort_outputs(session, spec, RANKER, {**complete, **ort_emb})
    labels = bench.sessions.clicks[sessions].ravel()
    groups = np.repeat(bench.sessions.user[sessions], per)
    report.ranking = ranking_parity(reference[CLICK_PROBABILITY], onnx_chain[CLICK_PROBABILITY], labels, groups,
                                    spec.export.ranking, model="onnx pipeline", raise_on_fail=True)
    np.savez(golden_path(repo, RANKER), **{f"in.{k}": v for k, v in mixed.items()},
             **{f"out.{k}": v for k, v in golden.items()}, labels=labels, groups=groups)
    report.files[RANKER] = str(path)
    report.seconds[RANKER] = round(time.monotonic() - started, 2)


def export_all(spec: PipelineSpec, repo: Path, checkpoint: Path | None = None, models: list[str] | None = None,
               ) -> ExportReport:
    """Export the encoders and the ranker, prove parity (raises ParityError on failure), write golden outputs."""
    repo = Path(repo)
    models, checkpoint = _models_to_export(spec, models, checkpoint)
    bench = load_benchmark(spec)
    sessions, items = _sample_items(bench, spec)
    text_dir = _save_tokenizer(spec, repo)
    report = ExportReport()
    # The frozen candidate set: encoders of both runtimes see identical inputs, one request per session.
    candidates = bench.sessions.candidates[sessions]
    torch_emb, ort_emb = {}, {}
    for modality in spec.modalities.enabled:
        name, torch_emb[name], ort_emb[name] = _export_encoder(
            spec, repo, modality, bench, items, candidates, text_dir, encoder_name(modality) in models, report)
    _export_ranker(spec, repo, checkpoint, bench, sessions, torch_emb, ort_emb, RANKER in models, report)
    (repo / "parity.json").write_text(json.dumps(report.as_dict(), indent=2))
    # The CPU profile's optimised / INT8 graphs, gated against the FP32 PyTorch chain (export.cpu in the spec).
    report.cpu = export_cpu_profile(spec, repo, models=models, bench=bench)
    return report
