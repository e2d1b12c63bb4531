"""`PipelineSpec`: the whole `pipeline.yaml`, and the served models derived from it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from fusionrank.contract.names import POOL_MODEL, PREPROCESS, RANKER, encoder_name
from fusionrank.contract.spec.base import fail, to_dict
from fusionrank.contract.spec.modalities import ModalitiesSpec
from fusionrank.contract.spec.sections import (
    DataSpec,
    ExportSpec,
    RankerSpec,
    ServingSpec,
    SloSpec,
    TrainSpec,
    UpgradeSpec,
)


@dataclass(frozen=True)
class PipelineSpec:
    modalities: ModalitiesSpec = field(default_factory=ModalitiesSpec)
    ranker: RankerSpec = field(default_factory=RankerSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    serving: ServingSpec = field(default_factory=ServingSpec)
    slo: SloSpec = field(default_factory=SloSpec)
    upgrade: UpgradeSpec = field(default_factory=UpgradeSpec)
    source: str = "<defaults>"

    def __post_init__(self):
        batched = (self.serving.route, *(m for m in member_models(self) if m not in UNBATCHED))
        if self.serving.max_candidates > min(self.serving.batching(m).max_batch_size for m in batched):
            fail("serving.max_candidates", self.serving.max_candidates,
                  "a value <= the route's and every member model's max_batch_size (one ranking request is one "
                  "batch)")

    @property
    def num_items(self) -> int:
        """Catalogue items have ids 1..num_items; 0 is history padding."""
        return self.ranker.history.vocab_size - 1

    def digest(self) -> str:
        """Stable hash of the spec's content (not its file path); engines and manifests record it."""
        payload = json.dumps(to_dict(self, drop=("source",)), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def with_overrides(self, **changes) -> PipelineSpec:
        return dataclasses.replace(self, **changes)


UNBATCHED = (POOL_MODEL,)
# Members only the reference ensemble calls: the route preprocesses and pools in process.
ENSEMBLE_ONLY = (PREPROCESS, POOL_MODEL)


def member_models(spec: PipelineSpec) -> tuple[str, ...]:
    """Every member of the ensemble, in pipeline order; disabled modalities have no encoder.

    One `preprocess` model validates and preprocesses every input of a request before anything else runs. (With one
    preprocessing model per modality, a bad text failed its step while the same request's image and audio steps
    were still queued; Triton 2.51 then released the request's input buffers under them, which crashed the server
    or corrupted other requests in our concurrent bad-input test.)"""
    return (PREPROCESS, *(encoder_name(m) for m in spec.modalities.enabled), POOL_MODEL, RANKER)


def served_models(spec: PipelineSpec, reference_ensemble: bool = False) -> tuple[str, ...]:
    """The models a server loads: the route callers use and the members it calls (it preprocesses and pools in
    process, so `preprocess` and `pool_embeddings` are not among them); with `reference_ensemble`, also the plain
    ensemble and those two steps."""
    members = tuple(m for m in member_models(spec) if m not in ENSEMBLE_ONLY)
    reference = (spec.serving.reference_ensemble, *ENSEMBLE_ONLY) if reference_ensemble else ()
    return (spec.serving.route, *members, *reference)
