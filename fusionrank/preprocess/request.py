"""One ranking request as a whole, checked before any payload is decoded, and its preprocessing.

`RankRequest.validate()` checks what no single payload can tell: every input present, one row per candidate in
each of them, at least one and at most `max_candidates` candidates, and the history (ids in the vocabulary, one
user's row repeated for every candidate). It raises one `RequestValidationError` naming the offending input, and
`RequestPreprocessor` then runs every modality's preprocessing. Library code, so every serving route (the
ensemble's `preprocess` model, a BLS route) and every in-process caller validates the same way.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusionrank.errors import PreprocessError, RequestValidationError
from fusionrank.preprocess import build_preprocessor, validate_history
from fusionrank.spec import Modality, PipelineSpec
from fusionrank.tensors import ITEM_INPUT, USER_HISTORY


@dataclass(frozen=True)
class ValidRequest:
    rows: dict[str, list[bytes]]  # item input name -> one payload per candidate
    history: np.ndarray  # [N, L] int64, the same row N times


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
        for name in self.names:
            if name not in self.inputs:
                raise RequestValidationError(name, "missing input")
            array = np.asarray(self.inputs[name])
            if array.ndim == 0:
                raise RequestValidationError(name, "expected one row per candidate, got a scalar")
            arrays[name] = array
        history = validate_history(arrays[USER_HISTORY], self.spec)
        self._row_count(arrays)
        rows = {name: _bytes_rows(arrays[name], name) for name in self.names if name != USER_HISTORY}
        return ValidRequest(rows=rows, history=history)


def non_finite_row(array: np.ndarray) -> int | None:
    """The first row (first axis) holding a NaN or an infinity; None when every value is finite."""
    if array.dtype.kind not in "fc" or array.size == 0 or np.isfinite(array).all():
        return None
    bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    return int(np.argmax(bad))


@dataclass(frozen=True)
class PreparedRequest:
    """Every encoder's input arrays per modality (all rows of the request) and the checked history."""

    rows: int
    encoder_inputs: dict[Modality, dict[str, np.ndarray]]
    history: np.ndarray

    def flat(self) -> dict[str, np.ndarray]:
        """Every tensor by name, as the reference ensemble's `preprocess` model outputs them."""
        arrays = {name: a for inputs in self.encoder_inputs.values() for name, a in inputs.items()}
        return {**arrays, "history": self.history}


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
    """A request's inputs -> every encoder's input tensors per modality and the checked history. Safe to call from
    several threads (the preprocessors keep no per-call state)."""

    def __init__(self, spec: PipelineSpec, tokenizer_dir: Path | None = None):
        self.spec = spec
        self.max_candidates = spec.serving.max_candidates
        self.preprocessors = {m: build_preprocessor(spec, m, tokenizer_dir=tokenizer_dir if m is Modality.TEXT
                                                    else None) for m in spec.modalities.enabled}

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> PreparedRequest:
        """Raises PreprocessError (RequestValidationError for the request as a whole) naming the input and row."""
        request = self.validate(inputs)
        encoder_inputs = {}
        for modality, preprocess in self.preprocessors.items():
            name = ITEM_INPUT[modality]
            arrays = preprocess(request.rows[name])
            _check_finite(name, arrays, range(len(request.history)))
            encoder_inputs[modality] = arrays
        return PreparedRequest(len(request.history), encoder_inputs, request.history)

    def validate(self, inputs: Mapping[str, np.ndarray]) -> ValidRequest:
        """The checks of the request as a whole (inputs, row counts, candidate limit, history); no payload is
        decoded. Raises RequestValidationError naming the input."""
        return RankRequest(inputs, self.spec, self.max_candidates).validate()

    def encoder_groups(self, request: ValidRequest, modality: Modality, rows: Sequence[int]) -> list[EncoderGroup]:
        """Validate and preprocess the payloads of `rows` only (the rest may come from an embedding cache), grouped
        by shape; text rows are padded to their own bucket, so a row's inputs never depend on the other rows.
        Raises PreprocessError naming the input and the row as the request numbers it."""
        if not len(rows):
            return []
        name = ITEM_INPUT[modality]
        payloads = [request.rows[name][r] for r in rows]
        preprocess = self.preprocessors[modality]
        by_shape = getattr(preprocess, "by_shape", None)
        try:
            groups = by_shape(payloads) if by_shape else [(list(range(len(payloads))), preprocess(payloads))]
            for members, arrays in groups:
                _check_finite(name, arrays, members)
        except PreprocessError as exc:
            raise _in_request(exc, rows) from None
        index = np.asarray(rows, dtype=np.int64)
        return [EncoderGroup(index[np.asarray(members, dtype=np.int64)], arrays) for members, arrays in groups]


def _check_finite(name: str, arrays: dict[str, np.ndarray], rows: Sequence[int]) -> None:
    """A last guard behind the decoders' own checks: an encoder must never see a NaN or an infinity."""
    for array in arrays.values():
        row = non_finite_row(array)
        if row is not None:
            raise PreprocessError(f"{name}[{rows[row]}]", "preprocessing produced non-finite values (NaN or "
                                                          "infinity); the payload cannot be scored")
