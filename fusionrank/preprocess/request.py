"""One ranking request as a whole, checked before any payload is decoded, and its preprocessing.

`RankRequest.validate()` checks what no single payload can tell: every input present, one row per candidate in
each of them, at least one and at most `max_candidates` candidates, and the history (ids in the vocabulary, one
user's row repeated for every candidate). It raises one `RequestValidationError` naming the offending input, and
`RequestPreprocessor` then runs every modality's preprocessing. Library code, so every serving route (the
ensemble's `preprocess` model, a BLS route) and every in-process caller validates the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusionrank.errors import RequestValidationError
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


class RequestPreprocessor:
    """A request's inputs -> every encoder's input tensors and the checked history (`history`)."""

    def __init__(self, spec: PipelineSpec, tokenizer_dir: Path | None = None, max_candidates: int | None = None):
        self.spec = spec
        self.max_candidates = max_candidates or spec.serving.max_candidates
        self.preprocessors = [build_preprocessor(spec, m, tokenizer_dir=tokenizer_dir if m is Modality.TEXT else None)
                              for m in spec.modalities.enabled]

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = RankRequest(inputs, self.spec, self.max_candidates).validate()
        arrays = {"history": request.history}
        for pre in self.preprocessors:
            arrays.update(pre(request.rows[pre.input_name]))
        return arrays
