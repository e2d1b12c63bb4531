"""Release-gate targets (SLOs) of a load test: the spec's `slo:` section, optionally overridden by a YAML file.

`loadtest/slo.ci.yaml` is such a file: loose targets for the CI smoke test on a shared runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fusionrank.contract.project import packaged
from fusionrank.contract.spec import SLO_FIELDS, PipelineSpec, SloTargets
from fusionrank.request.scenario import ScenarioError, read_yaml

CI_SLO = Path(str(packaged("loadtest", "slo.ci.yaml")))  # package data, a real file once pip-installed


@dataclass(frozen=True)
class Slo(SloTargets):
    """Release-gate targets and the file (or spec) they came from; a field set to None is not gated."""

    source: str = "<defaults>"

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise ScenarioError(self.source, *problem)


def _slo_values(data: dict, src: str, where: str) -> dict[str, float | None]:
    out = {}
    for key, value in data.items():
        if key not in SLO_FIELDS:
            raise ScenarioError(src, f"{where}{key}", value, "one of " + ", ".join(SLO_FIELDS))
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ScenarioError(src, f"{where}{key}", value, "a number or null")
        out[key] = None if value is None else float(value)
    return out


def load_slo(spec: PipelineSpec, scenario: str | None = None, path: str | Path | None = None) -> Slo:
    """SLO targets of one scenario: the spec's `slo:` gate and its `slo.scenarios.<scenario>` override, then, when
    `path` names an SLO file (e.g. loadtest/slo.ci.yaml), that file's top-level fields and its
    `scenarios.<scenario>` section."""
    values = {k: float(getattr(spec.slo, k)) for k in SLO_FIELDS}
    override = spec.slo.scenarios.get(scenario) if scenario else None
    if override is not None:
        values.update({k: float(getattr(override, k)) for k in SLO_FIELDS if getattr(override, k) is not None})
    if path is None:
        return Slo(**values, source=f"{spec.source} (slo)")
    path = Path(path)
    data = dict(read_yaml(path, "SLO"))
    src = str(path)
    per_scenario = data.pop("scenarios", None) or {}
    if not isinstance(per_scenario, dict):
        raise ScenarioError(src, "scenarios", per_scenario, "a mapping {scenario name: {slo fields}}")
    values.update(_slo_values(data, src, ""))
    if scenario and scenario in per_scenario:
        values.update(_slo_values(per_scenario[scenario] or {}, src, f"scenarios.{scenario}."))
    return Slo(**values, source=src)
