"""A request's decoding cost, read from its payloads' headers before anything is decoded (`serving.admission.cost`).

The cost counts what the route would decode for the rows the cache does not hold: a still's width x height, the
samples read from a WAV (one clip at most: the decoder never reads further), the frames a video's container
declares (the decoder walks them all to sample K). A payload whose header cannot be read costs nothing here: the
preprocessing that follows refuses it with its own message naming the row.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fusionrank.contract.errors import PreprocessError
from fusionrank.contract.spec import CostBudgetSpec, Modality, PipelineSpec
from fusionrank.contract.tensors import ITEM_INPUT
from fusionrank.request.validation import ValidRequest

BUDGET_INPUT = "request"  # what a budget error names: the request as a whole, not one row


@dataclass(frozen=True)
class RequestCost:
    pixels: int = 0
    audio_samples: int = 0
    video_frames: int = 0

    def __add__(self, other: RequestCost) -> RequestCost:
        return RequestCost(self.pixels + other.pixels, self.audio_samples + other.audio_samples,
                           self.video_frames + other.video_frames)


def _image_pixels(raw: bytes) -> int:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:  # lazy: reads the header only
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return 0  # the image preprocessing refuses it with its own message naming the row (a bomb: its pixels)
    return max(0, width) * max(0, height)


def _audio_samples(raw: bytes, clip_seconds: float) -> int:
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(raw))
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OverflowError):
        return 0
    per_clip = int(math.ceil(clip_seconds * info.samplerate)) + 64  # what `AudioPreprocessor.read` reads at most
    return max(0, min(int(info.frames), per_clip)) * max(1, int(info.channels))


def _video_frames(raw: bytes, max_frames: int) -> int:
    import av

    try:
        with av.open(io.BytesIO(raw), mode="r") as container:
            streams = container.streams.video
            declared = int(streams[0].frames) if streams else 0
    except (av.FFmpegError, OSError, ValueError, IndexError):
        return 0
    return declared if declared > 0 else max_frames  # undeclared: the most the decoder would walk


def request_cost(spec: PipelineSpec, request: ValidRequest, rows: Mapping[Modality, Sequence[int]]) -> RequestCost:
    """The decoding cost of `rows` (per modality, the rows to decode) of a validated request."""
    cost = RequestCost()
    for modality, wanted in rows.items():
        column = request.rows[ITEM_INPUT[modality]]
        for row in wanted:
            if modality is Modality.IMAGE:
                pixels = _image_pixels(column[row]) if column[row] else 0
                video = request.videos[row] if request.videos is not None else b""
                frames = _video_frames(video, spec.modalities.video.max_frames) if video else 0
                cost += RequestCost(pixels=pixels, video_frames=frames)
            elif modality is Modality.AUDIO:
                cost += RequestCost(audio_samples=_audio_samples(column[row], spec.modalities.audio.clip_seconds))
    return cost


def check_budget(budget: CostBudgetSpec, cost: RequestCost) -> None:
    """Raise PreprocessError (answered INVALID_ARG) naming the budget a request's cost exceeds."""
    for name, unit in (("max_pixels", "decoded pixels"), ("max_audio_samples", "audio samples"),
                       ("max_video_frames", "video frames")):
        limit, spent = getattr(budget, name), getattr(cost, name.removeprefix("max_"))
        if limit and spent > limit:
            raise PreprocessError(BUDGET_INPUT, f"the request costs {spent} {unit} to decode (rows not in the "
                                                f"cache), over the budget serving.admission.cost.{name} = {limit}; "
                                                "send fewer or smaller payloads per request")
