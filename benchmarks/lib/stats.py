"""Statistics every measuring command shares: percentiles with confidence intervals, the minimum sample count a
gated percentile needs, and the comparison of two samples (significance test plus noise floor, as pyperf's
`compare_to` judges benchmarks).

Percentile confidence intervals are distribution-free (order statistics): the number of samples below the true
q-quantile is Binomial(n, q), so the ranks [l, u] with P(l <= B < u) >= confidence bound it. No assumption about
the latency distribution (which is skewed and often multi-modal) is made.

Minimum samples (`min_samples`): a percentile is supported when its two-sided confidence interval closes inside the
sample, i.e. the sample maximum is not needed as the upper bound: 1 - q**n >= 1 - alpha/2, so
n >= ln(alpha/2) / ln(q). At 95 % confidence that is 6 samples for p50, 72 for p95, 368 for p99 and 3688 for p99.9.
Below it the "p99" of a run is its maximum, and a gate on it would pass or fail on one request.

Comparison (`compare_samples`): repeated measurements of each side (e.g. the medians of interleaved windows or
runs) are compared with the Mann-Whitney U test (no normality assumption, robust to the long tail of a shared
machine). A change is significant only if the test rejects at `alpha` AND the relative change of the medians
exceeds the noise floor: a tiny but consistent shift is not called a regression, and neither is a large shift that
the repeats do not support.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fusionrank.contract.errors import FusionRankError

DEFAULT_CONFIDENCE = 0.95
DEFAULT_ALPHA = 0.05
# The relative change below which a difference is never called significant (pyperf's --min-speed, in fractions).
DEFAULT_NOISE_FLOOR = 0.05


class StatsError(FusionRankError):
    """A statistic was asked of data that cannot give it (no samples, a quantile outside (0, 1))."""


def _check_q(q: float) -> None:
    if not 0.0 < q < 1.0:
        raise StatsError(f"quantile {q!r} is outside (0, 1); pass e.g. 0.99 for p99")


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise StatsError(f"confidence {confidence!r} is outside (0, 1); pass e.g. 0.95")


def min_samples(q: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """Fewest samples whose `confidence` interval of the q-quantile closes inside the sample (see module doc)."""
    _check_q(q)
    _check_confidence(confidence)
    alpha = 1.0 - confidence
    return max(1, math.ceil(math.log(alpha / 2.0) / math.log(q)))


@dataclass(frozen=True)
class PercentileEstimate:
    """The q-quantile of a sample, its distribution-free confidence interval, the sample count and whether that
    count supports the percentile (`min_samples`). `low`/`high` are None where the interval leaves the sample."""

    q: float
    value: float
    low: float | None
    high: float | None
    samples: int
    needed: int
    confidence: float = DEFAULT_CONFIDENCE

    @property
    def supported(self) -> bool:
        return self.samples >= self.needed

    @property
    def label(self) -> str:
        """p50, p99, p99.9."""
        return f"p{100 * self.q:.10g}"

    def describe(self, unit: str = "ms") -> str:
        """E.g. `p99 41.2 ms [38.0, 47.9] (n=512)`, or `... (n=36, needs >= 368)`."""
        ci = f"[{_num(self.low)}, {_num(self.high)}]"
        count = f"n={self.samples}" if self.supported else f"n={self.samples}, needs >= {self.needed}"
        return f"{self.label} {_num(self.value)} {unit} {ci} ({count})"

    def as_dict(self) -> dict:
        return {**asdict(self), "supported": self.supported}


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def percentile(values: Sequence[float], q: float, confidence: float = DEFAULT_CONFIDENCE) -> PercentileEstimate:
    """The q-quantile (linear interpolation, as numpy) with its order-statistic confidence interval."""
    from scipy.stats import binom  # scipy is heavy; only the commands that measure import this module's users

    _check_q(q)
    _check_confidence(confidence)
    data = np.sort(np.asarray(values, dtype=np.float64))
    n = len(data)
    if n == 0:
        raise StatsError(f"no samples to take p{100 * q:g} of")
    alpha = 1.0 - confidence
    # ranks (1-based) l and u with P(B < l) <= alpha/2 and P(B >= u) <= alpha/2, B ~ Binomial(n, q)
    lower_rank = int(binom.ppf(alpha / 2.0, n, q))
    upper_rank = int(binom.ppf(1.0 - alpha / 2.0, n, q)) + 1
    value = float(np.percentile(data, 100 * q))
    # In tiny samples the interpolated estimate can fall just outside the order-statistic bounds (n=2, p99: the
    # estimate lies between the two values, the lower bound is the larger one): widen the interval to hold it.
    low = min(float(data[lower_rank - 1]), value) if lower_rank >= 1 else None
    high = max(float(data[upper_rank - 1]), value) if upper_rank <= n else None
    return PercentileEstimate(q, value, low, high, n, min_samples(q, confidence), confidence)


def percentiles(values: Sequence[float], qs: Sequence[float] = (0.5, 0.95, 0.99),
                confidence: float = DEFAULT_CONFIDENCE) -> dict[str, PercentileEstimate]:
    """Several percentiles by label (`p50`, `p95`, `p99`)."""
    estimates = [percentile(values, q, confidence) for q in qs]
    return {e.label: e for e in estimates}


@dataclass(frozen=True)
class SampleComparison:
    """Current against baseline: medians, relative change, the test's p-value and the verdict."""

    baseline_median: float
    current_median: float
    change: float  # (current - baseline) / baseline of the medians
    p_value: float
    baseline_n: int
    current_n: int
    alpha: float
    noise_floor: float
    test: str = "Mann-Whitney U, two-sided"

    @property
    def significant(self) -> bool:
        """The test rejects at `alpha` and the change exceeds the noise floor (pyperf's min-speed)."""
        return self.p_value < self.alpha and abs(self.change) > self.noise_floor

    @property
    def worse(self) -> bool:
        """A significant increase (for latencies: slower)."""
        return self.significant and self.change > 0

    def describe(self) -> str:
        verdict = ("significant" if self.significant else "not significant")
        return (f"{self.baseline_median:.4g} -> {self.current_median:.4g} ({self.change:+.1%}, p={self.p_value:.3g}, "
                f"n={self.baseline_n}/{self.current_n}, {verdict} at alpha {self.alpha:g}, "
                f"noise floor {self.noise_floor:.0%})")

    def as_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant, "worse": self.worse}


