"""Request and response shaping of the ranking client, free of I/O.

A ranking request is one user's candidate list. It is checked before anything is sent, and a list longer than the
server's max batch (`serving.max_candidates`) is split into chunks whose scores are merged back in the caller's
order. A candidate may lack modalities (None): the request then says so in `modality_present` and sends an empty
payload for each absent one; a candidate's video goes in `item_video` (see `fusionrank.contract.tensors`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clients.errors import InvalidInputError, ServerError
from fusionrank.contract.spec import Modality
from fusionrank.contract.tensors import CLICK_PROBABILITY, MODALITY_WEIGHTS, USER_HISTORY, request_arrays


@dataclass(frozen=True)
class Candidate:
    """One item to rank: its title, its image, audio and video, each as bytes or a file path; None = the item has
    none (at least one must be given). A video stands in for the image, or is pooled with it when both are given."""

    text: str | bytes | None = None
    image: bytes | str | Path | None = None
    audio: bytes | str | Path | None = None
    item_id: int | str | None = None
    video: bytes | str | Path | None = None

    @property
    def label(self) -> str:
        return f"candidate {self.item_id}" if self.item_id is not None else "candidate"

    def _read(self, value, what: str) -> bytes:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        path = Path(value).expanduser()
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"{self.label}: cannot read {what} file {str(path)!r}: {exc.strerror}") from exc

    def payload(self, modality: Modality) -> bytes | None:
        """The raw bytes sent for one modality (text as UTF-8; image and audio read from a path if given one);
        None when the candidate has none."""
        value = getattr(self, modality.value)
        if value is None:
            return None
        if modality is Modality.TEXT and not isinstance(value, (bytes, bytearray, memoryview)):
            return str(value).encode("utf-8")
        return self._read(value, modality.value)

    def video_payload(self) -> bytes | None:
        return None if self.video is None else self._read(self.video, "video")


def candidate_payloads(candidates: Sequence[Candidate], modalities: Sequence[Modality],
                       ) -> tuple[dict[Modality, list[bytes | None]], list[bytes | None] | None]:
    """(payloads per modality, videos) of `candidates` in their order; None where a candidate has none, and videos
    None when no candidate has one."""
    items = {m: [c.payload(m) for c in candidates] for m in modalities}
    videos = [c.video_payload() for c in candidates]
    return items, videos if any(v is not None for v in videos) else None


@dataclass(frozen=True)
class RankingResult:
    """Scores of one ranking request, in the order the candidates were given."""

    scores: np.ndarray  # [N] click probability (NaN for a candidate dropped as invalid)
    weights: np.ndarray  # [N, M] weight of each enabled modality in the fused score
    modalities: tuple[Modality, ...]
    errors: dict[int, InvalidInputError] = field(default_factory=dict)  # dropped candidates by index (on_invalid)

    def __len__(self) -> int:
        return len(self.scores)

    def order(self) -> np.ndarray:
        """Candidate indices, best first (ties keep the given order)."""
        return np.argsort(-self.scores, kind="stable")


@dataclass
class Chunk:
    """One request's input arrays, ready to become InferInputs (over the wire or through shared memory)."""

    arrays: dict[str, np.ndarray]
    index: np.ndarray | None = None  # the caller's index of each row (None: 0..rows-1)

    def __post_init__(self):
        if self.index is None:
            self.index = np.arange(self.rows)

    @property
    def rows(self) -> int:
        return len(self.arrays[USER_HISTORY])

    def without(self, row: int) -> Chunk:
        """The chunk less one of its rows (a candidate dropped as invalid)."""
        keep = np.arange(self.rows) != row
        return Chunk({n: a[keep] for n, a in self.arrays.items()}, self.index[keep])

    def payload_bytes(self) -> int:
        """Bytes the inputs carry (the payloads themselves for BYTES tensors)."""
        return sum(sum(len(b) for b in a.ravel()) if a.dtype == np.object_ else a.nbytes for a in self.arrays.values())


def history_matrix(history: Sequence[int] | np.ndarray, rows: int, length: int) -> np.ndarray:
    """The [rows, length] INT64 history tensor: a 1-D id list is cut to its last `length` ids, left-padded with 0
    and repeated per candidate; a 2-D array must already have that shape."""
    h = np.asarray(history)
    if h.size and not np.issubdtype(h.dtype, np.integer):
        raise InvalidInputError(f"{USER_HISTORY}: item ids must be integers, got dtype {h.dtype}")
    h = h.astype(np.int64, copy=False)
    if h.ndim == 1:
        row = np.zeros(length, dtype=np.int64)
        tail = h[-length:] if len(h) else h
        row[length - len(tail):] = tail
        return np.repeat(row[None, :], rows, axis=0)
    if h.ndim == 2 and h.shape == (rows, length):
        return np.ascontiguousarray(h)
    raise InvalidInputError(f"{USER_HISTORY}: expected {length} ids or an array of shape [{rows}, {length}], "
                            f"got shape {list(h.shape)}")


