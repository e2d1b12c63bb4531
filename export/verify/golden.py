"""Golden data: the PyTorch inputs and outputs `fusionrank export` stores beside each model, which every later check
(the CPU gates, the upgrade report, the benchmarks) runs the exported model against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.manifest import golden_path
from fusionrank.contract.errors import DataError


@dataclass
class Golden:
    """Golden data of one model stored at export time."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    groups: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))


def load_golden(repo: Path, model: str) -> Golden:
    """PyTorch inputs and outputs stored at export time (`<model>/1/golden.npz`)."""
    path = golden_path(repo, model)
    if not path.is_file():
        raise DataError(f"{path} not found; run `fusionrank export` (it stores golden outputs)")
    with np.load(path) as z:
        inputs = {k[3:]: z[k] for k in z.files if k.startswith("in.")}
        outputs = {k[4:]: z[k] for k in z.files if k.startswith("out.")}
        labels = z["labels"] if "labels" in z.files else None
        groups = z["groups"] if "groups" in z.files else None
    if not inputs or not outputs:
        raise DataError(f"{path} holds no in.* / out.* arrays; re-run `fusionrank export`")
    return Golden(inputs, outputs, labels, groups)
