"""The measurement core every benchmark and gate uses: one load driver (closed and open loop, stability windows),
one statistics module (percentiles with confidence intervals, minimum samples, significance with a noise floor),
the provenance recorded with every figure (machine and software) and the request sets load is made of (never-seen
requests renewed with a nonce, floods of large PNGs)."""

from benchmarks.lib.driver import (
    CALLER_TIMEOUT_S,
    DriverError,
    LoadResult,
    LoopMode,
    PoissonPacer,
    Sample,
    Stability,
    StableRun,
    Window,
    closed_loop,
    open_loop,
    poisson_arrivals,
    until_stable,
    within,
    workers_for,
)
from benchmarks.lib.machine import describe_machine, file_digest, load_average, machine_facts, model_digests, provenance
from benchmarks.lib.request_sets import RequestSets, big_png
from benchmarks.lib.stats import (
    DEFAULT_ALPHA,
    DEFAULT_CONFIDENCE,
    DEFAULT_NOISE_FLOOR,
    PercentileEstimate,
    SampleComparison,
    StatsError,
    compare_samples,
    min_repeats,
    min_samples,
    percentile,
    percentiles,
)

__all__ = [
    "CALLER_TIMEOUT_S", "DEFAULT_ALPHA", "DEFAULT_CONFIDENCE", "DEFAULT_NOISE_FLOOR", "DriverError", "LoadResult",
    "LoopMode", "PercentileEstimate", "PoissonPacer", "RequestSets", "Sample", "SampleComparison", "Stability",
    "StableRun", "StatsError", "Window", "big_png", "closed_loop", "compare_samples", "describe_machine", "file_digest",
    "load_average", "machine_facts", "min_repeats", "min_samples", "model_digests", "open_loop", "percentile",
    "percentiles", "poisson_arrivals", "provenance", "until_stable", "within",
    "workers_for",
]
