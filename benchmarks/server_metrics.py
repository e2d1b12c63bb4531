"""Server-side breakdown of a load test from Triton's Prometheus metrics.

Two scrapes of `/metrics`, one before and one after the run, parsed with prometheus_client's parser; the per-model
differences give each served model's requests, queue time and compute time per request, and the batch size the
dynamic batcher achieved (inference count / execution count). A missed SLO then shows where the time went. A model
that counts its own answers by status (the route's `fusionrank_route_responses{code}`) has its failures from there:
Triton 2.51 counts a Python model's error responses as successes (server#7713). The
route's embedding-cache metrics (`fusionrank_cache_*`, custom metrics of the route's Python model) give the cache's
share of the run: hits per tier, misses, evictions, store errors, bytes held.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from prometheus_client.parser import text_string_to_metric_families

from fusionrank.contract.errors import FusionRankError
from fusionrank.contract.names import BATCH_COMPUTE_METRIC

REQUEST_SUCCESS = "nv_inference_request_success"
REQUEST_FAILURE = "nv_inference_request_failure"
INFERENCE_COUNT = "nv_inference_count"
EXEC_COUNT = "nv_inference_exec_count"
REQUEST_US = "nv_inference_request_duration_us"
QUEUE_US = "nv_inference_queue_duration_us"
COMPUTE_US = ("nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
              "nv_inference_compute_output_duration_us")
ROUTE_RESPONSES = "fusionrank_route_responses"  # the route's answers by `code` (fusionrank.route.metrics)
ROUTE_ERRORS = f"{ROUTE_RESPONSES}:error"  # its answers with a code other than OK, summed
METRICS = (REQUEST_SUCCESS, REQUEST_FAILURE, INFERENCE_COUNT, EXEC_COUNT, REQUEST_US, QUEUE_US, *COMPUTE_US,
           ROUTE_RESPONSES, BATCH_COMPUTE_METRIC)

Counters = dict[str, dict[str, float]]  # model -> metric -> value (summed over versions and other labels)


class MetricsError(FusionRankError):
    """Triton's metrics endpoint could not be read."""


def scrape(url: str, timeout: float = 5.0) -> str:
    """The text of one Prometheus scrape."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        raise MetricsError(f"cannot read Triton metrics from {url}: {exc}") from exc


def parse_counters(text: str) -> Counters:
    """Per-model values of the inference counters in a Prometheus text exposition."""
    out: Counters = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        if family.name not in METRICS:
            continue
        # Newer prometheus_client parsers name counter samples `<family>_total`; `_created` samples are skipped.
        for sample in family.samples:
            if sample.name in (family.name, f"{family.name}_total") and "model" in sample.labels:
                out[sample.labels["model"]][family.name] += float(sample.value)
                if family.name == ROUTE_RESPONSES and sample.labels.get("code") != "OK":
                    out[sample.labels["model"]][ROUTE_ERRORS] += float(sample.value)
    return {model: dict(values) for model, values in out.items()}


@dataclass(frozen=True)
class MemberStats:
    """One model's share of a run: counts, and milliseconds per request / rows per execution."""

    model: str
    requests: int  # succeeded as Triton counts them; the route's from its own counter (answered with outputs)
    failures: int  # Triton's failures, plus the route's error answers
    inferences: int
    executions: int
    request_ms: float  # end-to-end time inside the server per request
    queue_ms: float  # waiting for the dynamic batcher / an instance, per request
    compute_ms: float  # input + infer + output, per request (its batch's time)
    avg_batch: float  # rows per execution (inference count / execution count)

    def as_dict(self) -> dict:
        return asdict(self)


def diff(before: Counters, after: Counters, models: Sequence[str] | None = None) -> list[MemberStats]:
    """Per-model differences between two scrapes, in the order of `models` (else every model seen, sorted)."""
    names = list(models) if models is not None else sorted(after)
    stats = []
    for model in names:
        a, b = after.get(model, {}), before.get(model, {})

        def delta(metric: str, a=a, b=b) -> float:
            return max(0.0, a.get(metric, 0.0) - b.get(metric, 0.0))

        requests = delta(REQUEST_SUCCESS)  # every request Triton timed (the route's error answers included)
        # The route's error answers are in Triton's successes (server#7713): moved to the failures.
        errors = delta(ROUTE_ERRORS)
        executions = delta(EXEC_COUNT)
        request_ms = _per_request_ms(delta(REQUEST_US), requests)
        compute_ms = _per_request_ms(sum(delta(m) for m in COMPUTE_US), requests)
        batches_ms = delta(BATCH_COMPUTE_METRIC) / 1000.0
        if batches_ms and executions:
            # A member running concurrent batches: Triton's compute and request times stop at the hand-off to its
            # worker, so its own count of its batches' time gives a request's compute (its batch's mean time), and
            # the request's time in the server is Triton's (queue and hand-off) plus that.
            compute_ms = batches_ms / executions
            request_ms += compute_ms
        stats.append(MemberStats(
            model=model, requests=int(round(requests - errors)), failures=int(round(delta(REQUEST_FAILURE) + errors)),
            inferences=int(round(delta(INFERENCE_COUNT))), executions=int(round(executions)), request_ms=request_ms,
            queue_ms=_per_request_ms(delta(QUEUE_US), requests), compute_ms=compute_ms,
            avg_batch=delta(INFERENCE_COUNT) / executions if executions else 0.0))
    return stats


