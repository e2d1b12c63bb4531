"""The model, data and operations sections: ranker, data, train, export, serving, slo, upgrade."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from fusionrank.contract.names import ENCODERS_AND_RANKER, ENSEMBLE, MEMBERS, ROUTE
from fusionrank.contract.spec.admission import AdmissionSpec
from fusionrank.contract.spec.base import (
    CalibrationMethod,
    FusionType,
    HardwareCompatibility,
    Precision,
    RecurrentCell,
    check_positive,
    check_sorted_unique,
    fail,
)

# --- ranker, data, training -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HistorySpec:
    length: int = 20
    vocab_size: int = 801
    embedding_dim: int = 64
    cell: RecurrentCell = RecurrentCell.LSTM
    hidden_size: int = 128

    def __post_init__(self):
        for name in ("length", "embedding_dim", "hidden_size"):
            check_positive(f"ranker.history.{name}", getattr(self, name))
        if self.vocab_size < 2:
            fail("ranker.history.vocab_size", self.vocab_size, "an integer >= 2 (id 0 is padding)")


@dataclass(frozen=True)
class RankerSpec:
    fusion: FusionType = FusionType.CONCAT
    hidden_sizes: tuple[int, ...] = (512, 256)
    projection_dim: int = 128
    dropout: float = 0.1
    history: HistorySpec = field(default_factory=HistorySpec)

    def __post_init__(self):
        if not self.hidden_sizes or any(h <= 0 for h in self.hidden_sizes):
            fail("ranker.hidden_sizes", list(self.hidden_sizes), "a non-empty list of positive integers")
        check_positive("ranker.projection_dim", self.projection_dim)
        if not 0 <= self.dropout < 1:
            fail("ranker.dropout", self.dropout, "a number in [0, 1)")


@dataclass(frozen=True)
class DataSpec:
    seed: int = 0
    num_users: int = 600
    sessions_per_user: int = 6
    candidates_per_session: int = 10
    title_words: tuple[int, ...] = (4, 12)
    cache_dir: str = ".cache/fusionrank"

    def __post_init__(self):
        for name in ("num_users", "sessions_per_user", "candidates_per_session"):
            check_positive(f"data.{name}", getattr(self, name))
        if len(self.title_words) != 2 or not 1 <= self.title_words[0] <= self.title_words[1]:
            fail("data.title_words", list(self.title_words), "[min, max] with 1 <= min <= max")


@dataclass(frozen=True)
class TrainSpec:
    seed: int = 0
    epochs: int = 8
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    validation_fraction: float = 0.2
    # Per training row, each modality is marked absent with this probability (a row keeps at least one), so the
    # ranker learns to score candidates with missing modalities; 0 trains on complete candidates only.
    modality_dropout: float = 0.3

    def __post_init__(self):
        for name in ("epochs", "batch_size", "learning_rate"):
            check_positive(f"train.{name}", getattr(self, name))
        if not 0 < self.validation_fraction < 1:
            fail("train.validation_fraction", self.validation_fraction, "a number in (0, 1)")
        if not 0 <= self.modality_dropout < 1:
            fail("train.modality_dropout", self.modality_dropout, "a number in [0, 1)")


# --- export -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-3

    def __post_init__(self):
        if self.atol < 0 or self.rtol < 0:
            fail("tolerance", dataclasses.asdict(self), "atol >= 0 and rtol >= 0")

    def describe(self) -> str:
        return f"atol={self.atol:g} + rtol={self.rtol:g}*|reference|"


@dataclass(frozen=True)
class RankingParitySpec:
    min_top10_overlap: float = 0.9
    min_kendall_tau: float = 0.98
    max_auc_diff: float = 0.005

    def __post_init__(self):
        for name in ("min_top10_overlap", "min_kendall_tau"):
            if not 0 <= getattr(self, name) <= 1:
                fail(f"export.ranking.{name}", getattr(self, name), "a number in [0, 1]")
        if self.max_auc_diff < 0:
            fail("export.ranking.max_auc_diff", self.max_auc_diff, "a number >= 0")


@dataclass(frozen=True)
class TensorRTSpec:
    precision: Precision = Precision.FP16
    workspace_mib: int = 2048
    builder_optimization_level: int = 3
    profile_per_bucket: bool = False
    # none | same_compute_capability (one plan for H100 and H200, both 9.0) | ampere_plus (export/preflight.py)
    hardware_compatibility: HardwareCompatibility = HardwareCompatibility.NONE
    version_compatible: bool = False
    calibration_samples: int = 256
    tolerances: dict[str, Tolerance] = field(default_factory=dict)

    def __post_init__(self):
        check_positive("export.tensorrt.workspace_mib", self.workspace_mib)
        if not 0 <= self.builder_optimization_level <= 5:
            fail("export.tensorrt.builder_optimization_level", self.builder_optimization_level, "an integer in [0, 5]")


# --- export.cpu: the CPU profile's optimised and INT8 graphs (issue 13) ------------------------------------------

FP32_FILE = "model.onnx"
OPTIMIZED_FILE = "model.opt.onnx"
INT8_FILE = "model.int8.onnx"
CPU_PRECISIONS = (Precision.FP32, Precision.INT8)


@dataclass(frozen=True)
class CpuExportSpec:
    """Which graph the CPU serving profile loads per model, and the gates a quantized chain must pass.

    `fusionrank export` writes, beside the FP32 `model.onnx` (the GPU profiles and TensorRT build from it), an ONNX
    Runtime-optimised FP32 graph (`model.opt.onnx`, when `optimize`) and, for models whose precision is int8, a
    quantized one (`model.int8.onnx`); the CPU profile's config names the file (`onnx_file`)."""

    optimize: bool = True
    precision: dict[str, Precision] = field(default_factory=dict)
    calibration_samples: int = 128
    calibration_method: CalibrationMethod = CalibrationMethod.MINMAX
    reduce_range: bool = True
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    ranking: RankingParitySpec = field(default_factory=lambda: RankingParitySpec(0.95, 0.95, 0.003))
    max_test_auc_drop: float = 0.003
    # Largest change of a served graph's output row between the row alone and the row among other rows (issue 19).
    batch_invariance_atol: float = 1e-6
    # Per model, regular expressions of node names static quantization leaves in FP32 (re.search on the name).
    fp32_nodes: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self):
        if not self.batch_invariance_atol >= 0:
            fail("export.cpu.batch_invariance_atol", self.batch_invariance_atol, "a number >= 0")
        for model, patterns in self.fp32_nodes.items():
            if model not in ENCODERS_AND_RANKER:
                fail(f"export.cpu.fp32_nodes.{model}", patterns, "a key among " + ", ".join(ENCODERS_AND_RANKER))
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as exc:
                    fail(f"export.cpu.fp32_nodes.{model}", pattern, f"a regular expression ({exc})")
        for model, precision in self.precision.items():
            if model not in ENCODERS_AND_RANKER:
                fail(f"export.cpu.precision.{model}", precision.value, "a key among " + ", ".join(ENCODERS_AND_RANKER))
            if precision not in CPU_PRECISIONS:
                fail(f"export.cpu.precision.{model}", precision.value,
                     " or ".join(repr(p.value) for p in CPU_PRECISIONS) + " (fp16 is the TensorRT profile's)")
        check_positive("export.cpu.calibration_samples", self.calibration_samples)
        if self.max_test_auc_drop < 0:
            fail("export.cpu.max_test_auc_drop", self.max_test_auc_drop, "a number >= 0")

    def precision_of(self, model: str) -> Precision:
        """The precision the CPU profile serves `model` at (fp32 where the spec names none)."""
        return self.precision.get(model, Precision.FP32)

    def quantized(self) -> tuple[str, ...]:
        """Models served as INT8, in pipeline order."""
        return tuple(m for m in ENCODERS_AND_RANKER if self.precision_of(m) is Precision.INT8)

    def onnx_file(self, model: str) -> str:
        """The file the CPU profile loads for `model`, inside its version folder."""
        if self.precision_of(model) is Precision.INT8:
            return INT8_FILE
        return OPTIMIZED_FILE if self.optimize else FP32_FILE


