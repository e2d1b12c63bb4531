"""Audio: WAV bytes -> log-mel spectrogram [n_mels, frames], exactly as the audio encoder was trained on.

Decode with soundfile: the header (format, sample format, rate, channels, duration) is checked against the spec's
limits before any sample is read, and only the first clip (plus a filter margin) is read, so memory and time per
row are bounded (figures in docs/preprocessing.md). Mix down to mono, refuse non-finite samples, resample to the
spec's rate (polyphase, scipy; the rate ratio is taken as a fraction with a bounded denominator, exact for every
standard rate, and its filter is designed once per ratio), pad or trim to one clip, then a centred STFT (Hann
window) through a Slaney mel filter bank and log10: the computation of transformers' `spectrogram_batch` (the
feature extractors' own), vectorised over every frame of every clip in one numpy rfft and one sparse product with
the filter bank.

Stateless: the window, filter bank and cached resampling filters are read-only once built.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Iterator
from fractions import Fraction

import numpy as np
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view
from scipy.sparse import csr_matrix

from fusionrank.contract.errors import PreprocessError
from fusionrank.contract.spec import AudioSpec
from fusionrank.contract.tensors import ITEM_INPUT, Modality
from fusionrank.preprocess._mel import hann_window, slaney_mel_filter_bank

# Largest denominator of the resampling ratio: 441 (the 44.1-kHz family) and every other standard rate are exact;
# an odd rate such as 47999 Hz is resampled at the nearest such ratio (a pitch error under 1e-5) instead of
# designing a filter of 20 x 48000 taps (0.4 s per row).
MAX_RATIO_DENOMINATOR = 1000
MEL_FLOOR = 1e-10  # transformers' spectrogram default: the power floor before log10


@functools.lru_cache(maxsize=16)
def _resampling_filter(up: int, down: int) -> np.ndarray:
    """scipy's own resample_poly filter for up/down (Kaiser-windowed sinc), designed once per ratio."""
    from scipy.signal import firwin  # scipy.signal maps about 55 MiB: only processes that resample pay for it

    rate = max(up, down)
    taps = firwin(2 * 10 * rate + 1, 1.0 / rate, window=("kaiser", 5.0)).astype(np.float32)
    taps.flags.writeable = False  # shared between threads; resample_poly copies it before scaling
    return taps


