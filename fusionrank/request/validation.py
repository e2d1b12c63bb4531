"""One ranking request as a whole, checked before any payload is decoded, and its preprocessing.

`RankRequest.validate()` checks what no single payload can tell: every input present, one row per candidate in
each of them (the optional `modality_present` and `item_video` included), at least one and at most
`max_candidates` candidates, and the history (ids in the vocabulary, one user's row repeated for every candidate).
It raises one `RequestValidationError` naming the offending input, and `RequestPreprocessor` then checks presence
and preprocesses the rows that have each modality (`fusionrank.request.candidates.CandidatePreparer`: an absent row is
never preprocessed or encoded; a video's K frames are image rows owned by their candidate). Library code, so every
serving route (the ensemble's `preprocess` model, a BLS route) and every in-process caller validates the same way.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusionrank.contract.errors import PreprocessError, RequestValidationError
from fusionrank.contract.spec import Modality, PipelineSpec
from fusionrank.contract.tensors import (
    ITEM_INPUT,
    ITEM_VIDEO,
    MODALITY_MASK,
    MODALITY_PRESENT,
    USER_HISTORY,
    owner_name,
)
from fusionrank.preprocess import validate_history
from fusionrank.preprocess.samples import warmup_samples
from fusionrank.request.candidates import CandidatePreparer, PreparedCandidates, check_presence


@dataclass(frozen=True)
class ValidRequest:
    rows: dict[str, list[bytes]]  # item input name -> one payload per candidate
    history: np.ndarray  # [N, L] int64, the same row N times
    present: np.ndarray | None = None  # `modality_present` as sent; RequestPreprocessor.validate: checked, [N, M]
    videos: list[bytes] | None = None  # `item_video` rows; None: the request has no video input


def _bytes_rows(array: np.ndarray, name: str) -> list[bytes]:
    if array.dtype != np.object_:
        raise RequestValidationError(name, f"expected BYTES, got {array.dtype}")
    rows = array.reshape(len(array), -1)
    if rows.shape[1] != 1:
        raise RequestValidationError(name, f"expected one element per candidate, got shape {list(array.shape)}")
    out = []
    for i, value in enumerate(rows[:, 0]):
        if isinstance(value, str):
            value = value.encode("utf-8", errors="surrogatepass")
        if not isinstance(value, bytes):
            raise RequestValidationError(f"{name}[{i}]", f"expected bytes, got {type(value).__name__}")
        out.append(bytes(value))
    return out


@dataclass(frozen=True)
class RankRequest:
    """One request's inputs by name, as received (Triton tensors as numpy arrays)."""

    inputs: Mapping[str, np.ndarray]
    spec: PipelineSpec
    max_candidates: int

    @property
    def names(self) -> tuple[str, ...]:
        """Expected inputs in contract order: one BYTES column per enabled modality, then the history."""
        return (*(ITEM_INPUT[m] for m in self.spec.modalities.enabled), USER_HISTORY)

    def _row_count(self, arrays: dict[str, np.ndarray]) -> int:
        """The number of candidates: the row count most inputs agree on (ties: the earlier input's); an input
        that disagrees is named."""
        counts = {name: len(a) for name, a in arrays.items()}
        votes = Counter(counts.values())
        n = next(c for c in counts.values() if votes[c] == max(votes.values()))
        for name, count in counts.items():
            if count != n:
                agree = [other for other, c in counts.items() if c == n]
                raise RequestValidationError(name, f"has {count} rows but {', '.join(agree)} "
                                                   f"{'has' if len(agree) == 1 else 'have'} {n}: one row per candidate")
        first = next(iter(counts))
        if n == 0:
            raise RequestValidationError(first, f"the request has no candidates (0 rows); send 1 to "
                                                f"{self.max_candidates}")
        if n > self.max_candidates:
            raise RequestValidationError(first, f"{n} candidates; at most {self.max_candidates} per request")
        return n

    def validate(self) -> ValidRequest:
        """The request's rows and checked history; raises RequestValidationError naming the offending input."""
        arrays = {}
        optional = (MODALITY_PRESENT, ITEM_VIDEO)
        for name in (*self.names, *optional):
            if self.inputs.get(name) is None:
                if name in optional:
                    continue
                raise RequestValidationError(name, "missing input")
            array = np.asarray(self.inputs[name])
            if array.ndim == 0:
                raise RequestValidationError(name, "expected one row per candidate, got a scalar")
            arrays[name] = array
        if ITEM_VIDEO in arrays and not self.spec.modalities.video_enabled:
            raise RequestValidationError(ITEM_VIDEO, "video input is disabled in this deployment (modalities.video)")
        history = validate_history(arrays[USER_HISTORY], self.spec)
        self._row_count(arrays)
        rows = {name: _bytes_rows(arrays[name], name) for name in self.names if name != USER_HISTORY}
        videos = _bytes_rows(arrays[ITEM_VIDEO], ITEM_VIDEO) if ITEM_VIDEO in arrays else None
        return ValidRequest(rows=rows, history=history, present=arrays.get(MODALITY_PRESENT), videos=videos)


