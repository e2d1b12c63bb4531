"""Request-level validation (`RankRequest.validate`), shared by every serving route and in-process callers."""

from __future__ import annotations

import numpy as np
import pytest

from fusionrank.contract.errors import RequestValidationError
from fusionrank.request.validation import RankRequest

NAMES = ("item_text", "item_image", "item_audio", "user_history")


def _inputs(ci_spec, text=3, image=3, audio=3, history=3):
    def column(n):
        return np.array([[b"payload"]] * n, dtype=object).reshape(n, 1)

    return {"item_text": column(text), "item_image": column(image), "item_audio": column(audio),
            "user_history": np.zeros((history, ci_spec.ranker.history.length), dtype=np.int64)}


def _error(ci_spec, inputs, max_candidates=64) -> str:
    with pytest.raises(RequestValidationError) as info:
        RankRequest(inputs, ci_spec, max_candidates).validate()
    return str(info.value)


def test_a_valid_request_gives_its_rows_and_history(ci_spec):
    inputs = _inputs(ci_spec)
    inputs["item_text"] = np.array([["naïve"], [b"b"], ["c"]], dtype=object)  # str rows are encoded as UTF-8
    request = RankRequest(inputs, ci_spec, 64).validate()
    assert request.rows["item_text"] == ["naïve".encode(), b"b", b"c"] and request.history.shape == (3, 20)


@pytest.mark.parametrize("odd", NAMES)
@pytest.mark.parametrize("rows", [2, 4])
def test_a_row_count_mismatch_names_the_input_that_disagrees(ci_spec, odd, rows):
    message = _error(ci_spec, _inputs(ci_spec, **{odd.split("_")[1]: rows}))
    others = ", ".join(n for n in NAMES if n != odd)
    assert message == f"{odd}: has {rows} rows but {others} have 3: one row per candidate"


def test_zero_and_too_many_candidates(ci_spec):
    assert _error(ci_spec, _inputs(ci_spec, 0, 0, 0, 0)) == (
        "item_text: the request has no candidates (0 rows); send 1 to 64")
    assert _error(ci_spec, _inputs(ci_spec, 9, 9, 9, 9), max_candidates=8) == (
        "item_text: 9 candidates; at most 8 per request")


def test_structure_errors_name_the_input(ci_spec):
    inputs = _inputs(ci_spec)
    del inputs["item_audio"]
    assert _error(ci_spec, inputs) == "item_audio: missing input"
    inputs = _inputs(ci_spec)
    inputs["item_image"] = np.zeros((3, 1), dtype=np.int32)
    assert _error(ci_spec, inputs) == "item_image: expected BYTES, got int32"
    inputs = _inputs(ci_spec)
    inputs["item_text"] = np.array([[b"a", b"b"]] * 3, dtype=object)
    assert _error(ci_spec, inputs).startswith("item_text: expected one element per candidate")
    inputs = _inputs(ci_spec)
    inputs["item_text"][1, 0] = 42
    assert _error(ci_spec, inputs) == "item_text[1]: expected bytes, got int"
    inputs = _inputs(ci_spec)
    inputs["user_history"][2, 0] = 5
    assert _error(ci_spec, inputs).startswith("user_history[2]: differs from row 0")
