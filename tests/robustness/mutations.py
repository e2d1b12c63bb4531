"""Hostile payloads for the fuzzers: valid seeds of every accepted kind, and mutations of them.

A mutation is plain data (`Op`), so Hypothesis can draw and shrink it (`tests.robustness.fuzz`) and a seeded RNG can
draw the same kinds for the server fuzzer (`tests.robustness.fuzz_server`). Besides blind byte edits, `FIELD` rewrites a
header field that decoders trust (PNG/JPEG/WebP width and height, WAV channels, rate, bit depth and chunk sizes) with an
extreme value: the class of input that once made resampling allocate in proportion to a declared sample rate.
`catalogue()` lists the hand-made bad inputs every run starts with.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import soundfile as sf
from PIL import Image

from fusionrank.contract.spec import Modality

FLIP, SET, TRUNCATE, INSERT, DELETE, FIELD, SPLICE = "flip", "set", "truncate", "insert", "delete", "field", "splice"
OPS = (FLIP, SET, TRUNCATE, INSERT, DELETE, FIELD, SPLICE)
# Values a header field is set to: zero, one, sign and width boundaries, and primes (a prime sample rate shares no
# factor with the target rate: the worst case of polyphase resampling).
EXTREMES = (0, 1, 2, 3, 7, 255, 256, 8191, 0x7FFF, 0x8000, 0xFFFF, 65521, 0x10000, 1000003, 0x7FFFFFFF, 0x80000000,
            0xFFFFFFFF)


@dataclass(frozen=True)
class Op:
    kind: str
    position: int  # taken modulo the payload length (or the number of header fields for FIELD)
    value: int = 0  # a byte, a length, a bit index or a field value, by kind
    data: bytes = b""  # inserted or spliced bytes


def _png_fields(raw: bytes) -> list[tuple[int, str]]:
    return [(16, ">I"), (20, ">I"), (24, ">B"), (25, ">B")] if raw[:8] == b"\x89PNG\r\n\x1a\n" else []


def _jpeg_fields(raw: bytes) -> list[tuple[int, str]]:
    fields = []
    i = 2
    while raw[:2] == b"\xff\xd8" and i + 9 < len(raw) and raw[i] == 0xFF:
        marker, length = raw[i + 1], struct.unpack(">H", raw[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame: height, width, components
            fields += [(i + 5, ">H"), (i + 7, ">H"), (i + 9, ">B")]
        fields.append((i + 2, ">H"))  # the segment length itself
        i += 2 + length
    return fields


def _riff_fields(raw: bytes) -> list[tuple[int, str]]:
    if raw[:4] != b"RIFF":
        return []
    fields = [(4, "<I")]
    i = 12
    while i + 8 <= len(raw):
        chunk, size = raw[i:i + 4], struct.unpack("<I", raw[i + 4:i + 8])[0]
        fields.append((i + 4, "<I"))
        if chunk == b"fmt ":  # format tag, channels, rate, byte rate, block align, bits per sample
            fields += [(i + 8, "<H"), (i + 10, "<H"), (i + 12, "<I"), (i + 16, "<I"), (i + 20, "<H"), (i + 22, "<H")]
        elif chunk in (b"VP8X", b"VP8L", b"VP8 "):  # WebP canvas / bitstream sizes
            fields += [(i + 12, "<H"), (i + 14, "<H"), (i + 9, "<I")]
        i += 8 + size + (size & 1)
    return fields


def _fix_png_crc(raw: bytes) -> bytes:
    """A PNG's IHDR with its CRC recomputed, so a rewritten width or height reaches the decoder's size checks."""
    if raw[:8] != b"\x89PNG\r\n\x1a\n" or len(raw) < 33:
        return raw
    return raw[:29] + struct.pack(">I", zlib.crc32(raw[12:29])) + raw[33:]


def header_fields(raw: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of the header fields a decoder trusts, for PNG, JPEG, WAV and WebP payloads."""
    fields = _png_fields(raw) or _jpeg_fields(raw) or _riff_fields(raw)
    return [(offset, fmt) for offset, fmt in fields if offset + struct.calcsize(fmt) <= len(raw)]


