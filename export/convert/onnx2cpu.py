"""onnx2cpu: the CPU profile's graphs, built from the exported `model.onnx` with ONNX Runtime's own tools.

- Optimised FP32 (`model.opt.onnx`). Text encoder: `onnxruntime.transformers.optimizer` (model_type bert: one
  EmbedLayerNormalization, one Attention per layer, BiasGelu), then ONNX Runtime's EXTENDED level, saved
  (SkipLayerNormalization, which the optimizer skips when its symbolic shape inference fails on opset-18 ReduceL2).
  CNNs and ranker: ONNX Runtime's EXTENDED level, saved (Conv+activation fusions). Not the ALL level: its NCHWc
  layout depends on the processor's vector width, so the server's ONNX Runtime applies it at load time.
- INT8 (`model.int8.onnx`). Every encoder: static QDQ quantization of the FP32 graph (per-channel int8 weights,
  uint8 activations whose ranges are calibrated on catalogue items through the shared preprocessing); kept as QDQ,
  which ONNX Runtime turns into integer kernels for the processor it runs on (QLinearConv for the CNNs, QLinearMatMul
  for the text encoder's MatMuls with constant weights; MLAS picks its u8s8 GEMM by CPUID, VNNI where present). Fixed
  scales make a row's result independent of its batch-mates (issue 19); the text encoder was quantized dynamically
  before, with a scale computed over the whole batch, and its embeddings moved by up to 2.8e-2 with their
  batch-mates. The ranker's INT8 graph is still dynamic (ONNX Runtime quantizes an LSTM dynamically only), so the
  batch-invariance gate refuses to serve it: the spec serves the ranker as FP32.
  `export.cpu.reduce_range` quantizes weights to 7 bits: x86 processors without VNNI
  multiply uint8 by int8 with an instruction (vpmaddubsw) whose 16-bit sums saturate; measured on this project's
  AVX2 machine, it lifted the INT8 image encoder's top-10 overlap from 0.927 to 0.991.

Which files a model gets and which one the CPU profile serves comes from `spec.export.cpu`; `export_cpu_profile`
builds them in a staging folder, runs the accuracy gates (`export.verify.cpu_gates`) and the batch-invariance gate
(`export.verify.batch_invariance`) on the chain the spec serves and only then moves them beside `model.onnx`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from export.manifest import onnx_path, version_dir
from export.profiles import engine_models
from export.verify.batch_invariance import INVARIANCE_METRIC, check_served_graphs, invariance_gates
from export.verify.cpu_gates import CpuGateReport, check_cpu_chain
from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.names import RANKER, encoder_modality, encoder_name
from fusionrank.contract.paths import resolve_text_checkpoint
from fusionrank.contract.spec import INT8_FILE, OPTIMIZED_FILE, CalibrationMethod, Modality, PipelineSpec, Precision
from fusionrank.model.synthetic_data import Benchmark, load_benchmark
from fusionrank.preprocess import build_preprocessor

log = logging.getLogger(__name__)

TEXT = encoder_name(Modality.TEXT)
DYNAMIC = (RANKER,)  # MLP+LSTM: ONNX Runtime quantizes an LSTM dynamically only (batch-variant: the gate refuses it)
CALIBRATION_BATCH = 16


class CpuExportError(FusionRankError):
    """A CPU-profile graph could not be built (optimizer or quantizer failure, missing FP32 model)."""


@contextlib.contextmanager
def quantizer_sandbox(path: Path) -> Iterator[None]:
    """Run ONNX Runtime's quantizer inside `path` with the root logger at WARNING: the quantizer can leave a
    uuid-named external-data file (90 MB seen) in the current directory, and it logs every tensor through the root
    logger at INFO. Export is single-threaded, so changing the process's directory is safe."""
    previous, root = Path.cwd(), logging.getLogger()
    level = root.level
    os.chdir(path)
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        os.chdir(previous)
        root.setLevel(level)