@dataclass(frozen=True)
class ExportSpec:
    opset: int = 18
    parity_samples: int = 64
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    ranking: RankingParitySpec = field(default_factory=RankingParitySpec)
    tensorrt: TensorRTSpec = field(default_factory=TensorRTSpec)
    cpu: CpuExportSpec = field(default_factory=CpuExportSpec)

    def __post_init__(self):
        if not 13 <= self.opset <= 23:
            fail("export.opset", self.opset, "an integer in [13, 23]")
        check_positive("export.parity_samples", self.parity_samples)

    def tolerance(self, output: str) -> Tolerance:
        """Tolerance for one output tensor name; outputs the spec does not list get the default."""
        return self.tolerances.get(output, Tolerance())


# --- serving and SLOs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchingSpec:
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = (16, 32)
    max_queue_delay_us: int = 2000
    instances: int = 1
    # ONNX Runtime's intra-op threads per instance of a CPU-profile graph (0: one per core, ONNX Runtime's default);
    # read only for the ONNX Runtime members. Inter-op threads are not offered: the sessions run sequentially.
    intra_op_threads: int = 1
    # Batches one instance of an ONNX Runtime member runs at once, on threads sharing its one session (1: one at a
    # time, as Triton runs an instance). A second instance is a second process holding its own runtime and graph
    # (~100-200 MiB); a second concurrent batch costs only that batch's tensors. Read only for the CPU profile.
    concurrent_batches: int = 1
    # ONNX Runtime's CPU memory arena for the session of a CPU-profile graph. On, the arena keeps the largest batch's
    # tensors for the process's life (more resident memory); off, each batch's large tensors are fresh pages that
    # fault in again (more CPU for graphs with many large activations). Read only for the ONNX Runtime members.
    memory_arena: bool = False

    def __post_init__(self):
        check_positive("serving.models.*.max_batch_size", self.max_batch_size)
        check_positive("serving.models.*.concurrent_batches", self.concurrent_batches)
        check_sorted_unique("serving.models.*.preferred_batch_sizes", self.preferred_batch_sizes)
        if self.preferred_batch_sizes[-1] > self.max_batch_size:
            fail("serving.models.*.preferred_batch_sizes", list(self.preferred_batch_sizes),
                  f"sizes <= max_batch_size ({self.max_batch_size})")
        if self.max_queue_delay_us < 0:
            fail("serving.models.*.max_queue_delay_us", self.max_queue_delay_us, "an integer >= 0")
        check_positive("serving.models.*.instances", self.instances)
        if self.intra_op_threads < 0:
            fail("serving.models.*.intra_op_threads", self.intra_op_threads, "an integer >= 0 (0: one per core)")


