"""One item-embedding cache per server (issue 19): a real redis-server on a Unix socket, bounded and LRU, that every
route instance's cache reads and writes, so warming through one instance warms all and none pins its own value."""

from __future__ import annotations

import stat

import numpy as np
import pytest

from fusionrank.contract.spec import CacheSpec, Modality
from fusionrank.route.cache import EmbeddingCache
from fusionrank.route.item_keys import EncoderIdentity
from fusionrank.server.local_cache import MIN_BYTES, LocalCacheError, LocalCacheServer

TEXT = Modality.TEXT


def _instance(spec, local_url, redis_url=None) -> EmbeddingCache:
    """The cache one route instance builds from the spec (lru_bytes as the spec says) and the server's tier."""
    identities = {m: EncoderIdentity(m, f"{m.value}_encoder", "1", "0" * 64, "1" * 64) for m in spec.modalities.enabled}
    settings = CacheSpec(lru_bytes=1 << 20, redis_url=redis_url, redis_timeout_ms=500)
    return EmbeddingCache.from_spec(settings, identities, {m: spec.modalities.embedding_dim(m) for m in identities},
                                    print, local_url=local_url)


@pytest.fixture
def local_cache():
    with LocalCacheServer(MIN_BYTES) as server:  # its own short folder: a Unix socket path is bounded
        yield server


def test_the_server_wide_tier_is_bounded_lru_private_and_stops(tmp_path):
    server = LocalCacheServer(8 * 2**20)
    folder = server.folder
    with server:
        client = server.client()
        assert client.config_get("maxmemory") == {"maxmemory": str(8 * 2**20)}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        assert client.config_get("port") == {"port": "0"}, "no TCP port: the Unix socket only"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and server.url == f"unix://{server.socket}"
        client.close()
    assert server.process is None and not folder.exists()
    with pytest.raises(LocalCacheError, match=r"serving.cache.lru_bytes = 1024: .* at least 4194304 bytes"):
        LocalCacheServer(1024)


def test_warming_through_one_instance_warms_the_others_with_the_same_value(ci_spec, local_cache):
    first, second = _instance(ci_spec, local_cache.url), _instance(ci_spec, local_cache.url)
    assert first.lru is None and second.lru is None, "the server-wide tier replaces the per-instance LRU"
    key = first.key(TEXT, b"a title")
    value = np.linspace(-1, 1, ci_spec.modalities.embedding_dim(TEXT), dtype=np.float32)
    assert second.lookup([(TEXT, key)]) == [None]
    first.store([(TEXT, key, value)])
    (found,) = second.lookup([(TEXT, key)])
    np.testing.assert_array_equal(found, value)
    assert second.stats().hits[TEXT, "local"] == 1 and second.stats().misses[TEXT] == 1
    # Another instance storing another value for the key (a re-encode) replaces it for everybody: one answer.
    second.store([(TEXT, key, value + 1)])
    np.testing.assert_array_equal(first.lookup([(TEXT, key)])[0], value + 1)
    first.close()
    second.close()


def test_a_hit_of_the_cross_server_tier_is_copied_into_the_server_tier(ci_spec, local_cache, redis_server):
    writer = _instance(ci_spec, None, redis_server.url)  # another server's route, same shared store
    key = writer.key(TEXT, b"a title")
    value = np.ones(ci_spec.modalities.embedding_dim(TEXT), np.float32)
    writer.store([(TEXT, key, value)])
    reader = _instance(ci_spec, local_cache.url, redis_server.url)
    np.testing.assert_array_equal(reader.lookup([(TEXT, key)])[0], value)
    assert reader.stats().hits[TEXT, "redis"] == 1
    redis_server.stop()  # the cross-server store goes away: the server tier still answers
    np.testing.assert_array_equal(reader.lookup([(TEXT, key)])[0], value)
    assert reader.stats().hits[TEXT, "local"] == 1
    writer.close()
    reader.close()


def test_a_cache_server_started_from_the_main_thread_does_not_outlive_its_killed_owner(tmp_path):
    """A benchmark or test run killed mid-way (SIGKILL: no context manager runs) must not leave its servers behind on
    a shared machine: the launcher's tritonserver and cache servers get SIGTERM when the process that started them
    from its main thread ends (`dies_with_this_process`); from another thread they are not tied to it."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from fusionrank.server.local_cache import dies_with_this_process

    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from fusionrank.server.local_cache import LocalCacheServer, MIN_BYTES\n"
         "server = LocalCacheServer(MIN_BYTES).start()\n"
         "print(server.process.pid, flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        child = int(owner.stdout.readline())
        os.kill(child, 0)  # running
        owner.kill()
        owner.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
                if open(f"/proc/{child}/stat").read().split()[2] == "Z":  # exited, waiting for init to reap it
                    break
            except (ProcessLookupError, FileNotFoundError):  # gone (reaped between the two looks, too)
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the cache server outlived the process that started it")
    finally:
        owner.kill()
    assert dies_with_this_process() is not None
    seen = []
    worker = threading.Thread(target=lambda: seen.append(dies_with_this_process()))
    worker.start()
    worker.join()
    assert seen == [None], "a worker thread's child is not tied to the thread's end"
