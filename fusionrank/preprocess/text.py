"""Text: UTF-8 titles -> token ids padded to the spec's length buckets (not to the batch maximum).

Padding to a fixed set of lengths lets requests of similar length batch together in Triton (shapes must agree to
be concatenated) and keeps every shape inside a TensorRT optimisation profile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fusionrank.errors import PreprocessError
from fusionrank.paths import resolve_text_checkpoint
from fusionrank.spec import TextSpec
from fusionrank.tensors import ITEM_INPUT, Modality


def load_tokenizer(directory: Path):
    """The checkpoint's fast tokenizer, from a local directory only (no hub access)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), use_fast=True, local_files_only=True)


class TextPreprocessor:
    input_name = ITEM_INPUT[Modality.TEXT]

    def __init__(self, spec: TextSpec, tokenizer_dir: Path | None = None):
        if tokenizer_dir is None:
            tokenizer_dir = resolve_text_checkpoint(spec.encoder.checkpoint)
        self.spec = spec
        self.tokenizer = load_tokenizer(Path(tokenizer_dir))

    def decode(self, rows: list[bytes]) -> list[str]:
        texts = []
        for i, raw in enumerate(rows):
            name = f"{self.input_name}[{i}]"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start:exc.start + 1]
                raise PreprocessError(name, f"text is not valid UTF-8 (byte {bad!r} at offset {exc.start})") from None
            if not text.strip():
                raise PreprocessError(name, "text is empty")
            if len(text) > self.spec.max_chars:
                raise PreprocessError(name, f"text has {len(text)} characters; at most {self.spec.max_chars} allowed")
            texts.append(text)
        return texts

    def __call__(self, rows: list[bytes]) -> dict[str, np.ndarray]:
        texts = self.decode(rows)
        lengths = self.tokenizer(texts, truncation=True, max_length=self.spec.max_length)["input_ids"]
        bucket = self.spec.bucket_for(max(len(ids) for ids in lengths))
        encoded = self.tokenizer(texts, truncation=True, max_length=bucket, padding="max_length", return_tensors="np")
        return {"input_ids": encoded["input_ids"].astype(np.int64),
                "attention_mask": encoded["attention_mask"].astype(np.int64)}