@dataclass(frozen=True)
class GpuBatchingSpec:
    """One model's batching in the gpu profile (`serving.gpu.<model>`), where it differs from `serving.models`.

    The TensorRT members run a batch in well under a millisecond and a ranking request already carries its
    candidates as one batch, so waiting for batch-mates costs more latency than it saves GPU time: the delay is
    short (0 to 500 us) and no preferred size holds a batch back. `batch_profiles` are the engine's optimisation
    profiles over the batch axis, (min, opt, max) each, contiguous from 1, the last fitted to the model's
    max_batch_size (the one source of the largest batch; `fitted_profiles`): opt is the
    batch TensorRT tunes its kernels for (a typical request's candidates, not the max); a second, large profile
    keeps large batches fast. Every profile is bound to every instance (`instance_group.profile`). `cuda_graphs`
    captures each fixed-shape profile's opt batch as a CUDA graph (`optimization.cuda.graph_spec`), so a batch up
    to opt replays one graph instead of launching its kernels one by one."""

    max_queue_delay_us: int = 100
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int | None = None  # None: serving.models' count
    batch_profiles: tuple[tuple[int, int, int], ...] = ()  # empty: one profile (1, largest preferred, max)
    cuda_graphs: bool = False

    def __post_init__(self):
        if not 0 <= self.max_queue_delay_us <= 500:
            fail("serving.gpu.*.max_queue_delay_us", self.max_queue_delay_us,
                 "0 to 500 (a GPU member runs a batch in under a millisecond: a longer wait is a latency floor)")
        if self.preferred_batch_sizes:
            check_sorted_unique("serving.gpu.*.preferred_batch_sizes", self.preferred_batch_sizes)
        if self.instances is not None:
            check_positive("serving.gpu.*.instances", self.instances)
        low = 1
        for profile in self.batch_profiles:
            if len(profile) != 3 or not profile[0] <= profile[1] <= profile[2] or profile[0] != low:
                fail("serving.gpu.*.batch_profiles", [list(p) for p in self.batch_profiles],
                     "[min, opt, max] triples with min <= opt <= max, the first from 1, each next one from the "
                     "previous max + 1")
            low = profile[2] + 1

    def check_against(self, model: str, max_batch_size: int) -> None:
        """The preferred sizes fit in the model's max_batch_size (the profiles are fitted to it: `fitted_profiles`)."""
        if self.preferred_batch_sizes and self.preferred_batch_sizes[-1] > max_batch_size:
            fail(f"serving.gpu.{model}.preferred_batch_sizes", list(self.preferred_batch_sizes),
                 f"sizes <= max_batch_size ({max_batch_size})")

    def fitted_profiles(self, max_batch_size: int) -> tuple[tuple[int, int, int], ...]:
        """`batch_profiles` fitted to a max_batch_size (the one source of the largest batch): profiles starting above
        it are dropped, the last one kept ends at it (extended or cut), opt capped by it."""
        kept = [p for p in self.batch_profiles if p[0] <= max_batch_size]
        if not kept:
            return ()
        *head, (low, opt, _) = kept
        return (*head, (low, min(opt, max_batch_size), max_batch_size))


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class CacheSpec:
    """The route's item-embedding cache (`fusionrank.route.cache`, docs/cache.md): an in-process LRU per route
    instance and an optional shared tier on Redis, keyed by payload bytes and the encoder's identity."""

    lru_bytes: int = 64 * 2**20  # per route instance (keys and embeddings); 0 = no in-process tier
    redis_url: str | None = None  # shared tier, e.g. redis://cache:6379/0; null = none
    redis_timeout_ms: int = 25  # per store round trip (connect, read, write); slower counts as a store error
    redis_retry_s: float = 5.0  # after a store error the shared tier is skipped this long (the route encodes)
    redis_ttl_s: int = 7 * 86400  # expiry of stored embeddings; 0 = none
    # One tier for all the route instances of a server (a redis-server on a Unix socket that `fusionrank serve` and
    # the image's entrypoint start, bounded by lru_bytes), so instances cannot diverge; false: each instance keeps its
    # own in-process LRU.
    server_wide: bool = True

    def __post_init__(self):
        if self.lru_bytes < 0:
            fail("serving.cache.lru_bytes", self.lru_bytes, "an integer >= 0 (0: no in-process tier)")
        if self.redis_url is not None and not self.redis_url.startswith(_REDIS_SCHEMES):
            fail("serving.cache.redis_url", self.redis_url, "null or a URL starting with " + ", ".join(_REDIS_SCHEMES))
        check_positive("serving.cache.redis_timeout_ms", self.redis_timeout_ms)
        if self.redis_retry_s < 0:
            fail("serving.cache.redis_retry_s", self.redis_retry_s, "a number >= 0")
        if self.redis_ttl_s < 0:
            fail("serving.cache.redis_ttl_s", self.redis_ttl_s, "an integer >= 0 (0: no expiry)")

    @property
    def enabled(self) -> bool:
        return self.lru_bytes > 0 or self.redis_url is not None

    @property
    def server_tier_bytes(self) -> int:
        """The bound of the server-wide tier a server starts beside Triton; 0: none (each route instance keeps its
        in-process LRU)."""
        return self.lru_bytes if self.server_wide else 0


