"""Ragged candidates: a request's candidates may lack modalities and may carry a video as (or beside) their image.

`CandidatePreparer` validates one request's payload columns against `modality_present` (the contract in
`fusionrank.contract.tensors`), preprocesses only the rows that have each modality (an encoder never sees an absent
row), and `PreparedCandidates.encode` puts the encoders' outputs back in candidate order: a candidate's still and its
video's K frames mean-pooled into one image embedding, zeros where a modality is absent (the ranker's
`modality_mask` says which). The PyTorch reference, the catalogue embeddings and the serving route all go through
it, so they agree on every rule and every error message.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusionrank.contract.errors import PreprocessError
from fusionrank.contract.spec import Modality, PipelineSpec, to_dict
from fusionrank.contract.tensors import ITEM_INPUT, ITEM_VIDEO, MODALITY_PRESENT
from fusionrank.preprocess import build_preprocessor

_ROW = re.compile(r"^(?P<input>.*)\[(?P<row>\d+)\]$")


def check_presence(spec: PipelineSpec, payloads: Mapping[Modality, Sequence[bytes]],
                   present: np.ndarray | None = None, videos: Sequence[bytes] | None = None) -> np.ndarray:
    """The request's presence matrix (bool [N, M], enabled-modality order), every rule of the contract checked:
    absent means an empty payload (and no video for the image), present means a payload (a still or a video for
    the image; emptiness of text and audio is left to their preprocessors), and every candidate has a modality."""
    modalities = spec.modalities.enabled
    rows = len(payloads[modalities[0]])
    for m in modalities:
        if len(payloads[m]) != rows:
            raise PreprocessError(ITEM_INPUT[m], f"{len(payloads[m])} rows, but the request has {rows} candidates")
    if videos is not None:
        if not spec.modalities.video_enabled:
            raise PreprocessError(ITEM_VIDEO, "video input is disabled in this deployment (modalities.video)")
        if len(videos) != rows:
            raise PreprocessError(ITEM_VIDEO, f"{len(videos)} rows, but the request has {rows} candidates")
    if present is None:
        present = np.ones((rows, len(modalities)), dtype=bool)
    present = np.asarray(present)
    if present.dtype != np.bool_:
        raise PreprocessError(MODALITY_PRESENT, f"expected BOOL, got {present.dtype}")
    if present.shape != (rows, len(modalities)):
        raise PreprocessError(MODALITY_PRESENT, f"expected shape [{rows}, {len(modalities)}] (one column per "
                                                f"enabled modality: {', '.join(m.value for m in modalities)}), "
                                                f"got {list(present.shape)}")
    for row in range(rows):
        _check_row(modalities, payloads, present[row], videos, row)
    return present


def _check_row(modalities, payloads, present_row: np.ndarray, videos, row: int) -> None:
    if not present_row.any():
        raise PreprocessError(f"{MODALITY_PRESENT}[{row}]", "the candidate has no modality present; at least one "
                                                            "is required")
    video = videos[row] if videos is not None else b""
    for m, present in zip(modalities, present_row):
        payload = payloads[m][row]
        if not present and payload:
            raise PreprocessError(f"{ITEM_INPUT[m]}[{row}]", f"{m.value} is marked absent in {MODALITY_PRESENT} but "
                                                            f"the payload has {len(payload)} bytes (send b'' for an "
                                                            "absent modality)")
        if m is Modality.IMAGE and not present and video:
            raise PreprocessError(f"{ITEM_VIDEO}[{row}]", f"image is marked absent in {MODALITY_PRESENT} but the "
                                                         f"video has {len(video)} bytes")
        if m is Modality.IMAGE and present and not payload and videos is not None and not video:
            raise PreprocessError(f"{ITEM_INPUT[m]}[{row}]", f"image is empty and {ITEM_VIDEO} is empty too (mark "
                                                            f"the image absent in {MODALITY_PRESENT} if it has none)")


def presence_patterns(modalities: int, rows: int) -> np.ndarray:
    """bool [rows, modalities] cycling through every non-empty presence pattern, complete first then each absence
    pattern down to a single modality (e.g. text only): for parity checks and tests."""
    patterns = sorted((p for p in range(1, 2 ** modalities)), key=lambda p: (-bin(p).count("1"), p))
    table = np.array([[bool(p >> (modalities - 1 - j) & 1) for j in range(modalities)] for p in patterns])
    return table[np.arange(rows) % len(table)]


def image_cache_payload(spec: PipelineSpec, still: bytes, video: bytes) -> bytes:
    """What the embedding cache keys a candidate with a video by: its still, its video and the video section of the
    spec (K frames, limits), so a changed K never serves an old pooled embedding. Anybody can rebuild these bytes:
    their key lives in the `frames` namespace (`fusionrank.route.item_keys.PayloadKind`), never a still's."""
    section = json.dumps(to_dict(spec.modalities.video), sort_keys=True).encode()
    return b"fusionrank-video-v1\0" + b"\0".join(hashlib.sha256(part).digest() for part in (section, still, video))


