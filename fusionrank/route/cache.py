"""The route's item-embedding cache: one tier per server that every route instance shares (a local redis-server
on a Unix socket, `fusionrank.server.local_cache`) or, on a server started without it, an in-process LRU per
route instance bounded in bytes; in front of an optional shared tier on Redis for several servers (`serving.cache`
in the spec; keys from `fusionrank.route.item_keys`; docs/cache.md).

- A lookup asks the LRU, then the shared tier for what the LRU lacks, in one round trip (MGET) per execute of the
  route; shared hits are copied into the LRU.
- A store puts fresh embeddings in the LRU and, in one pipelined round trip, in the shared tier with a TTL.
- The shared tier can never fail a request: every round trip is bounded by `redis_timeout_ms`; an error or a
  timeout is counted, the rows it concerned are encoded instead, and the tier is skipped for `redis_retry_s`
  (so a dead store costs one timeout per instance and retry period, not one per request).
- Only finite float32 embeddings of the expected size are stored or accepted from the store: a value that does not
  fit (another writer, corruption) is counted as a store error and treated as a miss.

Counters (hits per tier and modality, misses per modality, evictions, store errors, bytes held) are plain numbers
here; the Triton shell publishes them as custom metrics (`fusionrank.triton.route`).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fusionrank.contract.spec import CacheSpec, Modality
from fusionrank.route.item_keys import EncoderIdentity, PayloadKind

# The server-wide cache tier's URL, set by the launcher for the Python-backend stubs it starts (the route reads it).
LOCAL_CACHE_ENV = "FUSIONRANK_LOCAL_CACHE"

# Bytes an LRU entry costs beyond its key and embedding data: the ndarray object (112 on CPython 3.10-3.12) and the
# OrderedDict's node and hash-table slot (about 100).
ENTRY_OVERHEAD = 220


def stored_value(embedding: np.ndarray) -> bytes:
    """How an embedding is kept in the shared tier: its float32 values, little-endian (what `fusionrank
    embed-catalogue` writes too)."""
    return np.asarray(embedding, dtype="<f4").tobytes()


def _entry_bytes(key: str, value: np.ndarray) -> int:
    return sys.getsizeof(key) + value.nbytes + ENTRY_OVERHEAD


class LruTier:
    """Least-recently-used map of key -> read-only embedding, holding at most `max_bytes` (keys and overhead
    counted). Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        """Store (a read-only copy of) `value`, evicting the least recently used entries beyond the bound."""
        size = _entry_bytes(key, value)
        if size > self.max_bytes:
            return
        value = np.array(value, dtype=np.float32)
        value.flags.writeable = False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= _entry_bytes(key, old)
            self._entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                evicted_key, evicted = self._entries.popitem(last=False)
                self.bytes -= _entry_bytes(evicted_key, evicted)
                self.evictions += 1


class RedisTier:
    """The shared tier: raw little-endian float32 values on a Redis server, every round trip bounded by a timeout;
    after an error the tier is skipped for `retry_s` seconds."""

    def __init__(self, url: str, timeout_ms: int, retry_s: float, ttl_s: int,
                 log: Callable[[str], None] = lambda message: None, clock: Callable[[], float] = time.monotonic):
        # Imported here: only a route with a shared tier configured needs the client (the `serve` extra has it).
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        timeout = timeout_ms / 1000.0
        # No retries: a retry would multiply the time a dead store costs; the route encodes the rows instead.
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
                                           health_check_interval=0)
        self.url, self.retry_s, self.ttl_s = url, retry_s, ttl_s
        self.log, self.clock = log, clock
        self.errors = 0
        self.down_until = 0.0

    @property
    def available(self) -> bool:
        return self.clock() >= self.down_until

    def _failed(self, operation: str, exc: Exception) -> None:
        self.errors += 1
        if self.available:  # log once per outage, not once per request
            self.log(f"embedding cache: shared tier {self.url} failed on {operation} ({type(exc).__name__}: {exc}); "
                     f"encoding instead, retrying in {self.retry_s:g} s")
        self.down_until = self.clock() + self.retry_s

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The stored values (None where absent); all None while the tier is down or when the round trip fails."""
        if not keys or not self.available:
            return [None] * len(keys)
        try:
            return list(self.client.mget(keys))
        except Exception as exc:  # redis errors, timeouts, OSError: the rows are encoded instead
            self._failed("read", exc)
            return [None] * len(keys)

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store every (key, value) in one pipelined round trip (skipped while the tier is down)."""
        if not items or not self.available:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(key, value, ex=self.ttl_s or None)
                pipe.execute()
        except Exception as exc:  # as in get_many: a failed store costs the next requests a miss, nothing more
            self._failed("write", exc)

    def close(self) -> None:
        self.client.close()


