"""Per-model side by side on this node: FP32 `model.onnx` vs optimised FP32 vs INT8, and which kernels each runs.

- `model_variants`: {variant: graph} per model; the optimised and INT8 graphs are the repository's when present,
  else built into a scratch folder with `export.convert.onnx2cpu.build_graphs` (so a model the spec serves as FP32 is
  still compared against its INT8 graph).
- `compare_models`: rows/s per model, variant and batch size with one intra-op thread (as the CPU profile runs each
  session). Variants are interleaved round by round and each keeps its best round: on a shared machine other work
  slows a round down but never speeds it up. CPU seconds of the calling thread are kept beside wall time; with one
  intra-op thread ONNX Runtime computes on the calling thread, so they show the cost without the waiting.
- `kernel_profile`: ONNX Runtime's per-node profile of one graph, summed per operator type: which kernels run
  (QLinearConv, DynamicQuantizeMatMul, ...) and their share of the time.
- `gemm_probe`: one MatMul the size of the text encoder's feed-forward layer, FP32 vs dynamically quantized INT8:
  whether this processor's INT8 kernels (VNNI / AMX, or AVX2's vpmaddubsw) are faster at all.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.latency import tile_rows
from export.convert.onnx2cpu import build_graphs, quantizer_sandbox
from export.manifest import onnx_path, version_dir
from export.profiles import engine_models
from export.verify.golden import load_golden
from fusionrank.contract.spec import INT8_FILE, OPTIMIZED_FILE, PipelineSpec
from fusionrank.model.synthetic_data import Benchmark, load_benchmark

VARIANTS = ("fp32", "opt", "int8")
BATCH_SIZES = (1, 16, 64)


@dataclass(frozen=True)
class VariantSpeed:
    model: str
    variant: str
    batch: int
    rows_per_s: float  # wall clock, best round
    cpu_rows_per_s: float  # per CPU second of the calling thread, best round
    rounds: int

    def as_dict(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}


def model_variants(spec: PipelineSpec, repo: Path, scratch: Path, bench: Benchmark | None = None,
                   models: tuple[str, ...] | None = None) -> dict[str, dict[str, Path]]:
    """{model: {variant: graph}} for fp32 / opt / int8; missing graphs are built under `scratch`."""
    result = {}
    for model in models or engine_models(spec):
        here = version_dir(repo, model)
        files = {"fp32": onnx_path(repo, model)}
        missing = {name: here / name for name in (OPTIMIZED_FILE, INT8_FILE) if not (here / name).is_file()}
        if missing:
            bench = bench or load_benchmark(spec)
            built = build_graphs(spec, repo, model, scratch / model, bench, OPTIMIZED_FILE in missing,
                                 INT8_FILE in missing)
            missing = {name: built.get(name, path) for name, path in missing.items()}
        files["opt"] = missing.get(OPTIMIZED_FILE, here / OPTIMIZED_FILE)
        files["int8"] = missing.get(INT8_FILE, here / INT8_FILE)
        result[model] = files
    return result


def _session(path: Path, threads: int = 1, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(session, inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    return tile_rows({n: inputs[n] for n in names}, batch)


def _timed_round(session, feed: dict[str, np.ndarray], budget_s: float) -> tuple[float, float, int]:
    """(wall s, CPU s, calls) of one round: calls until `budget_s` has passed (at least one; the caller warms up)."""
    calls, wall0, cpu0 = 0, time.perf_counter(), time.thread_time()
    while calls < 1 or time.perf_counter() - wall0 < budget_s:
        session.run(None, feed)
        calls += 1
    return time.perf_counter() - wall0, time.thread_time() - cpu0, calls


def compare_models(spec: PipelineSpec, repo: Path, variants: dict[str, dict[str, Path]],
                   batch_sizes: tuple[int, ...] = BATCH_SIZES, rounds: int = 3, budget_s: float = 0.5,
                   progress=None) -> list[VariantSpeed]:
    """Rows/s of every model's variants at each batch size (golden inputs tiled), interleaved, best round kept."""
    results = []
    for model, files in variants.items():
        inputs = load_golden(repo, model).inputs
        sessions = {v: _session(p) for v, p in files.items()}
        for batch in batch_sizes:
            if progress:
                progress(f"{model} batch {batch}")
            best: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
            feeds = {variant: _feed(session, inputs, batch) for variant, session in sessions.items()}
            for variant, session in sessions.items():  # once per shape, not per round: a batch-64 image call is seconds
                session.run(None, feeds[variant])
            for _ in range(rounds):
                for variant, session in sessions.items():
                    wall, cpu, calls = _timed_round(session, feeds[variant], budget_s)
                    rows = batch * calls
                    best[variant] = (max(best[variant][0], rows / wall), max(best[variant][1], rows / max(cpu, 1e-9)))
            results += [VariantSpeed(model, v, batch, *best[v], rounds) for v in sessions]
    return results


