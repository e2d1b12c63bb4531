"""Where a project's files live: the project folder holds the spec (optional), the model repository, reports and
the cache; the default spec, scenarios and SLO files ship inside the installed packages.

The project folder is, in order: an explicit argument, `$FUSIONRANK_HOME`, the working directory; never the
location of this code, so an installed wheel works the same as a checkout. The command line's `--project` sets
`$FUSIONRANK_HOME`, which its subprocesses (Locust, Triton's Python-backend stubs) inherit.

Imports nothing of fusionrank's own, so the spec, the paths and every layer above can ask it.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

ENV_HOME = "FUSIONRANK_HOME"
SPEC_FILE = "pipeline.yaml"


def project_dir(explicit: str | Path | None = None) -> Path:
    """The project folder: `explicit`, else $FUSIONRANK_HOME, else the working directory."""
    chosen = explicit or os.environ.get(ENV_HOME) or Path.cwd()
    return Path(chosen).expanduser().resolve()


def packaged(package: str, *parts: str) -> Traversable:
    """A data file shipped inside an installed package (`importlib.resources`), e.g. the default spec."""
    return resources.files(package).joinpath(*parts)


def default_spec_path(project: str | Path | None = None) -> Path:
    """The spec read when none is named: the project's `pipeline.yaml`, else the one shipped with the package."""
    local = project_dir(project) / SPEC_FILE
    return local if local.is_file() else packaged_spec_path()


def packaged_spec_path() -> Path:
    """The default spec shipped with the package (the `base: default` of a spec overlay)."""
    # pip installs packages unzipped, so the packaged resource is a real file with a path.
    return Path(str(packaged("fusionrank.contract", "spec", SPEC_FILE)))


def model_repository_dir(project: str | Path | None = None) -> Path:
    """The project's Triton model repository."""
    return project_dir(project) / "model_repository"


def reports_dir(project: str | Path | None = None) -> Path:
    """Where load-test and upgrade reports are written."""
    return project_dir(project) / "reports"