def non_finite_row(array: np.ndarray) -> int | None:
    """The first row (first axis) holding a NaN or an infinity; None when every value is finite."""
    if array.dtype.kind not in "fc" or array.size == 0 or np.isfinite(array).all():
        return None
    bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    return int(np.argmax(bad))


@dataclass(frozen=True)
class PreparedRequest:
    """One validated request: the encoder inputs of the rows that have each modality (`candidates.inputs`, with the
    candidate each row belongs to in `candidates.owners`), the presence mask and the checked history."""

    candidates: PreparedCandidates
    history: np.ndarray
    placeholders: Mapping[Modality, dict[str, np.ndarray]] | None = None  # one row per modality, for `flat()`

    @property
    def rows(self) -> int:
        return self.candidates.rows

    @property
    def encoder_inputs(self) -> dict[Modality, dict[str, np.ndarray]]:
        """Per modality, the encoder's input arrays of the rows to encode ({} when no candidate has it)."""
        return self.candidates.inputs

    @property
    def owners(self) -> dict[Modality, np.ndarray]:
        """Per modality, the candidate each encoder-input row belongs to (a video's frames share their owner)."""
        return self.candidates.owners

    def modality_mask(self) -> np.ndarray:
        """The ranker's `modality_mask` (FP32 [N, M], 1 present, 0 absent)."""
        return self.candidates.mask()

    def flat(self) -> dict[str, np.ndarray]:
        """Every tensor by name, as the reference ensemble's `preprocess` model outputs them: per modality the rows
        to encode and their owners ([R, 1] int64), the history and the mask. Triton cannot run a step on zero rows,
        so a modality no candidate has sends one placeholder row (the warm-up sample's) owned by no one (-1):
        `pool_embeddings` drops it and the ranker masks the modality."""
        arrays = {}
        for m, inputs in self.candidates.inputs.items():
            owners = self.candidates.owners[m]
            if not len(owners):
                if self.placeholders is None:
                    raise ValueError("flat() needs the preprocessor's placeholders for a modality no candidate has")
                inputs, owners = self.placeholders[m], np.full(1, -1, dtype=np.int64)
            arrays.update(inputs)
            arrays[owner_name(m)] = owners.astype(np.int64).reshape(-1, 1)
        return {**arrays, "history": self.history, MODALITY_MASK: self.modality_mask()}


@dataclass(frozen=True)
class EncoderGroup:
    """Some rows of one request and one modality, preprocessed: the encoder's inputs for exactly those rows (one
    shape, so they can be concatenated with other requests' groups of the same shape)."""

    rows: np.ndarray  # int64 row indices in the request
    inputs: dict[str, np.ndarray]


_ROW = re.compile(r"\[(\d+)\]$")


def _in_request(exc: PreprocessError, rows: Sequence[int]) -> PreprocessError:
    """The error of a preprocessor called with some of a request's rows, naming the row as the request numbers it."""
    match = _ROW.search(exc.input_name)
    if match is None or int(match.group(1)) >= len(rows):
        return exc
    return PreprocessError(f"{exc.input_name[:match.start()]}[{rows[int(match.group(1))]}]", exc.problem)


