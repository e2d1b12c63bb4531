"""The spec loads into frozen typed objects and rejects bad fields with the field, the value and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from fusionrank.contract.errors import SpecError
from fusionrank.contract.spec import FusionType, Modality, from_dict, load_spec, member_models
from fusionrank_cli.main import main


def test_default_spec_loads_and_is_frozen():
    spec = load_spec()
    assert spec.ranker.fusion is FusionType.CONCAT
    assert spec.modalities.enabled == (Modality.TEXT, Modality.IMAGE, Modality.AUDIO)
    assert spec.modalities.audio.num_frames == 101
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.ranker.projection_dim = 3


@pytest.mark.parametrize("data, field, allowed", [
    ({"ranker": {"fusion": "sum"}}, "ranker.fusion", "'concat'"),
    ({"modalities": {"text": {"buckets": [32, 16, 64]}}}, "modalities.text.buckets", "increasing"),
    ({"modalities": {"text": {"buckets": [16, 32]}}}, "modalities.text.buckets", "max_length"),
    ({"modalities": {"audio": {"fmax": 9000}}}, "modalities.audio.fmax", "sample_rate/2"),
    ({"modalities": {"audio": {"n_fft": 500}}}, "modalities.audio.n_fft", "power of two"),
    ({"modalities": {"image": {"encoder": {"architecture": "vgg"}}}}, "modalities.image.encoder.architecture",
     "'resnet-50'"),
    ({"ranker": {"hidden_size": 3}}, "ranker.hidden_size", "no such field"),
    ({"train": {"epochs": "many"}}, "train.epochs", "an integer"),
    ({"serving": {"max_candidates": 500}}, "serving.max_candidates", "max_batch_size"),
    ({"modalities": {"image": {"max_aspect_ratio": 0.5}}}, "modalities.image.max_aspect_ratio", ">= 1"),
    ({"modalities": {"image": {"max_width": 0}}}, "modalities.image.max_width", "> 0"),
    ({"modalities": {"audio": {"max_sample_rate": 4000}}}, "modalities.audio.max_sample_rate", "min_sample_rate"),
    ({"modalities": {"audio": {"max_channels": 0}}}, "modalities.audio.max_channels", "[1, 64]"),
    ({"modalities": {"audio": {"sample_formats": ["MPEG_LAYER_III"]}}}, "modalities.audio.sample_formats",
     "'PCM_16'"),
    ({"serving": {"route": "preprocess"}}, "serving.route", "no member model uses"),
    ({"serving": {"reference_ensemble": "Rank-Ensemble"}}, "serving.reference_ensemble", "lower_snake"),
    ({"serving": {"reference_ensemble": "rank"}}, "serving.reference_ensemble", "other than the route's"),
    ({"serving": {"models": {"rank": {"max_batch_size": 32, "preferred_batch_sizes": [32]}}}},
     "serving.max_candidates", "the route's"),
    ({"slo": {"p50_ms": 900, "p95_ms": 100}}, "slo.p95_ms", "p50_ms <= p95_ms"),
])
def test_bad_field_names_field_value_and_allowed(data, field, allowed):
    base = yaml.safe_load(open(load_spec().source))
    for section, values in data.items():
        node = base.setdefault(section, {})
        stack = [(node, values)]
        while stack:
            target, patch = stack.pop()
            for k, v in patch.items():
                if isinstance(v, dict) and isinstance(target.get(k), dict):
                    stack.append((target[k], v))
                else:
                    target[k] = v
    with pytest.raises(SpecError) as info:
        from_dict(base)
    assert info.value.field == field
    assert allowed in str(info.value)


def test_disabled_modality_leaves_the_contract():
    spec = from_dict({"modalities": {"audio": {"enabled": False}}})
    assert "audio_encoder" not in member_models(spec)
    assert spec.modalities.enabled == (Modality.TEXT, Modality.IMAGE)


def test_digest_is_stable_and_content_based(tmp_path):
    a, b = load_spec(), from_dict(yaml.safe_load(open(load_spec().source)), source="elsewhere")
    assert a.digest() == b.digest()
    assert from_dict({"ranker": {"fusion": "late"}}).digest() != a.digest()


def test_cli_reports_bad_spec_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ranker:\n  fusion: sum\n")
    assert main(["generate-data", "--spec", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "ranker.fusion" in err and "'sum'" in err and "Traceback" not in err
    assert main(["generate-data", "--spec", str(tmp_path / "missing.yaml")]) == 2
    assert "readable YAML" in capsys.readouterr().err


def test_a_key_written_twice_is_refused_naming_it_and_its_line(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("serving:\n  gpu: {}\n  route: rank\n  gpu: {}\n")
    with pytest.raises(SpecError, match=r"(?s)'gpu' appears twice.*line 4"):
        load_spec(twice)
