"""The route with ragged candidates, without a server: absent rows never reach an encoder, a video's K frames go to
the image encoder and come back pooled, and presence errors answer their own request alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from fusionrank.contract.spec import Modality
from fusionrank.contract.tensors import CLICK_PROBABILITY, request_arrays
from fusionrank.preprocess.video import encode_video
from fusionrank.route.members import RouteError, Status
from fusionrank.route.stages import RankingRoute, RouteRequest

from .test_route import Members, _request

TEXT, IMAGE, AUDIO = Modality.TEXT, Modality.IMAGE, Modality.AUDIO


class Recording(Members):
    """Members that also keep every call's inputs."""

    def __init__(self, spec):
        super().__init__(spec)
        self.inputs: list[tuple[str, dict]] = []

    async def __call__(self, model, inputs, outputs, deadline=None):
        self.inputs.append((model, inputs))
        return await super().__call__(model, inputs, outputs)


def _ragged(spec, clip):
    """Four candidates: complete; no audio; title only; a video (no still) with title and audio."""
    base = _request(spec, 4)
    items = {m: [bytes(v) for v in base[f"item_{m.value}"][:, 0]] for m in (TEXT, IMAGE, AUDIO)}
    items[AUDIO][1] = items[AUDIO][2] = items[IMAGE][2] = items[IMAGE][3] = None
    return request_arrays(items, base["user_history"], videos=[None, None, None, clip])


def _rank(route, *inputs):
    return asyncio.run(route.rank([RouteRequest(arrays) for arrays in inputs]))


def test_absent_rows_never_reach_an_encoder_and_video_frames_are_pooled(ci_spec, preparer, clip):
    members = Recording(ci_spec)
    route = RankingRoute(ci_spec, preparer, members, log_error=print)
    (result,) = _rank(route, _ragged(ci_spec, clip))
    assert not isinstance(result, RouteError), result
    frames = ci_spec.modalities.video.frames
    assert sorted(members.calls) == sorted([("text_encoder", 4), ("image_encoder", 2 + frames),
                                            ("audio_encoder", 2), ("fusion_ranker", 4)])
    image_rows = dict(members.inputs)["image_encoder"]["pixel_values"]
    ranker = dict(members.inputs)["fusion_ranker"]
    np.testing.assert_array_equal(ranker["modality_mask"], [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    image = ranker["image_embedding"][:, 0]
    expected_frames = image_rows[2:].reshape(frames, -1).mean(1).mean()  # the stand-in encoder: mean pixel
    assert image[2] == 0 and image[3] == pytest.approx(expected_frames, rel=1e-5)
    assert image[:2] == pytest.approx([image_rows[0].mean(), image_rows[1].mean()], rel=1e-5)
    assert (ranker["audio_embedding"][1:3] == 0).all() and (ranker["audio_embedding"][[0, 3], 0] != 0).all()
    assert result[CLICK_PROBABILITY].shape == (4, 1)


def test_presence_errors_answer_their_request_alone(ci_spec, preparer, clip):
    good = _ragged(ci_spec, clip)
    marked_present_but_corrupt = {**good, "item_audio": good["item_audio"].copy()}
    marked_present_but_corrupt["item_audio"][0, 0] = b"RIFF\x10\x00\x00\x00WAVEjunk"
    nothing_present = {**good, "modality_present": good["modality_present"].copy(),
                       "item_text": good["item_text"].copy()}
    nothing_present["modality_present"][2] = False
    nothing_present["item_text"][2, 0] = b""
    payload_but_absent = {**good, "item_audio": good["item_audio"].copy()}
    payload_but_absent["item_audio"][1, 0] = good["item_audio"][0, 0]
    members = Members(ci_spec)
    route = RankingRoute(ci_spec, preparer, members, log_error=print)
    results = _rank(route, good, marked_present_but_corrupt, nothing_present, payload_but_absent, good)
    assert not isinstance(results[0], RouteError) and not isinstance(results[4], RouteError)
    np.testing.assert_array_equal(results[0][CLICK_PROBABILITY], results[4][CLICK_PROBABILITY])
    for result, start in zip(results[1:4], ("item_audio[0]", "modality_present[2]: the candidate has no modality",
                                            "item_audio[1]: audio is marked absent")):
        assert isinstance(result, RouteError) and result.status is Status.INVALID_ARG
        assert result.message.startswith(start), result.message


def test_with_a_cache_absent_rows_are_not_looked_up_and_a_clip_is_keyed_by_its_bytes(ci_spec, preparer, clip):
    from .test_route_cache import _cache

    cache = _cache(ci_spec)
    members = Members(ci_spec)
    route = RankingRoute(ci_spec, preparer, members, log_error=print, cache=cache)
    request = _ragged(ci_spec, clip)
    (first,) = _rank(route, request)
    stats = cache.stats()
    # Present rows only: text 4, image 3 (two stills, one clip), audio 2.
    assert {m: stats.misses[m] for m in (TEXT, IMAGE, AUDIO)} == {TEXT: 4, IMAGE: 3, AUDIO: 2}
    members.calls.clear()
    (second,) = _rank(route, request)
    assert [m for m, _ in members.calls] == ["fusion_ranker"], "every present row was a hit, the clip too"
    np.testing.assert_array_equal(second[CLICK_PROBABILITY], first[CLICK_PROBABILITY])
    other = encode_video([Image.new("RGB", (32, 32), c) for c in ((250, 250, 0), (0, 250, 250), (90, 9, 9))])
    members.calls.clear()
    changed = {**request, "item_video": request["item_video"].copy()}
    changed["item_video"][3, 0] = other
    (third,) = _rank(route, changed)
    assert sorted(members.calls) == [("fusion_ranker", 4), ("image_encoder", ci_spec.modalities.video.frames)]
    assert third[CLICK_PROBABILITY][3, 0] != first[CLICK_PROBABILITY][3, 0]


def test_a_clip_key_rebuilt_as_a_still_payload_is_validated_before_and_after_the_clip_was_served(ci_spec, preparer,
                                                                                                 clip):
    """Issue 19: a video candidate's key hashes bytes anybody can rebuild (`image_cache_payload`); sent as
    `item_image`, they must be decoded (and refused as no image) whether or not the clip was served before: the
    still and frames kinds are separate key namespaces, so a hit of one kind never skips the other's validation."""
    from fusionrank.request.candidates import image_cache_payload

    from .test_route_cache import _cache

    cache = _cache(ci_spec)
    route = RankingRoute(ci_spec, preparer, Members(ci_spec), log_error=print, cache=cache)
    video_request = _ragged(ci_spec, clip)
    base = _request(ci_spec, 4)
    items = {m: [bytes(v) for v in base[f"item_{m.value}"][:, 0]] for m in (TEXT, IMAGE, AUDIO)}
    items[AUDIO][3] = bytes(video_request["item_audio"][3, 0])
    items[TEXT][3] = bytes(video_request["item_text"][3, 0])
    items[IMAGE][3] = image_cache_payload(ci_spec, b"", clip)  # what the clip's key hashes, as a still
    forged = request_arrays(items, base["user_history"])
    for moment in ("before", "after"):
        (result,) = _rank(route, forged)
        assert isinstance(result, RouteError) and result.status is Status.INVALID_ARG, (moment, result)
        assert result.message.startswith("item_image[3]"), (moment, result.message)
        if moment == "before":
            (served,) = _rank(route, video_request)
            assert not isinstance(served, RouteError), served