def compare_samples(baseline: Sequence[float], current: Sequence[float], alpha: float = DEFAULT_ALPHA,
                    noise_floor: float = DEFAULT_NOISE_FLOOR) -> SampleComparison:
    """Whether `current` differs from `baseline` beyond noise: Mann-Whitney U at `alpha` and a relative change of
    the medians beyond `noise_floor` (both needed). Each sample is a set of repeated measurements."""
    from scipy.stats import mannwhitneyu

    base = np.asarray(baseline, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if len(base) == 0 or len(cur) == 0:
        raise StatsError(f"comparison needs samples on both sides (baseline {len(base)}, current {len(cur)})")
    if not 0.0 < alpha < 1.0:
        raise StatsError(f"alpha {alpha!r} is outside (0, 1)")
    if noise_floor < 0:
        raise StatsError(f"noise floor {noise_floor!r} is negative")
    b_med, c_med = float(np.median(base)), float(np.median(cur))
    change = (c_med - b_med) / b_med if b_med else (math.inf if c_med > b_med else 0.0)
    if np.array_equal(np.unique(base), np.unique(cur)) and len(np.unique(base)) == 1:
        p_value = 1.0  # identical constants: scipy's U test is undefined there
    else:
        p_value = float(mannwhitneyu(base, cur, alternative="two-sided").pvalue)
    return SampleComparison(b_med, c_med, change, p_value, len(base), len(cur), alpha, noise_floor)


def min_repeats(alpha: float = DEFAULT_ALPHA) -> int:
    """Fewest repeats per side for which the two-sided Mann-Whitney U test can reject at `alpha` at all (complete
    separation gives p = 2 / C(2n, n)): 4 at 0.05."""
    n = 1
    while 2.0 / math.comb(2 * n, n) >= alpha:
        n += 1
    return n
