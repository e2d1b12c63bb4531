"""Render `model_repository/` from the spec: Triton `ModelConfig` messages written with protobuf `text_format`.

Three serving profiles, chosen at start-up with Triton's `--model-config-name`:
- `config.pbtxt` (gpu): encoders and ranker as TensorRT plans on the GPU; the production profile.
- `configs/cpu.pbtxt` (cpu): encoders and ranker as ONNX Runtime sessions inside Python-backend models.
- `configs/onnx_gpu.pbtxt` (onnx_gpu): Triton's onnxruntime backend on the GPU (no engine build needed).
The route callers use (`serving.route`, a BLS Python model that validates and preprocesses in process, then calls
the encoders and the ranker) and the reference ensemble (`serving.reference_ensemble`, whose first step is the
`preprocess` Python model and whose `pool_embeddings` step puts the encoders' rows back in candidate order) are the
same in all three profiles, as are `preprocess` and `pool_embeddings`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from fusionrank.contract.names import (
    ENCODERS_AND_RANKER,
    POOL_MODEL,
    PREPROCESS,
    RANKER,
    Modality,
    encoder_modality,
    encoder_name,
)
from fusionrank.contract.spec import (
    AdmissionSpec,
    PipelineSpec,
    QueuePolicySpec,
    ServingProfile,
    member_models,
    to_dict,
)
from fusionrank.contract.tensors import ITEM_INPUT, TensorSpec, embedding_name, model_io, rows_name
from fusionrank.preprocess.samples import warmup_samples
from fusionrank.route.item_keys import MEMBER_FILES

HEADER = "# Rendered by `fusionrank render` from pipeline.yaml: do not edit by hand.\n"

_DTYPES = {"bytes": mc.TYPE_STRING, "int64": mc.TYPE_INT64, "float32": mc.TYPE_FP32, "bool": mc.TYPE_BOOL}

# Python-backend shells: the logic lives in fusionrank.triton.models and is unit-tested without a server.
_PYTHON_SHELL = '''"""Triton Python model `{model}`: a thin shell over fusionrank.triton.models ({cls})."""

from fusionrank.triton.models import {cls} as TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class RenderedFile:
    path: str  # relative to the repository root
    content: bytes


def _tensor(spec_tensor: TensorSpec, cls):
    tensor = cls(name=spec_tensor.name, data_type=_DTYPES[spec_tensor.dtype], dims=list(spec_tensor.dims))
    if spec_tensor.optional:
        tensor.optional = True
    return tensor


def _spec_parameter(spec: PipelineSpec, model: str) -> str:
    """The slice of the spec a Python model needs, as JSON (rebuilt there with `spec.from_dict`)."""
    if model in (PREPROCESS, spec.serving.route):
        # serving: max_candidates for both, and the members' max batch sizes for the route.
        return json.dumps({"modalities": to_dict(spec.modalities), "ranker": {"history": to_dict(spec.ranker.history)},
                           "serving": to_dict(spec.serving)}, sort_keys=True)
    return ""


def _base_config(spec: PipelineSpec, model: str) -> mc.ModelConfig:
    io_ = model_io(spec, model)
    batching = spec.serving.batching(model)
    config = mc.ModelConfig(name=model, max_batch_size=batching.max_batch_size)
    config.input.extend(_tensor(t, mc.ModelInput) for t in io_.inputs)
    config.output.extend(_tensor(t, mc.ModelOutput) for t in io_.outputs)
    config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    admission = spec.serving.admission
    config.dynamic_batching.default_queue_policy.CopyFrom(_queue_policy(admission.queue(model,
                                                                                      model == spec.serving.route)))
    _priorities(config, spec.serving.admission)
    return config


def _queue_policy(policy: QueuePolicySpec) -> mc.ModelQueuePolicy:
    """Triton's queue policy: bounded, and a request queued past its timeout is refused (UNAVAILABLE), not run."""
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


def _instance(config: mc.ModelConfig, spec: PipelineSpec, kind: int) -> None:
    count = spec.serving.batching(config.name).instances
    config.instance_group.append(mc.ModelInstanceGroup(count=count, kind=kind))


def _warmup_inputs(spec: PipelineSpec, model: str, bucket: int | None = None) -> dict[str, mc.ModelWarmup.Input]:
    inputs = {}
    for t in model_io(spec, model).inputs:
        if t.optional:  # warm-up requests are complete candidates without video
            continue
        dims = [bucket if d == -1 else d for d in t.dims]
        entry = mc.ModelWarmup.Input(data_type=_DTYPES[t.dtype], dims=dims)
        if t.dtype == "bytes":
            entry.input_data_file = t.name  # a real sample under <model>/warmup/: zeros would be rejected as bad input
        else:
            entry.zero_data = True
        inputs[t.name] = entry
    return inputs


