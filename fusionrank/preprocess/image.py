"""Image: encoded JPEG/PNG/WebP -> normalised CHW float32, as the ResNet encoder expects.

Decode with Pillow; reject formats the spec does not allow and headers over the spec's limits (bytes, width,
height, pixels, aspect ratio) *before* decoding, so memory and time per row are bounded (figures in
docs/preprocessing.md).
Apply EXIF orientation, convert to RGB, resize the shorter side to `size` and centre-crop to `size x size`, scale
to [0, 1] and normalise with the spec's mean/std.

Cheaper than a plain decode-resize-crop; images under four times the target size (the benchmark's) give the same
numbers as before:
- large JPEGs are decoded in Pillow's draft mode: libjpeg scales the DCT by 1/2, 1/4 or 1/8, keeping both sides at
  least twice the target so the final filter still anti-aliases (`Image.thumbnail`'s policy);
- large sources are first shrunk by an integer box filter (`Image.reduce`) that keeps them at least twice the
  target, then resized (`Image.resize(reducing_gap=...)`); the aspect-ratio limit bounds the resized image before
  the crop to `max_aspect_ratio * size**2` pixels;
- normalisation is a per-channel lookup table over the uint8 pixels (the float32 values of the old arithmetic), so
  every output value is one of 768 finite numbers.

Only the first frame of an animated PNG or WebP is decoded (Pillow decodes frames on demand), so the frame count
costs nothing and needs no limit.

Stateless: every call works on its own Image objects; the tables are read-only after construction.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps

from fusionrank.contract.errors import PreprocessError
from fusionrank.contract.spec import ImageSpec
from fusionrank.contract.tensors import ITEM_INPUT, Modality

# Decode or downscale by integer factors only while the source stays at least this many times the target size.
REDUCING_GAP = 2.0


class ImagePreprocessor:
    input_name = ITEM_INPUT[Modality.IMAGE]

    def __init__(self, spec: ImageSpec):
        self.spec = spec
        Image.init()  # register every format plugin now, not lazily from several threads at the first call
        mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1)
        std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1)
        levels = np.arange(256, dtype=np.float32).reshape(1, 256)
        self.table = np.ascontiguousarray((levels / 255.0 - mean) / std, dtype=np.float32)  # [3, 256]
        self.table.flags.writeable = False

    def check_header(self, image: Image.Image, name: str) -> None:
        """Refuse a format or declared size over the spec's limits (nothing is decoded yet)."""
        spec = self.spec
        if image.format not in spec.formats:
            raise PreprocessError(name, f"unsupported image format {image.format}; allowed: {', '.join(spec.formats)}")
        width, height = image.size
        if width > spec.max_width or height > spec.max_height:
            raise PreprocessError(name, f"image is {width}x{height}; at most {spec.max_width}x{spec.max_height} "
                                        "allowed")
        if width * height > spec.max_pixels:
            raise PreprocessError(name, f"decoded size {width}x{height} = {width * height} pixels exceeds the limit "
                                        f"of {spec.max_pixels} (decompression bomb?)")
        if min(width, height) < 1:
            raise PreprocessError(name, f"image is {width}x{height}: no pixels")
        if max(width, height) / min(width, height) > spec.max_aspect_ratio:
            raise PreprocessError(name, f"aspect ratio of {width}x{height} exceeds {spec.max_aspect_ratio:g}:1")

    @contextlib.contextmanager
    def _errors(self, name: str) -> Iterator[None]:
        """Pillow's failures to open or decode a payload, as PreprocessError naming `name`."""
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PreprocessError(name, f"image too large to decode (decompression bomb): {exc}") from None
        except Image.UnidentifiedImageError:  # only the allowed formats' parsers are tried (smaller attack surface)
            raise PreprocessError(name, f"unsupported image format or not an image; allowed: "
                                        f"{', '.join(self.spec.formats)}") from None
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
            raise PreprocessError(name, f"cannot decode image: {exc}") from None

    def open(self, raw: bytes, name: str) -> Image.Image:
        """The payload opened lazily (only its header read) and checked against the spec's limits; bad payloads raise
        PreprocessError naming `name`."""
        spec = self.spec
        if not raw:
            raise PreprocessError(name, "image is empty")
        if len(raw) > spec.max_bytes:
            raise PreprocessError(name, f"image has {len(raw)} bytes; at most {spec.max_bytes} allowed")
        with self._errors(name):
            image = Image.open(io.BytesIO(raw), formats=spec.formats)
        self.check_header(image, name)
        return image

    def header(self, raw: bytes, name: str) -> int:
        """Every check that needs no decoding (`open`); returns the pixels decoding would produce."""
        with self.open(raw, name) as image:
            return image.size[0] * image.size[1]

    def decode(self, raw: bytes, name: str) -> Image.Image:
        """The decoded image (JPEGs possibly at 1/2, 1/4 or 1/8 scale); bad payloads raise PreprocessError."""
        image = self.open(raw, name)
        with self._errors(name):
            if image.format == "JPEG":
                target = round(self.spec.size * REDUCING_GAP)
                image.draft("RGB", (target, target))
            image.load()
        return image

    def to_pixels(self, image: Image.Image) -> np.ndarray:
        """Upright RGB, shorter side resized to `size`, centre crop: uint8 [size, size, 3]."""
        size = self.spec.size
        image = ImageOps.exif_transpose(image).convert("RGB")
        width, height = image.size
        scale = size / min(width, height)
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(resized, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
        left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.uint8)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] scaled to [0, 1] and normalised per channel."""
        out = np.empty((pixels.shape[0], 3, *pixels.shape[1:3]), dtype=np.float32)
        for c in range(3):
            np.take(self.table[c], pixels[..., c], out=out[:, c])
        return out

    def __call__(self, rows: list[bytes]) -> dict[str, np.ndarray]:
        pixels = []
        for i, raw in enumerate(rows):
            name = f"{self.input_name}[{i}]"
            image = self.decode(raw, name)
            try:
                pixels.append(self.to_pixels(image))
            except (OSError, ValueError, SyntaxError, EOFError) as exc:  # e.g. a corrupt EXIF block
                raise PreprocessError(name, f"cannot decode image: {exc}") from None
        return {"pixel_values": self.normalise(np.stack(pixels))}
