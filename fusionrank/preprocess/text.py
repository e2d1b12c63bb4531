"""Text: UTF-8 titles -> token ids padded to the spec's length buckets (not to the batch maximum).

Padding to a fixed set of lengths lets requests of similar length batch together in Triton (shapes must agree to
be concatenated) and keeps every shape inside a TensorRT optimisation profile.

Stateless and thread-safe: the `tokenizers.Tokenizer` is configured once (truncation at max_length, no padding)
and never changed afterwards; each request is tokenized once and padded to its bucket with numpy. (Calling the
HF tokenizer with per-call padding/truncation arguments rewrites that state on the shared Rust object at every
call, which gave ragged arrays when two threads tokenized at once.)

Serving reads the tokenizer with `tokenizers` alone (`tokenizer.json` plus the padding token and side from
`tokenizer_config.json`): importing transformers would map torch (about 350 MiB) into every route process, which
only tokenizes. Export writes `tokenizer.json` from the checkpoint as transformers configures it (`load_tokenizer`),
so both read the same normaliser, vocabulary and special tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from fusionrank.contract.errors import CheckpointError, PreprocessError
from fusionrank.contract.paths import resolve_text_checkpoint
from fusionrank.contract.spec import TextSpec
from fusionrank.contract.tensors import ITEM_INPUT, Modality


def load_tokenizer(directory: Path):
    """The checkpoint's HF fast tokenizer, from a local directory only (no hub access); for export, never serving."""
    from transformers import AutoTokenizer  # heavy (maps torch): only export loads a checkpoint's tokenizer this way

    return AutoTokenizer.from_pretrained(str(directory), use_fast=True, local_files_only=True)


@dataclass(frozen=True)
class TokenizerFiles:
    """A tokenizer folder read without transformers: the Rust tokenizer and the padding facts the spec needs."""

    tokenizer: Tokenizer
    pad_id: int
    pad_left: bool
    truncate_left: bool


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict with `content`."""
    return value.get("content") if isinstance(value, dict) else value


def read_tokenizer(directory: Path) -> TokenizerFiles:
    """`tokenizer.json` and the padding token and sides of a tokenizer folder (as `save_pretrained` writes it)."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"tokenizer folder {str(directory)!r} has no tokenizer.json (a fast tokenizer is "
                              "required; run `fusionrank export` to write one)")
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config's values win, as in transformers
        if (directory / name).is_file():
            config.update(json.loads((directory / name).read_text(encoding="utf-8")))
    tokenizer = Tokenizer.from_file(str(path))
    pad = _token_text(config.get("pad_token"))
    if pad is None and tokenizer.padding:
        pad = tokenizer.padding.get("pad_token")
    pad_id = None if pad is None else tokenizer.token_to_id(pad)
    if pad_id is None:
        raise CheckpointError(f"tokenizer in {directory} has no padding token")
    return TokenizerFiles(tokenizer, int(pad_id), config.get("padding_side", "right") == "left",
                          config.get("truncation_side", "right") == "left")


class TextPreprocessor:
    input_name = ITEM_INPUT[Modality.TEXT]

    def __init__(self, spec: TextSpec, tokenizer_dir: Path | None = None):
        if tokenizer_dir is None:
            tokenizer_dir = resolve_text_checkpoint(spec.encoder.checkpoint)
        self.spec = spec
        files = read_tokenizer(Path(tokenizer_dir))
        # Set up once and only read afterwards (see the module's docstring).
        self.tokenizer = files.tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=spec.max_length,
                                         direction="left" if files.truncate_left else "right")
        self.pad_id = files.pad_id
        self.pad_left = files.pad_left

    def text(self, raw: bytes, name: str) -> str:
        """The row's UTF-8 text; an empty, invalid or too long row raises PreprocessError naming `name`."""
        limit = self.spec.max_chars
        if len(raw) > 4 * limit:  # more bytes than `limit` characters can take in UTF-8: refuse before decoding
            raise PreprocessError(name, f"text has {len(raw)} bytes; at most {limit} characters allowed")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = raw[exc.start:exc.start + 1]
            raise PreprocessError(name, f"text is not valid UTF-8 (byte {bad!r} at offset {exc.start})") from None
        if not text.strip():
            raise PreprocessError(name, "text is empty")
        if len(text) > limit:
            raise PreprocessError(name, f"text has {len(text)} characters; at most {limit} allowed")
        return text

    def header(self, raw: bytes, name: str) -> int:
        """Every check before tokenising (`text`); returns its characters."""
        return len(self.text(raw, name))

    def decode(self, rows: list[bytes]) -> list[str]:
        """UTF-8 text of every row; empty, invalid or too long rows raise PreprocessError naming the row."""
        return [self.text(raw, f"{self.input_name}[{i}]") for i, raw in enumerate(rows)]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, special tokens included, truncated to max_length (no padding)."""
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=True)]

    def __call__(self, rows: list[bytes]) -> dict[str, np.ndarray]:
        ids = self.token_ids(self.decode(rows))
        return self.padded(ids, self.spec.bucket_for(max(len(row) for row in ids)))

    def by_shape(self, rows: list[bytes]) -> list[tuple[list[int], dict[str, np.ndarray]]]:
        """The rows grouped by their own padding bucket: (row indices, encoder inputs) per bucket. A row's inputs
        then depend on that row alone, so its embedding is the same whatever request it comes in (what an
        embedding cache needs); the ensemble's `preprocess` pads a whole request to one bucket instead."""
        ids = self.token_ids(self.decode(rows))
        buckets: dict[int, list[int]] = {}
        for i, row in enumerate(ids):
            buckets.setdefault(self.spec.bucket_for(len(row)), []).append(i)
        return [(members, self.padded([ids[i] for i in members], bucket))
                for bucket, members in sorted(buckets.items())]

    def padded(self, ids: list[list[int]], bucket: int) -> dict[str, np.ndarray]:
        """Token ids padded to `bucket` and their attention mask."""
        input_ids = np.full((len(ids), bucket), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), bucket), dtype=np.int64)
        for i, row in enumerate(ids):
            span = slice(bucket - len(row), bucket) if self.pad_left else slice(0, len(row))
            input_ids[i, span] = row
            mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": mask}