@dataclass
class CacheStats:
    """Cumulative counters of one cache (the metrics the Triton shell publishes)."""

    hits: Counter = field(default_factory=Counter)  # (modality, tier) -> rows found
    misses: Counter = field(default_factory=Counter)  # modality -> rows the route had to encode
    evictions: int = 0
    store_errors: int = 0  # failed or timed-out round trips to the shared tier, and values it held that did not fit
    bytes: int = 0  # held by the in-process tier
    entries: int = 0

    @property
    def hit_ratio(self) -> float:
        found, missed = sum(self.hits.values()), sum(self.misses.values())
        return found / (found + missed) if found + missed else 0.0


class EmbeddingCache:
    """Item embeddings by key, in front of the encoders: `lookup` before preprocessing, `store` after encoding."""

    def __init__(self, identities: dict[Modality, EncoderIdentity], dims: dict[Modality, int], lru_bytes: int,
                 shared: RedisTier | None = None, local: RedisTier | None = None):
        self.identities = identities
        self.dims = dims
        self.lru = LruTier(lru_bytes) if lru_bytes > 0 else None
        self.local = local  # the server-wide tier every route instance shares (fusionrank.server.local_cache)
        self.shared = shared
        self._hits: Counter = Counter()
        self._misses: Counter = Counter()
        self._rejected = 0

    @classmethod
    def from_spec(cls, spec: CacheSpec, identities: dict[Modality, EncoderIdentity], dims: dict[Modality, int],
                  log: Callable[[str], None] = lambda message: None,
                  local_url: str | None = None) -> EmbeddingCache:
        """The cache of one route instance. With `local_url` (the server-wide tier, `$FUSIONRANK_LOCAL_CACHE`) it
        replaces the in-process LRU: an LRU per instance would pin whichever value that instance saw first, and
        consistency across instances is worth more than the Unix-socket round trip (about 0.1 ms per execute) it
        saves."""
        def tier(url: str | None) -> RedisTier | None:
            return RedisTier(url, spec.redis_timeout_ms, spec.redis_retry_s, spec.redis_ttl_s, log) if url else None

        local = tier(local_url)
        return cls(identities, dims, 0 if local else spec.lru_bytes, tier(spec.redis_url), local)

    def key(self, modality: Modality, payload: bytes, kind: PayloadKind | None = None) -> str:
        return self.identities[modality].key(payload, kind)

    def _remote(self) -> list[tuple[str, RedisTier]]:
        return [(name, t) for name, t in (("local", self.local), ("redis", self.shared)) if t is not None]

    def lookup(self, wanted: Sequence[tuple[Modality, str]]) -> list[np.ndarray | None]:
        """The embedding of every (modality, key), or None for a miss; counts hits and misses. Tiers are asked in
        order (in-process LRU, server-wide, shared across servers), each for what the ones before lacked; a hit is
        copied into the tiers before it."""
        found: list[np.ndarray | None] = [self.lru.get(k) if self.lru is not None else None for _, k in wanted]
        for (modality, _), value in zip(wanted, found):
            if value is not None:
                self._hits[modality, "lru"] += 1
        nearer: list[RedisTier] = []
        for name, tier in self._remote():
            ask = [i for i, value in enumerate(found) if value is None]
            copies = []
            for i, raw in zip(ask, tier.get_many([wanted[i][1] for i in ask])):
                modality, key = wanted[i]
                value = self._decode(modality, raw)
                if value is not None:
                    found[i] = value
                    self._hits[modality, name] += 1
                    copies.append((key, value))
                    if self.lru is not None:
                        self.lru.put(key, value)
            for near in nearer:
                near.put_many([(key, stored_value(value)) for key, value in copies])
            nearer.append(tier)
        for (modality, _), value in zip(wanted, found):
            if value is None:
                self._misses[modality] += 1
        return found

    def _decode(self, modality: Modality, raw: bytes | None) -> np.ndarray | None:
        if raw is None:
            return None
        if len(raw) == self.dims[modality] * 4:
            value = np.frombuffer(raw, dtype="<f4").astype(np.float32)
            if np.isfinite(value).all():
                return value
        self._rejected += 1  # not what this route stores: encode the row again (its store overwrites the value)
        return None

    def store(self, items: Sequence[tuple[Modality, str, np.ndarray]]) -> None:
        """Keep fresh embeddings (finite float32 rows of the modality's size; anything else is not stored)."""
        good = [(m, k, np.asarray(v, dtype=np.float32)) for m, k, v in items
                if np.shape(v) == (self.dims[m],) and np.isfinite(v).all()]
        if self.lru is not None:
            for _, key, value in good:
                self.lru.put(key, value)
        for _, tier in self._remote():
            tier.put_many([(key, stored_value(value)) for _, key, value in good])

    def stats(self) -> CacheStats:
        return CacheStats(hits=Counter(self._hits), misses=Counter(self._misses),
                          evictions=self.lru.evictions if self.lru is not None else 0,
                          store_errors=sum(t.errors for _, t in self._remote()) + self._rejected,
                          bytes=self.lru.bytes if self.lru is not None else 0,
                          entries=len(self.lru) if self.lru is not None else 0)

    def close(self) -> None:
        for _, tier in self._remote():
            tier.close()