def _per_request_ms(total_us: float, requests: float) -> float:
    return total_us / requests / 1000.0 if requests else 0.0


def breakdown(before_text: str, after_text: str, models: Sequence[str] | None = None) -> list[MemberStats]:
    """Per-model stats of a run from the scrape texts taken before and after it."""
    return diff(parse_counters(before_text), parse_counters(after_text), models)


def settled_scrape(metrics_url: str, before: str, model: str, answered: int, timeout_s: float = 5.0) -> str:
    """A scrape that counts every request `model` answered since `before`: Triton counts an ensemble's request a
    moment after its response has left."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = scrape(metrics_url)
        (stats,) = breakdown(before, after, [model])
        if stats.requests >= answered or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


def format_table(stats: Sequence[MemberStats]) -> str:
    """Plain-text table of the per-member breakdown."""
    header = (f"{'model':<20} {'requests':>9} {'failures':>8} {'rows':>8} {'execs':>7} {'avg batch':>9} "
              f"{'queue ms':>9} {'compute ms':>10} {'total ms':>9}")
    lines = [header, "-" * len(header)]
    for s in stats:
        lines.append(f"{s.model:<20} {s.requests:>9} {s.failures:>8} {s.inferences:>8} {s.executions:>7} "
                     f"{s.avg_batch:>9.2f} {s.queue_ms:>9.1f} {s.compute_ms:>10.1f} {s.request_ms:>9.1f}")
    return "\n".join(lines)


# --- the route's embedding cache --------------------------------------------------------------------------------

CACHE_HITS = "fusionrank_cache_hits"
CACHE_MISSES = "fusionrank_cache_misses"
CACHE_EVICTIONS = "fusionrank_cache_evictions"
CACHE_STORE_ERRORS = "fusionrank_cache_store_errors"
CACHE_BYTES = "fusionrank_cache_bytes"
_CACHE_METRICS = (CACHE_HITS, CACHE_MISSES, CACHE_EVICTIONS, CACHE_STORE_ERRORS, CACHE_BYTES)


def parse_cache(text: str, model: str) -> dict[str, float]:
    """One route model's cache metrics in a scrape, summed over its instances and modalities (hits also per tier,
    as `fusionrank_cache_hits:<tier>`)."""
    out: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        if family.name not in _CACHE_METRICS:
            continue
        for sample in family.samples:
            if sample.name in (family.name, f"{family.name}_total") and sample.labels.get("model") == model:
                out[family.name] += float(sample.value)
                if family.name == CACHE_HITS:
                    out[f"{CACHE_HITS}:{sample.labels.get('tier', '?')}"] += float(sample.value)
    return dict(out)


@dataclass(frozen=True)
class CacheShare:
    """The route's embedding cache over a run: rows found per tier, rows encoded, evictions, store errors, and the
    bytes its instances held at the end."""

    model: str
    lru_hits: int
    redis_hits: int
    misses: int
    evictions: int
    store_errors: int
    bytes: float
    local_hits: int = 0  # the server-wide tier every route instance shares (`serving.cache.server_wide`)

    @property
    def hits(self) -> int:
        return self.lru_hits + self.local_hits + self.redis_hits

    @property
    def hit_ratio(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hits": self.hits, "hit_ratio": round(self.hit_ratio, 4)}

    def describe(self) -> str:
        return (f"embedding cache of {self.model}: hit ratio {100 * self.hit_ratio:.1f}% ({self.hits} rows found: "
                f"{self.lru_hits} in-process, {self.local_hits} server-wide, {self.redis_hits} shared; "
                f"{self.misses} encoded), {self.evictions} "
                f"evictions, {self.store_errors} store errors, {self.bytes / 2**20:.1f} MiB held")


def cache_share(before_text: str, after_text: str, model: str) -> CacheShare | None:
    """The cache's share of a run from the scrapes before and after it; None when the model reports no cache."""
    before, after = parse_cache(before_text, model), parse_cache(after_text, model)
    if not after:
        return None

    def delta(name: str) -> int:
        return int(round(max(0.0, after.get(name, 0.0) - before.get(name, 0.0))))

    return CacheShare(model, delta(f"{CACHE_HITS}:lru"), delta(f"{CACHE_HITS}:redis"), delta(CACHE_MISSES),
                      delta(CACHE_EVICTIONS), delta(CACHE_STORE_ERRORS), after.get(CACHE_BYTES, 0.0),
                      delta(f"{CACHE_HITS}:local"))
