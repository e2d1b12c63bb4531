"""A temporary model repository for a benchmark's variant of a spec: the configs rendered anew, the weights linked."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fusionrank.contract.spec import PipelineSpec


@contextlib.contextmanager
def overlay_repository(spec: PipelineSpec, repo: Path) -> Iterator[Path]:
    """A temporary repository: every file `spec` renders written anew, every other file of `repo` (weights,
    tokenizer, golden outputs) a link to the original."""
    from fusionrank.triton.render import rendered_files

    repo = Path(repo).resolve()
    rendered = {f.path: f.content for f in rendered_files(spec)}
    with tempfile.TemporaryDirectory(prefix="fusionrank-bench-repo-") as folder:
        root = Path(folder)
        for path in sorted(p for p in repo.rglob("*") if p.is_file()):
            rel = path.relative_to(repo).as_posix()
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel not in rendered:
                (root / rel).symlink_to(path)
        for rel, content in rendered.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
        yield root
