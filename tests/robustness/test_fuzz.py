"""Property-based fuzzing of every preprocessor in process: a seeded, bounded slice of `python -m tests.robustness.fuzz`
(Hypothesis, derandomized), so `make test` proves the properties in a few seconds; the long run is that command."""

from __future__ import annotations

import pytest

from tests.robustness.fuzz import PROPERTIES, Fuzzer, FuzzFailure, run

CASES = 60  # per property


@pytest.fixture(scope="module")
def fuzzer(ci_spec):
    return Fuzzer(ci_spec)


def test_every_preprocessor_holds_its_properties(fuzzer):
    stats = run(fuzzer, CASES)
    print(stats.table())
    assert all(stats.cases[p] >= CASES for p in PROPERTIES), stats.cases
    # The slice reaches both outcomes of every property: accepted arrays and named refusals.
    assert all(0 < stats.rejected[p] < stats.cases[p] for p in PROPERTIES), stats.table()


def test_a_broken_preprocessor_is_caught(fuzzer, monkeypatch):
    """The property fails when a decoder lets an unexpected exception through (here: any audio row raises one)."""
    audio = fuzzer.pre[next(m for m in fuzzer.pre if m.value == "audio")]

    def broken(raw, name):
        raise KeyError("decoder bug")

    monkeypatch.setattr(audio, "decode", broken)
    with pytest.raises(FuzzFailure, match="KeyError"):
        run(fuzzer, 5, only=("audio",))


def test_a_header_check_that_disagrees_with_decoding_is_caught(fuzzer, monkeypatch):
    """The property fails when the header check refuses a payload the image preprocessing accepts (here: every
    payload whose header is fine)."""
    from fusionrank.contract.errors import PreprocessError

    image = fuzzer.pre[next(m for m in fuzzer.pre if m.value == "image")]
    real = image.header

    def strict(raw, name):
        real(raw, name)
        raise PreprocessError(name, "refused by a wrong header check")

    monkeypatch.setattr(image, "header", strict)
    with pytest.raises(FuzzFailure, match="the header check (refused a payload the preprocessing accepts|said)"):
        run(fuzzer, CASES, only=("image",))
