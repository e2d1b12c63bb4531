"""The offline PyTorch reference (trained CI ranker, exported tokenizer) on incomplete and video candidates."""

from __future__ import annotations

import numpy as np
import pytest

from fusionrank.request.candidates import presence_patterns
from tests.unit.request.test_ragged import AUDIO, IMAGE, TEXT, _request


@pytest.mark.slow
def test_reference_scores_incomplete_and_video_candidates(ci_spec, reference_pipeline, clip):
    """The offline reference takes the contract as the server will: absent modalities, videos, mixed requests."""
    from fusionrank.model.embeddings import catalogue_embeddings
    from fusionrank.model.synthetic_data import load_benchmark

    bench = load_benchmark(ci_spec)
    video_item = next(it for it in bench.items if it.is_video)
    present = presence_patterns(3, 8)
    items = {m: [video_item.payload(m) if present[i, j] else b"" for i in range(8)]
             for j, m in enumerate((TEXT, IMAGE, AUDIO))}
    items[IMAGE][0] = b""  # row 0: its image is its clip alone
    videos = [video_item.video_bytes()] + [b""] * 7
    history = np.repeat(bench.sessions.history[:1], 8, axis=0)
    scores, weights = reference_pipeline.score(items, history, present, videos)
    assert np.isfinite(scores).all() and np.array_equal(weights == 0, ~present)
    np.testing.assert_allclose(weights.sum(1), 1, rtol=1e-5)
    # Each row alone scores the same as in the mixed request.
    for row in (0, 4, 6):
        alone, _ = reference_pipeline.score({m: v[row:row + 1] for m, v in items.items()}, history[:1],
                                            present[row:row + 1], videos[row:row + 1])
        np.testing.assert_allclose(alone, scores[row:row + 1], rtol=1e-5, atol=1e-6)
    # A video item's embedding in a request is the catalogue's (what the ranker was trained on).
    prepared = reference_pipeline.preparer(items, present, videos)
    image = prepared.encode(reference_pipeline._encode)[1]
    table = catalogue_embeddings(ci_spec, bench)[IMAGE]
    np.testing.assert_allclose(image[0], table[video_item.item_id], rtol=1e-4, atol=1e-5)
    # Absence is told apart from a zero embedding: the same request without modality_present is another score.
    assert not np.allclose(scores[1:4], reference_pipeline.score(_request(3), history[:3])[0])
