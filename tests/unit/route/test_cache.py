"""The embedding cache on its own: keys (what changes them), the bounded LRU, and the shared tier on a real
redis-server started on loopback (outage mid-test, a port that never answers, values that do not fit)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from fusionrank.contract.errors import SpecError
from fusionrank.contract.spec import CacheSpec, Modality
from fusionrank.route.cache import EmbeddingCache, LruTier
from fusionrank.route.item_keys import EncoderIdentity, IdentityError, encoder_identities

DIMS = {Modality.TEXT: 4, Modality.IMAGE: 3}


def _identities() -> dict[Modality, EncoderIdentity]:
    return {m: EncoderIdentity(m, f"{m.value}_encoder", "1", "a" * 64, "b" * 64) for m in DIMS}


def _cache(lru_bytes=1 << 20, shared=None) -> EmbeddingCache:
    return EmbeddingCache(_identities(), DIMS, lru_bytes, shared)


def _vec(modality: Modality, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIMS[modality]).astype(np.float32)


# --- keys ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def key_repo(ci_spec, tmp_path):
    """A repository with stand-in encoder files and the real tokenizer (what the keys digest)."""
    from fusionrank.contract.paths import resolve_text_checkpoint, tokenizer_dir

    repo = tmp_path / "repo"
    for m in ci_spec.modalities.enabled:
        (repo / f"{m.value}_encoder" / "1").mkdir(parents=True)
        (repo / f"{m.value}_encoder" / "1" / "model.onnx").write_bytes(b"weights of " + m.value.encode())
    shutil.copytree(resolve_text_checkpoint(ci_spec.modalities.text.encoder.checkpoint), tokenizer_dir(repo))
    return repo


FILES = {"text_encoder": "model.onnx", "image_encoder": "model.onnx", "audio_encoder": "model.onnx"}


def test_key_changes_when_the_model_its_version_its_preprocessing_or_the_payload_changes(ci_spec, key_repo):
    def keys(spec=ci_spec, files=FILES):
        ids = encoder_identities(spec, key_repo, files)
        return {m: ids[m].key(b"payload") for m in ids}

    base = keys()
    assert keys() == base, "the same served files give the same keys (another instance, embed-catalogue)"
    assert len(set(base.values())) == 3 and all(k.startswith("fusionrank:emb:v2:") for k in base.values())
    assert encoder_identities(ci_spec, key_repo, FILES)[Modality.TEXT].key(b"other") != base[Modality.TEXT]

    (key_repo / "image_encoder" / "1" / "model.onnx").write_bytes(b"re-exported weights")  # a new export
    changed = keys()
    assert changed[Modality.IMAGE] != base[Modality.IMAGE] and changed[Modality.TEXT] == base[Modality.TEXT]

    (key_repo / "audio_encoder" / "1" / "model.int8.onnx").write_bytes(b"quantised")  # another file served
    assert keys(files={**FILES, "audio_encoder": "model.int8.onnx"})[Modality.AUDIO] != changed[Modality.AUDIO]

    shutil.copytree(key_repo / "image_encoder" / "1", key_repo / "image_encoder" / "2")  # a new version, same bytes
    assert keys()[Modality.IMAGE] != changed[Modality.IMAGE]

    image = dataclasses.replace(ci_spec.modalities.image, max_bytes=1000)  # a new limit: old hits never validated
    spec = ci_spec.with_overrides(modalities=dataclasses.replace(ci_spec.modalities, image=image))
    assert keys(spec=spec)[Modality.IMAGE] != keys()[Modality.IMAGE]

    (key_repo / "preprocess" / "1" / "tokenizer" / "tokenizer.json").write_text("{}")  # a new tokenizer
    assert keys()[Modality.TEXT] != changed[Modality.TEXT]


def test_missing_served_file_is_an_error_naming_it(ci_spec, key_repo):
    with pytest.raises(IdentityError, match="audio_encoder: no version folder .* holds model.plan"):
        encoder_identities(ci_spec, key_repo, {**FILES, "audio_encoder": "model.plan"})


def test_cache_spec_checks_name_the_field():
    with pytest.raises(SpecError, match="serving.cache.redis_url"):
        CacheSpec(redis_url="http://cache:6379")
    with pytest.raises(SpecError, match="serving.cache.lru_bytes"):
        CacheSpec(lru_bytes=-1)
    with pytest.raises(SpecError, match="serving.cache.redis_timeout_ms"):
        CacheSpec(redis_timeout_ms=0)
    assert not CacheSpec(lru_bytes=0).enabled and CacheSpec(lru_bytes=0, redis_url="redis://x:1/0").enabled


# --- in-process tier ----------------------------------------------------------------------------------------------


def test_lru_stays_within_its_bytes_and_evicts_the_least_recently_used():
    one = LruTier(1 << 30)
    one.put("k0", np.zeros(64, np.float32))
    per_entry = one.bytes
    lru = LruTier(per_entry * 3)
    for i in range(3):
        lru.put(f"k{i}", np.full(64, i, np.float32))
    assert lru.get("k0") is not None  # k0 is now the most recently used
    lru.put("k3", np.full(64, 3, np.float32))
    assert lru.get("k1") is None and lru.get("k0") is not None and lru.get("k3") is not None
    assert lru.evictions == 1 and lru.bytes <= lru.max_bytes and len(lru) == 3
    value = lru.get("k3")
    with pytest.raises(ValueError):
        value[0] = 7  # entries are read-only: a caller cannot alter what other requests will get


def test_lookup_counts_hits_and_misses_and_nothing_non_finite_is_stored():
    cache = _cache()
    text = cache.key(Modality.TEXT, b"title")
    assert cache.lookup([(Modality.TEXT, text)]) == [None]
    bad = _vec(Modality.IMAGE, 1)
    bad[0] = np.nan
    image = cache.key(Modality.IMAGE, b"jpeg")
    cache.store([(Modality.TEXT, text, _vec(Modality.TEXT, 0)), (Modality.IMAGE, image, bad),
                 (Modality.IMAGE, cache.key(Modality.IMAGE, b"short"), np.zeros(2, np.float32))])
    found = cache.lookup([(Modality.TEXT, text), (Modality.IMAGE, image)])
    np.testing.assert_array_equal(found[0], _vec(Modality.TEXT, 0))
    assert found[1] is None, "a non-finite embedding is never cached"
    stats = cache.stats()
    assert stats.hits == {(Modality.TEXT, "lru"): 1} and stats.misses == {Modality.TEXT: 1, Modality.IMAGE: 1}
    assert stats.entries == 1 and stats.hit_ratio == pytest.approx(1 / 3)


# --- shared tier on a real Redis ----------------------------------------------------------------------------------


def test_each_payload_kind_is_its_own_key_namespace(ci_spec, key_repo):
    """A clip's key (frames) and a still's key of the same bytes differ, and every kind has its own prefix."""
    from fusionrank.request.candidates import image_cache_payload
    from fusionrank.route.item_keys import IdentityError, PayloadKind

    ids = encoder_identities(ci_spec, key_repo, FILES)
    forged = image_cache_payload(ci_spec, b"still", b"clip")
    still, frames = ids[Modality.IMAGE].key(forged), ids[Modality.IMAGE].key(forged, PayloadKind.FRAMES)
    assert still != frames and ":still:" in still and ":frames:" in frames
    assert ids[Modality.TEXT].key(b"x").startswith("fusionrank:emb:v2:text:")
    with pytest.raises(IdentityError, match="not encoded by text_encoder"):
        ids[Modality.TEXT].key(b"x", PayloadKind.AUDIO)
