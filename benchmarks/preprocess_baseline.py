"""The preprocessing as it was before it became stateless and vectorised, kept only as a yardstick: the
benchmark (`benchmarks.preprocess`) times it beside the current code, and the equivalence tests prove the
current code gives the same numbers (tests/unit/preprocess/test_preprocess_equivalence.py). Serving, training and
export never use it.

- text: the HF tokenizer called twice per request, with truncation and padding set on it at every call;
- image: full decode, resize of the whole image, crop, float arithmetic per image;
- audio: the whole file read twice (info, then samples), scipy's `resample_poly` designing its filter per call,
  transformers' `spectrogram_batch` (a Python loop over frames).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from math import gcd

import numpy as np
import soundfile as sf
from PIL import Image, ImageOps
from scipy.signal import resample_poly

from fusionrank.contract.spec import AudioSpec, ImageSpec, TextSpec
from fusionrank.preprocess.text import load_tokenizer


def previous_text(spec: TextSpec, tokenizer_dir) -> Callable[[list[str]], dict[str, np.ndarray]]:
    """texts -> input_ids, attention_mask, as the previous TextPreprocessor computed them."""
    hf = load_tokenizer(tokenizer_dir)

    def previous(texts: list[str]) -> dict[str, np.ndarray]:
        lengths = hf(texts, truncation=True, max_length=spec.max_length)["input_ids"]
        bucket = spec.bucket_for(max(len(ids) for ids in lengths))
        out = hf(texts, truncation=True, max_length=bucket, padding="max_length", return_tensors="np")
        return {name: out[name].astype(np.int64) for name in ("input_ids", "attention_mask")}

    return previous


def previous_image(spec: ImageSpec, raw: bytes) -> np.ndarray:
    """One encoded image -> float32 [3, size, size], as the previous ImagePreprocessor computed it."""
    image = Image.open(io.BytesIO(raw))
    image.load()
    image = ImageOps.exif_transpose(image).convert("RGB")
    width, height = image.size
    scale = spec.size / min(width, height)
    resized = (max(spec.size, round(width * scale)), max(spec.size, round(height * scale)))
    image = image.resize(resized, Image.Resampling.BILINEAR)
    left, top = (resized[0] - spec.size) // 2, (resized[1] - spec.size) // 2
    array = np.asarray(image.crop((left, top, left + spec.size, top + spec.size)), dtype=np.float32)
    mean, std = (np.asarray(v, dtype=np.float32).reshape(3, 1, 1) for v in (spec.mean, spec.std))
    return (array.transpose(2, 0, 1) / 255.0 - mean) / std


def previous_clip(spec: AudioSpec, raw: bytes) -> np.ndarray:
    """One WAV -> mono float32 clip at the spec's rate, as the previous AudioPreprocessor computed it."""
    info = sf.info(io.BytesIO(raw))
    if info.frames / info.samplerate > spec.max_seconds:
        raise ValueError("too long")
    samples, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if rate != spec.sample_rate:
        needed = int(np.ceil(spec.clip_seconds * rate)) + 64
        div = gcd(int(rate), spec.sample_rate)
        mono = resample_poly(mono[:needed], spec.sample_rate // div, int(rate) // div).astype(np.float32)
    clip = np.zeros(spec.clip_samples, dtype=np.float32)
    clip[: min(len(mono), spec.clip_samples)] = mono[: spec.clip_samples]
    return clip


@functools.lru_cache(maxsize=4)
def _mel_setup(spec: AudioSpec) -> tuple[np.ndarray, np.ndarray]:
    from transformers.audio_utils import mel_filter_bank, window_function

    window = window_function(spec.n_fft, "hann")
    mel_filters = mel_filter_bank(num_frequency_bins=spec.n_fft // 2 + 1, num_mel_filters=spec.n_mels,
                                  min_frequency=spec.fmin, max_frequency=spec.fmax, sampling_rate=spec.sample_rate,
                                  norm="slaney", mel_scale="slaney")
    return window, mel_filters


def previous_log_mel(spec: AudioSpec, clips: list[np.ndarray]) -> np.ndarray:
    """[N, n_mels, frames] with transformers' spectrogram_batch, as the previous AudioPreprocessor computed it."""
    from transformers.audio_utils import spectrogram_batch

    window, mel_filters = _mel_setup(spec)
    mels = spectrogram_batch(clips, window, frame_length=spec.n_fft, hop_length=spec.hop_length, power=2.0,
                             center=True, mel_filters=mel_filters, log_mel="log10")
    return np.stack(mels).astype(np.float32)
