"""What every benchmark reads from the command line's global options (`--spec`, `--repository`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fusionrank.contract.project import model_repository_dir
from fusionrank.contract.spec import PipelineSpec, load_spec


def spec_of(args: argparse.Namespace) -> PipelineSpec:
    return load_spec(getattr(args, "spec", None))


def repository_of(args: argparse.Namespace) -> Path:
    repository = getattr(args, "repository", None)
    return Path(repository) if repository else model_repository_dir()
