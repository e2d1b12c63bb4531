"""TensorRT optimisation profiles derived from the spec: valid, complete, in line with the rendered configs and the
exported ONNX inputs (the builder and runner wired to them: test_trt_build.py, test_trt_runner.py)."""

from __future__ import annotations

import dataclasses

import pytest

from export.profiles import (
    OptimizationProfile,
    ProfileError,
    ShapeRange,
    coverage_gaps,
    engine_models,
    find_profile,
    model_profiles,
    producible_shapes,
    sequence_ranges,
    validate_profiles,
)
from fusionrank.contract.spec import BatchingSpec
from fusionrank.contract.tensors import model_io
from fusionrank.triton.render import model_configs


@pytest.fixture(params=["single", "per_bucket"])
def spec(request, ci_spec, per_bucket_spec):
    return ci_spec if request.param == "single" else per_bucket_spec


def test_engine_models_follow_enabled_modalities(ci_spec):
    assert engine_models(ci_spec) == ("text_encoder", "image_encoder", "audio_encoder", "fusion_ranker")
    no_audio = ci_spec.with_overrides(modalities=dataclasses.replace(
        ci_spec.modalities, audio=dataclasses.replace(ci_spec.modalities.audio, enabled=False)))
    assert engine_models(no_audio) == ("text_encoder", "image_encoder", "fusion_ranker")


def test_every_producible_shape_is_inside_a_profile(spec):
    for model in engine_models(spec):
        shapes = list(producible_shapes(spec, model))
        assert len(shapes) >= spec.serving.batching(model).max_batch_size
        assert coverage_gaps(spec, model) == [], model


def test_min_opt_max_hold_in_every_dim(spec):
    for model in engine_models(spec):
        for profile in model_profiles(spec, model):
            for name, r in profile.inputs:
                assert all(lo <= o <= hi for lo, o, hi in zip(r.min, r.opt, r.max)), (model, name)


def test_batch_ranges_match_the_rendered_gpu_config(spec):
    configs = model_configs(spec)
    for model in engine_models(spec):
        gpu = configs[model]["gpu"]
        batches = sorted({(r.min[0], r.opt[0], r.max[0]) for p in model_profiles(spec, model) for _, r in p.inputs})
        assert batches[0][0] == 1 and batches[-1][2] == gpu.max_batch_size, model
        assert all(a[2] + 1 == b[0] for a, b in zip(batches, batches[1:])), f"{model}: batch profiles not contiguous"
        # Triton lets every instance use every profile, else it binds profile 0 and refuses the others' shapes.
        profiles = len(model_profiles(spec, model))
        bound = list(gpu.instance_group[0].profile)
        assert bound == ([str(i) for i in range(profiles)] if profiles > 1 else []), model


def test_profile_inputs_match_the_tensor_contract(spec):
    for model in engine_models(spec):
        io_ = model_io(spec, model)
        for profile in model_profiles(spec, model):
            ranges = profile.ranges()
            assert list(ranges) == [t.name for t in io_.inputs]
            for t in io_.inputs:
                assert len(ranges[t.name].min) == len(t.dims) + 1
                fixed = [(i, d) for i, d in enumerate(t.dims) if d != -1]
                assert all(ranges[t.name].min[i + 1] == ranges[t.name].max[i + 1] == d for i, d in fixed)


def _without_gpu_policy(spec):
    """The spec without `serving.gpu`: one batch profile per engine (what these tests of the sequence axis read)."""
    return spec.with_overrides(serving=dataclasses.replace(spec.serving, gpu={}))


def test_the_gpu_policy_gives_a_small_and_a_large_batch_profile_per_sequence_range(ci_spec, per_bucket_spec):
    for spec in (ci_spec, per_bucket_spec):
        batches = spec.serving.batch_profiles("text_encoder")
        assert len(batches) == 2 and batches[0][1] < batches[-1][2]
        profiles = model_profiles(spec, "text_encoder")
        assert len(profiles) == len(batches) * len(sequence_ranges(spec))
        small = find_profile(profiles, {"input_ids": (10, 16), "attention_mask": (10, 16)})
        assert profiles[small].ranges()["input_ids"].opt[0] == batches[0][1], "a typical request: the small profile"
        large = find_profile(profiles, {"input_ids": (100, 16), "attention_mask": (100, 16)})
        assert profiles[large].ranges()["input_ids"].max[0] == spec.serving.batching("text_encoder").max_batch_size


