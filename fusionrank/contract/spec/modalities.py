"""The `modalities:` section: each modality's encoder and preprocessing parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from fusionrank.contract.names import Modality
from fusionrank.contract.spec.base import (
    DEFAULT_TEXT_CHECKPOINT,
    Pooling,
    ResNetArch,
    check_positive,
    check_sorted_unique,
    fail,
)


@dataclass(frozen=True)
class TextEncoderSpec:
    checkpoint: str = DEFAULT_TEXT_CHECKPOINT
    pooling: Pooling = Pooling.MEAN
    normalize: bool = True
    output_dim: int = 384

    def __post_init__(self):
        check_positive("modalities.text.encoder.output_dim", self.output_dim)


@dataclass(frozen=True)
class TextSpec:
    encoder: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    enabled: bool = True
    max_length: int = 64
    buckets: tuple[int, ...] = (16, 32, 64)
    max_chars: int = 2000

    def __post_init__(self):
        check_sorted_unique("modalities.text.buckets", self.buckets)
        if self.buckets[-1] != self.max_length:
            fail("modalities.text.buckets", list(self.buckets),
                  f"a list whose last bucket equals max_length ({self.max_length})")
        check_positive("modalities.text.max_chars", self.max_chars)

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
        check_positive("modalities.image.encoder.output_dim", self.output_dim)


@dataclass(frozen=True)
class ImageSpec:
    encoder: ImageEncoderSpec = field(default_factory=ImageEncoderSpec)
    enabled: bool = True
    size: int = 112
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    # Checked on the header before any pixel is decoded: bounded memory and time per row (docs/preprocessing.md).
    max_bytes: int = 10_000_000
    max_pixels: int = 16_000_000
    max_width: int = 8192
    max_height: int = 8192
    max_aspect_ratio: float = 10.0
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")

    def __post_init__(self):
        if not 32 <= self.size <= 1024:
            fail("modalities.image.size", self.size, "an integer in [32, 1024]")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3:
                fail(f"modalities.image.{name}", list(values), "exactly 3 numbers (R, G, B)")
        if any(s <= 0 for s in self.std):
            fail("modalities.image.std", list(self.std), "3 numbers > 0")
        for name in ("max_bytes", "max_pixels", "max_width", "max_height"):
            check_positive(f"modalities.image.{name}", getattr(self, name))
        if self.max_aspect_ratio < 1:
            fail("modalities.image.max_aspect_ratio", self.max_aspect_ratio, "a number >= 1 (longer side / shorter)")
        allowed = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"}
        if not self.formats or not set(self.formats) <= allowed:
            fail("modalities.image.formats", list(self.formats), f"a non-empty subset of {sorted(allowed)}")


# WAV sample formats (libsndfile subtypes) whose decoding costs one pass over the samples; compressed ones (ADPCM,
# GSM, MPEG inside WAV) are refused.
AUDIO_SAMPLE_FORMATS = ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW")


@dataclass(frozen=True)
class AudioEncoderSpec:
    checkpoint: str | None = None
    seed: int = 0
    channels: tuple[int, ...] = (16, 32, 64)
    output_dim: int = 128

    def __post_init__(self):
        if not self.channels or any(c <= 0 for c in self.channels):
            fail("modalities.audio.encoder.channels", list(self.channels), "a non-empty list of positive integers")
        check_positive("modalities.audio.encoder.output_dim", self.output_dim)


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
    # Checked on the WAV header before any sample is decoded: bounded memory and time per row (docs/preprocessing.md).
    max_bytes: int = 16_000_000
    max_seconds: float = 30.0
    min_sample_rate: int = 8000
    max_sample_rate: int = 192000
    max_channels: int = 8
    sample_formats: tuple[str, ...] = AUDIO_SAMPLE_FORMATS

    def __post_init__(self):
        check_positive("modalities.audio.sample_rate", self.sample_rate)
        check_positive("modalities.audio.n_mels", self.n_mels)
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            fail("modalities.audio.fmax", self.fmax, f"fmin < fmax <= sample_rate/2 ({self.sample_rate / 2:g})")
        if self.n_fft <= 0 or self.n_fft & (self.n_fft - 1):
            fail("modalities.audio.n_fft", self.n_fft, "a positive power of two")
        if not 0 < self.hop_length <= self.n_fft:
            fail("modalities.audio.hop_length", self.hop_length, f"an integer in (0, n_fft={self.n_fft}]")
        check_positive("modalities.audio.clip_seconds", self.clip_seconds)
        if self.max_seconds < self.clip_seconds:
            fail("modalities.audio.max_seconds", self.max_seconds, f"a number >= clip_seconds ({self.clip_seconds})")
        check_positive("modalities.audio.max_bytes", self.max_bytes)
        check_positive("modalities.audio.min_sample_rate", self.min_sample_rate)
        if self.max_sample_rate < self.min_sample_rate:
            fail("modalities.audio.max_sample_rate", self.max_sample_rate,
                 f"an integer >= min_sample_rate ({self.min_sample_rate})")
        if not 1 <= self.max_channels <= 64:
            fail("modalities.audio.max_channels", self.max_channels, "an integer in [1, 64]")
        if not self.sample_formats or not set(self.sample_formats) <= set(AUDIO_SAMPLE_FORMATS):
            fail("modalities.audio.sample_formats", list(self.sample_formats),
                 f"a non-empty subset of {list(AUDIO_SAMPLE_FORMATS)}")

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def num_frames(self) -> int:
        """Frames of the centred STFT over one clip: the time axis of the log-mel input."""
        return 1 + self.clip_samples // self.hop_length


VIDEO_CONTAINERS = ("mp4", "webm")
VIDEO_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4")


@dataclass(frozen=True)
class VideoSpec:
    """Item videos (`item_video`): a source of the image modality, not a modality of their own. `frames` frames are
    sampled evenly, each goes through the image preprocessing and encoder, and their embeddings are mean-pooled into
    the item's image embedding. The limits are checked on the sizes the container declares, before any frame is
    decoded, and again while decoding (a container can lie)."""

    enabled: bool = True
    frames: int = 4
    max_bytes: int = 20_000_000
    max_seconds: float = 60.0
    max_frames: int = 1800
    max_pixels: int = 8_294_400  # per frame: 3840 x 2160
    containers: tuple[str, ...] = VIDEO_CONTAINERS
    codecs: tuple[str, ...] = ("h264", "vp8", "vp9", "av1")

    def __post_init__(self):
        if not 1 <= self.frames <= 64:
            fail("modalities.video.frames", self.frames, "an integer in [1, 64]")
        for name in ("max_bytes", "max_seconds", "max_frames", "max_pixels"):
            check_positive(f"modalities.video.{name}", getattr(self, name))
        if not self.containers or not set(self.containers) <= set(VIDEO_CONTAINERS):
            fail("modalities.video.containers", list(self.containers),
                 f"a non-empty subset of {list(VIDEO_CONTAINERS)}")
        if not self.codecs or not set(self.codecs) <= set(VIDEO_CODECS):
            fail("modalities.video.codecs", list(self.codecs), f"a non-empty subset of {list(VIDEO_CODECS)}")


@dataclass(frozen=True)
class ModalitiesSpec:
    text: TextSpec = field(default_factory=TextSpec)
    image: ImageSpec = field(default_factory=ImageSpec)
    audio: AudioSpec = field(default_factory=AudioSpec)
    video: VideoSpec = field(default_factory=VideoSpec)

    def __post_init__(self):
        if not self.enabled:
            fail("modalities", "all disabled", "at least one enabled modality")
        if self.video.enabled and not self.image.enabled:
            fail("modalities.video.enabled", True, "false while modalities.image is disabled (video frames go "
                                                   "through the image encoder)")

    @property
    def video_enabled(self) -> bool:
        """Whether requests may carry `item_video` (the image modality's second source)."""
        return self.video.enabled and self.image.enabled

    @property
    def enabled(self) -> tuple[Modality, ...]:
        """Enabled modalities in the fixed order text, image, audio (the order of every fused tensor)."""
        return tuple(m for m in Modality if getattr(self, m.value).enabled)

    def embedding_dim(self, modality: Modality) -> int:
        return getattr(self, modality.value).encoder.output_dim
