"""Frozen-encoder embeddings of the whole catalogue, computed once per (catalogue, encoder spec) and cached.

The ranker trains on these, so training takes seconds instead of re-running three encoders every epoch. They go
through exactly the preprocessing and encoders the server uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fusionrank.benchmark import Benchmark, data_key
from fusionrank.models.encoders import build_encoder
from fusionrank.paths import cache_dir
from fusionrank.preprocess import PREPROCESS_VERSION, build_preprocessor
from fusionrank.spec import Modality, PipelineSpec, to_dict

log = logging.getLogger(__name__)
BATCH = 32


def _payloads(bench: Benchmark, modality: Modality) -> list[bytes]:
    return [item.payload(modality) for item in bench.items]


@torch.inference_mode()
def encode_payloads(spec: PipelineSpec, modality: Modality, payloads: list[bytes], encoder=None,
                    preprocessor=None, progress: str | None = None) -> np.ndarray:
    """Embeddings [N, D] of raw payloads, in batches, through the shared preprocessing and the PyTorch encoder."""
    encoder = encoder or build_encoder(spec, modality)
    preprocessor = preprocessor or build_preprocessor(spec, modality)
    out = []
    starts = range(0, len(payloads), BATCH)
    for start in tqdm(starts, desc=progress, disable=progress is None, unit="batch", leave=False):
        arrays = preprocessor(payloads[start:start + BATCH])
        out.append(encoder(**{k: torch.from_numpy(v) for k, v in arrays.items()}).numpy())
    return np.concatenate(out).astype(np.float32)


def embeddings_path(spec: PipelineSpec, modality: Modality) -> Path:
    """Cache file of one modality's catalogue embeddings, keyed by the data, the modality's spec and the
    preprocessing version (any change to what the encoder sees gives a new file)."""
    key = [data_key(spec), to_dict(getattr(spec.modalities, modality.value)), PREPROCESS_VERSION]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir(spec) / "embeddings" / f"{modality.value}-{digest}.npy"


def catalogue_embeddings(spec: PipelineSpec, bench: Benchmark) -> dict[Modality, np.ndarray]:
    """{modality: [num_items + 1, D]} with row 0 (padding id) all zeros; cached (see `embeddings_path`)."""
    result = {}
    for modality in spec.modalities.enabled:
        path = embeddings_path(spec, modality)
        if path.is_file():
            result[modality] = np.load(path)
            continue
        log.info("encoding %d catalogue items (%s)", bench.num_items, modality.value)
        emb = encode_payloads(spec, modality, _payloads(bench, modality), progress=f"encode {modality.value}")
        table = np.concatenate([np.zeros((1, emb.shape[1]), dtype=np.float32), emb])
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, table)
        result[modality] = table
    return result
