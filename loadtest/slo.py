"""Release-gate targets (SLOs) of a load test: the spec's `slo:` section, optionally overridden by a YAML file.

`loadtest/slo.ci.yaml` is such a file: loose targets for the CI smoke test on a shared runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fusionrank.project import packaged
from fusionrank.scenario import ScenarioError, read_yaml
from fusionrank.spec import PipelineSpec

CI_SLO = Path(str(packaged("loadtest", "slo.ci.yaml")))  # package data, a real file once pip-installed
SLO_FIELDS = ("p50_ms", "p95_ms", "p99_ms", "max_error_rate", "min_throughput_rps")


@dataclass(frozen=True)
class Slo:
    """Release-gate targets; a field set to None is not gated."""

    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_error_rate: float | None = None
    min_throughput_rps: float | None = None
    source: str = "<defaults>"

    def __post_init__(self):
        for name in ("p50_ms", "p95_ms", "p99_ms", "min_throughput_rps"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ScenarioError(self.source, name, value, "a number > 0 (or null: not gated)")
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise ScenarioError(self.source, "max_error_rate", self.max_error_rate, "a number in [0, 1]")

    def targets(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in SLO_FIELDS if getattr(self, k) is not None}


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
