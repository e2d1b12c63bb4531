"""The route cache's shared tier on a real redis-server (and a port that never answers): shared between instances;
a store that stops or hangs costs misses, never an error."""

from __future__ import annotations

import time

import numpy as np

from fusionrank.contract.spec import CacheSpec, Modality
from fusionrank.route.cache import EmbeddingCache, RedisTier
from tests.unit.route.test_cache import DIMS, _identities, _vec


def test_shared_tier_serves_another_instance_and_refuses_values_that_do_not_fit(redis_server):
    settings = CacheSpec(lru_bytes=1 << 20, redis_url=redis_server.url)
    writer = EmbeddingCache.from_spec(settings, _identities(), DIMS)
    reader = EmbeddingCache.from_spec(settings, _identities(), DIMS)  # another instance or replica: empty LRU
    keys = [writer.key(Modality.TEXT, b"t%d" % i) for i in range(3)]
    writer.store([(Modality.TEXT, k, _vec(Modality.TEXT, i)) for i, k in enumerate(keys)])
    assert redis_server.client().ttl(keys[0]) > 0, "stored with the spec's expiry"
    client = redis_server.client()
    client.set(keys[1], b"\x00" * 5)  # not a float32 vector of this modality's size
    client.set(keys[2], np.full(4, np.inf, "<f4").tobytes())
    found = reader.lookup([(Modality.TEXT, k) for k in keys])
    np.testing.assert_array_equal(found[0], _vec(Modality.TEXT, 0))
    assert found[1] is None and found[2] is None
    stats = reader.stats()
    assert stats.hits == {(Modality.TEXT, "redis"): 1} and stats.store_errors == 2
    assert reader.lookup([(Modality.TEXT, keys[0])])[0] is not None
    assert reader.stats().hits[Modality.TEXT, "lru"] == 1, "a shared hit is kept in the instance's LRU"
    writer.close()
    reader.close()


def test_a_store_stopped_mid_test_costs_misses_never_an_error_and_is_used_again_after_the_retry_period(redis_server):
    now = [0.0]
    logged: list[str] = []
    shared = RedisTier(redis_server.url, timeout_ms=200, retry_s=5.0, ttl_s=60, log=logged.append,
                       clock=lambda: now[0])
    cache = EmbeddingCache(_identities(), DIMS, 0, shared)  # no LRU: every lookup asks the store
    key = cache.key(Modality.TEXT, b"title")
    cache.store([(Modality.TEXT, key, _vec(Modality.TEXT, 0))])
    assert cache.lookup([(Modality.TEXT, key)])[0] is not None

    redis_server.stop()
    assert cache.lookup([(Modality.TEXT, key)]) == [None]
    assert shared.errors == 1 and len(logged) == 1 and "shared tier" in logged[0]
    cache.store([(Modality.TEXT, key, _vec(Modality.TEXT, 0))])  # skipped while down: no second error
    assert cache.lookup([(Modality.TEXT, key)]) == [None] and shared.errors == 1

    redis_server.start()
    now[0] += 5.0
    assert cache.lookup([(Modality.TEXT, key)]) == [None], "the restarted store is empty: a miss, no error"
    cache.store([(Modality.TEXT, key, _vec(Modality.TEXT, 0))])
    assert cache.lookup([(Modality.TEXT, key)])[0] is not None and shared.errors == 1
    cache.close()


def test_a_store_that_never_answers_costs_one_timeout_per_retry_period(black_hole):
    shared = RedisTier(black_hole.url, timeout_ms=100, retry_s=30.0, ttl_s=60)
    cache = EmbeddingCache(_identities(), DIMS, 1 << 20, shared)
    key = cache.key(Modality.TEXT, b"title")
    started = time.monotonic()
    assert cache.lookup([(Modality.TEXT, key)]) == [None]
    first = time.monotonic() - started
    started = time.monotonic()
    for _ in range(20):
        cache.lookup([(Modality.TEXT, key)])
        cache.store([(Modality.TEXT, key, _vec(Modality.TEXT, 0))])
    rest = time.monotonic() - started
    assert 0.09 <= first < 1.0, f"the first lookup waited {first:.3f} s (timeout 0.1 s)"
    assert rest < 0.5 and shared.errors == 1, f"later calls waited {rest:.3f} s with {shared.errors} errors"
    assert cache.lookup([(Modality.TEXT, key)])[0] is not None, "the LRU still serves what was stored"
    cache.close()