def _add_warmup(config: mc.ModelConfig, spec: PipelineSpec) -> None:
    """Warm every member so the first real request does not pay for lazy initialisation (sessions, allocators)."""
    model = config.name
    batch = spec.serving.batching(model).preferred_batch_sizes[-1]
    buckets = spec.modalities.text.buckets if model == encoder_name(Modality.TEXT) else (None,)
    for bucket in buckets:
        suffix = f"_seq{bucket}" if bucket else ""
        warm = mc.ModelWarmup(name=f"{model}_batch{batch}{suffix}", batch_size=batch)
        for name, entry in _warmup_inputs(spec, model, bucket).items():
            warm.inputs[name].CopyFrom(entry)
        config.model_warmup.append(warm)


def python_config(spec: PipelineSpec, model: str, role: str) -> mc.ModelConfig:
    """A Python-backend member on the CPU (preprocessing in every profile; encoders/ranker in the CPU profile)."""
    config = _base_config(spec, model)
    config.backend = "python"
    _instance(config, spec, mc.ModelInstanceGroup.KIND_CPU)
    config.parameters["role"].string_value = role
    spec_json = _spec_parameter(spec, model)
    if spec_json:
        config.parameters["spec"].string_value = spec_json
    if role == "onnxruntime":
        # The graph export.cpu chose: optimised FP32 or INT8 beside model.onnx (export/convert/onnx2cpu.py writes them).
        config.parameters["onnx_file"].string_value = spec.export.cpu.onnx_file(model)
        # One thread per session by default: the three encoders run concurrently in their own stubs, and several
        # threads each oversubscribe the cores (measured on 2 cores: a 10-candidate request 436 ms with the default,
        # 352 ms with 1); `fusionrank tune` measures other values per machine.
        threads = spec.serving.batching(model).intra_op_threads
        config.parameters["intra_op_threads"].string_value = str(threads)
        if model == RANKER:
            config.parameters["check_finite_outputs"].string_value = "true"
    _add_warmup(config, spec)
    return config


def pool_config(spec: PipelineSpec) -> mc.ModelConfig:
    """The reference ensemble's `pool_embeddings` step: no batching (its inputs hold the encoded rows, its outputs
    one row per candidate), full shapes, one instance (a scatter-add per modality)."""
    io_ = model_io(spec, POOL_MODEL)
    config = mc.ModelConfig(name=POOL_MODEL, max_batch_size=0, backend="python")
    config.input.extend(_tensor(t, mc.ModelInput) for t in io_.inputs)
    config.output.extend(_tensor(t, mc.ModelOutput) for t in io_.outputs)
    config.instance_group.append(mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU))
    config.parameters["role"].string_value = "pool"
    return config


def route_config(spec: PipelineSpec, member_files: dict[str, str]) -> mc.ModelConfig:
    """The route callers use: a BLS Python model (`fusionrank.route.stages`) with the contract's inputs and outputs,
    its own dynamic batcher and instance count from the spec. `member_files` (encoder -> the file it serves under
    this profile) lets the route's embedding cache key on the served models (`fusionrank.route.item_keys`).

    No `model_warmup`: its warm-up would call members that may not be loaded yet (Triton loads models in parallel);
    the members are warmed themselves and the route warms its in-process preprocessing in `initialize`."""
    config = _base_config(spec, spec.serving.route)
    config.backend = "python"
    _instance(config, spec, mc.ModelInstanceGroup.KIND_CPU)
    config.parameters["role"].string_value = "route"
    config.parameters["spec"].string_value = _spec_parameter(spec, spec.serving.route)
    config.parameters[MEMBER_FILES].string_value = json.dumps(member_files, sort_keys=True)
    return config


def _served_file(config: mc.ModelConfig) -> str:
    """The file a member's config serves from its version folder (a Python model's ONNX file, else the default)."""
    if config.backend == "python":
        return config.parameters["onnx_file"].string_value
    return config.default_model_filename


def tensorrt_config(spec: PipelineSpec, model: str) -> mc.ModelConfig:
    config = _base_config(spec, model)
    config.platform = "tensorrt_plan"
    config.default_model_filename = "model.plan"
    _instance(config, spec, mc.ModelInstanceGroup.KIND_GPU)
    if model == encoder_name(Modality.TEXT) and spec.export.tensorrt.profile_per_bucket:
        # One optimisation profile per padding bucket (export/profiles.py): every instance must be allowed to use
        # all of them, else Triton binds only profile 0 and the other buckets' shapes are rejected.
        config.instance_group[0].profile.extend(str(i) for i in range(len(spec.modalities.text.buckets)))
    _add_warmup(config, spec)
    return config


def onnx_gpu_config(spec: PipelineSpec, model: str) -> mc.ModelConfig:
    config = _base_config(spec, model)
    config.platform = "onnxruntime_onnx"
    config.default_model_filename = "model.onnx"
    _instance(config, spec, mc.ModelInstanceGroup.KIND_GPU)
    _add_warmup(config, spec)
    return config