_MODEL_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class ServingSpec:
    """How the pipeline is served. `route` is the one model callers use (the BLS route,
    `fusionrank.route.stages`); `reference_ensemble` is the plain Triton ensemble of the same members, loaded only
    on request (`fusionrank serve --with-reference-ensemble`) because Triton 2.51 crashes when callers cancel
    requests to an ensemble."""

    route: str = ROUTE
    reference_ensemble: str = ENSEMBLE
    max_candidates: int = 64
    models: dict[str, BatchingSpec] = field(default_factory=dict)
    # The gpu profile's batching where it differs from `models` (GpuBatchingSpec says why it is short).
    gpu: dict[str, GpuBatchingSpec] = field(default_factory=dict)
    response_cache: bool = False
    cache: CacheSpec = field(default_factory=CacheSpec)
    admission: AdmissionSpec = field(default_factory=AdmissionSpec)

    def __post_init__(self):
        check_positive("serving.max_candidates", self.max_candidates)
        for name in ("route", "reference_ensemble"):
            value = getattr(self, name)
            if not _MODEL_NAME.fullmatch(value) or value in MEMBERS:
                fail(f"serving.{name}", value, "a lower_snake model name that no member model uses "
                                               f"({', '.join(MEMBERS)})")
        if self.route == self.reference_ensemble:
            fail("serving.reference_ensemble", self.reference_ensemble, f"a name other than the route's ({self.route})")
        for model, gpu in self.gpu.items():
            if model not in (*MEMBERS, self.route):
                fail("serving.gpu", model, f"a member model or the route ({', '.join((*MEMBERS, self.route))})")
            gpu.check_against(model, self.batching(model).max_batch_size)

    def batching(self, model: str) -> BatchingSpec:
        """Dynamic-batching settings of one member model (the defaults where the spec names none)."""
        return self.models.get(model, BatchingSpec(max_batch_size=self.max_candidates,
                                                   preferred_batch_sizes=_halves(self.max_candidates)))


    def gpu_batching(self, model: str) -> GpuBatchingSpec | None:
        """The gpu profile's batching of one model (None: it batches as in `models`)."""
        return self.gpu.get(model)

    def batch_profiles(self, model: str) -> tuple[tuple[int, int, int], ...]:
        """(min, opt, max) batch of each TensorRT optimisation profile of `model`, smallest first, covering 1 ..
        max_batch_size (`serving.gpu.<model>.batch_profiles` fitted to it; without one, a single profile with opt
        the largest preferred batch size)."""
        batching = self.batching(model)
        gpu = self.gpu.get(model)
        fitted = gpu.fitted_profiles(batching.max_batch_size) if gpu is not None else ()
        return fitted or ((1, batching.preferred_batch_sizes[-1], batching.max_batch_size),)


