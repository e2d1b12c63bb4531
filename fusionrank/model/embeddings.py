"""Frozen-encoder embeddings of the whole catalogue, computed once per (catalogue, encoder spec) and cached.

The ranker trains on these, so training takes seconds instead of re-running three encoders every epoch. They go
through exactly the preprocessing, encoders and frame pooling the server uses (`fusionrank.request.candidates`): a video
item's image embedding is the mean over its K sampled frames.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fusionrank.contract.paths import cache_dir
from fusionrank.contract.spec import Modality, PipelineSpec, to_dict
from fusionrank.model.encoders import build_encoder
from fusionrank.model.synthetic_data import Benchmark, data_key
from fusionrank.preprocess import PREPROCESS_VERSION
from fusionrank.request.candidates import CandidatePreparer

log = logging.getLogger(__name__)
BATCH = 32


@torch.inference_mode()
def encode_items(spec: PipelineSpec, modality: Modality, payloads: Sequence[bytes],
                 videos: Sequence[bytes | None] | None = None, encoder=None, preparer: CandidatePreparer | None = None,
                 progress: str | None = None,
                 run: Callable[[Modality, dict[str, np.ndarray]], np.ndarray] | None = None) -> np.ndarray:
    """Embeddings [N, D] of one modality's raw payloads, in batches, as candidates that have only that modality (for
    the image, `videos` may give a clip per item, None or b"" for none: its frames are pooled with the still).
    `run(modality, encoder inputs)` encodes one batch; by default the PyTorch encoder (`encoder` or the spec's)."""
    preparer = preparer or CandidatePreparer(spec)
    enabled = spec.modalities.enabled
    j = enabled.index(modality)
    if run is None:
        encoder = encoder or build_encoder(spec, modality)

        def run(_, inputs):
            return encoder(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()

    out = []
    starts = range(0, len(payloads), BATCH)
    for start in tqdm(starts, desc=progress, disable=progress is None, unit="batch", leave=False):
        rows = list(payloads[start:start + BATCH])
        columns = {m: rows if m is modality else [b""] * len(rows) for m in enabled}
        present = np.zeros((len(rows), len(enabled)), dtype=bool)
        present[:, j] = True
        clips = None if videos is None else [v or b"" for v in videos[start:start + BATCH]]
        out.append(preparer(columns, present, clips).encode(run)[j])
    return np.concatenate(out).astype(np.float32)


def _cached(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    if path.is_file():
        return np.load(path)
    table = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, table)
    return table


def embeddings_path(spec: PipelineSpec, modality: Modality, kind: str = "") -> Path:
    """Cache file of one modality's catalogue embeddings, keyed by the data, the modality's spec (for the image,
    the video spec too: video items are embedded from their clip) and the preprocessing version (any change to what
    the encoder sees gives a new file)."""
    key = [data_key(spec), to_dict(getattr(spec.modalities, modality.value)), PREPROCESS_VERSION]
    if modality is Modality.IMAGE and spec.modalities.video_enabled:
        key.append(to_dict(spec.modalities.video))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir(spec) / "embeddings" / f"{modality.value}{kind}-{digest}.npy"


def catalogue_payloads(spec: PipelineSpec, bench: Benchmark,
                       modality: Modality) -> tuple[list[bytes], list[bytes | None] | None]:
    """(payloads, clips) of every catalogue item for one modality: clips (None for an item without one) only for the
    image when video is enabled, so a video item is embedded from its clip pooled with its still, as served."""
    if modality is Modality.IMAGE and spec.modalities.video_enabled:
        payloads, videos = (list(column) for column in zip(*(item.visual() for item in bench.items)))
        return payloads, videos
    return [item.payload(modality) for item in bench.items], None


def catalogue_embeddings(spec: PipelineSpec, bench: Benchmark) -> dict[Modality, np.ndarray]:
    """{modality: [num_items + 1, D]} with row 0 (padding id) all zeros; cached (see `embeddings_path`). Video items
    are embedded from their clip when video is enabled, else from their cover."""
    result = {}
    preparer = None
    for modality in spec.modalities.enabled:
        def compute(modality=modality):
            nonlocal preparer
            preparer = preparer or CandidatePreparer(spec)
            log.info("encoding %d catalogue items (%s)", bench.num_items, modality.value)
            payloads, videos = catalogue_payloads(spec, bench, modality)
            emb = encode_items(spec, modality, payloads, videos, preparer=preparer,
                               progress=f"encode {modality.value}")
            return np.concatenate([np.zeros((1, emb.shape[1]), dtype=np.float32), emb])

        result[modality] = _cached(embeddings_path(spec, modality), compute)
    return result


def cover_embeddings(spec: PipelineSpec, bench: Benchmark, tables: dict[Modality, np.ndarray]) -> np.ndarray:
    """The image table with every video item's row embedded from its cover instead of its clip (cached): the
    evaluation compares scoring video items by their clip with scoring them by their cover."""
    ids = np.flatnonzero(bench.video_items)

    def compute():
        table = tables[Modality.IMAGE].copy()
        if len(ids):
            table[ids] = encode_items(spec, Modality.IMAGE, [bench.item(int(i)).image_bytes() for i in ids],
                                      progress="encode covers")
        return table

    return _cached(embeddings_path(spec, Modality.IMAGE, "-covers"), compute)
