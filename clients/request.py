"""Request and response shaping of the ranking client, free of I/O.

A ranking request is one user's candidate list. It is checked before anything is sent, and a list longer than the
ensemble's max batch (`serving.max_candidates`) is split into chunks whose scores are merged back in the caller's
order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clients.errors import InvalidInputError, ServerError
from fusionrank.spec import Modality
from fusionrank.tensors import CLICK_PROBABILITY, MODALITY_WEIGHTS, USER_HISTORY, request_arrays


@dataclass(frozen=True)
class Candidate:
    """One item to rank: its title and its image and audio, each as bytes or a file path."""

    text: str | bytes | None = None
    image: bytes | str | Path | None = None
    audio: bytes | str | Path | None = None
    item_id: int | str | None = None

    def payload(self, modality: Modality) -> bytes:
        """The raw bytes sent for one modality (text as UTF-8; image and audio read from a path if given one)."""
        value = getattr(self, modality.value)
        label = f"candidate {self.item_id}" if self.item_id is not None else "candidate"
        if value is None:
            raise InvalidInputError(f"{label}: no {modality.value} given, but the ensemble needs {modality.value}")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if modality is Modality.TEXT:
            return str(value).encode("utf-8")
        path = Path(value).expanduser()
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"{label}: cannot read {modality.value} file {str(path)!r}: {exc.strerror}") \
                from exc


def candidate_payloads(candidates: Sequence[Candidate], modalities: Sequence[Modality]) -> dict[Modality, list[bytes]]:
    """The payloads of `candidates`, one list per modality, in the candidates' order."""
    return {m: [c.payload(m) for c in candidates] for m in modalities}


@dataclass(frozen=True)
class RankingResult:
    """Scores of one ranking request, in the order the candidates were given."""

    scores: np.ndarray  # [N] click probability
    weights: np.ndarray  # [N, M] weight of each enabled modality in the fused score
    modalities: tuple[Modality, ...]

    def __len__(self) -> int:
        return len(self.scores)

    def order(self) -> np.ndarray:
        """Candidate indices, best first (ties keep the given order)."""
        return np.argsort(-self.scores, kind="stable")


@dataclass
class Chunk:
    """One request's input arrays, ready to become InferInputs (over the wire or through shared memory)."""

    arrays: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return len(self.arrays[USER_HISTORY])

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


def build_chunks(items: Mapping[Modality, Sequence[bytes]], history, modalities: Sequence[Modality],
                 history_length: int, max_rows: int) -> list[Chunk]:
    """Validate one ranking request and split it into chunks of at most `max_rows` candidates."""
    missing = [m.value for m in modalities if m not in items]
    if missing:
        raise InvalidInputError(f"no payloads for enabled modalities: {', '.join(missing)}")
    counts = {m: len(items[m]) for m in modalities}
    rows = next(iter(counts.values()))
    if len(set(counts.values())) != 1:
        raise InvalidInputError("every modality needs one payload per candidate; got "
                                + ", ".join(f"{m.value}={n}" for m, n in counts.items()))
    if rows == 0:
        raise InvalidInputError("no candidates to rank")
    arrays = request_arrays({m: items[m] for m in modalities}, history_matrix(history, rows, history_length))
    return [Chunk({name: array[a:b] for name, array in arrays.items()}) for a, b in chunk_bounds(rows, max_rows)]


def chunk_outputs(result, chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
    """Scores and weights of one chunk from a tritonclient `InferResult`; a short answer is a ServerError."""
    scores, weights = result.as_numpy(CLICK_PROBABILITY), result.as_numpy(MODALITY_WEIGHTS)
    if scores is None or weights is None or len(scores) != chunk.rows or len(weights) != chunk.rows:
        raise ServerError(f"response has {None if scores is None else len(scores)} scores for "
                          f"{chunk.rows} candidates")
    return scores, weights


def merge_outputs(results: Sequence[tuple[np.ndarray, np.ndarray]], modalities: tuple[Modality, ...]) -> RankingResult:
    """One RankingResult from the chunks' (scores, weights), in chunk order."""
    scores = np.concatenate([r[0].reshape(-1) for r in results]).astype(np.float32, copy=False)
    weights = np.concatenate([r[1].reshape(len(r[0]), -1) for r in results]).astype(np.float32, copy=False)
    return RankingResult(scores, weights, modalities)