def _save_extended(source: Path, target: Path) -> None:
    """ONNX Runtime's EXTENDED graph optimisations applied to `source`, saved as `target`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def _text_geometry(spec: PipelineSpec) -> tuple[int, int]:
    """(attention heads, hidden size) of the text checkpoint, from its config.json (no transformers import)."""
    config = json.loads((resolve_text_checkpoint(spec.modalities.text.encoder.checkpoint) / "config.json").read_text())
    return int(config["num_attention_heads"]), int(config["hidden_size"])


def optimize_graph(spec: PipelineSpec, model: str, source: Path, target: Path, workdir: Path) -> Path:
    """The optimised FP32 graph of `model` (see the module docstring), written to `target`."""
    if model != TEXT:
        _save_extended(source, target)
        return target
    from onnxruntime.transformers import optimizer

    heads, hidden = _text_geometry(spec)
    # The optimizer's symbolic shape inference fails on opset-18 ReduceL2 (the L2 normalisation); it then prints
    # that and warns that it skips SkipLayerNormalization, which ONNX Runtime's EXTENDED level below fuses instead.
    skip_ln = logging.getLogger("fusion_skiplayernorm")
    level = skip_ln.level
    skip_ln.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            fused = optimizer.optimize_model(str(source), model_type="bert", num_heads=heads, hidden_size=hidden,
                                             opt_level=1)  # 1: ORT's constant folding first, which fusions need
    finally:
        skip_ln.setLevel(level)
    log.debug("transformer optimizer: %s %s", printed.getvalue().strip(), fused.get_fused_operator_statistics())
    if not fused.get_fused_operator_statistics().get("Attention"):
        raise CpuExportError(f"{model}: the transformer optimizer fused no Attention node in {source}; was the "
                             "encoder exported with eager attention (export/convert/torch2onnx.py)?")
    staged = workdir / f"{model}.fused.onnx"
    fused.save_model_to_file(str(staged))
    _save_extended(staged, target)
    return target


class CatalogueCalibration(CalibrationDataReader):
    """ONNX Runtime `CalibrationDataReader` over catalogue items spread evenly over the catalogue, preprocessed by the
    shared preprocessing in batches, as the encoder sees them in serving."""

    def __init__(self, spec: PipelineSpec, bench: Benchmark, modality: Modality, samples: int,
                 pad_to: int | None = None):
        ids = np.unique(np.linspace(1, bench.num_items, num=min(samples, bench.num_items)).round().astype(int))
        self.preprocessor = build_preprocessor(spec, modality)
        self.batches = [ids[s:s + CALIBRATION_BATCH] for s in range(0, len(ids), CALIBRATION_BATCH)]
        self.payloads = lambda batch: [bench.item(int(i)).payload(modality) for i in batch]
        self.samples = len(ids)
        self.pad_to = pad_to  # text: every batch padded to one length (the histogram calibrators need one shape)
        self._next = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._next, None)
        if batch is None:
            return None
        arrays = self.preprocessor(self.payloads(batch))
        if self.pad_to is None:
            return arrays
        return {k: np.pad(v, ((0, 0), (0, self.pad_to - v.shape[1]))) for k, v in arrays.items()}

    def __len__(self) -> int:
        return len(self.batches)

    def rewind(self) -> None:
        self._next = iter(self.batches)


_CALIBRATION = {CalibrationMethod.MINMAX: "MinMax", CalibrationMethod.PERCENTILE: "Percentile",
                CalibrationMethod.ENTROPY: "Entropy"}


def quantize_graph(spec: PipelineSpec, model: str, fp32: Path, optimized: Path | None, target: Path, workdir: Path,
                   bench: Benchmark) -> Path:
    """The INT8 graph of `model` (static QDQ for the encoders, dynamic for the ranker) at `target`."""
    with quantizer_sandbox(workdir):
        if model in DYNAMIC:
            if optimized is None:
                raise CpuExportError(f"{model}: dynamic quantization starts from the optimised graph; none given")
            return quantize_dynamic_graph(spec, model, optimized, target, workdir)
        return _quantize_static(spec, model, fp32, target, workdir, bench)


def quantize_dynamic_graph(spec: PipelineSpec, model: str, optimized: Path, target: Path, workdir: Path) -> Path:
    """Dynamic quantization of an optimised graph (per-channel int8 weights, activation scales computed per batch
    at run time: batch-variant), then EXTENDED again (MatMulInteger chains become DynamicQuantizeMatMul)."""
    import onnx
    from onnxruntime import quantization as q

    staged = workdir / f"{model}.qdyn.onnx"
    # Contrib ops of the optimised graph (Attention, SkipLayerNormalization) defeat ONNX shape inference, so the
    # quantizer is told their outputs are FP32.
    q.quantize_dynamic(optimized, staged, per_channel=True, reduce_range=spec.export.cpu.reduce_range,
                       weight_type=q.QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    _save_extended(staged, target)
    return target


def _fp32_nodes(graph: Path, patterns: tuple[str, ...]) -> list[str]:
    """Names of the nodes of `graph` that `export.cpu.fp32_nodes` leaves in FP32 (each pattern must match one)."""
    if not patterns:
        return []
    import onnx

    names = [n.name for n in onnx.load(str(graph), load_external_data=False).graph.node]
    kept = []
    for pattern in patterns:
        found = [name for name in names if re.search(pattern, name)]
        if not found:
            raise CpuExportError(f"export.cpu.fp32_nodes: {pattern!r} matches no node of {graph}")
        kept += found
    return sorted(set(kept))


def _quantize_static(spec: PipelineSpec, model: str, fp32: Path, target: Path, workdir: Path,
                     bench: Benchmark) -> Path:
    """Static QDQ quantization of `model`'s FP32 graph, activation ranges calibrated on catalogue items."""
    from onnxruntime import quantization as q

    cpu = spec.export.cpu
    modality = encoder_modality(model)
    extra: dict = {}
    if model == TEXT:
        # ONNX's symbolic shape inference fails on the text graph's opset-18 ReduceL2, so quant_pre_process cannot
        # run; the quantizer infers what it needs. Only MatMuls with a constant weight are quantized: the attention
        # products of two activations stay FP32 (their ranges swing per input).
        source, ops, extra["MatMulConstBOnly"] = fp32, ["MatMul"], True
    else:
        source, ops = workdir / f"{model}.prep.onnx", None
        q.quant_pre_process(str(fp32), str(source))  # symbolic shapes + basic folding, as ORT recommends
    keep = _fp32_nodes(source, cpu.fp32_nodes.get(model, ()))
    histogram = cpu.calibration_method is not CalibrationMethod.MINMAX
    reader = CatalogueCalibration(spec, bench, modality, cpu.calibration_samples,
                                  pad_to=max(spec.modalities.text.buckets) if model == TEXT and histogram else None)
    q.quantize_static(source, target, reader, quant_format=q.QuantFormat.QDQ, per_channel=True,
                      reduce_range=cpu.reduce_range, op_types_to_quantize=ops, extra_options=extra,
                      nodes_to_exclude=keep or None,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                      calibrate_method=getattr(q.CalibrationMethod, _CALIBRATION[cpu.calibration_method]))
    return target


