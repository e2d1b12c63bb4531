"""Ragged candidates: the presence contract's rules and errors, preprocessing of present rows only, frame pooling,
the contract arrays a client builds, and the offline reference scoring incomplete and video candidates."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fusionrank.contract.errors import PreprocessError
from fusionrank.contract.spec import Modality
from fusionrank.contract.tensors import ITEM_VIDEO, MODALITY_PRESENT, request_arrays
from fusionrank.request.candidates import CandidatePreparer, check_presence, pool_rows, presence_patterns

TEXT, IMAGE, AUDIO = Modality.TEXT, Modality.IMAGE, Modality.AUDIO


def _png(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return buf.getvalue()


def _wav() -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def preparer(ci_spec):
    return CandidatePreparer(ci_spec)


def _request(n: int, present: np.ndarray | None = None):
    items = {TEXT: [b"red tent %d" % i for i in range(n)], IMAGE: [_png()] * n, AUDIO: [_wav()] * n}
    if present is not None:
        for j, m in enumerate((TEXT, IMAGE, AUDIO)):
            items[m] = [b if present[i, j] else b"" for i, b in enumerate(items[m])]
    return items


@pytest.mark.parametrize("change, name, message", [
    (lambda items, p, v: items[AUDIO].__setitem__(2, _wav()), "item_audio[2]", "marked absent .* has \\d+ bytes"),
    (lambda items, p, v: v.__setitem__(1, b"clip"), "item_video[1]", "image is marked absent .* video has 4 bytes"),
    (lambda items, p, v: p.__setitem__((3, slice(None)), False), "modality_present[3]", "no modality present"),
    (lambda items, p, v: items[IMAGE].__setitem__(0, b""), "item_image[0]", "image is empty and item_video is empty"),
])
def test_presence_rules_name_input_and_row(ci_spec, change, name, message):
    present = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=bool)
    items, videos = _request(4, present), [b""] * 4
    assert check_presence(ci_spec, items, present, videos).tolist() == present.tolist()
    change(items, present, videos)
    with pytest.raises(PreprocessError, match=message) as info:
        check_presence(ci_spec, items, present, videos)
    assert info.value.input_name == name


def test_presence_input_checks(ci_spec):
    items = _request(2)
    assert check_presence(ci_spec, items).all()  # no modality_present: every modality present
    for bad, message in ((np.ones((2, 3), np.int8), "expected BOOL, got int8"),
                         (np.ones((2, 2), bool), r"expected shape \[2, 3\] .*text, image, audio.* got \[2, 2\]")):
        with pytest.raises(PreprocessError, match=message) as info:
            check_presence(ci_spec, items, bad)
        assert info.value.input_name == MODALITY_PRESENT
    with pytest.raises(PreprocessError, match="3 rows, but the request has 2") as info:
        check_presence(ci_spec, items, None, [b""] * 3)
    assert info.value.input_name == ITEM_VIDEO
    no_video = ci_spec.with_overrides(modalities=__import__("dataclasses").replace(
        ci_spec.modalities, video=__import__("dataclasses").replace(ci_spec.modalities.video, enabled=False)))
    with pytest.raises(PreprocessError, match="disabled"):
        check_presence(no_video, items, None, [b""] * 2)


def test_only_present_rows_are_preprocessed_and_pooled_back(ci_spec, preparer, clip):
    present = np.array([[1, 0, 1], [1, 1, 0], [1, 1, 0], [0, 1, 1]], dtype=bool)
    items = _request(4, present)
    items[IMAGE][2] = b""  # row 2's image is its video alone; row 3 has a still and a video
    videos = [b"", b"", clip, clip]
    prepared = preparer(items, present, videos)
    k = ci_spec.modalities.video.frames
    assert prepared.owners[TEXT].tolist() == [0, 1, 2] and prepared.owners[AUDIO].tolist() == [0, 3]
    assert prepared.owners[IMAGE].tolist() == [1, 3] + [2] * k + [3] * k  # stills first, then every clip's K frames
    assert prepared.inputs[IMAGE]["pixel_values"].shape[0] == 2 + 2 * k
    assert prepared.inputs[AUDIO]["log_mel"].shape[0] == 2
    np.testing.assert_array_equal(prepared.mask(), present.astype(np.float32))
    calls = []

    def run(modality, inputs):  # a fake encoder: one number per input row, its row index
        calls.append(modality)
        return np.arange(len(next(iter(inputs.values()))), dtype=np.float32)[:, None].repeat(2, axis=1)

    text, image, audio = prepared.encode(run)
    assert calls == [TEXT, IMAGE, AUDIO]
    assert image[0].tolist() == [0, 0] and audio[1].tolist() == [0, 0]  # absent: zeros
    assert image[1, 0] == 0 and image[2, 0] == np.mean(np.arange(2, 2 + k))  # still alone, clip frames pooled
    assert image[3, 0] == pytest.approx(np.mean([1, *range(2 + k, 2 + 2 * k)]))  # the still is one more frame
    # No candidate has audio: the audio encoder is not run at all.
    text_only = np.array([[1, 0, 0], [1, 0, 0]], dtype=bool)
    calls.clear()
    prepared = preparer(_request(2, text_only), text_only)
    assert prepared.encode(run)[2].shape == (2, ci_spec.modalities.embedding_dim(AUDIO)) and calls == [TEXT]


def test_errors_name_the_requests_row_not_the_present_rows_index(preparer):
    present = np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=bool)
    items = _request(3, present)
    items[IMAGE][2] = b"not an image"
    with pytest.raises(PreprocessError, match="cannot decode image|not an image") as info:
        preparer(items, present)
    assert info.value.input_name == "item_image[2]"  # the image preprocessor saw it as its row 0
    items = _request(3, present)
    with pytest.raises(PreprocessError, match="video is empty|cannot decode video") as info:
        preparer(items, present, [b"", b"", b"\x1a\x45\xdf\xa3broken"])
    assert info.value.input_name == "item_video[2]"


def test_pool_rows_is_exact_for_single_rows():
    values = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    pooled = pool_rows(values, np.array([2, 0, 2, 2, 3]), 5)
    np.testing.assert_array_equal(pooled[0], values[1])
    np.testing.assert_array_equal(pooled[1], np.zeros(3))
    np.testing.assert_allclose(pooled[2], values[[0, 2, 3]].mean(0), rtol=1e-6)


def test_presence_patterns_cover_every_non_empty_subset():
    table = presence_patterns(3, 14)
    assert table[0].all() and table[6].tolist() == [True, False, False]  # complete first; text alone
    assert len({tuple(r) for r in table}) == 7 and table.any(axis=1).all()
    assert table[7].all()  # the cycle repeats


def test_request_arrays_say_absence_only_when_there_is_some(clip):
    complete = request_arrays({TEXT: [b"a", b"b"], IMAGE: [b"i", b"j"]}, np.zeros((2, 3), np.int64))
    assert set(complete) == {"item_text", "item_image", "user_history"}  # as before the contract grew
    arrays = request_arrays({TEXT: [b"a", None], IMAGE: [None, None]}, np.zeros((2, 3), np.int64), videos=[None, clip])
    assert arrays["item_image"][:, 0].tolist() == [b"", b""] and arrays["item_text"][1, 0] == b""
    assert arrays[MODALITY_PRESENT].tolist() == [[True, False], [False, True]]  # the video makes the image present
    assert arrays[ITEM_VIDEO][:, 0].tolist() == [b"", clip] and arrays[MODALITY_PRESENT].dtype == np.bool_


