"""The reference ensemble (`serving.reference_ensemble`), loaded only on request: its config (no Python class)."""

from __future__ import annotations

from collections.abc import Mapping

from tritonclient.grpc import model_config_pb2 as mc

from fusionrank.contract.names import encoder_modality
from fusionrank.contract.spec import PipelineSpec, member_models
from fusionrank.contract.tensors import embedding_name, model_io, rows_name
from fusionrank.triton._config import Configs, TritonUnit, every_profile, tensor


def ensemble_config(spec: PipelineSpec) -> mc.ModelConfig:
    """preprocess (all inputs) -> one encoder per modality (the rows that have it) -> pool_embeddings (rows back in
    candidate order) -> fuse and score. Same contract as the route."""
    name = spec.serving.reference_ensemble
    io_ = model_io(spec, name)
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=spec.serving.max_candidates)
    config.input.extend(tensor(t, mc.ModelInput) for t in io_.inputs)
    config.output.extend(tensor(t, mc.ModelOutput) for t in io_.outputs)
    steps = config.ensemble_scheduling.step
    # Every tensor keeps its contract name inside the ensemble (names are unique across models), but an encoder's
    # output: its rows go to `pool_embeddings` as `<modality>_rows`, whose output is the candidates' embedding.
    rows = {embedding_name(m): rows_name(m) for m in spec.modalities.enabled}
    for model in member_models(spec):
        member = model_io(spec, model)
        step = steps.add(model_name=model, model_version=-1)
        for t in member.inputs:
            step.input_map[t.name] = t.name
        for t in member.outputs:
            step.output_map[t.name] = rows[t.name] if encoder_modality(model) else t.name
    if spec.serving.response_cache:
        config.response_cache.enable = True
    return config


def configs(spec: PipelineSpec, model: str, rendered: Mapping[str, Configs]) -> Configs:
    return every_profile(ensemble_config(spec))


UNIT = TritonUnit(lambda spec: (spec.serving.reference_ensemble,), configs, __name__)
