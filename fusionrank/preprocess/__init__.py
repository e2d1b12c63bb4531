"""Preprocessing: raw candidate payloads -> encoder input tensors. One implementation, used offline (embeddings,
training, parity) and online (the Triton Python-backend models).

Every preprocessor is called with one request's rows (`list[bytes]`, one per candidate) and returns the encoder's
input arrays keyed by tensor name (see `fusionrank.tensors.encoder_inputs`). Bad rows raise `PreprocessError`
naming the input and row, e.g. `item_image[3]: cannot decode image: ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from fusionrank.errors import PreprocessError
from fusionrank.spec import Modality, PipelineSpec
from fusionrank.tensors import USER_HISTORY


class Preprocessor(Protocol):
    input_name: str

    def __call__(self, rows: list[bytes]) -> dict[str, np.ndarray]: ...


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
    """Check one request's user history ([N, L] item ids, 0 = padding); returns it as int64."""
    length, vocab = spec.ranker.history.length, spec.ranker.history.vocab_size
    history = np.asarray(history)
    if history.dtype.kind not in "iu":
        raise PreprocessError(USER_HISTORY, f"expected integer item ids (INT64), got {history.dtype}")
    if history.ndim != 2 or history.shape[1] != length:
        raise PreprocessError(USER_HISTORY, f"expected shape [N, {length}], got {list(history.shape)}")
    bad = (history < 0) | (history >= vocab)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        value = int(history[row, col])
        problem = "negative item id" if value < 0 else "item id out of vocabulary"
        raise PreprocessError(f"{USER_HISTORY}[{row}]", f"{problem} {value} at position {col} "
                                                         f"(allowed 0..{vocab - 1}, 0 = padding)")
    return history.astype(np.int64, copy=False)