def ensemble_config(spec: PipelineSpec) -> mc.ModelConfig:
    """The reference ensemble, loaded only on request: preprocess (all inputs) -> one encoder per modality (the rows
    that have it) -> pool_embeddings (rows back in candidate order) -> fuse and score. Same contract as the route."""
    name = spec.serving.reference_ensemble
    io_ = model_io(spec, name)
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=spec.serving.max_candidates)
    config.input.extend(_tensor(t, mc.ModelInput) for t in io_.inputs)
    config.output.extend(_tensor(t, mc.ModelOutput) for t in io_.outputs)
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


def model_configs(spec: PipelineSpec) -> dict[str, dict[ServingProfile, mc.ModelConfig]]:
    """Every model's config per profile: {model: {profile: ModelConfig}}."""
    configs: dict[str, dict[ServingProfile, mc.ModelConfig]] = {}
    for model in member_models(spec):
        if model in ENCODERS_AND_RANKER:
            configs[model] = {ServingProfile.GPU: tensorrt_config(spec, model),
                              ServingProfile.CPU: python_config(spec, model, "onnxruntime"),
                              ServingProfile.ONNX_GPU: onnx_gpu_config(spec, model)}
        elif model == POOL_MODEL:
            config = pool_config(spec)
            configs[model] = {profile: config for profile in ServingProfile}
        else:
            config = python_config(spec, model, "preprocess")
            configs[model] = {profile: config for profile in ServingProfile}
    ensemble = ensemble_config(spec)
    configs[spec.serving.reference_ensemble] = {profile: ensemble for profile in ServingProfile}
    encoders = [encoder_name(m) for m in spec.modalities.enabled]
    configs[spec.serving.route] = {profile: route_config(spec, {m: _served_file(configs[m][profile]) for m in encoders})
                                   for profile in ServingProfile}
    return configs


def _python_class(spec: PipelineSpec, model: str) -> str:
    if model in ENCODERS_AND_RANKER:
        return "OnnxRuntimeModel"
    if model == POOL_MODEL:
        return "PoolModel"
    return "RouteModel" if model == spec.serving.route else "PreprocessModel"


def _length_prefixed(data: bytes) -> bytes:
    """Triton's raw layout of one BYTES element (4-byte little-endian length, then the bytes)."""
    return struct.pack("<I", len(data)) + data


def rendered_files(spec: PipelineSpec) -> list[RenderedFile]:
    """Everything `render` writes, in memory: configs per profile, Python shells, warm-up samples, .gitkeep."""
    files = []
    for model, profiles in model_configs(spec).items():
        for profile, config in profiles.items():
            text = HEADER + text_format.MessageToString(config)
            files.append(RenderedFile(f"{model}/{profile.config_file}", text.encode()))
        if model == spec.serving.reference_ensemble:
            files.append(RenderedFile(f"{model}/1/.gitkeep", b""))
        else:
            shell = _PYTHON_SHELL.format(model=model, cls=_python_class(spec, model))
            files.append(RenderedFile(f"{model}/1/model.py", shell.encode()))
    samples = warmup_samples(spec)
    for modality in spec.modalities.enabled:
        files.append(RenderedFile(f"preprocess/warmup/{ITEM_INPUT[modality]}",
                                  _length_prefixed(samples[modality])))
    return sorted(files, key=lambda f: f.path)


def render_repository(spec: PipelineSpec, repo: Path) -> list[Path]:
    """Write the rendered repository under `repo`; generated weights already there are left alone."""
    written = []
    for f in rendered_files(spec):
        path = repo / f.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != f.content:
            path.write_bytes(f.content)
            written.append(path)
    return written


def check_repository(spec: PipelineSpec, repo: Path) -> list[str]:
    """Differences between `repo` and what the spec renders (empty when they agree)."""
    expected = {f.path: f.content for f in rendered_files(spec)}
    problems = []
    for rel, content in expected.items():
        path = repo / rel
        if not path.exists():
            problems.append(f"missing: {rel} (run `fusionrank render`)")
        elif path.read_bytes() != content:
            problems.append(f"differs from the spec: {rel} (run `fusionrank render`)")
    rendered_models = {rel.split("/")[0] for rel in expected}
    for path in sorted(repo.glob("*/config.pbtxt")):
        if path.parent.name not in rendered_models:
            problems.append(f"not in the spec: {path.parent.name}/ (a model the spec no longer declares)")
    return problems


def load_config(path: Path) -> mc.ModelConfig:
    """Parse a config.pbtxt into a `ModelConfig` (raises text_format.ParseError on a malformed file)."""
    return text_format.Parse(path.read_text(), mc.ModelConfig())
