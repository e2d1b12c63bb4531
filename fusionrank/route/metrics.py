"""The route's Triton custom metrics (the Python backend's metric API, `pb_utils.MetricFamily`): what it answered
(`ResponseMetrics`) and what its embedding cache did (`CacheMetrics`). `pb` is `triton_python_backend_utils` (or the
tests' fake); nothing here imports it.
"""

from __future__ import annotations

from collections import Counter

from fusionrank.route.cache import CacheStats


class CacheMetrics:
    """The route's embedding-cache counters as Triton custom metrics (the Python backend's metric API), one series
    per route instance. Each metric update is a round trip to the server, so they are published once per execute and
    only when they changed."""

    TIERS = ("lru", "local", "redis")

    def __init__(self, pb, model: str, instance: str, modalities):
        # Kept: a MetricFamily object that is garbage-collected deletes the family and its metrics in the server.
        self.families = []

        def family(name: str, description: str, kind):
            self.families.append(pb.MetricFamily(name=name, description=description, kind=kind))
            return self.families[-1]

        counter, gauge = pb.MetricFamily.COUNTER, pb.MetricFamily.GAUGE
        hits = family("fusionrank_cache_hits", "Candidate payloads whose embedding the route's cache held", counter)
        misses = family("fusionrank_cache_misses", "Candidate payloads the route had to preprocess and encode", counter)
        labels = {"model": model, "instance": instance}
        self.hits = {(m, t): hits.Metric(labels={**labels, "modality": m.value, "tier": t})
                     for m in modalities for t in self.TIERS}
        self.misses = {m: misses.Metric(labels={**labels, "modality": m.value}) for m in modalities}
        self.evictions = family("fusionrank_cache_evictions", "Entries the in-process cache evicted (LRU, bytes bound)",
                                counter).Metric(labels=labels)
        self.store_errors = family("fusionrank_cache_store_errors", "Failed or timed-out round trips to the shared "
                                   "cache tier and values from it that did not fit", counter).Metric(labels=labels)
        self.bytes = family("fusionrank_cache_bytes", "Bytes held by the in-process cache", gauge).Metric(labels=labels)
        self.last = CacheStats()

    def publish(self, stats: CacheStats) -> None:
        counters = [(self.hits[k], stats.hits[k] - self.last.hits[k]) for k in self.hits]
        counters += [(self.misses[m], stats.misses[m] - self.last.misses[m]) for m in self.misses]
        counters += [(self.evictions, stats.evictions - self.last.evictions),
                     (self.store_errors, stats.store_errors - self.last.store_errors)]
        for metric, delta in counters:
            if delta:
                metric.increment(delta)
        if stats.bytes != self.last.bytes:
            self.bytes.set(stats.bytes)
        self.last = stats


class ResponseMetrics:
    """What the route answered, as a Triton custom metric: `fusionrank_route_responses{code}`, `code` the gRPC status
    the caller sees (OK or the response's error code). Triton 2.51 counts a Python model's error responses as
    successes in `nv_inference_request_success/failure` (server#7713): this counter is the one that sees the route's
    errors. The route counts each response as it leaves (one update, a round trip to the server, per response)."""

    # pb_utils.TritonError's code names -> the gRPC status names callers see (Triton's own mapping).
    GRPC_NAMES = {"INVALID_ARG": "INVALID_ARGUMENT", "CANCELLED": "CANCELLED", "UNAVAILABLE": "UNAVAILABLE",
                  "INTERNAL": "INTERNAL"}

    def __init__(self, pb, model: str, instance: str):
        # Kept: a MetricFamily object that is garbage-collected deletes the family and its metrics in the server.
        self.family = pb.MetricFamily(name="fusionrank_route_responses", kind=pb.MetricFamily.COUNTER,
                                      description="Responses of the route by the gRPC status the caller sees")
        self.labels = {"model": model, "instance": instance}
        self.names = {getattr(pb.TritonError, code): name for code, name in self.GRPC_NAMES.items()}
        # Every series exists from the start (at 0), so rates and ratios have data before the first error.
        self.metrics = {name: self._metric(name) for name in ("OK", *self.names.values())}

    def _metric(self, name: str):
        return self.family.Metric(labels={**self.labels, "code": name})

    def count(self, codes: list[int | None]) -> None:
        """Count responses: each one's Triton error code, None for a response with outputs."""
        for code, n in Counter(codes).items():
            name = "OK" if code is None else self.names.get(code, f"CODE_{code}")
            if name not in self.metrics:
                self.metrics[name] = self._metric(name)
            self.metrics[name].increment(n)
