"""The STFT window and Slaney mel filter bank of the audio features, in numpy alone.

The same arithmetic as transformers' `audio_utils.window_function(n, "hann")` and `mel_filter_bank(...,
norm="slaney", mel_scale="slaney")` (the feature extractors' own, adapted there from librosa), written here so the
serving processes do not import transformers (which maps torch when it finds it); tests/test_preprocess_mel.py
checks both against transformers to the bit.
"""

from __future__ import annotations

import numpy as np

_MIN_LOG_HERTZ = 1000.0
_MIN_LOG_MEL = 15.0
_LOGSTEP = 27.0 / np.log(6.4)


def hann_window(length: int) -> np.ndarray:
    """The periodic Hann window of `length` samples (float64), as STFTs use."""
    return np.hanning(length + 1)[:-1]


def _hertz_to_mel(freq: float) -> float:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    if freq >= _MIN_LOG_HERTZ:
        return _MIN_LOG_MEL + np.log(freq / _MIN_LOG_HERTZ) * _LOGSTEP
    return 3.0 * freq / 200.0


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    freq = 200.0 * mels / 3.0
    log_region = mels >= _MIN_LOG_MEL
    freq[log_region] = _MIN_LOG_HERTZ * np.exp((np.log(6.4) / 27.0) * (mels[log_region] - _MIN_LOG_MEL))
    return freq


def slaney_mel_filter_bank(num_frequency_bins: int, num_mel_filters: int, min_frequency: float,
                           max_frequency: float, sampling_rate: int) -> np.ndarray:
    """[num_frequency_bins, num_mel_filters] triangular filters on the Slaney scale, area-normalised (float64)."""
    mel_freqs = np.linspace(_hertz_to_mel(min_frequency), _hertz_to_mel(max_frequency), num_mel_filters + 2)
    filter_freqs = _mel_to_hertz(mel_freqs)
    fft_freqs = np.linspace(0, sampling_rate // 2, num_frequency_bins)
    filter_diff = np.diff(filter_freqs)
    slopes = np.expand_dims(filter_freqs, 0) - np.expand_dims(fft_freqs, 1)
    down_slopes = -slopes[:, :-2] / filter_diff[:-1]
    up_slopes = slopes[:, 2:] / filter_diff[1:]
    filters = np.maximum(np.zeros(1), np.minimum(down_slopes, up_slopes))
    filters *= np.expand_dims(2.0 / (filter_freqs[2:num_mel_filters + 2] - filter_freqs[:num_mel_filters]), 0)
    return filters
