"""Audio: WAV bytes -> log-mel spectrogram [n_mels, frames], exactly as the audio encoder was trained on.

Decode with soundfile, refuse audio longer than the spec's limit before reading the samples, mix down to mono,
resample to the spec's rate (polyphase, scipy), pad or trim to one clip, then a centred STFT (Hann window) through
a Slaney mel filter bank and log10 (transformers' `audio_utils`, the feature extractors' own implementation).
"""

from __future__ import annotations

import io
from math import gcd

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly
from transformers.audio_utils import mel_filter_bank, spectrogram_batch, window_function

from fusionrank.errors import PreprocessError
from fusionrank.spec import AudioSpec
from fusionrank.tensors import ITEM_INPUT, Modality


class AudioPreprocessor:
    input_name = ITEM_INPUT[Modality.AUDIO]

    def __init__(self, spec: AudioSpec):
        self.spec = spec
        self.window = window_function(spec.n_fft, "hann")
        self.mel_filters = mel_filter_bank(num_frequency_bins=spec.n_fft // 2 + 1, num_mel_filters=spec.n_mels,
                                           min_frequency=spec.fmin, max_frequency=spec.fmax,
                                           sampling_rate=spec.sample_rate, norm="slaney", mel_scale="slaney")

    def decode(self, raw: bytes, name: str) -> np.ndarray:
        """Mono float32 samples at the spec's rate, padded/trimmed to one clip."""
        spec = self.spec
        if not raw:
            raise PreprocessError(name, "audio is empty")
        try:
            info = sf.info(io.BytesIO(raw))
            if info.format != "WAV":
                raise PreprocessError(name, f"unsupported audio format {info.format}; WAV expected")
            seconds = info.frames / info.samplerate
            if seconds > spec.max_seconds:
                raise PreprocessError(name, f"audio is {seconds:.1f} s long; at most {spec.max_seconds:g} s allowed")
            samples, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
        except PreprocessError:
            raise
        except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
            raise PreprocessError(name, f"cannot decode WAV: {exc}") from None
        if len(samples) == 0:
            raise PreprocessError(name, "audio has no samples")
        mono = samples.mean(axis=1)
        if rate != spec.sample_rate:
            # Resample only what the clip needs (plus a margin for the filter), not a 30-second file.
            needed = int(np.ceil(spec.clip_seconds * rate)) + 64
            div = gcd(int(rate), spec.sample_rate)
            mono = resample_poly(mono[:needed], spec.sample_rate // div, int(rate) // div).astype(np.float32)
        clip = np.zeros(spec.clip_samples, dtype=np.float32)
        clip[: min(len(mono), spec.clip_samples)] = mono[: spec.clip_samples]
        return clip

    def log_mel(self, clips: list[np.ndarray]) -> np.ndarray:
        """[N, n_mels, frames] log10 mel power spectrogram of equal-length clips."""
        spec = self.spec
        mels = spectrogram_batch(clips, self.window, frame_length=spec.n_fft, hop_length=spec.hop_length, power=2.0,
                                 center=True, mel_filters=self.mel_filters, log_mel="log10")
        return np.stack(mels).astype(np.float32)

    def __call__(self, rows: list[bytes]) -> dict[str, np.ndarray]:
        clips = [self.decode(raw, f"{self.input_name}[{i}]") for i, raw in enumerate(rows)]
        return {"log_mel": self.log_mel(clips)}
