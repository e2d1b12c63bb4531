"""The offline reference: the server's preprocessing feeding the PyTorch encoders and ranker, in one process.

The end-to-end tests check served scores against it, so it must stay the plain composition of the library pieces,
with no serving-specific code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fusionrank.models.encoders import build_encoder
from fusionrank.models.fusion import load_ranker
from fusionrank.preprocess import build_preprocessor
from fusionrank.spec import Modality, PipelineSpec


class ReferencePipeline:
    """Raw candidate bytes + user history -> click probabilities and modality weights, in PyTorch."""

    def __init__(self, spec: PipelineSpec, checkpoint: Path, tokenizer_dir: Path | None = None):
        self.spec = spec
        self.modalities = spec.modalities.enabled
        self.preprocessors = {m: build_preprocessor(spec, m, tokenizer_dir=tokenizer_dir if m is Modality.TEXT
                                                    else None) for m in self.modalities}
        self.encoders = {m: build_encoder(spec, m) for m in self.modalities}
        self.ranker = load_ranker(checkpoint, spec=spec)

    @torch.inference_mode()
    def score(self, items: dict[Modality, Sequence[bytes]], history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores of one ranking request: `items[m]` holds one raw payload per candidate; history [N, L]."""
        embeddings = []
        for m in self.modalities:
            arrays = self.preprocessors[m](list(items[m]))
            tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
            embeddings.append(self.encoders[m](**tensors))
        probs, weights = self.ranker(*embeddings, torch.from_numpy(np.asarray(history, dtype=np.int64)))
        return probs.numpy()[:, 0], weights.numpy()
