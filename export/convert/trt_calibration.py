"""INT8 entropy calibration for `export.convert.onnx2trt`: fixed-shape batches of real catalogue samples, fed to
TensorRT.

Implicit INT8 calibration (`IBuilderConfig.int8_calibrator` + `set_calibration_profile`) is deprecated since
TensorRT 10.1, still supported in 10.x and removed in TensorRT 11 (`export.convert.trt_precision` says what replaces
it).

The calibration table TensorRT writes is reused by later builds, so its name carries everything it depends on: the
ONNX graph, the spec (catalogue, preprocessing, `calibration_samples`), the calibration batch shape and the TensorRT
version; a change in any of them calibrates again instead of reusing a stale table.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from export.manifest import onnx_path, sha256_file, write_atomic
from export.node.cuda_memory import DeviceBuffers
from fusionrank.contract.names import RANKER, encoder_name
from fusionrank.contract.paths import tokenizer_dir
from fusionrank.contract.spec import Modality, PipelineSpec
from fusionrank.contract.tensors import MODALITY_MASK
from fusionrank.model.synthetic_data import Benchmark, load_benchmark
from fusionrank.preprocess import build_preprocessor
from fusionrank.request.candidates import presence_patterns

PREPROCESS_ROWS = 64  # items per preprocessor call, which is built to take one request's rows at a time


def calibration_batches(spec: PipelineSpec, repo: Path, model: str, batch_size: int,
                        samples: int) -> list[dict[str, np.ndarray]]:
    """Fixed-shape calibration batches for `model` from catalogue items (and sessions, for the ranker).

    TensorRT calibrates at the calibration profile's shape, so every batch has `batch_size` rows and text is padded
    to max_length (the attention mask keeps padding out of the pooled embedding). The ranker's embeddings come
    from the exported encoders (ONNX Runtime) over the same items, as in serving.
    """
    bench = load_benchmark(spec)
    rng = np.random.default_rng(spec.data.seed)
    n = math.ceil(max(samples, 1) / batch_size) * batch_size
    items = rng.choice(np.arange(1, bench.num_items + 1), size=n, replace=n > bench.num_items)
    enabled = spec.modalities.enabled
    if model == RANKER:
        arrays = {}
        for modality in enabled:
            encoder = encoder_name(modality)
            inputs = _encoder_inputs(spec, repo, modality, bench, items)
            arrays.update(_onnx_run(onnx_path(repo, encoder), inputs))
        sessions = rng.integers(0, len(bench.sessions), size=n)
        arrays["history"] = bench.sessions.history[sessions].astype(np.int64)
        # Calibrate on every presence pattern the ranker serves, complete candidates included.
        arrays[MODALITY_MASK] = presence_patterns(len(enabled), n).astype(np.float32)
    else:
        modality = next(m for m in enabled if encoder_name(m) == model)
        arrays = _encoder_inputs(spec, repo, modality, bench, items)
    return [{k: v[s:s + batch_size] for k, v in arrays.items()} for s in range(0, n, batch_size)]


def _encoder_inputs(spec: PipelineSpec, repo: Path, modality: Modality, bench: Benchmark, items: np.ndarray):
    tokenizer = tokenizer_dir(repo) if modality is Modality.TEXT else None
    pre = build_preprocessor(spec, modality, tokenizer_dir=tokenizer)
    parts = [pre([bench.item(int(i)).payload(modality) for i in items[s:s + PREPROCESS_ROWS]])
             for s in range(0, len(items), PREPROCESS_ROWS)]
    if modality is Modality.TEXT:
        width = spec.modalities.text.max_length
        parts = [{k: np.pad(v, ((0, 0), (0, width - v.shape[1]))) for k, v in p.items()} for p in parts]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _onnx_run(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in inputs.items() if k in wanted})))


def calibration_table(folder: Path, spec: PipelineSpec, model: str, onnx_file: Path, batch: dict[str, np.ndarray],
                      tensorrt_version: str) -> Path:
    """Where the calibration table of this exact graph, spec, batch shape and TensorRT version is kept."""
    key = {"onnx": sha256_file(onnx_file), "spec": spec.digest(), "tensorrt": tensorrt_version,
           "batch": {name: list(array.shape) for name, array in sorted(batch.items())}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"{model}-{digest}.calib"


def make_calibrator(trt, batches: list[dict[str, np.ndarray]], cache_file: Path):
    """A TensorRT entropy calibrator over `batches`; close its `device` buffers once the build is done."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """Feeds the calibration batches to TensorRT; the calibration table is cached beside the timing cache."""

        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches, self.index, self.device = batches, 0, DeviceBuffers()

        def get_batch_size(self):
            return len(next(iter(self.batches[0].values())))

        def get_batch(self, names):
            if self.index >= len(self.batches):
                return None
            batch = self.batches[self.index]
            self.index += 1
            return [self.device.upload_blocking(n, batch[n]) for n in names]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache):
            write_atomic(cache_file, bytes(cache))

    return EntropyCalibrator()