def chunk_bounds(rows: int, max_rows: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most `max_rows` each, covering 0..rows in order."""
    if max_rows <= 0:
        raise ValueError(f"max_rows must be > 0, got {max_rows}")
    return [(start, min(start + max_rows, rows)) for start in range(0, rows, max_rows)]


def _check_rows(items: Mapping[Modality, Sequence[bytes | None]], videos: Sequence[bytes | None] | None,
                modalities: Sequence[Modality], video_enabled: bool) -> int:
    """The candidate count of a ranking request whose columns agree and whose every candidate has a modality."""
    missing = [m.value for m in modalities if m not in items]
    if missing:
        raise InvalidInputError(f"no payloads for enabled modalities: {', '.join(missing)} (None per candidate "
                                "marks a modality absent)")
    counts = {m.value: len(items[m]) for m in modalities}
    if videos is not None:
        if not video_enabled:
            raise InvalidInputError("videos given, but video is disabled in the spec (modalities.video)")
        counts["video"] = len(videos)
    rows = next(iter(counts.values()))
    if len(set(counts.values())) != 1:
        raise InvalidInputError("every modality needs one payload per candidate (None where absent); got "
                                + ", ".join(f"{m}={n}" for m, n in counts.items()))
    if rows == 0:
        raise InvalidInputError("no candidates to rank")
    for row in range(rows):
        if all(items[m][row] is None for m in modalities) and (videos is None or videos[row] is None):
            raise InvalidInputError(f"candidate {row} has no modality: give at least one of "
                                    + ", ".join(m.value for m in modalities))
    return rows


def build_chunks(items: Mapping[Modality, Sequence[bytes | None]], history, modalities: Sequence[Modality],
                 history_length: int, max_rows: int, videos: Sequence[bytes | None] | None = None,
                 video_enabled: bool = True) -> list[Chunk]:
    """Validate one ranking request and split it into chunks of at most `max_rows` candidates (None payloads mark
    absent modalities)."""
    rows = _check_rows(items, videos, modalities, video_enabled)
    arrays = request_arrays({m: items[m] for m in modalities}, history_matrix(history, rows, history_length), videos)
    return [Chunk({name: array[a:b] for name, array in arrays.items()}, np.arange(a, b))
            for a, b in chunk_bounds(rows, max_rows)]


def expand_outputs(chunk: Chunk, served: Chunk, outputs: tuple[np.ndarray, np.ndarray] | None,
                   width: int) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's (scores, weights) from those of `served` (the chunk less dropped rows; None: every row dropped):
    NaN where a row was dropped."""
    scores = np.full((chunk.rows, 1), np.nan, dtype=np.float32)
    weights = np.full((chunk.rows, width), np.nan, dtype=np.float32)
    if outputs is not None:
        where = np.searchsorted(chunk.index, served.index)
        scores[where] = outputs[0].reshape(len(where), 1)
        weights[where] = outputs[1].reshape(len(where), -1)
    return scores, weights


def chunk_outputs(result, chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
    """Scores and weights of one chunk from a tritonclient `InferResult`; a short answer is a ServerError."""
    scores, weights = result.as_numpy(CLICK_PROBABILITY), result.as_numpy(MODALITY_WEIGHTS)
    if scores is None or weights is None or len(scores) != chunk.rows or len(weights) != chunk.rows:
        raise ServerError(f"response has {None if scores is None else len(scores)} scores for "
                          f"{chunk.rows} candidates")
    return scores, weights


def merge_outputs(results: Sequence[tuple[np.ndarray, np.ndarray]], modalities: tuple[Modality, ...],
                  errors: Mapping[int, InvalidInputError] | None = None) -> RankingResult:
    """One RankingResult from the chunks' (scores, weights), in chunk order."""
    scores = np.concatenate([r[0].reshape(-1) for r in results]).astype(np.float32, copy=False)
    weights = np.concatenate([r[1].reshape(len(r[0]), -1) for r in results]).astype(np.float32, copy=False)
    return RankingResult(scores, weights, modalities, dict(sorted((errors or {}).items())))
