"""Config layer: every config parses as a Triton ModelConfig, the committed repository equals the rendered one."""

from __future__ import annotations

import dataclasses
import re

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from fusionrank.contract.names import POOL_MODEL
from fusionrank.contract.spec import ModalitiesSpec, ServingProfile, from_dict, member_models, served_models
from fusionrank.contract.tensors import model_io
from fusionrank.triton.ensemble import ensemble_config
from fusionrank.triton.render import (
    check_repository,
    load_config,
    model_configs,
    render_repository,
)
from tests.paths import REPO_ROOT

COMMITTED = REPO_ROOT / "model_repository"


def test_committed_repository_equals_rendered(default_spec):
    assert check_repository(default_spec, COMMITTED) == []


def test_check_names_a_hand_edited_config(default_spec, tmp_path):
    render_repository(default_spec, tmp_path)
    path = tmp_path / "text_encoder" / "configs" / "cpu.pbtxt"
    path.write_text(path.read_text().replace("max_batch_size: 128", "max_batch_size: 8"))
    assert check_repository(default_spec, tmp_path) == [
        "differs from the spec: text_encoder/configs/cpu.pbtxt (run `fusionrank render`)"]


@pytest.mark.parametrize("profile", list(ServingProfile))
def test_every_committed_config_parses_and_matches_the_contract(default_spec, profile):
    serving = default_spec.serving
    for model in (*member_models(default_spec), serving.route, serving.reference_ensemble):
        config = load_config(profile.served_config(COMMITTED / model))
        assert config.name == model
        io_ = model_io(default_spec, model)
        assert [i.name for i in config.input] == [t.name for t in io_.inputs]
        assert [o.name for o in config.output] == [t.name for t in io_.outputs]
        assert [list(i.dims) for i in config.input] == [list(t.dims) for t in io_.inputs]


