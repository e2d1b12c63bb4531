"""The route with its embedding cache, without a server: the real in-process preprocessing and cache, the members
replaced by the numpy stand-ins of tests/unit/route/test_route.py, and the Triton shell's cache metrics on a fake
`pb_utils`."""

from __future__ import annotations

import numpy as np

from fusionrank.contract.spec import Modality
from fusionrank.contract.tensors import CLICK_PROBABILITY, MODALITY_WEIGHTS
from fusionrank.request.validation import RequestPreprocessor
from fusionrank.route.cache import EmbeddingCache
from fusionrank.route.item_keys import EncoderIdentity
from fusionrank.route.members import RouteError, Status

from .test_route import Members, _rank, _request, _route


class GroupSpy(RequestPreprocessor):
    """The real preprocessor, recording how many rows of each modality it preprocessed."""

    def __init__(self, real: RequestPreprocessor):
        self.__dict__.update(real.__dict__)
        self.rows: dict[Modality, list[int]] = {}

    def encoder_groups(self, request, modality, rows):
        self.rows.setdefault(modality, []).append(len(rows))
        return super().encoder_groups(request, modality, rows)


def _cache(spec, lru_bytes=1 << 24) -> EmbeddingCache:
    identities = {m: EncoderIdentity(m, f"{m.value}_encoder", "1", "0" * 64, "1" * 64) for m in spec.modalities.enabled}
    return EmbeddingCache(identities, {m: spec.modalities.embedding_dim(m) for m in identities}, lru_bytes)


def _mixed(spec, new_rows: int, seed: int = 50):
    """A request whose first rows are rows 0..2 of `_request(spec, 3)` and whose last `new_rows` rows are new."""
    seen, new = _request(spec, 3), _request(spec, new_rows, seed=seed, title=b"a title never sent before")
    mixed = {n: np.concatenate([seen[n], new[n]]) for n in seen}
    mixed["user_history"] = np.repeat(seen["user_history"][:1], 3 + new_rows, axis=0)  # one user
    return mixed


def test_hits_skip_preprocessing_and_encoding_and_score_as_when_encoded(ci_spec, preparer):
    spy, cache = GroupSpy(preparer), _cache(ci_spec)
    route, members = _route(ci_spec, spy, cache=cache)
    (first,) = _rank(route, _request(ci_spec, 3))
    members.calls.clear()
    spy.rows.clear()
    (second,) = _rank(route, _mixed(ci_spec, new_rows=1))
    for modality in ci_spec.modalities.enabled:
        assert members.rows(f"{modality.value}_encoder") == [1], "only the new row is encoded"
        assert spy.rows[modality] == [1], "only the new row is decoded and preprocessed"
    np.testing.assert_array_equal(second[CLICK_PROBABILITY][:3], first[CLICK_PROBABILITY])
    plain, _ = _route(ci_spec, preparer)
    (uncached,) = _rank(plain, _mixed(ci_spec, new_rows=1))
    np.testing.assert_array_equal(second[CLICK_PROBABILITY], uncached[CLICK_PROBABILITY])
    np.testing.assert_array_equal(second[MODALITY_WEIGHTS], uncached[MODALITY_WEIGHTS])
    stats = cache.stats()
    assert sum(stats.hits.values()) == 9 and sum(stats.misses.values()) == 12


