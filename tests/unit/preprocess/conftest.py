"""Fixtures of the preprocessing unit tests."""

from __future__ import annotations

import pytest

from fusionrank.contract.spec import Modality
from fusionrank.preprocess import build_preprocessor


@pytest.fixture(scope="module")
def text(ci_spec):
    """The CI spec's text preprocessor (tokenizer and padding buckets)."""
    return build_preprocessor(ci_spec, Modality.TEXT)
