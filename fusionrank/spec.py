"""The pipeline spec: `pipeline.yaml` read in exactly one place into frozen, self-validating objects.

Everything downstream (ONNX axes, tokenizer buckets, Triton configs, TensorRT profiles, load-test SLOs) is derived
from a `PipelineSpec`, so no two parts of the project can disagree about a shape or a name.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fusionrank.errors import SpecError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC_PATH = REPO_ROOT / "pipeline.yaml"
DEFAULT_TEXT_CHECKPOINT = "builtin:all-MiniLM-L6-v2"


class Modality(str, enum.Enum):
    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"


class Pooling(str, enum.Enum):
    CLS = "cls"
    MEAN = "mean"


class FusionType(str, enum.Enum):
    CONCAT = "concat"
    WEIGHTED = "weighted"
    ATTENTION = "attention"
    GATED = "gated"
    LATE = "late"
    TWO_TOWER = "two_tower"


class RecurrentCell(str, enum.Enum):
    LSTM = "lstm"
    GRU = "gru"


class ResNetArch(str, enum.Enum):
    RESNET_18 = "resnet-18"
    RESNET_34 = "resnet-34"
    RESNET_50 = "resnet-50"


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


def _fail(field_name: str, value: object, allowed: str) -> typing.NoReturn:
    raise SpecError(field_name, value, allowed)


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        _fail(name, value, "a number > 0")


def _check_sorted_unique(name: str, values: tuple[int, ...]) -> None:
    if not values or list(values) != sorted(set(values)) or values[0] <= 0:
        _fail(name, list(values), "a non-empty, strictly increasing list of positive integers")


# --- modalities -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderSpec:
    checkpoint: str = DEFAULT_TEXT_CHECKPOINT
    pooling: Pooling = Pooling.MEAN
    normalize: bool = True
    output_dim: int = 384

    def __post_init__(self):
        _check_positive("modalities.text.encoder.output_dim", self.output_dim)


@dataclass(frozen=True)
class TextSpec:
    encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    enabled: bool = True
    max_length: int = 64
    buckets: tuple[int, ...] = (16, 32, 64)
    max_chars: int = 2000

    def __post_init__(self):
        _check_sorted_unique("modalities.text.buckets", self.buckets)
        if self.buckets[-1] != self.max_length:
            _fail("modalities.text.buckets", list(self.buckets),
                  f"a list whose last bucket equals max_length ({self.max_length})")
        _check_positive("modalities.text.max_chars", self.max_chars)

    def bucket_for(self, length: int) -> int:
        """Smallest padding bucket that holds `length` tokens (longer inputs are truncated to max_length)."""
        return next((b for b in self.buckets if length <= b), self.buckets[-1])


@dataclass(frozen=True)
class ImageEncoderSpec:
    architecture: ResNetArch = ResNetArch.RESNET_18
    checkpoint: str | None = None
    seed: int = 0
    output_dim: int = 512

    def __post_init__(self):
        _check_positive("modalities.image.encoder.output_dim", self.output_dim)


@dataclass(frozen=True)
class ImageSpec:
    encoder: ImageEncoderSpec = field(default_factory=ImageEncoderSpec)
    enabled: bool = True
    size: int = 112
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    max_pixels: int = 16_000_000
    max_bytes: int = 10_000_000
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")

    def __post_init__(self):
        if not 32 <= self.size <= 1024:
            _fail("modalities.image.size", self.size, "an integer in [32, 1024]")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3:
                _fail(f"modalities.image.{name}", list(values), "exactly 3 numbers (R, G, B)")
        if any(s <= 0 for s in self.std):
            _fail("modalities.image.std", list(self.std), "3 numbers > 0")
        _check_positive("modalities.image.max_pixels", self.max_pixels)
        _check_positive("modalities.image.max_bytes", self.max_bytes)
        allowed = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"}
        if not self.formats or not set(self.formats) <= allowed:
            _fail("modalities.image.formats", list(self.formats), f"a non-empty subset of {sorted(allowed)}")


@dataclass(frozen=True)
class AudioEncoderSpec:
    checkpoint: str | None = None
    seed: int = 0
    channels: tuple[int, ...] = (16, 32, 64)
    output_dim: int = 128

    def __post_init__(self):
        if not self.channels or any(c <= 0 for c in self.channels):
            _fail("modalities.audio.encoder.channels", list(self.channels), "a non-empty list of positive integers")
        _check_positive("modalities.audio.encoder.output_dim", self.output_dim)


@dataclass(frozen=True)
class AudioSpec:
    encoder: AudioEncoderSpec = field(default_factory=AudioEncoderSpec)
    enabled: bool = True
    sample_rate: int = 16000
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float = 8000.0
    n_fft: int = 512
    hop_length: int = 160
    clip_seconds: float = 1.0
    max_seconds: float = 30.0

    def __post_init__(self):
        _check_positive("modalities.audio.sample_rate", self.sample_rate)
        _check_positive("modalities.audio.n_mels", self.n_mels)
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            _fail("modalities.audio.fmax", self.fmax, f"fmin < fmax <= sample_rate/2 ({self.sample_rate / 2:g})")
        if self.n_fft <= 0 or self.n_fft & (self.n_fft - 1):
            _fail("modalities.audio.n_fft", self.n_fft, "a positive power of two")
        if not 0 < self.hop_length <= self.n_fft:
            _fail("modalities.audio.hop_length", self.hop_length, f"an integer in (0, n_fft={self.n_fft}]")
        _check_positive("modalities.audio.clip_seconds", self.clip_seconds)
        if self.max_seconds < self.clip_seconds:
            _fail("modalities.audio.max_seconds", self.max_seconds, f"a number >= clip_seconds ({self.clip_seconds})")

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def num_frames(self) -> int:
        """Frames of the centred STFT over one clip: the time axis of the log-mel input."""
        return 1 + self.clip_samples // self.hop_length


@dataclass(frozen=True)
class ModalitiesSpec:
    text: TextSpec = field(default_factory=TextSpec)
    image: ImageSpec = field(default_factory=ImageSpec)
    audio: AudioSpec = field(default_factory=AudioSpec)

    def __post_init__(self):
        if not self.enabled:
            _fail("modalities", "all disabled", "at least one enabled modality")

    @property
    def enabled(self) -> tuple[Modality, ...]:
        """Enabled modalities in the fixed order text, image, audio (the order of every fused tensor)."""
        return tuple(m for m in Modality if getattr(self, m.value).enabled)

    def embedding_dim(self, modality: Modality) -> int:
        return getattr(self, modality.value).encoder.output_dim


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
            _check_positive(f"ranker.history.{name}", getattr(self, name))
        if self.vocab_size < 2:
            _fail("ranker.history.vocab_size", self.vocab_size, "an integer >= 2 (id 0 is padding)")


@dataclass(frozen=True)
class RankerSpec:
    fusion: FusionType = FusionType.CONCAT
    hidden_sizes: tuple[int, ...] = (512, 256)
    projection_dim: int = 128
    dropout: float = 0.1
    history: HistorySpec = field(default_factory=HistorySpec)

    def __post_init__(self):
        if not self.hidden_sizes or any(h <= 0 for h in self.hidden_sizes):
            _fail("ranker.hidden_sizes", list(self.hidden_sizes), "a non-empty list of positive integers")
        _check_positive("ranker.projection_dim", self.projection_dim)
        if not 0 <= self.dropout < 1:
            _fail("ranker.dropout", self.dropout, "a number in [0, 1)")


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
            _check_positive(f"data.{name}", getattr(self, name))
        if len(self.title_words) != 2 or not 1 <= self.title_words[0] <= self.title_words[1]:
            _fail("data.title_words", list(self.title_words), "[min, max] with 1 <= min <= max")


@dataclass(frozen=True)
class TrainSpec:
    seed: int = 0
    epochs: int = 8
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    validation_fraction: float = 0.2

    def __post_init__(self):
        for name in ("epochs", "batch_size", "learning_rate"):
            _check_positive(f"train.{name}", getattr(self, name))
        if not 0 < self.validation_fraction < 1:
            _fail("train.validation_fraction", self.validation_fraction, "a number in (0, 1)")


# --- export -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-3

    def __post_init__(self):
        if self.atol < 0 or self.rtol < 0:
            _fail("tolerance", dataclasses.asdict(self), "atol >= 0 and rtol >= 0")

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
                _fail(f"export.ranking.{name}", getattr(self, name), "a number in [0, 1]")
        if self.max_auc_diff < 0:
            _fail("export.ranking.max_auc_diff", self.max_auc_diff, "a number >= 0")


@dataclass(frozen=True)
class TensorRTSpec:
    precision: Precision = Precision.FP16
    workspace_mib: int = 2048
    builder_optimization_level: int = 3
    profile_per_bucket: bool = False
    hardware_compatible: bool = False
    version_compatible: bool = False
    calibration_samples: int = 256
    tolerances: dict[str, Tolerance] = field(default_factory=dict)

    def __post_init__(self):
        _check_positive("export.tensorrt.workspace_mib", self.workspace_mib)
        if not 0 <= self.builder_optimization_level <= 5:
            _fail("export.tensorrt.builder_optimization_level", self.builder_optimization_level, "an integer in [0, 5]")


@dataclass(frozen=True)
class ExportSpec:
    opset: int = 18
    parity_samples: int = 64
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    ranking: RankingParitySpec = field(default_factory=RankingParitySpec)
    tensorrt: TensorRTSpec = field(default_factory=TensorRTSpec)

    def __post_init__(self):
        if not 13 <= self.opset <= 23:
            _fail("export.opset", self.opset, "an integer in [13, 23]")
        _check_positive("export.parity_samples", self.parity_samples)

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

    def __post_init__(self):
        _check_positive("serving.models.*.max_batch_size", self.max_batch_size)
        _check_sorted_unique("serving.models.*.preferred_batch_sizes", self.preferred_batch_sizes)
        if self.preferred_batch_sizes[-1] > self.max_batch_size:
            _fail("serving.models.*.preferred_batch_sizes", list(self.preferred_batch_sizes),
                  f"sizes <= max_batch_size ({self.max_batch_size})")
        if self.max_queue_delay_us < 0:
            _fail("serving.models.*.max_queue_delay_us", self.max_queue_delay_us, "an integer >= 0")
        _check_positive("serving.models.*.instances", self.instances)


@dataclass(frozen=True)
class ServingSpec:
    ensemble_name: str = "rank"
    max_candidates: int = 64
    models: dict[str, BatchingSpec] = field(default_factory=dict)
    response_cache: bool = False

    def __post_init__(self):
        _check_positive("serving.max_candidates", self.max_candidates)

    def batching(self, model: str) -> BatchingSpec:
        """Dynamic-batching settings of one member model (the defaults where the spec names none)."""
        return self.models.get(model, BatchingSpec(max_batch_size=self.max_candidates,
                                                   preferred_batch_sizes=_halves(self.max_candidates)))


def _halves(n: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, n // 2), n}))


@dataclass(frozen=True)
class SloSpec:
    p50_ms: float = 500.0
    p95_ms: float = 1500.0
    p99_ms: float = 2500.0
    max_error_rate: float = 0.01
    min_throughput_rps: float = 1.0

    def __post_init__(self):
        for name in ("p50_ms", "p95_ms", "p99_ms"):
            _check_positive(f"slo.{name}", getattr(self, name))
        if not self.p50_ms <= self.p95_ms <= self.p99_ms:
            _fail("slo.p95_ms", self.p95_ms, "p50_ms <= p95_ms <= p99_ms")
        if not 0 <= self.max_error_rate <= 1:
            _fail("slo.max_error_rate", self.max_error_rate, "a number in [0, 1]")


@dataclass(frozen=True)
class UpgradeSpec:
    max_latency_regression: float = 0.20
    max_throughput_regression: float = 0.20
    max_accuracy_delta: float = 1e-3

    def __post_init__(self):
        for name in ("max_latency_regression", "max_throughput_regression", "max_accuracy_delta"):
            if getattr(self, name) < 0:
                _fail(f"upgrade.{name}", getattr(self, name), "a number >= 0")


@dataclass(frozen=True)
class PipelineSpec:
    modalities: ModalitiesSpec = field(default_factory=ModalitiesSpec)
    ranker: RankerSpec = field(default_factory=RankerSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    serving: ServingSpec = field(default_factory=ServingSpec)
    slo: SloSpec = field(default_factory=SloSpec)
    upgrade: UpgradeSpec = field(default_factory=UpgradeSpec)
    source: str = "<defaults>"

    def __post_init__(self):
        if self.serving.max_candidates > min(self.serving.batching(m).max_batch_size for m in member_models(self)):
            _fail("serving.max_candidates", self.serving.max_candidates,
                  "a value <= every member model's max_batch_size (one ranking request is one batch)")

    @property
    def num_items(self) -> int:
        """Catalogue items have ids 1..num_items; 0 is history padding."""
        return self.ranker.history.vocab_size - 1

    def digest(self) -> str:
        """Stable hash of the spec's content (not its file path); engines and manifests record it."""
        payload = json.dumps(to_dict(self, drop=("source",)), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def with_overrides(self, **changes) -> PipelineSpec:
        return dataclasses.replace(self, **changes)


def member_models(spec: PipelineSpec) -> tuple[str, ...]:
    """Every member of the ensemble, in pipeline order; disabled modalities have no encoder.

    One `preprocess` model validates and preprocesses every input of a request before anything else runs. (With one
    preprocessing model per modality, a bad text failed its step while the same request's image and audio steps
    were still queued; Triton 2.51 then released the request's input buffers under them, which crashed the server
    or corrupted other requests in our concurrent bad-input test.)"""
    return ("preprocess", *(f"{m.value}_encoder" for m in spec.modalities.enabled), "fusion_ranker")


# --- loading ----------------------------------------------------------------------------------------------------


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _convert_scalar(tp, value, path: str):
    ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        _fail(path, value, _SCALARS[tp])
    return value


def _convert(tp, value, path: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            _fail(path, value, "one of " + ", ".join(repr(m.value) for m in tp))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(path, value, "a list")
        return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, value, "a mapping")
        return {str(k): _convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if tp in _SCALARS:
        return _convert_scalar(tp, value, path)
    raise TypeError(f"spec field {path}: unsupported type {tp}")


def _build(cls, data, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(path or "<root>", data, "a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        _fail(where, data[unknown[0]], "no such field; known fields: " + ", ".join(sorted(known)))
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: dict, source: str = "<dict>") -> PipelineSpec:
    """Build and validate a spec from plain data (as parsed from YAML)."""
    data = dict(data or {})
    data.pop("source", None)
    spec = _build(PipelineSpec, data, "")
    return dataclasses.replace(spec, source=source)


def load_spec(path: str | Path | None = None) -> PipelineSpec:
    """Read `pipeline.yaml` (the repository's by default) into a validated `PipelineSpec`."""
    path = Path(path) if path else DEFAULT_SPEC_PATH
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError("<file>", str(path), f"a readable YAML file ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError("<file>", str(path), f"valid YAML ({exc})") from exc
    return from_dict(data, source=str(path))


def to_dict(obj, drop: tuple[str, ...] = ()) -> dict:
    """Plain-data view of a spec object (enums as their values), e.g. for JSON config parameters."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name not in drop}
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(obj)