def apply(raw: bytes, op: Op, other: bytes = b"") -> bytes:
    """`raw` with one mutation applied (`other` is the payload a SPLICE takes its tail from)."""
    n = len(raw)
    if op.kind == FIELD:
        fields = header_fields(raw)
        if not fields:
            return raw
        offset, fmt = fields[op.position % len(fields)]
        width = struct.calcsize(fmt)
        return _fix_png_crc(raw[:offset] + struct.pack(fmt, op.value % (1 << (8 * width))) + raw[offset + width:])
    if op.kind == INSERT:
        at = op.position % (n + 1)
        return raw[:at] + op.data + raw[at:]
    if op.kind == SPLICE:
        at = op.position % (n + 1)
        return raw[:at] + (other[len(other) // 2:] if other else op.data)
    if n == 0:
        return raw
    at = op.position % n
    if op.kind == FLIP:
        return raw[:at] + bytes([raw[at] ^ (1 << (op.value % 8))]) + raw[at + 1:]
    if op.kind == SET:
        return raw[:at] + bytes([op.value % 256]) + raw[at + 1:]
    if op.kind == TRUNCATE:
        return raw[:at]
    if op.kind == DELETE:
        return raw[:at] + raw[at + 1 + op.value % 64:]
    raise ValueError(f"unknown mutation {op.kind!r}; known: {', '.join(OPS)}")


def mutate(raw: bytes, ops: list[Op], other: bytes = b"") -> bytes:
    """`raw` with every mutation of `ops` applied in order."""
    for op in ops:
        raw = apply(raw, op, other)
    return raw


def random_ops(rng: np.random.Generator, count: int) -> list[Op]:
    """`count` mutations drawn from a seeded RNG (the server fuzzer's counterpart of the Hypothesis strategy)."""
    ops = []
    for _ in range(count):
        kind = str(rng.choice(OPS))
        value = int(rng.choice(EXTREMES)) if kind == FIELD and rng.random() < 0.7 else int(rng.integers(0, 1 << 32))
        data = rng.bytes(int(rng.integers(1, 64))) if kind in (INSERT, SPLICE) else b""
        ops.append(Op(kind, int(rng.integers(0, 1 << 20)), value, data))
    return ops


def _image(mode: str, size: tuple[int, int], fmt: str, **kw) -> bytes:
    rng = np.random.default_rng(size[0] * 31 + size[1])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _wav(rate: int, channels: int, subtype: str, seconds: float = 0.3) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.4 * np.sin(2 * np.pi * 440 * t)
    buf = io.BytesIO()
    sf.write(buf, np.repeat(tone[:, None], channels, axis=1), rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def seeds() -> dict[Modality, list[bytes]]:
    """Small valid payloads of every kind the preprocessors accept (formats, modes, rates, sample formats)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: exercises the EXIF path
    images = [_image("RGB", (40, 30), "JPEG"), _image("L", (24, 36), "JPEG"),
              _image("RGB", (48, 40), "JPEG", exif=exif), _image("CMYK", (20, 20), "JPEG"),
              _image("RGB", (30, 20), "PNG"), _image("RGBA", (16, 24), "PNG"), _image("P", (20, 20), "PNG"),
              _image("I;16", (12, 12), "PNG"), _image("RGB", (30, 30), "WEBP"),
              _image("RGBA", (20, 30), "WEBP", lossless=True)]
    audio = [_wav(16000, 1, "PCM_16"), _wav(22050, 2, "PCM_16"), _wav(8000, 1, "PCM_U8"), _wav(44100, 1, "FLOAT"),
             _wav(48000, 6, "PCM_24"), _wav(11025, 1, "DOUBLE"), _wav(16000, 1, "ULAW"), _wav(32000, 2, "PCM_32")]
    texts = ["hiking boots", "Café crème brûlée", "東京タワー 🗼 souvenir", "x " * 100, "tab\tand\nnewline",
             "\u200bzero\u200dwidth", "a"]
    return {Modality.TEXT: [t.encode() for t in texts], Modality.IMAGE: images, Modality.AUDIO: audio}


def _png_claiming(width: int, height: int) -> bytes:
    raw = _image("RGB", (4, 4), "PNG")
    return _fix_png_crc(raw[:16] + struct.pack(">II", width, height) + raw[24:])


def _wav_with(samples: np.ndarray, subtype: str = "FLOAT", rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def catalogue() -> list[tuple[str, Modality, bytes]]:
    """Hand-made bad inputs: (description, modality, payload), each to be refused with INVALID_ARGUMENT."""
    wav = _wav(16000, 1, "PCM_16")
    absurd_rate = wav[:24] + struct.pack("<II", 2_000_000_000, 4_000_000_000) + wav[32:]
    nan, inf = np.zeros(1600, dtype=np.float32), np.zeros(1600, dtype=np.float32)
    nan[100], inf[100] = np.nan, np.inf
    huge = np.full(1600, 3e38, dtype=np.float32)
    return [
        ("PNG claiming 50000x50000 (decompression bomb)", Modality.IMAGE, _png_claiming(50000, 50000)),
        ("PNG claiming 1x100000 (extreme aspect ratio)", Modality.IMAGE, _png_claiming(1, 100000)),
        ("PNG 400x20 (aspect ratio 20)", Modality.IMAGE, _image("RGB", (400, 20), "PNG")),
        ("PNG claiming 9000x100 (width over the limit)", Modality.IMAGE, _png_claiming(9000, 100)),
        ("GIF (format not allowed)", Modality.IMAGE, _image("RGB", (8, 8), "GIF")),
        ("WAV with a 2 GHz sample rate", Modality.AUDIO, absurd_rate),
        ("WAV at 4 kHz (rate under the limit)", Modality.AUDIO, _wav(4000, 1, "PCM_16")),
        ("WAV with 12 channels", Modality.AUDIO, _wav(16000, 12, "PCM_16", seconds=0.05)),
        ("WAV in IMA ADPCM (compressed sample format)", Modality.AUDIO, _wav(16000, 1, "IMA_ADPCM")),
        ("float WAV with a NaN sample", Modality.AUDIO, _wav_with(nan)),
        ("float WAV with an infinite sample", Modality.AUDIO, _wav_with(inf)),
        ("float WAV with samples of 3e38", Modality.AUDIO, _wav_with(huge)),
        ("text of invalid UTF-8", Modality.TEXT, b"caf\xe9 \xff\xfe"),
        ("empty text", Modality.TEXT, b""),
    ]
