"""Preprocessing figures in one run: milliseconds per row before and after, and the worst case per row at the
spec's limits (time and peak memory).

    fusionrank bench preprocess [--spec pipeline.yaml] [--repeat 5]

Before/after: the previous implementation (`benchmarks.preprocess_baseline`) and the current one on the same rows,
interleaved so machine noise hits both alike (median of `--repeat` runs): the benchmark catalogue's items and
photo-sized images. Worst cases: one row at a time, payloads at the limits (largest pixel count, widest aspect
ratio, progressive and CMYK JPEGs, the audio rate whose resampling ratio is the costliest, the most channels and
bytes); peak memory is the growth of the process's resident set (Linux `VmHWM`, reset before each case).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import io
import statistics
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from benchmarks._args import spec_of
from benchmarks.preprocess_baseline import previous_clip, previous_image, previous_log_mel, previous_text
from fusionrank.contract.errors import PreprocessError
from fusionrank.contract.paths import resolve_text_checkpoint
from fusionrank.contract.spec import Modality, PipelineSpec
from fusionrank.model.synthetic_data import load_benchmark
from fusionrank.preprocess import build_preprocessor
from fusionrank.preprocess.audio import MAX_RATIO_DENOMINATOR, _resampling_filter

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(best seconds of `repeat` calls, peak resident-set growth in MB during them)."""
    gc.collect()
    _LIBC.malloc_trim(0)  # give freed heap back first, or a case reuses the pages an earlier one left resident
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    base = _status_mb("VmRSS")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), _status_mb("VmHWM") - base