def _halves(n: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, n // 2), n}))


SLO_FIELDS = ("p50_ms", "p95_ms", "p99_ms", "max_error_rate", "min_throughput_rps")


@dataclass(frozen=True)
class SloTargets:
    """SLO fields of which any may be None (not set). As a spec section: one scenario's override of the release
    gate; the load test's gate (`loadtest.slo.Slo`) extends it with where its values came from."""

    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_error_rate: float | None = None
    min_throughput_rps: float | None = None

    def __post_init__(self):
        problem = self.problem()
        if problem:
            fail(f"slo.scenarios.*.{problem[0]}", problem[1], problem[2])

    def problem(self) -> tuple[str, float, str] | None:
        """The first field with a bad value as (field, value, allowed), or None when all are fine."""
        for name in ("p50_ms", "p95_ms", "p99_ms", "min_throughput_rps"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                return name, value, "a number > 0 (or null: not set)"
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            return "max_error_rate", self.max_error_rate, "a number in [0, 1]"
        return None

    def targets(self) -> dict[str, float]:
        """The fields that are set."""
        return {k: getattr(self, k) for k in SLO_FIELDS if getattr(self, k) is not None}


@dataclass(frozen=True)
class SloSpec:
    """The release gate of the default load-test scenario, with per-scenario overrides (the one source of SLOs)."""

    p50_ms: float = 500.0
    p95_ms: float = 1500.0
    p99_ms: float = 2500.0
    max_error_rate: float = 0.01
    min_throughput_rps: float = 1.0
    scenarios: dict[str, SloTargets] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("p50_ms", "p95_ms", "p99_ms"):
            check_positive(f"slo.{name}", getattr(self, name))
        if not self.p50_ms <= self.p95_ms <= self.p99_ms:
            fail("slo.p95_ms", self.p95_ms, "p50_ms <= p95_ms <= p99_ms")
        if not 0 <= self.max_error_rate <= 1:
            fail("slo.max_error_rate", self.max_error_rate, "a number in [0, 1]")


@dataclass(frozen=True)
class UpgradeSpec:
    max_latency_regression: float = 0.20
    max_throughput_regression: float = 0.20
    max_accuracy_delta: float = 1e-3

    def __post_init__(self):
        for name in ("max_latency_regression", "max_throughput_regression", "max_accuracy_delta"):
            if getattr(self, name) < 0:
                fail(f"upgrade.{name}", getattr(self, name), "a number >= 0")
