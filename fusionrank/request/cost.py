"""A request's decoding cost, read from its payloads' headers before anything is decoded (`serving.admission.cost`).

The cost counts what the route would decode for the rows the cache does not hold: a still's width x height, the
samples read from a WAV (one clip at most: the decoder never reads further), the frames a video's container
declares (the decoder walks them all to sample K). Reading it runs every check the preprocessors make without
decoding (format, declared sizes, duration, UTF-8, byte limits; their `header`), so a payload they would refuse is
refused here, with the same message naming the row, before its request waits for a decoding slot: a bad request
gets INVALID_ARGUMENT even from a server too busy to decode it, never an UNAVAILABLE its caller would retry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fusionrank.contract.errors import PreprocessError
from fusionrank.contract.spec import CostBudgetSpec, Modality
from fusionrank.contract.tensors import ITEM_INPUT, ITEM_VIDEO
from fusionrank.request.validation import RequestPreprocessor, ValidRequest

BUDGET_INPUT = "request"  # what a budget error names: the request as a whole, not one row


@dataclass(frozen=True)
class RequestCost:
    pixels: int = 0
    audio_samples: int = 0
    video_frames: int = 0

    def __add__(self, other: RequestCost) -> RequestCost:
        return RequestCost(self.pixels + other.pixels, self.audio_samples + other.audio_samples,
                           self.video_frames + other.video_frames)


def request_cost(preparer: RequestPreprocessor, request: ValidRequest,
                 rows: Mapping[Modality, Sequence[int]]) -> RequestCost:
    """The decoding cost of `rows` (per modality, the rows to decode) of a validated request, after each row's
    checks that need no decoding (the preprocessors' `header`): raises PreprocessError naming the first bad row."""
    cost = RequestCost()
    for modality, wanted in rows.items():
        name = ITEM_INPUT[modality]
        column, header = request.rows[name], preparer.preprocessors[modality].header
        for row in wanted:
            if modality is Modality.IMAGE:
                still = column[row] or request.videos is None  # without item_video an empty still is refused
                pixels = header(column[row], f"{name}[{row}]") if still else 0
                video = request.videos[row] if request.videos is not None else b""
                frames = preparer.candidates.video.header(video, f"{ITEM_VIDEO}[{row}]") if video else 0
                cost += RequestCost(pixels=pixels, video_frames=frames)
            elif modality is Modality.AUDIO:
                cost += RequestCost(audio_samples=header(column[row], f"{name}[{row}]"))
            else:
                header(column[row], f"{name}[{row}]")
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
