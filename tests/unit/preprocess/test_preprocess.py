"""Preprocessing: the one implementation used offline and by the Triton models."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from fusionrank.contract.errors import PreprocessError
from fusionrank.contract.spec import Modality
from fusionrank.preprocess import build_preprocessor, validate_history


def test_text_pads_to_the_smallest_bucket_that_fits(text, ci_spec):
    short = text([b"red tent", b"espresso machine"])
    assert short["input_ids"].shape == (2, 16) and short["attention_mask"].shape == (2, 16)
    long_title = " ".join(["hiking"] * 25).encode()
    assert text([b"red tent", long_title])["input_ids"].shape == (2, 32)
    very_long = " ".join(["hiking"] * 200).encode()
    out = text([very_long])
    assert out["input_ids"].shape == (1, ci_spec.modalities.text.max_length)
    assert out["attention_mask"].sum() == ci_spec.modalities.text.max_length  # truncated, not rejected


def test_text_matches_the_checkpoint_tokenizer(text):
    from transformers import AutoTokenizer

    from fusionrank.contract.paths import resolve_text_checkpoint

    reference = AutoTokenizer.from_pretrained(str(resolve_text_checkpoint("builtin:all-MiniLM-L6-v2")))
    ids = text([b"Wireless noise-cancelling headphones"])["input_ids"][0]
    expected = reference("Wireless noise-cancelling headphones")["input_ids"]
    assert ids[: len(expected)].tolist() == expected and not ids[len(expected):].any()


@pytest.mark.parametrize("raw, problem", [
    (b"", "empty"), (b"   ", "empty"), (b"caf\xe9", "UTF-8"), (b"x" * 2001, "at most 2000"),
])
def test_text_bad_rows_name_the_row(text, raw, problem):
    with pytest.raises(PreprocessError) as info:
        text([b"fine title", raw])
    assert str(info.value).startswith("item_text[1]") and problem in str(info.value)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_image_resize_crop_normalise_and_formats(ci_spec):
    pre = build_preprocessor(ci_spec, Modality.IMAGE)
    size = ci_spec.modalities.image.size
    red = Image.new("RGB", (300, 120), (255, 0, 0))
    rows = [_encode(red, "JPEG"), _encode(red, "PNG"), _encode(red, "WEBP", lossless=True),
            _encode(red.convert("L"), "PNG"), _encode(red.convert("RGBA"), "PNG")]
    out = pre(rows)["pixel_values"]
    assert out.shape == (5, 3, size, size) and out.dtype == np.float32
    mean, std = ci_spec.modalities.image.mean, ci_spec.modalities.image.std
    np.testing.assert_allclose(out[1, :, 5, 5], [(1 - mean[0]) / std[0], -mean[1] / std[1], -mean[2] / std[2]],
                               atol=1e-5)


def test_image_exif_orientation_is_applied(ci_spec):
    pre = build_preprocessor(ci_spec, Modality.IMAGE)
    image = Image.new("RGB", (200, 100), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 100, 100))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: red ends up on top
    rotated = pre([_encode(image, "JPEG", exif=exif, quality=95)])["pixel_values"][0]
    plain = pre([_encode(image, "JPEG", quality=95)])["pixel_values"][0]
    # Displayed upright, the top rows are red; without EXIF the centre crop is half red, half blue.
    assert rotated[0, 2].mean() > rotated[2, 2].mean()
    assert plain[0, :, 2].mean() > plain[0, :, -3].mean()


def test_image_bad_rows(ci_spec):
    pre = build_preprocessor(ci_spec, Modality.IMAGE)
    good = _encode(Image.new("RGB", (64, 64)), "JPEG")
    gif = _encode(Image.new("RGB", (8, 8)), "GIF")
    for raw, problem in [(b"", "empty"), (b"not an image", "unsupported image format or not an image"),
                         (good[:100], "cannot decode"), (gif, "unsupported image format")]:
        with pytest.raises(PreprocessError) as info:
            pre([good, raw])
        assert str(info.value).startswith("item_image[1]") and problem in str(info.value), info.value


def test_image_pixel_limit_is_checked_before_decoding(ci_spec):
    from fusionrank.contract.spec import from_dict, to_dict

    data = to_dict(ci_spec, drop=("source",))
    data["modalities"]["image"]["max_pixels"] = 100 * 100
    pre = build_preprocessor(from_dict(data), Modality.IMAGE)
    with pytest.raises(PreprocessError, match=r"item_image\[0\]: decoded size 200x100"):
        pre([_encode(Image.new("RGB", (200, 100)), "PNG")])


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_audio_resample_mixdown_pad_trim(ci_spec):
    pre = build_preprocessor(ci_spec, Modality.AUDIO)
    a = ci_spec.modalities.audio
    t16 = np.arange(a.sample_rate * 2) / a.sample_rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t16)
    t22 = np.arange(22050 * 2) / 22050
    stereo22 = np.stack([0.5 * np.sin(2 * np.pi * 440 * t22)] * 2, axis=1)
    rows = [_wav(tone, a.sample_rate), _wav(stereo22, 22050), _wav(tone[:4000], a.sample_rate)]
    mel = pre(rows)["log_mel"]
    assert mel.shape == (3, a.n_mels, a.num_frames) and mel.dtype == np.float32
    # Same tone at another rate and in stereo: same spectrum after resampling and mix-down.
    peak = mel[0].mean(axis=1).argmax()
    assert abs(int(mel[1].mean(axis=1).argmax()) - int(peak)) <= 1
    # Short clip is zero-padded: the tail frames are at the log floor.
    assert mel[2][:, -10:].max() < mel[0][:, -10:].max() - 3


def test_audio_bad_rows(ci_spec):
    pre = build_preprocessor(ci_spec, Modality.AUDIO)
    a = ci_spec.modalities.audio
    good = _wav(np.zeros(a.sample_rate), a.sample_rate)
    long = _wav(np.zeros(int(a.sample_rate * (a.max_seconds + 1))), a.sample_rate)
    for raw, problem in [(b"", "empty"), (b"RIFF\x10\x00\x00\x00WAVEjunk", "cannot decode WAV"),
                         (long, "at most 30 s"), (good[:30], "cannot decode WAV")]:
        with pytest.raises(PreprocessError) as info:
            pre([good, raw])
        assert str(info.value).startswith("item_audio[1]") and problem in str(info.value), info.value


def test_history_validation(ci_spec):
    length, vocab = ci_spec.ranker.history.length, ci_spec.ranker.history.vocab_size
    ok = np.zeros((2, length), dtype=np.int64)
    ok[:, -1] = vocab - 1
    assert validate_history(ok, ci_spec) is not None
    for value, problem in [(-1, "negative item id -1"), (vocab, f"out of vocabulary {vocab}")]:
        bad = ok.copy()
        bad[1, 2] = value
        with pytest.raises(PreprocessError) as info:
            validate_history(bad, ci_spec)
        assert str(info.value).startswith("user_history[1]") and problem in str(info.value)
    with pytest.raises(PreprocessError, match="shape"):
        validate_history(ok[:, 1:], ci_spec)
    with pytest.raises(PreprocessError, match="INT64"):
        validate_history(ok.astype(np.float32), ci_spec)


def _spec_with(ci_spec, section: str, **fields):
    from fusionrank.contract.spec import from_dict, to_dict

    data = to_dict(ci_spec, drop=("source",))
    data["modalities"][section].update(fields)
    return from_dict(data)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with almost no pixel data behind it."""
    import struct
    import zlib

    raw = _encode(Image.new("RGB", (4, 4)), "PNG")
    ihdr = raw[12:16] + struct.pack(">II", width, height) + raw[24:29]
    return raw[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + raw[33:]


@pytest.mark.parametrize("width, height, problem", [
    (9000, 100, "at most 8192x8192"), (100, 9000, "at most 8192x8192"), (5000, 5000, "exceeds the limit"),
    (8000, 700, "aspect ratio of 8000x700 exceeds 10:1"), (30, 400, "aspect ratio of 30x400"),
])
def test_image_header_limits_refuse_before_decoding(ci_spec, width, height, problem):
    pre = build_preprocessor(ci_spec, Modality.IMAGE)
    with pytest.raises(PreprocessError) as info:
        pre([_encode(Image.new("RGB", (8, 8)), "PNG"), _png_header(width, height)])
    # The header alone decides: these payloads have no pixel data a decoder could even try.
    assert str(info.value).startswith("item_image[1]") and problem in str(info.value), info.value


def test_image_limits_come_from_the_spec(ci_spec):
    pre = build_preprocessor(_spec_with(ci_spec, "image", max_aspect_ratio=2.0, max_width=300), Modality.IMAGE)
    assert pre([_encode(Image.new("RGB", (200, 100)), "PNG")])["pixel_values"].shape[0] == 1
    for size, problem in [((201, 100), "exceeds 2:1"), ((301, 200), "at most 300x8192")]:
        with pytest.raises(PreprocessError, match=problem):
            pre([_encode(Image.new("RGB", size), "PNG")])


def _wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def test_audio_header_limits_refuse_before_decoding(ci_spec):
    import struct

    pre = build_preprocessor(ci_spec, Modality.AUDIO)
    good = _wav_bytes(np.zeros(1600), 16000)
    absurd = good[:24] + struct.pack("<II", 2_000_000_000, 4_000_000_000) + good[32:]  # rate, byte rate
    nan, inf = np.zeros(1600, np.float32), np.zeros(1600, np.float32)
    nan[7], inf[9] = np.nan, -np.inf
    cases = [(absurd, "sample rate 2000000000 Hz outside the allowed 8000..192000 Hz"),
             (_wav_bytes(np.zeros(400), 4000), "sample rate 4000 Hz"),
             (_wav_bytes(np.zeros((160, 12)), 16000), "12 channels; 1 to 8 allowed"),
             (_wav_bytes(np.zeros(1600), 16000, "IMA_ADPCM"), "unsupported WAV sample format IMA_ADPCM"),
             (_wav_bytes(nan, 16000, "FLOAT"), "non-finite samples"),
             (_wav_bytes(inf, 16000, "FLOAT"), "non-finite samples"),
             (_wav_bytes(np.full(1600, 3e38, np.float32), 16000, "FLOAT"), "log-mel spectrogram is not finite"),
             (b"RIFF" + b"\0" * 20_000_000, "at most 16000000 allowed")]
    for raw, problem in cases:
        with pytest.raises(PreprocessError) as info:
            pre([good, raw])
        assert str(info.value).startswith("item_audio[1]") and problem in str(info.value), info.value


def test_audio_reads_only_the_first_clip_and_odd_rates_stay_cheap(ci_spec):
    pre = build_preprocessor(ci_spec, Modality.AUDIO)
    rng = np.random.default_rng(0)
    long_noise = 0.1 * rng.standard_normal(16000 * 20)
    np.testing.assert_array_equal(pre([_wav_bytes(long_noise, 16000)])["log_mel"],
                                  pre([_wav_bytes(long_noise[:16000 + 64], 16000)])["log_mel"])
    # A prime rate shares no factor with 16 kHz: it is resampled at the nearest ratio with a denominator <= 1000
    # (before: a 20 x 47999-tap filter, 0.4 s per row).
    from fusionrank.preprocess.audio import _resampling_filter

    out = pre([_wav_bytes(0.1 * np.sin(np.arange(47999) * 0.1), 47999)])["log_mel"]
    assert np.isfinite(out).all() and _resampling_filter.cache_info().currsize <= 16
    assert max(len(_resampling_filter(1, 3)), len(_resampling_filter(320, 441))) < 20_000


def test_text_bytes_limit_refuses_before_decoding(text, ci_spec):
    limit = ci_spec.modalities.text.max_chars
    with pytest.raises(PreprocessError, match=rf"item_text\[0\]: text has {4 * limit + 1} bytes"):
        text([b"\xff" * (4 * limit + 1)])


def test_history_rows_must_be_one_user(ci_spec):
    history = np.zeros((3, ci_spec.ranker.history.length), dtype=np.int64)
    history[2, 5] = 7
    with pytest.raises(PreprocessError, match=r"user_history\[2\]: differs from row 0"):
        validate_history(history, ci_spec)