def test_single_text_profile_spans_the_buckets(ci_spec):
    ci_spec = _without_gpu_policy(ci_spec)
    (profile,) = model_profiles(ci_spec, "text_encoder")
    buckets = ci_spec.modalities.text.buckets
    ids = profile.ranges()["input_ids"]
    assert ids.min[1] == buckets[0]
    assert ids.max[1] == ci_spec.modalities.text.max_length
    assert ids.opt[1] == buckets[len(buckets) // 2]
    assert profile.ranges()["attention_mask"] == ids



def test_profile_per_bucket_gives_each_bucket_its_own_tuned_profile(per_bucket_spec):
    spec = _without_gpu_policy(per_bucket_spec)
    profiles = model_profiles(spec, "text_encoder")
    buckets = spec.modalities.text.buckets
    assert len(profiles) == len(buckets)
    max_batch = spec.serving.batching("text_encoder").max_batch_size
    for bucket in buckets:
        shapes = {"input_ids": (7, bucket), "attention_mask": (7, bucket)}
        index = find_profile(profiles, shapes)
        assert index is not None
        assert profiles[index].ranges()["input_ids"].opt[1] == bucket
        assert profiles[index].ranges()["input_ids"].max == (max_batch, bucket)
    # Non-text models keep one profile.
    assert len(model_profiles(spec, "image_encoder")) == 1


def test_profiles_follow_a_larger_max_batch(ci_spec):
    models = dict(ci_spec.serving.models)
    models["image_encoder"] = BatchingSpec(max_batch_size=256, preferred_batch_sizes=(64, 192))
    spec = ci_spec.with_overrides(serving=dataclasses.replace(ci_spec.serving, models=models, gpu={}))
    # With the gpu policy, its last batch profile follows max_batch_size too.
    policy = ci_spec.with_overrides(serving=dataclasses.replace(ci_spec.serving, models=models))
    assert model_profiles(policy, "image_encoder")[-1].ranges()["pixel_values"].max[0] == 256
    (profile,) = model_profiles(spec, "image_encoder")
    r = profile.ranges()["pixel_values"]
    assert (r.min[0], r.opt[0], r.max[0]) == (1, 192, 256)
    assert model_configs(spec)["image_encoder"]["gpu"].max_batch_size == 256


def test_a_profile_missing_the_largest_bucket_is_caught(ci_spec):
    ci_spec = _without_gpu_policy(ci_spec)
    (profile,) = model_profiles(ci_spec, "text_encoder")
    second_largest = ci_spec.modalities.text.buckets[-2]
    short = OptimizationProfile("short", tuple(
        (name, ShapeRange(r.min, r.opt, (r.max[0], second_largest))) for name, r in profile.inputs))
    gaps = coverage_gaps(ci_spec, "text_encoder", (short,))
    assert gaps and all(s["input_ids"][1] == ci_spec.modalities.text.max_length for s in gaps)
    with pytest.raises(ProfileError, match="fall outside every optimisation profile"):
        validate_profiles(ci_spec, "text_encoder", (short,))


def test_a_profile_below_max_batch_is_caught(ci_spec):
    ci_spec = _without_gpu_policy(ci_spec)
    (profile,) = model_profiles(ci_spec, "fusion_ranker")
    small = OptimizationProfile("small", tuple((n, ShapeRange(r.min, (8, *r.opt[1:]), (8, *r.max[1:])))
                                               for n, r in profile.inputs))
    gaps = coverage_gaps(ci_spec, "fusion_ranker", (small,))
    assert min(s["history"][0] for s in gaps) == 9


@pytest.mark.parametrize("lo, opt, hi", [((1, 16), (4, 8), (8, 64)),    # opt below min in dim 1
                                         ((1, 16), (9, 32), (8, 64)),    # opt above max in dim 0
                                         ((0, 16), (1, 16), (8, 16)),    # zero dim
                                         ((1,), (1, 16), (8, 16))])      # rank mismatch
def test_shape_range_rejects_invalid_ranges(lo, opt, hi):
    with pytest.raises(ProfileError):
        ShapeRange(lo, opt, hi)


def test_shape_range_round_trips_through_dict():
    r = ShapeRange((1, 16), (32, 32), (64, 64))
    assert ShapeRange.from_dict(r.as_dict()) == r
    assert r.contains((64, 16)) and not r.contains((65, 16)) and not r.contains((1, 15))
