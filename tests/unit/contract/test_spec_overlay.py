"""Spec overlays (`base:`): the CI spec holds only what it changes; sections merge, every other value replaces, a key
the base lacks or a circle of bases is refused naming it."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from fusionrank.contract.errors import SpecError
from fusionrank.contract.spec import load_spec, to_dict
from tests.paths import CI_SPEC

# What CI changes from the default: the overlay's own leaves, and nothing else may differ.
CI_CHANGES = {
    "modalities.image.size": 64, "modalities.video.frames": 3, "ranker.history.vocab_size": 201,
    "data.num_users": 120, "data.sessions_per_user": 4, "train.epochs": 2, "export.parity_samples": 16,
    "export.cpu.precision": {}, "export.cpu.calibration_samples": 64,
    "export.cpu.ranking.min_top10_overlap": 0.9, "export.cpu.ranking.min_kendall_tau": 0.9,
    "export.cpu.ranking.max_auc_diff": 0.02,
}


def _leaves(data: dict, path: str = "") -> dict:
    """Dotted path -> value for every value that is not a nested mapping (an empty mapping is a value)."""
    out = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        out.update(_leaves(value, where) if isinstance(value, dict) and value else {where: value})
    return out


def _differences(a: dict, b: dict) -> dict:
    left, right = _leaves(a), _leaves(b)
    prefixes = {k for k in right if isinstance(right[k], dict)}  # `precision: {}` replaces every key below it
    return {k: right.get(k) for k in set(left) | set(right)
            if left.get(k) != right.get(k) and not any(k.startswith(p + ".") for p in prefixes)}


def _overlay(tmp_path, text: str, name: str = "spec.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_ci_spec_is_the_default_with_exactly_the_overlays_values(ci_spec, default_spec):
    ci, default = to_dict(ci_spec, drop=("source",)), to_dict(default_spec, drop=("source",))
    assert _differences(default, ci) == CI_CHANGES
    assert ci["serving"]["cache"] == default["serving"]["cache"] and ci["slo"] == default["slo"]
    overlay = yaml.safe_load(CI_SPEC.read_text())
    assert overlay.pop("base") == "default"
    assert _leaves(overlay) == CI_CHANGES, "the overlay holds only the values CI changes"


def test_sections_merge_and_siblings_keep_the_bases_values(tmp_path, default_spec):
    spec = load_spec(_overlay(tmp_path, """
        base: default
        train: {epochs: 1}
        modalities: {text: {encoder: {pooling: cls}}}
    """))
    assert spec.train.epochs == 1 and spec.train.learning_rate == default_spec.train.learning_rate
    assert spec.modalities.text.encoder.pooling.value == "cls"
    assert spec.modalities.text.encoder.checkpoint == default_spec.modalities.text.encoder.checkpoint
    assert spec.modalities.text.buckets == default_spec.modalities.text.buckets


def test_lists_and_named_mappings_are_replaced_not_merged(tmp_path, default_spec):
    assert len(default_spec.modalities.text.buckets) > 1 and default_spec.export.cpu.precision
    spec = load_spec(_overlay(tmp_path, """
        base: default
        modalities: {text: {buckets: [64]}}
        export: {cpu: {precision: {audio_encoder: int8}}}
        slo: {scenarios: {}}
    """))
    assert spec.modalities.text.buckets == (64,)
    assert {m: p.value for m, p in spec.export.cpu.precision.items()} == {"audio_encoder": "int8"}
    assert spec.slo.scenarios == {} and default_spec.slo.scenarios


@pytest.mark.parametrize("text, where", [
    ("train: {epoch: 3}", "train.epoch"),
    ("trian: {epochs: 3}", "trian"),
    ("modalities: {image: {encoder: {arch: resnet-50}}}", "modalities.image.encoder.arch"),
])
def test_a_key_the_base_lacks_is_refused_naming_it(tmp_path, text, where):
    with pytest.raises(SpecError) as info:
        load_spec(_overlay(tmp_path, f"base: default\n{text}\n"))
    assert info.value.field == where and "known keys here" in str(info.value)


def test_merged_values_are_checked_like_any_spec(tmp_path):
    with pytest.raises(SpecError, match="train.epochs"):
        load_spec(_overlay(tmp_path, "base: default\ntrain: {epochs: many}\n"))
    with pytest.raises(SpecError, match="train"):
        load_spec(_overlay(tmp_path, "base: default\ntrain: 3\n"))


def test_a_base_is_a_path_beside_the_overlay_and_may_be_an_overlay_itself(tmp_path):
    _overlay(tmp_path, "base: default\ntrain: {epochs: 1, batch_size: 32}\n", "small.yaml")
    spec = load_spec(_overlay(tmp_path, "base: small.yaml\ntrain: {epochs: 5}\n"))
    assert (spec.train.epochs, spec.train.batch_size) == (5, 32)


def test_a_missing_base_or_a_circle_of_bases_is_refused(tmp_path):
    with pytest.raises(SpecError, match="absent.yaml"):
        load_spec(_overlay(tmp_path, "base: absent.yaml\n"))
    with pytest.raises(SpecError, match="'default'"):
        load_spec(_overlay(tmp_path, "base: 7\n"))
    _overlay(tmp_path, "base: b.yaml\n", "a.yaml")
    with pytest.raises(SpecError, match="circle"):
        load_spec(_overlay(tmp_path, "base: a.yaml\n", "b.yaml"))