def test_bad_input_among_hits_fails_its_request_alone_naming_its_row_and_nothing_of_it_is_cached(ci_spec, preparer):
    cache = _cache(ci_spec)
    route, members = _route(ci_spec, preparer, cache=cache)
    _rank(route, _request(ci_spec, 3))
    bad_image = _mixed(ci_spec, new_rows=2)
    bad_image["item_image"][4, 0] = b"\xff\xd8\xff truncated jpeg"
    bad_history = _request(ci_spec, 3)
    bad_history["user_history"] = bad_history["user_history"].copy()
    bad_history["user_history"][1, 0] = -1
    too_many = {n: np.repeat(a, ci_spec.serving.max_candidates // 3 + 1, axis=0) for n, a in _request(ci_spec, 3)
                .items()}
    members.calls.clear()
    results = _rank(route, bad_image, bad_history, too_many, _request(ci_spec, 3))
    assert results[0].status is Status.INVALID_ARG and results[0].message.startswith("item_image[4]: ")
    assert results[1] == RouteError(Status.INVALID_ARG, results[1].message)
    assert results[1].message.startswith("user_history[1]: negative item id -1"), "request checks run for hits"
    assert results[2].status is Status.INVALID_ARG and "at most 64 per request" in results[2].message
    assert not isinstance(results[3], RouteError)
    assert members.calls == [("fusion_ranker", 3)], "hits only: no encoder ran, the bad requests never got there"
    assert cache.stats().entries == 9, "nothing of the bad request (its good new row 3 included) was cached"


def test_a_non_finite_embedding_fails_its_request_and_is_not_cached(ci_spec, preparer):
    members = Members(ci_spec)
    real = members.functions["audio_encoder"]

    def nan_in_row_1(arrays):
        out = real(arrays)["audio_embedding"].copy()
        out[1] = np.nan
        return {"audio_embedding": out}

    members.functions["audio_encoder"] = nan_in_row_1
    cache = _cache(ci_spec)
    route, _ = _route(ci_spec, preparer, members, errors=[], cache=cache)
    (result,) = _rank(route, _request(ci_spec, 3))
    assert result.status is Status.INVALID_ARG and result.message.startswith("item_audio[1]: the audio encoder")
    assert cache.stats().entries == 0
    members.functions["audio_encoder"] = real
    (result,) = _rank(route, _request(ci_spec, 3))
    assert result[CLICK_PROBABILITY].shape == (3, 1) and members.rows("audio_encoder")[-1] == 3


def test_a_failing_cache_costs_misses_never_a_request(ci_spec, preparer):
    class Broken:
        def key(self, modality, payload):
            raise RuntimeError("cache bug")

    errors: list[str] = []
    route, members = _route(ci_spec, preparer, errors=errors, cache=Broken())
    (result,) = _rank(route, _request(ci_spec, 2))
    assert result[CLICK_PROBABILITY].shape == (2, 1) and members.rows("image_encoder") == [2]
    assert any("cache lookup failed" in e for e in errors)


def test_a_tiny_lru_evicts_and_scores_stay_the_same(ci_spec, preparer):
    entry = _cache(ci_spec)
    route, _ = _route(ci_spec, preparer, cache=entry)
    _rank(route, _request(ci_spec, 1))
    one_item = entry.stats().bytes
    tiny = _cache(ci_spec, lru_bytes=2 * one_item)  # two items' embeddings of three modalities
    route, members = _route(ci_spec, preparer, cache=tiny)
    requests = [_request(ci_spec, 3, seed=s) for s in (1, 2, 1, 2)]
    results = [_rank(route, r)[0] for r in requests]
    np.testing.assert_array_equal(results[0][CLICK_PROBABILITY], results[2][CLICK_PROBABILITY])
    np.testing.assert_array_equal(results[1][CLICK_PROBABILITY], results[3][CLICK_PROBABILITY])
    stats = tiny.stats()
    assert stats.evictions > 0 and stats.bytes <= 2 * one_item and members.rows("image_encoder")[2] > 0


def test_a_text_rows_embedding_does_not_depend_on_the_other_rows_of_its_request(ci_spec, preparer):
    """Text rows are padded to their own bucket, so a cached embedding equals a freshly computed one."""
    seen = []
    members = Members(ci_spec)
    real = members.functions["text_encoder"]
    members.functions["text_encoder"] = lambda a: seen.append(a["input_ids"].shape) or real(a)
    route, _ = _route(ci_spec, preparer, members)
    short = _request(ci_spec, 2)
    mixed = {n: a.copy() for n, a in short.items()}
    mixed["item_text"][1, 0] = b" ".join([b"waterproof"] * 20)
    alone, together = _rank(route, short)[0], _rank(route, mixed)[0]
    assert sorted(s[1] for s in seen[1:]) == [16, 64], "one call per bucket"
    np.testing.assert_array_equal(alone[CLICK_PROBABILITY][0], together[CLICK_PROBABILITY][0])
