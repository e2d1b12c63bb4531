"""Video: MP4/WebM bytes -> K evenly sampled frames, each preprocessed exactly like an image ([K, 3, size, size]).

Decoded with PyAV (FFmpeg with its codecs in the wheel). Nothing is decoded before the limits are checked:
1. the container is recognised by its magic bytes (ISO-BMFF `ftyp`, EBML) and opened with that demuxer only, so
   FFmpeg's format probing never reaches demuxers that open other files or URLs (HLS, concat);
2. the sizes the container declares (codec, width x height, duration, frame count) are checked against the spec;
3. one demux pass counts the frames without decoding them (bounded by `max_frames`, timestamps by `max_seconds`);
4. one decode pass converts only the K sampled frames, checking every frame's size again (a stream may change
   resolution midway or lie in its header).
Frame k of K is the centre of the k-th of K equal segments: frame floor((k + 0.5) * n / K) of the n frames; a
video shorter than K frames repeats frames. Each sampled frame is resized, cropped and normalised by the image
preprocessing, exactly as a still. Bad video raises `PreprocessError` naming the input and row.

Stateless like the other preprocessors: every call opens its own containers, so one instance serves many threads.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence

import av
import numpy as np
from PIL import Image

from fusionrank.contract.errors import PreprocessError
from fusionrank.contract.spec import ImageSpec, VideoSpec
from fusionrank.contract.tensors import ITEM_VIDEO
from fusionrank.preprocess.image import ImagePreprocessor

# Our container names -> FFmpeg demuxer names, and the encoder `encode_video` writes each with.
_DEMUXERS = {"mp4": "mp4", "webm": "matroska"}
_ENCODERS = {"mp4": "libx264", "webm": "libvpx-vp9"}
_DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError, IndexError, RuntimeError)


def sniff_container(raw: bytes) -> str | None:
    """'mp4' (ISO base media file: a `ftyp` box first), 'webm' (EBML header: WebM/Matroska), else None."""
    if raw[4:8] == b"ftyp":
        return "mp4"
    if raw[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    return None


def encode_video(frames: Sequence[Image.Image], container: str = "mp4", fps: int = 8) -> bytes:
    """Encode RGB frames of one size as a small MP4 (H.264) or WebM (VP9); one encoder thread, so the bytes are
    the same on every run (the benchmark catalogue and the tests need that)."""
    buf = io.BytesIO()
    width, height = frames[0].size
    # bitexact: the Matroska muxer otherwise writes a random segment UID into every file
    with av.open(buf, mode="w", format=container, options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(_ENCODERS[container], rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"threads": "1", **({"preset": "veryfast", "crf": "20"} if container == "mp4" else {})}
        for image in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(image.convert("RGB"))))
        out.mux(stream.encode())
    return buf.getvalue()


def sample_indices(n: int, k: int) -> list[int]:
    """K frame indices spread evenly over n frames: the centre of each of K equal segments."""
    return [min(n - 1, int((i + 0.5) * n / k)) for i in range(k)]


class VideoPreprocessor:
    input_name = ITEM_VIDEO

    def __init__(self, spec: VideoSpec, image: ImageSpec):
        self.spec = spec
        self.image = ImagePreprocessor(image)

    def _open(self, raw: bytes, fmt: str, name: str):
        container = av.open(io.BytesIO(raw), mode="r", format=_DEMUXERS[fmt])
        if not container.streams.video:
            container.close()
            raise PreprocessError(name, "the container has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # no FFmpeg decoder for the codec the header names (e.g. a corrupt fourcc)
            container.close()
            raise PreprocessError(name, "the video stream's codec is unknown")
        stream.codec_context.thread_count = 1  # the serving stubs already keep every core busy
        return container, stream

    def _check_declared(self, container, stream, name: str) -> None:
        """Refuse on what the container says, before any frame is decoded."""
        spec = self.spec
        codec = stream.codec_context.codec.canonical_name
        if codec not in spec.codecs:
            raise PreprocessError(name, f"unsupported video codec {codec}; allowed: {', '.join(spec.codecs)}")
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise PreprocessError(name, f"video declares no frame size ({width}x{height})")
        if width * height > spec.max_pixels:
            raise PreprocessError(name, f"video frames are {width}x{height} = {width * height} pixels; at most "
                                        f"{spec.max_pixels} allowed")
        seconds = None
        if container.duration is not None:
            seconds = container.duration / av.time_base
        elif stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
            raise PreprocessError(name, f"video declares a duration of {seconds} s")
        if seconds is not None and seconds > spec.max_seconds:
            raise PreprocessError(name, f"video is {seconds:.1f} s long; at most {spec.max_seconds:g} s allowed")
        if stream.frames > spec.max_frames:
            raise PreprocessError(name, f"video declares {stream.frames} frames; at most {spec.max_frames} allowed")

    def _count_frames(self, container, stream, name: str) -> int:
        """Frames in the stream, from its packets (demuxed, not decoded)."""
        spec, count = self.spec, 0
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream flush packet
                continue
            count += 1
            if count > spec.max_frames:
                raise PreprocessError(name, f"video has more than {spec.max_frames} frames")
            if packet.pts is not None and packet.time_base is not None:
                at = float(packet.pts * packet.time_base)
                if not math.isfinite(at) or at > spec.max_seconds:
                    raise PreprocessError(name, f"video has a frame at {at:.1f} s; at most {spec.max_seconds:g} s "
                                                "allowed")
        if count == 0:
            raise PreprocessError(name, "video has no frames")
        return count

    def _decode_sampled(self, container, stream, wanted: list[int], name: str) -> list[Image.Image]:
        spec = self.spec
        keep, picked, last = set(wanted), {}, None
        for i, frame in enumerate(container.decode(stream)):
            if i >= spec.max_frames:
                raise PreprocessError(name, f"video decodes to more than {spec.max_frames} frames")
            if frame.width * frame.height > spec.max_pixels:
                raise PreprocessError(name, f"video frame {i} is {frame.width}x{frame.height}; at most "
                                            f"{spec.max_pixels} pixels allowed")
            last = frame
            if i in keep:
                picked[i] = frame.to_image()
        if last is None:
            raise PreprocessError(name, "no frame of the video could be decoded")
        # A stream that decodes to fewer frames than it has packets: the missing picks repeat its last frame.
        fallback = last.to_image() if len(picked) < len(keep) else None
        return [picked.get(i, fallback) for i in wanted]

    @staticmethod
    @contextlib.contextmanager
    def _failures(name: str) -> Iterator[None]:
        """FFmpeg's failures inside the block as PreprocessError naming `name`."""
        try:
            yield
        except PreprocessError:
            raise
        except _DECODE_ERRORS as exc:
            raise PreprocessError(name, f"cannot decode video: {exc}") from None

    @contextlib.contextmanager
    def _declared(self, raw: bytes, name: str) -> Iterator[tuple[str, object, object]]:
        """The container format, opened container and video stream, once everything the container declares has
        passed the spec's limits (nothing decoded); FFmpeg's failures inside the block raise PreprocessError."""
        spec = self.spec
        if not raw:
            raise PreprocessError(name, "video is empty")
        if len(raw) > spec.max_bytes:
            raise PreprocessError(name, f"video has {len(raw)} bytes; at most {spec.max_bytes} allowed")
        fmt = sniff_container(raw)
        if fmt is None or fmt not in spec.containers:
            raise PreprocessError(name, f"unsupported video container{f' {fmt}' if fmt else ''}; allowed: "
                                        f"{', '.join(spec.containers)}")
        with self._failures(name):
            container, stream = self._open(raw, fmt, name)
            with container:
                self._check_declared(container, stream, name)
                yield fmt, container, stream

    def header(self, raw: bytes, name: str) -> int:
        """Every check that needs no decoding (container, codec, frame size, duration and frame count as declared);
        returns the frames decoding walks to sample K: the declared count, `max_frames` where none is declared."""
        with self._declared(raw, name) as (_, _, stream):
            return stream.frames if stream.frames > 0 else self.spec.max_frames

    def frames(self, raw: bytes, name: str) -> list[Image.Image]:
        """The K sampled frames of one video, as RGB images."""
        with self._declared(raw, name) as (fmt, container, stream):
            count = self._count_frames(container, stream, name)
            wanted = sample_indices(count, self.spec.frames)
        with self._failures(name):
            container, stream = self._open(raw, fmt, name)
            with container:
                return self._decode_sampled(container, stream, wanted, name)

    def __call__(self, rows: list[bytes]) -> dict[str, np.ndarray]:
        """pixel_values [len(rows) * K, 3, size, size]: the K frames of row 0, then of row 1, ..."""
        pixels = [self.image.to_pixels(image) for i, raw in enumerate(rows)
                  for image in self.frames(raw, f"{self.input_name}[{i}]")]
        if not pixels:
            size = self.image.spec.size
            return {"pixel_values": np.zeros((0, 3, size, size), dtype=np.float32)}
        return {"pixel_values": self.image.normalise(np.stack(pixels))}
