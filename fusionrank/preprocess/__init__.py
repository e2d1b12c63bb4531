"""Preprocessing: raw candidate payloads -> encoder input tensors. One implementation, used offline (embeddings,
training, parity) and online (the Triton Python-backend models).

Every preprocessor is called with one request's rows (`list[bytes]`, one per candidate) and returns the encoder's
input arrays keyed by tensor name (see `fusionrank.contract.tensors.encoder_inputs`). Bad rows raise `PreprocessError`
naming the input and row, e.g. `item_image[3]: cannot decode image: ...`. Declared sizes are checked against the
spec's limits before anything is decoded, and no output holds a NaN or an infinity. `header(raw, name)` runs one
row's checks that need no decoding (the same ones, with the same messages) and returns what decoding it would cost
in the modality's unit (pixels, samples read, frames walked, characters): the route checks a request's misses with
it before they wait for a decoding slot (`fusionrank.request.cost`).

Preprocessors keep no per-call state: one instance may be called from several threads at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from fusionrank.contract.errors import RequestValidationError
from fusionrank.contract.spec import Modality, PipelineSpec
from fusionrank.contract.tensors import USER_HISTORY

# Version of the preprocessing's numbers: part of the embedding and checkpoint cache keys, so a change that alters
# any encoder input re-encodes the catalogue and retrains the ranker. Bump it with every such change.
# 2: JPEG draft decoding and reduce-before-resize for sources over four times the target (smaller ones unchanged);
#    odd audio rates resampled at a bounded ratio.
PREPROCESS_VERSION = 2


class Preprocessor(Protocol):
    input_name: str

    def __call__(self, rows: list[bytes]) -> dict[str, np.ndarray]: ...

    def header(self, raw: bytes, name: str) -> int: ...


def build_preprocessor(spec: PipelineSpec, modality: Modality, tokenizer_dir: Path | None = None) -> Preprocessor:
    """The preprocessor of one modality, configured from the spec. Each module is imported on demand, so a process
    that serves one modality does not load the others' decoders (transformers, Pillow, soundfile)."""
    if modality is Modality.TEXT:
        from fusionrank.preprocess.text import TextPreprocessor

        return TextPreprocessor(spec.modalities.text, tokenizer_dir)
    if modality is Modality.IMAGE:
        from fusionrank.preprocess.image import ImagePreprocessor

        return ImagePreprocessor(spec.modalities.image)
    from fusionrank.preprocess.audio import AudioPreprocessor

    return AudioPreprocessor(spec.modalities.audio)


def validate_history(history: np.ndarray, spec: PipelineSpec) -> np.ndarray:
    """Check one request's user history ([N, L] item ids, 0 = padding, the same row for every candidate: one request
    ranks for one user); returns it as int64."""
    length, vocab = spec.ranker.history.length, spec.ranker.history.vocab_size
    history = np.asarray(history)
    if history.dtype.kind not in "iu":
        raise RequestValidationError(USER_HISTORY, f"expected integer item ids (INT64), got {history.dtype}")
    if history.ndim != 2 or history.shape[1] != length:
        raise RequestValidationError(USER_HISTORY, f"expected shape [N, {length}], got {list(history.shape)}")
    bad = (history < 0) | (history >= vocab)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        value = int(history[row, col])
        problem = "negative item id" if value < 0 else "item id out of vocabulary"
        raise RequestValidationError(f"{USER_HISTORY}[{row}]", f"{problem} {value} at position {col} "
                                                               f"(allowed 0..{vocab - 1}, 0 = padding)")
    differs = (history != history[:1]).any(axis=1)
    if differs.any():
        row = int(np.argmax(differs))
        raise RequestValidationError(f"{USER_HISTORY}[{row}]", "differs from row 0; one request ranks candidates for "
                                                               "one user, so every row must carry the same history")
    return history.astype(np.int64, copy=False)
