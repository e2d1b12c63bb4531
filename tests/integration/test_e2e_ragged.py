"""End to end against the real tritonserver: ragged candidates (absent modalities, video items) on the route callers
use and on the reference ensemble score as the offline PyTorch reference does, and bad presence or video input is
INVALID_ARGUMENT naming the input and the row while the good requests beside it are unaffected."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from fusionrank.contract.spec import Modality
from fusionrank.contract.tensors import (
    CLICK_PROBABILITY,
    MODALITY_WEIGHTS,
    deadline_arguments,
    infer_inputs,
    request_arrays,
)

pytestmark = pytest.mark.e2e

TEXT, IMAGE, AUDIO = Modality.TEXT, Modality.IMAGE, Modality.AUDIO
# Per candidate (cycled): which of text, image, audio it sends, and whether it sends its clip (video items only).
PATTERNS = [("complete", (1, 1, 1), False), ("no audio", (1, 1, 0), False), ("no image", (1, 0, 1), False),
            ("title only", (1, 0, 0), False), ("video only", (1, 0, 1), True), ("video and still", (1, 1, 0), True),
            ("image only", (0, 1, 0), False)]


@pytest.fixture(scope="module")
def bench(ci_spec):
    from fusionrank.model.synthetic_data import load_benchmark

    return load_benchmark(ci_spec)


def ragged_request(bench, session: int, n: int = 10) -> tuple[dict[str, np.ndarray], list[str]]:
    """The session's first n candidates, each sent as the next pattern (video patterns on the catalogue's video
    items, which the patterns cycle onto): the contract's arrays and each row's pattern name."""
    ids = [int(i) for i in bench.sessions.candidates[session][:n]]
    videos_ids = [int(i) for i in np.flatnonzero(bench.video_items)]
    items = {m: [] for m in (TEXT, IMAGE, AUDIO)}
    videos, names = [], []
    for row, item_id in enumerate(ids):
        name, sends, video = PATTERNS[row % len(PATTERNS)]
        item = bench.item(videos_ids[row] if video else item_id)
        for m, send in zip((TEXT, IMAGE, AUDIO), sends):
            items[m].append(item.payload(m) if send else None)
        videos.append(item.video_bytes() if video else None)
        names.append(name)
    history = np.repeat(bench.sessions.history[session][None, :], len(ids), axis=0).astype(np.int64)
    return request_arrays(items, history, videos), names


def _infer(url: str, model: str, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    with grpcclient.InferenceServerClient(url) as client:
        # The caller's deadline travels with the request, as the fusionrank client sends it.
        result = client.infer(model, infer_inputs(grpcclient, arrays), client_timeout=120, **deadline_arguments(120))
        return result.as_numpy(CLICK_PROBABILITY)[:, 0], result.as_numpy(MODALITY_WEIGHTS)


def test_ragged_and_video_candidates_score_as_offline_pytorch_on_both_routes(triton_server, ci_spec, bench,
                                                                             reference_pipeline):
    tol, weight_tol = ci_spec.export.tolerance(CLICK_PROBABILITY), ci_spec.export.tolerance(MODALITY_WEIGHTS)
    worst = {}
    for session in bench.frozen_sessions(2):
        arrays, names = ragged_request(bench, int(session))
        assert {"modality_present", "item_video"} <= set(arrays) and "video only" in names
        offline, offline_weights = reference_pipeline.score_arrays(arrays)
        absent = ~arrays["modality_present"]
        for model in (ci_spec.serving.route, ci_spec.serving.reference_ensemble):
            served, weights = _infer(triton_server.grpc_url, model, arrays)
            worst[model] = max(worst.get(model, 0.0), float(np.max(np.abs(served - offline))))
            np.testing.assert_allclose(served, offline, atol=tol.atol, rtol=tol.rtol, err_msg=model)
            np.testing.assert_allclose(weights, offline_weights, atol=weight_tol.atol, rtol=weight_tol.rtol)
            assert (weights[absent] == 0).all(), f"{model}: an absent modality got a weight"
            np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)
    print("ragged requests, served vs offline PyTorch: max |diff| = "
          + ", ".join(f"{model} {diff:.3g}" for model, diff in worst.items()) + f" (atol {tol.atol})")


def _bad_cases(arrays: dict[str, np.ndarray], bench) -> list[tuple[str, dict, str]]:
    """(case, request arrays, the start of the expected message): each changes row 1 (no audio) or row 3 (title
    only) of a good ragged request."""
    def changed(name, row, value):
        copy = {**arrays, name: arrays[name].copy()}
        copy[name][row] = value
        return copy

    present = arrays["modality_present"]
    nothing = changed("modality_present", 3, [False, False, False])
    nothing["item_text"] = nothing["item_text"].copy()
    nothing["item_text"][3, 0] = b""
    return [
        ("corrupt audio marked present", changed("item_audio", 0, [b"RIFF\x10\x00\x00\x00WAVEjunk"]), "item_audio[0]"),
        ("empty image marked present", changed("modality_present", 3, [True, True, False]), "item_image[3]"),
        ("payload marked absent", changed("item_audio", 1, [bench.item(1).audio_bytes()]),
         "item_audio[1]: audio is marked absent"),
        ("no modality at all", nothing, "modality_present[3]: the candidate has no modality present"),
        ("corrupt video", changed("item_video", 4, [b"\x00\x00\x00\x18ftypmp42 not a movie"]), "item_video[4]"),
        ("presence not BOOL-shaped", {**arrays, "modality_present": present[:, :2].copy()}, "modality_present"),
    ]


def test_bad_presence_and_video_input_fail_alone_on_both_routes(triton_server, ci_spec, bench):
    arrays, _ = ragged_request(bench, int(bench.frozen_sessions(1)[0]), n=6)
    cases = _bad_cases(arrays, bench)
    for model in (ci_spec.serving.route, ci_spec.serving.reference_ensemble):
        expected = _infer(triton_server.grpc_url, model, arrays)[0]

        def bad(case, model=model):
            try:
                _infer(triton_server.grpc_url, model, case[1])
            except InferenceServerException as exc:
                return exc.status(), exc.message()
            return "OK", "no error"

        with ThreadPoolExecutor(max_workers=6) as pool:
            good = [pool.submit(_infer, triton_server.grpc_url, model, arrays) for _ in range(len(cases))]
            results = list(pool.map(bad, cases))
            good_scores = [f.result()[0] for f in good]
        for (name, _, start), (status, message) in zip(cases, results):
            assert status in ("StatusCode.INVALID_ARGUMENT", "StatusCode.INVALID_ARG"), f"{model} {name}: {message}"
            assert start in message, f"{model} {name}: {message}"
        for scores in good_scores:
            np.testing.assert_allclose(scores, expected, atol=1e-6)
