"""Where a project's files live: the folder holding `pipeline.yaml`, the model repository and the reports.

Imports nothing of fusionrank's own, so the spec, the paths and every layer above can ask it.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_spec_path() -> Path:
    """The spec read when none is named."""
    return REPO_ROOT / "pipeline.yaml"