def _photo(width: int, height: int, fmt: str, mode: str = "RGB", **kw) -> bytes:
    """A smooth photo-like image (upsampled noise): realistic sizes for JPEG; flat costs for PNG/WebP decoding."""
    rng = np.random.default_rng(width * 7 + height)
    small = Image.fromarray(rng.integers(0, 256, (max(1, height // 32), max(1, width // 32), 3), dtype=np.uint8))
    image = small.resize((width, height), Image.Resampling.BILINEAR).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(width: int, height: int, fmt: str, mode: str = "RGB") -> bytes:
    """A smooth gradient: compresses to a small file that still decodes every pixel (a bomb within the limits)."""
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    rgb = np.stack([x, y, (x + y) / 2], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def _wav(rate: int, channels: int, seconds: float, subtype: str) -> bytes:
    samples = 0.1 * np.random.default_rng(rate).standard_normal((int(rate * seconds), channels))
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def costliest_rate(spec: PipelineSpec) -> int:
    """The allowed sample rate whose resampling ratio has the largest term (the longest filter)."""
    a = spec.modalities.audio

    def cost(rate: int) -> int:
        ratio = Fraction(a.sample_rate, rate).limit_denominator(MAX_RATIO_DENOMINATOR)
        return max(ratio.numerator, ratio.denominator) if rate != a.sample_rate else 0

    return max(range(a.min_sample_rate, a.max_sample_rate + 1, 7), key=cost)


def before_after(spec: PipelineSpec, repeat: int) -> list[tuple[str, float, float]]:
    """(what, ms per row before, ms per row after), both timed in this run, interleaved."""
    bench = load_benchmark(spec)
    ids = range(1, 65)
    text_dir = resolve_text_checkpoint(spec.modalities.text.encoder.checkpoint)
    pre = {m: build_preprocessor(spec, m, tokenizer_dir=text_dir if m is Modality.TEXT else None) for m in Modality}
    m = spec.modalities
    catalogue_images = [bench.item(i).image_bytes() for i in ids]
    photos = [_photo(1200, 900, "JPEG", quality=90) for _ in range(16)]
    pngs = [_photo(800, 800, "PNG") for _ in range(16)]
    wavs = [bench.item(i).audio_bytes() for i in ids]
    clips = [pre[Modality.AUDIO].decode(raw, "x") for raw in wavs]
    texts = [bench.item(i).title for i in ids]
    old_text = previous_text(m.text, text_dir)
    cases = [
        ("text: tokenize + pad (catalogue titles)", texts, lambda r: old_text(r),
         lambda r: pre[Modality.TEXT]([t.encode() for t in r])),
        ("image: decode + resize + normalise (catalogue, ~100-190 px)", catalogue_images,
         lambda r: np.stack([previous_image(m.image, x) for x in r]), pre[Modality.IMAGE]),
        ("image: same, 1200x900 JPEG photos", photos, lambda r: np.stack([previous_image(m.image, x) for x in r]),
         pre[Modality.IMAGE]),
        ("image: same, 800x800 PNG", pngs, lambda r: np.stack([previous_image(m.image, x) for x in r]),
         pre[Modality.IMAGE]),
        ("audio: log-mel only (catalogue clips)", clips, lambda r: previous_log_mel(m.audio, r),
         pre[Modality.AUDIO].log_mel),
        ("audio: decode + resample + log-mel (catalogue WAVs)", wavs,
         lambda r: previous_log_mel(m.audio, [previous_clip(m.audio, x) for x in r]), pre[Modality.AUDIO]),
    ]
    rows = []
    for name, data, old, new in cases:
        old_s, new_s = [], []
        for _ in range(repeat):
            old_s.append(measure(lambda old=old, data=data: old(data), 1)[0])
            new_s.append(measure(lambda new=new, data=data: new(data), 1)[0])
        rows.append((name, statistics.median(old_s) / len(data) * 1e3, statistics.median(new_s) / len(data) * 1e3))
    return rows


def worst_cases(spec: PipelineSpec) -> list[tuple[str, bytes, Modality]]:
    """Payloads at (or next to) the spec's limits, the costliest each modality accepts."""
    img, aud = spec.modalities.image, spec.modalities.audio
    side = int(img.max_pixels ** 0.5)
    long_side = min(img.max_width, int((img.max_pixels * img.max_aspect_ratio) ** 0.5))
    short_side = int(long_side / img.max_aspect_ratio) + 1
    rate = costliest_rate(spec)
    seconds = min(aud.max_seconds, aud.max_bytes / (aud.max_sample_rate * aud.max_channels * 8) * 0.95)
    return [
        (f"JPEG {side}x{side} baseline", _photo(side, side, "JPEG", quality=90), Modality.IMAGE),
        (f"JPEG {side}x{side} progressive", _photo(side, side, "JPEG", quality=90, progressive=True), Modality.IMAGE),
        (f"JPEG {side}x{side} CMYK", _photo(side, side, "JPEG", mode="CMYK", quality=90), Modality.IMAGE),
        (f"PNG {side}x{side} RGBA gradient", _gradient(side, side, "PNG", mode="RGBA"), Modality.IMAGE),
        (f"WebP {side}x{side}", _photo(side, side, "WEBP", quality=80), Modality.IMAGE),
        (f"PNG {long_side}x{short_side} gradient (widest aspect)", _gradient(long_side, short_side, "PNG"),
         Modality.IMAGE),
        (f"WAV {rate} Hz (costliest ratio) mono PCM_16 1 s", _wav(rate, 1, 1.0, "PCM_16"), Modality.AUDIO),
        (f"WAV {aud.max_sample_rate} Hz {aud.max_channels} ch DOUBLE {seconds:.1f} s",
         _wav(aud.max_sample_rate, aud.max_channels, seconds, "DOUBLE"), Modality.AUDIO),
        (f"WAV {aud.min_sample_rate} Hz mono {aud.max_seconds:g} s", _wav(aud.min_sample_rate, 1, aud.max_seconds,
                                                                        "PCM_16"), Modality.AUDIO),
        (f"text of {spec.modalities.text.max_chars} emoji", ("🗼" * spec.modalities.text.max_chars).encode(),
         Modality.TEXT),
    ]


def bounds(spec: PipelineSpec, repeat: int) -> list[tuple[str, int, float, float]]:
    """(case, payload bytes, ms for one row, peak MB for one row)."""
    pre = {m: build_preprocessor(spec, m) for m in Modality}
    rows = []
    for name, raw, modality in worst_cases(spec):
        if len(raw) > getattr(getattr(spec.modalities, modality.value), "max_bytes", len(raw)):
            rows.append((f"{name} (refused: over max_bytes)", len(raw), float("nan"), float("nan")))
            continue
        try:
            pre[modality]([raw])
        except PreprocessError as exc:
            rows.append((f"{name} (refused: {exc.problem[:40]})", len(raw), float("nan"), float("nan")))
            continue
        # Cold: a caller rotating odd sample rates defeats the resampling-filter cache, so each call designs its own.
        seconds, peak = measure(lambda raw=raw, modality=modality: (_resampling_filter.cache_clear(),
                                                                     pre[modality]([raw])), repeat)
        rows.append((name, len(raw), seconds * 1e3, peak))
    return rows


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (the median is printed)")


def main(args: argparse.Namespace) -> int:
    """Print both tables."""
    spec = spec_of(args)
    print(f"spec {spec.source}: image size {spec.modalities.image.size}, audio {spec.modalities.audio.sample_rate} Hz")
    title = f"per row (median of {args.repeat} runs)"
    print(f"\n{title:<62}{'before ms':>10}{'after ms':>10}{'speed-up':>10}")
    for name, old, new in before_after(spec, args.repeat):
        print(f"{name:<62}{old:>10.3f}{new:>10.3f}{old / new:>9.1f}x")
    title = f"worst case, one row (best of {args.repeat})"
    print(f"\n{title:<62}{'bytes':>10}{'ms':>10}{'peak MB':>10}")
    for name, size, ms, peak in bounds(spec, args.repeat):
        print(f"{name:<62}{size:>10}{ms:>10.1f}{peak:>10.1f}")
    return 0
