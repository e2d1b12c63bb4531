"""One ranking request's contract inputs -> every encoder's inputs and the checked history, validated on the way.

Shared by the route (`fusionrank.serving.route`, in process) and the reference ensemble's `preprocess` step, so both
reject the same inputs with the same messages (INVALID_ARGUMENT naming the input and the row).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusionrank.errors import FusionRankError, PreprocessError
from fusionrank.preprocess import build_preprocessor, validate_history
from fusionrank.spec import Modality, PipelineSpec
from fusionrank.tensors import ITEM_INPUT, USER_HISTORY


class RequestError(FusionRankError):
    """One request cannot be served; answered to that request alone with INVALID_ARG."""


def as_bytes_rows(array: np.ndarray, name: str) -> list[bytes]:
    """A BYTES input of shape [N, 1] as one `bytes` per candidate."""
    if array.dtype != np.object_:
        raise RequestError(f"{name}: expected BYTES, got {array.dtype}")
    rows = array.reshape(len(array), -1)
    if rows.shape[1] != 1:
        raise RequestError(f"{name}: expected one element per candidate, got shape {list(array.shape)}")
    return [r[0] if isinstance(r[0], bytes) else str(r[0]).encode() for r in rows]


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
        """Every tensor by name, as the `preprocess` model outputs them."""
        arrays = {name: a for inputs in self.encoder_inputs.values() for name, a in inputs.items()}
        return {**arrays, "history": self.history}


class RequestPreparer:
    """Validates and preprocesses one request at a time with the spec's preprocessors (one per enabled modality).

    Not for concurrent calls from several threads: the text preprocessor's tokenizer keeps state between calls."""

    def __init__(self, spec: PipelineSpec, tokenizer_dir: Path | None = None):
        self.spec = spec
        self.preprocessors = {m: build_preprocessor(spec, m, tokenizer_dir=tokenizer_dir if m is Modality.TEXT
                                                    else None) for m in spec.modalities.enabled}

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> PreparedRequest:
        """Raises PreprocessError or RequestError naming the input (and row) on bad input."""
        history = validate_history(inputs[USER_HISTORY], self.spec)
        rows = len(history)
        if rows == 0:
            raise RequestError(f"{USER_HISTORY}: a ranking request needs at least one candidate row, got 0")
        if rows > self.spec.serving.max_candidates:
            raise RequestError(f"batch: {rows} candidates in one request; at most {self.spec.serving.max_candidates} "
                               "allowed (serving.max_candidates; the client splits longer lists)")
        encoder_inputs = {}
        for modality, preprocess in self.preprocessors.items():
            name = ITEM_INPUT[modality]
            column = as_bytes_rows(inputs[name], name)
            if len(column) != rows:
                raise RequestError(f"{name}: {len(column)} rows, but {USER_HISTORY} has {rows} (one row per candidate)")
            arrays = preprocess(column)
            for array in arrays.values():
                # A last guard behind the decoders' own checks: an encoder must never see a NaN or an infinity.
                row = non_finite_row(array)
                if row is not None:
                    raise PreprocessError(f"{name}[{row}]", "preprocessing produced non-finite values (NaN or "
                                                            "infinity); the payload cannot be scored")
            encoder_inputs[modality] = arrays
        return PreparedRequest(rows, encoder_inputs, history)
