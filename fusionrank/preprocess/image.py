"""Image: encoded JPEG/PNG/WebP -> normalised CHW float32, as the ResNet encoder expects.

Decode with Pillow, reject formats the spec does not allow and decoded sizes over the pixel limit *before*
decoding (a decompression bomb's header is enough to refuse it), apply EXIF orientation, convert to RGB, resize
the shorter side to `size` and centre-crop to `size x size`, scale to [0, 1] and normalise with the spec's mean/std.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from fusionrank.errors import PreprocessError
from fusionrank.spec import ImageSpec
from fusionrank.tensors import ITEM_INPUT, Modality


class ImagePreprocessor:
    input_name = ITEM_INPUT[Modality.IMAGE]

    def __init__(self, spec: ImageSpec):
        self.spec = spec
        self.mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)

    def decode(self, raw: bytes, name: str) -> Image.Image:
        spec = self.spec
        if not raw:
            raise PreprocessError(name, "image is empty")
        if len(raw) > spec.max_bytes:
            raise PreprocessError(name, f"image has {len(raw)} bytes; at most {spec.max_bytes} allowed")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(raw), formats=None)
                if image.format not in spec.formats:
                    raise PreprocessError(name, f"unsupported image format {image.format}; "
                                                f"allowed: {', '.join(spec.formats)}")
                width, height = image.size
                if width * height > spec.max_pixels:
                    raise PreprocessError(name, f"decoded size {width}x{height} = {width * height} pixels exceeds "
                                                f"the limit of {spec.max_pixels} (decompression bomb?)")
                image.load()
        except PreprocessError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PreprocessError(name, f"image too large to decode (decompression bomb): {exc}") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise PreprocessError(name, f"cannot decode image: {exc}") from None
        return image

    def to_array(self, image: Image.Image) -> np.ndarray:
        size = self.spec.size
        image = ImageOps.exif_transpose(image).convert("RGB")
        width, height = image.size
        scale = size / min(width, height)
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(resized, Image.Resampling.BILINEAR)
        left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (array - self.mean) / self.std

    def __call__(self, rows: list[bytes]) -> dict[str, np.ndarray]:
        arrays = [self.to_array(self.decode(raw, f"{self.input_name}[{i}]")) for i, raw in enumerate(rows)]
        return {"pixel_values": np.stack(arrays).astype(np.float32)}
