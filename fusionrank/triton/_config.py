"""What every Triton model's config is built from: the contract's tensors, the spec's batching and instances, the
warm-up requests; and `TritonUnit`, one kind of Triton model (its class beside its config function).

`model_config_pb2` is imported inside the functions that build configs: every Triton stub imports this module
(through its model class's module) and importing `tritonclient.grpc` maps gRPC into it (~40 MiB RSS per stub), but
configs are built only by `fusionrank render`."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fusionrank.contract.names import Modality, encoder_name
from fusionrank.contract.spec import AdmissionSpec, PipelineSpec, QueuePolicySpec, ServingProfile, to_dict
from fusionrank.contract.tensors import TensorSpec, model_io

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as mc

# The contract's dtypes as Triton's `DataType` names (`data_type` turns one into the enum value).
DTYPES = {"bytes": "TYPE_STRING", "int64": "TYPE_INT64", "float32": "TYPE_FP32", "bool": "TYPE_BOOL"}

Configs = dict[ServingProfile, "mc.ModelConfig"]  # one model's config per serving profile


@dataclass(frozen=True)
class TritonUnit:
    """One kind of Triton model: the spec's models it serves, their config per profile (`configs(spec, model,
    rendered)`, where `rendered` holds the configs of the units before it), and the Python-backend class its
    `model.py` imports from `module` (None: no `model.py`, as for an ensemble)."""

    models: Callable[[PipelineSpec], tuple[str, ...]]
    configs: Callable[[PipelineSpec, str, Mapping[str, Configs]], Configs]
    module: str
    python_class: str | None = None


def every_profile(config: mc.ModelConfig) -> Configs:
    """The same config in every profile (a model whose backend no profile changes)."""
    return {profile: config for profile in ServingProfile}


def data_type(dtype: str) -> int:
    """Triton's `DataType` value of a contract dtype."""
    from tritonclient.grpc import model_config_pb2 as mc  # here, not at the top: keeps gRPC out of the Triton stubs
    return mc.DataType.Value(DTYPES[dtype])


def tensor(spec_tensor: TensorSpec, cls):
    """A config input or output (`cls`: `mc.ModelInput` or `mc.ModelOutput`) from the contract's tensor."""
    made = cls(name=spec_tensor.name, data_type=data_type(spec_tensor.dtype), dims=list(spec_tensor.dims))
    if spec_tensor.optional:
        made.optional = True
    return made


def spec_parameter(spec: PipelineSpec) -> str:
    """The slice of the spec a Python model that validates requests needs, as JSON (rebuilt with `spec.from_dict`);
    `serving`: max_candidates, and the members' max batch sizes for the route; `slo`: the median the route's gate
    admits requests without a deadline of their own within."""
    return json.dumps({"modalities": to_dict(spec.modalities), "ranker": {"history": to_dict(spec.ranker.history)},
                       "serving": to_dict(spec.serving), "slo": to_dict(spec.slo)}, sort_keys=True)


def base_config(spec: PipelineSpec, model: str) -> mc.ModelConfig:
    """Name, batching and the contract's inputs and outputs of `model`."""
    from tritonclient.grpc import model_config_pb2 as mc  # here, not at the top: keeps gRPC out of the Triton stubs
    io_ = model_io(spec, model)
    batching = spec.serving.batching(model)
    config = mc.ModelConfig(name=model, max_batch_size=batching.max_batch_size)
    config.input.extend(tensor(t, mc.ModelInput) for t in io_.inputs)
    config.output.extend(tensor(t, mc.ModelOutput) for t in io_.outputs)
    config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    admission = spec.serving.admission
    config.dynamic_batching.default_queue_policy.CopyFrom(_queue_policy(admission.queue(model,
                                                                                      model == spec.serving.route)))
    _priorities(config, spec.serving.admission)
    return config


def _queue_policy(policy: QueuePolicySpec) -> mc.ModelQueuePolicy:
    """Triton's queue policy: bounded, and a request queued past its timeout is refused (UNAVAILABLE), not run."""
    from tritonclient.grpc import model_config_pb2 as mc  # here, not at the top: keeps gRPC out of the Triton stubs
    return mc.ModelQueuePolicy(timeout_action=mc.ModelQueuePolicy.REJECT,
                               default_timeout_microseconds=policy.timeout_us,
                               allow_timeout_override=policy.allow_timeout_override,
                               max_queue_size=policy.max_queue_size)


def _priorities(config: mc.ModelConfig, admission: AdmissionSpec) -> None:
    """One priority level per traffic class (`serving.admission.priorities`); the levels below the default
    class's get `background_queue` where the spec sets one. Members get the levels too: the route's BLS calls
    carry no priority (Triton 2.51) and so run at the default (production) level, ahead of the catalogue warm-up
    that calls the encoders directly at its own level."""
    batching = config.dynamic_batching
    batching.priority_levels = len(admission.priorities)
    batching.default_priority_level = admission.level(admission.default_priority)
    if admission.background_queue is not None:
        for level in range(batching.default_priority_level + 1, batching.priority_levels + 1):
            batching.priority_queue_policy[level].CopyFrom(_queue_policy(admission.background_queue))


def add_instances(config: mc.ModelConfig, spec: PipelineSpec, kind: int) -> None:
    config.instance_group.add(count=spec.serving.batching(config.name).instances, kind=kind)


def _warmup_inputs(spec: PipelineSpec, model: str, bucket: int | None = None) -> dict[str, mc.ModelWarmup.Input]:
    from tritonclient.grpc import model_config_pb2 as mc  # here, not at the top: keeps gRPC out of the Triton stubs
    inputs = {}
    for t in model_io(spec, model).inputs:
        if t.optional:  # warm-up requests are complete candidates without video
            continue
        dims = [bucket if d == -1 else d for d in t.dims]
        entry = mc.ModelWarmup.Input(data_type=data_type(t.dtype), dims=dims)
        if t.dtype == "bytes":
            entry.input_data_file = t.name  # a real sample under <model>/warmup/: zeros would be rejected as bad input
        else:
            entry.zero_data = True
        inputs[t.name] = entry
    return inputs


def add_warmup(config: mc.ModelConfig, spec: PipelineSpec, batches: tuple[int, ...] | None = None) -> None:
    """Warm every member so the first real request does not pay for lazy initialisation (sessions, allocators);
    `batches`: the batch sizes to warm (default: the largest preferred one)."""
    from tritonclient.grpc import model_config_pb2 as mc  # here, not at the top: keeps gRPC out of the Triton stubs
    model = config.name
    batches = batches or (spec.serving.batching(model).preferred_batch_sizes[-1],)
    buckets = spec.modalities.text.buckets if model == encoder_name(Modality.TEXT) else (None,)
    for batch in batches:
        for bucket in buckets:
            suffix = f"_seq{bucket}" if bucket else ""
            warm = mc.ModelWarmup(name=f"{model}_batch{batch}{suffix}", batch_size=batch)
            for name, entry in _warmup_inputs(spec, model, bucket).items():
                warm.inputs[name].CopyFrom(entry)
            config.model_warmup.append(warm)


def gpu_batching(config: mc.ModelConfig, spec: PipelineSpec) -> None:
    """The gpu profile's batching policy (`serving.gpu`, GpuBatchingSpec says why), where the spec sets one."""
    gpu = spec.serving.gpu_batching(config.name)
    if gpu is None:
        return
    config.dynamic_batching.ClearField("preferred_batch_size")
    config.dynamic_batching.preferred_batch_size.extend(gpu.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = gpu.max_queue_delay_us
    if gpu.instances:
        config.instance_group[0].count = gpu.instances


def python_config(spec: PipelineSpec, model: str, role: str) -> mc.ModelConfig:
    """A warmed Python-backend member on the CPU; `role` tells its `model.py` what it is."""
    from tritonclient.grpc import model_config_pb2 as mc  # here, not at the top: keeps gRPC out of the Triton stubs
    config = base_config(spec, model)
    config.backend = "python"
    add_instances(config, spec, mc.ModelInstanceGroup.KIND_CPU)
    config.parameters["role"].string_value = role
    add_warmup(config, spec)
    return config
