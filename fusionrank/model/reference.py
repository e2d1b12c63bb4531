"""The offline reference: the server's preprocessing feeding the PyTorch encoders and ranker, in one process.

The end-to-end tests check served scores against it, so it must stay the plain composition of the library pieces,
with no serving-specific code: `fusionrank.request.candidates` validates the request and preprocesses the rows that have
each modality, the encoders run on those rows only, and the ranker gets the pooled embeddings and the presence mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fusionrank.contract.spec import Modality, PipelineSpec
from fusionrank.contract.tensors import ITEM_INPUT, ITEM_VIDEO, MODALITY_PRESENT, USER_HISTORY
from fusionrank.model.encoders import build_encoder
from fusionrank.model.fusion import load_ranker
from fusionrank.request.candidates import CandidatePreparer


def _rows(array: np.ndarray) -> list[bytes]:
    return [bytes(v) for v in np.asarray(array, dtype=object).reshape(-1)]


class ReferencePipeline:
    """Raw candidate bytes + user history -> click probabilities and modality weights, in PyTorch."""

    def __init__(self, spec: PipelineSpec, checkpoint: Path, tokenizer_dir: Path | None = None):
        self.spec = spec
        self.modalities = spec.modalities.enabled
        self.preparer = CandidatePreparer(spec, tokenizer_dir=tokenizer_dir)
        self.encoders = {m: build_encoder(spec, m) for m in self.modalities}
        self.ranker = load_ranker(checkpoint, spec=spec)

    def _encode(self, modality: Modality, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.encoders[modality](**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}).numpy()

    @torch.inference_mode()
    def score(self, items: Mapping[Modality, Sequence[bytes]], history: np.ndarray,
              present: np.ndarray | None = None, videos: Sequence[bytes] | None = None,
              ) -> tuple[np.ndarray, np.ndarray]:
        """Scores of one ranking request as the contract states it: `items[m]` holds one payload per candidate
        (b"" where absent), `present` the `modality_present` matrix (None: all present), `videos` the `item_video`
        column (None: no video); history [N, L]. Bad input raises PreprocessError naming the input and row."""
        prepared = self.preparer(items, present, videos)
        embeddings = prepared.encode(self._encode)
        probs, weights = self.ranker(*(torch.from_numpy(e) for e in embeddings),
                                     torch.from_numpy(np.asarray(history, dtype=np.int64)),
                                     torch.from_numpy(prepared.mask()))
        return probs.numpy()[:, 0], weights.numpy()

    def score_arrays(self, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Scores of one request given as the contract's named input arrays
        (`fusionrank.contract.tensors.request_arrays`)."""
        items = {m: _rows(arrays[ITEM_INPUT[m]]) for m in self.modalities}
        videos = _rows(arrays[ITEM_VIDEO]) if ITEM_VIDEO in arrays else None
        return self.score(items, arrays[USER_HISTORY], arrays.get(MODALITY_PRESENT), videos)