class AudioPreprocessor:
    input_name = ITEM_INPUT[Modality.AUDIO]

    def __init__(self, spec: AudioSpec):
        self.spec = spec
        self.window = hann_window(spec.n_fft)
        self.mel_filters = slaney_mel_filter_bank(spec.n_fft // 2 + 1, spec.n_mels, spec.fmin, spec.fmax,
                                                  spec.sample_rate)
        for array in (self.window, self.mel_filters):
            array.flags.writeable = False
        # The triangular filters touch about 2 % of the (frequency, mel) pairs: a sparse product is the same sum
        # at a fraction of the work. Canonical format now, so no thread ever triggers scipy's lazy clean-up.
        self.mel_sparse = csr_matrix(self.mel_filters.T)
        self.mel_sparse.sum_duplicates()
        self.mel_sparse.sort_indices()

    def check_header(self, info: sf.SoundFile, name: str) -> None:
        """Refuse a format, sample format, rate, channel count or duration over the spec's limits."""
        spec = self.spec
        if info.format != "WAV":
            raise PreprocessError(name, f"unsupported audio format {info.format}; WAV expected")
        if info.subtype not in spec.sample_formats:
            raise PreprocessError(name, f"unsupported WAV sample format {info.subtype}; allowed: "
                                        f"{', '.join(spec.sample_formats)}")
        if not spec.min_sample_rate <= info.samplerate <= spec.max_sample_rate:
            raise PreprocessError(name, f"sample rate {info.samplerate} Hz outside the allowed "
                                        f"{spec.min_sample_rate}..{spec.max_sample_rate} Hz")
        if not 1 <= info.channels <= spec.max_channels:
            raise PreprocessError(name, f"{info.channels} channels; 1 to {spec.max_channels} allowed")
        seconds = info.frames / info.samplerate
        if seconds > spec.max_seconds:
            raise PreprocessError(name, f"audio is {seconds:.1f} s long; at most {spec.max_seconds:g} s allowed")

    @contextlib.contextmanager
    def open(self, raw: bytes, name: str) -> Iterator[sf.SoundFile]:
        """The WAV opened (only its header read) and checked against the spec's limits; bad payloads (and failures
        to read it inside the block) raise PreprocessError naming `name`."""
        spec = self.spec
        if not raw:
            raise PreprocessError(name, "audio is empty")
        if len(raw) > spec.max_bytes:
            raise PreprocessError(name, f"audio has {len(raw)} bytes; at most {spec.max_bytes} allowed")
        try:
            with sf.SoundFile(io.BytesIO(raw)) as wav:
                self.check_header(wav, name)
                yield wav
        except PreprocessError:
            raise
        except sf.LibsndfileError as exc:  # its text names the BytesIO object's address: libsndfile's reason only
            raise PreprocessError(name, f"cannot decode WAV: {exc.error_string}") from None
        except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
            raise PreprocessError(name, f"cannot decode WAV: {exc}") from None

    def _needed(self, rate: int) -> int:
        """Input samples read for one output clip plus the resampling filter's margin, never the whole file."""
        return int(np.ceil(self.spec.clip_seconds * rate)) + 64

    def header(self, raw: bytes, name: str) -> int:
        """Every check that needs no decoding (`open`); returns the samples decoding would read (all channels)."""
        with self.open(raw, name) as wav:
            return min(int(wav.frames), self._needed(int(wav.samplerate))) * int(wav.channels)

    def read(self, raw: bytes, name: str) -> tuple[np.ndarray, int]:
        """Mono float32 samples of (at most) the first clip and the file's rate; only the header is trusted."""
        with self.open(raw, name) as wav:
            rate = int(wav.samplerate)
            samples = wav.read(frames=self._needed(rate), dtype="float32", always_2d=True)
        if len(samples) == 0:
            raise PreprocessError(name, "audio has no samples")
        if not np.isfinite(samples).all():
            raise PreprocessError(name, "audio has non-finite samples (NaN or infinity)")
        return samples.mean(axis=1), rate

    def decode(self, raw: bytes, name: str) -> np.ndarray:
        """Mono float32 samples at the spec's rate, padded/trimmed to one clip."""
        spec = self.spec
        mono, rate = self.read(raw, name)
        if rate != spec.sample_rate:
            ratio = Fraction(spec.sample_rate, rate).limit_denominator(MAX_RATIO_DENOMINATOR)
            up, down = ratio.numerator, ratio.denominator
            from scipy.signal import resample_poly  # see _resampling_filter

            mono = resample_poly(mono, up, down, window=_resampling_filter(up, down)).astype(np.float32)
        clip = np.zeros(spec.clip_samples, dtype=np.float32)
        clip[: min(len(mono), spec.clip_samples)] = mono[: spec.clip_samples]
        return clip

    def log_mel(self, clips: list[np.ndarray]) -> np.ndarray:
        """[N, n_mels, frames] log10 mel power spectrogram of equal-length clips, all frames in one rfft."""
        spec = self.spec
        half = spec.n_fft // 2
        padded = np.pad(np.stack(clips).astype(np.float64), ((0, 0), (half, half)), mode="reflect")
        frames = sliding_window_view(padded, spec.n_fft, axis=1)[:, ::spec.hop_length] * self.window
        # complex64, then power in float64: the precision transformers' spectrogram keeps.
        power = np.abs(np.fft.rfft(frames, axis=-1).astype(np.complex64), dtype=np.float64)
        np.square(power, out=power)
        n, frames_per_clip, bins = power.shape
        mel = np.asarray(self.mel_sparse @ power.reshape(n * frames_per_clip, bins).T)  # [n_mels, n * frames]
        np.log10(np.maximum(MEL_FLOOR, mel, out=mel), out=mel)
        return mel.astype(np.float32).reshape(spec.n_mels, n, frames_per_clip).transpose(1, 0, 2)

    def __call__(self, rows: list[bytes]) -> dict[str, np.ndarray]:
        # Huge finite float samples may overflow to infinity on the way; the check below refuses those rows, so
        # numpy's overflow warnings would only be noise in the server log (errstate is per thread).
        with np.errstate(over="ignore", invalid="ignore"):
            clips = [self.decode(raw, f"{self.input_name}[{i}]") for i, raw in enumerate(rows)]
            mels = np.ascontiguousarray(self.log_mel(clips))
        finite = np.isfinite(mels).all(axis=(1, 2))
        if not finite.all():
            row = int(np.argmin(finite))
            raise PreprocessError(f"{self.input_name}[{row}]", "sample values too large: the log-mel spectrogram is "
                                                                "not finite (samples are expected in [-1, 1])")
        return {"log_mel": mels}