def pool_rows(values: np.ndarray, owners: np.ndarray, rows: int) -> np.ndarray:
    """[rows, D]: the mean of the `values` rows each candidate owns; zeros for a candidate that owns none. A
    candidate with one row gets that row exactly."""
    out = np.zeros((rows, values.shape[1]), dtype=np.float32)
    np.add.at(out, owners, values.astype(np.float32, copy=False))
    counts = np.bincount(owners, minlength=rows)
    return out / np.maximum(counts, 1)[:, None].astype(np.float32)


def _renumbered(exc: PreprocessError, rows: np.ndarray) -> PreprocessError:
    """A preprocessor's error about its i-th row, about the request's row rows[i] instead."""
    match = _ROW.match(exc.input_name)
    if not match:
        return exc
    return PreprocessError(f"{match['input']}[{int(rows[int(match['row'])])}]", exc.problem)


@dataclass(frozen=True)
class PreparedCandidates:
    """One request after validation and preprocessing; the encoder inputs hold only the rows that have each
    modality (for the image: every still and every sampled video frame, in one batch)."""

    present: np.ndarray  # [N, M] bool
    modalities: tuple[Modality, ...]
    dims: tuple[int, ...]  # embedding size per modality
    inputs: dict[Modality, dict[str, np.ndarray]]
    owners: dict[Modality, np.ndarray]  # the candidate each encoder-input row belongs to

    @property
    def rows(self) -> int:
        return len(self.present)

    def mask(self) -> np.ndarray:
        """The ranker's `modality_mask`: FP32 [N, M], 1 present, 0 absent."""
        return self.present.astype(np.float32)

    def encode(self, run: Callable[[Modality, dict[str, np.ndarray]], np.ndarray]) -> list[np.ndarray]:
        """Embeddings [N, D] per modality: `run(modality, encoder inputs)` is called once per modality that any
        candidate has (never for a modality no candidate has), and its rows pooled back per candidate."""
        out = []
        for m, dim in zip(self.modalities, self.dims):
            if len(self.owners[m]):
                out.append(pool_rows(np.asarray(run(m, self.inputs[m])), self.owners[m], self.rows))
            else:
                out.append(np.zeros((self.rows, dim), dtype=np.float32))
        return out


class CandidatePreparer:
    """Validates and preprocesses one request's candidates; safe to call from several threads (the preprocessors
    keep no per-call state)."""

    def __init__(self, spec: PipelineSpec, tokenizer_dir: Path | None = None):
        self.spec = spec
        self.modalities = spec.modalities.enabled
        self.preprocessors = {m: build_preprocessor(spec, m, tokenizer_dir=tokenizer_dir if m is Modality.TEXT
                                                    else None) for m in self.modalities}
        self.video = None
        if spec.modalities.video_enabled:
            from fusionrank.preprocess.video import VideoPreprocessor  # PyAV only where video is enabled

            self.video = VideoPreprocessor(spec.modalities.video, spec.modalities.image)

    def _run(self, preprocess, column: Sequence[bytes], rows: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return preprocess([column[int(r)] for r in rows])
        except PreprocessError as exc:
            raise _renumbered(exc, rows) from None

    def _image(self, payloads, present: np.ndarray, videos) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Every still and every sampled video frame of the candidates with an image, with each frame's owner."""
        column = payloads[Modality.IMAGE]
        # Without item_video an empty still is the image preprocessor's to reject ("image is empty", named row).
        stills = np.flatnonzero(present & np.array([len(b) > 0 or videos is None for b in column], dtype=bool))
        clips = np.flatnonzero(present & np.array([len(v) > 0 for v in videos], dtype=bool)) if videos is not None \
            else np.zeros(0, dtype=np.int64)
        parts, owners = [], []
        if len(stills):
            parts.append(self._run(self.preprocessors[Modality.IMAGE], column, stills)["pixel_values"])
            owners.append(stills)
        if len(clips):
            parts.append(self._run(self.video, videos, clips)["pixel_values"])
            owners.append(np.repeat(clips, self.spec.modalities.video.frames))
        if not parts:
            return {}, np.zeros(0, dtype=np.int64)
        return {"pixel_values": np.concatenate(parts)}, np.concatenate(owners)

    def __call__(self, payloads: Mapping[Modality, Sequence[bytes]], present: np.ndarray | None = None,
                 videos: Sequence[bytes] | None = None) -> PreparedCandidates:
        """Raises PreprocessError naming the input and the request's row on any bad input."""
        present = check_presence(self.spec, payloads, present, videos)
        inputs, owners = {}, {}
        for j, m in enumerate(self.modalities):
            if m is Modality.IMAGE:
                inputs[m], owners[m] = self._image(payloads, present[:, j], videos)
                continue
            rows = np.flatnonzero(present[:, j])
            owners[m] = rows.astype(np.int64)
            inputs[m] = self._run(self.preprocessors[m], payloads[m], rows) if len(rows) else {}
        dims = tuple(self.spec.modalities.embedding_dim(m) for m in self.modalities)
        return PreparedCandidates(present, self.modalities, dims, inputs, owners)