def test_profiles_pick_the_backend(default_spec):
    configs = model_configs(default_spec)
    assert configs["text_encoder"]["gpu"].platform == "tensorrt_plan"
    assert configs["text_encoder"]["gpu"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert configs["text_encoder"]["cpu"].backend == "python"
    assert configs["text_encoder"]["cpu"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert configs["text_encoder"]["onnx_gpu"].platform == "onnxruntime_onnx"
    for profile in ServingProfile:
        assert configs["preprocess"][profile].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


def test_every_member_batches_dynamically_and_warms_up(default_spec):
    configs = model_configs(default_spec)
    for model in member_models(default_spec):
        if model == POOL_MODEL:  # inputs hold the encoded rows, outputs the candidates: no batching
            assert {c.max_batch_size for c in configs[model].values()} == {0}
            continue
        for profile, config in configs[model].items():
            batching = default_spec.serving.batching(model)
            gpu = default_spec.serving.gpu_batching(model) if profile == "gpu" else None
            assert config.HasField("dynamic_batching"), (model, profile)
            preferred = gpu.preferred_batch_sizes if gpu else batching.preferred_batch_sizes
            assert list(config.dynamic_batching.preferred_batch_size) == list(preferred)
            delay = gpu.max_queue_delay_us if gpu else batching.max_queue_delay_us
            assert config.dynamic_batching.max_queue_delay_microseconds == delay
            assert config.max_batch_size == batching.max_batch_size
            assert len(config.model_warmup) >= 1, (model, profile)
    text_warmups = configs["text_encoder"]["gpu"].model_warmup
    buckets = default_spec.modalities.text.buckets
    opts = [opt for _, opt, _ in default_spec.serving.batch_profiles("text_encoder")]
    assert sorted((w.batch_size, w.inputs["input_ids"].dims[0]) for w in text_warmups) == \
        sorted((b, s) for b in opts for s in buckets), "every profile's opt batch warmed at every bucket"


def test_the_gpu_profile_batches_without_a_latency_floor(default_spec):
    """Issue 21 finding 4: TensorRT members answer in well under a millisecond, so the gpu profile waits at most
    500 us per member, tunes each engine for a typical batch (opt below max) and captures fixed-shape engines as
    CUDA graphs; the route's wait is short too."""
    configs = model_configs(default_spec)
    encoders = [f"{m.value}_encoder" for m in default_spec.modalities.enabled]
    chain = [*encoders, "fusion_ranker", default_spec.serving.route]
    for model in chain:
        config = configs[model]["gpu"]
        assert config.dynamic_batching.max_queue_delay_microseconds <= 500, model
        assert list(config.dynamic_batching.preferred_batch_size) == [], model
    for model in chain[:-1]:
        profiles = default_spec.serving.batch_profiles(model)
        assert profiles[0][1] < profiles[-1][2], f"{model}: opt of the first profile is a typical batch, not max"
        assert len(configs[model]["gpu"].instance_group[0].profile) == len(profiles), model
    for model in ("image_encoder", "audio_encoder", "fusion_ranker"):
        cuda = configs[model]["gpu"].optimization.cuda
        assert cuda.graphs and [g.batch_size for g in cuda.graph_spec] == [16, 32, 64, 128], model
        assert [g.graph_lower_bound.batch_size for g in cuda.graph_spec] == [1, 17, 33, 65], model
    assert not configs["text_encoder"]["gpu"].optimization.cuda.graphs  # its sequence axis is dynamic
    # The CPU profile keeps its batching: the policy is the gpu profile's.
    assert configs["text_encoder"]["cpu"].dynamic_batching.max_queue_delay_microseconds == \
        default_spec.serving.batching("text_encoder").max_queue_delay_us
    assert not configs[default_spec.serving.reference_ensemble]["cpu"].HasField("dynamic_batching")


def test_route_is_a_python_model_batching_as_the_spec_says(default_spec):
    """The route callers use: a BLS Python model on the CPU in every profile, its batcher and instances from the
    spec, and the members' max batch sizes in its spec slice (it cuts its member calls at them)."""
    route = default_spec.serving.route
    batching = default_spec.serving.batching(route)
    for profile, config in model_configs(default_spec)[route].items():
        assert config.backend == "python" and config.parameters["role"].string_value == "route", profile
        assert config.max_batch_size == batching.max_batch_size >= default_spec.serving.max_candidates
        own = default_spec.serving.gpu_batching(route) if profile == "gpu" else None  # the gpu profile's policy
        preferred = own.preferred_batch_sizes if own else batching.preferred_batch_sizes
        assert list(config.dynamic_batching.preferred_batch_size) == list(preferred)
        delay = own.max_queue_delay_us if own else batching.max_queue_delay_us
        assert config.dynamic_batching.max_queue_delay_microseconds == delay
        assert config.instance_group[0].count == (own.instances if own and own.instances else batching.instances)
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        rebuilt = from_dict(__import__("json").loads(config.parameters["spec"].string_value))
        assert rebuilt.serving == default_spec.serving and rebuilt.modalities == default_spec.modalities
    assert (COMMITTED / route / "1" / "model.py").read_text().count("RouteModel as TritonPythonModel") == 1


def test_only_the_ensembles_ranker_step_guards_finite_outputs(default_spec):
    configs = model_configs(default_spec)
    assert configs["fusion_ranker"]["cpu"].parameters["check_finite_outputs"].string_value == "true"
    for model in ("text_encoder", "image_encoder", "audio_encoder"):
        assert "check_finite_outputs" not in configs[model]["cpu"].parameters


def test_served_models_leave_the_reference_ensemble_out_unless_asked(default_spec):
    serving = default_spec.serving
    assert served_models(default_spec) == (serving.route, "text_encoder", "image_encoder", "audio_encoder",
                                           "fusion_ranker")
    with_reference = served_models(default_spec, reference_ensemble=True)
    assert set(with_reference) - set(served_models(default_spec)) == {serving.reference_ensemble, "preprocess",
                                                                      POOL_MODEL}


def test_ensemble_wiring_is_closed(default_spec):
    """Every step input is an ensemble input or an earlier step's output; every ensemble output is produced."""
    config = ensemble_config(default_spec)
    available = {i.name for i in config.input}
    for step in config.ensemble_scheduling.step:
        step_io = model_io(default_spec, step.model_name)
        assert set(step.input_map) == {t.name for t in step_io.inputs}, step.model_name
        missing = set(step.input_map.values()) - available
        assert not missing, f"{step.model_name} reads {missing} before anything produces it"
        assert set(step.output_map) == {t.name for t in step_io.outputs}
        available |= set(step.output_map.values())
    assert {o.name for o in config.output} <= available


def test_disabled_modality_disappears_from_the_contract(default_spec):
    audio = dataclasses.replace(default_spec.modalities.audio, enabled=False)
    spec = dataclasses.replace(default_spec, modalities=dataclasses.replace(default_spec.modalities, audio=audio))
    configs = model_configs(spec)
    assert "audio_encoder" not in configs
    assert "item_audio" not in [i.name for i in configs["preprocess"]["cpu"].input]
    assert "log_mel" not in [o.name for o in configs["preprocess"]["cpu"].output]
    for route in (spec.serving.route, spec.serving.reference_ensemble):
        assert [i.name for i in configs[route]["cpu"].input] == ["item_text", "item_image", "user_history",
                                                                 "modality_present", "item_video"]
        assert [i.optional for i in configs[route]["cpu"].input] == [False, False, False, True, True]
        assert list(configs[route]["cpu"].input[3].dims) == [2]
        assert list(configs[route]["cpu"].output[1].dims) == [2]
    assert [i.name for i in configs["fusion_ranker"]["cpu"].input] == ["text_embedding", "image_embedding", "history",
                                                                       "modality_mask"]
    assert list(configs["fusion_ranker"]["cpu"].input[-1].dims) == [2]


def test_python_models_get_their_spec_slice(default_spec):
    config = model_configs(default_spec)["preprocess"]["cpu"]
    rebuilt = from_dict(__import__("json").loads(config.parameters["spec"].string_value))
    assert rebuilt.modalities == default_spec.modalities
    assert rebuilt.ranker.history == default_spec.ranker.history
    assert isinstance(rebuilt.modalities, ModalitiesSpec)


@pytest.mark.parametrize("gpu, fragment", [
    ({"text_encoder": {"max_queue_delay_us": 5000}}, "0 to 500"),
    ({"text_encoder": {"batch_profiles": [[1, 16, 32], [40, 64, 128]]}}, "previous max + 1"),
    ({"text_encoder": {"batch_profiles": [[1, 40, 32]]}}, "min <= opt <= max"),
    ({"nonsense": {}}, "a member model or the route"),
])
def test_a_bad_gpu_batching_policy_is_refused_naming_the_field(default_spec, gpu, fragment):
    """The last batch profile is fitted to max_batch_size (one source of the largest batch); the rest is checked."""
    from fusionrank.contract.errors import FusionRankError
    from fusionrank.contract.spec import to_dict

    data = to_dict(default_spec)
    data["serving"]["gpu"] = gpu
    with pytest.raises(FusionRankError, match=re.escape(fragment)) as err:
        from_dict(data)
    assert "serving.gpu" in str(err.value)