class RequestPreprocessor:
    """A request's inputs -> the encoder inputs of the rows that have each modality, their owners, the presence
    mask and the checked history. Safe to call from several threads (the preprocessors keep no per-call state)."""

    def __init__(self, spec: PipelineSpec, tokenizer_dir: Path | None = None):
        self.spec = spec
        self.max_candidates = spec.serving.max_candidates
        self.candidates = CandidatePreparer(spec, tokenizer_dir=tokenizer_dir)
        self.preprocessors = self.candidates.preprocessors  # by modality
        self._placeholders: dict[Modality, dict[str, np.ndarray]] | None = None

    def placeholders(self) -> dict[Modality, dict[str, np.ndarray]]:
        """One encoder-input row per modality (the warm-up sample's preprocessing), computed once."""
        if self._placeholders is None:
            samples = warmup_samples(self.spec)
            self._placeholders = {m: self.preprocessors[m]([samples[m]]) for m in self.spec.modalities.enabled}
        return self._placeholders

    def __call__(self, inputs: Mapping[str, np.ndarray], placeholders: bool = False) -> PreparedRequest:
        """Raises PreprocessError (RequestValidationError for the request as a whole) naming the input and row.
        `placeholders=True` attaches the placeholder rows `PreparedRequest.flat()` needs."""
        request = self.validate(inputs)
        payloads = {m: request.rows[ITEM_INPUT[m]] for m in self.spec.modalities.enabled}
        prepared = self.candidates(payloads, request.present, request.videos)
        for m, arrays in prepared.inputs.items():
            _check_finite(ITEM_INPUT[m], arrays, prepared.owners[m])
        return PreparedRequest(prepared, request.history, self.placeholders() if placeholders else None)

    def validate(self, inputs: Mapping[str, np.ndarray]) -> ValidRequest:
        """The checks of the request as a whole (inputs, row counts, candidate limit, history, the presence rules of
        `fusionrank.request.candidates.check_presence`); no payload is decoded. Raises PreprocessError naming the
        input."""
        request = RankRequest(inputs, self.spec, self.max_candidates).validate()
        payloads = {m: request.rows[ITEM_INPUT[m]] for m in self.spec.modalities.enabled}
        present = check_presence(self.spec, payloads, request.present, request.videos)
        return dataclasses.replace(request, present=present)

    def encoder_groups(self, request: ValidRequest, modality: Modality, rows: Sequence[int]) -> list[EncoderGroup]:
        """Validate and preprocess the payloads of `rows` only (the rest may come from an embedding cache), grouped
        by shape; text rows are padded to their own bucket, so a row's inputs never depend on the other rows. Every
        row must have the modality (`request.present`); an image row is its still and/or its video's K frames (a
        group's `rows` then repeat the candidate once per frame). Raises PreprocessError naming the input and the
        row as the request numbers it."""
        if modality is Modality.IMAGE and request.videos is not None:
            stills = [r for r in rows if request.rows[ITEM_INPUT[modality]][r]]
            clips = [r for r in rows if request.videos[r]]
            groups = self._groups(request.rows[ITEM_INPUT[modality]], ITEM_INPUT[modality], stills,
                                  self.preprocessors[modality])
            video = self._groups(request.videos, ITEM_VIDEO, clips, self.candidates.video)
            frames = self.spec.modalities.video.frames
            return groups + [EncoderGroup(np.repeat(g.rows, frames), g.inputs) for g in video]
        return self._groups(request.rows[ITEM_INPUT[modality]], ITEM_INPUT[modality], rows,
                            self.preprocessors[modality])

    @staticmethod
    def _groups(column: list[bytes], name: str, rows: Sequence[int], preprocess) -> list[EncoderGroup]:
        if not len(rows):
            return []
        payloads = [column[r] for r in rows]
        by_shape = getattr(preprocess, "by_shape", None)
        try:
            groups = by_shape(payloads) if by_shape else [(list(range(len(payloads))), preprocess(payloads))]
            for members, arrays in groups:
                # A video's arrays hold K frames per row: the finite check names the row that owns the frame.
                frames = len(next(iter(arrays.values()))) // max(1, len(members))
                _check_finite(name, arrays, np.repeat(np.asarray(members), frames))
        except PreprocessError as exc:
            raise _in_request(exc, rows) from None
        index = np.asarray(rows, dtype=np.int64)
        return [EncoderGroup(index[np.asarray(members, dtype=np.int64)], arrays) for members, arrays in groups]


def _check_finite(name: str, arrays: dict[str, np.ndarray], rows: Sequence[int]) -> None:
    """A last guard behind the decoders' own checks: an encoder must never see a NaN or an infinity."""
    for array in arrays.values():
        row = non_finite_row(array)
        if row is not None:
            raise PreprocessError(f"{name}[{int(rows[row])}]", "preprocessing produced non-finite values (NaN or "
                                                               "infinity); the payload cannot be scored")
