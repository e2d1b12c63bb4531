"""Benchmark data: deterministic, truth known, attributes visible in their modality, split by user."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from PIL import Image

from fusionrank.model.synthetic_data import COLOURS, PITCHES_HZ, TEST, TOPICS, TRAIN, VAL, load_benchmark


def test_benchmark_shapes_split_and_truth(ci_spec):
    bench = load_benchmark(ci_spec)
    s = bench.sessions
    d = ci_spec.data
    assert bench.num_items == ci_spec.num_items
    assert s.candidates.shape == (d.num_users * d.sessions_per_user, d.candidates_per_session)
    assert s.history.shape[1] == ci_spec.ranker.history.length
    assert s.candidates.min() >= 1 and s.candidates.max() <= bench.num_items
    assert s.history.min() >= 0 and (s.history[:, -1] > 0).all()  # left-padded, never empty
    users = {k: set(s.user[s.split == k]) for k in (TRAIN, VAL, TEST)}
    assert not users[TRAIN] & users[TEST] and not users[VAL] & users[TEST] and users[TEST]
    # Clicks are drawn from the stored probabilities: the oracle separates them well.
    assert 0.75 < bench.oracle_auc(TEST) < 1.0
    assert abs(s.clicks.mean() - s.true_prob.mean()) < 0.05


def test_attributes_are_visible_in_their_modality(ci_spec):
    bench = load_benchmark(ci_spec)
    item = bench.item(3)
    assert any(w in item.title.split() for w in list(TOPICS.values())[item.topic].split())
    image = np.asarray(Image.open(io.BytesIO(item.image_bytes())).convert("RGB"), dtype=float)
    centre = image[image.shape[0] // 2, image.shape[1] // 2]
    assert np.abs(centre - np.array(list(COLOURS.values())[item.colour])).max() < 40
    samples, rate = sf.read(io.BytesIO(item.audio_bytes()))
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    spectrum = np.abs(np.fft.rfft(mono))
    peak_hz = np.argmax(spectrum) * rate / len(mono)
    assert abs(peak_hz - PITCHES_HZ[item.pitch]) / PITCHES_HZ[item.pitch] < 0.05


def test_video_items_carry_their_colour_in_moving_frames(ci_spec):
    import av

    bench = load_benchmark(ci_spec)
    videos = [it for it in bench.items if it.is_video]
    assert len(videos) == bench.num_items // 4 and bench.video_items.sum() == len(videos)
    assert {it.video_path.suffix for it in videos} == {".mp4", ".webm"}
    item = videos[1]
    with av.open(io.BytesIO(item.video_bytes())) as container:
        frames = [f.to_ndarray(format="rgb24").astype(float) for f in container.decode(video=0)]
    assert len(frames) == 8
    centres = []
    for frame in frames:
        shape = np.linalg.norm(frame - frame[0, 0], axis=2) > 60  # pixels that are not background
        assert np.abs(np.median(frame[shape], axis=0) - list(COLOURS.values())[item.colour]).max() < 40
        centres.append(np.argwhere(shape)[:, 1].mean())
    assert centres == sorted(centres) and centres[-1] - centres[0] > 20  # it moves left to right
    assert item.visual() == (b"", item.video_bytes()) and bench.item(1).visual() == (bench.item(1).image_bytes(), None)


def test_generation_is_deterministic(ci_spec, tmp_path, monkeypatch):
    first = load_benchmark(ci_spec)
    monkeypatch.setenv("FUSIONRANK_CACHE", str(tmp_path))
    second = load_benchmark(ci_spec)
    assert second.root != first.root
    np.testing.assert_array_equal(first.sessions.clicks, second.sessions.clicks)
    assert first.item(7).image_bytes() == second.item(7).image_bytes()
    assert first.item(7).audio_bytes() == second.item(7).audio_bytes()
    assert first.item(2).video_bytes() == second.item(2).video_bytes() and first.item(2).is_video
    assert "oracle AUC" in second.summary()