def build_graphs(spec: PipelineSpec, repo: Path, model: str, out_dir: Path, bench: Benchmark, optimized: bool,
                 int8: bool) -> dict[str, Path]:
    """Build `model`'s optimised and/or INT8 graphs from `<repo>/<model>/1/model.onnx` into `out_dir`;
    returns {file name: path}. The optimised graph is also built when the INT8 one starts from it."""
    fp32, out_dir = onnx_path(repo, model).resolve(), Path(out_dir).resolve()  # the quantizer runs elsewhere (cwd)
    if not fp32.is_file():
        raise CpuExportError(f"{fp32} not found; run `fusionrank export` first")
    out_dir.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix=f"onnx2cpu-{model}-") as tmp:
        work = Path(tmp)
        if optimized or (int8 and model in DYNAMIC):
            built[OPTIMIZED_FILE] = optimize_graph(spec, model, fp32, out_dir / OPTIMIZED_FILE, work)
        if int8:
            built[INT8_FILE] = quantize_graph(spec, model, fp32, built.get(OPTIMIZED_FILE), out_dir / INT8_FILE,
                                              work, bench)
    return built


def served_files(spec: PipelineSpec, repo: Path, staged: dict[str, dict[str, Path]]) -> dict[str, Path]:
    """{model: the file the CPU profile serves}: the staged one when it was just built, else the repository's."""
    files = {}
    for model in engine_models(spec):
        name = spec.export.cpu.onnx_file(model)
        files[model] = staged.get(model, {}).get(name, version_dir(repo, model) / name)
    return files


def export_cpu_profile(spec: PipelineSpec, repo: Path, models: list[str] | None = None,
                       bench: Benchmark | None = None) -> CpuGateReport:
    """Build the CPU profile's graphs of `models` (all by default), gate the served chain, then install them beside
    model.onnx. A failed gate raises CpuGateError (BatchInvarianceError for a graph whose rows move with their
    batch-mates) and removes the rebuilt models' stale CPU graphs, so a server never
    loads an INT8 graph that failed (or was never checked against) the current weights."""
    repo = Path(repo)
    bench = bench or load_benchmark(spec)
    cpu = spec.export.cpu
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".cpu-staging-", dir=repo) as tmp:
        staged = {}
        for model in engine_models(spec) if models is None else models:
            int8 = cpu.precision_of(model) is Precision.INT8
            if cpu.optimize or int8:
                log.info("building the CPU graphs of %s (%s)", model, cpu.precision_of(model).value)
                staged[model] = build_graphs(spec, repo, model, Path(tmp) / model, bench, cpu.optimize, int8)
        build_s = time.monotonic() - started
        for model in staged:
            for name in (OPTIMIZED_FILE, INT8_FILE):
                (version_dir(repo, model) / name).unlink(missing_ok=True)
        files = served_files(spec, repo, staged)
        report = check_cpu_chain(spec, repo, files, bench)
        invariance = check_served_graphs(spec, repo, files)
        report.gates += invariance_gates(invariance)
        report.seconds = {"build": round(build_s, 1), "gates": round(time.monotonic() - started - build_s, 1)}
        report.write(repo)
        failed = next((g for g in report.gates if not g.passed), None)
        if failed is not None and failed.metric == INVARIANCE_METRIC:
            next(r for r in invariance if r.model == failed.model).raise_on_failure()
        report.raise_on_failure()
        for model, files in staged.items():
            for name, path in files.items():
                shutil.move(str(path), version_dir(repo, model) / name)
    return report
