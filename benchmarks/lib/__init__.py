"""The measurement core every benchmark and gate uses: one load driver (closed and open loop, stability windows),
one statistics module (percentiles with confidence intervals, minimum samples, significance with a noise floor)
and the provenance recorded with every figure (machine and software)."""

from benchmarks.lib.driver import (
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
)
from benchmarks.lib.machine import describe_machine, file_digest, load_average, machine_facts, model_digests, provenance
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
    "DEFAULT_ALPHA", "DEFAULT_CONFIDENCE", "DEFAULT_NOISE_FLOOR", "DriverError", "LoadResult", "LoopMode",
    "PercentileEstimate", "PoissonPacer", "Sample", "SampleComparison", "Stability", "StableRun", "StatsError",
    "Window", "closed_loop", "compare_samples", "describe_machine", "file_digest", "load_average", "machine_facts",
    "min_repeats", "min_samples", "model_digests", "open_loop", "percentile", "percentiles", "poisson_arrivals",
    "provenance", "until_stable", "within",
]
