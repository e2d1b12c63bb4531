"""The faster, stateless preprocessing against the implementation it replaced (`benchmarks.preprocess_baseline`),
the cache keys that follow it, and every preprocessor called from many threads at once."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from benchmarks.preprocess_baseline import previous_clip, previous_image, previous_log_mel
from benchmarks.preprocess_baseline import previous_text as previous_text_of
from fusionrank.contract.spec import Modality
from fusionrank.contract.tensors import request_arrays
from fusionrank.preprocess import build_preprocessor, validate_history
from fusionrank.request.validation import RequestPreprocessor


@pytest.fixture(scope="module")
def bench(ci_spec):
    from fusionrank.model.synthetic_data import load_benchmark

    return load_benchmark(ci_spec)


@pytest.fixture(scope="module")
def text(ci_spec):
    return build_preprocessor(ci_spec, Modality.TEXT)


@pytest.fixture(scope="module")
def previous_text(ci_spec):
    from fusionrank.contract.paths import resolve_text_checkpoint

    spec = ci_spec.modalities.text
    return previous_text_of(spec, resolve_text_checkpoint(spec.encoder.checkpoint))


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_text_ids_and_masks_equal_the_previous_tokenizer_calls(text, previous_text, bench):
    titles = [bench.item(i).title for i in range(1, 121)]
    corpus = [titles[i:i + 8] for i in range(0, len(titles), 8)]
    corpus += [[" ".join(titles[:k])] for k in (1, 3, 5, 8, 12, 30)]  # every bucket and truncation
    corpus += [["Café crème brûlée", "東京タワー 🗼", "ÅNGSTRÖM ﬁne", "tab\tnew\nline", "\u200bzero width"],
               ["a"], ["word " * 14, "word " * 15, "word " * 16]]  # around the 16-token boundary
    for texts in corpus:
        assert _same(text([t.encode() for t in texts]), previous_text(texts)), texts


@settings(max_examples=150, derandomize=True, deadline=None, database=None)
@given(st.lists(st.text(min_size=1, max_size=300).filter(str.strip), min_size=1, max_size=4))
def test_text_equals_the_previous_tokenizer_calls_on_any_text(text, previous_text, texts):
    assert _same(text([t.encode() for t in texts]), previous_text(texts))


def _photo(width: int, height: int, fmt: str) -> bytes:
    rng = np.random.default_rng(width + height)
    small = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((width, height), Image.Resampling.BICUBIC).save(buf, format=fmt)
    return buf.getvalue()


def test_image_equals_the_previous_pipeline_below_four_times_the_target(ci_spec, bench):
    pre, spec = build_preprocessor(ci_spec, Modality.IMAGE), ci_spec.modalities.image
    rows = [bench.item(i).image_bytes() for i in range(1, 41)]  # 96 to 192 px: under 4 x 64
    expected = np.stack([previous_image(spec, raw) for raw in rows])
    assert np.array_equal(pre(rows)["pixel_values"], expected)


def test_large_images_decode_near_the_target_and_stay_close(ci_spec):
    pre, spec = build_preprocessor(ci_spec, Modality.IMAGE), ci_spec.modalities.image
    jpeg, png = _photo(1000, 800, "JPEG"), _photo(1000, 800, "PNG")
    assert pre.decode(jpeg, "x").size == (250, 200)  # JPEG draft: 1/4 scale, both sides >= 2 x 64
    for raw in (jpeg, png):
        diff = np.abs(pre([raw])["pixel_values"][0] - previous_image(spec, raw))
        assert diff.mean() < 0.03 and diff.max() < 0.3, (diff.mean(), diff.max())  # in std units: a few levels


def test_log_mel_equals_transformers_spectrogram_batch(ci_spec, bench):
    pre, spec = build_preprocessor(ci_spec, Modality.AUDIO), ci_spec.modalities.audio
    rows = [bench.item(i).audio_bytes() for i in range(1, 13)]  # 16 kHz mono and 22.05 kHz stereo
    clips = [pre.decode(raw, "x") for raw in rows]
    assert all(np.array_equal(clip, previous_clip(spec, raw)) for clip, raw in zip(clips, rows))
    # Same sums in another order (a sparse filter-bank product instead of BLAS): equal here to the last bit,
    # allowed one float32 step where another CPU's BLAS rounds differently.
    np.testing.assert_allclose(pre.log_mel(clips), previous_log_mel(spec, clips), rtol=0, atol=1e-5)
    # Other standard rates: the cached filter is scipy's own, so resampling is unchanged.
    for rate in (8000, 11025, 32000, 44100, 48000, 96000):
        buf = io.BytesIO()
        sf.write(buf, 0.3 * np.sin(np.arange(rate) * 0.05), rate, format="WAV", subtype="FLOAT")
        assert np.array_equal(pre.decode(buf.getvalue(), "x"), previous_clip(spec, buf.getvalue())), rate


def test_cache_keys_follow_the_preprocessing_version(ci_spec, monkeypatch):
    import fusionrank.model.embeddings as embeddings
    import fusionrank.model.train as train

    before = embeddings.embeddings_path(ci_spec, Modality.IMAGE), train.checkpoint_path(ci_spec, "concat")
    monkeypatch.setattr(embeddings, "PREPROCESS_VERSION", embeddings.PREPROCESS_VERSION + 1)
    monkeypatch.setattr(train, "PREPROCESS_VERSION", train.PREPROCESS_VERSION + 1)
    after = embeddings.embeddings_path(ci_spec, Modality.IMAGE), train.checkpoint_path(ci_spec, "concat")
    assert before[0] != after[0] and before[1] != after[1]


def _thread_jobs(ci_spec, bench):
    """(callable, argument) pairs touching every preprocessor with inputs that need different shapes."""
    request = RequestPreprocessor(ci_spec)
    pre = dict(request.preprocessors)
    titles = [b"red tent", " ".join(["hiking"] * 25).encode(), " ".join(["boots"] * 200).encode()]
    jobs = [(pre[Modality.TEXT], [t]) for t in titles] + [(pre[Modality.TEXT], titles[:2])]
    jobs += [(pre[Modality.IMAGE], [bench.item(i).image_bytes(), _photo(600, 400, "JPEG")]) for i in (1, 2, 3)]
    jobs += [(pre[Modality.AUDIO], [bench.item(i).audio_bytes()]) for i in (1, 2, 3, 4)]
    history = np.repeat(bench.sessions.history[:3, None, :].astype(np.int64), 2, axis=1)
    jobs += [(lambda h: {"history": validate_history(h, ci_spec)}, h) for h in history]
    for n in (1, 3):
        items = {m: [bench.item(i).payload(m) for i in range(5, 5 + n)] for m in ci_spec.modalities.enabled}
        arrays = request_arrays(items, np.repeat(history[0][:1], n, axis=0))
        jobs.append((lambda inputs: request(inputs).flat(), arrays))
    return jobs


def test_every_preprocessor_gives_serial_results_from_many_threads(ci_spec, bench):
    jobs = _thread_jobs(ci_spec, bench)
    serial = [fn(arg) for fn, arg in jobs]
    threads, rounds = 8, 6
    barrier = threading.Barrier(threads)

    def worker(offset: int) -> list[int]:
        bad = []
        for r in range(rounds):
            barrier.wait()  # every thread starts each round together: the calls overlap
            for k in range(len(jobs)):
                j = (k + offset + r) % len(jobs)
                if not _same(jobs[j][0](jobs[j][1]), serial[j]):
                    bad.append(j)
        return bad

    with ThreadPoolExecutor(max_workers=threads) as pool:
        failures = [j for bad in pool.map(worker, range(threads)) for j in bad]
    assert not failures, f"jobs that differed from their serial result when run in threads: {sorted(set(failures))}"