@dataclass(frozen=True)
class KernelShare:
    op_type: str
    ms_per_run: float
    share: float
    provider: str

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def kernel_profile(path: Path, inputs: dict[str, np.ndarray], batch: int = 16, runs: int = 5,
                   top: int = 6) -> list[KernelShare]:
    """The operator types that take the time when ONNX Runtime runs `path` (one intra-op thread), largest first."""
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        session = _session(path, profile_prefix=str(Path(tmp) / "profile"))
        feed = _feed(session, inputs, batch)
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = defaultdict(float)
    providers: dict[str, str] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            args = event["args"]
            totals[args["op_name"]] += event["dur"]
            providers[args["op_name"]] = args.get("provider", "")
    total = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [KernelShare(op, us / runs / 1000.0, us / total, providers[op]) for op, us in ranked]


def gemm_probe(rows: int = 256, inner: int = 384, cols: int = 1536, budget_s: float = 0.3, rounds: int = 3) -> dict:
    """Giga-operations per CPU second of one [rows, inner] x [inner, cols] MatMul, FP32 and INT8, one thread."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((inner, cols)) * 0.05).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "gemm",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", inner])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", cols])], [weight])
    feed = {"X": rng.standard_normal((rows, inner)).astype(np.float32)}
    result = {}
    with tempfile.TemporaryDirectory(prefix="gemm-probe-") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fp32))
        with quantizer_sandbox(Path(tmp)):
            quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
        sessions = {"fp32": _session(fp32), "int8": _session(int8)}
        for session in sessions.values():
            session.run(None, feed)
        for _ in range(rounds):
            for name, session in sessions.items():
                _, cpu, calls = _timed_round(session, feed, budget_s)
                result[name] = max(result.get(name, 0.0), 2.0 * rows * inner * cols * calls / cpu / 1e9)
    return {"shape": [rows, inner, cols], "fp32_gops": round(result["fp32"], 1), "int8_gops": round(result["int8"], 1),
            "int8_speedup": round(result["int8"] / result["fp32"], 2)}


def speed_table(speeds: list[VariantSpeed]) -> str:
    """Markdown: one row per model and batch size, rows/s per variant (wall, best round) and INT8's speed-up."""
    by_key: dict[tuple[str, int], dict[str, VariantSpeed]] = defaultdict(dict)
    for s in speeds:
        by_key[(s.model, s.batch)][s.variant] = s
    lines = ["| model | batch | fp32 rows/s | opt rows/s | int8 rows/s | int8 / fp32 | int8 / fp32 (CPU time) |",
             "|---|---|---|---|---|---|---|"]
    for (model, batch), row in by_key.items():
        cells = [f"{row[v].rows_per_s:.1f}" if v in row else "-" for v in VARIANTS]
        ratio = cpu_ratio = "-"
        if "int8" in row and "fp32" in row:
            ratio = f"{row['int8'].rows_per_s / row['fp32'].rows_per_s:.2f}x"
            cpu_ratio = f"{row['int8'].cpu_rows_per_s / row['fp32'].cpu_rows_per_s:.2f}x"
        lines.append(f"| {model} | {batch} | {' | '.join(cells)} | {ratio} | {cpu_ratio} |")
    return "\n".join(lines)
