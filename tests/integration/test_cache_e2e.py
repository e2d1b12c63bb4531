"""The cached route end to end: a route with a tiny in-process cache (a few items) and a shared tier on a real
redis-server, loaded beside the session's routes on the real Triton; scores compared with the plain reference
ensemble, the cache's own Triton metrics read back, the store stopped mid-test, and `embed-catalogue` warming it."""

from __future__ import annotations

import dataclasses
import shutil
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from benchmarks.server_metrics import cache_share, scrape
from fusionrank.contract.spec import CacheSpec, Modality
from fusionrank.contract.tensors import CLICK_PROBABILITY, MODALITY_WEIGHTS, infer_inputs, request_arrays
from fusionrank.request.scenario import novel_payload
from tests.integration.redis_server import start_redis

pytestmark = pytest.mark.e2e

ROUTE = "rank_cache_test"
TINY_LRU = 20_000  # bytes: about four items of the CI spec (three embeddings each)


@pytest.fixture(scope="module")
def cached(triton_server, ci_spec, built_repository, tmp_path_factory):
    """(spec of the cached test route, its redis-server): the route rendered from the CI spec with one instance, a
    tiny LRU (`server_wide: false`: its own in-process tier, as in a server started without the launcher's tier) and the
    shared tier, written into the session's repository and loaded; unloaded and removed after."""
    from fusionrank.triton.render import rendered_files

    redis = start_redis(tmp_path_factory.mktemp("redis"))
    try:  # the redis-server stops whatever fails below (a refused spec, a route that does not load)
        batching = dataclasses.replace(ci_spec.serving.batching(ci_spec.serving.route), instances=1)
        gpu = {ROUTE if model == ci_spec.serving.route else model: g for model, g in ci_spec.serving.gpu.items()}
        serving = dataclasses.replace(ci_spec.serving, route=ROUTE, models={**ci_spec.serving.models, ROUTE: batching},
                                      gpu=gpu,
                                      cache=CacheSpec(lru_bytes=TINY_LRU, redis_url=redis.url, redis_timeout_ms=200,
                                                      redis_retry_s=0.5, server_wide=False))
        spec = dataclasses.replace(ci_spec, serving=serving)
        for f in rendered_files(spec):
            if f.path.startswith(f"{ROUTE}/"):
                (built_repository / f.path).parent.mkdir(parents=True, exist_ok=True)
                (built_repository / f.path).write_bytes(f.content)
        with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
            client.load_model(ROUTE, headers=triton_server.grpc_admin_header)
            try:
                yield spec, redis
            finally:
                client.unload_model(ROUTE, headers=triton_server.grpc_admin_header)
    finally:
        redis.stop()
        shutil.rmtree(built_repository / ROUTE, ignore_errors=True)

@pytest.fixture(scope="module")
def bench(ci_spec):
    from fusionrank.model.synthetic_data import load_benchmark

    return load_benchmark(ci_spec)


def _request(bench, spec, session: int, n: int = 8, nonce: int | None = None):
    """One benchmark session's first `n` candidates (never-seen variants of them with a nonce)."""
    ids = [int(i) for i in bench.sessions.candidates[session]][:n]
    items = {m: [bench.item(i).payload(m) for i in ids] for m in spec.modalities.enabled}
    if nonce is not None:
        items = {m: [novel_payload(m, p, nonce * 100 + row) for row, p in enumerate(rows)] for m, rows in items.items()}
    history = np.repeat(bench.sessions.history[session][None], len(ids), axis=0).astype(np.int64)
    return items, history


def _infer(url: str, model: str, items, history) -> dict[str, np.ndarray]:
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer(model, infer_inputs(grpcclient, request_arrays(items, history)), client_timeout=120)
        return {n: result.as_numpy(n) for n in (CLICK_PROBABILITY, MODALITY_WEIGHTS)}


def _share(metrics: str, before: str, rows: int):
    """The cache's share since `before`, once the route has published the counters of `rows` looked-up rows: the
    route answers each request as soon as it is ranked and publishes its metrics at the end of the execute, so a
    scrape right after an answer may precede them (bounded wait; two equal scrapes in a row)."""
    deadline, last = time.monotonic() + 15, None
    while True:
        share = cache_share(before, scrape(metrics), ROUTE)
        settled = share is not None and share.hits + share.misses >= rows and share == last
        if settled or time.monotonic() > deadline:
            return share
        last = share
        time.sleep(0.2)


def _assert_close(spec, actual, expected) -> float:
    for name in (CLICK_PROBABILITY, MODALITY_WEIGHTS):
        tol = spec.export.tolerance(name)
        np.testing.assert_allclose(actual[name], expected[name], atol=tol.atol, rtol=tol.rtol, err_msg=name)
    return float(np.max(np.abs(actual[CLICK_PROBABILITY] - expected[CLICK_PROBABILITY])))


