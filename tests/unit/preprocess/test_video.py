"""Video preprocessing (PyAV): even frame sampling through the image preprocessing, and every kind of bad video
refused with a PreprocessError naming input and row, limits checked before any frame is decoded."""

from __future__ import annotations

import dataclasses
import io

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fusionrank.contract.errors import PreprocessError
from fusionrank.preprocess.video import VideoPreprocessor, encode_video, sample_indices, sniff_container

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 200, 30), (150, 40, 180), (240, 130, 30),
           (20, 20, 20), (240, 240, 240)]


def _frames(n: int, size=(64, 48)) -> list[Image.Image]:
    """n frames, frame i filled with COLOURS[i % 8]: which frames were sampled is visible in the pixels."""
    return [Image.new("RGB", size, COLOURS[i % len(COLOURS)]) for i in range(n)]


@pytest.fixture(scope="module")
def clips():
    return {"mp4": encode_video(_frames(8)), "webm": encode_video(_frames(8), container="webm"),
            "long": encode_video(_frames(24), fps=8), "big": encode_video(_frames(2, size=(320, 240))),
            "small": encode_video(_frames(2, size=(16, 16)), container="webm")}


def _pre(ci_spec, **video) -> VideoPreprocessor:
    return VideoPreprocessor(dataclasses.replace(ci_spec.modalities.video, **video), ci_spec.modalities.image)


def _mean_rgb(pre: VideoPreprocessor, pixels: np.ndarray) -> np.ndarray:
    """The mean colour of one preprocessed frame, back in 0..255."""
    spec = pre.image.spec
    return (pixels.mean(axis=(1, 2)) * np.array(spec.std) + np.array(spec.mean)) * 255


def test_sample_indices_are_segment_centres():
    assert sample_indices(8, 4) == [1, 3, 5, 7]
    assert sample_indices(3, 4) == [0, 1, 1, 2]  # shorter than K: frames repeat
    assert sample_indices(1, 3) == [0, 0, 0]
    assert sample_indices(100, 1) == [50]


@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_k_frames_sampled_evenly_through_the_image_preprocessing(ci_spec, clips, container):
    pre = _pre(ci_spec, frames=4)
    assert sniff_container(clips[container]) == container
    pixels = pre([clips[container], clips["mp4"]])["pixel_values"]
    size = ci_spec.modalities.image.size
    assert pixels.shape == (8, 3, size, size) and pixels.dtype == np.float32
    for k, index in enumerate([1, 3, 5, 7]):  # row 0's frames, in order
        assert np.abs(_mean_rgb(pre, pixels[k]) - COLOURS[index]).max() < 12, (k, index)
    # Each frame is exactly what the image preprocessing makes of that frame as a still.
    with av.open(io.BytesIO(clips[container])) as container_:
        still = [f.to_image() for f in container_.decode(video=0)][3]
    np.testing.assert_array_equal(pixels[1], pre.image.normalise(pre.image.to_pixels(still)[None])[0])


@pytest.mark.parametrize("case, video, spec, message", [
    ("empty", lambda c: b"", {}, "video is empty"),
    ("too many bytes", lambda c: c["mp4"], {"max_bytes": 1000}, "bytes; at most 1000"),
    ("not a video", lambda c: b"GIF89a" + bytes(200), {}, "unsupported video container"),
    ("container not allowed", lambda c: c["mp4"], {"containers": ("webm",)}, "unsupported video container mp4"),
    ("codec not allowed", lambda c: c["mp4"], {"codecs": ("vp9",)}, "unsupported video codec h264"),
    ("codec unknown to FFmpeg", lambda c: c["mp4"].replace(b"avc1", b"zzzz"), {}, "codec is unknown"),
    ("too many pixels", lambda c: c["big"], {"max_pixels": 320 * 240 - 1}, "320x240 = 76800 pixels"),
    ("too long", lambda c: c["long"], {"max_seconds": 2.0}, "3.0 s long"),
    ("too many frames (declared)", lambda c: c["mp4"], {"max_frames": 5}, "declares 8 frames"),
    ("too many frames (counted)", lambda c: c["webm"], {"max_frames": 5}, "more than 5 frames"),
    ("truncated", lambda c: c["mp4"][: len(c["mp4"]) // 2], {}, "cannot decode video"),
    ("garbage after the header", lambda c: c["mp4"][:32] + bytes(range(256)) * 8, {}, "cannot decode video"),
])
def test_bad_video_is_refused_before_decoding_naming_input_and_row(ci_spec, clips, monkeypatch, case, video, spec,
                                                                  message):
    pre = _pre(ci_spec, **spec)
    decoded, decode = [], VideoPreprocessor._decode_sampled

    def counting(self, container, stream, wanted, name):
        decoded.append(name)
        return decode(self, container, stream, wanted, name)

    monkeypatch.setattr(VideoPreprocessor, "_decode_sampled", counting)
    with pytest.raises(PreprocessError, match=message) as info:
        pre([clips["small"], video(clips)])  # row 0 is within every limit
    assert info.value.input_name == "item_video[1]", case
    assert decoded == ["item_video[0]"], f"{case}: row 1's frames were decoded before its limits were checked"
    # The route's header check (before a request waits to decode) refuses what the container declares, as above.
    try:
        frames = pre.header(video(clips), "item_video[1]")
    except PreprocessError as exc:
        assert str(exc) == str(info.value), case
    else:
        assert case in ("too many frames (counted)", "truncated", "garbage after the header") and frames > 0, case


def test_the_header_check_returns_the_frames_decoding_walks(ci_spec, clips):
    pre = _pre(ci_spec)
    assert pre.header(clips["mp4"], "item_video[0]") == 8, "the frames the MP4 declares"
    assert pre.header(clips["webm"], "item_video[0]") == ci_spec.modalities.video.max_frames, "WebM declares none"


def test_decoded_frames_are_checked_again_when_the_header_lies(ci_spec, clips, monkeypatch):
    """A header that declares small frames (stood in for by skipping the declared-size check) does not get big
    frames through: every decoded frame is checked again."""
    monkeypatch.setattr(VideoPreprocessor, "_check_declared", lambda *args: None)
    with pytest.raises(PreprocessError, match="video frame 0 is 320x240") as info:
        _pre(ci_spec, max_pixels=320 * 240 - 1)([clips["big"]])
    assert info.value.input_name == "item_video[0]"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_videos_decode_or_fail_cleanly(ci_spec, clips, data):
    """Any corruption of a valid clip gives K frames or a PreprocessError, never another exception."""
    raw = bytearray(clips[data.draw(st.sampled_from(["mp4", "webm"]))])
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(16, len(raw)))
    pre = _pre(ci_spec, frames=3)
    try:
        pixels = pre([bytes(raw[:cut])])["pixel_values"]
    except PreprocessError as exc:
        assert exc.input_name == "item_video[0]"
    else:
        assert pixels.shape[0] == 3 and np.isfinite(pixels).all()


def test_video_cost_prints_clip_and_still_figures(capsys):
    from fusionrank_cli.main import main
    from tests.paths import CI_SPEC

    assert main(["bench", "video", "--spec", str(CI_SPEC), "--clips", "2", "--repeats", "1"]) == 0
    clip, still = capsys.readouterr().out.strip().splitlines()
    assert clip.startswith("2 x clip:") and "3 encoder row(s)" in clip  # K = 3 in the CI spec
    assert still.startswith("2 x still") and "1 encoder row(s)" in still and "ms per item" in still