def test_cached_route_scores_equal_the_ensemble_cold_warm_and_after_eviction(cached, triton_server, bench, ci_spec):
    spec, redis = cached
    redis.client().flushdb()
    url, metrics = triton_server.grpc_url, triton_server.metrics_url
    sessions = [int(s) for s in bench.frozen_sessions(3)]
    items, history = _request(bench, spec, sessions[0], nonce=1)  # never-seen items: cold whatever ran before
    reference = _infer(url, ci_spec.serving.reference_ensemble, items, history)
    rows = 3 * len(history)

    before = scrape(metrics)
    cold = _infer(url, ROUTE, items, history)
    cold_share = _share(metrics, before, rows)
    before = scrape(metrics)
    warm = _infer(url, ROUTE, items, history)
    warm_share = _share(metrics, before, rows)
    for n, other in enumerate(sessions[1:]):
        before = scrape(metrics)
        _infer(url, ROUTE, *_request(bench, spec, other, nonce=2 + n))
        _share(metrics, before, rows)
    redis.client().flushdb()  # evicted from the tiny LRU and gone from the store: encoded again
    before = scrape(metrics)
    evicted = _infer(url, ROUTE, items, history)
    evicted_share = _share(metrics, before, rows)

    diffs = [_assert_close(spec, result, reference) for result in (cold, warm, evicted)]
    assert cold_share.misses == rows and cold_share.hits == 0
    assert warm_share.misses == 0 and warm_share.hits == rows and warm_share.redis_hits > 0, warm_share
    assert evicted_share.misses > 0 and evicted_share.evictions > 0, evicted_share
    assert evicted_share.bytes <= TINY_LRU
    print(f"cached route vs reference ensemble, max |diff| cold {diffs[0]:.2g}, warm {diffs[1]:.2g}, after "
          f"eviction {diffs[2]:.2g}; {warm_share.describe()}")


def test_bad_input_among_hits_is_invalid_for_that_request_alone(cached, triton_server, bench):
    spec, _ = cached
    items, history = _request(bench, spec, int(bench.frozen_sessions(1)[0]))
    _infer(triton_server.grpc_url, ROUTE, items, history)  # every row cached
    bad = {m: list(rows) for m, rows in items.items()}
    bad[Modality.AUDIO][5] = b"RIFF\x00\x00\x00\x00WAVEfmt truncated"
    with pytest.raises(InferenceServerException) as info:
        _infer(triton_server.grpc_url, ROUTE, bad, history)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message().startswith("item_audio[5]: "), info.value.message()
    assert _infer(triton_server.grpc_url, ROUTE, items, history)[CLICK_PROBABILITY].shape == (len(history), 1)


def test_a_store_stopped_mid_test_costs_latency_never_a_failed_request(cached, triton_server, bench):
    spec, redis = cached
    url, metrics = triton_server.grpc_url, triton_server.metrics_url
    before = scrape(metrics)
    redis.stop()
    try:
        for nonce in range(3):  # never-seen items: every row asks the (dead) store, then is encoded
            result = _infer(url, ROUTE, *_request(bench, spec, int(bench.frozen_sessions(1)[0]), n=4, nonce=10 + nonce))
            assert np.isfinite(result[CLICK_PROBABILITY]).all()
    finally:
        redis.start()
    share = _share(metrics, before, 3 * 4 * 3)
    assert share.store_errors >= 1 and share.misses == 3 * 4 * 3, share


def test_embed_catalogue_then_a_served_request_is_all_hits(cached, triton_server, bench, built_repository):
    from clients import Candidate
    from fusionrank.route.warming import embed_catalogue

    spec, redis = cached
    redis.client().flushdb()
    items, history = _request(bench, spec, int(bench.frozen_sessions(2)[1]), nonce=777)  # in no cache yet
    candidates = [Candidate(text=t, image=i, audio=a, item_id=n)
                  for n, (t, i, a) in enumerate(zip(*(items[m] for m in spec.modalities.enabled)))]
    candidates.append(Candidate(text=b"a broken one", image=b"not an image", audio=items[Modality.AUDIO][0],
                                item_id="broken"))
    report = embed_catalogue(spec, built_repository, triton_server.grpc_url, redis.url, "cpu", items=candidates,
                             progress=False)
    assert report.stored == {m: len(history) + (m is not Modality.IMAGE) for m in spec.modalities.enabled}
    assert len(report.refused) == 1 and report.refused[0].startswith("item broken: item_image[8]: ")
    before = scrape(triton_server.metrics_url)
    served = _infer(triton_server.grpc_url, ROUTE, items, history)
    share = _share(triton_server.metrics_url, before, 3 * len(history))
    assert share.misses == 0 and share.redis_hits == 3 * len(history), share
    reference = _infer(triton_server.grpc_url, spec.serving.reference_ensemble, items, history)
    _assert_close(spec, served, reference)
    again = embed_catalogue(spec, built_repository, triton_server.grpc_url, redis.url, "cpu", items=candidates[:3],
                            progress=False)
    assert sum(again.stored.values()) == 0 and sum(again.present.values()) == 9
